//! The CUDA path against Candle's composed operations, on fresh random inputs of varied
//! shapes: outputs, running statistics and gradients. The default tests run it on the CPU
//! (where the ops run their reference twins); `trainer check-ops --device cuda` runs it on a
//! GPU, where it checks the CUDA kernels themselves.

use candle_core::{Device, Result, Tensor, Var};
use serde::Serialize;

use crate::layers::{BatchNormRelu, Conv2d, Kernels, Path};
use crate::weights::Parameters;
use population::seed::{rng, Stream};

/// One quantity computed both ways: the largest difference, relative to the reference's
/// largest magnitude (at least 1).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub name: String,
    pub error: f32,
    pub tolerance: f32,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

const FORWARD_TOLERANCE: f32 = 1e-4;
const GRADIENT_TOLERANCE: f32 = 1e-3;

fn compare(name: String, ours: &Tensor, reference: &Tensor, tolerance: f32) -> Result<Comparison> {
    let reference = reference.flatten_all()?;
    let scale = reference.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    let difference = (ours.flatten_all()? - &reference)?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(Comparison {
        name,
        error: difference / scale,
        tolerance,
    })
}

/// Every check, on `device`, with the CUDA path's convolutions as `kernels` say (GEMMs or
/// cuDNN).
pub fn run(device: &Device, kernels: &Kernels) -> Result<Vec<Comparison>> {
    let ours = Kernels {
        path: Some(Path::Cuda),
        ..*kernels
    };
    let mut out = Vec::new();
    // (batch, in, height, width, out, filter, stride): odd sizes, strides that do not divide
    // the side, a 1x1 and a 9x9 filter (larger than the map, so narrowed to its centre),
    // unequal filter sides (unequal padding).
    let convolutions = [
        (2, 3, 8, 8, 4, (3, 3), 1),
        (3, 5, 7, 9, 6, (3, 5), 2),
        (2, 4, 5, 5, 3, (1, 1), 1),
        (2, 2, 6, 6, 3, (5, 5), 3),
        (1, 3, 4, 4, 2, (9, 9), 1),
        (4, 16, 16, 16, 32, (3, 3), 2),
    ];
    for (i, &(n, cin, h, w, cout, filter, stride)) in convolutions.iter().enumerate() {
        let seed = i as u64 + 1;
        let name = format!("conv {n}x{cin}x{h}x{w} -> {cout}, {filter:?} stride {stride}");
        let case = ConvolutionCase {
            input: (n, cin, h, w),
            cout,
            filter,
            stride,
        };
        out.extend(convolution(device, &ours, seed, name, case)?);
    }
    for (i, &(n, c, h, w)) in [(4, 3, 5, 5), (2, 8, 1, 1), (16, 16, 8, 8), (1, 2, 3, 7)]
        .iter()
        .enumerate()
    {
        let name = format!("batch norm {n}x{c}x{h}x{w}");
        out.extend(batch_norm(
            device,
            &ours,
            i as u64 + 11,
            name,
            (n, c, h, w),
        )?);
    }
    Ok(out)
}

/// One convolution to check: input [N, Cin, H, W], output channels, filter, stride.
struct ConvolutionCase {
    input: (usize, usize, usize, usize),
    cout: usize,
    filter: (usize, usize),
    stride: usize,
}

fn convolution(
    device: &Device,
    kernels: &Kernels,
    seed: u64,
    name: String,
    case: ConvolutionCase,
) -> Result<Vec<Comparison>> {
    let ConvolutionCase {
        input,
        cout,
        filter,
        stride,
    } = case;
    let mut r = rng(seed, Stream::Initialisation);
    let mut params = Parameters::new(None, &mut r, device);
    let conv = Conv2d::new(&mut params, "c", input.1, cout, filter, stride)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    // A non-zero bias, so that its gradient and addition are tested.
    conv.bias().set(&Tensor::randn(0f32, 1., cout, device)?)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., input, device)?)?;
    let ours = conv.forward(x.as_tensor(), kernels)?;
    let reference = conv.forward(x.as_tensor(), &Kernels::COMPOSED)?;
    let probe = Tensor::randn(0f32, 1., reference.shape(), device)?;
    let g_ours = (&ours * &probe)?.sum_all()?.backward()?;
    let g_ref = (&reference * &probe)?.sum_all()?.backward()?;
    let mut out = vec![compare(
        format!("{name}: output"),
        &ours,
        &reference,
        FORWARD_TOLERANCE,
    )?];
    for (what, tensor) in [
        ("input gradient", x.as_tensor()),
        ("weight gradient", conv.weight().as_tensor()),
        ("bias gradient", conv.bias().as_tensor()),
    ] {
        let (Some(a), Some(b)) = (g_ours.get(tensor), g_ref.get(tensor)) else {
            candle_core::bail!("{name}: no {what}");
        };
        out.push(compare(
            format!("{name}: {what}"),
            a,
            b,
            GRADIENT_TOLERANCE,
        )?);
    }
    // Without sample groups (one GEMM per pass), where the filter fits the image unnarrowed.
    let (kh, kw) = filter;
    if kh < 2 * input.2 && kw < 2 * input.3 {
        let geometry = crate::layers::Geometry {
            stride,
            pad_h: (kh - 1) / 2,
            pad_w: (kw - 1) / 2,
        };
        let y = super::conv::conv2d(
            x.as_tensor(),
            conv.weight().as_tensor(),
            conv.bias().as_tensor(),
            geometry,
            true,
            &Kernels {
                conv_groups: Some(1),
                ..*kernels
            },
        )?;
        out.push(compare(
            format!("{name}: output, one group"),
            &y,
            &reference,
            FORWARD_TOLERANCE,
        )?);
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        for (what, tensor) in [
            ("input gradient", x.as_tensor()),
            ("weight gradient", conv.weight().as_tensor()),
        ] {
            let (Some(a), Some(b)) = (grads.get(tensor), g_ref.get(tensor)) else {
                candle_core::bail!("{name}: no {what} with one group");
            };
            out.push(compare(
                format!("{name}: {what}, one group"),
                a,
                b,
                GRADIENT_TOLERANCE,
            )?);
        }
    }
    // The images of a first layer have no gradient: the path must skip it and still give
    // the weight gradient.
    let images = Tensor::randn(0f32, 1., input, device)?;
    let a = conv.forward(&images, kernels)?;
    let b = conv.forward(&images, &Kernels::COMPOSED)?;
    let ga = (&a * &probe)?.sum_all()?.backward()?;
    let gb = (&b * &probe)?.sum_all()?.backward()?;
    if ga.get(&images).is_some() {
        candle_core::bail!("{name}: an input gradient was computed for a tensor without one");
    }
    if let (Some(a), Some(b)) = (
        ga.get(conv.weight().as_tensor()),
        gb.get(conv.weight().as_tensor()),
    ) {
        out.push(compare(
            format!("{name}: weight gradient, first layer"),
            a,
            b,
            GRADIENT_TOLERANCE,
        )?);
    } else {
        candle_core::bail!("{name}: no weight gradient for a first layer");
    }
    Ok(out)
}

fn batch_norm(
    device: &Device,
    kernels: &Kernels,
    seed: u64,
    name: String,
    shape: (usize, usize, usize, usize),
) -> Result<Vec<Comparison>> {
    let c = shape.1;
    let gamma = Tensor::randn(1f32, 0.3, c, device)?;
    let beta = Tensor::randn(0f32, 0.3, c, device)?;
    let make = || -> Result<BatchNormRelu> {
        let mut r = rng(seed, Stream::Initialisation);
        let mut params = Parameters::new(None, &mut r, device);
        let bn = BatchNormRelu::new(&mut params, "bn", c)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        bn.gamma().set(&gamma)?;
        bn.beta().set(&beta)?;
        Ok(bn)
    };
    let (ours, reference) = (make()?, make()?);
    let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., shape, device)?)?;
    let probe = Tensor::randn(0f32, 1., shape, device)?;
    let a = ours.forward_t(x.as_tensor(), true, kernels)?;
    let b = reference.forward_t(x.as_tensor(), true, &Kernels::COMPOSED)?;
    let mut out = vec![compare(
        format!("{name}: training output"),
        &a,
        &b,
        FORWARD_TOLERANCE,
    )?];
    out.push(compare(
        format!("{name}: running mean"),
        ours.running_mean().as_tensor(),
        reference.running_mean().as_tensor(),
        FORWARD_TOLERANCE,
    )?);
    out.push(compare(
        format!("{name}: running variance"),
        ours.running_var().as_tensor(),
        reference.running_var().as_tensor(),
        FORWARD_TOLERANCE,
    )?);
    let ga = (&a * &probe)?.sum_all()?.backward()?;
    let gb = (&b * &probe)?.sum_all()?.backward()?;
    for (what, pa, pb) in [
        ("input gradient", x.as_tensor(), x.as_tensor()),
        (
            "gamma gradient",
            ours.gamma().as_tensor(),
            reference.gamma().as_tensor(),
        ),
        (
            "beta gradient",
            ours.beta().as_tensor(),
            reference.beta().as_tensor(),
        ),
    ] {
        let (Some(ta), Some(tb)) = (ga.get(pa), gb.get(pb)) else {
            candle_core::bail!("{name}: no {what}");
        };
        out.push(compare(
            format!("{name}: {what}"),
            ta,
            tb,
            GRADIENT_TOLERANCE,
        )?);
    }
    let a = ours.forward_t(x.as_tensor(), false, kernels)?;
    let b = reference.forward_t(x.as_tensor(), false, &Kernels::COMPOSED)?;
    out.push(compare(
        format!("{name}: evaluation output"),
        &a,
        &b,
        FORWARD_TOLERANCE,
    )?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The CUDA path's composition (with the ops' reference twins) against Candle's
    /// operations.
    #[test]
    fn cuda_path_matches_candle_on_cpu() {
        let results = super::run(&candle_core::Device::Cpu, &super::Kernels::default()).unwrap();
        assert!(results.len() > 40, "{}", results.len());
        let failed: Vec<_> = results.iter().filter(|c| !c.passed()).collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }
}
