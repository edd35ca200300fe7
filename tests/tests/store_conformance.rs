//! One conformance suite, run against every backend: the file store, the S3 store against
//! s3s-fs in process, and the S3 store against moto. What passes here is what the population
//! relies on.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use cambrian_tests::moto::moto;
use cambrian_tests::s3s::{Fault, S3Server};
use cambrian_tests::{as_dyn, s3_store, unique_bucket};
use population::fixtures::{self, individual};
use population::store::{
    AliveEntry, FileStore, ObjectStore, Population, ProgressEntry, StoreError, Vacancy,
};

async fn objects(store: &dyn ObjectStore) {
    assert_eq!(store.get("a/missing").await.unwrap(), None);
    store.put("a/x", Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(store.get("a/x").await.unwrap().unwrap(), &b"one"[..]);
    store.put("a/x", Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(store.get("a/x").await.unwrap().unwrap(), &b"two"[..]);
    store.put("a/b/y@0.5", Bytes::new()).await.unwrap();
    store.put("ab/z", Bytes::new()).await.unwrap();
    let mut listed = store.list("a/").await.unwrap();
    listed.sort();
    assert_eq!(listed, vec!["a/b/y@0.5", "a/x"]);
    assert!(store.list("nothing/").await.unwrap().is_empty());
    store.delete("a/x").await.unwrap();
    store.delete("a/x").await.unwrap();
    assert_eq!(store.get("a/x").await.unwrap(), None);
}

async fn create_only(store: &dyn ObjectStore) {
    assert!(store
        .put_new("once", Bytes::from_static(b"first"))
        .await
        .unwrap());
    assert!(!store
        .put_new("once", Bytes::from_static(b"second"))
        .await
        .unwrap());
    assert_eq!(store.get("once").await.unwrap().unwrap(), &b"first"[..]);
    // A retry of a write whose response was lost finds its own body: it won.
    assert!(store
        .put_new("once", Bytes::from_static(b"first"))
        .await
        .unwrap());
}

/// 64 racing create-only writes of one key: exactly one wins, and the object is whole.
async fn create_only_race(store: Arc<dyn ObjectStore>) {
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![i as u8; 4096]);
            (i, store.put_new("race", body).await.unwrap())
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, won) = t.await.unwrap();
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let body = store.get("race").await.unwrap().unwrap();
    assert_eq!(body.len(), 4096);
    assert!(body.iter().all(|&b| b == winners[0] as u8), "torn object");
}

async fn bad_keys(store: &dyn ObjectStore) {
    for key in ["../escape", "a/../../b", "/abs", "a//b", "sp ace"] {
        let err = store.get(key).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}: {err}");
        assert!(store.put(key, Bytes::new()).await.is_err());
    }
    assert!(store.list("noslash").await.is_err());
}

/// More keys than one LIST page holds (S3 pages are 1,000 keys).
async fn long_listing(store: Arc<dyn ObjectStore>) {
    let mut tasks = Vec::new();
    for chunk in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..105 {
                store
                    .put(&format!("many/{chunk:02}-{i:03}"), Bytes::new())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let keys: HashSet<String> = store.list("many/").await.unwrap().into_iter().collect();
    assert_eq!(keys.len(), 1050);
}

fn spec(url: &str) -> crds::ValidatedSpec {
    fixtures::spec(serde_json::json!({ "population": 4, "store": { "url": url } }))
}

async fn population(store: Arc<dyn ObjectStore>) {
    let population = Population::new(store.clone());
    let url = store.url().to_string();
    let record = population
        .start_experiment("conformance", &spec(&url))
        .await
        .unwrap();
    // Resuming with the same spec is fine; another spec is refused.
    let again = population
        .start_experiment("conformance", &spec(&url))
        .await
        .unwrap();
    assert_eq!(again.created_at_ms, record.created_at_ms);
    let mut other = spec(&url).into_inner();
    other.population = 5;
    let err = population
        .start_experiment("other", &crds::validate(&other).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different spec"), "{err}");
    // The mutation rate is not identity: an edit is recorded as an intervention, once.
    let mut edited = spec(&url).into_inner();
    edited.mutation_rate = 5;
    assert!(population.update_mutable(&edited).await.unwrap());
    assert!(!population.update_mutable(&edited).await.unwrap());
    let known = population.interventions().await.unwrap();
    assert_eq!(known.by_key.len(), 1, "{known:?}");
    assert_eq!(known.mutation_rate(1), 5);
    assert_eq!(known.in_order()[0].source, "spec");
    population
        .start_experiment("conformance", &crds::validate(&edited).unwrap())
        .await
        .unwrap();

    // Slots are claimed exactly once.
    assert!(population.claim_slot(0, "w1").await.unwrap());
    assert!(!population.claim_slot(0, "w2").await.unwrap());
    assert_eq!(
        population.claimed_slots().await.unwrap(),
        HashSet::from([0])
    );

    // An individual exists once its alive key is written, with its fitness in the key.
    let a = individual(0.25);
    let b = individual(0.5);
    population
        .add(&a, Bytes::from_static(b"weights-a"))
        .await
        .unwrap();
    population
        .add(&b, Bytes::from_static(b"weights-b"))
        .await
        .unwrap();
    let alive = population.alive().await.unwrap();
    assert_eq!(alive.len(), 2);
    assert!(alive.contains(&AliveEntry::new(a.id.clone(), 0.25)));
    assert_eq!(population.individual(&a.id).await.unwrap().unwrap(), a);

    // Concurrent kills of one individual: exactly one wins. The alive key goes at once; the
    // weights stay until the place is filled, the record for good.
    let victim = AliveEntry::new(a.id.clone(), 0.25);
    let mut kills = Vec::new();
    for i in 0..16 {
        let (population, victim) = (population.clone(), victim.clone());
        kills.push(tokio::spawn(async move {
            population.kill(&victim, &format!("w{i}")).await.unwrap()
        }));
    }
    let mut won = 0;
    for k in kills {
        won += usize::from(k.await.unwrap());
    }
    assert_eq!(won, 1);
    assert_eq!(population.alive().await.unwrap().len(), 1);
    assert!(population.weights(&a.id).await.unwrap().is_some());
    // Its place is filled exactly once, however many children race for it.
    let place = Vacancy::Replacing(a.id.clone());
    let mut fills = Vec::new();
    for _ in 0..8 {
        let (population, place) = (population.clone(), place.clone());
        fills.push(tokio::spawn(async move {
            let child = individual(0.3);
            let won = population.publish_into(&place, &child).await.unwrap();
            (won, child.id)
        }));
    }
    let mut winners = Vec::new();
    for f in fills {
        let (won, id) = f.await.unwrap();
        if won {
            winners.push(id);
        } else {
            assert!(population.individual(&id).await.unwrap().is_none());
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        population.filled_by(&place).await.unwrap(),
        Some(winners[0].clone())
    );
    assert_eq!(population.alive().await.unwrap().len(), 2);
    population.collect(&victim).await.unwrap();
    assert_eq!(population.weights(&a.id).await.unwrap(), None);
    let child = AliveEntry::new(winners[0].clone(), 0.3);
    assert!(population.kill(&child, "w0").await.unwrap());
    // A kill undone: alive again, killable again.
    population.revive(&child).await.unwrap();
    assert!(!population.is_dead(&child.id).await.unwrap());
    assert!(population.kill(&child, "w0").await.unwrap());
    population.collect(&child).await.unwrap();
    assert!(population.individual(&a.id).await.unwrap().is_some());
    assert_eq!(
        population.dead().await.unwrap(),
        HashSet::from([a.id.clone(), winners[0].clone()])
    );

    // Progress keys replace each other; the summary adds them up.
    let mut entry = ProgressEntry {
        worker: "w1".into(),
        trained: 1,
        flops: 1e9,
        seconds: 1.0,
        best: Some(AliveEntry::new(b.id.clone(), 0.5)),
    };
    let key = population.record_progress(&entry, None).await.unwrap();
    entry.trained = 2;
    population
        .record_progress(&entry, Some(&key))
        .await
        .unwrap();
    let summary = population.summary().await.unwrap();
    assert_eq!((summary.alive, summary.trained), (1, 2));
    assert_eq!(summary.best.unwrap().id, b.id);

    // Stop marker: set once.
    assert!(population.stop_marker().await.unwrap().is_none());
    assert!(population.request_stop("test").await.unwrap());
    assert!(!population.request_stop("again").await.unwrap());
    assert_eq!(
        population.stop_marker().await.unwrap().unwrap().reason,
        "test"
    );

    // A foreign object among the alive keys is skipped; a corrupt record is an error the
    // caller can skip, not a crash.
    store.put("alive/not-ours.txt", Bytes::new()).await.unwrap();
    assert_eq!(population.alive().await.unwrap().len(), 1);
    store
        .put(
            &format!("individuals/{}/individual.json", b.id),
            Bytes::from_static(b"{ not json"),
        )
        .await
        .unwrap();
    let err = population.individual(&b.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

async fn suite(store: Arc<dyn ObjectStore>) {
    objects(store.as_ref()).await;
    create_only(store.as_ref()).await;
    create_only_race(store.clone()).await;
    bad_keys(store.as_ref()).await;
    long_listing(store.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    suite(store).await;
    let dir = tempfile::tempdir().unwrap();
    population(as_dyn(Arc::new(FileStore::open(dir.path()).await.unwrap()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conforms_on_s3s() {
    let server = S3Server::start().await;
    suite(as_dyn(
        s3_store(&server.endpoint, "conformance", "runs/a").await,
    ))
    .await;
    population(as_dyn(
        s3_store(&server.endpoint, "conformance", "runs/b").await,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conforms_on_moto() {
    let endpoint = moto().endpoint.clone();
    let bucket = unique_bucket("conformance");
    suite(as_dyn(s3_store(&endpoint, &bucket, "runs/a").await)).await;
    population(as_dyn(s3_store(&endpoint, &bucket, "").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_faults_are_retried() {
    let server = S3Server::start().await;
    let store = s3_store(&server.endpoint, "faults", "x").await;
    // 503s are retried by the SDK, 409s on conditional writes by the store.
    server.faults.plan(&[Fault::SlowDown, Fault::SlowDown]);
    store.put("a", Bytes::from_static(b"1")).await.unwrap();
    server
        .faults
        .plan(&[Fault::Conflict, Fault::SlowDown, Fault::Conflict]);
    assert!(store.put_new("b", Bytes::from_static(b"2")).await.unwrap());
    assert_eq!(
        server.faults.served(),
        vec![
            Fault::SlowDown,
            Fault::SlowDown,
            Fault::Conflict,
            Fault::SlowDown,
            Fault::Conflict
        ]
    );
    assert_eq!(store.get("b").await.unwrap().unwrap(), &b"2"[..]);
    // A create-only write that keeps conflicting gives up with an error naming the key.
    server.faults.plan(&[Fault::Conflict; 8]);
    let err = store.put_new("c", Bytes::new()).await.unwrap_err();
    assert!(err.to_string().contains('c'), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_named() {
    let server = S3Server::start().await;
    let _ = s3_store(&server.endpoint, "creds", "").await;
    let store = population::store::S3Store::connect(population::store::S3Settings {
        bucket: "creds".into(),
        prefix: String::new(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        credentials: Some(("wrong".into(), "wrong".into())),
    })
    .await
    .unwrap();
    let err = store.get("x").await.unwrap_err();
    assert!(matches!(err, StoreError::Credentials { .. }), "{err}");
    assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
}
