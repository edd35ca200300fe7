//! `trainer worker`: the entry point of a trainer pod. Settings come from a manifest file or
//! from the environment the operator sets; the worker runs until the experiment stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use trainer::store::{self, Population};
use trainer::worker::{self, CandleTrainer, StopFlag, WorkerSettings};

use super::run::{data_folder, load_split, training_config};

pub struct WorkerOptions {
    pub manifest: Option<PathBuf>,
    /// The experiment as JSON (`{"metadata": {"name": ...}, "spec": {...}}`), as the operator
    /// passes it.
    pub experiment_json: Option<String>,
    pub name: Option<String>,
    pub data: Option<PathBuf>,
    pub device: String,
    /// Worker loops in this process (several small models can share one device).
    pub loops: u32,
}

pub async fn run(options: WorkerOptions) -> Result<()> {
    let experiment = match (&options.manifest, &options.experiment_json) {
        (Some(path), _) => crds::manifest::load(path)?,
        (None, Some(json)) => {
            let experiment: crds::EvolutionExperiment = serde_json::from_str(json)
                .context("CAMBRIAN_EXPERIMENT is not an EvolutionExperiment in JSON")?;
            crds::validate(&experiment.spec)?;
            experiment
        }
        (None, None) => bail!("no experiment: pass --manifest or set CAMBRIAN_EXPERIMENT"),
    };
    let spec = experiment.spec.clone();
    let experiment_name = experiment
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "experiment".into());
    let base = options
        .name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", super::random_suffix()))
        .to_ascii_lowercase();
    // A restarted pod keeps its name; the suffix keeps its progress apart from its
    // predecessor's.
    let base = format!("{}-{}", &base[..base.len().min(50)], super::random_suffix());
    store::check_worker_name(&base).map_err(anyhow::Error::msg)?;
    let device = super::device(&options.device)?;
    let data_dir = data_folder(&spec, options.data).await?;
    let split = load_split(&spec, data_dir).await?;
    let population = Population::new(store::open(&spec.store).await?);
    let record = population.start_experiment(&experiment_name, &spec).await?;
    let stop = Arc::new(StopFlag::default());
    let watcher = tokio::spawn(worker::watch_for_stop(
        population.clone(),
        record.clone(),
        stop.clone(),
        Duration::from_secs(10),
    ));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                stop.stop("the pod is terminating");
            }
        });
    }
    let trainer: Arc<dyn worker::ChildTrainer> = Arc::new(CandleTrainer {
        data: split,
        config: training_config(&spec),
        device,
        tf32: spec.training.tf32,
        cpu_threads: trainer::threads::cpu_share(options.loops.max(1) as usize),
    });
    let seed_base = base
        .bytes()
        .fold(spec.seed, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut loops = Vec::new();
    for index in 0..options.loops.max(1) {
        let name = if options.loops > 1 {
            format!("{base}-{index}")
        } else {
            base.clone()
        };
        let settings = WorkerSettings::new(name, super::worker_seed(seed_base, u64::from(index)));
        let (population, record, trainer, stop) = (
            population.clone(),
            record.clone(),
            trainer.clone(),
            stop.clone(),
        );
        loops.push(tokio::spawn(async move {
            worker::run(settings, &population, &record, trainer, stop).await
        }));
    }
    let mut result = Ok(());
    for handle in loops {
        match handle.await {
            Ok(Ok(report)) => tracing::info!(
                trained = report.trained,
                conflicts = report.conflicts,
                "worker loop done"
            ),
            Ok(Err(e)) => {
                stop.stop("a worker loop failed");
                result = Err(anyhow::Error::from(e));
            }
            Err(e) => {
                stop.stop("a worker loop panicked");
                result = Err(anyhow::anyhow!("worker loop: {e}"));
            }
        }
    }
    stop.stop("worker finished");
    let _ = watcher.await;
    result
}
