//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 convolutions at stride 1 with one pixel
//! of zero padding: most layers of the reference models, forward and input gradient (which
//! is the same convolution of dy with the kernel turned half a turn and its channels swapped).
//!
//! Each 2×2 block of outputs comes from a 4×4 tile of inputs: 16 products per input and
//! output channel instead of im2col's 36, so 2.25× fewer multiplications, and the GEMMs
//! read a tile matrix 16/4 = 4× the image instead of a column matrix 9× it:
//!
//! ```text
//! kernel   U[ξ] = (G g Gᵀ)[ξ]              [outputs×inputs], once per call
//! input    V[ξ] = (Bᵀ d B)[ξ]              [inputs×tiles], per image
//! product  M[ξ] = U[ξ] · V[ξ]              16 GEMMs, ξ the position in the 4×4 tile
//! output   y    = Aᵀ M A                   each tile's 2×2 outputs
//! ```
//!
//! The transforms only add and subtract (G's halves are exact). What they cost decides
//! whether this pays: written tile row by tile row they took as long as the im2col they
//! replace, so each half of each transform is a pass over whole rows or planes (see
//! [`column_transform`]), and the image goes through in bands that keep V and M in L2.
//!
//! Batches of 50 on the development machine's 2 cores (`Conv2d` and its input gradient as
//! custom ops, 20 calls each, two runs, im2col + GEMM in brackets): 32→32 at 32×32 forward
//! 4.10–4.31 ms (5.08–5.14), input gradient 4.10–4.19 (4.71–4.83); 64→64 at 16×16 forward
//! 3.08 (4.08–4.09), input gradient 3.09–3.41 (4.06). A probe with 3 input channels (the
//! images) at 32×32 was slower than im2col (0.064 against 0.053 ms per image), where the
//! output transform outweighs the small product: hence [`Winograd::worthwhile`].

use std::mem::MaybeUninit;

use super::GemmOperand;

/// Tiles per band; see [`Winograd::band_tiles`].
const BAND_TILES: usize = 128;

/// A 3×3 convolution at stride 1, padded by one pixel on each side, from `inputs` channels of
/// h×w to `outputs` channels of h×w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Winograd {
    pub inputs: usize,
    pub outputs: usize,
    pub h: usize,
    pub w: usize,
}

/// How the 3×3 kernels are stored: a layer's own kernel [outputs][inputs][3][3] for its
/// forward pass, or for its input gradient that kernel [inputs][outputs][3][3] read turned
/// half a turn (dx is dy convolved with the flipped kernel, channels swapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Forward,
    Flipped,
}

impl Winograd {
    /// Whether this shape takes the Winograd path: even sizes (whole 2×2 tiles; odd ones
    /// only arise from a 1×1 plane here, or from a resize) and at least 8 channels on both
    /// sides. With 3 input channels (the images) the output transform costs more than the
    /// multiplications it saves, and a product with 3 rows runs slowly.
    pub fn worthwhile(&self) -> bool {
        self.h.is_multiple_of(2)
            && self.w.is_multiple_of(2)
            && self.h > 0
            && self.w > 0
            && self.inputs.min(self.outputs) >= 8
    }

    /// Tiles per band: the image's tiles are transformed, multiplied and transformed back a
    /// band of whole tile rows at a time, at least [`BAND_TILES`] tiles, so that V and M stay
    /// in the core's L2 cache.
    fn band_tiles(&self) -> usize {
        let (th, tw) = (self.h / 2, self.w / 2);
        BAND_TILES.div_ceil(tw).min(th) * tw
    }

    /// Floats of scratch for one image: the column half's four rows per image row, the
    /// output transform's rows, a row of zeros (the padding), then V and M for one band.
    pub fn scratch_len(&self) -> usize {
        let t = self.band_tiles();
        4 * self.inputs * self.h * (self.w / 2)
            + 8 * t
            + self.w / 2
            + 16 * (self.inputs + self.outputs) * t
    }

    /// U [16][outputs][inputs] from the 3×3 kernels.
    pub fn transform_kernel(&self, kernel: &[f32], layout: Kernel) -> Vec<f32> {
        let (o_n, i_n) = (self.outputs, self.inputs);
        let mut u = vec![0f32; 16 * o_n * i_n];
        for o in 0..o_n {
            for i in 0..i_n {
                let tap = |ky: usize, kx: usize| match layout {
                    Kernel::Forward => kernel[(o * i_n + i) * 9 + ky * 3 + kx],
                    Kernel::Flipped => kernel[(i * o_n + o) * 9 + (2 - ky) * 3 + (2 - kx)],
                };
                // G g: 4×3, then (G g) Gᵀ: 4×4. G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
                let g = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                let columns: [[f32; 4]; 3] =
                    std::array::from_fn(|kx| g(tap(0, kx), tap(1, kx), tap(2, kx)));
                for r in 0..4 {
                    let row = g(columns[0][r], columns[1][r], columns[2][r]);
                    for (s, &value) in row.iter().enumerate() {
                        u[((r * 4 + s) * o_n + o) * i_n + i] = value;
                    }
                }
            }
        }
        u
    }

    /// y [outputs][h][w] (every element written) from one image `x` [inputs][h][w], plus
    /// `bias` per output channel if given.
    pub fn apply(
        &self,
        u: &[f32],
        x: &[f32],
        bias: Option<&[f32]>,
        y: &mut [MaybeUninit<f32>],
        scratch: &mut [f32],
    ) {
        assert!(
            self.h.is_multiple_of(2) && self.w.is_multiple_of(2) && self.h > 0,
            "Winograd tiles need even, non-zero sizes"
        );
        let t = self.band_tiles();
        let (d, rest) = scratch.split_at_mut(4 * self.inputs * self.h * (self.w / 2));
        let (rows, rest) = rest.split_at_mut(8 * t);
        let (zeros, rest) = rest.split_at_mut(self.w / 2);
        let (v, m) = rest.split_at_mut(16 * self.inputs * t);
        zeros.fill(0.0);
        column_transform(x, self, d);
        let (o_n, i_n) = (self.outputs, self.inputs);
        let (th, tw) = (self.h / 2, self.w / 2);
        let band = t / tw;
        for first in (0..th).step_by(band) {
            let tys = first..(first + band).min(th);
            let t = tys.len() * tw;
            row_transform(d, self, tys.clone(), &mut v[..16 * i_n * t], zeros);
            for xi in 0..16 {
                GemmOperand::row_major(&u[xi * o_n * i_n..][..o_n * i_n], i_n).times(
                    &GemmOperand::row_major(&v[xi * i_n * t..][..i_n * t], t),
                    &mut m[xi * o_n * t..][..o_n * t],
                    o_n,
                    t,
                    i_n,
                    false,
                );
            }
            output_transform(&m[..16 * o_n * t], self, tys, bias.unwrap_or(&[]), rows, y);
        }
    }
}

vectorised! {
    /// V [16][inputs][tiles] = Bᵀ d B for every 4×4 tile d of every channel of `x`, with
    /// Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], in two halves that each run over
    /// whole planes, so that every inner loop is long and reads two or three streams.
    ///
    /// Tile (ty, tx) reads rows 2ty−1 … 2ty+2 and columns 2tx−1 … 2tx+2 (−1 and h or w are
    /// the padding). The column half (B) turns each image row into four rows `d[j]` of
    /// w/2 values: with the row's pixels taken in pairs (2tx, 2tx+1), one pass over the whole
    /// image. The row half (Bᵀ) combines rows of those, a pair of rows per tile row.
    ///
    /// A first version transformed tile row by tile row, four outputs of w/2 values from
    /// eight shifted slices at a time: 85–95 µs for 32 channels of 32×32 on one core of the
    /// development machine, mostly loop overhead and register spills, as slow as the
    /// im2col it replaced.
    fn column_transform(x: &[f32], shape: &Winograd, d: &mut [f32]) {
        let (h, tw) = (shape.h, shape.w / 2);
        let n = shape.inputs * h * tw;
        let pairs = &x.as_chunks::<2>().0[..n];
        let (d0, rest) = d.split_at_mut(n);
        let (d1, rest) = rest.split_at_mut(n);
        let (d2, d3) = rest.split_at_mut(n);
        let d3 = &mut d3[..n];
        // The pair before a row's first and after its last is the padding, mended below.
        if n >= 3 {
            column_half(
                &pairs[..n - 2],
                &pairs[1..n - 1],
                &pairs[2..],
                &mut d0[1..n - 1],
                &mut d1[1..n - 1],
                &mut d2[1..n - 1],
                &mut d3[1..n - 1],
            );
        }
        for k in [0, n - 1] {
            let prev = if k % tw == 0 { 0.0 } else { pairs[k - 1][1] };
            let next = if k % tw == tw - 1 { 0.0 } else { pairs[k + 1][0] };
            let (c0, c1) = (pairs[k][0], pairs[k][1]);
            (d0[k], d1[k], d2[k], d3[k]) = (prev - c1, c0 + c1, c1 - c0, c0 - next);
        }
        for row in 1..n / tw {
            d0[row * tw] = -pairs[row * tw][1];
            d3[row * tw - 1] = pairs[row * tw - 1][0];
        }
    }
}

vectorised! {
    /// The row half of the input transform for tile rows `tys`: V [16][inputs][tiles of the
    /// band] from [`column_transform`]'s rows.
    fn row_transform(
        d: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        v: &mut [f32],
        zeros: &[f32],
    ) {
        let (h, tw) = (shape.h, shape.w / 2);
        let n = shape.inputs * h * tw;
        let tiles = tys.len() * tw;
        let first = tys.start;
        let planes = v.chunks_exact_mut(shape.inputs * tiles);
        let mut planes: Vec<&mut [f32]> = planes.collect();
        for (j, dj) in d[..4 * n].chunks_exact(n).enumerate() {
            let Ok([v0, v1, v2, v3]) = planes.get_disjoint_mut([j, 4 + j, 8 + j, 12 + j]) else {
                unreachable!("16 distinct planes");
            };
            for c in 0..shape.inputs {
                let plane = &dj[c * h * tw..][..h * tw];
                let row = |r: usize| &plane[r * tw..][..tw];
                for ty in tys.clone() {
                    let (even, odd) = (row(2 * ty), row(2 * ty + 1));
                    let above = if ty > 0 { row(2 * ty - 1) } else { &zeros[..tw] };
                    let below = if 2 * ty + 2 < h { row(2 * ty + 2) } else { &zeros[..tw] };
                    let at = c * tiles + (ty - first) * tw;
                    row_half(
                        above,
                        even,
                        odd,
                        below,
                        &mut v0[at..at + tw],
                        &mut v1[at..at + tw],
                        &mut v2[at..at + tw],
                        &mut v3[at..at + tw],
                    );
                }
            }
        }
    }
}

/// Bᵀ applied to four rows (tile rows 2ty−1 … 2ty+2): `out[i] = (Bᵀ d)[i]`. Each slice
/// is an argument of its own, so that the compiler knows them apart (references passed as
/// arguments do not alias; references inside an array argument do not count) and vectorises
/// the loop. In an array, or inline in the caller, it stayed scalar.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_half(
    above: &[f32],
    even: &[f32],
    odd: &[f32],
    below: &[f32],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
) {
    let n = o0.len();
    let (above, even, odd, below) = (&above[..n], &even[..n], &odd[..n], &below[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for t in 0..n {
        o0[t] = above[t] - odd[t];
        o1[t] = even[t] + odd[t];
        o2[t] = odd[t] - even[t];
        o3[t] = even[t] - below[t];
    }
}

/// B applied to the pixel pairs of image rows: output k reads columns 2k−1 … 2k+2, i.e.
/// `prev[k][1]`, `cur[k][0]`, `cur[k][1]` and `next[k][0]`. Separate arguments, as in
/// [`row_half`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_half(
    prev: &[[f32; 2]],
    cur: &[[f32; 2]],
    next: &[[f32; 2]],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
) {
    let n = o0.len();
    let (prev, cur, next) = (&prev[..n], &cur[..n], &next[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for k in 0..n {
        let (c0, c1) = (cur[k][0], cur[k][1]);
        o0[k] = prev[k][1] - c1;
        o1[k] = c0 + c1;
        o2[k] = c1 - c0;
        o3[k] = c0 - next[k][0];
    }
}

/// A applied to one output row's tiles, plus the bias: pixels 2t and 2t+1 of `line` from
/// `a0` … `a3` [t]. Separate arguments, as in [`row_half`]; as a loop in
/// [`output_transform`] it stayed scalar, 7% of the skip model's training time.
#[inline(always)]
fn output_columns(
    a0: &[f32],
    a1: &[f32],
    a2: &[f32],
    a3: &[f32],
    bias: f32,
    line: &mut [MaybeUninit<f32>],
) {
    let pixels = line.as_chunks_mut::<2>().0;
    let n = pixels.len();
    let (a0, a1, a2, a3) = (&a0[..n], &a1[..n], &a2[..n], &a3[..n]);
    for t in 0..n {
        pixels[t][0].write(a0[t] + a1[t] + a2[t] + bias);
        pixels[t][1].write(a1[t] - a2[t] - a3[t] + bias);
    }
}

vectorised! {
    /// y = Aᵀ M A (+ bias) for every tile, with Aᵀ = [1 1 1 0; 0 1 −1 −1]: the row half
    /// over whole planes of tiles into `rows` [2][4][tiles], then each tile's two columns,
    /// written interleaved.
    fn output_transform(
        m: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        bias: &[f32],
        rows: &mut [f32],
        y: &mut [MaybeUninit<f32>],
    ) {
        let (w, tw) = (shape.w, shape.w / 2);
        let tiles = tys.len() * tw;
        let plane_stride = shape.outputs * tiles;
        let (r0, r1) = rows[..8 * tiles].split_at_mut(4 * tiles);
        for o in 0..shape.outputs {
            let b = bias.get(o).copied().unwrap_or(0.0);
            for s in 0..4 {
                let plane = |i: usize| &m[(i * 4 + s) * plane_stride + o * tiles..][..tiles];
                let (m0, m1, m2, m3) = (plane(0), plane(1), plane(2), plane(3));
                let (a0, a1) = (&mut r0[s * tiles..][..tiles], &mut r1[s * tiles..][..tiles]);
                for t in 0..tiles {
                    a0[t] = m0[t] + m1[t] + m2[t];
                    a1[t] = m1[t] - m2[t] - m3[t];
                }
            }
            let out = &mut y[o * shape.h * w..][..shape.h * w];
            let band = &mut out[tys.start * 2 * w..tys.end * 2 * w];
            for (ty, pair) in band.chunks_exact_mut(2 * w).enumerate() {
                for (line, r) in pair.chunks_exact_mut(w).zip([&*r0, &*r1]) {
                    let part = |s: usize| &r[s * tiles + ty * tw..][..tw];
                    output_columns(part(0), part(1), part(2), part(3), b, line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The convolution by its definition, for one image.
    fn direct(x: &[f32], k: &[f32], shape: &Winograd, bias: &[f32]) -> Vec<f32> {
        let (h, w) = (shape.h as isize, shape.w as isize);
        let mut y = vec![0f32; shape.outputs * shape.h * shape.w];
        for o in 0..shape.outputs {
            for oy in 0..h {
                for ox in 0..w {
                    let mut sum = bias.get(o).copied().unwrap_or(0.0);
                    for i in 0..shape.inputs {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy + ky - 1, ox + kx - 1);
                                if iy >= 0 && iy < h && ix >= 0 && ix < w {
                                    sum += x[(i * shape.h + iy as usize) * shape.w + ix as usize]
                                        * k[((o * shape.inputs + i) * 3 + ky as usize) * 3
                                            + kx as usize];
                                }
                            }
                        }
                    }
                    y[(o * shape.h + oy as usize) * shape.w + ox as usize] = sum;
                }
            }
        }
        y
    }

    fn run(shape: &Winograd, u: &[f32], x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![MaybeUninit::new(f32::NAN); shape.outputs * shape.h * shape.w];
        let mut scratch = vec![f32::NAN; shape.scratch_len()];
        shape.apply(u, x, bias, &mut y, &mut scratch);
        // SAFETY: MaybeUninit<f32> has f32's layout, and every element was initialised above
        // (to NaN, which a missed write would leave behind).
        y.into_iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// Planes of one tile and of many, square and not, one row or column of tiles, few
    /// channels; scratch starts as NaN, so a value read before it is written shows.
    #[test]
    fn matches_the_definition() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (inputs, outputs, h, w) in [
            (8, 4, 8, 8),
            (3, 5, 2, 2),
            (1, 1, 2, 2),
            (2, 3, 4, 18),
            (5, 3, 34, 18),
            (4, 2, 16, 34),
            (1, 2, 6, 2),
        ] {
            let shape = Winograd {
                inputs,
                outputs,
                h,
                w,
            };
            let x: Vec<f32> = (0..inputs * h * w)
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let k: Vec<f32> = (0..outputs * inputs * 9)
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let bias: Vec<f32> = (0..outputs).map(|_| r.random_range(-1.0..1.0)).collect();
            let u = shape.transform_kernel(&k, Kernel::Forward);
            for b in [None, Some(&bias[..])] {
                let expected = direct(&x, &k, &shape, b.unwrap_or(&[]));
                let got = run(&shape, &u, &x, b);
                let worst = expected
                    .iter()
                    .zip(&got)
                    .map(|(e, g)| (e - g).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{shape:?}, bias {}: off by {worst}",
                    b.is_some()
                );
            }
        }
    }

    /// The flipped layout is the forward one of the kernel turned half a turn with its
    /// channels swapped.
    #[test]
    fn flipped_kernel_is_the_turned_transpose() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let (cout, cin) = (3, 2);
        let k: Vec<f32> = (0..cout * cin * 9)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let mut turned = vec![0f32; k.len()];
        for o in 0..cout {
            for i in 0..cin {
                for t in 0..9 {
                    turned[(i * cout + o) * 9 + t] = k[(o * cin + i) * 9 + 8 - t];
                }
            }
        }
        let shape = Winograd {
            inputs: cout,
            outputs: cin,
            h: 4,
            w: 4,
        };
        assert_eq!(
            shape.transform_kernel(&k, Kernel::Flipped),
            shape.transform_kernel(&turned, Kernel::Forward)
        );
    }
}
