//! The kernel gradient of a Winograd convolution: the forward algebra run backwards, summed
//! over the batch in the transformed domain and transformed back once per call.

use super::{Winograd, PLANE_GAP};
use crate::layers::cpu::{transpose, with_scratch, GemmOperand};

impl Winograd {
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
                // by float, a large share of the time.
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
}

vectorised! {
    /// dM [ξ][tiles of the band][outputs] = A_h dY A_wᵀ for tile rows `tys`: the gradient of
    /// each tile's products from its 2×2 output gradients. `dy` is [even, odd columns][h]
    /// [w/2][outputs] (see [`Winograd::accumulate_gradient_in`]). Per row of A_h, its row
    /// half combines each tile row's two image rows into `e` [even, odd][tile rows][w/2]
    /// [outputs]; the column half then combines the even and odd columns into each of the
    /// r_w + 1 planes, one flat pass each. The channels last let the products read dM
    /// without repacking it.
    pub(super) fn gradient_transform(
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
    pub(super) fn split_columns(x: &[f32], plane: usize, out: &mut [f32]) {
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
    pub(super) fn scaled_add(c: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += c * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::winograd::tests::shapes;
    use rand::{Rng, SeedableRng};

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
}
