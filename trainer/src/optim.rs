//! SGD with momentum and weight decay (§3.4: momentum 0.9, weight decay 1e-4), which
//! candle-nn's `SGD` lacks. The update is PyTorch's, so the reference script trains the same:
//!
//! ```text
//! g = grad + weight_decay * w
//! v = momentum * v + g        (v = g on the first step)
//! w = w - lr * v
//! ```

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use candle_nn::Optimizer;

use crate::layers::{cpu::contiguous, Kernels, Path};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// The model's kernels: whether the update runs as fused kernels or Candle's operations.
    pub kernels: Kernels,
}

impl SgdConfig {
    /// The paper's settings with the learning rate of an individual's DNA.
    pub fn paper(learning_rate: f64) -> Self {
        Self {
            learning_rate,
            momentum: 0.9,
            weight_decay: 1e-4,
            kernels: Kernels::default(),
        }
    }
}

#[derive(Debug)]
pub struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    config: SgdConfig,
}

impl Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self> {
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        Ok(Self {
            velocity: vec![None; vars.len()],
            vars,
            config,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let fused = self.config.kernels.path(var.device()) != Path::Composed;
            if fused && self.config.momentum != 0.0 {
                update_fused(var, grad, velocity, &self.config)?;
            } else {
                update_composed(var, grad, velocity, &self.config)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.learning_rate = lr;
    }
}

/// Two fused in-place passes instead of seven tensor operations per variable: on a GPU each
/// tensor operation is a kernel launch and a full pass, a large share of a small model's step
/// (figures: docs/PERFORMANCE.md, GPU kernels).
fn update_fused(
    var: &Var,
    grad: &Tensor,
    velocity: &mut Option<Tensor>,
    config: &SgdConfig,
) -> Result<()> {
    let v = match velocity.take() {
        Some(v) => v,
        None => var.as_tensor().zeros_like()?,
    };
    v.inplace_op3(
        &grad.contiguous()?,
        var.as_tensor(),
        &Velocity {
            momentum: config.momentum as f32,
            weight_decay: config.weight_decay as f32,
        },
    )?;
    var.as_tensor().inplace_op2(
        &v,
        &Descent {
            learning_rate: config.learning_rate as f32,
        },
    )?;
    *velocity = Some(v);
    Ok(())
}

/// The update from Candle's tensor operations: devices without the fused kernels, and the
/// reference the fused update is tested against.
fn update_composed(
    var: &Var,
    grad: &Tensor,
    velocity: &mut Option<Tensor>,
    config: &SgdConfig,
) -> Result<()> {
    // Detached: the velocity outlives the step, and a tensor that remembered how it was
    // computed would keep every earlier step's tensors alive with it.
    let w = var.as_tensor().detach();
    let grad = grad.detach();
    let g = if config.weight_decay != 0.0 {
        (grad + (&w * config.weight_decay)?)?
    } else {
        grad
    };
    let v = match velocity.take() {
        Some(v) if config.momentum != 0.0 => ((v * config.momentum)? + g)?,
        _ => g,
    };
    var.set(&(&w - (&v * config.learning_rate)?)?)?;
    *velocity = Some(v);
    Ok(())
}

/// v = momentum·v + (g + weight_decay·w), in place on v; arguments (v; g, w).
struct Velocity {
    momentum: f32,
    weight_decay: f32,
}

impl InplaceOp3 for Velocity {
    fn name(&self) -> &'static str {
        "cambrian-sgd-velocity"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let g = contiguous(s2, l2, "gradient")?;
        let w = contiguous(s3, l3, "weights")?;
        let v = contiguous_mut(s1, l1, "velocity")?;
        for ((v, &g), &w) in v.iter_mut().zip(g).zip(w) {
            *v = self.momentum * *v + (g + self.weight_decay * w);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        use crate::layers::cuda::launch::{elementwise, launch, u32_of, view, view_mut};
        let device = s1.device.clone();
        let g = view(s2, l2, "gradient")?;
        let w = view(s3, l3, "weights")?;
        let n = u32_of(l1.shape().elem_count(), "velocity")?;
        let mut v = view_mut(s1, l1, "velocity")?;
        launch!(
            device,
            "sgd_velocity",
            elementwise(n as usize),
            &mut v,
            &g,
            &w,
            &n,
            &self.momentum,
            &self.weight_decay
        );
        Ok(())
    }
}

/// w = w − learning_rate·v, in place on w; arguments (w; v).
struct Descent {
    learning_rate: f32,
}

impl InplaceOp2 for Descent {
    fn name(&self) -> &'static str {
        "cambrian-sgd-descent"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let v = contiguous(s2, l2, "velocity")?;
        let w = contiguous_mut(s1, l1, "weights")?;
        for (w, &v) in w.iter_mut().zip(v) {
            *w -= self.learning_rate * v;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        use crate::layers::cuda::launch::{elementwise, launch, u32_of, view, view_mut};
        let device = s1.device.clone();
        let v = view(s2, l2, "velocity")?;
        let n = u32_of(l1.shape().elem_count(), "weights")?;
        let mut w = view_mut(s1, l1, "weights")?;
        launch!(
            device,
            "sgd_descent",
            elementwise(n as usize),
            &mut w,
            &v,
            &n,
            &self.learning_rate
        );
        Ok(())
    }
}

/// The f32 data of a contiguous tensor, to update in place.
fn contiguous_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused update against the composed one, over several steps of random gradients.
    #[test]
    fn fused_update_matches_composed() {
        let d = Device::Cpu;
        let config = SgdConfig {
            learning_rate: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
            kernels: Kernels::default(),
        };
        let start = Tensor::randn(0f32, 1., (7, 5), &d).unwrap();
        let fused = Var::from_tensor(&start).unwrap();
        let composed = Var::from_tensor(&start).unwrap();
        let (mut vf, mut vc) = (None, None);
        for _ in 0..4 {
            let grad = Tensor::randn(0f32, 1., (7, 5), &d).unwrap();
            update_fused(&fused, &grad, &mut vf, &config).unwrap();
            update_composed(&composed, &grad, &mut vc, &config).unwrap();
        }
        let diff = crate::layers::cpu::max_diff(fused.as_tensor(), composed.as_tensor());
        assert!(diff < 1e-6, "{diff}");
        // Both moved the weights: the comparison is not between two untouched copies.
        let moved: f32 = (fused.as_tensor() - &start)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(moved > 0.1, "{moved}");
    }

    #[test]
    fn two_steps_match_hand_computed_updates() {
        // loss = sum(w * x) so grad = x = [1, -2]; w0 = [0.5, 1.0], lr 0.1, mu 0.9, wd 0.01.
        let d = Device::Cpu;
        let w = Var::new(&[0.5f32, 1.0], &d).unwrap();
        let x = Tensor::new(&[1.0f32, -2.0], &d).unwrap();
        let config = SgdConfig {
            learning_rate: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            kernels: Kernels::default(),
        };
        let mut sgd = Sgd::new(vec![w.clone()], config).unwrap();
        let loss = |w: &Var| (w.as_tensor() * &x).unwrap().sum_all().unwrap();
        sgd.backward_step(&loss(&w)).unwrap();
        // Step 1: g = [1 + 0.005, -2 + 0.01] = [1.005, -1.99]; v = g;
        // w = [0.5 - 0.1005, 1.0 + 0.199] = [0.3995, 1.199].
        let w1: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!(
            (w1[0] - 0.3995).abs() < 1e-6 && (w1[1] - 1.199).abs() < 1e-6,
            "{w1:?}"
        );
        sgd.backward_step(&loss(&w)).unwrap();
        // Step 2: g = [1 + 0.003995, -2 + 0.01199] = [1.003995, -1.98801];
        // v = 0.9 * [1.005, -1.99] + g = [1.908495, -3.77901];
        // w = [0.3995 - 0.1908495, 1.199 + 0.377901] = [0.2086505, 1.576901].
        let w2: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!((w2[0] - 0.2086505).abs() < 1e-6, "{w2:?}");
        assert!((w2[1] - 1.576901).abs() < 1e-6, "{w2:?}");
        // The velocity must not hold on to the graph of earlier steps (that leaked the whole
        // training history: gigabytes over a few thousand steps).
        for v in sgd.velocity.iter().flatten() {
            assert!(!v.track_op());
        }
    }
}
