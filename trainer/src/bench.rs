//! Training and evaluation speed of reference DNAs, and of the operations that dominate it,
//! measured the same way as `bench/torch_reference.py` measures PyTorch, so that one command
//! gives comparable figures on one machine.
//!
//! Inputs are random CIFAR-shaped tensors already on the device: this measures the model, not
//! the data pipeline.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use crate::layers::{BatchNormRelu, Conv2d, Kernels};
use crate::model::{Model, ModelError};
use crate::optim::{Sgd, SgdConfig};
use crate::weights::{Parameters, WeightsError};
use population::dna::ModelSpec;
use population::dna::{Dna, Shape3};
use population::seed::{rng, Stream};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("reading the reference figures: {0}")]
    Reference(#[from] serde_json::Error),
    #[error("starting the training threads: {0}")]
    Threads(#[from] rayon::ThreadPoolBuildError),
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct BenchConfig {
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub eval_batch: usize,
}

/// Figures for one model; times are milliseconds per training step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelFigures {
    pub name: String,
    pub parameters: usize,
    pub train_images_per_s: f64,
    pub eval_images_per_s: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

/// Milliseconds of one operation at the benchmark's batch size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpFigures {
    pub name: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub implementation: String,
    pub device: String,
    pub config: BenchConfig,
    pub models: Vec<ModelFigures>,
    pub ops: Vec<OpFigures>,
}

fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

fn random_batch(
    batch: usize,
    classes: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let images = Tensor::randn(0f32, 1., (batch, 3, 32, 32), device)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i * 7 % classes) as u32).collect();
    Ok((images, Tensor::from_vec(labels, batch, device)?))
}

pub fn bench_model(
    name: &str,
    dna: &Dna,
    config: &BenchConfig,
    device: &Device,
    kernels: &Kernels,
) -> Result<ModelFigures, BenchError> {
    // On the threads a worker's training gets (all of them: one training at a time here).
    crate::threads::run_on_cpu_pool(device, crate::threads::cpu_share(1), || {
        bench_model_here(name, dna, config, device, kernels)
    })?
}

fn bench_model_here(
    name: &str,
    dna: &Dna,
    config: &BenchConfig,
    device: &Device,
    kernels: &Kernels,
) -> Result<ModelFigures, BenchError> {
    let spec = ModelSpec::cifar(10);
    let model = Model::fresh(dna, spec, 0, device)?.with_kernels(*kernels);
    let sgd_config = SgdConfig {
        kernels: *kernels,
        ..SgdConfig::paper(1e-3)
    };
    let mut sgd = Sgd::new(model.trainable().to_vec(), sgd_config)?;
    let (images, labels) = random_batch(config.batch, spec.classes, device)?;
    let (mut forward, mut backward, mut optimizer) = (0.0, 0.0, 0.0);
    for step in 0..config.warmup + config.steps {
        let t0 = Instant::now();
        let logits = model.forward_t(&images, true)?;
        let loss = crate::layers::cross_entropy(&logits, &labels, kernels)?;
        sync(device)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        sync(device)?;
        let t2 = Instant::now();
        sgd.step(&grads)?;
        sync(device)?;
        let t3 = Instant::now();
        if step >= config.warmup {
            forward += (t1 - t0).as_secs_f64();
            backward += (t2 - t1).as_secs_f64();
            optimizer += (t3 - t2).as_secs_f64();
        }
    }
    let steps = config.steps as f64;
    let train_seconds = forward + backward + optimizer;

    let (eval_images, _) = random_batch(config.eval_batch, spec.classes, device)?;
    let eval_rounds = config.steps.div_ceil(4).max(2);
    model.forward_t(&eval_images, false)?;
    sync(device)?;
    let t = Instant::now();
    for _ in 0..eval_rounds {
        model.forward_t(&eval_images, false)?;
    }
    sync(device)?;
    let eval_seconds = t.elapsed().as_secs_f64();

    Ok(ModelFigures {
        name: name.to_string(),
        parameters: model.parameter_count(),
        train_images_per_s: steps * config.batch as f64 / train_seconds,
        eval_images_per_s: (eval_rounds * config.eval_batch) as f64 / eval_seconds,
        forward_ms: 1e3 * forward / steps,
        backward_ms: 1e3 * backward / steps,
        optimizer_ms: 1e3 * optimizer / steps,
    })
}

/// Times `forward` and the backward pass of its output (gradient of ones), averaged.
fn time_op(
    name: String,
    config: &BenchConfig,
    device: &Device,
    forward: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<OpFigures> {
    let (mut f, mut b) = (0.0, 0.0);
    for round in 0..config.warmup + config.steps {
        let t0 = Instant::now();
        let y = forward()?;
        sync(device)?;
        let t1 = Instant::now();
        y.backward()?;
        sync(device)?;
        if round >= config.warmup {
            f += (t1 - t0).as_secs_f64();
            b += t1.elapsed().as_secs_f64();
        }
    }
    Ok(OpFigures {
        name,
        forward_ms: 1e3 * f / config.steps as f64,
        backward_ms: 1e3 * b / config.steps as f64,
    })
}

/// Cin, Cout, side, filter (height, width), log2 stride.
pub type OpConvolution = (usize, usize, usize, (usize, usize), u32);

/// Every distinct convolution of the reference models (`bench/dna`: conv3's three, then the
/// skip model's), and batch norm at conv3's three sizes, one by one through the project's own
/// layer types: batch norm in training mode, and each convolution with input and weight
/// gradients. `bench/torch_reference.py --ops` times the same list.
pub const OP_CONVOLUTIONS: [OpConvolution; 8] = [
    (3, 64, 32, (3, 3), 0),
    (64, 128, 32, (3, 3), 1),
    (128, 256, 16, (3, 3), 1),
    (32, 32, 32, (3, 3), 0),
    (32, 64, 32, (3, 3), 1),
    (64, 64, 16, (3, 5), 0),
    (64, 64, 16, (3, 3), 0),
    (64, 128, 16, (3, 3), 1),
];

pub fn bench_ops(
    config: &BenchConfig,
    device: &Device,
    kernels: &Kernels,
) -> Result<Vec<OpFigures>, BenchError> {
    let mut out = Vec::new();
    let mut r = rng(0, Stream::Initialisation);
    let mut params = Parameters::new(None, &mut r, device);
    let b = config.batch;
    let input = |shape: Shape3| -> candle_core::Result<candle_core::Var> {
        candle_core::Var::from_tensor(&Tensor::randn(
            0f32,
            1.,
            (b, shape.channels, shape.height, shape.width),
            device,
        )?)
    };
    let shape = |c, s| Shape3 {
        channels: c,
        height: s,
        width: s,
    };
    for (index, (cin, cout, side, (kh, kw), log2_stride)) in OP_CONVOLUTIONS.into_iter().enumerate()
    {
        let conv = Conv2d::new(
            &mut params,
            &format!("c{index}"),
            cin,
            cout,
            (kh, kw),
            1 << log2_stride,
        )?;
        let x = input(shape(cin, side))?;
        out.push(time_op(
            format!(
                "conv{kh}x{kw} {cin}->{cout} stride {} [{b},{cin},{side},{side}]",
                1 << log2_stride
            ),
            config,
            device,
            || conv.forward(x.as_tensor(), kernels),
        )?);
    }
    for (channels, side) in [(64, 32), (128, 16), (256, 8)] {
        let bn = BatchNormRelu::new(&mut params, &format!("bn{channels}"), channels)?;
        let x = input(shape(channels, side))?;
        out.push(time_op(
            format!("batch norm train [{b},{channels},{side},{side}]"),
            config,
            device,
            || bn.forward_t(x.as_tensor(), true, kernels),
        )?);
    }
    Ok(out)
}

pub fn run(
    dnas: &[(String, Dna)],
    config: &BenchConfig,
    device: &Device,
    kernels: &Kernels,
    ops: bool,
) -> Result<Report, BenchError> {
    let mut models = Vec::new();
    for (name, dna) in dnas {
        tracing::info!(model = %name, "benchmarking");
        models.push(bench_model(name, dna, config, device, kernels)?);
    }
    let ops = if ops {
        bench_ops(config, device, kernels)?
    } else {
        Vec::new()
    };
    Ok(Report {
        implementation: "candle".into(),
        device: format!("{device:?}"),
        config: *config,
        models,
        ops,
    })
}

/// The report as a table, with ratios against `reference` where given.
pub fn render(report: &Report, reference: Option<&Report>) -> String {
    let mut out = format!(
        "{} on {} (batch {}, {} timed steps after {} warm-up)\n",
        report.implementation,
        report.device,
        report.config.batch,
        report.config.steps,
        report.config.warmup
    );
    out.push_str(&format!(
        "{:<8} {:>10} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "model", "params", "train img/s", "eval img/s", "fwd ms", "bwd ms", "opt ms"
    ));
    if let Some(r) = reference {
        out.push_str(&format!(
            "  | {:>11} {:>11} {:>7} {:>7}",
            format!("{} train", short(&r.implementation)),
            "eval",
            "train×",
            "eval×"
        ));
    }
    out.push('\n');
    for m in &report.models {
        out.push_str(&format!(
            "{:<8} {:>10} {:>11.0} {:>11.0} {:>9.2} {:>9.2} {:>9.2}",
            m.name,
            m.parameters,
            m.train_images_per_s,
            m.eval_images_per_s,
            m.forward_ms,
            m.backward_ms,
            m.optimizer_ms
        ));
        if let Some(p) = reference.and_then(|r| r.models.iter().find(|p| p.name == m.name)) {
            out.push_str(&format!(
                "  | {:>11.0} {:>11.0} {:>7.3} {:>7.3}",
                p.train_images_per_s,
                p.eval_images_per_s,
                m.train_images_per_s / p.train_images_per_s,
                m.eval_images_per_s / p.eval_images_per_s
            ));
        }
        out.push('\n');
    }
    if !report.ops.is_empty() {
        out.push_str(&format!(
            "\n{:<44} {:>9} {:>9}",
            "operation", "fwd ms", "bwd ms"
        ));
        if reference.is_some() {
            out.push_str(&format!(
                "  | {:>9} {:>9} {:>7} {:>7}",
                "ref fwd", "ref bwd", "fwd×", "bwd×"
            ));
        }
        out.push('\n');
        for op in &report.ops {
            out.push_str(&format!(
                "{:<44} {:>9.2} {:>9.2}",
                op.name, op.forward_ms, op.backward_ms
            ));
            if let Some(p) = reference.and_then(|r| r.ops.iter().find(|p| p.name == op.name)) {
                out.push_str(&format!(
                    "  | {:>9.2} {:>9.2} {:>7.3} {:>7.3}",
                    p.forward_ms,
                    p.backward_ms,
                    p.forward_ms / op.forward_ms,
                    p.backward_ms / op.backward_ms
                ));
            }
            out.push('\n');
        }
        if reference.is_some() {
            out.push_str("(× = reference time / candle time: above 1.0 means candle is faster)\n");
        }
    }
    out
}

fn short(implementation: &str) -> &str {
    implementation
        .split_whitespace()
        .next()
        .unwrap_or(implementation)
}

/// Parses the reference script's JSON output.
pub fn parse_reference(json: &str) -> Result<Report, BenchError> {
    Ok(serde_json::from_str(json)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn reference_dnas_are_valid_and_build() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/dna");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let dna = Dna::load(&path).unwrap();
            let model = Model::fresh(&dna, ModelSpec::cifar(10), 0, &Device::Cpu).unwrap();
            let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(model.forward_t(&x, true).unwrap().dims(), &[2, 10]);
            names.push(path.file_stem().unwrap().to_string_lossy().to_string());
        }
        names.sort();
        assert_eq!(names, vec!["conv3", "linear", "skip"]);
    }

    #[test]
    fn one_tiny_bench_runs_and_renders_ratios() {
        let config = BenchConfig {
            batch: 2,
            steps: 1,
            warmup: 0,
            eval_batch: 2,
        };
        let report = run(
            &[("linear".into(), Dna::initial())],
            &config,
            &Device::Cpu,
            &Kernels::default(),
            false,
        )
        .unwrap();
        assert!(report.models[0].train_images_per_s > 0.0);
        let json = serde_json::to_string(&report).unwrap();
        let reference = parse_reference(&json).unwrap();
        let table = render(&report, Some(&reference));
        assert!(table.contains("1.000"), "{table}");
    }
}
