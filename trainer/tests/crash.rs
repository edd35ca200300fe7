//! A worker process killed with SIGKILL in the middle of its work leaves nothing half-made
//! among the alive individuals, and the other workers carry on.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use crds::Dataset;
use population::stop::{spawn_watch, StopFlag};
use population::store::{FileStore, Population};
use trainer::child::CandleTrainer;
use trainer::data::{fixture, Split};
use trainer::layers::Kernels;
use trainer::train::TrainConfig;
use trainer::weights::Weights;
use trainer::worker::{self, WorkerSettings};

fn manifest(dir: &Path, store: &Path) -> std::path::PathBuf {
    let path = dir.join("crash.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: cambrian.dev/v1alpha1
kind: EvolutionExperiment
metadata:
  name: crash
spec:
  population: 4
  workers: 2
  training:
    steps: 60
    batchSize: 8
    momentum: 0.9
    weightDecay: 0.0001
    initialLearningRate: 0.05
  store:
    url: file://{}
"#,
            store.display()
        ),
    )
    .unwrap();
    path
}

/// Every alive individual has its whole record and readable weights.
async fn alive_are_whole(population: &Population) -> usize {
    let alive = population.alive().await.unwrap();
    for entry in &alive {
        let record = population.individual(&entry.id).await.unwrap();
        assert!(record.is_some(), "alive {} has no record", entry.id);
        let bytes = population.weights(&entry.id).await.unwrap();
        let bytes = bytes.unwrap_or_else(|| panic!("alive {} has no weights", entry.id));
        Weights::from_safetensors(&bytes, &Device::Cpu).unwrap();
    }
    alive.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_training_leaves_no_partial_individual() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store_dir = dir.path().join("store");
    fixture::write(&data, Dataset::Cifar10, 24, 5).unwrap();
    let manifest = manifest(dir.path(), &store_dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "worker",
            "--device",
            "cpu",
            "--name",
            "doomed",
            "--manifest",
        ])
        .arg(&manifest)
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let population = Population::new(Arc::new(FileStore::open(&store_dir).await.unwrap()));
    // Let it fill the population and get into reproductions, then kill it at an arbitrary
    // moment of its work.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let dead = population.dead().await.map(|d| d.len()).unwrap_or(0);
        if dead >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the worker exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(u64::from(rand::random::<u8>()))).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let before = population.recorded().await.unwrap().len();
    let alive = alive_are_whole(&population).await;
    assert!(alive <= 4);

    // Other workers carry on with the same population.
    let mut record = population.experiment().await.unwrap().unwrap();
    let so_far = population.summary().await.unwrap().trained;
    record.spec.stop.individuals_trained = Some(so_far + 5);
    // The stored stop conditions decide (they are the editable part of a running experiment).
    population.update_stop(&record.spec.stop).await.unwrap();
    let split = Arc::new(Split::load(&data, Dataset::Cifar10, record.spec.seed, None).unwrap());
    let trainer = Arc::new(CandleTrainer {
        data: split,
        config: TrainConfig {
            batch_size: 8,
            ..TrainConfig::paper(60, 0)
        },
        device: Device::Cpu,
        tf32: false,
        // The two survivors below.
        cpu_threads: trainer::threads::cpu_share(2),
        kernels: Kernels::default(),
    });
    let stop = Arc::new(StopFlag::default());
    let survivors = spawn_watch(&population, &record, &stop, Duration::from_millis(50));
    let loops = (0..2)
        .map(|i| WorkerSettings {
            progress_interval: Duration::ZERO,
            ..WorkerSettings::new(format!("survivor-{i}"), i)
        })
        .collect();
    let reports = worker::run_loops(loops, &population, &record, trainer, &stop)
        .await
        .unwrap();
    survivors.await.unwrap();
    let trained: u64 = reports.iter().map(|r| r.trained).sum();
    assert!(trained >= 1, "the surviving workers trained nothing");
    assert!(population.recorded().await.unwrap().len() > before);
    alive_are_whole(&population).await;
}
