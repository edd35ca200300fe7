//! The GPU path of the layers that dominate training time: batch norm fused with its ReLU,
//! and convolution as im2col + GEMM, as Candle custom ops whose CUDA kernels are in
//! `kernels.cu` (compiled with the `cuda` feature). Every op has a CPU implementation with
//! the same arithmetic, so the default tests check how the layers compose these ops against
//! Candle's reference on the CPU; [`check`] runs the same comparison on any device
//! (`trainer check-ops --device cuda` on a GPU).

pub mod batch_norm;
pub mod check;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cudnn")]
mod cudnn;
