//! `trainer`: one binary for every job of an evolution worker (see the README).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod cli;

use trainer::bench::{self, BenchConfig};
use trainer::cost::Flops;
use trainer::data::{DatasetKind, Split};
use trainer::dna::Dna;
use trainer::model::{Model, ModelSpec};
use trainer::mutation::{self, AppliedMutation, Mutation};
use trainer::seed::{self, Stream};
use trainer::train::{self, TrainConfig};
use trainer::weights::Weights;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Large-scale evolution of image classifiers: the worker"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run an experiment on this machine: worker threads, the manifest's store, then a report.
    Run(RunArgs),
    /// Run as one trainer pod: worker loops against the experiment's store until it stops.
    Worker(WorkerArgs),
    /// Summary, best-individual export and progress plot of any store, at any time.
    Report(ReportArgs),
    /// Measure the best individual by validation on the test set and record it in the store.
    Evaluate(EvaluateArgs),
    /// Train one DNA on CIFAR and report its validation accuracy, FLOPs and wall time.
    Train(TrainArgs),
    /// Write a mutated child of a parent DNA, for inspection.
    Mutate(MutateArgs),
    /// Training and evaluation images/s of the reference DNAs (optionally against PyTorch).
    Bench(BenchArgs),
    /// Check our convolution and batch-norm kernels against Candle's operations on a device:
    /// outputs and gradients on random inputs of varied shapes.
    CheckOps(CheckOpsArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The EvolutionExperiment manifest (YAML).
    manifest: PathBuf,
    /// Folder with the CIFAR binary files, instead of downloading the manifest's source.
    #[arg(long, env = "CAMBRIAN_DATA")]
    data: Option<PathBuf>,
    /// Store URL instead of the manifest's (s3://bucket/prefix or file:///path).
    #[arg(long)]
    store: Option<String>,
    /// Worker threads instead of the manifest's workers.
    #[arg(long)]
    workers: Option<u32>,
    /// Where the report goes (default: cambrian-output/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto; default: the manifest's spec.worker.device, else auto.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
struct WorkerArgs {
    /// The EvolutionExperiment manifest; or set CAMBRIAN_EXPERIMENT to it in JSON.
    #[arg(long, env = "CAMBRIAN_MANIFEST")]
    manifest: Option<PathBuf>,
    #[arg(long, env = "CAMBRIAN_EXPERIMENT", hide_env_values = true)]
    experiment: Option<String>,
    /// This worker's name (default: the host name, i.e. the pod name).
    #[arg(long, env = "CAMBRIAN_WORKER_NAME")]
    name: Option<String>,
    #[arg(long, env = "CAMBRIAN_DATA")]
    data: Option<PathBuf>,
    #[arg(long, env = "CAMBRIAN_DEVICE", default_value = "auto")]
    device: String,
    /// Worker loops in this process, sharing its device.
    #[arg(long, env = "CAMBRIAN_WORKER_LOOPS", default_value_t = 1)]
    loops: u32,
}

#[derive(Args)]
struct StoreArgs {
    /// s3://bucket/prefix or file:///path
    store: String,
    /// S3 endpoint of an S3-compatible server.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    #[arg(long)]
    path_style: bool,
}

impl StoreArgs {
    async fn open(&self) -> Result<trainer::store::Population> {
        let spec = crds::StoreSpec {
            url: self.store.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            credentials_secret: None,
            retention: crds::Retention::Retain,
        };
        crds::parse_store_url(&spec.url).map_err(|e| anyhow::anyhow!("store URL: {e}"))?;
        Ok(trainer::store::Population::new(
            trainer::store::open(&spec).await?,
        ))
    }
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// CIFAR folder, to measure the best individual's test accuracy (§3.7).
    #[arg(long, env = "CAMBRIAN_DATA")]
    data: Option<PathBuf>,
    /// Where the export and the plot go.
    #[arg(long, default_value = "cambrian-report")]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvaluateArgs {
    /// s3://bucket/prefix or file:///path; default: the store of CAMBRIAN_EXPERIMENT.
    store: Option<String>,
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    #[arg(long)]
    path_style: bool,
    /// The experiment in JSON, as the operator passes it to its evaluation Job.
    #[arg(long, env = "CAMBRIAN_EXPERIMENT", hide_env_values = true)]
    experiment: Option<String>,
    /// CIFAR folder; default: the experiment's data source, fetched into the cache.
    #[arg(long, env = "CAMBRIAN_DATA")]
    data: Option<PathBuf>,
    #[arg(long, env = "CAMBRIAN_DEVICE", default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct TrainArgs {
    /// The DNA to train (JSON, as written by `mutate` or kept in bench/dna).
    dna: PathBuf,
    /// Folder with the official CIFAR binary files (or the folder that holds it).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "cifar10")]
    dataset: DatasetKind,
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
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct MutateArgs {
    /// The parent DNA (JSON); `initial` for the paper's initial linear model.
    parent: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of mutations (the mutation rate).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Apply this mutation instead of drawing one (e.g. FILTER-SIZE).
    #[arg(long)]
    mutation: Option<Mutation>,
    /// Output file (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
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
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
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

#[derive(Args)]
struct CheckOpsArgs {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::memory::keep_step_buffers();
    match Cli::parse().command {
        Commands::Run(args) => runtime()?.block_on(cli::run::run(cli::run::RunOptions {
            manifest: args.manifest,
            data: args.data,
            store: args.store,
            workers: args.workers,
            out: args.out,
            device: args.device,
        })),
        Commands::Worker(args) => {
            runtime()?.block_on(cli::worker::run(cli::worker::WorkerOptions {
                manifest: args.manifest,
                experiment_json: args.experiment,
                name: args.name,
                data: args.data,
                device: args.device,
                loops: args.loops,
            }))
        }
        Commands::Report(args) => runtime()?.block_on(async {
            let population = args.store.open().await?;
            cli::report::write_report(
                &population,
                cli::report::ReportTarget {
                    out: args.out,
                    data: args.data,
                    device: cli::device(&args.device)?,
                },
            )
            .await
        }),
        Commands::Evaluate(args) => runtime()?.block_on(async {
            let experiment: Option<crds::EvolutionExperiment> = args
                .experiment
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .context("CAMBRIAN_EXPERIMENT is not an EvolutionExperiment in JSON")?;
            let (population, data) = match (&args.store, &experiment) {
                (Some(url), _) => {
                    let store = StoreArgs {
                        store: url.clone(),
                        endpoint: args.endpoint.clone(),
                        region: args.region.clone(),
                        path_style: args.path_style,
                    };
                    let Some(data) = args.data.clone() else {
                        bail!("--data is needed with an explicit store URL");
                    };
                    (store.open().await?, data)
                }
                (None, Some(experiment)) => {
                    crds::validate(&experiment.spec)?;
                    let store = trainer::store::open(&experiment.spec.store).await?;
                    let data = cli::run::data_folder(&experiment.spec, args.data.clone()).await?;
                    (trainer::store::Population::new(store), data)
                }
                (None, None) => bail!("name a store URL or set CAMBRIAN_EXPERIMENT"),
            };
            cli::report::evaluate(&population, data, cli::device(&args.device)?).await
        }),
        Commands::Train(args) => train_command(args),
        Commands::Mutate(args) => mutate_command(args),
        Commands::Bench(args) => bench_command(args),
        Commands::CheckOps(args) => check_ops_command(args),
    }
}

/// The reference script's name for a device: `cuda:N` or `cpu`.
fn torch_device(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn train_command(args: TrainArgs) -> Result<()> {
    let device = cli::device(&args.device)?;
    let dna = Dna::load(&args.dna)?;
    let split = Split::load(&args.data, args.dataset, args.split_seed, args.validation)
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

fn mutate_command(args: MutateArgs) -> Result<()> {
    let parent = if args.parent == "initial" {
        Dna::initial()
    } else {
        Dna::load(Path::new(&args.parent))?
    };
    let mut rng = seed::rng(args.seed, Stream::Mutation);
    let (dna, mutations) = match args.mutation {
        None => {
            let child = mutation::mutate(&parent, args.count, &mut rng);
            (child.dna, child.mutations)
        }
        Some(m) => {
            let mut dna = parent.clone();
            let mut applied = Vec::new();
            for _ in 0..args.count {
                let Some(detail) = m.apply(&mut dna, &mut rng) else {
                    bail!("{m} cannot apply to {}", args.parent);
                };
                applied.push(AppliedMutation {
                    mutation: m,
                    detail,
                });
            }
            (dna, applied)
        }
    };
    for m in &mutations {
        eprintln!("{}: {}", m.mutation, m.detail);
    }
    eprintln!("{}", dna.summary());
    match args.output {
        Some(path) => std::fs::write(&path, dna.to_json() + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{}", dna.to_json()),
    }
    Ok(())
}

fn check_ops_command(args: CheckOpsArgs) -> Result<()> {
    let device = cli::device(&args.device)?;
    let results = trainer::layers::gpu::check::run(&device)
        .with_context(|| format!("checking the kernels on {}", args.device))?;
    let mut failed = 0;
    for c in &results {
        let verdict = if c.passed() { "ok  " } else { "FAIL" };
        failed += usize::from(!c.passed());
        println!(
            "{verdict} {:.2e} (tolerance {:.0e})  {}",
            c.error, c.tolerance, c.name
        );
    }
    println!(
        "{} of {} checks passed on {}",
        results.len() - failed,
        results.len(),
        trainer::worker::device_name(&device)
    );
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}

fn bench_command(args: BenchArgs) -> Result<()> {
    let device = cli::device(&args.device)?;
    trainer::layers::use_composed_only(args.composed);
    if args.tf32 {
        if !device.is_cuda() {
            bail!("--tf32 needs a CUDA device");
        }
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let mut dnas = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&args.dnas)
        .with_context(|| format!("reading the reference DNA folder {}", args.dnas.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    // Smallest first: the linear model, then the convolutional ones.
    paths.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    for path in paths {
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        dnas.push((name, Dna::load(&path)?));
    }
    let config = BenchConfig {
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        eval_batch: args.eval_batch,
    };
    let mut report = bench::run(&dnas, &config, &device, args.ops)?;
    if args.composed {
        report.implementation.push_str(" (composed ops)");
    }
    if args.tf32 {
        report.implementation.push_str(" tf32");
    }
    let reference = match &args.torch {
        None => None,
        Some(python) => {
            let script = args.dnas.join("../torch_reference.py");
            let output = Command::new(python)
                .arg(&script)
                .args(["--dnas", &args.dnas.to_string_lossy()])
                .args(["--batch", &args.batch.to_string()])
                .args(["--steps", &args.steps.to_string()])
                .args(["--warmup", &args.warmup.to_string()])
                .args(["--eval-batch", &args.eval_batch.to_string()])
                .args(["--device", &torch_device(&device)])
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
            Some(bench::parse_reference(&String::from_utf8_lossy(
                &output.stdout,
            ))?)
        }
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
