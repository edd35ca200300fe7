//! Convolution through cuDNN (the `cudnn` feature): forward, input gradient and weight
//! gradient, each with the algorithm that measured fastest for its shape, measured once per
//! shape and process and cached, the way PyTorch's `cudnn.benchmark` does. Candle's own cuDNN
//! support covers only the forward pass, with cuDNN's heuristic choice.
//!
//! The math type is FMA (true float32) unless TF32 matrix products are on
//! (`spec.training.tf32`): cuDNN's default would use TF32 on Hopper without asking.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::launch::{elementwise, launch, output, u32_of, view, wrap};
use crate::layers::Geometry;

/// Workspaces larger than this are not tried (PyTorch's default cap is similar in spirit).
const MAX_WORKSPACE: usize = 1 << 30;

/// The sizes of one convolution, and whether TF32 is allowed: the key of the algorithm cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    x: [i32; 4],
    w: [i32; 4],
    y: [i32; 4],
    pad: [i32; 2],
    stride: i32,
    tf32: bool,
}

thread_local! {
    // cuDNN handles are neither Send nor Sync: one per thread and device, as Candle keeps them.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static FORWARD: RefCell<HashMap<Key, sys::cudnnConvolutionFwdAlgo_t>> = RefCell::new(HashMap::new());
    static DATA: RefCell<HashMap<Key, sys::cudnnConvolutionBwdDataAlgo_t>> = RefCell::new(HashMap::new());
    static FILTER: RefCell<HashMap<Key, sys::cudnnConvolutionBwdFilterAlgo_t>> = RefCell::new(HashMap::new());
    // Made once per shape: creating them on every call cost host time a batch-50 step could
    // not hide.
    static DESCRIPTORS: RefCell<HashMap<(DeviceId, Key), Rc<Descriptors>>> = RefCell::new(HashMap::new());
}

fn handle(device: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&device.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(device.cuda_stream())?;
        h.borrow_mut().insert(device.id(), c.clone());
        Ok(c)
    })
}

struct Descriptors {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
}

/// The descriptors of one convolution shape on one device, made on first use.
fn descriptors(device: &CudaDevice, key: &Key) -> Result<Rc<Descriptors>> {
    let at = (device.id(), *key);
    if let Some(d) = DESCRIPTORS.with(|c| c.borrow().get(&at).cloned()) {
        return Ok(d);
    }
    let d = Rc::new(make_descriptors(&handle(device)?, key)?);
    DESCRIPTORS.with(|c| c.borrow_mut().insert(at, d.clone()));
    Ok(d)
}

fn make_descriptors(cudnn: &Arc<Cudnn>, key: &Key) -> Result<Descriptors> {
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let mut conv = cudnn.create_conv2d::<f32>(
        key.pad,
        [key.stride, key.stride],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_math_type(if key.tf32 {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    })?;
    Ok(Descriptors {
        conv,
        x: cudnn.create_4d_tensor::<f32>(nchw, key.x)?,
        w: cudnn.create_4d_filter::<f32>(nchw, key.w)?,
        y: cudnn.create_4d_tensor::<f32>(nchw, key.y)?,
    })
}

fn workspace(device: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes > MAX_WORKSPACE {
        candle_core::bail!("a cuDNN workspace of {bytes} bytes is over the cap");
    }
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN uses the workspace as scratch memory; nothing reads it before writing.
    Ok(Some(unsafe { device.alloc::<u8>(bytes) }?))
}

/// Runs `run` with each candidate algorithm (twice: the first run pays any lazy set-up) and
/// returns the fastest; candidates that fail or need too much workspace are skipped.
fn fastest<A: Copy + std::fmt::Debug>(
    device: &CudaDevice,
    candidates: &[A],
    mut run: impl FnMut(A) -> Result<()>,
) -> Result<A> {
    let mut best: Option<(Duration, A)> = None;
    for &algo in candidates {
        if run(algo).is_err() {
            continue;
        }
        device.synchronize()?;
        let started = Instant::now();
        if run(algo).is_err() {
            continue;
        }
        device.synchronize()?;
        let took = started.elapsed();
        tracing::debug!(?algo, ?took, "cuDNN algorithm measured");
        if best.is_none_or(|(t, _)| took < t) {
            best = Some((took, algo));
        }
    }
    match best {
        Some((_, algo)) => Ok(algo),
        None => candle_core::bail!("no cuDNN algorithm ran for this convolution"),
    }
}

/// The algorithm `cache` holds for `key`, or the fastest candidate, measured now and cached.
fn cached<A: Copy + std::fmt::Debug + 'static>(
    cache: &'static LocalKey<RefCell<HashMap<Key, A>>>,
    key: Key,
    device: &CudaDevice,
    candidates: &[A],
    run: impl FnMut(A) -> Result<()>,
) -> Result<A> {
    if let Some(algo) = cache.with(|c| c.borrow().get(&key).copied()) {
        return Ok(algo);
    }
    let algo = fastest(device, candidates, run)?;
    cache.with(|c| c.borrow_mut().insert(key, algo));
    Ok(algo)
}

fn key(dims: &ConvDims, tf32: bool) -> Result<Key> {
    let i = |v: usize| {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("conv2d: size {v} too large")))
    };
    let (n, cin, h, w) = dims.x;
    let (cout, _, kh, kw) = dims.w;
    let (oh, ow) = dims.out()?;
    Ok(Key {
        x: [i(n)?, i(cin)?, i(h)?, i(w)?],
        w: [i(cout)?, i(cin)?, i(kh)?, i(kw)?],
        y: [i(n)?, i(cout)?, i(oh)?, i(ow)?],
        pad: [i(dims.g.pad_h)?, i(dims.g.pad_w)?],
        stride: i(dims.g.stride)?,
        tf32,
    })
}

#[derive(Clone, Copy, Debug)]
struct ConvDims {
    x: (usize, usize, usize, usize),
    w: (usize, usize, usize, usize),
    g: Geometry,
}

impl ConvDims {
    fn out(&self) -> Result<(usize, usize)> {
        self.g.output_size(self.x, self.w)
    }

    fn y_shape(&self) -> Result<Shape> {
        let (oh, ow) = self.out()?;
        Ok(Shape::from((self.x.0, self.w.0, oh, ow)))
    }
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs only on CUDA")
}

/// y = conv(x, W) + b; arguments (x, W, b).
struct Forward {
    dims: ConvDims,
    tf32: bool,
    input_grad: bool,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "cambrian-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = &s1.device;
        let x = view(s1, l1, "convolution input")?;
        let w = view(s2, l2, "convolution weight")?;
        let bias = view(s3, l3, "convolution bias")?;
        let shape = self.dims.y_shape()?;
        let elements = u32_of(shape.elem_count(), "convolution output")?;
        let mut y = output(device, elements as usize)?;
        let key = key(&self.dims, self.tf32)?;
        let d = descriptors(device, &key)?;
        let op = ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        };
        let mut run = |algo| -> Result<()> {
            let mut ws = workspace(device, op.get_workspace_size(algo)?)?;
            // SAFETY: the descriptors describe x, w and y, contiguous f32 NCHW.
            unsafe { op.launch(algo, ws.as_mut(), (1.0, 0.0), &x, &w, &mut y) }?;
            Ok(())
        };
        use sys::cudnnConvolutionFwdAlgo_t as A;
        let algo = cached(
            &FORWARD,
            key,
            device,
            &[
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            ],
            &mut run,
        )?;
        run(algo)?;
        let (c, plane) = (
            shape.dims()[1] as u32,
            (shape.dims()[2] * shape.dims()[3]) as u32,
        );
        launch!(
            device,
            "add_channel_bias",
            elementwise(elements as usize),
            &mut y,
            &bias,
            &elements,
            &c,
            &plane
        );
        Ok((wrap(y, device), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if self.input_grad {
            Some(dy.apply_op2_no_bwd(
                w,
                &InputGradient {
                    dims: self.dims,
                    tf32: self.tf32,
                },
            )?)
        } else {
            None
        };
        let dw = x.apply_op2_no_bwd(
            &dy,
            &WeightGradient {
                dims: self.dims,
                tf32: self.tf32,
            },
        )?;
        let (n, cout, oh, ow) = dy.dims4()?;
        let db = dy.reshape((n, cout, oh * ow))?.sum(2)?.sum(0)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// dx from (dy, W).
struct InputGradient {
    dims: ConvDims,
    tf32: bool,
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "cambrian-cudnn-conv2d-input-gradient"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = &s1.device;
        let dy = view(s1, l1, "convolution output gradient")?;
        let w = view(s2, l2, "convolution weight")?;
        let shape = Shape::from(self.dims.x);
        let mut dx = output(
            device,
            u32_of(shape.elem_count(), "convolution input")? as usize,
        )?;
        let key = key(&self.dims, self.tf32)?;
        let d = descriptors(device, &key)?;
        let op = ConvBackwardData {
            conv: &d.conv,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        };
        let mut run = |algo| -> Result<()> {
            let mut ws = workspace(device, op.get_workspace_size(algo)?)?;
            // SAFETY: the descriptors describe dx, w and dy, contiguous f32 NCHW.
            unsafe { op.launch(algo, ws.as_mut(), (1.0, 0.0), &mut dx, &w, &dy) }?;
            Ok(())
        };
        use sys::cudnnConvolutionBwdDataAlgo_t as A;
        let algo = cached(
            &DATA,
            key,
            device,
            &[
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            ],
            &mut run,
        )?;
        run(algo)?;
        Ok((wrap(dx, device), shape))
    }
}

/// dW from (x, dy).
struct WeightGradient {
    dims: ConvDims,
    tf32: bool,
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "cambrian-cudnn-conv2d-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = &s1.device;
        let x = view(s1, l1, "convolution input")?;
        let dy = view(s2, l2, "convolution output gradient")?;
        let shape = Shape::from(self.dims.w);
        let mut dw = output(
            device,
            u32_of(shape.elem_count(), "convolution weight")? as usize,
        )?;
        let key = key(&self.dims, self.tf32)?;
        let d = descriptors(device, &key)?;
        let op = ConvBackwardFilter {
            conv: &d.conv,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        };
        let mut run = |algo| -> Result<()> {
            let mut ws = workspace(device, op.get_workspace_size(algo)?)?;
            // SAFETY: the descriptors describe x, dw and dy, contiguous f32 NCHW.
            unsafe { op.launch(algo, ws.as_mut(), (1.0, 0.0), &x, &mut dw, &dy) }?;
            Ok(())
        };
        use sys::cudnnConvolutionBwdFilterAlgo_t as A;
        let algo = cached(
            &FILTER,
            key,
            device,
            &[
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            ],
            &mut run,
        )?;
        run(algo)?;
        Ok((wrap(dw, device), shape))
    }
}

/// y = conv(x, weight) + bias through cuDNN; the arguments are as `cuda::conv::conv2d`'s.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: Geometry,
    input_grad: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let dims = ConvDims {
        x: x.dims4()?,
        w: weight.dims4()?,
        g,
    };
    x.apply_op3(
        &weight,
        &bias.contiguous()?,
        Forward {
            dims,
            tf32: candle_core::cuda::gemm_reduced_precision_f32(),
            input_grad,
        },
    )
}
