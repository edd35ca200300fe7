//! `trainer bench`: training and evaluation images/s of the reference DNAs in `bench/dna`,
//! optionally beside PyTorch on the same device (`bench/torch_reference.py`), and per
//! operation with `--ops`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args as ClapArgs;
use population::dna::Dna;
use trainer::bench::{self, BenchConfig};
use trainer::layers::{CpuConvolution, Kernels};

use super::flags::{DeviceFlag, KernelFlags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Folder of reference DNAs (every *.json in it).
    #[arg(long, default_value = "bench/dna")]
    dnas: PathBuf,
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Timed training steps per model.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 250)]
    eval_batch: usize,
    /// Also time batch norm and each distinct convolution of the reference models, one by one.
    #[arg(long)]
    ops: bool,
    /// Run bench/torch_reference.py with this Python and print the ratios.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Extra arguments for the reference script (e.g. "--tf32").
    #[arg(long, allow_hyphen_values = true)]
    torch_args: Vec<String>,
    /// The default device is the CPU.
    #[command(flatten)]
    device: DeviceFlag,
    #[command(flatten)]
    kernels: KernelFlags,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
    /// Run Candle's composed operations instead of our convolution and batch-norm kernels,
    /// to measure what the kernels gain.
    #[arg(long)]
    composed: bool,
    /// TF32 matrix products (CUDA), as `spec.training.tf32` allows in training.
    #[arg(long)]
    tf32: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.device.open("cpu")?;
    if args.tf32 {
        if !device.is_cuda() {
            bail!("--tf32 needs a CUDA device");
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let dnas = reference_dnas(&args.dnas)?;
    let config = BenchConfig {
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        eval_batch: args.eval_batch,
    };
    let kernels = if args.composed {
        Kernels::COMPOSED
    } else {
        args.kernels.kernels()
    };
    let mut report = bench::run(&dnas, &config, &device, &kernels, args.ops)?;
    if args.composed {
        report.implementation.push_str(" (composed ops)");
    }
    if kernels.cpu_convolution == CpuConvolution::Im2col {
        report.implementation.push_str(" (im2col convolutions)");
    }
    if args.tf32 {
        report.implementation.push_str(" tf32");
    }
    let reference = match &args.torch {
        None => None,
        Some(python) => Some(torch_reference(&args, python, &device)?),
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "candle": report, "reference": reference })
        );
    } else {
        print!("{}", bench::render(&report, reference.as_ref()));
    }
    Ok(())
}

/// Every DNA in `dir`, smallest file first: the linear model, then the convolutional ones.
fn reference_dnas(dir: &Path) -> Result<Vec<(String, Dna)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the reference DNA folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            Ok((name, Dna::load(&path)?))
        })
        .collect()
}

/// The same figures from PyTorch eager on the same device, by `bench/torch_reference.py`.
fn torch_reference(args: &Args, python: &Path, device: &Device) -> Result<bench::Report> {
    let script = args.dnas.join("../torch_reference.py");
    let torch_device = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    };
    let output = Command::new(python)
        .arg(&script)
        .args(["--dnas", &args.dnas.to_string_lossy()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--eval-batch", &args.eval_batch.to_string()])
        .args(["--device", &torch_device])
        .args(&args.torch_args)
        .args(if args.ops {
            &["--ops", "--json"][..]
        } else {
            &["--json"][..]
        })
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(bench::parse_reference(&String::from_utf8_lossy(
        &output.stdout,
    ))?)
}
