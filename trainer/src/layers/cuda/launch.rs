//! Loading and launching the kernels of `kernels.cu` on Candle's CUDA device: the PTX is
//! compiled by build.rs and loaded once per device (Candle caches the module by name).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, Layout, Result, Storage};

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layers.ptx"));
pub(crate) const MODULE: &str = "cambrian-layers";

/// The threads of one block of the per-channel reductions; `BLOCK` in kernels.cu.
const REDUCTION_THREADS: u32 = 512;

/// Launches kernel `$name` of kernels.cu with the given arguments (references), on the
/// device's stream, returning Candle's error type from the enclosing function.
///
/// Every call site must pass the kernel's parameters in number, type and order, with buffers
/// as large as the sizes it passes say: the kernels check nothing.
macro_rules! launch {
    ($device:expr, $name:literal, $config:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        use candle_core::cuda_backend::WrapErr as _;
        let func = $device.get_or_load_custom_func($name, $crate::layers::cuda::launch::MODULE, $crate::layers::cuda::launch::PTX)?;
        let mut args = func.builder();
        $( args.arg($arg); )+
        // SAFETY: the call site passes the kernel's parameters (see the macro's doc).
        unsafe { args.launch($config) }.w()?;
    }};
}
pub(crate) use launch;

/// The f32 elements of a contiguous tensor's storage.
pub(crate) fn view<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let slice = storage.as_cuda_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The f32 elements of a contiguous tensor's storage, to update in place.
pub(crate) fn view_mut<'a>(
    storage: &'a mut CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaViewMut<'a, f32>> {
    let slice = storage.as_cuda_slice_mut::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice_mut(start..end)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The f32 elements of a tensor the op holds (rather than receives as an argument), which
/// must live on the GPU: `storage` is the tensor's `storage_and_layout()` guard.
pub(super) fn held_view<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let Storage::Cuda(storage) = storage else {
        candle_core::bail!("{what} is not on the GPU");
    };
    view(storage, layout, what)
}

/// Uninitialised output memory; every kernel here writes all of its output.
pub(super) fn output(device: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel launched next writes every element before anything reads them.
    unsafe { device.alloc::<f32>(len) }
}

pub(super) fn wrap(out: CudaSlice<f32>, device: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, device.clone())
}

/// Grid-stride element-wise kernels: enough blocks of 256 to fill the GPU, never more than
/// there are elements.
pub(crate) fn elementwise(elements: usize) -> LaunchConfig {
    let blocks = elements.div_ceil(256).clamp(1, 132 * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The reductions' grid: one block per (channel, chunk of the channel's `count` elements),
/// enough chunks for about four blocks per SM of an H100/H200 (132 SMs), but none shorter than
/// 4,096 elements.
pub(super) fn per_channel(channels: usize, count: usize) -> (LaunchConfig, u32) {
    let parts = 528usize
        .div_ceil(channels.max(1))
        .min(count.div_ceil(4096))
        .max(1);
    (
        LaunchConfig {
            grid_dim: (channels as u32, parts as u32, 1),
            block_dim: (REDUCTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        parts as u32,
    )
}

/// One thread per channel, for combining the chunks of a reduction.
pub(super) fn per_channel_combine(channels: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (channels.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Sizes as the 32-bit unsigned integers the kernels index with: a tensor of 2^32 elements
/// or more (16 GiB of f32) is refused rather than silently wrapped.
pub(crate) fn u32_of(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| candle_core::Error::Msg(format!("{what} {value} exceeds the kernels' 2^32")))
}
