//! Batch norm fused with its ReLU for the GPU: four kernels instead of Candle's dozen
//! composed passes, each a full pass over the tensor (figures: docs/PERFORMANCE.md, GPU
//! kernels).
//!
//! Unlike the CPU op, which keeps the batch statistics on the host, everything stays on the
//! device so that a training step never waits for the GPU: the statistics are a tensor
//! ([`Statistics`]), the running averages are updated from it with tensor operations, and the
//! normalisation ([`TrainForward`]) holds the per-channel tensors it needs for its backward
//! pass. Each op also runs on the CPU, with the CPU kernels' arithmetic, so that the default
//! tests check how the layer composes them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::layers::cpu::{self, contiguous};

fn dims(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    Ok((n, c, h * w))
}

/// Mean (row 0) and biased variance (row 1) of every channel of x [n, c, h, w]: [2, c].
pub struct Statistics;

impl CustomOp1 for Statistics {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-statistics"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, "batch norm input")?;
        let (n, c, plane) = dims(layout)?;
        let (mut mean, var) = cpu::batch_norm::statistics(x, n, c, plane);
        mean.extend(var);
        Ok((CpuStorage::F32(mean), Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{launch, output, per_channel, per_channel_combine, u32_of, view, wrap};
        let device = &storage.device;
        let x = view(storage, layout, "batch norm input")?;
        let (n, c, plane) = dims(layout)?;
        u32_of(n * c * plane, "batch norm elements")?;
        let (grid, parts) = per_channel(c, n * plane);
        let partial = output(device, 3 * c * parts as usize)?;
        let out = output(device, 2 * c)?;
        let (n_, c_, plane_) = (n as u32, c as u32, plane as u32);
        launch!(
            device,
            "bn_stats_partial",
            grid,
            &x,
            &partial,
            &n_,
            &c_,
            &plane_,
            &parts
        );
        launch!(
            device,
            "bn_stats_combine",
            per_channel_combine(c),
            &partial,
            &out,
            &c_,
            &parts
        );
        Ok((wrap(out, device), Shape::from((2, c))))
    }
}

/// Training forward, relu(x·scale + shift), with `scale` = gamma / σ and `shift` = beta −
/// mean·scale computed (without gradient) from the batch statistics. The arguments are
/// (x, gamma, beta) so that the backward pass reaches all three.
pub struct TrainForward {
    pub scale: Tensor,
    pub shift: Tensor,
    pub mean: Tensor,
    pub inv_std: Tensor,
}

impl CustomOp3 for TrainForward {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "batch norm input")?;
        let (_, c, plane) = dims(l1)?;
        let (scale, shift) = (self.scale.to_vec1::<f32>()?, self.shift.to_vec1::<f32>()?);
        let y = cpu::batch_norm::scale_shift_relu(x, c, plane, &scale, &shift);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::held_view;
        let (scale, scale_layout) = self.scale.storage_and_layout();
        let (shift, shift_layout) = self.shift.storage_and_layout();
        scale_shift_relu_cuda(
            s1,
            l1,
            &held_view(&scale, scale_layout, "batch norm scale")?,
            &held_view(&shift, shift_layout, "batch norm shift")?,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let elements = n * c * h * w;
        let packed = x.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &Backward {
                mean: self.mean.clone(),
                inv_std: self.inv_std.clone(),
                gamma: gamma.detach(),
                scale: self.scale.clone(),
                shift: self.shift.clone(),
            },
        )?;
        let dx = packed.narrow(0, 0, elements)?.reshape((n, c, h, w))?;
        let dgamma = packed.narrow(0, elements, c)?;
        let dbeta = packed.narrow(0, elements + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

#[cfg(feature = "cuda")]
fn scale_shift_relu_cuda(
    storage: &candle_core::CudaStorage,
    layout: &Layout,
    scale: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
    shift: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
) -> Result<(candle_core::CudaStorage, Shape)> {
    use super::launch::{elementwise, launch, output, u32_of, view, wrap};
    let device = &storage.device;
    let x = view(storage, layout, "batch norm input")?;
    let (_, c, plane) = dims(layout)?;
    let elements = layout.shape().elem_count();
    let out = output(device, elements)?;
    let (elements_, c_, plane_) = (
        u32_of(elements, "batch norm elements")?,
        c as u32,
        plane as u32,
    );
    launch!(
        device,
        "scale_shift_relu",
        elementwise(elements),
        &x,
        scale,
        shift,
        &out,
        &elements_,
        &c_,
        &plane_
    );
    Ok((wrap(out, device), layout.shape().clone()))
}

/// The backward pass, from (x, y, dy): dx, dgamma and dbeta packed into one vector, as the
/// CPU op packs them.
struct Backward {
    mean: Tensor,
    inv_std: Tensor,
    gamma: Tensor,
    /// The forward pass's map, which the CPU backward pass takes its ReLU mask from.
    scale: Tensor,
    shift: Tensor,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        // y: the CPU pass finds the ReLU's mask from x and the map instead.
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::batch_norm::Backward::new(
            self.mean.to_vec1()?,
            self.inv_std.to_vec1()?,
            self.gamma.to_vec1()?,
            self.scale.to_vec1()?,
            self.shift.to_vec1()?,
        )
        .cpu_fwd(s1, l1, s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{
            elementwise, held_view, launch, output, per_channel, per_channel_combine, u32_of, view,
            wrap,
        };
        let device = &s1.device;
        let x = view(s1, l1, "batch norm input")?;
        let y = view(s2, l2, "batch norm output")?;
        let dy = view(s3, l3, "batch norm output gradient")?;
        let (n, c, plane) = dims(l1)?;
        let elements = n * c * plane;
        let elements_ = u32_of(elements + 2 * c, "batch norm elements")? - 2 * c as u32;
        let (grid, parts) = per_channel(c, n * plane);
        let partial = output(device, 2 * c * parts as usize)?;
        let out = output(device, elements + 2 * c)?;
        let (n_, c_, plane_) = (n as u32, c as u32, plane as u32);
        let (mean, mean_layout) = self.mean.storage_and_layout();
        let (inv_std, inv_std_layout) = self.inv_std.storage_and_layout();
        let (gamma, gamma_layout) = self.gamma.storage_and_layout();
        let mean = held_view(&mean, mean_layout, "batch mean")?;
        let inv_std = held_view(&inv_std, inv_std_layout, "batch inverse deviation")?;
        let gamma = held_view(&gamma, gamma_layout, "batch norm gamma")?;
        launch!(
            device,
            "bn_backward_partial",
            grid,
            &x,
            &y,
            &dy,
            &mean,
            &partial,
            &n_,
            &c_,
            &plane_,
            &parts
        );
        launch!(
            device,
            "bn_backward_combine",
            per_channel_combine(c),
            &partial,
            &inv_std,
            &out,
            &elements_,
            &c_,
            &parts
        );
        launch!(
            device,
            "bn_backward_dx",
            elementwise(elements),
            &x,
            &y,
            &dy,
            &mean,
            &inv_std,
            &gamma,
            &out,
            &n_,
            &c_,
            &plane_
        );
        Ok((wrap(out, device), Shape::from(elements + 2 * c)))
    }
}

/// Evaluation: relu(x·scale + shift) with the running statistics folded into the arguments
/// `scale` and `shift`; never differentiated.
pub struct Eval;

impl CustomOp3 for Eval {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu-eval-gpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::batch_norm::BatchNormReluEval.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::view;
        let scale = view(s2, l2, "batch norm scale")?;
        let shift = view(s3, l3, "batch norm shift")?;
        scale_shift_relu_cuda(s1, l1, &scale, &shift)
    }
}
