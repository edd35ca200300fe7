//! `trainer train DNA.json`: one individual by hand. Trains a DNA on CIFAR and reports its
//! validation accuracy, FLOPs (§3.5) and wall time, and saves its weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use crds::Dataset;
use population::cost::Flops;
use population::dna::{Dna, ModelSpec};
use population::seed::{self, Stream};
use trainer::data::Split;
use trainer::model::Model;
use trainer::train::{self, TrainConfig};
use trainer::weights::Weights;

use super::flags::{DataFlag, DeviceFlag, KernelFlags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The DNA to train (JSON, as written by `mutate` or kept in bench/dna).
    dna: PathBuf,
    /// The data folder is needed here.
    #[command(flatten)]
    data: DataFlag,
    #[arg(long, default_value = "cifar10")]
    dataset: Dataset,
    /// Training steps (the paper's T).
    #[arg(long, default_value_t = 25_600)]
    steps: u64,
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Seeds the weight initialisation, the data order and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seeds the train/validation split (keep it fixed across an experiment).
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Validation images held out of the 50,000 training images.
    #[arg(long)]
    validation: Option<usize>,
    /// Start from these weights wherever names and shapes match (weight inheritance).
    #[arg(long)]
    inherit: Option<PathBuf>,
    /// Where to save the trained weights (safetensors).
    #[arg(long, default_value = "weights.safetensors")]
    weights_out: PathBuf,
    /// Turn off the padding/crop/flip augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// The default device is the CPU.
    #[command(flatten)]
    device: DeviceFlag,
    #[command(flatten)]
    kernels: KernelFlags,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.device.open("cpu")?;
    let dna = Dna::load(&args.dna)?;
    let data = args
        .data
        .data
        .context("--data is needed: the folder with the CIFAR binary files")?;
    let split = Split::load(&data, args.dataset, args.split_seed, args.validation)
        .context("loading the training data")?;
    let parent = args
        .inherit
        .as_deref()
        .map(|p| Weights::load(p, &device))
        .transpose()?;
    let spec = ModelSpec::cifar(args.dataset.classes());
    let started = Instant::now();
    let (model, inheritance) = Model::build(
        &dna,
        spec,
        parent.as_ref(),
        &mut seed::rng(args.seed, Stream::Initialisation),
        &device,
    )?;
    let model = model.with_kernels(args.kernels.kernels());
    tracing::info!(
        dna = %dna.summary(),
        parameters = model.parameter_count(),
        inherited = inheritance.inherited.len(),
        fresh = inheritance.fresh.len(),
        "training"
    );
    let config = TrainConfig {
        batch_size: args.batch,
        augment: !args.no_augment,
        ..TrainConfig::paper(args.steps, args.seed)
    };
    let (report, evaluation) = trainer::threads::run_on_cpu_pool(
        &device,
        trainer::threads::cpu_share(1),
        || -> Result<_> {
            let report = train::train(
                &model,
                dna.learning_rate,
                &split.train,
                &split.normalization,
                &config,
                &device,
                &|| false,
            )?;
            let evaluation = train::evaluate(
                &model,
                &split.validation,
                &split.normalization,
                500,
                &device,
            )?;
            Ok((report, evaluation))
        },
    )
    .context("starting the training threads")??;
    let wall = started.elapsed().as_secs_f64();
    model
        .weights()
        .save(&args.weights_out)
        .context("saving the trained weights")?;
    let flops = Flops::of(&dna, spec).individual(
        report.steps * args.batch as u64,
        split.validation.len() as u64,
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "validation_accuracy": evaluation.accuracy,
                "flops": flops,
                "wall_seconds": wall,
                "training": report,
                "evaluation": evaluation,
                "weights": args.weights_out,
            })
        );
    } else {
        println!(
            "validation accuracy  {:.4} ({} / {})",
            evaluation.accuracy, evaluation.correct, evaluation.total
        );
        println!("FLOPs                {flops:.4e}");
        println!(
            "wall time            {wall:.1} s (training {:.1} s, {} steps, loss {:.3} -> {:.3}{})",
            report.seconds,
            report.steps,
            report.first_loss,
            report.last_loss,
            if report.diverged { ", diverged" } else { "" }
        );
        println!("weights              {}", args.weights_out.display());
    }
    Ok(())
}
