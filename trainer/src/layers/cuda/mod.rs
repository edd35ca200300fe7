//! The CUDA path of the layers that dominate training time: batch norm fused with its ReLU,
//! and convolution as im2col + GEMM (or through cuDNN in a `cudnn` build), as Candle custom
//! ops whose kernels are in `kernels.cu` (compiled to PTX by build.rs with the `cuda`
//! feature; [`launch`] loads and launches them).
//!
//! Every op also has a CPU implementation, its reference twin: the same index arithmetic as
//! its kernel, written for clarity, not speed. The twins let the default tests, which have no
//! GPU, check how the layers compose these ops against Candle's composed operations; on a GPU
//! [`check`] runs the same comparison against the real kernels (`trainer check-ops --device
//! cuda`). Training on the CPU never takes this path: `layers::cpu` has the fast kernels.

pub mod batch_norm;
pub mod check;
pub mod conv;
#[cfg(feature = "cudnn")]
mod cudnn;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
