//! CPU kernels for the layers that dominate training time, as Candle custom ops with their
//! own backward passes: convolution (`conv`: im2col + GEMM, or Winograd for 3- and 5-tap
//! filters at stride 1), batch norm fused with its ReLU, the classifier's linear layer, the
//! skip addition and the loss. What they share: `buffers` (outputs and scratch), `gemm`
//! (matrix products), `simd` (vectorised loops). Their CUDA counterparts are `layers::cuda`.

/// Compiles an element-wise kernel (a free function) three times, for AVX-512, AVX2 and the
/// SSE2 baseline, and picks the best the CPU has at run time. `gemm` does this for its own
/// kernels; ours otherwise compile for SSE2 only, since a binary built for AVX2 would die
/// with SIGILL on a CPU without it. Floating-point results do not depend on the clone:
/// without fast-math, LLVM keeps the source's order of operations and never fuses a
/// multiply and an add.
macro_rules! vectorised {
    ($kernel:item) => {
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
            "x86_64+avx2+fma"
        ))]
        $kernel
    };
}

/// The `cpu_fwd` of a custom op whose inputs are all contiguous f32 tensors: each input's data
/// is bound under its name (checked as [`contiguous`] checks it, with `what` in the error)
/// and its layout under the name after `@`, then the body runs. One signature and one input
/// check for every op, so that an op's `cpu_fwd` starts where its own work does.
macro_rules! cpu_fwd {
    ($self:ident, $($data:ident @ $layout:ident : $what:literal),+ => $body:block) => {
        fn cpu_fwd(
            &$self,
            $($data: &candle_core::CpuStorage, $layout: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let $data = $crate::layers::cpu::contiguous($data, $layout, $what)?;)+
            $body
        }
    };
}

pub mod batch_norm;
mod buffers;
pub mod conv;
pub mod cross_entropy;
mod gemm;
mod im2col;
pub mod linear;
mod simd;
pub mod skip;
mod winograd;

pub(crate) use buffers::{assume_written, par_written, par_written_then, with_scratch};
pub(crate) use gemm::GemmOperand;
pub(crate) use simd::{add_into, lane_sum, transpose};

use candle_core::{CpuStorage, Layout, Result};

/// The f32 data of a contiguous tensor.
pub(crate) fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// A tensor of normal samples drawn from `seed`: tests compare two implementations on the
/// same inputs every run (Candle's CPU `randn` cannot be seeded), so that a case that lands
/// on a kink, such as a ReLU's input at 0, either always passes or always fails.
#[cfg(test)]
pub(crate) fn seeded_randn(
    mean: f32,
    std: f32,
    shape: (usize, usize, usize, usize),
    seed: u64,
) -> candle_core::Tensor {
    use rand_distr::{Distribution, Normal};
    let mut rng = population::seed::rng(seed, population::seed::Stream::Initialisation);
    let normal = Normal::new(mean, std).expect("a positive deviation");
    let len = shape.0 * shape.1 * shape.2 * shape.3;
    let values: Vec<f32> = (0..len).map(|_| normal.sample(&mut rng)).collect();
    candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu).expect("a shape")
}

/// The largest absolute difference between two tensors of one shape, for the tests that
/// compare a kernel with Candle's composed operations.
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).expect("tensors of one shape"))
}

/// The largest magnitude in a tensor: the scale a tolerance is relative to.
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(candle_core::D::Minus1))
        .and_then(|d| d.to_scalar())
        .expect("an f32 tensor")
}
