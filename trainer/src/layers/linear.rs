//! The fully connected layer that turns the last backbone vertex, flattened, into class
//! logits (the softmax is applied by the loss). On the CPU it is one op
//! (`layers::cpu::linear`), elsewhere Candle's matmul and broadcast addition.

use candle_core::{Result, Tensor, Var};

use super::{Kernels, Path};
use crate::weights::{Init, Parameters, WeightsError};

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Var,
    bias: Var,
}

impl Linear {
    /// `prefix.weight` `[out, in]` and `prefix.bias` `[out]`.
    pub fn new<R: rand::Rng>(
        params: &mut Parameters<'_, R>,
        prefix: &str,
        inputs: usize,
        outputs: usize,
    ) -> std::result::Result<Self, WeightsError> {
        Ok(Self {
            weight: params.var(
                format!("{prefix}.weight"),
                &[outputs, inputs],
                Init::He { fan_in: inputs },
                true,
            )?,
            bias: params.var(format!("{prefix}.bias"), &[outputs], Init::Zeros, true)?,
        })
    }

    pub(crate) fn weight(&self) -> &Var {
        &self.weight
    }

    pub(crate) fn bias(&self) -> &Var {
        &self.bias
    }

    pub fn forward(&self, x: &Tensor, kernels: &Kernels) -> Result<Tensor> {
        let x = x.flatten_from(1)?;
        match kernels.path(x.device()) {
            Path::Cpu => x.contiguous()?.apply_op3(
                self.weight.as_tensor(),
                self.bias.as_tensor(),
                super::cpu::linear::Linear,
            ),
            _ => x
                .matmul(&self.weight.as_tensor().t()?)?
                .broadcast_add(self.bias.as_tensor()),
        }
    }
}
