//! Convolution for the GPU as im2col + one cuBLAS GEMM per pass, the three passes sharing one
//! column matrix:
//!
//! ```text
//! cols  = im2col(x)                 [K, N·P]       K = Cin·kh·kw, P = Hout·Wout
//! Y'    = W · cols                  [Cout, N·P]    then to NCHW, plus the bias
//! dW    = dY' · colsᵀ               [Cout, K]      dY' = dy as [Cout, N·P]
//! dx    = col2im(Wᵀ · dY')          [N, Cin, H, W]
//! db    = Σ dY' over its rows
//! ```
//!
//! Candle's CUDA backward computed the input gradient with a naive transposed-convolution
//! kernel (5–7 ms against cuDNN's 0.3–0.5 ms on an H200) and the weight gradient as a
//! convolution with the whole output gradient as its kernel. Here each gradient is a single
//! large GEMM. The columns of the forward pass are kept for the weight gradient instead of
//! being recomputed, and the input gradient of a tensor nothing needs (the images) is skipped.
//! Each op also runs on the CPU with the same index arithmetic, for the default tests.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use crate::layers::cpu::contiguous;
use crate::layers::cpu::conv::Geometry;

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    g: Geometry,
}

impl Dims {
    fn columns(&self) -> usize {
        self.n * self.oh * self.ow
    }

    fn taps(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// The input pixel tap (channel, ky, kx) of output column (sample, oy, ox) reads, if it
    /// is inside the image.
    fn source(&self, tap: usize, column: usize) -> Option<usize> {
        let (kx, ky, channel) = (
            tap % self.kw,
            (tap / self.kw) % self.kh,
            tap / (self.kh * self.kw),
        );
        let (ox, oy, sample) = (
            column % self.ow,
            (column / self.ow) % self.oh,
            column / (self.ow * self.oh),
        );
        let iy = (oy * self.g.stride + ky).checked_sub(self.g.pad_h)?;
        let ix = (ox * self.g.stride + kx).checked_sub(self.g.pad_w)?;
        (iy < self.h && ix < self.w)
            .then(|| ((sample * self.cin + channel) * self.h + iy) * self.w + ix)
    }

    #[cfg(feature = "cuda")]
    fn kernel_args(&self) -> Result<[i32; 11]> {
        use super::cuda::int;
        Ok([
            int(self.n, "batch")?,
            int(self.cin, "channels")?,
            int(self.h, "height")?,
            int(self.w, "width")?,
            int(self.kh, "filter height")?,
            int(self.kw, "filter width")?,
            int(self.oh, "output height")?,
            int(self.ow, "output width")?,
            int(self.g.stride, "stride")?,
            int(self.g.pad_h, "padding")?,
            int(self.g.pad_w, "padding")?,
        ])
    }
}

/// The columns of x [n, cin, h, w] for a (kh, kw) filter: [cin·kh·kw, n·oh·ow].
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
        let (taps, columns) = (d.taps(), d.columns());
        let mut cols = vec![0f32; taps * columns];
        for (tap, row) in cols.chunks_mut(columns).enumerate() {
            for (column, v) in row.iter_mut().enumerate() {
                if let Some(at) = d.source(tap, column) {
                    *v = x[at];
                }
            }
        }
        Ok((CpuStorage::F32(cols), Shape::from((taps, columns))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{elementwise, launch, output, view, wrap};
        let device = &storage.device;
        let x = view(storage, layout, "convolution input")?;
        let d = self.dims;
        let (taps, columns) = (d.taps(), d.columns());
        let out = output(device, taps * columns)?;
        let [n, ci, h, w, kh, kw, oh, ow, s, ph, pw] = d.kernel_args()?;
        launch!(
            device,
            "im2col",
            elementwise(taps * columns),
            &x,
            &out,
            &n,
            &ci,
            &h,
            &w,
            &kh,
            &kw,
            &oh,
            &ow,
            &s,
            &ph,
            &pw
        );
        Ok((wrap(out, device), Shape::from((taps, columns))))
    }
}

/// The adjoint of [`Im2Col`]: column gradients [cin·kh·kw, n·oh·ow] summed back into the
/// input's shape [n, cin, h, w].
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
        let columns = d.columns();
        let mut dx = vec![0f32; d.n * d.cin * d.h * d.w];
        for (tap, row) in dcols.chunks(columns).enumerate() {
            for (column, &v) in row.iter().enumerate() {
                if let Some(at) = d.source(tap, column) {
                    dx[at] += v;
                }
            }
        }
        Ok((CpuStorage::F32(dx), Shape::from((d.n, d.cin, d.h, d.w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{elementwise, launch, output, view, wrap};
        let device = &storage.device;
        let dcols = view(storage, layout, "column gradient")?;
        let d = self.dims;
        let elements = d.n * d.cin * d.h * d.w;
        let out = output(device, elements)?;
        let [n, ci, h, w, kh, kw, oh, ow, s, ph, pw] = d.kernel_args()?;
        launch!(
            device,
            "col2im",
            elementwise(elements),
            &dcols,
            &out,
            &n,
            &ci,
            &h,
            &w,
            &kh,
            &kw,
            &oh,
            &ow,
            &s,
            &ph,
            &pw
        );
        Ok((wrap(out, device), Shape::from((d.n, d.cin, d.h, d.w))))
    }
}

/// The convolution's output from (x, W, b): Y' (computed before, without gradient) moved to
/// NCHW plus the bias; its backward pass is the module's three GEMMs.
struct Convolution {
    dims: Dims,
    cout: usize,
    /// Y' [cout, n·oh·ow].
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
        let (n, cout, plane) = (self.dims.n, self.cout, self.dims.oh * self.dims.ow);
        let mut y = vec![0f32; n * cout * plane];
        for (i, v) in y.iter_mut().enumerate() {
            let (p, c, s) = (i % plane, (i / plane) % cout, i / (plane * cout));
            *v = product[(c * n + s) * plane + p] + bias[c];
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
        use super::cuda::{elementwise, int, launch, output, view, with_tensor, wrap};
        let device = &s1.device;
        let bias = view(s3, l3, "convolution bias")?;
        let elements = self.shape().elem_count();
        let out = output(device, elements)?;
        let (n, cout, plane) = (
            int(self.dims.n, "batch")?,
            int(self.cout, "channels")?,
            int(self.dims.oh * self.dims.ow, "plane")?,
        );
        with_tensor(&self.product, "convolution product", |product| {
            launch!(
                device,
                "rows_to_nchw",
                elementwise(elements),
                &product,
                &bias,
                &out,
                &n,
                &cout,
                &plane
            );
            Ok(())
        })?;
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
        // dY' [cout, n·oh·ow]: one copy, shared by all three gradients.
        let dyt = dy
            .transpose(0, 1)?
            .contiguous()?
            .reshape((self.cout, d.columns()))?;
        let dw = dyt.matmul(&self.cols.t()?)?.reshape(w.shape())?;
        let db = dyt.sum(1)?;
        let dx = if self.input_grad {
            let w2 = w.detach().reshape((self.cout, d.taps()))?;
            let dcols = w2.t()?.matmul(&dyt)?;
            Some(dcols.apply_op1_no_bwd(&Col2Im { dims: d })?)
        } else {
            None
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

impl Convolution {
    fn shape(&self) -> Shape {
        Shape::from((self.dims.n, self.cout, self.dims.oh, self.dims.ow))
    }
}

/// y = conv(x, weight) + bias with explicit zero padding per side; `input_grad` false when
/// nothing needs the gradient of `x`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: Geometry,
    input_grad: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (n, cin, h, w) = x.dims4()?;
    let (cout, kcin, kh, kw) = weight.dims4()?;
    if kcin != cin {
        candle_core::bail!("conv2d: input has {cin} channels, kernel expects {kcin}");
    }
    if h + 2 * g.pad_h < kh || w + 2 * g.pad_w < kw || g.stride == 0 {
        candle_core::bail!("conv2d: a {kh}x{kw} filter does not fit a padded {h}x{w} input");
    }
    let dims = Dims {
        n,
        cin,
        h,
        w,
        kh,
        kw,
        oh: (h + 2 * g.pad_h - kh) / g.stride + 1,
        ow: (w + 2 * g.pad_w - kw) / g.stride + 1,
        g,
    };
    let cols = x.apply_op1_no_bwd(&Im2Col { dims })?;
    let product = weight
        .detach()
        .reshape((cout, dims.taps()))?
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
