//! Faults that must neither shrink, stall nor stop a population, with real training on tiny
//! data: a worker that dies after any request of its work, store outages (failures, stalls,
//! lost responses), children that cannot be trained, exact stops and repeats, and one best
//! for every reader. On the file store and on S3 (s3s in process).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cambrian_tests::faults::{Dying, Flaky, Outage};
use cambrian_tests::s3s::S3Server;
use cambrian_tests::{as_dyn, s3_store};
use candle_core::Device;
use crds::Dataset;
use population::dna::ModelSpec;
use population::fixtures;
use population::individual::Individual;
use population::stop::{spawn_watch, StopFlag};
use population::store::{
    Audit, ExperimentRecord, FileStore, ObjectStore, Population, Resilient, RetryPolicy,
};
use trainer::child::{CandleTrainer, ChildError, ChildJob, ChildTrainer, TrainedChild};
use trainer::data::{fixture, Split};
use trainer::model::Model;
use trainer::report;
use trainer::weights::Weights;
use trainer::worker::{self, WorkerReport, WorkerSettings};

const SIZE: u32 = 4;

fn tiny_split() -> Arc<Split> {
    let dir = tempfile::tempdir().unwrap();
    fixture::write(dir.path(), Dataset::Cifar10, 24, 3).unwrap();
    Arc::new(Split::load(dir.path(), Dataset::Cifar10, 0, None).unwrap())
}

fn spec(url: &str, trained: u64) -> crds::ValidatedSpec {
    fixtures::spec(serde_json::json!({
        "population": SIZE,
        "workers": 1,
        "training": { "steps": 3, "batchSize": 8, "momentum": 0.9, "weightDecay": 0.0001, "initialLearningRate": 0.05 },
        "store": { "url": url },
        "stop": { "individualsTrained": trained },
    }))
}

fn trainer(split: Arc<Split>, spec: &crds::ValidatedSpec) -> Arc<dyn ChildTrainer> {
    Arc::new(CandleTrainer::for_spec(
        &spec.training,
        split,
        Device::Cpu,
        1,
    ))
}

/// Settings for tests: leases that expire in a blink, so that a dead worker's vacancy is
/// adopted at once.
fn settings(name: &str, seed: u64) -> WorkerSettings {
    WorkerSettings {
        idle_wait: Duration::from_millis(10),
        progress_interval: Duration::ZERO,
        lease: Duration::from_millis(300),
        clock_skew: Duration::ZERO,
        ..WorkerSettings::new(name.to_string(), seed)
    }
}

/// Runs one worker loop until it ends (a bounded run's last training, a stop, or an error).
async fn run_worker(
    population: &Population,
    record: &ExperimentRecord,
    trainer: Arc<dyn ChildTrainer>,
    settings: WorkerSettings,
) -> Result<WorkerReport, worker::WorkerError> {
    let stop = Arc::new(StopFlag::default());
    let watcher = spawn_watch(population, record, &stop, Duration::from_millis(50));
    let result = worker::run(settings, population, record, trainer, stop.clone()).await;
    stop.stop("test over");
    watcher.await.unwrap();
    result
}

/// Every alive individual is whole: its record and weights load and build its network.
async fn assert_whole(population: &Population) {
    for entry in population.alive().await.unwrap() {
        let record = population.individual(&entry.id).await.unwrap().unwrap();
        assert!((record.fitness() - entry.fitness).abs() < 1e-6);
        if record.outcome.failure.is_some() {
            continue;
        }
        let bytes = population.weights(&entry.id).await.unwrap().unwrap();
        let weights = Weights::from_safetensors(&bytes, &Device::Cpu).unwrap();
        let (_, inheritance) = Model::build(
            &record.dna,
            ModelSpec::cifar(10),
            Some(&weights),
            &mut population::seed::rng(0, population::seed::Stream::Initialisation),
            &Device::Cpu,
        )
        .unwrap();
        assert!(
            inheritance.fresh.is_empty(),
            "{}: {inheritance:?}",
            entry.id
        );
    }
}

/// A population that faults left whole: all its places filled once, nothing half-made.
async fn assert_healthy(population: &Population, context: &str) -> Audit {
    let audit = population.audit().await.unwrap();
    assert_eq!(audit.alive, SIZE as usize, "{context}: {audit:?}");
    assert!(audit.zombies.is_empty(), "{context}: {audit:?}");
    assert!(audit.broken.is_empty(), "{context}: {audit:?}");
    assert!(audit.unfilled.is_empty(), "{context}: {audit:?}");
    assert_eq!(audit.leases, 0, "{context}: {audit:?}");
    assert_whole(population).await;
    audit
}

/// Kills a worker after each possible number of requests into its work, then lets another
/// worker carry on: however the first one died, the population ends whole and complete.
async fn death_after_every_request(store: Arc<dyn ObjectStore>, label: &str) {
    let split = tiny_split();
    let spec = spec(store.url(), 8);
    let population = Population::new(store.clone());
    let record = population.start_experiment("dying", &spec).await.unwrap();
    let trainer = trainer(split, &spec);
    // The initial population, and a few reproductions, by a worker that lives.
    run_worker(
        &population,
        &record,
        trainer.clone(),
        settings("founder", 0),
    )
    .await
    .unwrap();
    assert_healthy(&population, label).await;
    let mut limit = 8;
    let mut deaths = 0;
    for survive in 0..60u64 {
        // The victim dies after `survive` requests; a successor of another name finishes
        // the next four trainings.
        limit += 4;
        let mut stop = record.spec.stop.clone();
        stop.individuals_trained = Some(limit);
        population.update_stop(&stop).await.unwrap();
        // A finished bounded run leaves a stop marker; raising the bound resumes it.
        population.clear_stop().await.unwrap();
        let dying = Arc::new(Dying::new(store.clone(), survive));
        let victim = Population::new(dying.clone());
        let outcome = run_worker(
            &victim,
            &record,
            trainer.clone(),
            settings(&format!("victim-{survive}"), survive),
        )
        .await;
        if !dying.died() {
            // It made fewer requests than that before it was done: every point is covered.
            assert!(outcome.is_ok());
            break;
        }
        assert!(outcome.is_err(), "{label}: the victim survived {survive}");
        deaths += 1;
        let successor = run_worker(
            &population,
            &record,
            trainer.clone(),
            settings(&format!("successor-{survive}"), 100 + survive),
        )
        .await
        .unwrap();
        let audit = assert_healthy(&population, &format!("{label}, died after {survive}")).await;
        // At most the one child the victim was training is lost, and the sweeper takes it.
        assert!(audit.orphans.len() <= 1, "{label}, {survive}: {audit:?}");
        let swept = population
            .sweep(Duration::ZERO, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(swept.orphans, audit.orphans.len());
        assert!(population.audit().await.unwrap().orphans.is_empty());
        assert!(successor.adopted <= 1, "{label}, {survive}: {successor:?}");
    }
    assert!(
        deaths >= 15,
        "{label}: only {deaths} points of death covered"
    );
    eprintln!("{label}: a worker died after each of the first {deaths} requests of its work; the population stayed whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_after_any_request_loses_nothing_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    death_after_every_request(store, "file store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_after_any_request_loses_nothing_on_s3() {
    let server = S3Server::start().await;
    let store = as_dyn(s3_store(&server.endpoint, "dying", "x").await);
    death_after_every_request(store, "s3").await;
}

/// A store that fails, hangs or loses responses for a while pauses the worker, which then
/// finishes exactly the trainings it was given.
async fn outages(backend: impl AsyncFn(usize) -> Arc<dyn ObjectStore>, label: &str) {
    for (n, kind) in [Outage::Fail, Outage::Stall, Outage::LoseResponses]
        .into_iter()
        .enumerate()
    {
        let file = backend(n).await;
        let flaky = Arc::new(Flaky::new(file.clone(), kind));
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_millis(300),
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            ..RetryPolicy::forever()
        };
        let population = Population::new(Arc::new(Resilient::new(as_dyn(flaky.clone()), policy)));
        let spec = spec(file.url(), 16);
        let record = population.start_experiment("outage", &spec).await.unwrap();
        let trainer = trainer(tiny_split(), &spec);
        let arm = {
            let flaky = flaky.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                flaky.arm(Duration::from_secs(1));
            })
        };
        let report = run_worker(&population, &record, trainer, settings("patient", 1))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: the worker ended: {e}"));
        arm.await.unwrap();
        let failed = flaky.failed.load(std::sync::atomic::Ordering::Relaxed);
        assert!(failed > 0, "{kind:?}: the outage never met a request");
        let plain = Population::new(file);
        assert_healthy(&plain, &format!("{kind:?}")).await;
        assert_eq!(plain.summary().await.unwrap().trained, 16, "{kind:?}");
        assert_eq!(report.trained, 16, "{kind:?}");
        eprintln!(
            "{label}, {kind:?}: {failed} requests failed during the outage; 16 of 16 trained"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_pause_a_worker_and_it_resumes_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    outages(
        async |n| {
            as_dyn(Arc::new(
                FileStore::open(&root.join(n.to_string())).await.unwrap(),
            ))
        },
        "file store",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_pause_a_worker_and_it_resumes_on_s3() {
    let server = S3Server::start().await;
    let endpoint = server.endpoint.clone();
    outages(
        async |n| as_dyn(s3_store(&endpoint, "outage", &format!("run{n}")).await),
        "s3",
    )
    .await;
}

/// Fails every third child, as a model too large for its device would.
struct Unlucky {
    inner: Arc<dyn ChildTrainer>,
    count: std::sync::atomic::AtomicU64,
}

impl ChildTrainer for Unlucky {
    fn train_child(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, ChildError> {
        if self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 3 == 2 {
            return Err(ChildError::TooLarge {
                needed_mib: 1 << 20,
                available_mib: 1,
                parameters: 1 << 30,
                device: "cpu".into(),
            });
        }
        self.inner.train_child(job, stop)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_that_cannot_be_trained_go_in_as_failures_and_the_worker_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    let spec = spec(store.url(), 18);
    let population = Population::new(store);
    let record = population.start_experiment("unlucky", &spec).await.unwrap();
    let trainer = Arc::new(Unlucky {
        inner: trainer(tiny_split(), &spec),
        count: Default::default(),
    });
    let report = run_worker(&population, &record, trainer, settings("unlucky", 3))
        .await
        .unwrap();
    assert_eq!(report.trained, 18);
    assert_eq!(report.failed, 6);
    assert_healthy(&population, "failures").await;
    let g = report::gather(&population).await.unwrap();
    let failures: Vec<&Individual> = g
        .individuals
        .iter()
        .filter(|i| i.outcome.failure.is_some())
        .collect();
    assert_eq!(failures.len(), 6);
    for failure in &failures {
        assert_eq!(failure.fitness(), 0.0);
        assert!(failure.outcome.failure.as_deref().unwrap().contains("MiB"));
    }
    // A failed individual loses its next tournament: few stay alive.
    let alive_failures = failures
        .iter()
        .filter(|f| g.alive.contains(f.id.as_str()))
        .count();
    assert!(alive_failures <= 2, "{alive_failures} failures alive");
}

/// A child over `spec.training.maxParameters` is not trained: it goes in as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_over_the_parameter_limit_are_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    let mut spec = spec(store.url(), 24).into_inner();
    // The initial linear model's count: any child that grows is over it.
    spec.training.max_parameters = Some(fixtures::LINEAR_PARAMETERS as u64);
    let spec = crds::validate(&spec).unwrap();
    let population = Population::new(store);
    let record = population.start_experiment("limit", &spec).await.unwrap();
    let report = run_worker(
        &population,
        &record,
        trainer(tiny_split(), &spec),
        settings("limited", 5),
    )
    .await
    .unwrap();
    assert_eq!(report.trained, 24);
    let g = report::gather(&population).await.unwrap();
    let over = g
        .individuals
        .iter()
        .filter(|i| i.outcome.failure.is_some())
        .inspect(|i| {
            let why = i.outcome.failure.as_deref().unwrap();
            assert!(why.contains("maxParameters"), "{why}");
        })
        .count();
    assert!(over > 0, "no child grew in 20 reproductions");
    assert!(g
        .individuals
        .iter()
        .filter(|i| i.outcome.failure.is_none())
        .all(|i| i.outcome.parameters <= fixtures::LINEAR_PARAMETERS));
    assert_healthy(&population, "limit").await;
}

/// Runs one worker with `seed` to `trained` individuals in a fresh store; returns its lineage:
/// each individual in order of birth, with its parent by birth number.
async fn lineage(seed: u64, trained: u64) -> Vec<(String, Option<usize>, String, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    let spec = spec(store.url(), trained);
    let population = Population::new(store);
    let record = population.start_experiment("repeat", &spec).await.unwrap();
    run_worker(
        &population,
        &record,
        trainer(tiny_split(), &spec),
        settings("solo", seed),
    )
    .await
    .unwrap();
    let g = report::gather(&population).await.unwrap();
    let order: HashMap<_, _> = g
        .individuals
        .iter()
        .enumerate()
        .map(|(n, i)| (i.id.clone(), n))
        .collect();
    g.individuals
        .iter()
        .map(|i| {
            (
                i.dna.to_json(),
                i.lineage.parent.as_ref().map(|p| order[p]),
                format!("{:.6}", i.fitness()),
                i.lineage.seed,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_with_one_seed_repeats_exactly() {
    let first = lineage(7, 14).await;
    let second = lineage(7, 14).await;
    assert_eq!(first.len(), 14, "individualsTrained: 14 trains exactly 14");
    assert_eq!(first, second);
    let other = lineage(8, 14).await;
    assert_ne!(first, other, "another seed, another run");
}

/// Status, report and evaluation name one best among equals, and skip a better individual
/// whose weights are corrupt rather than export it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_best_for_every_reader_and_nothing_corrupt_exported() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    let spec = spec(store.url(), 100);
    let population = Population::new(store.clone());
    population.start_experiment("ties", &spec).await.unwrap();
    let dna = Population::initial_dna(&spec);
    let (model, _) = Model::build(
        &dna,
        ModelSpec::cifar(10),
        None,
        &mut population::seed::rng(0, population::seed::Stream::Initialisation),
        &Device::Cpu,
    )
    .unwrap();
    let weights = Bytes::from(model.weights().to_safetensors().unwrap());
    let mut ids = Vec::new();
    for fitness in [0.5, 0.75, 0.75, 0.75, 0.9] {
        let mut individual = fixtures::individual(fitness);
        individual.dna = dna.clone();
        population.add(&individual, weights.clone()).await.unwrap();
        ids.push(individual.id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // The best by validation has corrupt weights: 100 random bytes.
    let noise: Vec<u8> = (0..100).map(|_| rand::random()).collect();
    store
        .put(
            &format!("individuals/{}/weights.safetensors", ids[4]),
            Bytes::from(noise),
        )
        .await
        .unwrap();
    let summary = population.summary().await.unwrap();
    let g = report::gather(&population).await.unwrap();
    assert_eq!(summary.best.as_ref().unwrap().id, ids[4]);
    assert_eq!(g.best().unwrap().id, ids[4]);
    let readable = report::best_readable(&population, &g).await.unwrap();
    // Among the three equal ones, the earliest wins, for every reader.
    assert_eq!(readable.individual.id, ids[1]);
    assert_eq!(readable.skipped.len(), 1);
    assert!(
        readable.skipped[0].1.contains("unreadable"),
        "{:?}",
        readable.skipped
    );
    let out = tempfile::tempdir().unwrap();
    report::export_best(&readable, None, out.path())
        .await
        .unwrap();
    let exported = std::fs::read(out.path().join("weights.safetensors")).unwrap();
    assert_eq!(exported, weights);
    let text = report::summary_text(&g, Some(&readable), None);
    assert!(text.contains(&format!("best         {}", ids[1])), "{text}");
    assert!(text.contains(&format!("skipped      {}", ids[4])), "{text}");
    // Without the corrupt one, the status picks the same among the equals.
    store
        .delete(&format!("alive/{}@0.900000", ids[4]))
        .await
        .unwrap();
    assert_eq!(population.summary().await.unwrap().best.unwrap().id, ids[1]);
}
