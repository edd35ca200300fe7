//! `trainer worker`: the entry point of a trainer pod. Settings come from a manifest file or
//! from the environment the operator sets; the worker runs until the experiment stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use population::seed::worker_seed;
use population::stop::{spawn_watch, StopFlag};
use population::store::{self, check_worker_name, Population};
use trainer::child::CandleTrainer;
use trainer::worker::{self, WorkerSettings};

use super::flags::{DataFlag, DeviceFlag, ExperimentFlags, KernelFlags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    experiment: ExperimentFlags,
    /// This worker's name (default: the host name, i.e. the pod name).
    #[arg(long, env = "CAMBRIAN_WORKER_NAME")]
    name: Option<String>,
    #[command(flatten)]
    data: DataFlag,
    /// The default device is auto.
    #[command(flatten)]
    device: DeviceFlag,
    #[command(flatten)]
    kernels: KernelFlags,
    /// Worker loops in this process, sharing its device (several small models can share one
    /// GPU).
    #[arg(long, env = "CAMBRIAN_WORKER_LOOPS", default_value_t = 1)]
    loops: u32,
}

pub async fn run(args: Args) -> Result<()> {
    let experiment = args
        .experiment
        .load()?
        .context("no experiment: pass --manifest or set CAMBRIAN_EXPERIMENT")?;
    let spec = experiment.spec;
    let base = args
        .name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("worker-{}", super::random_suffix()))
        .to_ascii_lowercase();
    // A restarted pod keeps its name; the suffix keeps its progress apart from its
    // predecessor's.
    let base = format!("{}-{}", &base[..base.len().min(50)], super::random_suffix());
    check_worker_name(&base)?;
    let device = args.device.open("auto")?;
    let (_, split) = super::training_data(&spec, args.data.data).await?;
    let population = Population::new(store::open(&spec.store).await?);
    let record = population.start_experiment(&experiment.name, &spec).await?;
    let stop = Arc::new(StopFlag::default());
    let watcher = spawn_watch(&population, &record, &stop, Duration::from_secs(10));
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
    let count = args.loops.max(1);
    let trainer = Arc::new(CandleTrainer {
        kernels: args.kernels.kernels(),
        ..CandleTrainer::for_spec(&spec.training, Arc::new(split), device, count as usize)
    });
    let seed_base = base
        .bytes()
        .fold(spec.seed, |h, b| h.rotate_left(5) ^ u64::from(b));
    let loops = (0..count)
        .map(|index| {
            let name = if count > 1 {
                format!("{base}-{index}")
            } else {
                base.clone()
            };
            WorkerSettings::new(name, worker_seed(seed_base, u64::from(index)))
        })
        .collect();
    let result = worker::run_loops(loops, &population, &record, trainer, &stop).await;
    stop.stop("worker finished");
    let _ = watcher.await;
    for report in result? {
        tracing::info!(
            experiment = %experiment.name,
            trained = report.trained,
            conflicts = report.conflicts,
            "worker loop done"
        );
    }
    Ok(())
}
