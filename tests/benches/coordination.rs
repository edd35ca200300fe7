//! Coordination cost of evolution, without training: requests per reproduction and
//! reproductions per second, with a population of 1,000 on the local S3 server (s3s-fs behind
//! its atomicity lock) and, for comparison, on the file store.
//!
//!     cargo bench -p cambrian-tests --bench coordination [-- WORKERS SECONDS]
//!
//! The S3 server keeps its objects on tmpfs (`/dev/shm`) where there is one.
//!
//! Children "train" instantly (a random fitness and 1 KiB of weights), so everything measured
//! is store traffic and worker bookkeeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cambrian_tests::s3_store;
use cambrian_tests::s3s::S3Server;
use population::fixtures;
use population::stop::StopFlag;
use population::store::{CountingStore, FileStore, ObjectStore, Population};
use trainer::child::{ChildError, ChildJob, ChildTrainer, TrainedChild};
use trainer::worker::{self, WorkerSettings};

const POPULATION: u32 = 1000;

struct Instant_;

impl ChildTrainer for Instant_ {
    fn train_child(&self, job: ChildJob, _stop: &StopFlag) -> Result<TrainedChild, ChildError> {
        Ok(TrainedChild {
            outcome: fixtures::outcome(rand::random::<f64>() * 0.9, &job.dna),
            weights: tiny_weights(),
            inherited_tensors: 0,
            fresh_tensors: 0,
            interrupted: false,
        })
    }
}

/// 1 KiB of valid safetensors, so that the workers' checks of parent weights pass.
fn tiny_weights() -> Bytes {
    let mut weights = trainer::weights::Weights::default();
    let tensor =
        candle_core::Tensor::zeros(256, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    weights.insert("w".into(), tensor);
    Bytes::from(weights.to_safetensors().unwrap())
}

async fn fill(population: &Population) {
    let mut tasks = Vec::new();
    for chunk in 0..20u32 {
        let population = population.clone();
        tasks.push(tokio::spawn(async move {
            for slot in (chunk * POPULATION / 20)..((chunk + 1) * POPULATION / 20) {
                population.claim_slot(slot, "setup").await.unwrap();
                let mut individual = fixtures::individual(rand::random::<f64>() * 0.5);
                individual.lineage.slot = Some(slot);
                population.add(&individual, tiny_weights()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn measure<S: ObjectStore + 'static>(
    name: &str,
    store: Arc<CountingStore<S>>,
    workers: u32,
    seconds: u64,
) {
    let population = Population::new(store.clone());
    let spec = fixtures::spec(serde_json::json!({
        "population": POPULATION,
        "store": { "url": "file:///bench" },
    }));
    let record = population
        .start_experiment("coordination", &spec)
        .await
        .unwrap();
    fill(&population).await;
    // Single-client latency of each kind of request, for the record.
    let t = Instant::now();
    for _ in 0..20 {
        population.alive().await.unwrap();
    }
    let list_ms = t.elapsed().as_secs_f64() * 1e3 / 20.0;
    let t = Instant::now();
    for i in 0..20 {
        store
            .put(&format!("probe/{i}"), Bytes::from(vec![0u8; 2048]))
            .await
            .unwrap();
    }
    let put_ms = t.elapsed().as_secs_f64() * 1e3 / 20.0;
    let t = Instant::now();
    for i in 0..20 {
        store.get(&format!("probe/{i}")).await.unwrap();
    }
    let get_ms = t.elapsed().as_secs_f64() * 1e3 / 20.0;
    println!("{name:<22} one client: LIST of {POPULATION} alive keys {list_ms:.2} ms, PUT 2 KiB {put_ms:.2} ms, GET {get_ms:.2} ms");
    let before = store.counts();
    let stop = Arc::new(StopFlag::default());
    let started = Instant::now();
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.stop("benchmark over");
        })
    };
    let loops = (0..workers)
        .map(|i| WorkerSettings::new(format!("bench-{i}"), u64::from(i)))
        .collect();
    let reports = worker::run_loops(loops, &population, &record, Arc::new(Instant_), &stop)
        .await
        .unwrap();
    timer.await.unwrap();
    let births: u64 = reports.iter().map(|r| r.trained).sum();
    let conflicts: u64 = reports.iter().map(|r| r.conflicts).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let counts = store.counts().minus(&before);
    let per = |n: u64| n as f64 / births.max(1) as f64;
    let alive = population.alive().await.unwrap().len();
    println!(
        "{name:<22} {workers:>3} workers: {:>7.1} reproductions/s ({births} in {elapsed:.1} s, {conflicts} given up), \
         {:.2} requests per reproduction besides weights (all requests: LIST {:.2}, GET {:.2}, PUT {:.2}, PUT-if-absent {:.2}, DELETE {:.2}; of these on weights {:.2}), alive {alive}",
        births as f64 / elapsed,
        per(counts.total() - counts.weights),
        per(counts.lists),
        per(counts.gets),
        per(counts.puts),
        per(counts.put_news),
        per(counts.deletes),
        per(counts.weights),
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let workers: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(32);
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The server's objects live in memory where the machine has a tmpfs: on disk, file
        // creation and discard-on-delete can take most of the CPU time, which measures the
        // disk under a test server rather than the coordination (AWS's storage is not on the
        // worker's machine). The file store below stays on disk, as it would be used.
        let (server, backing) = match tempfile::tempdir_in("/dev/shm") {
            Ok(root) => (S3Server::start_with(root).await, "tmpfs"),
            Err(_) => (S3Server::start().await, "disk"),
        };
        let s3 = s3_store(&server.endpoint, "coordination", "bench").await;
        let s3 = Arc::try_unwrap(s3).unwrap_or_else(|_| unreachable!());
        measure(
            &format!("s3 (s3s-fs on {backing})"),
            Arc::new(CountingStore::new(s3)),
            workers,
            seconds,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let files = FileStore::open(dir.path()).await.unwrap();
        measure(
            "file",
            Arc::new(CountingStore::new(files)),
            workers,
            seconds,
        )
        .await;
    });
}
