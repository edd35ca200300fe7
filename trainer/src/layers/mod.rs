//! The network's building blocks, as the project's own types: the model builder only talks to
//! these, so a faster kernel (a fused batch norm, a cuDNN convolution) replaces one of them
//! without touching the model. Which kernels they run is the model's [`Kernels`].

mod batch_norm;
mod conv;
pub mod cpu;
pub mod cuda;
mod geometry;
mod kernels;
mod linear;
mod resize;

pub use batch_norm::BatchNormRelu;
pub(crate) use batch_norm::EPS as BATCH_NORM_EPS;
pub use conv::Conv2d;
pub use geometry::Geometry;
pub use kernels::{
    CpuConvolution, CudaConvolution, CudaConvolutionError, Kernels, Path, UnknownCpuConvolution,
};
pub use linear::Linear;
pub use resize::Resize;

/// The training loss: mean softmax cross-entropy of `logits` [batch, classes] against
/// `labels` [batch] (u32), fused on the CPU path.
pub fn cross_entropy(
    logits: &candle_core::Tensor,
    labels: &candle_core::Tensor,
    kernels: &Kernels,
) -> candle_core::Result<candle_core::Tensor> {
    if kernels.path(logits.device()) == Path::Cpu {
        logits
            .contiguous()?
            .apply_op2(labels, cpu::cross_entropy::CrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, labels)
    }
}
