//! Convolution on the CPU as im2col + GEMM, forward and both gradients, as Candle custom ops.
//!
//! Candle's own CPU convolution computes the input gradient with a naive transposed
//! convolution and the weight gradient as a convolution whose kernel is the whole output
//! gradient; both are several times slower than PyTorch. Here all three passes are one
//! matrix product per image (the `gemm` crate Candle already uses), images in parallel:
//!
//! ```text
//! forward        y[n]   = b + W    · col(x[n])        [Cout×K]·[K×P]
//! input grad     dx[n]  = col⁻¹(Wᵀ · dy[n])            [K×Cout]·[Cout×P], scattered back
//! weight grad    dW     = Σn dy[n] · col(x[n])ᵀ        [Cout×P]·[P×K]
//! bias grad      db     = Σn Σp dy[n]
//! ```
//!
//! The bias is part of the op: as a separate broadcast addition, its gradient (a reduction
//! over three of four dimensions) cost Candle more than the convolution's own gradients.
//!
//! with K = Cin·kh·kw and P = Hout·Wout. The input gradient of a tensor nothing needs (the
//! images, for the first layer) is not computed.
//!
//! Convolutions at stride 1 with 3 or 5 taps along each axis, padded to keep the size (most
//! of the reference models' layers), run all three passes as Winograd F(2×2, kh×kw) instead,
//! with 2.25× (3×3) to 2.5× (3×5) fewer multiplications: see `winograd.rs` and
//! [`Dims::winograd`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::winograd::{Kernel, Taps, Winograd};
use super::{
    add_into, assume_written, contiguous, lane_sum, par_written, transpose, with_scratch,
    GemmOperand,
};

/// Stride and zero padding (per side) of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub pad_h: usize,
    pub pad_w: usize,
}

impl Geometry {
    /// The output's height and width for `input` [N, Cin, H, W] and `kernel`
    /// [Cout, Cin, kh, kw]; an error where the channels disagree, the stride is 0 or the filter
    /// does not fit the padded input. Every convolution path (CPU, GPU, cuDNN) sizes its
    /// output here.
    pub fn output_size(
        &self,
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
    ) -> Result<(usize, usize)> {
        let (_, cin, h, w) = input;
        let (_, kcin, kh, kw) = kernel;
        if kcin != cin {
            candle_core::bail!("conv2d: input has {cin} channels, kernel expects {kcin}");
        }
        if self.stride == 0 || h + 2 * self.pad_h < kh || w + 2 * self.pad_w < kw {
            candle_core::bail!(
                "conv2d: a {kh}x{kw} filter at stride {} does not fit a padded {h}x{w} input",
                self.stride
            );
        }
        Ok((
            (h + 2 * self.pad_h - kh) / self.stride + 1,
            (w + 2 * self.pad_w - kw) / self.stride + 1,
        ))
    }
}

/// All the sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    g: Geometry,
}

impl Dims {
    fn new(
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
        g: Geometry,
    ) -> Result<Self> {
        let (n, cin, h, w) = input;
        let (cout, _, kh, kw) = kernel;
        let (oh, ow) = g.output_size(input, kernel)?;
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            oh,
            ow,
            g,
        })
    }

    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Row stride of the column matrix, in floats: P, or a little more where P is a multiple
    /// of 256 (rows a multiple of 1 KiB apart), whose rows fall into the same few L1 cache
    /// sets. `gemm` reads the matrix a tap row after another, and on one core of the
    /// development machine the skip model's 32→32 forward product (P = 1024, 4 KiB apart)
    /// ran at 64–74 GFLOP/s with P and 99–102 with P + 32; layers with P = 256 were the same
    /// either way (128–131).
    fn ld(&self) -> usize {
        let p = self.p();
        if p.is_multiple_of(256) {
            p + 32
        } else {
            p
        }
    }

    /// Where row (c, i, j) of the column matrix starts.
    fn col_row(&self, c: usize, i: usize, j: usize) -> usize {
        ((c * self.kh + i) * self.kw + j) * self.ld()
    }

    fn image(&self) -> usize {
        self.cin * self.h * self.w
    }

    /// This convolution as a Winograd F(2×2, kh×kw) one, where it is one at stride 1 with
    /// 3 or 5 taps along each axis, padded to keep the image's size, `inputs` → `outputs`
    /// channels, and big enough to gain from it: (Cin, Cout) for the forward pass and the
    /// weight gradient, (Cout, Cin) for the input gradient.
    fn winograd(&self, inputs: usize, outputs: usize) -> Option<Winograd> {
        let (rows, columns) = (Taps::of(self.kh)?, Taps::of(self.kw)?);
        let g = self.g;
        let fits = g.stride == 1 && g.pad_h == rows.pad() && g.pad_w == columns.pad();
        let shape = Winograd {
            inputs,
            outputs,
            h: self.h,
            w: self.w,
            rows,
            columns,
        };
        (fits && shape.worthwhile()).then_some(shape)
    }
}

/// The output columns `ox` whose input column `ox·s + j − pad` lies inside a row of `w`
/// pixels: everything else reads padding.
#[inline]
fn valid_columns(j: usize, pad: usize, stride: usize, w: usize, ow: usize) -> (usize, usize) {
    // ox·s + j ≥ pad  and  ox·s + j − pad ≤ w − 1
    let first = pad.saturating_sub(j).div_ceil(stride);
    let last = (w - 1 + pad).checked_sub(j).map_or(0, |v| v / stride + 1);
    (first.min(ow), last.min(ow).max(first.min(ow)))
}

/// Unfolds one image into `col` [K×P]: row (c, i, j) holds input pixel (c, y·s+i−ph, x·s+j−pw)
/// for every output position (y, x), 0 where that falls in the padding.
fn im2col(x: &[f32], d: &Dims, col: &mut [f32], phases: &mut [f32]) {
    match Phased::of(d) {
        Some(phased) => phased.im2col(x, d, col, phases),
        None => im2col_by_rows(x, d, col),
    }
}

/// Floats of scratch for one image's column matrix, followed by what [`im2col`] and
/// [`col2im`] need besides (the phases of a strided convolution).
fn scratch_len(d: &Dims) -> usize {
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
/// into shuffles; `step_by` compiled to a scalar loop with a bounds check per element, which
/// took about half of im2col's time in the skip model's profile.
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
fn col2im(col: &mut [f32], d: &Dims, dx: &mut [f32], phases: &mut [f32]) {
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
/// At stride 1 and 32 pixels a row, im2col and its short copies took a fifth of the skip
/// model's training time on the CPU (`perf`); after the whole-plane copies and [`gather`],
/// 12%. The strided gathers were 14% of the 3-convolution model's profile.
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
    /// others follow `stride` apart). Loops rather than an iterator: with nested
    /// `flat_map`s conv3 trained about 2% slower in 3 of 4 interleaved rounds.
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
fn zero_columns(
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

/// y = conv2d(x, W) + b; differentiable in all three.
pub struct Conv2d {
    pub geometry: Geometry,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "cambrian-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "conv2d input")?;
        let w = contiguous(s2, l2, "conv2d kernel")?;
        let b = contiguous(s3, l3, "conv2d bias")?;
        let d = Dims::new(l1.shape().dims4()?, l2.shape().dims4()?, self.geometry)?;
        let (k, p) = (d.k(), d.p());
        if b.len() != d.cout {
            candle_core::bail!("conv2d: {} biases for {} channels", b.len(), d.cout);
        }
        let winograd = d
            .winograd(d.cin, d.cout)
            .map(|shape| shape.prepare(w, Kernel::Forward));
        // SAFETY: chunk `image` holds that image's Cout rows of P outputs. Winograd's output
        // transform writes every one of them; otherwise each row is written with its
        // channel's bias (there are Cout biases, checked above) before the product is added
        // onto it.
        let y = unsafe {
            par_written(d.n * d.cout * p, d.cout * p, |image, y| {
                let x = &x[image * d.image()..][..d.image()];
                if let Some(winograd) = &winograd {
                    winograd.apply(x, Some(b), y);
                    return;
                }
                for (row, &bias) in y.chunks_exact_mut(p).zip(b) {
                    for v in row {
                        v.write(bias);
                    }
                }
                let y = assume_written(y);
                with_scratch(scratch_len(&d), |scratch| {
                    let (col, phases) = scratch.split_at_mut(k * d.ld());
                    im2col(x, &d, col, phases);
                    // yᵀ [P×Cout] = colᵀ [P×K] · Wᵀ [K×Cout], stored transposed, which is y.
                    // `gemm` reads colᵀ, column-major, without packing it, and packs only
                    // the small Wᵀ. The other way round (y = W·col) it repacked W for every
                    // block of columns: on one core, per image with the column matrix fresh
                    // from memory, the skip model's 3×3 32→32 layer took 0.42–0.49 ms that
                    // way and 0.23–0.26 ms this way; the other reference layers 0.97–1.20×.
                    GemmOperand::transposed(col, d.ld()).times_strided(
                        &GemmOperand::transposed(w, k),
                        y,
                        (1, p),
                        (p, d.cout, k),
                        true,
                    );
                })
            })
        };
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.cout, d.oh, d.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let input_grad = || -> Result<Option<Tensor>> {
            if !x.track_op() {
                return Ok(None);
            }
            let op = InputGrad {
                geometry: self.geometry,
                input: x.dims4()?,
            };
            dy.apply_op2_no_bwd(w, &op).map(Some)
        };
        if !(w.track_op() || b.track_op()) {
            return Ok((input_grad()?, None, None));
        }
        let kernel = w.dims4()?;
        let weight_grad = || {
            let op = WeightGrad {
                geometry: self.geometry,
                kernel,
            };
            x.apply_op2_no_bwd(&dy, &op)
        };
        // The two gradients side by side: each splits its images between the threads, and
        // whichever thread runs out of images first takes work from the other gradient
        // instead of waiting at the end of one.
        let (dx, packed) = rayon::join(input_grad, weight_grad);
        let (dx, packed) = (dx?, packed?);
        let size = kernel.0 * kernel.1 * kernel.2 * kernel.3;
        let dw = packed.narrow(0, 0, size)?.reshape(kernel)?;
        let db = packed.narrow(0, size, kernel.0)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// dx from (dy, W).
struct InputGrad {
    geometry: Geometry,
    input: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cambrian-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dy = contiguous(s1, l1, "conv2d output gradient")?;
        let w = contiguous(s2, l2, "conv2d kernel")?;
        let d = Dims::new(self.input, l2.shape().dims4()?, self.geometry)?;
        let (k, p) = (d.k(), d.p());
        if dy.len() != d.n * d.cout * p {
            candle_core::bail!(
                "conv2d input gradient: {} output-gradient values for {} images of {}x{}x{}",
                dy.len(),
                d.n,
                d.cout,
                d.oh,
                d.ow
            );
        }
        let winograd = d
            .winograd(d.cout, d.cin)
            .map(|shape| shape.prepare(w, Kernel::Flipped));
        // Each image's gradient is zeroed by the thread that scatters into it: zeroed up
        // front (`vec![0.0; …]`), the whole batch's was a serial memset on the calling thread,
        // 7% of that thread's time in the skip model's profile, with the other core idle.
        // SAFETY: Winograd's output transform writes every element of an image's chunk;
        // otherwise every element is written (zeroed) before it is read.
        let dx = unsafe {
            par_written(d.n * d.image(), d.image(), |image, dx| {
                if let Some(winograd) = &winograd {
                    winograd.apply(&dy[image * d.cout * p..][..d.cout * p], None, dx);
                    return;
                }
                for v in dx.iter_mut() {
                    v.write(0.0);
                }
                let dx = assume_written(dx);
                let dy = &dy[image * d.cout * p..][..d.cout * p];
                with_scratch(scratch_len(&d), |scratch| {
                    let (dcol, phases) = scratch.split_at_mut(k * d.ld());
                    // Wᵀ: [K×Cout], read from W [Cout×K] with swapped strides.
                    GemmOperand::transposed(w, k).times_strided(
                        &GemmOperand::row_major(dy, p),
                        dcol,
                        (d.ld(), 1),
                        (k, p, d.cout),
                        false,
                    );
                    col2im(dcol, &d, dx, phases);
                })
            })
        };
        Ok((CpuStorage::F32(dx), Shape::from(self.input)))
    }
}

/// dW and db from (x, dy), packed into one vector: dW [Cout×K] then db [Cout].
struct WeightGrad {
    geometry: Geometry,
    kernel: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "cambrian-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "conv2d input")?;
        let dy = contiguous(s2, l2, "conv2d output gradient")?;
        let d = Dims::new(l1.shape().dims4()?, self.kernel, self.geometry)?;
        let (k, p) = (d.k(), d.p());
        let size = d.cout * k;
        // The product's orientation matters to `gemm`. On one core of this project's 2-core
        // Xeon, for the skip model's 32→32 layer (Cout 32, K 288, P 1024), dy·colᵀ ran at
        // 46 GFLOP/s and its transpose col·dyᵀ at 113–137; for its 64→64 3×5 layer, 65 vs
        // 154. Of the nine layers of the reference models, only conv3's first (K 27 < Cout
        // 64) was faster the other way. So when K ≥ Cout each thread sums dWᵀ [K×Cout], and
        // the total is transposed once at the end.
        let transposed = k >= d.cout;
        // Winograd's where the forward pass takes it: each thread sums dU, the gradient of the
        // transformed kernels, and the total becomes dW once at the end.
        let winograd = d.winograd(d.cin, d.cout);
        let summed = winograd.map_or(size, |shape| shape.gradient_len());
        // Each thread sums its images' products into its own buffer; the buffers are added.
        let threads = rayon::current_num_threads().max(1);
        let per = d.n.div_ceil(threads).max(1);
        let partials: Vec<Vec<f32>> = (0..d.n.div_ceil(per))
            .into_par_iter()
            .map(|chunk| {
                let mut grads = vec![0f32; summed + d.cout];
                for i in chunk * per..((chunk + 1) * per).min(d.n) {
                    let x = &x[i * d.image()..(i + 1) * d.image()];
                    let dy = &dy[i * d.cout * p..(i + 1) * d.cout * p];
                    let (dw, db) = grads.split_at_mut(summed);
                    let accumulate = i > chunk * per;
                    if let Some(shape) = &winograd {
                        shape.accumulate_gradient(x, dy, dw, accumulate);
                    } else {
                        with_scratch(scratch_len(&d), |scratch| {
                            let (col, phases) = scratch.split_at_mut(k * d.ld());
                            im2col(x, &d, col, phases);
                            if transposed {
                                // dyᵀ: [P×Cout], read from dy [Cout×P] with swapped strides.
                                GemmOperand::row_major(col, d.ld()).times(
                                    &GemmOperand::transposed(dy, p),
                                    dw,
                                    k,
                                    d.cout,
                                    p,
                                    accumulate,
                                );
                            } else {
                                // colᵀ: [P×K], read from col [K×P] with swapped strides.
                                GemmOperand::row_major(dy, p).times(
                                    &GemmOperand::transposed(col, d.ld()),
                                    dw,
                                    d.cout,
                                    k,
                                    p,
                                    accumulate,
                                );
                            }
                        });
                    }
                    for (db, row) in db.iter_mut().zip(dy.chunks_exact(p)) {
                        *db += lane_sum(row, |v| v);
                    }
                }
                grads
            })
            .collect();
        let mut sum = vec![0f32; summed + d.cout];
        for partial in partials {
            add_into(&mut sum, &partial);
        }
        if let Some(shape) = &winograd {
            let mut packed = shape.kernel_gradient(&sum[..summed]);
            packed.extend_from_slice(&sum[summed..]);
            sum = packed;
        } else if transposed {
            let dwt = sum[..size].to_vec();
            transpose(&dwt, k, d.cout, &mut sum[..size]);
        }
        Ok((CpuStorage::F32(sum), Shape::from(size + d.cout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::max_diff;
    use candle_core::{Device, Var, D};

    fn scale(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0)
    }

    /// The custom op against Candle's convolution (padding by hand where the two sides
    /// differ): outputs and both gradients, on fresh random inputs.
    #[test]
    fn matches_candle_outputs_and_gradients() {
        let d = Device::Cpu;
        let cases = [
            // n, cin, h, w, cout, kh, kw, stride, ph, pw
            (2, 3, 8, 8, 4, 3, 3, 1, 1, 1),
            (3, 5, 9, 7, 6, 3, 5, 2, 1, 2),
            (1, 2, 5, 5, 3, 1, 1, 1, 0, 0),
            (4, 4, 6, 6, 2, 5, 3, 4, 2, 1),
            (2, 1, 2, 2, 3, 3, 3, 1, 1, 1),
            (5, 8, 16, 16, 16, 3, 3, 2, 1, 1),
            // Strided, with filter taps that never meet the image (found by the mutation test).
            (2, 2, 2, 2, 3, 3, 7, 4, 1, 3),
            (2, 3, 3, 5, 2, 5, 9, 2, 2, 4),
            // Stride 1 with "same" padding (the column matrix's fast path), unequal sides.
            (2, 3, 6, 7, 4, 3, 5, 1, 1, 2),
            (3, 2, 2, 3, 2, 5, 7, 1, 2, 3),
            // 256 outputs, so column-matrix rows with a gap (`Dims::ld`): stride 1, the
            // phased stride-2 path, and the row-by-row one (31 is not twice 16).
            (1, 3, 16, 16, 2, 3, 3, 1, 1, 1),
            (1, 2, 32, 32, 2, 3, 3, 2, 1, 1),
            (2, 2, 31, 31, 3, 3, 3, 2, 1, 1),
            // Stride 1, "same" padding, even sizes and at least 8 channels on both sides:
            // Winograd for the forward pass and the input gradient. 3×3 (one band and two),
            // then 5 taps along one axis or both.
            (2, 8, 8, 10, 9, 3, 3, 1, 1, 1),
            (1, 8, 34, 18, 8, 3, 3, 1, 1, 1),
            (2, 8, 6, 10, 8, 3, 5, 1, 1, 2),
            (2, 8, 4, 4, 9, 5, 5, 1, 2, 2),
            (1, 9, 8, 2, 8, 5, 3, 1, 2, 1),
            // The same filters where Winograd does not apply: odd sizes, 1×1, fewer than 8
            // channels on one side.
            (2, 8, 7, 9, 8, 3, 3, 1, 1, 1),
            (2, 9, 1, 1, 9, 3, 3, 1, 1, 1),
            (2, 3, 10, 6, 16, 3, 3, 1, 1, 1),
            (2, 3, 6, 6, 12, 3, 5, 1, 1, 2),
        ];
        for (n, cin, h, w, cout, kh, kw, s, ph, pw) in cases {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (n, cin, h, w), &d).unwrap()).unwrap();
            let k = Var::from_tensor(&Tensor::randn(0f32, 0.5, (cout, cin, kh, kw), &d).unwrap())
                .unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, cout, &d).unwrap()).unwrap();
            let g = Tensor::randn(
                0f32,
                1.,
                (
                    n,
                    cout,
                    (h + 2 * ph - kh) / s + 1,
                    (w + 2 * pw - kw) / s + 1,
                ),
                &d,
            )
            .unwrap();
            let ours = x
                .as_tensor()
                .apply_op3(
                    k.as_tensor(),
                    b.as_tensor(),
                    Conv2d {
                        geometry: Geometry {
                            stride: s,
                            pad_h: ph,
                            pad_w: pw,
                        },
                    },
                )
                .unwrap();
            let reference = x
                .as_tensor()
                .pad_with_zeros(2, ph, ph)
                .unwrap()
                .pad_with_zeros(3, pw, pw)
                .unwrap()
                .conv2d(k.as_tensor(), 0, s, 1, 1)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), reference.dims());
            assert!(
                max_diff(&ours, &reference) < 1e-4 * scale(&reference),
                "forward {:?}",
                (n, cin, h, w, cout, kh, kw, s)
            );
            let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&reference * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("input", &x), ("kernel", &k), ("bias", &b)] {
                let a = ga.get(var).unwrap();
                let b = gb.get(var).unwrap();
                assert!(
                    max_diff(a, b) < 1e-4 * scale(b),
                    "{name} gradient {:?}",
                    (n, cin, h, w, cout, kh, kw, s)
                );
            }
        }
    }

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

    /// Sizes that no convolution can have are errors, not panics (a stride of 0 divided by
    /// zero on the CPU path before `output_size` was shared).
    #[test]
    fn impossible_sizes_are_errors() {
        let g = |stride| Geometry {
            stride,
            pad_h: 1,
            pad_w: 1,
        };
        assert_eq!(
            g(2).output_size((1, 3, 8, 7), (4, 3, 3, 3)).unwrap(),
            (4, 4)
        );
        assert!(g(0).output_size((1, 3, 8, 8), (4, 3, 3, 3)).is_err());
        assert!(g(1).output_size((1, 3, 8, 8), (4, 2, 3, 3)).is_err());
        assert!(g(1).output_size((1, 3, 2, 2), (4, 3, 5, 3)).is_err());
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

    #[test]
    fn images_get_no_gradient() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 4), &d).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 3, 3), &d).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(2, candle_core::DType::F32, &d).unwrap()).unwrap();
        let y = x
            .apply_op3(
                k.as_tensor(),
                b.as_tensor(),
                Conv2d {
                    geometry: Geometry {
                        stride: 1,
                        pad_h: 1,
                        pad_w: 1,
                    },
                },
            )
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(k.as_tensor()).is_some());
    }
}
