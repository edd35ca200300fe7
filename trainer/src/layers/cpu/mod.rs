//! CPU kernels for the layers that dominate training time, as Candle custom ops with their
//! own backward passes: convolution (im2col + GEMM, or Winograd for 3- and 5-tap filters at stride 1) and
//! batch norm fused with its ReLU.
//! Their CUDA counterparts are in `layers::cuda`.

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
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(candle_core::D::Minus1))
        .and_then(|d| d.to_scalar())
        .expect("tensors of one shape")
}
