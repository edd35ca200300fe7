//! `trainer run MANIFEST`: the whole experiment on this machine. Workers are tasks of this
//! process sharing one copy of the data; the store is whatever the manifest names (a folder
//! by default); at the end, the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use population::seed::worker_seed;
use population::stop::{conditions_met, spawn_watch, stop_reason, StopFlag};
use population::store::{self, Population, Resilient, RetryPolicy, StopMarker};
use trainer::child::CandleTrainer;
use trainer::worker::{self, WorkerSettings};

use super::flags::{DataFlag, DeviceFlag, KernelFlags};
use super::report::{write_report, ReportTarget};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The EvolutionExperiment manifest (YAML).
    manifest: PathBuf,
    #[command(flatten)]
    data: DataFlag,
    /// Store URL instead of the manifest's (s3://bucket/prefix or file:///path).
    #[arg(long)]
    store: Option<String>,
    /// Worker threads instead of the manifest's workers.
    #[arg(long)]
    workers: Option<u32>,
    /// Where the report goes (default: cambrian-output/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The default device is the manifest's spec.worker.device, else auto.
    #[command(flatten)]
    device: DeviceFlag,
    #[command(flatten)]
    kernels: KernelFlags,
}

pub async fn run(args: Args) -> Result<()> {
    let experiment = crds::manifest::load(&args.manifest)?;
    let mut spec = experiment.spec.into_inner();
    if let Some(url) = args.store {
        spec.store.url = url;
    }
    if let Some(workers) = args.workers {
        spec.workers = Some(workers);
    }
    let spec = crds::ValidatedSpec::try_from(spec)
        .context("the manifest with the command line's overrides")?;
    let name = experiment.name;
    let device = args
        .device
        .open(spec.worker.device.as_deref().unwrap_or("auto"))?;

    let (data_dir, split) = super::training_data(&spec, args.data.data).await?;
    let population = Population::new(Arc::new(Resilient::new(
        store::open(&spec.store).await?,
        RetryPolicy::forever(),
    )));
    let record = population.start_experiment(&name, &spec).await?;
    // The manifest's stop conditions are the experiment's from now on: raising one is how a
    // stopped experiment goes on.
    population.update_mutable(&spec).await?;
    if let Some(marker) = population.stop_marker().await? {
        match conditions_met(&population, &spec.stop, record.created_at_ms).await? {
            None => {
                println!(
                    "{} had stopped ({}); the stop conditions allow more, so it goes on",
                    population.url(),
                    marker.reason
                );
                population.clear_stop().await?;
            }
            Some(now) => {
                println!(
                    "{} already stopped: {} (and now: {now}); {}",
                    population.url(),
                    marker.reason,
                    StopMarker::HOW_TO_GO_ON
                );
                let out = args
                    .out
                    .unwrap_or_else(|| PathBuf::from("cambrian-output").join(&name));
                return write_report(
                    &population,
                    ReportTarget {
                        out,
                        data: Some(data_dir),
                        device,
                    },
                )
                .await;
            }
        }
    }
    println!(
        "experiment {name}: population {}, {} workers, T = {}, {} training / {} validation images, store {}",
        spec.population,
        spec.workers(),
        spec.training.steps,
        split.train.len(),
        split.validation.len(),
        population.url()
    );

    let stop = Arc::new(StopFlag::default());
    let trainer = Arc::new(CandleTrainer {
        kernels: args.kernels.kernels(),
        ..CandleTrainer::for_spec(
            &spec.training,
            Arc::new(split),
            device.clone(),
            spec.workers() as usize,
        )
    });
    let watcher = spawn_watch(&population, &record, &stop, Duration::from_secs(1));
    {
        let population = population.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping: workers abandon their current child and give its place back");
                let _ = population.request_stop("interrupted by the user").await;
                stop.stop("interrupted by the user");
            }
        });
    }
    let progress = tokio::spawn(super::progress::show(
        population.clone(),
        record.clone(),
        stop.clone(),
        super::progress::Display::for_stderr(Duration::from_secs(30)),
    ));

    // Stable names: a run started again takes up each worker's totals and vacancies.
    let loops = (0..spec.workers())
        .map(|index| WorkerSettings {
            // A local store is cheap to write, and the progress bar reads these totals.
            progress_interval: Duration::from_secs(2),
            ..WorkerSettings::new(
                format!("local-{index}"),
                worker_seed(spec.seed, u64::from(index)),
            )
        })
        .collect();
    let result = worker::run_loops(loops, &population, &record, trainer, &stop).await;
    // Loops that finished a bounded run leave it to the stop conditions to say so.
    if let Ok(Some(reason)) = stop_reason(&population, &record).await {
        let _ = population.request_stop(&reason).await;
        stop.stop(&reason);
    }
    stop.stop("workers finished");
    let _ = watcher.await;
    let _ = progress.await;
    result.context(
        "the experiment stopped because a worker failed; the store keeps what was trained",
    )?;
    println!("stopped: {}", stop.reason().unwrap_or_default());
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("cambrian-output").join(&name));
    write_report(
        &population,
        ReportTarget {
            out,
            data: Some(data_dir),
            device,
        },
    )
    .await
}
