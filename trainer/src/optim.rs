//! SGD with momentum and weight decay (§3.4: momentum 0.9, weight decay 1e-4), which
//! candle-nn's `SGD` lacks. The update is PyTorch's, so the reference script trains the same:
//!
//! ```text
//! g = grad + weight_decay * w
//! v = momentum * v + g        (v = g on the first step)
//! w = w - lr * v
//! ```

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl SgdConfig {
    /// The paper's settings with the learning rate of an individual's DNA.
    pub fn paper(learning_rate: f64) -> Self {
        Self {
            learning_rate,
            momentum: 0.9,
            weight_decay: 1e-4,
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
        let SgdConfig {
            learning_rate,
            momentum,
            weight_decay,
        } = self.config;
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            // Detached: the velocity outlives the step, and a tensor that remembered how it
            // was computed would keep every earlier step's tensors alive with it.
            let w = var.as_tensor().detach();
            let grad = grad.detach();
            let g = if weight_decay != 0.0 {
                (grad + (&w * weight_decay)?)?
            } else {
                grad
            };
            let v = match velocity.take() {
                Some(v) if momentum != 0.0 => ((v * momentum)? + g)?,
                _ => g,
            };
            var.set(&(&w - (&v * learning_rate)?)?)?;
            *velocity = Some(v);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
