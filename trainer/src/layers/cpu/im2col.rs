//! The column matrix of a convolution (im2col) and its adjoint (col2im): one image unfolded
//! into [K×P] rows, one row per (input channel, filter tap), so that a convolution is a GEMM.
//! Strided convolutions first split the image into its stride² phases, so that each row is
//! one shifted copy of a phase plane instead of a strided gather per output row.

use super::add_into;
use super::conv::Dims;

/// The output columns `ox` whose input column `ox·s + j − pad` lies inside a row of `w`
/// pixels: everything else reads padding.
#[inline]
pub(super) fn valid_columns(
    j: usize,
    pad: usize,
    stride: usize,
    w: usize,
    ow: usize,
) -> (usize, usize) {
    // ox·s + j ≥ pad  and  ox·s + j − pad ≤ w − 1
    let first = pad.saturating_sub(j).div_ceil(stride);
    let last = (w - 1 + pad).checked_sub(j).map_or(0, |v| v / stride + 1);
    (first.min(ow), last.min(ow).max(first.min(ow)))
}

/// Unfolds one image into `col` [K×P]: row (c, i, j) holds input pixel (c, y·s+i−ph, x·s+j−pw)
/// for every output position (y, x), 0 where that falls in the padding.
pub(super) fn im2col(x: &[f32], d: &Dims, col: &mut [f32], phases: &mut [f32]) {
    match Phased::of(d) {
        Some(phased) => phased.im2col(x, d, col, phases),
        None => im2col_by_rows(x, d, col),
    }
}

/// Floats of scratch for one image's column matrix, followed by what [`im2col`] and
/// [`col2im`] need besides (the phases of a strided convolution).
pub(super) fn scratch_len(d: &Dims) -> usize {
    d.k() * d.ld() + Phased::of(d).map_or(0, |phased| phased.phases_len(d))
}

/// [`im2col`] for any geometry: a copy (or a strided gather) per output row.
fn im2col_by_rows(x: &[f32], d: &Dims, col: &mut [f32]) {
    let p = d.p();
    let s = d.g.stride;
    for c in 0..d.cin {
        let plane = &x[c * d.h * d.w..(c + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &mut col[d.col_row(c, i, j)..][..p];
                let (first, last) = valid_columns(j, d.g.pad_w, s, d.w, d.ow);
                for oy in 0..d.oh {
                    let out = &mut row[oy * d.ow..(oy + 1) * d.ow];
                    let iy = (oy * s + i) as isize - d.g.pad_h as isize;
                    if iy < 0 || iy >= d.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    out[..first].fill(0.0);
                    out[last..].fill(0.0);
                    if first == last {
                        continue;
                    }
                    let start = first * s + j - d.g.pad_w;
                    if s == 1 {
                        out[first..last].copy_from_slice(&src[start..start + (last - first)]);
                    } else {
                        gather(&mut out[first..last], &src[start..], s);
                    }
                }
            }
        }
    }
}

/// `out[k] = src[k·stride]`. In fixed-size chunks of the source, which the compiler turns
/// into shuffles; `step_by` compiled to a scalar loop with a bounds check per element.
#[inline]
fn gather(out: &mut [f32], src: &[f32], stride: usize) {
    fn chunked<const S: usize>(out: &mut [f32], src: &[f32]) {
        // The last element's chunk may run past the row (and the image), so it goes alone.
        let Some((last, head)) = out.split_last_mut() else {
            return;
        };
        let (chunks, _) = src[..head.len() * S].as_chunks::<S>();
        for (o, chunk) in head.iter_mut().zip(chunks) {
            *o = chunk[0];
        }
        *last = src[head.len() * S];
    }
    match stride {
        2 => chunked::<2>(out, src),
        4 => chunked::<4>(out, src),
        _ => {
            for (o, v) in out.iter_mut().zip(src.iter().step_by(stride)) {
                *o = *v;
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every entry of `col` into the input pixel it came from, in
/// `dx`, which must hold zeros. `col` is scratch: the fast path zeroes its entries that came
/// from padding.
pub(super) fn col2im(col: &mut [f32], d: &Dims, dx: &mut [f32], phases: &mut [f32]) {
    match Phased::of(d) {
        Some(phased) => phased.col2im(col, d, dx, phases),
        None => col2im_by_rows(col, d, dx),
    }
}

/// [`col2im`] for any geometry, leaving `col` as it was.
fn col2im_by_rows(col: &[f32], d: &Dims, dx: &mut [f32]) {
    let p = d.p();
    let s = d.g.stride;
    for c in 0..d.cin {
        let plane = &mut dx[c * d.h * d.w..(c + 1) * d.h * d.w];
        for i in 0..d.kh {
            for j in 0..d.kw {
                let row = &col[d.col_row(c, i, j)..][..p];
                let (first, last) = valid_columns(j, d.g.pad_w, s, d.w, d.ow);
                if first >= last {
                    continue;
                }
                for oy in 0..d.oh {
                    let iy = (oy * s + i) as isize - d.g.pad_h as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    let start = first * s + j - d.g.pad_w;
                    let values = &row[oy * d.ow + first..oy * d.ow + last];
                    if s == 1 {
                        add_into(&mut dst[start..start + values.len()], values);
                    } else {
                        scatter_add(&mut dst[start..], values, s);
                    }
                }
            }
        }
    }
}

/// `dst[k·stride] += values[k]`: the adjoint of [`gather`], in chunks the same way.
#[inline]
fn scatter_add(dst: &mut [f32], values: &[f32], stride: usize) {
    fn chunked<const S: usize>(dst: &mut [f32], values: &[f32]) {
        // The last value's chunk may run past the row (and the image), so it goes alone.
        let Some((last, head)) = values.split_last() else {
            return;
        };
        let (chunks, _) = dst[..head.len() * S].as_chunks_mut::<S>();
        for (chunk, v) in chunks.iter_mut().zip(head) {
            chunk[0] += v;
        }
        dst[head.len() * S] += last;
    }
    match stride {
        2 => chunked::<2>(dst, values),
        4 => chunked::<4>(dst, values),
        _ => {
            for (d, v) in dst.iter_mut().step_by(stride).zip(values) {
                *d += v;
            }
        }
    }
}

/// A convolution whose input is exactly `stride` times its output in both directions: every
/// stride-1 convolution a DNA can express ("same" padding with an odd filter), and the
/// strided ones on even-sized maps.
///
/// Split the image into its `stride²` phases, phase (ra, rb) holding the pixels
/// (y·s + ra, x·s + rb): each is an `oh×ow` plane. Filter tap (i, j) then reads one phase,
/// shifted by one fixed offset, except for the entries that fall outside it (the padding):
/// row (c, i, j) of the column matrix is one copy of a whole plane and a few zeroed columns
/// per output row, instead of a copy (or a strided gather) per output row. At stride 1 the
/// only phase is the image itself and nothing is split.
///
/// At 32 pixels a row the copies per output row are short and the strided gathers slow: both
/// took a large share of training time, which whole-plane copies and the chunked [`gather`]
/// cut (figures: docs/PERFORMANCE.md, CPU kernels: im2col).
///
/// Found only where it applies ([`Phased::of`]); the sizes it works with are the [`Dims`]
/// every method is given (each phase is `oh×ow`).
struct Phased;

/// Where filter tap (i, j) reads: which phase, and the offset in output rows and columns.
struct Tap {
    phase: usize,
    rows: std::ops::Range<usize>,
    shift: isize,
    valid: std::ops::Range<usize>,
    columns: (usize, usize),
}

impl Phased {
    fn of(d: &Dims) -> Option<Self> {
        let s = d.g.stride;
        (d.oh * s == d.h && d.ow * s == d.w).then_some(Self)
    }

    /// Floats of scratch the phases need: none at stride 1.
    fn phases_len(&self, d: &Dims) -> usize {
        if d.g.stride == 1 {
            0
        } else {
            d.image()
        }
    }

    /// For one filter tap: the phase it reads, the output rows inside that phase, the shift
    /// (output position `t` reads phase pixel `t + shift`), the flat range of output
    /// positions whose shifted pixel lies in the plane, and the columns `first..last` that
    /// read the phase rather than padding.
    fn tap(&self, d: &Dims, i: usize, j: usize) -> Tap {
        let s = d.g.stride as isize;
        let (a, b) = (
            i as isize - d.g.pad_h as isize,
            j as isize - d.g.pad_w as isize,
        );
        let (ra, qa) = (a.rem_euclid(s) as usize, a.div_euclid(s));
        let (rb, qb) = (b.rem_euclid(s) as usize, b.div_euclid(s));
        let (h, w) = (d.oh as isize, d.ow as isize);
        // Output row y reads phase row y + qa, which must lie in 0..h; columns likewise.
        let span = |q: isize, n: isize| {
            let first = (-q).clamp(0, n);
            first as usize..(n - q).clamp(first, n) as usize
        };
        let rows = span(qa, h);
        let columns = span(qb, w);
        let shift = qa * w + qb;
        let plane = h * w;
        // Clamped to the plane: at the ends, the range would wrap to the pixel before the
        // first or after the last, and those positions are padding columns anyway.
        let start = ((rows.start as isize) * w)
            .max(-shift)
            .min(rows.end as isize * w);
        let end = ((rows.end as isize) * w).min(plane - shift).max(start);
        Tap {
            phase: ra * d.g.stride + rb,
            rows,
            shift,
            valid: start as usize..end as usize,
            columns: (columns.start, columns.end),
        }
    }

    /// Splits each input plane of `x` into its phases, in `phases` [Cin × s² × oh·ow].
    fn split(&self, x: &[f32], d: &Dims, phases: &mut [f32]) {
        self.for_each_phase_row(d, |phase_row, image_row| {
            gather(
                &mut phases[phase_row..][..d.ow],
                &x[image_row..],
                d.g.stride,
            );
        });
    }

    /// The adjoint of [`Self::split`]: every phase pixel added back into `dx`.
    fn merge(&self, phases: &[f32], d: &Dims, dx: &mut [f32]) {
        self.for_each_phase_row(d, |phase_row, image_row| {
            scatter_add(
                &mut dx[image_row..],
                &phases[phase_row..][..d.ow],
                d.g.stride,
            );
        });
    }

    /// Calls `f` for every row of every phase of every input channel, with where it starts
    /// among the phases [Cin × s² × oh·ow] and where its first pixel lies in the image (its
    /// others follow `stride` apart). Loops rather than an iterator: nested `flat_map`s
    /// measured slower in this hot path.
    fn for_each_phase_row(&self, d: &Dims, mut f: impl FnMut(usize, usize)) {
        let (s, p, plane) = (d.g.stride, d.p(), d.h * d.w);
        for c in 0..d.cin {
            for ra in 0..s {
                for rb in 0..s {
                    let phase = (c * s * s + ra * s + rb) * p;
                    for y in 0..d.oh {
                        f(phase + y * d.ow, c * plane + (y * s + ra) * d.w + rb);
                    }
                }
            }
        }
    }

    fn im2col(&self, x: &[f32], d: &Dims, col: &mut [f32], phases: &mut [f32]) {
        let (w, p) = (d.ow, d.p());
        let planes: &[f32] = if d.g.stride == 1 {
            x
        } else {
            let phases = &mut phases[..d.image()];
            self.split(x, d, phases);
            phases
        };
        let per_channel = d.g.stride * d.g.stride * p;
        // Taps outside, channels inside: a tap's ranges are the same for every channel.
        for i in 0..d.kh {
            for j in 0..d.kw {
                let tap = self.tap(d, i, j);
                let (first, last) = tap.columns;
                for c in 0..d.cin {
                    let plane = &planes[c * per_channel + tap.phase * p..][..p];
                    let out = &mut col[d.col_row(c, i, j)..][..p];
                    out[..tap.valid.start].fill(0.0);
                    out[tap.valid.end..].fill(0.0);
                    if !tap.valid.is_empty() {
                        let from = (tap.valid.start as isize + tap.shift) as usize;
                        out[tap.valid.clone()]
                            .copy_from_slice(&plane[from..from + tap.valid.len()]);
                    }
                    // Padding columns of the rows that see the phase held a neighbour row's
                    // pixels (or were never written).
                    zero_columns(out, w, &tap.rows, first, last);
                }
            }
        }
    }

    fn col2im(&self, col: &mut [f32], d: &Dims, dx: &mut [f32], phases: &mut [f32]) {
        let (w, p) = (d.ow, d.p());
        let planes: &mut [f32] = if d.g.stride == 1 {
            dx
        } else {
            let phases = &mut phases[..d.image()];
            phases.fill(0.0);
            phases
        };
        let per_channel = d.g.stride * d.g.stride * p;
        for i in 0..d.kh {
            for j in 0..d.kw {
                let tap = self.tap(d, i, j);
                let (first, last) = tap.columns;
                for c in 0..d.cin {
                    let plane = &mut planes[c * per_channel + tap.phase * p..][..p];
                    let row = &mut col[d.col_row(c, i, j)..][..p];
                    // Entries from padding columns would land on a neighbour row's pixels.
                    zero_columns(row, w, &tap.rows, first, last);
                    if !tap.valid.is_empty() {
                        let to = (tap.valid.start as isize + tap.shift) as usize;
                        add_into(
                            &mut plane[to..to + tap.valid.len()],
                            &row[tap.valid.clone()],
                        );
                    }
                }
            }
        }
        if d.g.stride != 1 {
            self.merge(&phases[..d.image()], d, dx);
        }
    }
}

/// Zeroes columns `..first` and `last..` of `rows` in `plane` (rows `w` wide): a strided
/// store per column, since a fill per row is a memset call for one or two elements.
pub(super) fn zero_columns(
    plane: &mut [f32],
    w: usize,
    rows: &std::ops::Range<usize>,
    first: usize,
    last: usize,
) {
    if rows.is_empty() {
        return;
    }
    for column in (0..first).chain(last..w) {
        for v in plane[rows.start * w + column..rows.end * w]
            .iter_mut()
            .step_by(w)
        {
            *v = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Geometry;

    /// The phased path against the row-by-row one: the same column matrix, and the same
    /// input gradient from the same random column gradients, at stride 1 and strided.
    #[test]
    fn phased_path_matches_row_by_row() {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // cin, h, w, kh, kw, stride: odd filters with "same" padding, including filters
        // wider than the image (taps that only ever see padding) and 1×1.
        for (cin, h, w, kh, kw, s) in [
            (3, 8, 8, 3, 3, 1),
            (2, 5, 7, 3, 5, 1),
            (2, 2, 2, 5, 5, 1),
            (1, 1, 4, 3, 7, 1),
            (4, 6, 3, 1, 1, 1),
            (2, 3, 9, 7, 3, 1),
            (3, 8, 8, 3, 3, 2),
            (2, 8, 6, 3, 5, 2),
            (2, 2, 2, 5, 5, 2),
            (1, 8, 4, 3, 7, 4),
            (2, 12, 8, 7, 3, 4),
            (3, 4, 6, 1, 1, 2),
            // 256 outputs: the column matrix's rows get a gap (`Dims::ld`).
            (2, 16, 16, 3, 3, 1),
            (1, 32, 32, 3, 5, 2),
        ] {
            let g = Geometry {
                stride: s,
                pad_h: (kh - 1) / 2,
                pad_w: (kw - 1) / 2,
            };
            let d = Dims::new((1, cin, h, w), (2, cin, kh, kw), g).unwrap();
            let phased = Phased::of(&d).expect("input `stride` times the output");
            let case = (cin, h, w, kh, kw, s);
            let x: Vec<f32> = (0..d.image()).map(|_| r.random_range(-1.0..1.0)).collect();
            let mut phases = vec![f32::NAN; d.image()];
            let (k, p, ld) = (d.k(), d.p(), d.ld());
            let (mut fast, mut slow) = (vec![f32::NAN; k * ld], vec![0f32; k * ld]);
            phased.im2col(&x, &d, &mut fast, &mut phases);
            im2col_by_rows(&x, &d, &mut slow);
            // Rows `ld` apart; what lies between them is never read.
            for (a, b) in fast.chunks(ld).zip(slow.chunks(ld)) {
                assert_eq!(a[..p], b[..p], "im2col {case:?}");
            }
            let dcol: Vec<f32> = (0..k * ld).map(|_| r.random_range(-1.0..1.0)).collect();
            let (mut fast, mut slow) = (vec![0f32; d.image()], vec![0f32; d.image()]);
            phases.fill(f32::NAN);
            phased.col2im(&mut dcol.clone(), &d, &mut fast, &mut phases);
            col2im_by_rows(&dcol, &d, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-5, "col2im {case:?}");
            }
        }
    }

    #[test]
    fn valid_columns_are_exactly_the_inside_ones() {
        for (w, k, s) in [
            (7usize, 3usize, 1usize),
            (7, 5, 2),
            (4, 9, 4),
            (1, 3, 1),
            (9, 1, 3),
        ] {
            let pad = (k - 1) / 2;
            let ow = (w + 2 * pad - k) / s + 1;
            for j in 0..k {
                let (first, last) = valid_columns(j, pad, s, w, ow);
                for ox in 0..ow {
                    let ix = (ox * s + j) as isize - pad as isize;
                    let inside = ix >= 0 && ix < w as isize;
                    assert_eq!(
                        inside,
                        (first..last).contains(&ox),
                        "w {w} k {k} s {s} j {j} ox {ox}"
                    );
                }
            }
        }
    }
}
