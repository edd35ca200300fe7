//! Small experiments with real training on tiny generated data, run by worker tasks in the
//! test process: what the cross-crate tests evolve before they check the result.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use crds::Dataset;
use population::fixtures;
use population::stop::{spawn_watch, StopFlag};
use population::store::{ExperimentRecord, Population};
use trainer::child::{CandleTrainer, ChildTrainer};
use trainer::data::{fixture, Split};
use trainer::worker::{self, WorkerReport, WorkerSettings};

/// A split of 24 generated images per file (training and validation from the five training
/// files).
pub fn tiny_split() -> Arc<Split> {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), Dataset::Cifar10, 24, 3).unwrap();
    Arc::new(Split::load(dir.path(), Dataset::Cifar10, 0, None).unwrap())
}

pub fn spec(url: &str, population: u32, trained: u64) -> crds::ValidatedSpec {
    fixtures::spec(serde_json::json!({
        "population": population,
        "workers": population,
        "training": { "steps": 3, "batchSize": 8, "momentum": 0.9, "weightDecay": 0.0001, "initialLearningRate": 0.05 },
        "store": { "url": url },
        "stop": { "individualsTrained": trained },
    }))
}

/// A trainer whose trainings share the CPU among up to 16 worker loops, the most any test here
/// runs at once (more workers than individuals: each competes for few of them).
pub fn trainer(split: Arc<Split>, spec: &crds::ValidatedSpec) -> Arc<dyn ChildTrainer> {
    Arc::new(CandleTrainer::for_spec(
        &spec.training,
        split,
        Device::Cpu,
        16,
    ))
}

/// Runs `workers` worker tasks until the experiment's stop condition, watching the alive
/// count all along; returns the workers' reports and the largest alive count seen.
pub async fn evolve(
    population: &Population,
    record: &ExperimentRecord,
    trainer: Arc<dyn ChildTrainer>,
    workers: u32,
) -> (Vec<WorkerReport>, usize) {
    let stop = Arc::new(StopFlag::default());
    let watcher = spawn_watch(population, record, &stop, Duration::from_millis(100));
    let peak = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (population, stop, peak) = (population.clone(), stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.is_stopped() {
                if let Ok(alive) = population.alive().await {
                    peak.fetch_max(alive.len(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let loops = (0..workers)
        .map(|i| WorkerSettings {
            idle_wait: Duration::from_millis(20),
            progress_interval: Duration::from_millis(50),
            ..WorkerSettings::new(format!("w{i}"), u64::from(i))
        })
        .collect();
    let reports = worker::run_loops(loops, population, record, trainer, &stop)
        .await
        .unwrap();
    watcher.await.unwrap();
    monitor.await.unwrap();
    (reports, peak.load(Ordering::SeqCst))
}
