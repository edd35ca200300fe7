//! `trainer run MANIFEST`: the whole experiment on this machine. Workers are tasks of this
//! process sharing one copy of the data; the store is whatever the manifest names (a folder
//! by default); at the end, the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use trainer::data::{source, DatasetKind, Split};
use trainer::store::{self, Population, S3Settings};
use trainer::train::TrainConfig;
use trainer::worker::{self, CandleTrainer, StopFlag, WorkerSettings};

use super::report::{write_report, ReportTarget};

pub struct RunOptions {
    pub manifest: PathBuf,
    pub data: Option<PathBuf>,
    pub store: Option<String>,
    pub workers: Option<u32>,
    pub out: Option<PathBuf>,
    pub device: Option<String>,
}

pub fn kind_of(dataset: crds::Dataset) -> DatasetKind {
    match dataset {
        crds::Dataset::Cifar10 => DatasetKind::Cifar10,
        crds::Dataset::Cifar100 => DatasetKind::Cifar100,
    }
}

pub fn s3_settings(store: &crds::StoreSpec) -> S3Settings {
    S3Settings {
        endpoint: store.endpoint.clone(),
        region: store.region.clone(),
        path_style: store.path_style,
        ..S3Settings::default()
    }
}

/// The data folder: `--data`, else the manifest's source, fetched into the cache.
pub async fn data_folder(
    spec: &crds::EvolutionExperimentSpec,
    data: Option<PathBuf>,
) -> Result<PathBuf> {
    match data {
        Some(dir) => Ok(dir),
        None => Ok(source::resolve(
            &spec.data,
            &source::default_cache(),
            &s3_settings(&spec.store),
        )
        .await?),
    }
}

pub async fn load_split(spec: &crds::EvolutionExperimentSpec, dir: PathBuf) -> Result<Arc<Split>> {
    let kind = kind_of(spec.data.dataset);
    let seed = spec.seed;
    let validation = spec.data.validation_images.map(|v| v as usize);
    let split = tokio::task::spawn_blocking(move || Split::load(&dir, kind, seed, validation))
        .await?
        .context("loading the training data")?;
    Ok(Arc::new(split))
}

pub fn training_config(spec: &crds::EvolutionExperimentSpec) -> TrainConfig {
    TrainConfig {
        steps: spec.training.steps,
        batch_size: spec.training.batch_size as usize,
        momentum: spec.training.momentum,
        weight_decay: spec.training.weight_decay,
        augment: true,
        seed: 0,
    }
}

pub async fn run(options: RunOptions) -> Result<()> {
    let mut experiment = crds::manifest::load(&options.manifest)?;
    if let Some(url) = options.store {
        experiment.spec.store.url = url;
    }
    if let Some(workers) = options.workers {
        experiment.spec.workers = Some(workers);
    }
    crds::validate(&experiment.spec).context("the manifest with the command line's overrides")?;
    let spec = experiment.spec.clone();
    let name = experiment
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "experiment".into());
    let device_name = options
        .device
        .clone()
        .or_else(|| spec.worker.device.clone())
        .unwrap_or_else(|| "auto".into());
    let device = super::device(&device_name)?;

    let data_dir = data_folder(&spec, options.data).await?;
    let split = load_split(&spec, data_dir.clone()).await?;
    let store = store::open(&spec.store).await?;
    let population = Population::new(store);
    let record = population.start_experiment(&name, &spec).await?;
    if let Some(marker) = population.stop_marker().await? {
        println!("{} already stopped: {}", population.url(), marker.reason);
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
    let trainer: Arc<dyn worker::ChildTrainer> = Arc::new(CandleTrainer {
        data: split.clone(),
        config: training_config(&spec),
        device,
        tf32: spec.training.tf32,
        cpu_threads: trainer::threads::cpu_share(spec.workers() as usize),
    });
    let watcher = tokio::spawn(worker::watch_for_stop(
        population.clone(),
        record.clone(),
        stop.clone(),
        Duration::from_secs(1),
    ));
    {
        let population = population.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping: workers abandon their current child");
                let _ = population.request_stop("interrupted by the user").await;
                stop.stop("interrupted by the user");
            }
        });
    }
    let progress = tokio::spawn(show_progress(
        population.clone(),
        record.clone(),
        stop.clone(),
    ));

    let suffix = super::random_suffix();
    let mut workers = Vec::new();
    for index in 0..spec.workers() {
        // A local store is cheap to write, and the progress bar reads these totals.
        let settings = WorkerSettings {
            progress_interval: Duration::from_secs(2),
            ..WorkerSettings::new(
                format!("local-{index}-{suffix}"),
                super::worker_seed(spec.seed, u64::from(index)),
            )
        };
        let population = population.clone();
        let record = record.clone();
        let trainer = trainer.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            worker::run(settings, &population, &record, trainer, stop).await
        }));
    }
    let mut failure = None;
    for handle in workers {
        match handle.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "worker failed");
                stop.stop("a worker failed");
                failure.get_or_insert(anyhow::Error::from(e));
            }
            Err(e) => {
                stop.stop("a worker panicked");
                failure.get_or_insert(anyhow::anyhow!("worker task: {e}"));
            }
        }
    }
    stop.stop("workers finished");
    let _ = watcher.await;
    let _ = progress.await;
    if let Some(e) = failure {
        return Err(e.context(
            "the experiment stopped because a worker failed; the store keeps what was trained",
        ));
    }
    println!("stopped: {}", stop.reason().unwrap_or_default());
    let out = options
        .out
        .unwrap_or_else(|| PathBuf::from("cambrian-output").join(&name));
    write_report(
        &population,
        ReportTarget {
            out,
            data: Some(data_dir),
            device: super::device(&device_name)?,
        },
    )
    .await
}

/// A progress bar fed from the store once a second: individuals trained, best validation
/// accuracy, and what is left of the budget.
async fn show_progress(
    population: Population,
    record: store::ExperimentRecord,
    stop: Arc<StopFlag>,
) {
    let spec = &record.spec.stop;
    let wall = spec
        .wall_time
        .as_deref()
        .and_then(|w| crds::parse_duration(w).ok());
    let (bar, by_count) = match (spec.individuals_trained, wall) {
        (Some(n), _) => (ProgressBar::new(n), true),
        (None, Some(w)) => (ProgressBar::new(w.as_secs()), false),
        (None, None) => (ProgressBar::new_spinner(), false),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let created = std::time::UNIX_EPOCH + Duration::from_millis(record.created_at_ms);
    while !stop.is_stopped() {
        if let Ok(summary) = population.summary().await {
            let elapsed = created.elapsed().unwrap_or(started.elapsed());
            let left = match (wall, spec.individuals_trained) {
                (Some(w), _) => format!("{}s left", w.saturating_sub(elapsed).as_secs()),
                (None, Some(n)) => format!("{} left", n.saturating_sub(summary.trained)),
                (None, None) => String::new(),
            };
            bar.set_position(if by_count {
                summary.trained
            } else {
                elapsed.as_secs()
            });
            bar.set_message(format!(
                "{} trained, {} alive, best validation {:.4}, {left}",
                summary.trained,
                summary.alive,
                summary.best.map_or(0.0, |b| b.fitness)
            ));
        }
        for _ in 0..10 {
            if stop.is_stopped() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bar.finish_and_clear();
}
