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

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Result, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{col2im, im2col, scratch_len};
use super::winograd::{Kernel, Taps, Winograd};
use super::{
    add_into, assume_written, lane_sum, par_written, transpose, with_scratch, GemmOperand,
};
use crate::layers::Geometry;

/// All the sizes of one convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub g: Geometry,
}

impl Dims {
    pub fn new(
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

    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Row stride of the column matrix, in floats: P, or a little more where P is a multiple
    /// of 256 (rows a multiple of 1 KiB apart), whose rows fall into the same few L1 cache
    /// sets. `gemm` reads the matrix a tap row after another, so such rows get a 32-float gap
    /// (figures: docs/PERFORMANCE.md, CPU kernels: im2col).
    pub fn ld(&self) -> usize {
        let p = self.p();
        if p.is_multiple_of(256) {
            p + 32
        } else {
            p
        }
    }

    /// Where row (c, i, j) of the column matrix starts.
    pub fn col_row(&self, c: usize, i: usize, j: usize) -> usize {
        ((c * self.kh + i) * self.kw + j) * self.ld()
    }

    pub fn image(&self) -> usize {
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

/// y = conv2d(x, W) + b; differentiable in all three.
pub struct Conv2d {
    pub geometry: Geometry,
    /// Winograd where the shape takes it (all three passes); im2col + GEMM if false.
    pub winograd: bool,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "cambrian-conv2d"
    }

    cpu_fwd!(self, x @ l1: "conv2d input", w @ l2: "conv2d kernel", b @ l3: "conv2d bias" => {
        let d = Dims::new(l1.shape().dims4()?, l2.shape().dims4()?, self.geometry)?;
        let (k, p) = (d.k(), d.p());
        if b.len() != d.cout {
            candle_core::bail!("conv2d: {} biases for {} channels", b.len(), d.cout);
        }
        let winograd = d
            .winograd(d.cin, d.cout)
            .filter(|_| self.winograd)
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
                    // block of columns, which costs most where P is large (figures:
                    // docs/PERFORMANCE.md, CPU kernels: im2col).
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
    });

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
                winograd: self.winograd,
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
                winograd: self.winograd,
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
    winograd: bool,
    input: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cambrian-conv2d-input-grad"
    }

    cpu_fwd!(self, dy @ l1: "conv2d output gradient", w @ l2: "conv2d kernel" => {
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
            .filter(|_| self.winograd)
            .map(|shape| shape.prepare(w, Kernel::Flipped));
        // Each image's gradient is zeroed by the thread that scatters into it: zeroed up
        // front (`vec![0.0; …]`), the whole batch's was a serial memset on the calling thread
        // while the other threads waited.
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
    });
}

/// dW and db from (x, dy), packed into one vector: dW [Cout×K] then db [Cout].
struct WeightGrad {
    geometry: Geometry,
    winograd: bool,
    kernel: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "cambrian-conv2d-weight-grad"
    }

    cpu_fwd!(self, x @ l1: "conv2d input", dy @ l2: "conv2d output gradient" => {
        let d = Dims::new(l1.shape().dims4()?, self.kernel, self.geometry)?;
        let (k, p) = (d.k(), d.p());
        let size = d.cout * k;
        // The product's orientation matters to `gemm`: it runs col·dyᵀ much faster than
        // dy·colᵀ where K ≥ Cout. Of the nine layers of the reference models, only conv3's
        // first (K 27 < Cout 64) prefers the other orientation. So when K ≥ Cout each thread
        // sums dWᵀ [K×Cout], and the total is transposed once at the end (figures:
        // docs/PERFORMANCE.md, CPU kernels: im2col).
        let transposed = k >= d.cout;
        // Winograd's where the forward pass takes it: each thread sums dU, the gradient of the
        // transformed kernels, and the total becomes dW once at the end.
        let winograd = d.winograd(d.cin, d.cout).filter(|_| self.winograd);
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
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::{max_abs, max_diff};
    use candle_core::{Device, Var};

    fn scale(t: &Tensor) -> f32 {
        max_abs(t).max(1.0)
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
        // Every case both ways: Winograd where the shape takes it, and im2col + GEMM.
        let both = cases.iter().flat_map(|&case| [(case, true), (case, false)]);
        for ((n, cin, h, w, cout, kh, kw, s, ph, pw), winograd) in both {
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
                        winograd,
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
                (n, cin, h, w, cout, kh, kw, s, winograd)
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
                    (n, cin, h, w, cout, kh, kw, s, winograd)
                );
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
                    winograd: true,
                },
            )
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(k.as_tensor()).is_some());
    }
}
