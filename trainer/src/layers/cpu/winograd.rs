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
//! per call. On one thread, batches of 50, against im2col + GEMM (which was near the
//! machine's peak for these shapes): 32→32 3×3 at 32×32 8.2–8.6 ms (9.1–9.4), 64→64 3×3 at
//! 16×16 5.8 (7.7), 3×5 9.0–9.1 (12.6).
//!
//! The transforms of the 3-tap axis only add and subtract (G's halves are exact); the 5-tap
//! one uses the points 0, ±1, ±2 and ∞, whose B and A have small integers and whose G has
//! sixths and twenty-fourths (rounded once, in the kernel transform). What the transforms
//! cost decides whether this pays: written tile row by tile row they took as long as the
//! im2col they replace, so each half of each transform is a pass over whole rows or planes
//! (see [`column_transform`]), and the image goes through in bands that keep V and M in L2.
//!
//! Batches of 50 on one thread (`Conv2d` and its input gradient as custom ops, 20 calls
//! each, two runs, im2col + GEMM in brackets): 32→32 3×3 at 32×32 forward 8.1–9.1 ms
//! (11.0–11.2), input gradient 7.6–7.8 (9.8–11.1); 64→64 3×3 at 16×16 forward 6.2–6.4 (8.8),
//! input gradient 6.3–8.6 (8.8–10.3); 64→64 3×5 at 16×16 forward 11.6–12.2 (14.9–15.7),
//! input gradient 12.7–12.9 (13.8–14.0), and 10.0–11.0 forward once the 5-tap loops were
//! vectorised (see [`column_half5`]). On two threads the development machine was too noisy
//! that hour to tell these apart; an earlier run, 3×3 only, had 32→32 forward 4.10–4.31
//! (5.08–5.14) and 64→64 forward 3.08 (4.08–4.09). A probe with 3 input channels (the
//! images) at 32×32 was slower than im2col (0.064 against 0.053 ms per image), where the
//! output transform outweighs the small product: hence [`Winograd::worthwhile`].
//!
//! F(4×4, 3×3), 36 products per 16 outputs, was tried and was slower: on one thread, 32→32
//! forward 9.8 and 11.4 ms against F(2×2, 3×3)'s 7.7 and 10.8, 64→64 at 16×16 11.9 and 10.9
//! against 7.1 and 7.5. Its rows of tiles are 4 to 8 wide here, too short for the
//! transforms' vector loops, and at 16×16 each product has only 16 tiles per image.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{transpose, with_scratch, GemmOperand};

/// Floats between the planes of V and of M, so that planes a multiple of 4 KiB long do not
/// start in the same L1 sets: the transforms read or write four to six planes at once. On
/// one thread, 32→32 3×3 forward went from 8.7–9.3 to 7.8–8.0 ms per batch of 50, 3×5
/// 64→64 from 12.6–13.3 to 11.0–11.3.
const PLANE_GAP: usize = 16;

/// Tiles per band; see [`Winograd::band_tiles`].
const BAND_TILES: usize = 128;

/// One axis of the transform: F(2, r) for a filter of r taps, over tiles of r + 1 inputs
/// (2 outputs each), with (r − 1)/2 pixels of padding on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Taps {
    Three,
    Five,
}

impl Taps {
    pub fn of(r: usize) -> Option<Self> {
        match r {
            3 => Some(Self::Three),
            5 => Some(Self::Five),
            _ => None,
        }
    }

    pub fn len(self) -> usize {
        match self {
            Self::Three => 3,
            Self::Five => 5,
        }
    }

    /// Inputs per tile along this axis.
    fn tile(self) -> usize {
        self.len() + 1
    }

    /// The padding that keeps the image's size.
    pub fn pad(self) -> usize {
        self.len() / 2
    }

    /// The rows of A (the columns of the output transform Aᵀ) as pairs: a tile's product ξ
    /// adds into its two outputs with these weights, so its gradient is the same combination
    /// of theirs.
    fn spread(self) -> &'static [(f32, f32)] {
        match self {
            Self::Three => &[(1.0, 0.0), (1.0, 1.0), (1.0, -1.0), (0.0, -1.0)],
            Self::Five => &[
                (1.0, 0.0),
                (1.0, 1.0),
                (1.0, -1.0),
                (1.0, 2.0),
                (1.0, -2.0),
                (0.0, 1.0),
            ],
        }
    }

    /// G as [tile position][tap]: its column k is [`Self::filter`] of the k-th unit line.
    fn matrix(self) -> [[f32; 5]; 6] {
        let mut g = [[0f32; 5]; 6];
        for k in 0..self.len() {
            let mut unit = [0f32; 5];
            unit[k] = 1.0;
            for (row, value) in g.iter_mut().zip(self.filter(&unit[..self.len()])) {
                row[k] = value;
            }
        }
        g
    }

    /// G g for one line of taps `g` (3 or 5 of them): the first [`Self::tile`] values.
    fn filter(self, g: &[f32]) -> [f32; 6] {
        match self {
            // G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
            Self::Three => {
                let (a, b, c) = (g[0], g[1], g[2]);
                [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c, 0.0, 0.0]
            }
            // Points 0, 1, −1, 2, −2, ∞.
            Self::Five => {
                let [a, b, c, d, e] = [g[0], g[1], g[2], g[3], g[4]];
                let sixth = 1.0 / 6.0;
                [
                    0.25 * a,
                    -sixth * (a + b + c + d + e),
                    -sixth * (a - b + c - d + e),
                    a / 24.0 + b / 12.0 + c / 6.0 + d / 3.0 + 2.0 * e / 3.0,
                    a / 24.0 - b / 12.0 + c / 6.0 - d / 3.0 + 2.0 * e / 3.0,
                    e,
                ]
            }
        }
    }
}

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

    /// Floats of dU, the gradient of the transformed kernels: [ξ][inputs][outputs].
    pub fn gradient_len(&self) -> usize {
        self.positions() * self.outputs * self.inputs
    }

    /// Adds one image's share to dU (or starts it afresh unless `accumulate`): Σ over its
    /// tiles of dM[ξ] · V[ξ]ᵀ, where V is the input transform of `x` [inputs][h][w] as in the
    /// forward pass and dM = A_h dY A_wᵀ spreads each tile's 2×2 output gradient from `dy`
    /// [outputs][h][w] over its products. [`Self::kernel_gradient`] turns the sum over the
    /// batch into dW.
    pub fn accumulate_gradient(&self, x: &[f32], dy: &[f32], du: &mut [f32], accumulate: bool) {
        with_scratch(self.gradient_scratch_len(), |scratch| {
            self.accumulate_gradient_in(x, dy, du, accumulate, scratch)
        });
    }

    /// [`Self::accumulate_gradient`] in `scratch` ([`Self::gradient_scratch_len`] floats).
    fn accumulate_gradient_in(
        &self,
        x: &[f32],
        dy: &[f32],
        du: &mut [f32],
        mut accumulate: bool,
        scratch: &mut [f32],
    ) {
        let tw = self.tiles().1;
        let positions = self.positions();
        let (o_n, i_n) = (self.outputs, self.inputs);
        let (input, rest) = scratch.split_at_mut(self.input_scratch_len());
        let (m, rest) = rest.split_at_mut(self.products_len());
        let (split, rest) = rest.split_at_mut(o_n * self.h * self.w);
        let (dy_last, e) = rest.split_at_mut(o_n * self.h * self.w);
        // dy [outputs][h][w] → [outputs][even, odd columns][h][w/2] → [even, odd][h][w/2]
        // [outputs], so that each half of the gradient transform is a flat pass.
        split_columns(&dy[..o_n * self.h * self.w], self.h * self.w, split);
        transpose(split, o_n, self.h * self.w, dy_last);
        self.input_bands(x, input, |tys, v| {
            let t = tys.len() * tw;
            let (vs, ms) = (i_n * t + PLANE_GAP, o_n * t + PLANE_GAP);
            gradient_transform(dy_last, self, tys, e, &mut m[..positions * ms]);
            for xi in 0..positions {
                // dU[ξ] [outputs×inputs] += dM[ξ] [outputs×tiles] · V[ξ]ᵀ [tiles×inputs], with
                // dM stored [tiles][outputs] and dU [inputs][outputs] (column-major): so
                // `gemm` reads both operands as they are. Stored row-major, dU made it
                // compute the transpose, whose left operand V it copied into panels float
                // by float, 15% of the time on one thread.
                GemmOperand::transposed(&m[xi * ms..][..o_n * t], o_n).times_strided(
                    &GemmOperand::transposed(&v[xi * vs..][..i_n * t], t),
                    &mut du[xi * o_n * i_n..][..o_n * i_n],
                    (1, o_n),
                    (o_n, i_n, t),
                    accumulate,
                );
            }
            accumulate = true;
        });
    }

    /// dW [outputs][inputs][kh][kw] from dU [ξ][inputs][outputs]: G_hᵀ dU G_w for each pair
    /// of channels, the transpose of the kernel transform. Tap by tap over all pairs at once
    /// (one scaled sum of dU's planes per tap), then put in the kernel's order.
    pub fn kernel_gradient(&self, du: &[f32]) -> Vec<f32> {
        let (kh, kw) = (self.rows.len(), self.columns.len());
        let (nh, nw) = (self.rows.tile(), self.columns.tile());
        let pairs = self.outputs * self.inputs;
        let (gh, gw) = (self.rows.matrix(), self.columns.matrix());
        let mut by_tap = vec![0f32; kh * kw * pairs];
        for r in 0..nh {
            for s in 0..nw {
                let plane = &du[(r * nw + s) * pairs..][..pairs];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let c = gh[r][ky] * gw[s][kx];
                        if c != 0.0 {
                            scaled_add(c, plane, &mut by_tap[(ky * kw + kx) * pairs..][..pairs]);
                        }
                    }
                }
            }
        }
        // by_tap [tap][input][output] → dW [output][input][tap].
        let (o_n, i_n, taps) = (self.outputs, self.inputs, kh * kw);
        let mut dw = vec![0f32; pairs * taps];
        for (tap, plane) in by_tap.chunks_exact(pairs.max(1)).enumerate() {
            for (i, row) in plane.chunks_exact(o_n.max(1)).enumerate() {
                for (o, &value) in row.iter().enumerate() {
                    dw[(o * i_n + i) * taps + tap] = value;
                }
            }
        }
        dw
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
    /// with its malloc and free took about 5% of one thread's samples while timing three
    /// Winograd layers, serially before the images' parallel work (about 1% now).
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

vectorised! {
    /// The column half of the input transform: each image row becomes r_w + 1 rows `d[j]`
    /// of w/2 values, row j of B_wᵀ applied to each tile's columns. With the row's pixels
    /// taken in pairs (2tx, 2tx+1), one pass over the whole image; [`row_transform`]
    /// then combines these rows, a band of tile rows at a time.
    ///
    /// A first version transformed tile row by tile row, four outputs of w/2 values from
    /// eight shifted slices at a time: 85–95 µs for 32 channels of 32×32 on one core of the
    /// development machine (a probe outside the trainer), mostly loop overhead and register
    /// spills, as slow as the im2col it replaced. The two halves written this way took 56.
    fn column_transform(x: &[f32], shape: &Winograd, d: &mut [f32]) {
        let (h, tw) = (shape.h, shape.tiles().1);
        let n = shape.inputs * h * tw;
        let pairs = &x.as_chunks::<2>().0[..n];
        let mut out: Vec<&mut [f32]> = d[..shape.columns.tile() * n].chunks_exact_mut(n).collect();
        // Tile column k reads the pairs k − 1, k and k + 1 (for 3 taps one pixel of the
        // first and of the last). Across a row's edges those are the padding, mended below.
        if n >= 3 {
            let (prev, cur, next) = (&pairs[..n - 2], &pairs[1..n - 1], &pairs[2..]);
            match &mut out[..] {
                [o0, o1, o2, o3] => column_half3(
                    prev,
                    cur,
                    next,
                    &mut o0[1..n - 1],
                    &mut o1[1..n - 1],
                    &mut o2[1..n - 1],
                    &mut o3[1..n - 1],
                ),
                [o0, o1, o2, o3, o4, o5] => column_half5(
                    prev,
                    cur,
                    next,
                    &mut o0[1..n - 1],
                    &mut o1[1..n - 1],
                    &mut o2[1..n - 1],
                    &mut o3[1..n - 1],
                    &mut o4[1..n - 1],
                    &mut o5[1..n - 1],
                ),
                _ => unreachable!("tiles of 4 or 6 columns"),
            }
        }
        // Each row's first and last tile columns have the padding as neighbours. The flat
        // pass gave them the neighbouring rows' pixels, except at the image's two ends,
        // which it did not reach.
        let full = |out: &mut [&mut [f32]], k: usize| {
            let prev = if k.is_multiple_of(tw) { [0.0; 2] } else { pairs[k - 1] };
            let next = if k % tw == tw - 1 { [0.0; 2] } else { pairs[k + 1] };
            let values = column_tile(shape.columns, prev, pairs[k], next);
            for (plane, value) in out.iter_mut().zip(values) {
                plane[k] = value;
            }
        };
        full(&mut out, 0);
        full(&mut out, n - 1);
        match shape.columns {
            // Only the first output reads the pixel before the tile, and only the last the
            // one after it: two stores per row instead of two whole tiles.
            Taps::Three => {
                for row in 1..n / tw {
                    out[0][row * tw] = -pairs[row * tw][1];
                    out[3][row * tw - 1] = pairs[row * tw - 1][0];
                }
            }
            // Every output reads both neighbouring pairs.
            Taps::Five => {
                for row in 0..n / tw {
                    full(&mut out, row * tw);
                    full(&mut out, row * tw + tw - 1);
                }
            }
        }
    }
}

/// B_wᵀ applied to one tile's columns, given as the pixel pairs before, at and after it.
fn column_tile(taps: Taps, [p0, p1]: [f32; 2], [c0, c1]: [f32; 2], [n0, n1]: [f32; 2]) -> [f32; 6] {
    match taps {
        Taps::Three => [p1 - c1, c0 + c1, c1 - c0, c0 - n0, 0.0, 0.0],
        Taps::Five => five([p0, p1, c0, c1, n0, n1]),
    }
}

/// B ᵀ of F(2, 5) applied to six inputs.
#[inline(always)]
fn five([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// B_wᵀ of F(2, 3) applied to the pixel pairs of image rows: output k reads columns
/// 2k−1 … 2k+2, i.e. `prev[k][1]`, `cur[k][0]`, `cur[k][1]` and `next[k][0]`. Each slice is
/// an argument of its own, so that the compiler knows them apart (references passed as
/// arguments do not alias; references inside an array argument do not count) and vectorises
/// the loop; in an array, or inline in the caller, it stayed scalar.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_half3(
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

/// B_wᵀ of F(2, 5): output k reads columns 2k−2 … 2k+3, the pairs `prev[k]`, `cur[k]` and
/// `next[k]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_half5(
    prev: &[[f32; 2]],
    cur: &[[f32; 2]],
    next: &[[f32; 2]],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let n = o0.len();
    let (prev, cur, next) = (&prev[..n], &cur[..n], &next[..n]);
    five_into(
        |k| {
            let ([p0, p1], [c0, c1], [n0, n1]) = (prev[k], cur[k], next[k]);
            [p0, p1, c0, c1, n0, n1]
        },
        o0,
        o1,
        o2,
        o3,
        o4,
        o5,
    );
}

/// Bᵀ of F(2, 5) at `o0.len()` positions, position k's six inputs from `inputs(k)`: the loop
/// of [`column_half5`] and [`row_half5`]. The outputs are separate arguments, as in
/// [`column_half3`]: in an array, these loops compiled to scalar code.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn five_into(
    inputs: impl Fn(usize) -> [f32; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let n = o0.len();
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let [a, b, c, d, e, f] = five(inputs(k));
        o0[k] = a;
        o1[k] = b;
        o2[k] = c;
        o3[k] = d;
        o4[k] = e;
        o5[k] = f;
    }
}

vectorised! {
    /// The row half of the input transform for tile rows `tys`: V [ξ][inputs][tiles of the
    /// band] from [`column_transform`]'s rows. Tile row ty reads image rows 2ty − pad …
    /// 2ty − pad + r_h; those outside the image are `zeros`.
    fn row_transform(
        d: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        v: &mut [f32],
        zeros: &[f32],
    ) {
        let (h, tw) = (shape.h, shape.tiles().1);
        let n = shape.inputs * h * tw;
        let (nh, nw) = (shape.rows.tile(), shape.columns.tile());
        let pad = shape.rows.pad();
        let tiles = tys.len() * tw;
        let first = tys.start;
        let mut planes: Vec<&mut [f32]> = v.chunks_exact_mut(shape.inputs * tiles + PLANE_GAP).collect();
        for (j, dj) in d[..nw * n].chunks_exact(n).enumerate() {
            // The planes of tile positions (i, j) for every i.
            let mut column: Vec<&mut [f32]> = planes
                .iter_mut()
                .skip(j)
                .step_by(nw)
                .map(|plane| &mut **plane)
                .collect();
            for c in 0..shape.inputs {
                let plane = &dj[c * h * tw..][..h * tw];
                let row = |r: usize| {
                    if (pad..h + pad).contains(&r) {
                        &plane[(r - pad) * tw..][..tw]
                    } else {
                        &zeros[..tw]
                    }
                };
                for ty in tys.clone() {
                    let at = c * tiles + (ty - first) * tw;
                    match &mut column[..nh] {
                        [o0, o1, o2, o3] => row_half3(
                            row(2 * ty),
                            row(2 * ty + 1),
                            row(2 * ty + 2),
                            row(2 * ty + 3),
                            &mut o0[at..at + tw],
                            &mut o1[at..at + tw],
                            &mut o2[at..at + tw],
                            &mut o3[at..at + tw],
                        ),
                        [o0, o1, o2, o3, o4, o5] => row_half5(
                            std::array::from_fn(|s| row(2 * ty + s)),
                            &mut o0[at..at + tw],
                            &mut o1[at..at + tw],
                            &mut o2[at..at + tw],
                            &mut o3[at..at + tw],
                            &mut o4[at..at + tw],
                            &mut o5[at..at + tw],
                        ),
                        _ => unreachable!("tiles of 4 or 6 rows"),
                    }
                }
            }
        }
    }
}

/// B_hᵀ of F(2, 3) applied to four rows (tile rows 2ty−1 … 2ty+2). Separate arguments, as in
/// [`column_half3`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_half3(
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

/// B_hᵀ of F(2, 5) applied to six rows (tile rows 2ty−2 … 2ty+3).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_half5(
    rows: [&[f32]; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let [r0, r1, r2, r3, r4, r5] = rows.map(|r| &r[..o0.len()]);
    five_into(
        |t| [r0[t], r1[t], r2[t], r3[t], r4[t], r5[t]],
        o0,
        o1,
        o2,
        o3,
        o4,
        o5,
    );
}

vectorised! {
    /// y = A_hᵀ M A_w (+ bias) for the tiles of tile rows `tys`: the row half over whole
    /// planes of tiles into `rows` [2][r_w+1][tiles], then each tile's two columns, written
    /// interleaved. A_ᵀ is [1 1 1 0; 0 1 −1 −1] for 3 taps, [1 1 1 1 1 0; 0 1 −1 2 −2 1]
    /// for 5.
    fn output_transform(
        m: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        bias: &[f32],
        rows: &mut [f32],
        y: &mut [MaybeUninit<f32>],
    ) {
        let (w, tw) = (shape.w, shape.tiles().1);
        let (nh, nw) = (shape.rows.tile(), shape.columns.tile());
        let tiles = tys.len() * tw;
        let plane_stride = shape.outputs * tiles + PLANE_GAP;
        let (r0, r1) = rows[..2 * nw * tiles].split_at_mut(nw * tiles);
        for o in 0..shape.outputs {
            let b = bias.get(o).copied().unwrap_or(0.0);
            for s in 0..nw {
                let plane = |i: usize| &m[(i * nw + s) * plane_stride + o * tiles..][..tiles];
                let (a0, a1) = (&mut r0[s * tiles..][..tiles], &mut r1[s * tiles..][..tiles]);
                if nh == 4 {
                    output_rows3([plane(0), plane(1), plane(2), plane(3)], a0, a1);
                } else {
                    output_rows5(
                        plane(0),
                        plane(1),
                        plane(2),
                        plane(3),
                        plane(4),
                        plane(5),
                        a0,
                        a1,
                    );
                }
            }
            let out = &mut y[o * shape.h * w..][..shape.h * w];
            let band = &mut out[tys.start * 2 * w..tys.end * 2 * w];
            for (ty, pair) in band.chunks_exact_mut(2 * w).enumerate() {
                for (line, r) in pair.chunks_exact_mut(w).zip([&*r0, &*r1]) {
                    let part = |s: usize| &r[s * tiles + ty * tw..][..tw];
                    if nw == 4 {
                        output_columns3(part(0), part(1), part(2), part(3), b, line);
                    } else {
                        output_columns5(
                            part(0),
                            part(1),
                            part(2),
                            part(3),
                            part(4),
                            part(5),
                            b,
                            line,
                        );
                    }
                }
            }
        }
    }
}

/// A_hᵀ of F(2, 3) over four planes of products.
#[inline(always)]
fn output_rows3(m: [&[f32]; 4], a0: &mut [f32], a1: &mut [f32]) {
    let n = a0.len();
    let [m0, m1, m2, m3] = m.map(|p| &p[..n]);
    let a1 = &mut a1[..n];
    for t in 0..n {
        a0[t] = m0[t] + m1[t] + m2[t];
        a1[t] = m1[t] - m2[t] - m3[t];
    }
}

/// A_hᵀ of F(2, 5) over six planes of products. Separate arguments, as in
/// [`output_columns5`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_rows5(
    m0: &[f32],
    m1: &[f32],
    m2: &[f32],
    m3: &[f32],
    m4: &[f32],
    m5: &[f32],
    a0: &mut [f32],
    a1: &mut [f32],
) {
    let n = a0.len();
    let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
    let a1 = &mut a1[..n];
    for t in 0..n {
        a0[t] = m0[t] + m1[t] + m2[t] + m3[t] + m4[t];
        a1[t] = m1[t] - m2[t] + 2.0 * (m3[t] - m4[t]) + m5[t];
    }
}

/// A_wᵀ of F(2, 3) applied to one output row's tiles, plus the bias: pixels 2t and 2t+1 of
/// `line` from `a0` … `a3` [t]. Separate arguments, as in [`column_half3`]; as a loop in
/// [`output_transform`] it stayed scalar, 7% of the skip model's training time.
#[inline(always)]
fn output_columns3(
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

/// A_wᵀ of F(2, 5), as [`output_columns3`]. With the six inputs in an array this loop
/// compiled to scalar code.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_columns5(
    a0: &[f32],
    a1: &[f32],
    a2: &[f32],
    a3: &[f32],
    a4: &[f32],
    a5: &[f32],
    bias: f32,
    line: &mut [MaybeUninit<f32>],
) {
    let pixels = line.as_chunks_mut::<2>().0;
    let n = pixels.len();
    let (a0, a1, a2, a3, a4, a5) = (&a0[..n], &a1[..n], &a2[..n], &a3[..n], &a4[..n], &a5[..n]);
    for t in 0..n {
        pixels[t][0].write(a0[t] + a1[t] + a2[t] + a3[t] + a4[t] + bias);
        pixels[t][1].write(a1[t] - a2[t] + 2.0 * (a3[t] - a4[t]) + a5[t] + bias);
    }
}

vectorised! {
    /// dM [ξ][tiles of the band][outputs] = A_h dY A_wᵀ for tile rows `tys`: the gradient of
    /// each tile's products from its 2×2 output gradients. `dy` is [even, odd columns][h]
    /// [w/2][outputs] (see [`Winograd::accumulate_gradient_in`]). Per row of A_h, its row
    /// half combines each tile row's two image rows into `e` [even, odd][tile rows][w/2]
    /// [outputs]; the column half then combines the even and odd columns into each of the
    /// r_w + 1 planes, one flat pass each. The channels last let the products read dM
    /// without repacking it.
    fn gradient_transform(
        dy: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        e: &mut [f32],
        m: &mut [f32],
    ) {
        let (h, tw, o_n) = (shape.h, shape.tiles().1, shape.outputs);
        let band_rows = tys.len();
        let tiles = band_rows * tw;
        let plane_stride = o_n * tiles + PLANE_GAP;
        let nw = shape.columns.tile();
        let line = tw * o_n;
        let (e_even, e_odd) = e[..2 * tiles * o_n].split_at_mut(tiles * o_n);
        for (i, &(a, b)) in shape.rows.spread().iter().enumerate() {
            for (half, e) in [&mut *e_even, &mut *e_odd].into_iter().enumerate() {
                let src = &dy[(half * h + 2 * tys.start) * line..][..2 * band_rows * line];
                for (out, pair) in e.chunks_exact_mut(line).zip(src.chunks_exact(2 * line)) {
                    let (even, odd) = pair.split_at(line);
                    spread(a, b, even, odd, out);
                }
            }
            for (s, &(c, d)) in shape.columns.spread().iter().enumerate() {
                let plane = &mut m[(i * nw + s) * plane_stride..][..tiles * o_n];
                spread(c, d, e_even, e_odd, plane);
            }
        }
    }
}

vectorised! {
    /// Each plane's even columns, then its odd ones: `out` [planes][2][h][w/2] from `x`
    /// [planes][h][w], one flat pass over pixel pairs per plane.
    fn split_columns(x: &[f32], plane: usize, out: &mut [f32]) {
        let half = plane / 2;
        for (x, out) in x.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            let (even, odd) = out.split_at_mut(half);
            let pairs = &x.as_chunks::<2>().0[..half];
            let odd = &mut odd[..half];
            for k in 0..half {
                even[k] = pairs[k][0];
                odd[k] = pairs[k][1];
            }
        }
    }
}

/// out = a·even + b·odd, element by element.
#[inline(always)]
fn spread(a: f32, b: f32, even: &[f32], odd: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (even, odd) = (&even[..n], &odd[..n]);
    for k in 0..n {
        out[k] = a * even[k] + b * odd[k];
    }
}

vectorised! {
    /// y += c·x, element by element.
    fn scaled_add(c: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += c * x;
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
    fn shapes() -> impl Iterator<Item = Winograd> {
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

    /// dW by its definition, summed over images: each tap's weight times dy at every output
    /// pixel, times the input pixel under that tap.
    fn direct_kernel_gradient(images: &[(Vec<f32>, Vec<f32>)], shape: &Winograd) -> Vec<f32> {
        let (h, w) = (shape.h as isize, shape.w as isize);
        let (kh, kw) = (shape.rows.len(), shape.columns.len());
        let (ph, pw) = (shape.rows.pad() as isize, shape.columns.pad() as isize);
        let mut dw = vec![0f64; shape.outputs * shape.inputs * kh * kw];
        for (x, dy) in images {
            for o in 0..shape.outputs {
                for i in 0..shape.inputs {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let mut sum = 0f64;
                            for oy in 0..h {
                                for ox in 0..w {
                                    let (iy, ix) = (oy + ky as isize - ph, ox + kx as isize - pw);
                                    if iy >= 0 && iy < h && ix >= 0 && ix < w {
                                        let at = |c: usize, y: isize, x: isize| {
                                            (c * shape.h + y as usize) * shape.w + x as usize
                                        };
                                        sum += f64::from(dy[at(o, oy, ox)])
                                            * f64::from(x[at(i, iy, ix)]);
                                    }
                                }
                            }
                            dw[((o * shape.inputs + i) * kh + ky) * kw + kx] += sum;
                        }
                    }
                }
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// The kernel gradient over two images, for every shape of [`shapes`]. Scratch and dU
    /// start as NaN, so a value read before it is written, or a first image added to what dU
    /// held, shows.
    #[test]
    fn kernel_gradient_matches_the_definition() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for shape in shapes() {
            let (inputs, outputs, h, w) = (shape.inputs, shape.outputs, shape.h, shape.w);
            let mut random =
                |len: usize| -> Vec<f32> { (0..len).map(|_| r.random_range(-1.0..1.0)).collect() };
            let images: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
                .map(|_| (random(inputs * h * w), random(outputs * h * w)))
                .collect();
            let mut du = vec![f32::NAN; shape.gradient_len()];
            let mut scratch = vec![f32::NAN; shape.gradient_scratch_len()];
            for (n, (x, dy)) in images.iter().enumerate() {
                shape.accumulate_gradient_in(x, dy, &mut du, n > 0, &mut scratch);
            }
            let got = shape.kernel_gradient(&du);
            let expected = direct_kernel_gradient(&images, &shape);
            let worst = expected
                .iter()
                .zip(&got)
                .map(|(e, g)| (e - g).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-3, "{shape:?}: off by {worst}");
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
