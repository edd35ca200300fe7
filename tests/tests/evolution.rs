//! Evolution end to end with real training on tiny data: many workers on one population, over
//! the S3 store and the file store, with the bookkeeping checked afterwards.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use cambrian_tests::experiment::{evolve, spec, tiny_split, trainer};
use cambrian_tests::s3s::S3Server;
use cambrian_tests::{as_dyn, s3_store};
use candle_core::Device;
use population::dna::ModelSpec;
use population::fixtures;
use population::stop::StopFlag;
use population::store::{FileStore, ObjectStore, Population};
use trainer::child::ChildJob;
use trainer::model::Model;
use trainer::weights::Weights;
use trainer::worker::WorkerReport;

/// The invariants of a finished run.
async fn check_books(population: &Population, size: usize, reports: &[WorkerReport], peak: usize) {
    assert!(peak <= size, "population reached {peak} > {size}");
    let alive = population.alive().await.unwrap();
    let alive_ids: HashSet<_> = alive.iter().map(|a| a.id.clone()).collect();
    let dead = population.dead().await.unwrap();
    let recorded: HashSet<_> = population.recorded().await.unwrap().into_iter().collect();
    let trained: u64 = reports.iter().map(|r| r.trained).sum();
    let kills: u64 = reports.iter().map(|r| r.kills).sum();
    let abandoned: u64 = reports.iter().map(|r| r.abandoned).sum();
    // Every kill is one tombstone (nobody was killed twice), but for the kills whose child
    // was abandoned at the stop: their losers were given their places back.
    assert!(kills - abandoned <= dead.len() as u64 && dead.len() as u64 <= kills);
    // Alive and dead partition everything ever born.
    assert!(alive_ids.is_disjoint(&dead));
    assert_eq!(alive_ids.union(&dead).count(), recorded.len());
    assert_eq!(trained as usize, recorded.len());
    // Every birth after the first P replaced a kill, and a stop costs nothing.
    assert_eq!(alive.len(), size);
    let audit = population.audit().await.unwrap();
    assert!(
        audit.unfilled.is_empty() && audit.zombies.is_empty() && audit.leases == 0,
        "{audit:?}"
    );
    assert_eq!(population.summary().await.unwrap().trained, trained);
    // Every alive individual loads completely and builds.
    for entry in &alive {
        let record = population.individual(&entry.id).await.unwrap().unwrap();
        assert!((record.fitness() - entry.fitness).abs() < 1e-6);
        let bytes = population.weights(&entry.id).await.unwrap().unwrap();
        let weights = Weights::from_safetensors(&bytes, &Device::Cpu).unwrap();
        Model::build(
            &record.dna,
            ModelSpec::cifar(10),
            Some(&weights),
            &mut population::seed::rng(0, population::seed::Stream::Initialisation),
            &Device::Cpu,
        )
        .unwrap();
    }
}

async fn sixteen_workers(store: Arc<dyn ObjectStore>) {
    let split = tiny_split();
    let spec = spec(store.url(), 8, 80);
    let population = Population::new(store);
    let record = population
        .start_experiment("concurrency", &spec)
        .await
        .unwrap();
    let (reports, peak) = evolve(&population, &record, trainer(split, &spec), 16).await;
    let trained: u64 = reports.iter().map(|r| r.trained).sum();
    let conflicts: u64 = reports.iter().map(|r| r.conflicts).sum();
    let kills: u64 = reports.iter().map(|r| r.kills).sum();
    eprintln!("trained {trained}, kills {kills}, conflicts {conflicts}, peak alive {peak}");
    assert_eq!(trained, 80, "individualsTrained: 80 trains exactly 80");
    assert!(
        reports.iter().filter(|r| r.trained > 0).count() > 8,
        "most workers took part"
    );
    check_books(&population, 8, &reports, peak).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_workers_on_s3() {
    let server = S3Server::start().await;
    sixteen_workers(as_dyn(
        s3_store(&server.endpoint, "evolution", "concurrency").await,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_workers_on_files() {
    let dir = tempfile::tempdir().unwrap();
    sixteen_workers(as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_individual_is_skipped_and_evolution_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    let split = tiny_split();
    let spec = spec(store.url(), 4, 30);
    let population = Population::new(store.clone());
    let record = population.start_experiment("corrupt", &spec).await.unwrap();
    // Fill the initial population by hand, then corrupt one individual's record and
    // another's weights, and drop a foreign object among the alive keys.
    let raise = trainer(split.clone(), &spec);
    for slot in 0..4 {
        assert!(population.claim_slot(slot, "setup").await.unwrap());
        let job = ChildJob {
            dna: Population::initial_dna(&spec),
            parent_weights: None,
            seed: u64::from(slot),
        };
        let child = raise.train_child(job, &StopFlag::default()).unwrap();
        let mut individual = fixtures::individual(child.outcome.validation_accuracy);
        individual.dna = Population::initial_dna(&spec);
        individual.outcome = child.outcome;
        individual.lineage.slot = Some(slot);
        individual.lineage.seed = u64::from(slot);
        individual.lineage.fresh_tensors = child.fresh_tensors;
        population.add(&individual, child.weights).await.unwrap();
    }
    let alive = population.alive().await.unwrap();
    assert_eq!(alive.len(), 4);
    store
        .put(
            &format!("individuals/{}/individual.json", alive[0].id),
            Bytes::from_static(b"{\"garbage\": true}"),
        )
        .await
        .unwrap();
    store
        .put(
            &format!("individuals/{}/weights.safetensors", alive[1].id),
            Bytes::from_static(b"not safetensors"),
        )
        .await
        .unwrap();
    store
        .put("alive/stray-file.txt", Bytes::new())
        .await
        .unwrap();
    let (reports, _) = evolve(&population, &record, trainer(split, &spec), 2).await;
    let trained: u64 = reports.iter().map(|r| r.trained).sum();
    assert!(trained >= 20, "evolution stalled after {trained}");
    // Both broken individuals lost the first tournament they were in.
    let survivors: HashSet<_> = population
        .alive()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert!(!survivors.contains(&alive[0].id) && !survivors.contains(&alive[1].id));
}

/// Every record in the store, in the order their trainings started.
async fn records_in_order(population: &Population) -> Vec<population::individual::Individual> {
    let mut all = Vec::new();
    for id in population.recorded().await.unwrap() {
        all.push(population.individual(&id).await.unwrap().unwrap());
    }
    all.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
    all
}

#[tokio::test]
async fn a_schedule_changes_the_rate_at_its_point_and_the_records_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).await.unwrap());
    let mut json = serde_json::to_value(&*spec(store.url(), 4, 14)).unwrap();
    json["mutationSchedule"] = serde_json::json!([{ "trained": 8, "rate": 3 }]);
    let spec = fixtures::spec(json);
    let population = Population::new(as_dyn(store));
    let record = population
        .start_experiment("schedule", &spec)
        .await
        .unwrap();
    evolve(&population, &record, trainer(tiny_split(), &spec), 1).await;
    let records = records_in_order(&population).await;
    assert_eq!(records.len(), 14);
    // One worker: the first eight were born before the point, the rest after it.
    for (i, r) in records.iter().enumerate() {
        let rate = if i < 8 { 1 } else { 3 };
        assert_eq!(r.lineage.mutation_rate, rate, "training {i}");
        if r.lineage.parent.is_some() {
            assert_eq!(r.lineage.mutations.len(), rate as usize, "training {i}");
        }
    }
    let known = population.interventions().await.unwrap();
    let keys: Vec<&String> = known.by_key.keys().collect();
    assert_eq!(keys, ["control/interventions/schedule.rate.trained-8.3"]);
    assert_eq!(known.mutation_rate(1), 3);
}

#[tokio::test]
async fn a_reset_retrains_every_alive_individual_exactly_once_before_tournaments() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::open(dir.path()).await.unwrap());
    let spec = spec(store.url(), 4, 8);
    let population = Population::new(as_dyn(store));
    let record = population.start_experiment("reset", &spec).await.unwrap();
    let split = tiny_split();
    evolve(&population, &record, trainer(split.clone(), &spec), 2).await;
    let before: HashSet<_> = population
        .alive()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(before.len(), 4);
    population
        .intervene(population::store::Change::ResetWeights, "command")
        .await
        .unwrap();
    let mut stop = spec.stop.clone();
    stop.individuals_trained = Some(16);
    population.update_stop(&stop).await.unwrap();
    population.clear_stop().await.unwrap();
    let record = population.experiment().await.unwrap().unwrap();
    evolve(&population, &record, trainer(split, &spec), 2).await;

    let records = records_in_order(&population).await;
    let retrained: Vec<_> = records.iter().filter(|r| r.lineage.retrained).collect();
    let parents: HashSet<_> = retrained
        .iter()
        .map(|r| r.lineage.parent.clone().unwrap())
        .collect();
    assert_eq!(retrained.len(), 4, "one retraining each");
    assert_eq!(parents, before, "every individual alive at the reset");
    for r in &retrained {
        let parent = records
            .iter()
            .find(|p| Some(&p.id) == r.lineage.parent.as_ref())
            .unwrap();
        assert_eq!(r.dna, parent.dna, "its own DNA");
        assert!(r.lineage.mutations.is_empty());
        assert_eq!(r.lineage.inherited_tensors, 0, "from fresh weights");
        assert_eq!(r.lineage.reset_epoch, 1);
    }
    // Every tournament after the reset compared retrained individuals only.
    let by_id: std::collections::HashMap<_, _> = records.iter().map(|r| (&r.id, r)).collect();
    for r in records
        .iter()
        .filter(|r| r.lineage.reset_epoch == 1 && !r.lineage.retrained)
    {
        let parent = by_id[r.lineage.parent.as_ref().unwrap()];
        assert_eq!(parent.lineage.reset_epoch, 1, "a stale parent reproduced");
    }
    let alive = population.alive().await.unwrap();
    assert_eq!(alive.len(), 4);
    assert!(alive.iter().all(|a| a.epoch == 1));
}
