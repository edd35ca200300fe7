//! The network's building blocks, as the project's own types: the model builder only talks to
//! these, so a faster kernel (a fused batch norm, a cuDNN convolution) replaces one of them
//! without touching the model.

mod batch_norm;
mod conv;
pub mod cpu;
pub mod gpu;
mod linear;
mod resize;

use std::sync::atomic::{AtomicBool, Ordering};

pub use batch_norm::BatchNormRelu;
pub use conv::Conv2d;
pub use linear::Linear;
pub use resize::Resize;

/// Which implementation of convolution and batch norm a layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The fused CPU kernels (`layers::cpu`).
    Cpu,
    /// The GPU path (`layers::gpu`): CUDA kernels on a GPU, their CPU twins elsewhere.
    Gpu,
    /// Candle's composed operations, the reference for both.
    Composed,
}

static COMPOSED_ONLY: AtomicBool = AtomicBool::new(false);

/// Makes every layer of this process use Candle's composed operations, so that a benchmark can
/// measure what the kernels gain (`trainer bench --composed`). Not for training runs.
pub fn use_composed_only(on: bool) {
    COMPOSED_ONLY.store(on, Ordering::Relaxed);
}

/// The path for a device: our kernels where we have them, Candle's operations elsewhere.
pub fn path(device: &candle_core::Device) -> Path {
    if COMPOSED_ONLY.load(Ordering::Relaxed) {
        Path::Composed
    } else if device.is_cpu() {
        Path::Cpu
    } else if device.is_cuda() {
        Path::Gpu
    } else {
        Path::Composed
    }
}

/// The training loss: mean softmax cross-entropy of `logits` [batch, classes] against
/// `labels` [batch] (u32), fused on the CPU.
pub fn cross_entropy(
    logits: &candle_core::Tensor,
    labels: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    if logits.device().is_cpu() {
        logits
            .contiguous()?
            .apply_op2(labels, cpu::cross_entropy::CrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, labels)
    }
}
