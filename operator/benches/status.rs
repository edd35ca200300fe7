//! Status computation for a 1,000-individual population (250 workers' progress keys) on the
//! local S3 server: requests, LIST pages and milliseconds per status.
//!
//!     cargo bench -p operator --bench status

use std::sync::Arc;
use std::time::Instant;

use cambrian_tests::s3_store;
use cambrian_tests::s3s::S3Server;
use population::fixtures::{self, fill};
use population::store::{CountingStore, Population};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = S3Server::start().await;
        let s3 = s3_store(&server.endpoint, "status", "bench").await;
        let s3 = Arc::try_unwrap(s3).unwrap_or_else(|_| unreachable!());
        let store = Arc::new(CountingStore::new(s3));
        let population = Population::new(store.clone());
        let exp = crds::Experiment {
            name: "bench".into(),
            spec: fixtures::spec(serde_json::json!({ "store": { "url": "s3://status/bench" } })),
        };
        population.start_experiment(&exp.name, &exp.spec).await.unwrap();
        fill(&population, 1000, 250).await;
        let rounds = 20;
        let before = store.counts();
        let pages_before = store.inner().list_pages();
        let started = Instant::now();
        for _ in 0..rounds {
            operator::controller::observe_store(&exp, &population).await.unwrap();
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / rounds as f64;
        let counts = store.counts().minus(&before);
        let pages = store.inner().list_pages() - pages_before;
        println!(
            "status of 1,000 alive / 250 workers on s3s: {ms:.1} ms, {:.1} requests ({:.1} LIST pages, {:.1} GETs) per status",
            counts.total() as f64 / rounds as f64,
            pages as f64 / rounds as f64,
            counts.gets as f64 / rounds as f64,
        );
    });
}
