//! Batch normalisation over the channels of `[batch, channels, height, width]` activations,
//! with PyTorch's conventions (momentum 0.1 for the running averages, unbiased running
//! variance, eps 1e-5) so that the PyTorch reference model computes the same function.

use candle_core::{Result, Tensor, Var};

use crate::weights::{Init, Parameters, WeightsError};

const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    gamma: Var,
    beta: Var,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm2d {
    /// `prefix.gamma`, `prefix.beta` (trained) and `prefix.running_mean`, `prefix.running_var`.
    pub fn new<R: rand::Rng>(
        params: &mut Parameters<'_, R>,
        prefix: &str,
        channels: usize,
    ) -> std::result::Result<Self, WeightsError> {
        let shape = [channels];
        Ok(Self {
            gamma: params.var(format!("{prefix}.gamma"), &shape, Init::Ones, true)?,
            beta: params.var(format!("{prefix}.beta"), &shape, Init::Zeros, true)?,
            running_mean: params.var(
                format!("{prefix}.running_mean"),
                &shape,
                Init::Zeros,
                false,
            )?,
            running_var: params.var(format!("{prefix}.running_var"), &shape, Init::Ones, false)?,
        })
    }

    /// Training mode normalises with the batch's statistics and updates the running averages;
    /// evaluation mode uses the running averages only.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        if !train {
            let scale = (self.gamma.as_tensor() / (self.running_var.as_tensor() + EPS)?.sqrt()?)?;
            let shift = (self.beta.as_tensor() - (self.running_mean.as_tensor() * &scale)?)?;
            return x
                .broadcast_mul(&channel(&scale)?)?
                .broadcast_add(&channel(&shift)?);
        }
        let (n, _, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let inv_std = (&var + EPS)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&channel(self.gamma.as_tensor())?)?;
        let y = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&channel(self.beta.as_tensor())?)?;

        let unbiased = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let mean = mean.detach().flatten_all()?;
        let var = var.detach().flatten_all()?;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?)?;
        self.running_var.set(
            &((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (var * (MOMENTUM * unbiased))?)?,
        )?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{rng, Stream};
    use candle_core::Device;

    #[test]
    fn normalises_per_channel_and_tracks_statistics() {
        let mut r = rng(0, Stream::Initialisation);
        let mut p = Parameters::new(None, &mut r, &Device::Cpu);
        let bn = BatchNorm2d::new(&mut p, "bn", 2).unwrap();
        // Channel 0 holds 0..8, channel 1 holds 10 * (0..8); batch 2, 2x2 maps.
        let c0: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let data: Vec<f32> = [
            &c0[0..4],
            &c0[0..4].iter().map(|v| v * 10.).collect::<Vec<_>>()[..],
            &c0[4..8],
            &c0[4..8].iter().map(|v| v * 10.).collect::<Vec<_>>()[..],
        ]
        .concat();
        let x = Tensor::from_vec(data, (2, 2, 2, 2), &Device::Cpu).unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        let mean: Vec<f32> = y
            .mean_keepdim((0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let var: Vec<f32> = y
            .sqr()
            .unwrap()
            .mean_keepdim((0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for c in 0..2 {
            assert!(mean[c].abs() < 1e-5);
            assert!((var[c] - 1.0).abs() < 1e-3);
        }
        // Running mean after one step: 0.1 * batch mean (3.5 and 35).
        let rm: Vec<f32> = bn.running_mean.as_tensor().to_vec1().unwrap();
        assert!((rm[0] - 0.35).abs() < 1e-5 && (rm[1] - 3.5).abs() < 1e-4);
        // Running variance: 0.9 + 0.1 * unbiased variance (6 for 0..8).
        let rv: Vec<f32> = bn.running_var.as_tensor().to_vec1().unwrap();
        assert!((rv[0] - 1.5).abs() < 1e-4, "{rv:?}");
    }
}
