//! End to end against a real Kubernetes API server, when one is configured:
//!
//!     kind create cluster --name cambrian          # or: k3d cluster create cambrian
//!     CAMBRIAN_E2E_KUBECONFIG=$HOME/.kube/config cargo test -p operator --test e2e -- --nocapture
//!
//! Without `CAMBRIAN_E2E_KUBECONFIG` the test says so and does nothing (no API server can be
//! installed on the machines CI runs on). It installs the CRD, runs the controller in this
//! process, and drives one experiment through admission (CEL rules), creation, suspension,
//! an invalid spec, and deletion with `retention: Delete`. Its store is a folder on this
//! machine and the experiment stays suspended, so no trainer image or GPU is needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::{EvolutionExperiment, Phase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use operator::controller::{self, Context};
use operator::jobs::JobSettings;
use operator::metrics::Metrics;

const NAMESPACE: &str = "cambrian-e2e";

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn experiment_lifecycle_on_a_real_cluster() {
    let Some(path) = std::env::var_os("CAMBRIAN_E2E_KUBECONFIG") else {
        eprintln!(
            "skipped: set CAMBRIAN_E2E_KUBECONFIG to a kubeconfig (kind or k3d) to run the end-to-end test"
        );
        return;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    let client = Client::try_from(config).expect("client");

    // CRD and namespace.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("cambrian-e2e").force();
    crds.patch(
        "evolutionexperiments.cambrian.dev",
        &apply,
        &Patch::Apply(EvolutionExperiment::crd()),
    )
    .await
    .expect("CRD applied");
    eventually("the CRD to be established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("evolutionexperiments.cambrian.dev").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .patch(
            NAMESPACE,
            &apply,
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE }
            })),
        )
        .await;

    let ctx = Arc::new(Context::new(
        client.clone(),
        Metrics::default(),
        JobSettings::default(),
    ));
    let controller = tokio::spawn(controller::run(ctx));
    let experiments: Api<EvolutionExperiment> = Api::namespaced(client.clone(), NAMESPACE);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);

    // Admission: the CEL rule rejects more workers than individuals.
    let store = tempfile::tempdir().unwrap();
    let manifest = |workers: u32, suspend: bool| {
        serde_json::from_value::<EvolutionExperiment>(serde_json::json!({
            "apiVersion": "cambrian.dev/v1alpha1",
            "kind": "EvolutionExperiment",
            "metadata": { "name": "e2e", "namespace": NAMESPACE },
            "spec": {
                "population": 8,
                "workers": workers,
                "suspend": suspend,
                "store": { "url": format!("file://{}", store.path().display()), "retention": "Delete" }
            }
        }))
        .unwrap()
    };
    let rejected = experiments
        .create(&PostParams::default(), &manifest(9, true))
        .await;
    assert!(rejected.is_err(), "workers > population was admitted");

    // Creation, suspended: a suspended workers Job, phase Suspended.
    experiments
        .create(&PostParams::default(), &manifest(2, true))
        .await
        .expect("created");
    let job = eventually("the workers Job", || {
        let jobs = jobs.clone();
        async move { jobs.get_opt("e2e-workers").await.ok().flatten() }
    })
    .await;
    let spec = job.spec.unwrap();
    assert_eq!((spec.parallelism, spec.suspend), (Some(2), Some(true)));
    eventually("phase Suspended", || {
        let experiments = experiments.clone();
        async move {
            let e = experiments.get("e2e").await.ok()?;
            (e.status?.phase? == Phase::Suspended).then_some(())
        }
    })
    .await;

    // Deletion with retention Delete: the store is emptied, the object goes.
    experiments
        .delete("e2e", &DeleteParams::default())
        .await
        .expect("deleted");
    eventually("the experiment to be gone", || {
        let experiments = experiments.clone();
        async move {
            experiments
                .get_opt("e2e")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(
        !store.path().join("experiment.json").exists(),
        "the store was not emptied"
    );
    controller.abort();
}
