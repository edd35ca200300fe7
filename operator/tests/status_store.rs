//! The status of a 1,000-individual experiment, computed from a real store: the file store and
//! the S3 store against the local s3s server. Two LIST pages at most.

use std::sync::Arc;

use cambrian_tests::s3_store;
use cambrian_tests::s3s::S3Server;
use population::fixtures::{self, fill};
use population::store::{CountingStore, FileStore, ObjectStore, Population};

fn experiment(url: &str) -> crds::Experiment {
    crds::Experiment {
        name: "big".into(),
        spec: fixtures::spec(serde_json::json!({ "store": { "url": url } })),
    }
}

async fn check<S: ObjectStore + 'static>(store: Arc<CountingStore<S>>, url: &str) {
    let population = Population::new(store.clone());
    let exp = experiment(url);
    population
        .start_experiment(&exp.name, &exp.spec)
        .await
        .unwrap();
    fill(&population, 1000, 250).await;
    let before = store.counts();
    let view = operator::controller::observe_store(&exp, &population)
        .await
        .unwrap();
    let counts = store.counts().minus(&before);
    assert_eq!(view.summary.alive, 1000);
    assert_eq!(view.summary.trained, 2500);
    assert!(view.best.as_ref().unwrap().fitness() > 0.89);
    assert_eq!(counts.lists, 2, "{counts:?}");
    assert!(counts.total() <= 8, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_thousand_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    check(
        Arc::new(CountingStore::new(
            FileStore::open(dir.path()).await.unwrap(),
        )),
        &url,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_thousand_from_s3() {
    let server = S3Server::start().await;
    let s3 = s3_store(&server.endpoint, "status", "big").await;
    let s3 = Arc::try_unwrap(s3).unwrap_or_else(|_| unreachable!());
    let store = Arc::new(CountingStore::new(s3));
    check(store.clone(), "s3://status/big").await;
}
