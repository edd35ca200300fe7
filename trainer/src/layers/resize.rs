//! Fitting a skip connection's activations to the vertex it enters (§3.2): zeroth-order
//! (nearest) interpolation for the spatial size, truncation or zero padding for channels, as
//! in He et al. (2016).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::cpu::skip::{Fit, SkipAdd};
use super::{Kernels, Path};
use population::dna::Shape3;

#[derive(Clone, Debug)]
pub struct Resize {
    rows: Option<Tensor>,
    cols: Option<Tensor>,
    from_channels: usize,
    to_channels: usize,
    /// The indices themselves, for the fused CPU op; `rows` and `cols` are made from them.
    fit: Arc<Fit>,
}

/// Source index of each target position: output pixel `i` takes input pixel
/// `floor(i * from / to)`, which for a downsampling by `k` is every `k`-th pixel.
fn nearest(from: usize, to: usize) -> Vec<usize> {
    (0..to).map(|i| i * from / to).collect()
}

/// `index` as a tensor for `index_select`, or `None` where the sizes agree.
fn index_tensor(index: &[usize], from: usize, device: &Device) -> Result<Option<Tensor>> {
    if from == index.len() {
        return Ok(None);
    }
    let index: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    let len = index.len();
    Tensor::from_vec(index, len, device)?
        .to_dtype(DType::U32)
        .map(Some)
}

impl Resize {
    pub fn new(from: Shape3, to: Shape3, device: &Device) -> Result<Self> {
        let fit = Fit {
            rows: nearest(from.height, to.height),
            cols: nearest(from.width, to.width),
        };
        Ok(Self {
            rows: index_tensor(&fit.rows, from.height, device)?,
            cols: index_tensor(&fit.cols, from.width, device)?,
            from_channels: from.channels,
            to_channels: to.channels,
            fit: Arc::new(fit),
        })
    }

    /// The source row of each target row, where the heights differ.
    pub(crate) fn rows(&self) -> Option<&[usize]> {
        self.rows.as_ref().map(|_| self.fit.rows.as_slice())
    }

    /// The source column of each target column, where the widths differ.
    pub(crate) fn cols(&self) -> Option<&[usize]> {
        self.cols.as_ref().map(|_| self.fit.cols.as_slice())
    }

    /// Channels in and out: the first `to` are kept, or zeros are appended up to `to`.
    pub(crate) fn channels(&self) -> (usize, usize) {
        (self.from_channels, self.to_channels)
    }

    /// `v + self.forward(s)`: the skip's contribution added to the vertex's sum. One fused op
    /// on the CPU path; Candle's operations elsewhere.
    pub fn add_to(&self, v: &Tensor, s: &Tensor, kernels: &Kernels) -> Result<Tensor> {
        match kernels.path(v.device()) {
            Path::Cpu => v.contiguous()?.apply_op2(
                &s.contiguous()?,
                SkipAdd {
                    fit: self.fit.clone(),
                },
            ),
            Path::Cuda | Path::Composed => v + self.forward(s)?,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(rows) = &self.rows {
            x = x.index_select(rows, 2)?;
        }
        if let Some(cols) = &self.cols {
            x = x.index_select(cols, 3)?;
        }
        if self.to_channels < self.from_channels {
            x = x.narrow(1, 0, self.to_channels)?;
        } else if self.to_channels > self.from_channels {
            x = x.pad_with_zeros(1, 0, self.to_channels - self.from_channels)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(channels: usize, height: usize, width: usize) -> Shape3 {
        Shape3 {
            channels,
            height,
            width,
        }
    }

    #[test]
    fn nearest_downsampling_and_channel_fit() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 16., &d)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = Resize::new(shape(1, 4, 4), shape(2, 2, 2), &d)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert_eq!(y.dims(), &[1, 2, 2, 2]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0., 2., 8., 10., 0., 0., 0., 0.]);
        let x3 = Tensor::ones((1, 3, 3, 3), DType::F32, &d).unwrap();
        let y = Resize::new(shape(3, 3, 3), shape(1, 2, 2), &d)
            .unwrap()
            .forward(&x3)
            .unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
    }

    /// The fused CPU op against the composed one: output and both gradients, for equal
    /// shapes, downsampling by 2 and by 4 (the row loops without indexing), by an uneven
    /// factor with fewer channels, and upsampling (several target pixels from one source
    /// pixel, whose gradients add up).
    #[test]
    fn fused_skip_add_matches_composed() {
        use candle_core::Var;
        let d = Device::Cpu;
        for (from, to) in [
            (shape(3, 4, 4), shape(3, 4, 4)),
            (shape(2, 8, 6), shape(4, 4, 3)),
            (shape(5, 9, 7), shape(3, 3, 2)),
            (shape(2, 2, 3), shape(2, 5, 4)),
            (shape(3, 8, 8), shape(3, 2, 2)),
        ] {
            let n = 3;
            let s = Var::from_tensor(
                &Tensor::randn(0f32, 1., (n, from.channels, from.height, from.width), &d).unwrap(),
            )
            .unwrap();
            let v = Var::from_tensor(
                &Tensor::randn(0f32, 1., (n, to.channels, to.height, to.width), &d).unwrap(),
            )
            .unwrap();
            let g = Tensor::randn(0f32, 1., v.dims(), &d).unwrap();
            let resize = Resize::new(from, to, &d).unwrap();
            let fused = v
                .as_tensor()
                .apply_op2(
                    s.as_tensor(),
                    SkipAdd {
                        fit: resize.fit.clone(),
                    },
                )
                .unwrap();
            let composed = (v.as_tensor() + resize.forward(s.as_tensor()).unwrap()).unwrap();
            assert!(
                crate::layers::cpu::max_diff(&fused, &composed) < 1e-6,
                "{from:?} -> {to:?}"
            );
            let ga = (&fused * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (&composed * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&v, &s] {
                let (a, b) = (ga.get(var).unwrap(), gb.get(var).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(
                    crate::layers::cpu::max_diff(a, b) < 1e-5,
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn fused_skip_add_rejects_shapes_it_does_not_fit() {
        let d = Device::Cpu;
        let resize = Resize::new(shape(2, 8, 8), shape(2, 4, 4), &d).unwrap();
        let v = Tensor::zeros((1, 2, 4, 4), DType::F32, &d).unwrap();
        let wrong_source = Tensor::zeros((1, 2, 3, 3), DType::F32, &d).unwrap();
        let k = Kernels::default();
        assert!(resize.add_to(&v, &wrong_source, &k).is_err());
        let wrong_target = Tensor::zeros((1, 2, 5, 4), DType::F32, &d).unwrap();
        let source = Tensor::zeros((1, 2, 8, 8), DType::F32, &d).unwrap();
        assert!(resize.add_to(&wrong_target, &source, &k).is_err());
    }
}
