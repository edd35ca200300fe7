//! `trainer worker`: the entry point of a trainer pod. Settings come from a manifest file or
//! from the environment the operator sets; the worker runs until the experiment stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use population::seed::worker_seed;
use population::stop::{spawn_watch, StopFlag};
use population::store::{self, check_worker_name, Population, Resilient, RetryPolicy, StoreError};
use trainer::child::CandleTrainer;
use trainer::worker::{self, WorkerSettings};

use super::flags::{DataFlag, DeviceFlag, ExperimentFlags, KernelFlags};
use super::{worker_name, Exit};

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
    /// This worker's stable index among the experiment's workers (an Indexed Job's completion
    /// index): it seeds the worker's choices, so that a run repeats. Without one, the seed
    /// comes from the worker's name.
    #[arg(long, env = "CAMBRIAN_WORKER_INDEX")]
    index: Option<u64>,
    /// How long a lease on a vacancy lasts unrenewed: a crashed worker's vacancy is refilled
    /// about this long (plus the clock skew) later.
    #[arg(long, env = "CAMBRIAN_LEASE_SECONDS", default_value_t = 60.0)]
    lease_seconds: f64,
    /// The clock difference between machines that leases tolerate.
    #[arg(long, env = "CAMBRIAN_CLOCK_SKEW_SECONDS", default_value_t = 15.0)]
    clock_skew_seconds: f64,
    /// How old a child that never became alive must be before the sweeper removes it.
    #[arg(long, env = "CAMBRIAN_SWEEP_GRACE_SECONDS", default_value_t = 3600.0)]
    sweep_grace_seconds: f64,
}

/// A duration given in seconds; what is not a positive number of seconds counts as none.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

pub async fn run(args: Args) -> Result<()> {
    let configuration = |e: anyhow::Error| anyhow::Error::new(Exit::Configuration(e));
    let experiment = args
        .experiment
        .load()
        .map_err(configuration)?
        .context("no experiment: pass --manifest or set CAMBRIAN_EXPERIMENT")
        .map_err(configuration)?;
    let spec = experiment.spec;
    let base = args
        .name
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    // Pod names are unique (the Jobs' pods are never restarted in place), and a worker
    // restarted under its old name by hand takes up its predecessor's totals and vacancies.
    let base = worker_name(&base);
    check_worker_name(&base).map_err(|e| configuration(e.into()))?;
    let index = args
        .index
        .or_else(|| std::env::var("JOB_COMPLETION_INDEX").ok()?.parse().ok());
    let device = args.device.open("auto").map_err(configuration)?;
    let (_, split) = super::training_data(&spec, args.data.data).await?;
    let opened = match store::open(&spec.store).await {
        Err(e @ (StoreError::Url { .. } | StoreError::Credentials { .. })) => {
            return Err(configuration(e.into()))
        }
        other => other?,
    };
    // A store outage of any length pauses this worker; it never ends it.
    let population = Population::new(Arc::new(Resilient::new(opened, RetryPolicy::forever())));
    let record = match population.start_experiment(&experiment.name, &spec).await {
        Err(e @ (StoreError::Conflict { .. } | StoreError::Credentials { .. })) => {
            return Err(configuration(e.into()))
        }
        other => other?,
    };
    let stop = Arc::new(StopFlag::default());
    let watcher = spawn_watch(&population, &record, &stop, Duration::from_secs(10));
    let terminated = Arc::new(AtomicBool::new(false));
    {
        let (stop, terminated) = (stop.clone(), terminated.clone());
        tokio::spawn(async move {
            #[cfg(unix)]
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                terminated.store(true, Ordering::SeqCst);
                stop.stop("the pod is terminating");
            }
        });
    }
    let count = args.loops.max(1);
    let trainer = Arc::new(CandleTrainer {
        kernels: args.kernels.kernels(),
        ..CandleTrainer::for_spec(&spec.training, Arc::new(split), device, count as usize)
    });
    let seed_base = match index {
        Some(index) => worker_seed(spec.seed, index),
        None => base
            .bytes()
            .fold(spec.seed, |h, b| h.rotate_left(5) ^ u64::from(b)),
    };
    let loops = (0..count)
        .map(|index| {
            let name = if count > 1 {
                format!("{base}-{index}")
            } else {
                base.clone()
            };
            WorkerSettings {
                lease: seconds(args.lease_seconds),
                clock_skew: seconds(args.clock_skew_seconds),
                sweep_grace: seconds(args.sweep_grace_seconds),
                ..WorkerSettings::new(name, worker_seed(seed_base, u64::from(index)))
            }
        })
        .collect();
    // A pod's log says how the whole experiment goes once a minute, since births are at
    // debug level: thousands of lines in a short run.
    let progress = tokio::spawn(super::progress::show(
        population.clone(),
        record.clone(),
        stop.clone(),
        super::progress::Display::Lines {
            every: Duration::from_secs(60),
        },
    ));
    let result = worker::run_loops(loops, &population, &record, trainer, &stop).await;
    stop.stop("worker finished");
    let _ = watcher.await;
    let _ = progress.await;
    let reports = match result {
        Err(worker::WorkerError::Store(e @ StoreError::Credentials { .. })) => {
            return Err(configuration(e.into()))
        }
        other => other?,
    };
    for report in reports {
        tracing::info!(
            experiment = %experiment.name,
            trained = report.trained,
            conflicts = report.conflicts,
            "worker loop done"
        );
    }
    // Exiting 0 tells the Job this pod's work is done, which is true only once the experiment
    // has stopped; a pod stopped for any other reason must be replaced.
    if terminated.load(Ordering::SeqCst) && population.stop_marker().await?.is_none() {
        return Err(Exit::Terminated.into());
    }
    Ok(())
}
