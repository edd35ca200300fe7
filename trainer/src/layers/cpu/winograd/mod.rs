//! Winograd's minimal filtering F(2×2, r_h×r_w) for convolutions at stride 1 whose filters
//! have 3 or 5 taps along each axis, zero-padded to keep the image's size: most layers of the
//! reference models, forward and input gradient (which is the same convolution of dy with the
//! kernel turned half a turn and its channels swapped), and the kernel gradient.
//!
//! Each 2×2 block of outputs comes from a tile of (r_h+1)×(r_w+1) inputs, one product per
//! tile position ξ and channel pair: for 3×3, 16 products per 4 outputs instead of 36 (2.25×
//! fewer multiplications), for 3×5 24 instead of 60 (2.5×):
//!
//! ```text
//! kernel   U[ξ] = (G_h g G_wᵀ)[ξ]          [outputs×inputs], once per call
//! input    V[ξ] = (B_hᵀ d B_w)[ξ]          [inputs×tiles], per image
//! product  M[ξ] = U[ξ] · V[ξ]              one GEMM per tile position ξ
//! output   y    = A_hᵀ M A_w               each tile's 2×2 outputs
//! ```
//!
//! The kernel gradient runs the same algebra backwards: with dM[ξ] = (A_h dY A_wᵀ)[ξ], each
//! tile's output gradient spread over its products, dU[ξ] = Σ over tiles and images of
//! dM[ξ] · V[ξ]ᵀ (one GEMM per position, reducing over the tiles), and dW = G_hᵀ dU G_w once
//! per call. It beats im2col + GEMM, which runs near the CPU's peak for these shapes, because
//! it does fewer multiplications (figures: docs/PERFORMANCE.md, CPU kernels: Winograd).
//!
//! The transforms of the 3-tap axis only add and subtract (G's halves are exact); the 5-tap
//! one uses the points 0, ±1, ±2 and ∞, whose B and A have small integers and whose G has
//! sixths and twenty-fourths (rounded once, in the kernel transform). What the transforms
//! cost decides whether this pays: written tile row by tile row they took as long as the
//! im2col they replace, so each half of each transform is a pass over whole rows or planes
//! (see [`column_transform`]), and the image goes through in bands that keep V and M in L2.
//!
//! The forward pass and the input gradient beat im2col + GEMM for the 3×3 and 3×5 layers
//! with 8 or more channels, the 3×5 ones by more once their 5-tap loops vectorise (see
//! [`column_half5`]). With 3 input channels (the images) the output transform outweighs the
//! small product, so those layers stay on im2col: hence [`Winograd::worthwhile`] (figures:
//! docs/PERFORMANCE.md, CPU kernels: Winograd).
//!
//! F(4×4, 3×3), 36 products per 16 outputs, was tried and was slower. Its rows of tiles are 4
//! to 8 wide here, too short for the transforms' vector loops, and at 16×16 each product has
//! only 16 tiles per image (figures: docs/PERFORMANCE.md, CPU kernels: Winograd).

use std::mem::MaybeUninit;

use rayon::prelude::*;

mod gradient;
mod taps;
mod transforms;

pub(super) use taps::Taps;

use super::{with_scratch, GemmOperand};
use transforms::{column_transform, output_transform, row_transform};

/// Floats between the planes of V and of M, so that planes a multiple of 4 KiB long do not
/// start in the same L1 sets: the transforms read or write four to six planes at once
/// (figures: docs/PERFORMANCE.md, CPU kernels: Winograd).
const PLANE_GAP: usize = 16;

/// Tiles per band; see [`Winograd::band_tiles`].
const BAND_TILES: usize = 128;

/// A convolution at stride 1 with `rows`×`columns` taps, padded to keep the size, from
/// `inputs` channels of h×w to `outputs` channels of h×w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Winograd {
    pub inputs: usize,
    pub outputs: usize,
    pub h: usize,
    pub w: usize,
    pub rows: Taps,
    pub columns: Taps,
}

/// How the kernels are stored: a layer's own kernel [outputs][inputs][kh][kw] for its
/// forward pass, or for its input gradient that kernel [inputs][outputs][kh][kw] read turned
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

    /// Tile rows and columns: 2×2 outputs each.
    fn tiles(&self) -> (usize, usize) {
        (self.h / 2, self.w / 2)
    }

    /// Tile positions ξ: one GEMM each.
    fn positions(&self) -> usize {
        self.rows.tile() * self.columns.tile()
    }

    /// Tiles per band: the image's tiles are transformed, multiplied and transformed back a
    /// band of whole tile rows at a time, at least [`BAND_TILES`] tiles, so that V and M stay
    /// in the core's L2 cache.
    fn band_tiles(&self) -> usize {
        let (th, tw) = self.tiles();
        BAND_TILES.div_ceil(tw).min(th) * tw
    }

    /// Floats of the column half's output: a row per image row and tile column position.
    fn column_rows_len(&self) -> usize {
        self.columns.tile() * self.inputs * self.h * self.tiles().1
    }

    /// Floats of scratch for [`Self::input_bands`]: the column half's rows, a row of zeros
    /// (the padding), then V for one band.
    fn input_scratch_len(&self) -> usize {
        self.column_rows_len()
            + self.tiles().1
            + self.positions() * (self.inputs * self.band_tiles() + PLANE_GAP)
    }

    /// Floats of M (or dM) for one band: [ξ][outputs][tiles], planes `PLANE_GAP` apart.
    fn products_len(&self) -> usize {
        self.positions() * (self.outputs * self.band_tiles() + PLANE_GAP)
    }

    /// Floats of scratch for one image: the input transform's, M for one band, then the
    /// output transform's rows.
    pub fn scratch_len(&self) -> usize {
        self.input_scratch_len() + self.products_len() + 2 * self.columns.tile() * self.band_tiles()
    }

    /// Floats of scratch for one image of the kernel gradient: the input transform's, dM for
    /// one band, dy twice (its columns split into even and odd, then that with the channels
    /// last), then the row half of dy for one band.
    pub fn gradient_scratch_len(&self) -> usize {
        self.input_scratch_len()
            + self.products_len()
            + 2 * self.outputs * self.h * self.w
            + 2 * self.outputs * self.band_tiles()
    }

    /// The input transform of one image `x` [inputs][h][w], a band of tile rows at a time:
    /// `band(tys, v)` gets each band's tile rows and V [ξ][inputs][tiles of the band], its
    /// planes `inputs · tiles + PLANE_GAP` apart. `scratch` holds
    /// [`Self::input_scratch_len`] floats.
    fn input_bands(
        &self,
        x: &[f32],
        scratch: &mut [f32],
        mut band: impl FnMut(std::ops::Range<usize>, &[f32]),
    ) {
        let (th, tw) = self.tiles();
        assert!(
            th > 0 && 2 * th == self.h && 2 * tw == self.w,
            "Winograd tiles need even, non-zero sizes"
        );
        let t = self.band_tiles();
        let (d, rest) = scratch.split_at_mut(self.column_rows_len());
        let (zeros, v) = rest.split_at_mut(tw);
        zeros.fill(0.0);
        column_transform(x, self, d);
        for first in (0..th).step_by(t / tw) {
            let tys = first..(first + t / tw).min(th);
            let v = &mut v[..self.positions() * (self.inputs * tys.len() * tw + PLANE_GAP)];
            row_transform(d, self, tys.clone(), v, zeros);
            band(tys, v);
        }
    }

    /// This convolution with its kernels transformed, ready to apply to images.
    pub fn prepare(self, kernel: &[f32], layout: Kernel) -> Prepared {
        Prepared {
            u: self.transform_kernel(kernel, layout),
            shape: self,
        }
    }

    /// U [ξ][outputs][inputs] from the kernels.
    ///
    /// Each output channel's kernels in parallel, without allocating per kernel: a first
    /// version collected each kernel's lines into vectors, three allocations per kernel, and
    /// paid for their malloc and free on one thread, serially before the images' parallel
    /// work.
    pub fn transform_kernel(&self, kernel: &[f32], layout: Kernel) -> Vec<f32> {
        let (o_n, i_n) = (self.outputs, self.inputs);
        let (kh, kw) = (self.rows.len(), self.columns.len());
        let (nh, nw) = (self.rows.tile(), self.columns.tile());
        let positions = self.positions();
        // Per output channel: [ξ][inputs].
        let blocks: Vec<Vec<f32>> = (0..o_n)
            .into_par_iter()
            .map(|o| {
                let mut block = vec![0f32; positions * i_n];
                for i in 0..i_n {
                    let tap = |ky: usize, kx: usize| match layout {
                        Kernel::Forward => kernel[((o * i_n + i) * kh + ky) * kw + kx],
                        Kernel::Flipped => {
                            kernel[((i * o_n + o) * kh + kh - 1 - ky) * kw + kw - 1 - kx]
                        }
                    };
                    // G_h g: nh × kw, a column of taps at a time; then each row times G_wᵀ.
                    let mut columns = [[0f32; 6]; 5];
                    for (kx, column) in columns[..kw].iter_mut().enumerate() {
                        let line: [f32; 5] =
                            std::array::from_fn(|ky| if ky < kh { tap(ky, kx) } else { 0.0 });
                        *column = self.rows.filter(&line[..kh]);
                    }
                    for r in 0..nh {
                        let line: [f32; 5] = std::array::from_fn(|kx| columns[kx][r]);
                        let row = self.columns.filter(&line[..kw]);
                        for (s, &value) in row[..nw].iter().enumerate() {
                            block[(r * nw + s) * i_n + i] = value;
                        }
                    }
                }
                block
            })
            .collect();
        let mut u = vec![0f32; positions * o_n * i_n];
        for (o, block) in blocks.iter().enumerate() {
            for (xi, values) in block.chunks_exact(i_n.max(1)).enumerate() {
                u[(xi * o_n + o) * i_n..][..i_n].copy_from_slice(values);
            }
        }
        u
    }
}

/// A [`Winograd`] convolution and its transformed kernels U, made once per call of an op
/// and applied to each of its images.
pub(super) struct Prepared {
    shape: Winograd,
    u: Vec<f32>,
}

impl Prepared {
    /// y [outputs][h][w] (every element written) from one image `x` [inputs][h][w], plus
    /// `bias` per output channel if given, in this thread's scratch buffer.
    pub fn apply(&self, x: &[f32], bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
        with_scratch(self.shape.scratch_len(), |scratch| {
            self.apply_in(x, bias, y, scratch)
        });
    }

    /// [`Self::apply`] in `scratch` ([`Winograd::scratch_len`] floats).
    fn apply_in(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        y: &mut [MaybeUninit<f32>],
        scratch: &mut [f32],
    ) {
        let (shape, u) = (&self.shape, &self.u[..]);
        let tw = shape.tiles().1;
        let positions = shape.positions();
        let (input, rest) = scratch.split_at_mut(shape.input_scratch_len());
        let (m, rows) = rest.split_at_mut(shape.products_len());
        let (o_n, i_n) = (shape.outputs, shape.inputs);
        shape.input_bands(x, input, |tys, v| {
            let t = tys.len() * tw;
            let (vs, ms) = (i_n * t + PLANE_GAP, o_n * t + PLANE_GAP);
            for xi in 0..positions {
                GemmOperand::row_major(&u[xi * o_n * i_n..][..o_n * i_n], i_n).times(
                    &GemmOperand::row_major(&v[xi * vs..][..i_n * t], t),
                    &mut m[xi * ms..][..o_n * t],
                    o_n,
                    t,
                    i_n,
                    false,
                );
            }
            let m = &m[..positions * ms];
            output_transform(m, shape, tys, bias.unwrap_or(&[]), rows, y);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The convolution by its definition, for one image.
    fn direct(x: &[f32], k: &[f32], shape: &Winograd, bias: &[f32]) -> Vec<f32> {
        let (h, w) = (shape.h as isize, shape.w as isize);
        let (kh, kw) = (shape.rows.len(), shape.columns.len());
        let (ph, pw) = (shape.rows.pad() as isize, shape.columns.pad() as isize);
        let mut y = vec![0f32; shape.outputs * shape.h * shape.w];
        for o in 0..shape.outputs {
            for oy in 0..h {
                for ox in 0..w {
                    let mut sum = bias.get(o).copied().unwrap_or(0.0);
                    for i in 0..shape.inputs {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let (iy, ix) = (oy + ky as isize - ph, ox + kx as isize - pw);
                                if iy >= 0 && iy < h && ix >= 0 && ix < w {
                                    sum += x[(i * shape.h + iy as usize) * shape.w + ix as usize]
                                        * k[((o * shape.inputs + i) * kh + ky) * kw + kx];
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

    fn run(prepared: &Prepared, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let shape = &prepared.shape;
        let mut y = vec![MaybeUninit::new(f32::NAN); shape.outputs * shape.h * shape.w];
        let mut scratch = vec![f32::NAN; shape.scratch_len()];
        prepared.apply_in(x, bias, &mut y, &mut scratch);
        // SAFETY: MaybeUninit<f32> has f32's layout, and every element was initialised above
        // (to NaN, which a missed write would leave behind).
        y.into_iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// Every pair of 3 and 5 taps; planes of one tile and of many, square and not, one row
    /// or column of tiles, several bands, few channels.
    pub(super) fn shapes() -> impl Iterator<Item = Winograd> {
        let sizes = [
            (8, 4, 8, 8),
            (3, 5, 2, 2),
            (1, 1, 2, 2),
            (2, 3, 4, 18),
            (5, 3, 34, 18),
            (4, 2, 16, 34),
            (1, 2, 6, 2),
        ];
        [(3, 3), (3, 5), (5, 3), (5, 5)]
            .into_iter()
            .flat_map(move |(kh, kw)| {
                sizes
                    .into_iter()
                    .map(move |(inputs, outputs, h, w)| Winograd {
                        inputs,
                        outputs,
                        h,
                        w,
                        rows: Taps::of(kh).expect("3 or 5"),
                        columns: Taps::of(kw).expect("3 or 5"),
                    })
            })
    }

    /// The forward convolution for every shape of [`shapes`], with and without a bias.
    /// Scratch starts as NaN, so a value read before it is written shows.
    #[test]
    fn matches_the_definition() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for shape in shapes() {
            let (inputs, outputs, h, w) = (shape.inputs, shape.outputs, shape.h, shape.w);
            let x: Vec<f32> = (0..inputs * h * w)
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let taps = shape.rows.len() * shape.columns.len();
            let k: Vec<f32> = (0..outputs * inputs * taps)
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let bias: Vec<f32> = (0..outputs).map(|_| r.random_range(-1.0..1.0)).collect();
            let prepared = shape.prepare(&k, Kernel::Forward);
            for b in [None, Some(&bias[..])] {
                let expected = direct(&x, &k, &shape, b.unwrap_or(&[]));
                let got = run(&prepared, &x, b);
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
        for (kh, kw) in [(3, 3), (3, 5), (5, 3)] {
            let taps = kh * kw;
            let k: Vec<f32> = (0..cout * cin * taps)
                .map(|_| r.random_range(-1.0..1.0))
                .collect();
            let mut turned = vec![0f32; k.len()];
            for o in 0..cout {
                for i in 0..cin {
                    for t in 0..taps {
                        turned[(i * cout + o) * taps + t] = k[(o * cin + i) * taps + taps - 1 - t];
                    }
                }
            }
            let shape = Winograd {
                inputs: cout,
                outputs: cin,
                h: 4,
                w: 4,
                rows: Taps::of(kh).expect("3 or 5"),
                columns: Taps::of(kw).expect("3 or 5"),
            };
            assert_eq!(
                shape.transform_kernel(&k, Kernel::Flipped),
                shape.transform_kernel(&turned, Kernel::Forward)
            );
        }
    }
}
