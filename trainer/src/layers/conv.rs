//! A convolution padded "same": odd filters centred on each pixel, so that stride `s` maps a
//! side of `n` pixels to `ceil(n / s)` whatever the filter size (§3.2's shapes depend only on
//! strides and channels). On the CPU it runs as im2col + GEMM or Winograd
//! (`layers::cpu::conv`), on CUDA as im2col + cuBLAS or cuDNN (`layers::cuda::conv`),
//! elsewhere as Candle's convolution.

use candle_core::{Result, Tensor, Var};

use super::{CpuConvolution, Geometry, Kernels, Path};
use crate::weights::{Init, Parameters};

#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Var,
    bias: Var,
    stride: usize,
}

impl Conv2d {
    /// `prefix.weight` `[out, in, height, width]` and `prefix.bias` `[out]`.
    pub fn new<R: rand::Rng>(
        params: &mut Parameters<'_, R>,
        prefix: &str,
        in_channels: usize,
        out_channels: usize,
        filter: (usize, usize),
        stride: usize,
    ) -> std::result::Result<Self, crate::weights::WeightsError> {
        debug_assert!(filter.0 % 2 == 1 && filter.1 % 2 == 1, "odd filters only");
        let fan_in = in_channels * filter.0 * filter.1;
        let weight = params.var(
            format!("{prefix}.weight"),
            &[out_channels, in_channels, filter.0, filter.1],
            Init::He { fan_in },
            true,
        )?;
        let bias = params.var(format!("{prefix}.bias"), &[out_channels], Init::Zeros, true)?;
        Ok(Self {
            weight,
            bias,
            stride,
        })
    }

    pub(crate) fn weight(&self) -> &Var {
        &self.weight
    }

    pub(crate) fn bias(&self) -> &Var {
        &self.bias
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    pub fn forward(&self, x: &Tensor, kernels: &Kernels) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let (_, _, fh, fw) = self.weight.dims4()?;
        // Taps further than (side - 1) from the centre only ever meet padding: a filter larger
        // than 2*side - 1 computes the same as its centre, so use the centre and keep the cost
        // bounded however large evolution makes the filter. Gradients of the unused taps are 0.
        let kh = fh.min(2 * height - 1);
        let kw = fw.min(2 * width - 1);
        let weight = self
            .weight
            .as_tensor()
            .narrow(2, (fh - kh) / 2, kh)?
            .narrow(3, (fw - kw) / 2, kw)?;
        let (ph, pw) = ((kh - 1) / 2, (kw - 1) / 2);
        let geometry = Geometry {
            stride: self.stride,
            pad_h: ph,
            pad_w: pw,
        };
        match kernels.path(x.device()) {
            Path::Cpu => x.contiguous()?.apply_op3(
                &weight.contiguous()?,
                self.bias.as_tensor(),
                super::cpu::conv::Conv2d {
                    geometry,
                    winograd: kernels.cpu_convolution == CpuConvolution::Auto,
                },
            ),
            // The images (a tensor without gradient) need no input gradient.
            Path::Cuda => super::cuda::conv::conv2d(
                x,
                &weight,
                self.bias.as_tensor(),
                geometry,
                x.track_op(),
                kernels,
            ),
            Path::Composed => self.composed(x, &weight, ph, pw),
        }
    }

    /// The convolution from Candle's operations: the reference the kernels are checked
    /// against, and the path of devices without kernels of ours.
    fn composed(&self, x: &Tensor, weight: &Tensor, ph: usize, pw: usize) -> Result<Tensor> {
        let y = if ph == pw {
            x.conv2d(weight, ph, self.stride, 1, 1)?
        } else {
            // Candle pads both sides by one amount; pad the input ourselves when they differ.
            x.pad_with_zeros(2, ph, ph)?
                .pad_with_zeros(3, pw, pw)?
                .conv2d(weight, 0, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias.as_tensor().reshape((1, (), 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use population::seed::{rng, Stream};

    fn conv(filter: (usize, usize), stride: usize) -> Conv2d {
        let mut r = rng(0, Stream::Initialisation);
        let mut p = Parameters::new(None, &mut r, &Device::Cpu);
        Conv2d::new(&mut p, "c", 2, 3, filter, stride).unwrap()
    }

    #[test]
    fn same_padding_shapes() {
        let x = Tensor::ones((4, 2, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let k = Kernels::default();
        assert_eq!(
            conv((3, 3), 1).forward(&x, &k).unwrap().dims(),
            &[4, 3, 7, 7]
        );
        assert_eq!(
            conv((3, 5), 2).forward(&x, &k).unwrap().dims(),
            &[4, 3, 4, 4]
        );
        assert_eq!(
            conv((1, 9), 4).forward(&x, &k).unwrap().dims(),
            &[4, 3, 2, 2]
        );
    }

    #[test]
    fn oversized_filter_equals_its_centre() {
        // A 9x9 filter on a 2x2 map: only the central 3x3 taps can see the image.
        let big = conv((9, 9), 1);
        let x = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 2, 2))
            .unwrap();
        let y = big.forward(&x, &Kernels::default()).unwrap();
        // The definition: pad by 4 on every side and convolve with the whole filter.
        let reference = x
            .pad_with_zeros(2, 4, 4)
            .unwrap()
            .pad_with_zeros(3, 4, 4)
            .unwrap()
            .conv2d(big.weight.as_tensor(), 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&big.bias.as_tensor().reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let max = crate::layers::cpu::max_diff(&y, &reference);
        assert!(max < 1e-4, "{max}");
    }
}
