//! Batch normalisation followed by ReLU, what a BN+ReLU vertex applies (§3.2), over the
//! channels of `[batch, channels, height, width]` activations, with PyTorch's conventions
//! (momentum 0.1 for the running averages, unbiased running variance, eps 1e-5) so that the
//! PyTorch reference model computes the same function. On the CPU it runs as one fused kernel
//! (`layers::cpu::batch_norm`), on CUDA as four kernels (`layers::cuda::batch_norm`), elsewhere
//! as Candle's composed operations.

use candle_core::{Result, Tensor, Var};

use super::cpu::batch_norm::{BatchNormReluEval, BatchNormReluTrain};
use super::{Kernels, Path};
use crate::weights::{Init, Parameters, WeightsError};

const MOMENTUM: f64 = 0.1;
pub(crate) const EPS: f64 = 1e-5;

/// Bessel's correction for a variance over `count` elements (PyTorch's running variance is
/// unbiased).
fn unbiased(count: usize) -> f64 {
    if count > 1 {
        count as f64 / (count as f64 - 1.0)
    } else {
        1.0
    }
}

#[derive(Clone, Debug)]
pub struct BatchNormRelu {
    gamma: Var,
    beta: Var,
    running_mean: Var,
    running_var: Var,
}

impl BatchNormRelu {
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

    pub(crate) fn gamma(&self) -> &Var {
        &self.gamma
    }

    pub(crate) fn beta(&self) -> &Var {
        &self.beta
    }

    pub(crate) fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    pub(crate) fn running_var(&self) -> &Var {
        &self.running_var
    }

    /// Training mode normalises with the batch's statistics and updates the running averages;
    /// evaluation mode uses the running averages only.
    pub fn forward_t(&self, x: &Tensor, train: bool, kernels: &Kernels) -> Result<Tensor> {
        match kernels.path(x.device()) {
            Path::Cpu => self.forward_cpu(x, train),
            Path::Cuda => self.forward_cuda(x, train),
            Path::Composed => self.forward_composed(x, train)?.relu(),
        }
    }

    /// The GPU path (`layers::cuda::batch_norm`): statistics, running averages and the
    /// normalisation all stay on the device, so a step never waits for it.
    pub fn forward_cuda(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        use super::cuda::batch_norm::{Eval, Statistics, TrainForward};
        let x = x.contiguous()?;
        if !train {
            let (scale, shift) = self.running_scale_shift()?;
            return x.apply_op3_no_bwd(&scale, &shift, &Eval);
        }
        let stats = x.apply_op1_no_bwd(&Statistics)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let inv_std = (&var + EPS)?.sqrt()?.recip()?;
        let scale = (self.gamma.as_tensor().detach() * &inv_std)?;
        let shift = (self.beta.as_tensor().detach() - (&mean * &scale)?)?;
        let y = x.apply_op3(
            self.gamma.as_tensor(),
            self.beta.as_tensor(),
            TrainForward {
                scale,
                shift,
                mean: mean.clone(),
                inv_std,
            },
        )?;
        let (n, _, h, w) = x.dims4()?;
        self.update_running(&mean, &var, unbiased(n * h * w))?;
        Ok(y)
    }

    fn forward_cpu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        if !train {
            let (scale, shift) = self.running_scale_shift()?;
            return x.apply_op3_no_bwd(&scale, &shift, &BatchNormReluEval);
        }
        let op = BatchNormReluTrain::new(EPS);
        let stats = op.stats();
        let y = x.apply_op3(self.gamma.as_tensor(), self.beta.as_tensor(), op)?;
        let Some(stats) = stats.get() else {
            candle_core::bail!("batch norm: the forward pass left no statistics");
        };
        let (n, _, h, w) = x.dims4()?;
        let device = x.device();
        let mean = Tensor::from_vec(stats.mean, self.gamma.dim(0)?, device)?;
        let var = Tensor::from_vec(stats.var, self.gamma.dim(0)?, device)?;
        self.update_running(&mean, &var, unbiased(n * h * w))?;
        Ok(y)
    }

    /// Evaluation's per-channel affine map, folded from the running statistics: y = x·scale +
    /// shift. Never differentiated.
    fn running_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let gamma = self.gamma.as_tensor().detach();
        let scale = (gamma / (self.running_var.as_tensor() + EPS)?.sqrt()?)?;
        let shift = (self.beta.as_tensor().detach() - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, unbiased: f64) -> Result<()> {
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?)?;
        self.running_var.set(
            &((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (var * (MOMENTUM * unbiased))?)?,
        )
    }

    /// Batch norm (without the ReLU) from Candle's tensor operations: the path for devices
    /// without a fused kernel, and the reference the fused kernel is tested against.
    pub fn forward_composed(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        if !train {
            let (scale, shift) = self.running_scale_shift()?;
            return x
                .broadcast_mul(&channel(&scale)?)?
                .broadcast_add(&channel(&shift)?);
        }
        let (n, _, h, w) = x.dims4()?;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let inv_std = (&var + EPS)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&channel(self.gamma.as_tensor())?)?;
        let y = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&channel(self.beta.as_tensor())?)?;
        let mean = mean.detach().flatten_all()?;
        let var = var.detach().flatten_all()?;
        self.update_running(&mean, &var, unbiased(n * h * w))?;
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::{max_abs, max_diff, seeded_randn};
    use candle_core::{Device, Var};
    use population::seed::{rng, Stream};

    /// Two identical layers with non-trivial affine parameters, so that their gradients are
    /// tested too.
    fn layers(channels: usize, seed: u64) -> (BatchNormRelu, BatchNormRelu) {
        let gamma = Tensor::randn(1f32, 0.3, channels, &Device::Cpu).unwrap();
        let beta = Tensor::randn(0f32, 0.3, channels, &Device::Cpu).unwrap();
        let make = || {
            let mut r = rng(seed, Stream::Initialisation);
            let mut p = Parameters::new(None, &mut r, &Device::Cpu);
            let bn = BatchNormRelu::new(&mut p, "bn", channels).unwrap();
            bn.gamma.set(&gamma).unwrap();
            bn.beta.set(&beta).unwrap();
            bn
        };
        (make(), make())
    }

    #[test]
    fn composed_normalises_per_channel_and_tracks_statistics() {
        let (bn, _) = layers(2, 0);
        bn.gamma
            .set(&Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        bn.beta
            .set(&Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        // Channel 0 holds 0..8, channel 1 holds 10 * (0..8); batch 2, 2x2 maps.
        let c0: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let c1: Vec<f32> = c0.iter().map(|v| v * 10.).collect();
        let data = [&c0[0..4], &c1[0..4], &c0[4..8], &c1[4..8]].concat();
        let x = Tensor::from_vec(data, (2, 2, 2, 2), &Device::Cpu).unwrap();
        let y = bn.forward_composed(&x, true).unwrap();
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

    fn composed_relu(bn: &BatchNormRelu, x: &Tensor, train: bool) -> Tensor {
        bn.forward_composed(x, train).unwrap().relu().unwrap()
    }

    /// The fused CPU kernel against the composed operations followed by ReLU: outputs,
    /// running statistics and the gradients of input, gamma and beta, on random inputs.
    #[test]
    fn fused_matches_composed() {
        for (n, c, h, w, seed) in [
            (4, 3, 5, 5, 1),
            (2, 8, 1, 1, 2),
            (16, 16, 8, 8, 3),
            (1, 2, 3, 7, 4),
        ] {
            let (fused, composed) = layers(c, seed);
            let x = Var::from_tensor(&seeded_randn(0.5, 2., (n, c, h, w), seed)).unwrap();
            let g = seeded_randn(0., 1., (n, c, h, w), seed + 100);
            let a = fused
                .forward_t(x.as_tensor(), true, &Kernels::default())
                .unwrap();
            let b = composed_relu(&composed, x.as_tensor(), true);
            assert!(max_diff(&a, &b) < 1e-4, "forward {:?}", (n, c, h, w));
            for (p, q) in [
                (&fused.running_mean, &composed.running_mean),
                (&fused.running_var, &composed.running_var),
            ] {
                assert!(max_diff(p.as_tensor(), q.as_tensor()) < 1e-4);
            }
            let ga = (&a * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&b * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let pairs = [
                ("x", x.as_tensor(), x.as_tensor()),
                ("gamma", fused.gamma.as_tensor(), composed.gamma.as_tensor()),
                ("beta", fused.beta.as_tensor(), composed.beta.as_tensor()),
            ];
            for (name, pa, pb) in pairs {
                let (da, db) = (ga.get(pa).unwrap(), gb.get(pb).unwrap());
                let scale = max_abs(db).max(1.0);
                assert!(
                    max_diff(da, db) < 2e-4 * scale,
                    "{name} gradient {:?}",
                    (n, c, h, w)
                );
            }
            let ea = fused
                .forward_t(x.as_tensor(), false, &Kernels::default())
                .unwrap();
            let eb = composed_relu(&composed, x.as_tensor(), false);
            assert!(max_diff(&ea, &eb) < 1e-4, "eval {:?}", (n, c, h, w));
        }
    }
}
