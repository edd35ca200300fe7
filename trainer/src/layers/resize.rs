//! Fitting a skip connection's activations to the vertex it enters (§3.2): zeroth-order
//! (nearest) interpolation for the spatial size, truncation or zero padding for channels, as
//! in He et al. (2016).

use candle_core::{DType, Device, Result, Tensor};

use crate::dna::Shape3;

#[derive(Clone, Debug)]
pub struct Resize {
    rows: Option<Tensor>,
    cols: Option<Tensor>,
    from_channels: usize,
    to_channels: usize,
}

/// Source index of each target position: output pixel `i` takes input pixel
/// `floor(i * from / to)`, which for a downsampling by `k` is every `k`-th pixel.
fn nearest(from: usize, to: usize, device: &Device) -> Result<Option<Tensor>> {
    if from == to {
        return Ok(None);
    }
    let index: Vec<u32> = (0..to).map(|i| (i * from / to) as u32).collect();
    Tensor::from_vec(index, to, device)?
        .to_dtype(DType::U32)
        .map(Some)
}

impl Resize {
    pub fn new(from: Shape3, to: Shape3, device: &Device) -> Result<Self> {
        Ok(Self {
            rows: nearest(from.height, to.height, device)?,
            cols: nearest(from.width, to.width, device)?,
            from_channels: from.channels,
            to_channels: to.channels,
        })
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

    #[test]
    fn nearest_downsampling_and_channel_fit() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 16., &d)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let shape = |c, h, w| Shape3 {
            channels: c,
            height: h,
            width: w,
        };
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
}
