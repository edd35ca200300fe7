//! Convolution for the GPU as im2col + cuBLAS GEMMs, the three passes sharing one column
//! matrix. The samples are split into G groups, and each pass is one batched GEMM over them:
//!
//! ```text
//! cols  = im2col(x)                 [G, K, N/G·P]     K = Cin·kh·kw, P = Hout·Wout
//! Y'    = W · cols                  [G, Cout, N/G·P]  then to NCHW, plus the bias
//! dW    = Σg dY'[g] · cols[g]ᵀ      [Cout, K]         dY' = dy in Y''s layout
//! dx    = col2im(Wᵀ · dY')          [N, Cin, H, W]
//! db    = Σ dY' over groups and columns
//! ```
//!
//! Without groups, the weight gradient is a single GEMM with a small output (Cout×K) and a huge
//! inner dimension (N·P), which cuBLAS runs on a few of the GPU's SMs; with G of them there
//! are G times as many output tiles, and the G partial sums are added by one more small GEMM.
//!
//! Candle's CUDA backward computed the input gradient with a naive transposed-convolution
//! kernel, many times slower than cuDNN, and the weight gradient as a convolution with the
//! whole output gradient as its kernel. Here each gradient is a single large GEMM (figures:
//! docs/PERFORMANCE.md, GPU kernels). The columns of the forward pass are kept for the weight
//! gradient instead of being recomputed, and the input gradient of a tensor nothing needs (the
//! images) is skipped.
//! Each op also runs on the CPU with the same index arithmetic, for the default tests.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use crate::layers::cpu::contiguous;
use crate::layers::{CudaConvolution, Geometry, Kernels};

/// The sizes of one convolution, as the kernels take them (`Conv` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: u32,
    cin: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    oh: u32,
    ow: u32,
    stride: u32,
    pad_h: u32,
    pad_w: u32,
    groups: u32,
}

// SAFETY: a plain `repr(C)` struct of u32, laid out as `struct Conv` in kernels.cu.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Dims {}

impl Dims {
    fn n(&self) -> usize {
        self.n as usize
    }

    fn groups(&self) -> usize {
        self.groups as usize
    }

    fn taps(&self) -> usize {
        (self.cin * self.kh * self.kw) as usize
    }

    /// Columns of one group: its samples' output pixels.
    fn group_columns(&self) -> usize {
        self.n() / self.groups() * (self.oh * self.ow) as usize
    }

    fn input_len(&self) -> usize {
        (self.n * self.cin * self.h * self.w) as usize
    }

    fn cols_len(&self) -> usize {
        self.groups() * self.taps() * self.group_columns()
    }

    /// The input element that element `i` of the column matrix reads, if it is inside the
    /// image (`conv_source` in kernels.cu).
    fn source(&self, i: usize) -> Option<usize> {
        let (taps, columns) = (self.taps(), self.group_columns());
        let group = i / (taps * columns);
        let rest = i - group * taps * columns;
        let tap = rest / columns;
        let column = group * columns + (rest - tap * columns);
        let (kw, kh, ow, oh) = (
            self.kw as usize,
            self.kh as usize,
            self.ow as usize,
            self.oh as usize,
        );
        let (kx, ky, channel) = (tap % kw, (tap / kw) % kh, tap / (kh * kw));
        let (ox, oy, sample) = (column % ow, (column / ow) % oh, column / (ow * oh));
        let iy = (oy * self.stride as usize + ky).checked_sub(self.pad_h as usize)?;
        let ix = (ox * self.stride as usize + kx).checked_sub(self.pad_w as usize)?;
        let (h, w) = (self.h as usize, self.w as usize);
        (iy < h && ix < w).then(|| ((sample * self.cin as usize + channel) * h + iy) * w + ix)
    }
}

/// The number of sample groups, a divisor of the batch: `forced` if the model's kernels say
/// so, else by shape. Grouping pays where the weight gradient's output is a few 64×64 tiles
/// (a first layer's Cout×K), which one GEMM would run on a few SMs, and costs where there
/// are many; so only outputs of fewer than 8 tiles are grouped, into about 256 tiles in all
/// (figures: docs/PERFORMANCE.md, GPU kernels).
fn groups_for(n: usize, cout: usize, taps: usize, forced: Option<usize>) -> usize {
    let tiles = cout.div_ceil(64) * taps.div_ceil(64);
    let target = match forced {
        Some(g) => g,
        None if tiles < 8 => 256 / tiles,
        None => 1,
    };
    (1..=n.min(target.max(1)))
        .rev()
        .find(|g| n.is_multiple_of(*g))
        .unwrap_or(1)
}

/// The columns of x [n, cin, h, w] for a (kh, kw) filter: [groups, cin·kh·kw, n/groups·oh·ow].
struct Im2Col {
    dims: Dims,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "cambrian-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "convolution input")?;
        let d = self.dims;
        let cols: Vec<f32> = (0..d.cols_len())
            .map(|i| d.source(i).map_or(0.0, |at| x[at]))
            .collect();
        Ok((CpuStorage::F32(cols), self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{elementwise, launch, output, u32_of, view, wrap};
        let device = &storage.device;
        let x = view(storage, layout, "convolution input")?;
        let d = self.dims;
        let len = u32_of(d.cols_len(), "column matrix")? as usize;
        let out = output(device, len)?;
        launch!(device, "im2col", elementwise(len), &x, &out, &d);
        Ok((wrap(out, device), self.shape()))
    }
}

impl Im2Col {
    fn shape(&self) -> Shape {
        let d = self.dims;
        Shape::from((d.groups(), d.taps(), d.group_columns()))
    }
}

/// The adjoint of [`Im2Col`]: column gradients (im2col's shape) summed back into the input's
/// shape [n, cin, h, w].
struct Col2Im {
    dims: Dims,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "cambrian-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dcols = contiguous(storage, layout, "column gradient")?;
        let d = self.dims;
        let mut dx = vec![0f32; d.input_len()];
        for (i, &v) in dcols.iter().enumerate() {
            if let Some(at) = d.source(i) {
                dx[at] += v;
            }
        }
        Ok((CpuStorage::F32(dx), self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{elementwise, launch, output, u32_of, view, wrap};
        let device = &storage.device;
        let dcols = view(storage, layout, "column gradient")?;
        let d = self.dims;
        let len = u32_of(d.input_len(), "convolution input")? as usize;
        let out = output(device, len)?;
        launch!(device, "col2im", elementwise(len), &dcols, &out, &d);
        Ok((wrap(out, device), self.shape()))
    }
}

impl Col2Im {
    fn shape(&self) -> Shape {
        let d = self.dims;
        Shape::from((d.n(), d.cin as usize, d.h as usize, d.w as usize))
    }
}

/// The convolution's output from (x, W, b): Y' (computed before, without gradient) moved to
/// NCHW plus the bias; its backward pass is the module's GEMMs.
struct Convolution {
    dims: Dims,
    cout: usize,
    /// Y' [groups, cout, n/groups·oh·ow].
    product: Tensor,
    /// im2col(x), for the weight gradient.
    cols: Tensor,
    input_grad: bool,
}

impl CustomOp3 for Convolution {
    fn name(&self) -> &'static str {
        "cambrian-conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = contiguous(s3, l3, "convolution bias")?;
        let product = self.product.flatten_all()?.to_vec1::<f32>()?;
        let d = self.dims;
        let (n, cout, plane) = (d.n(), self.cout, (d.oh * d.ow) as usize);
        let per_group = n / d.groups();
        let mut y = vec![0f32; n * cout * plane];
        // `rows_to_nchw` in kernels.cu.
        for (i, v) in y.iter_mut().enumerate() {
            let (p, c, s) = (i % plane, (i / plane) % cout, i / (plane * cout));
            let (group, local) = (s / per_group, s % per_group);
            *v = product[(group * cout + c) * per_group * plane + local * plane + p] + bias[c];
        }
        Ok((CpuStorage::F32(y), self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{elementwise, held_view, launch, output, u32_of, view, wrap};
        let device = &s1.device;
        let bias = view(s3, l3, "convolution bias")?;
        let elements = self.shape().elem_count();
        u32_of(elements, "convolution output")?;
        let out = output(device, elements)?;
        let d = self.dims;
        let (cout, plane) = (self.cout as u32, d.oh * d.ow);
        let (product, product_layout) = self.product.storage_and_layout();
        let product = held_view(&product, product_layout, "convolution product")?;
        launch!(
            device,
            "rows_to_nchw",
            elementwise(elements),
            &product,
            &bias,
            &out,
            &d.n,
            &cout,
            &plane,
            &d.groups
        );
        Ok((wrap(out, device), self.shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let (groups, cout, taps) = (d.groups(), self.cout, d.taps());
        // dY' in Y''s layout [groups, cout, n/groups·oh·ow]: one copy, shared by all three
        // gradients.
        let dyt = dy
            .reshape((groups, d.n() / groups, cout, (d.oh * d.ow) as usize))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((groups, cout, d.group_columns()))?;
        let partial = dyt.matmul(&self.cols.transpose(1, 2)?)?;
        let dw = if groups == 1 {
            partial
        } else {
            // Σ over groups as a GEMM: a reduction over the leading dimension would walk
            // memory with a stride of cout·K.
            Tensor::ones((1, groups), partial.dtype(), partial.device())?
                .matmul(&partial.reshape((groups, cout * taps))?)?
        };
        let dw = dw.reshape(w.shape())?;
        let db = dyt.sum(2)?.sum(0)?;
        let dx = if self.input_grad {
            let wt = w
                .detach()
                .reshape((1, cout, taps))?
                .transpose(1, 2)?
                .broadcast_as((groups, taps, cout))?;
            let dcols = wt.matmul(&dyt)?;
            Some(dcols.apply_op1_no_bwd(&Col2Im { dims: d })?)
        } else {
            None
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

impl Convolution {
    fn shape(&self) -> Shape {
        let d = self.dims;
        Shape::from((d.n(), self.cout, d.oh as usize, d.ow as usize))
    }
}

/// y = conv(x, weight) + bias with explicit zero padding per side; `input_grad` false when
/// nothing needs the gradient of `x`. `kernels` says whether a GPU runs it through cuDNN and
/// how many sample groups the GEMMs use; forced groups always take the GEMMs.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: Geometry,
    input_grad: bool,
    kernels: &Kernels,
) -> Result<Tensor> {
    let cudnn = kernels.cuda_convolution == CudaConvolution::Cudnn
        && kernels.conv_groups.is_none()
        && x.device().is_cuda();
    #[cfg(feature = "cudnn")]
    if cudnn {
        return super::cudnn::conv2d(x, weight, bias, g, input_grad);
    }
    #[cfg(not(feature = "cudnn"))]
    if cudnn {
        candle_core::bail!("cuDNN convolutions need a build with the cudnn feature");
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (n, cin, h, w) = x.dims4()?;
    let kernel = weight.dims4()?;
    let (cout, _, kh, kw) = kernel;
    let (oh, ow) = g.output_size((n, cin, h, w), kernel)?;
    let groups = groups_for(n, cout, cin * kh * kw, kernels.conv_groups);
    if groups == 0 || !n.is_multiple_of(groups) {
        candle_core::bail!("conv2d: {groups} groups do not divide a batch of {n}");
    }
    let small = |v: usize| {
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("conv2d: size {v} too large")))
    };
    let dims = Dims {
        n: small(n)?,
        cin: small(cin)?,
        h: small(h)?,
        w: small(w)?,
        kh: small(kh)?,
        kw: small(kw)?,
        oh: small(oh)?,
        ow: small(ow)?,
        stride: small(g.stride)?,
        pad_h: small(g.pad_h)?,
        pad_w: small(g.pad_w)?,
        groups: small(groups)?,
    };
    let cols = x.apply_op1_no_bwd(&Im2Col { dims })?;
    let product = weight
        .detach()
        .reshape((1, cout, dims.taps()))?
        .broadcast_as((groups, cout, dims.taps()))?
        .matmul(&cols)?;
    x.apply_op3(
        &weight,
        &bias.contiguous()?,
        Convolution {
            dims,
            cout,
            product,
            cols,
            input_grad,
        },
    )
}
