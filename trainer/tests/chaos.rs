//! Worker processes killed with SIGKILL at random moments of their work (training, store
//! requests, start-up) and restarted, some under their old names and some under new ones,
//! against one store. Afterwards the population is whole and complete: every place filled
//! once, no zombies, no vacancies left, nothing half-made among the alive, at most one lost
//! child per kill (and the sweeper removes it), and the report reads it.
//!
//! `CAMBRIAN_CHAOS_SECONDS` sets how long the killing goes on (default 20), and
//! `CAMBRIAN_CHAOS_INTERVAL_MS` the longest wait between two kills (default 800; the waits are
//! uniform below it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use crds::Dataset;
use population::store::{FileStore, Population};
use trainer::data::fixture;
use trainer::weights::Weights;

const SIZE: usize = 6;
const WORKERS: usize = 3;

fn manifest(dir: &Path, store: &Path) -> PathBuf {
    let path = dir.join("chaos.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: cambrian.dev/v1alpha1
kind: EvolutionExperiment
metadata:
  name: chaos
spec:
  population: {SIZE}
  workers: {WORKERS}
  training:
    steps: 20
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

struct Fleet {
    manifest: PathBuf,
    data: PathBuf,
    logs: PathBuf,
    started: usize,
}

impl Fleet {
    fn spawn(&mut self, name: &str) -> Child {
        self.started += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("{name}.{}.log", self.started))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["worker", "--device", "cpu", "--name", name, "--manifest"])
            .arg(&self.manifest)
            .arg("--data")
            .arg(&self.data)
            // Short leases, so that the vacancies of workers that never come back are
            // refilled within the test; one process, one machine: no clock skew.
            .env("CAMBRIAN_LEASE_SECONDS", "1.5")
            .env("CAMBRIAN_CLOCK_SKEW_SECONDS", "0")
            .env("CAMBRIAN_SWEEP_GRACE_SECONDS", "600")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn count_in_logs(&self, needle: &str) -> usize {
        std::fs::read_dir(&self.logs)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .map(|text| text.matches(needle).count())
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let seconds: u64 = std::env::var("CAMBRIAN_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store_dir = dir.path().join("store");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    fixture::write(&data, Dataset::Cifar10, 24, 5).unwrap();
    let mut fleet = Fleet {
        manifest: manifest(dir.path(), &store_dir),
        data,
        logs,
        started: 0,
    };
    let mut names: Vec<String> = (0..WORKERS).map(|i| format!("chaos-{i}")).collect();
    let mut workers: Vec<Child> = names.iter().map(|n| fleet.spawn(n)).collect();
    let population = Population::new(Arc::new(FileStore::open(&store_dir).await.unwrap()));
    // Into reproductions first.
    let deadline = Instant::now() + Duration::from_secs(120);
    while population.dead().await.map(|d| d.len()).unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "the workers made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let interval: u64 = std::env::var("CAMBRIAN_CHAOS_INTERVAL_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(800);
    let (mut kills, mut renamed) = (0usize, 0usize);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % interval)).await;
        let i = rand::random::<u32>() as usize % WORKERS;
        workers[i].kill().unwrap();
        workers[i].wait().unwrap();
        kills += 1;
        // Most come back under their old name (a worker restarted in place); some never do,
        // and a new worker takes their place, so their vacancies wait for their leases.
        if rand::random::<f64>() < 0.3 {
            renamed += 1;
            names[i] = format!("chaos-{i}-{kills}");
        }
        workers[i] = fleet.spawn(&names[i]);
    }
    // Unmolested for longer than a lease, so that every vacancy is seen to, then stopped.
    tokio::time::sleep(Duration::from_secs(4)).await;
    population.request_stop("chaos over").await.unwrap();
    for worker in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = worker.try_wait().unwrap() {
                assert!(status.success(), "a worker failed at the stop: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "a worker did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let audit = population.audit().await.unwrap();
    let adopted = fleet.count_in_logs("refilling a vacancy its worker left");
    let trained = population.summary().await.unwrap().trained;
    eprintln!(
        "chaos: {seconds} s, {kills} SIGKILLs ({renamed} workers replaced under new names), \
         {trained} trained, {adopted} vacancies refilled by other workers, \
         population {} of {SIZE}, {} zombies, {} broken, {} unfilled, {} leases left, \
         {} lost children (orphans before the sweep)",
        audit.alive,
        audit.zombies.len(),
        audit.broken.len(),
        audit.unfilled.len(),
        audit.leases,
        audit.orphans.len()
    );
    assert_eq!(audit.alive, SIZE, "{audit:?}");
    assert!(audit.zombies.is_empty(), "{audit:?}");
    assert!(audit.broken.is_empty(), "{audit:?}");
    assert!(audit.unfilled.is_empty(), "{audit:?}");
    assert_eq!(audit.leases, 0, "{audit:?}");
    assert!(audit.orphans.len() <= kills, "{audit:?}");
    for entry in population.alive().await.unwrap() {
        let record = population.individual(&entry.id).await.unwrap().unwrap();
        if let Some(failure) = &record.outcome.failure {
            // A child that failed to train (a diverged loss, here) has no weights.
            eprintln!("alive {} failed to train: {failure}", entry.id);
            continue;
        }
        let bytes = population.weights(&entry.id).await.unwrap();
        let bytes = bytes.unwrap_or_else(|| panic!("alive {} has no weights", entry.id));
        Weights::from_safetensors(&bytes, &Device::Cpu).unwrap();
    }
    let swept = population
        .sweep(Duration::ZERO, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(swept.orphans, audit.orphans.len());
    assert!(population.audit().await.unwrap().orphans.is_empty());

    // The report reads it all, and running the experiment again says it is stopped.
    let out = dir.path().join("report");
    let report = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "report",
            &format!("file://{}", store_dir.display()),
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{text}");
    assert!(text.contains(&format!("{SIZE} alive")), "{text}");
    assert!(out.join("best/weights.safetensors").exists());
}
