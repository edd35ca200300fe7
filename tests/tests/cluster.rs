//! The operator on a real Kubernetes control plane: kube-apiserver and kube-controller-manager
//! built from Kubernetes' own modules (`cambrian_tests::cluster`), the chart rendered by
//! `helm template` and applied with `kubectl`, the operator running as the chart's Deployment
//! under its own ServiceAccount and RBAC, and worker pods run by the test node as real
//! `trainer` processes against a real S3 server, on a tiny generated data set.
//!
//! Each test works in a namespace of its own; they share one control plane, one node, one
//! operator and one S3 server, started on first use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cambrian_tests::cluster::node::{NodeConfig, TestNode};
use cambrian_tests::cluster::{repo, target, write_file, ControlPlane};
use cambrian_tests::s3s::S3Server;
use cambrian_tests::tools::{helm, kubectl};
use crds::{EvolutionExperiment, Phase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

const OPERATOR_NAMESPACE: &str = "cambrian-system";
const IMAGES: &str = "cambrian.test";
const TRAINER_IMAGE: &str = "cambrian.test/trainer:dev";

/// What every test shares. The node and the S3 server live on a runtime of their own, since
/// each test has its own and ends it when done.
struct Cluster {
    control_plane: &'static ControlPlane,
    node: TestNode,
    s3_endpoint: String,
    _s3: S3Server,
    _runtime: tokio::runtime::Runtime,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    // Started on a thread of its own: the caller is a test's runtime, which cannot block on
    // another.
    CLUSTER.get_or_init(|| {
        std::thread::spawn(start_cluster)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn start_cluster() -> Cluster {
    {
        let binaries = build_binaries();
        let control_plane = ControlPlane::shared();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let (node, s3) = runtime.block_on(async {
            let client = control_plane.client().await.expect("admin client");
            let work_dir = control_plane.logs().join("node");
            let config = NodeConfig {
                name: "cambrian-test-node".into(),
                images: vec![(IMAGES.into(), binaries)],
                work_dir,
                server: control_plane.server().into(),
                ca_pem: control_plane.ca_pem().expect("CA"),
                // Pods share this machine's loopback: ports they would each have to
                // themselves in a pod network are chosen by the kernel here.
                env_overrides: vec![
                    ("CAMBRIAN_HTTP_ADDRESS".into(), "127.0.0.1:0".into()),
                    ("RUST_LOG".into(), "info,operator=debug".into()),
                ],
            };
            let node = TestNode::start(client, config).await.expect("test node");
            (node, S3Server::start().await)
        });
        install_operator(control_plane);
        Cluster {
            control_plane,
            node,
            s3_endpoint: s3.endpoint.clone(),
            _s3: s3,
            _runtime: runtime,
        }
    }
}

/// The debug builds of the operator and the trainer, the binaries behind the test images.
/// `cargo test --workspace` builds them with the tests; a test run on its own builds them
/// when they are missing or older than the sources.
fn build_binaries() -> PathBuf {
    let dir = target().join("debug");
    let built = ["operator", "trainer"]
        .iter()
        .map(|b| modified(&dir.join(b)))
        .min()
        .flatten();
    let sources = ["operator", "trainer", "population", "crds"]
        .iter()
        .filter_map(|c| newest(&repo().join(c).join("src")))
        .max();
    if let (Some(built), Some(sources)) = (built, sources) {
        if built >= sources {
            return dir;
        }
    }
    eprintln!(
        "the operator and trainer binaries in {} are missing or older than their sources: building them",
        dir.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "operator", "-p", "trainer", "--bins"])
        .current_dir(repo())
        .status()
        .expect("cargo");
    assert!(status.success(), "building the operator and the trainer");
    dir
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut latest = modified(dir);
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest(&path)
        } else {
            modified(&path)
        };
        latest = latest.max(time);
    }
    latest
}

fn kubectl_command(cp: &ControlPlane) -> Command {
    let mut cmd = Command::new(kubectl());
    cmd.arg("--kubeconfig").arg(cp.kubeconfig());
    cmd
}

/// Runs kubectl; its output, or its error output when it fails.
fn kubectl_run(args: &[&str]) -> Result<String, String> {
    let out = kubectl_command(ControlPlane::shared())
        .args(args)
        .output()
        .expect("kubectl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{stderr}"))
    }
}

/// `helm template` of the chart, applied with `kubectl apply --server-side`, CRD included.
fn install_operator(cp: &ControlPlane) {
    let rendered = Command::new(helm())
        .args([
            "template",
            "evolution",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--include-crds",
        ])
        .arg(repo().join("charts/evolution-operator"))
        .args([
            "--set",
            &format!("image.repository={IMAGES}/operator"),
            "--set",
            "image.tag=dev",
            "--set",
            &format!("trainerImage={TRAINER_IMAGE}"),
            "--set",
            "trainerGpus=0",
            "--set",
            "statusRefreshSeconds=2",
        ])
        .output()
        .expect("helm");
    assert!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let dir = cp.logs();
    let manifest = write_file(
        &dir,
        "operator.yaml",
        &String::from_utf8_lossy(&rendered.stdout),
    )
    .expect("manifest");
    let _ = kubectl_command(cp)
        .args(["create", "namespace", OPERATOR_NAMESPACE])
        .output();
    let out = kubectl_command(cp)
        .args(["apply", "--server-side", "-f"])
        .arg(&manifest)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn client() -> kube::Client {
    cluster().control_plane.client().await.expect("client")
}

/// Polls `check` every half second until it gives a value, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; logs in {}",
            cluster().control_plane.logs().display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A namespace for one test, with the store's credentials Secret in it, and a bucket with the
/// tiny data set under `data/`.
struct Scene {
    client: kube::Client,
    namespace: String,
    bucket: String,
}

impl Scene {
    async fn new(name: &str) -> Scene {
        let cluster = cluster();
        let client = client().await;
        let namespace = format!("t-{name}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": namespace } })).unwrap(),
            )
            .await
            .expect("namespace");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": "s3" },
                    "stringData": {
                        "AWS_ACCESS_KEY_ID": cambrian_tests::ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": cambrian_tests::SECRET_KEY,
                    },
                }))
                .unwrap(),
            )
            .await
            .expect("secret");
        let bucket = cambrian_tests::unique_bucket(name);
        let s3 = cambrian_tests::s3_client(&cluster.s3_endpoint).await;
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("bucket");
        let data = tempfile::tempdir().expect("data folder");
        trainer::data::fixture::write(data.path(), crds::Dataset::Cifar10, 24, 7).expect("data");
        for entry in std::fs::read_dir(data.path()).expect("data folder") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let body = std::fs::read(&path).expect("data file");
            s3.put_object()
                .bucket(&bucket)
                .key(format!("data/{name}"))
                .body(body.into())
                .send()
                .await
                .expect("upload");
        }
        Scene {
            client,
            namespace,
            bucket,
        }
    }

    /// A tiny experiment: four individuals, two workers, a few training steps each.
    fn manifest(&self, name: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({
            "population": 4,
            "workers": 2,
            "training": { "steps": 2, "batchSize": 8, "momentum": 0.9, "weightDecay": 0.0001, "initialLearningRate": 0.05 },
            "data": { "source": format!("s3://{}/data", self.bucket), "validationImages": 16 },
            "store": {
                "url": format!("s3://{}/{name}", self.bucket),
                "endpoint": cluster().s3_endpoint,
                "region": "us-east-1",
                "pathStyle": true,
                "credentialsSecret": "s3",
            },
            "stop": { "individualsTrained": 10 },
            "worker": { "image": TRAINER_IMAGE, "device": "cpu" },
        });
        merge(&mut spec, extra);
        json!({
            "apiVersion": "cambrian.dev/v1alpha1",
            "kind": "EvolutionExperiment",
            "metadata": { "name": name, "namespace": self.namespace },
            "spec": spec,
        })
    }

    /// `kubectl apply` of a manifest.
    fn apply(&self, manifest: &serde_json::Value) -> Result<String, String> {
        let dir = cluster().control_plane.logs();
        let name = format!(
            "{}-{}.json",
            self.namespace,
            manifest["metadata"]["name"].as_str().unwrap_or("x")
        );
        let path = write_file(&dir, &name, &manifest.to_string()).expect("manifest file");
        kubectl_run(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            path_str(&path),
        ])
    }

    fn experiments(&self) -> Api<EvolutionExperiment> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn experiment(&self, name: &str) -> Option<EvolutionExperiment> {
        self.experiments().get_opt(name).await.ok().flatten()
    }

    /// Waits until the experiment's status satisfies `check`.
    async fn until(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&crds::EvolutionExperimentStatus) -> bool,
    ) -> crds::EvolutionExperimentStatus {
        let check = &check;
        eventually(what, limit, || async move {
            let status = self.experiment(name).await?.status?;
            check(&status).then_some(status)
        })
        .await
    }

    /// Worker pods of an experiment that are not being deleted and have not ended.
    async fn live_workers(&self, name: &str) -> Vec<Pod> {
        let selector = format!(
            "cambrian.dev/experiment={},app.kubernetes.io/component=workers",
            operator_label(name)
        );
        let pods = self
            .pods()
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        pods.into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .collect()
    }

    async fn all_pods(&self) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// Objects under the experiment's store prefix.
    async fn stored(&self, name: &str) -> Vec<String> {
        let s3 = cambrian_tests::s3_client(&cluster().s3_endpoint).await;
        let out = s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{name}/"))
            .send()
            .await
            .expect("list");
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }

    async fn stored_object(&self, key: &str) -> Option<String> {
        let s3 = cambrian_tests::s3_client(&cluster().s3_endpoint).await;
        let out = s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        let bytes = out.body.collect().await.ok()?.into_bytes();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn patch_spec(&self, name: &str, spec: serde_json::Value) -> Result<(), kube::Error> {
        self.experiments()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .map(|_| ())
    }

    /// Logs of this namespace's pods, for failure messages.
    fn logs(&self, pods: &[Pod]) -> String {
        pods.iter()
            .map(|p| {
                let name = p.name_any();
                let log = cluster().node.log(&self.namespace, &name, "trainer");
                let tail: String = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("--- {name}\n{tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(base), serde_json::Value::Object(extra)) => {
            for (key, value) in extra {
                merge(base.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (base, extra) => *base = extra,
    }
}

fn operator_label(name: &str) -> String {
    operator::jobs::label_value(name)
}

fn phase(status: &crds::EvolutionExperimentStatus) -> Option<Phase> {
    status.phase
}

const LONG: Duration = Duration::from_secs(240);

/// Held shared by every scenario, and exclusively by the one that kills operator replicas:
/// the others would see a minute without a leader, and a new leader without the store
/// clients the old one had made.
static OPERATOR: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[tokio::test]
async fn cel_rules_refuse_at_admission_and_printer_columns_show_values() {
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("admission").await;
    let refused = [
        (
            json!({ "workers": 9 }),
            "spec.workers must be at most spec.population",
        ),
        (
            json!({ "training": { "momentum": 1.5 } }),
            "momentum must be in [0, 1)",
        ),
        (
            json!({ "stop": { "targetValidationAccuracy": 1.5 } }),
            "targetValidationAccuracy must be in (0, 1]",
        ),
        (
            json!({ "store": { "url": "gs://bucket/x" } }),
            "store.url must be",
        ),
        (json!({ "population": 1 }), "spec.population"),
    ];
    for (extra, message) in refused {
        let manifest = scene.manifest("refused", extra.clone());
        let error = scene
            .apply(&manifest)
            .expect_err(&format!("{extra} was admitted"));
        assert!(error.contains(message), "{extra}: {error}");
    }
    // A suspended experiment: admitted, reported, nothing runs.
    let manifest = scene.manifest("columns", json!({ "suspend": true }));
    scene.apply(&manifest).expect("a valid experiment");
    scene
        .until("columns", "phase Suspended", LONG, |s| {
            phase(s) == Some(Phase::Suspended)
        })
        .await;
    let table = kubectl_run(&["get", "evo", "-n", &scene.namespace]).expect("kubectl get evo");
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "PHASE",
        "WORKERS",
        "POPULATION",
        "TRAINED",
        "BEST-VAL",
        "TEST",
        "AGE",
    ] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        table.contains("Suspended") && table.contains("columns"),
        "{table}"
    );
    // Immutable fields refuse edits at admission; mutable ones take them.
    let error = scene
        .patch_spec("columns", json!({ "seed": 7 }))
        .await
        .expect_err("seed edit admitted");
    assert!(
        error.to_string().contains("spec.seed cannot change"),
        "{error}"
    );
    let error = scene
        .patch_spec("columns", json!({ "training": { "steps": 9 } }))
        .await
        .expect_err("training edit admitted");
    assert!(
        error.to_string().contains("spec.training cannot change"),
        "{error}"
    );
    scene
        .patch_spec(
            "columns",
            json!({ "workers": 1, "stop": { "individualsTrained": 3 } }),
        )
        .await
        .expect("workers and stop are mutable");
    // A file:// store is refused by the operator on a cluster, with a condition saying why.
    let mut manifest = scene.manifest("private", json!({}));
    manifest["spec"]["store"] = json!({ "url": "file:///var/lib/cambrian" });
    scene
        .apply(&manifest)
        .expect("admitted: file:// is valid for local runs");
    let status = scene
        .until("private", "a refusal", LONG, |s| {
            phase(s) == Some(Phase::Invalid)
        })
        .await;
    let valid = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Valid")
        .unwrap();
    assert_eq!(valid.reason, "StoreNotShared", "{valid:?}");
    let job = operator::jobs::job_name("private", "workers");
    assert!(
        scene.jobs().get_opt(&job).await.unwrap().is_none(),
        "{job} created"
    );
}

#[tokio::test]
async fn an_experiment_runs_suspends_resumes_survives_disruption_and_succeeds() {
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("lifecycle").await;
    // A name with dots, as DNS subdomain names may have.
    let name = "tiny.run-1";
    let manifest = scene.manifest(
        name,
        // Twelve individuals: each worker stopped mid-reproduction (suspend, deletion,
        // eviction) can take one with it, and four must not empty the population.
        json!({ "population": 12, "stop": { "individualsTrained": 100000 }, "store": { "retention": "Delete" } }),
    );
    scene.apply(&manifest).expect("kubectl apply");
    let status = scene
        .until(name, "workers running and training", LONG, |s| {
            phase(s) == Some(Phase::Running) && s.trained.unwrap_or(0) >= 2
        })
        .await;
    assert_eq!(status.workers, Some(2));

    // Suspend: the pods go; the population stays.
    scene
        .patch_spec(name, json!({ "suspend": true }))
        .await
        .expect("suspend");
    scene
        .until(name, "phase Suspended", LONG, |s| {
            phase(s) == Some(Phase::Suspended)
        })
        .await;
    eventually("worker pods to go", LONG, || async {
        scene.live_workers(name).await.is_empty().then_some(())
    })
    .await;
    let trained = scene
        .experiment(name)
        .await
        .unwrap()
        .status
        .unwrap()
        .trained
        .unwrap_or(0);
    let exp = scene.experiment(name).await.unwrap();
    assert_eq!(
        exp.status.as_ref().and_then(|s| s.observed_generation),
        exp.metadata.generation,
        "observedGeneration follows"
    );

    // Resume: the population continues from the store.
    scene
        .patch_spec(name, json!({ "suspend": false }))
        .await
        .expect("resume");
    let pods = eventually("two worker pods running again", LONG, || async {
        let pods = scene.live_workers(name).await;
        let running = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        (running == 2).then_some(pods)
    })
    .await;

    // A deleted pod and an evicted pod are replaced; the experiment goes on.
    scene
        .pods()
        .delete(&pods[0].name_any(), &DeleteParams::default())
        .await
        .expect("delete a worker pod");
    scene
        .pods()
        .evict(&pods[1].name_any(), &EvictParams::default())
        .await
        .expect("evict a worker pod");
    let gone = [pods[0].name_any(), pods[1].name_any()];
    eventually("two replacement pods", LONG, || async {
        let pods = scene.live_workers(name).await;
        let new = pods
            .iter()
            .filter(|p| !gone.contains(&p.name_any()))
            .count();
        (new == 2).then_some(())
    })
    .await;

    // Replacements train too; then a stop condition a few individuals on ends it.
    let now = scene
        .until(name, "training after the disruption", LONG, |s| {
            s.trained.unwrap_or(0) > trained + 1
        })
        .await
        .trained
        .unwrap_or(0);
    scene
        .patch_spec(name, json!({ "stop": { "individualsTrained": now + 2 } }))
        .await
        .expect("a nearer stop");
    let status = scene
        .until(name, "phase Succeeded", Duration::from_secs(420), |s| {
            phase(s) == Some(Phase::Succeeded)
        })
        .await;
    assert!(
        status.trained.unwrap_or(0) > trained,
        "training continued after resume"
    );
    let best = status.best.expect("a best individual");
    let test = best
        .test_accuracy
        .expect("the evaluation wrote a test accuracy");
    assert!((0.0..=1.0).contains(&test));
    assert!(status.completion_time.is_some());
    let complete = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Complete")
        .unwrap();
    assert_eq!(complete.status, "True");

    // Deletion with retention Delete: the object goes, after its pods, and the store is empty.
    scene
        .experiments()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the experiment to be gone", LONG, || async {
        scene.experiment(name).await.is_none().then_some(())
    })
    .await;
    let left = scene.stored(name).await;
    assert!(left.is_empty(), "objects left in the store: {left:?}");
    let pods = scene.all_pods().await;
    let running: Vec<_> = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    assert!(
        running.is_empty(),
        "pods still running: {}",
        scene.logs(&pods)
    );
}

#[tokio::test]
async fn spec_edits_are_applied_never_wedged() {
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("edits").await;
    let name = "edited";
    let manifest = scene.manifest(name, json!({ "stop": { "individualsTrained": 100000 } }));
    scene.apply(&manifest).expect("kubectl apply");
    scene
        .until(name, "workers running", LONG, |s| {
            phase(s) == Some(Phase::Running)
        })
        .await;
    let first = scene
        .jobs()
        .get(&operator::jobs::job_name(name, "workers"))
        .await
        .expect("workers Job");

    // Scaling: the Job takes it in place.
    scene
        .patch_spec(name, json!({ "workers": 1 }))
        .await
        .expect("scale");
    eventually("parallelism 1", LONG, || async {
        let job = scene.jobs().get_opt(&first.name_any()).await.ok()??;
        let exp = scene.experiment(name).await?;
        let observed = exp.status?.observed_generation;
        (job.spec.as_ref()?.parallelism == Some(1)
            && job.uid() == first.uid()
            && observed == exp.metadata.generation)
            .then_some(())
    })
    .await;

    // A new image: a new pod template, so a new Job; the population carries on.
    scene
        .patch_spec(
            name,
            json!({ "worker": { "image": "cambrian.test/trainer:v2" } }),
        )
        .await
        .expect("new image");
    eventually("a new workers Job running the new image", LONG, || async {
        let job = scene.jobs().get_opt(&first.name_any()).await.ok()??;
        let image = job.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone();
        let ready = job.status.as_ref()?.ready.unwrap_or(0);
        (job.uid() != first.uid()
            && image.as_deref() == Some("cambrian.test/trainer:v2")
            && ready > 0)
            .then_some(())
    })
    .await;

    // Editing stop: the stored record follows, and the experiment ends on the new condition.
    scene
        .patch_spec(name, json!({ "stop": { "individualsTrained": 6 } }))
        .await
        .expect("edit stop");
    let status = scene
        .until(
            name,
            "the edited stop condition to end it",
            Duration::from_secs(420),
            |s| matches!(phase(s), Some(Phase::Evaluating | Phase::Succeeded)),
        )
        .await;
    assert!(
        status
            .stop_reason
            .as_deref()
            .is_some_and(|r| r.contains("individuals trained")),
        "{status:?}"
    );
    let record = scene
        .stored_object(&format!("{name}/experiment.json"))
        .await
        .expect("experiment.json");
    assert!(record.contains("\"individualsTrained\": 6"), "{record}");
    scene
        .until(name, "phase Succeeded", LONG, |s| {
            phase(s) == Some(Phase::Succeeded)
        })
        .await;
}

#[tokio::test]
async fn pods_that_cannot_start_are_pending_and_a_configuration_error_fails_the_job() {
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("faults").await;
    // The Secret lacks a key: pods wait in CreateContainerConfigError, which is not running.
    let secrets: Api<Secret> = Api::namespaced(scene.client.clone(), &scene.namespace);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "partial" },
                "stringData": { "AWS_ACCESS_KEY_ID": cambrian_tests::ACCESS_KEY },
            }))
            .unwrap(),
        )
        .await
        .expect("secret");
    let name = "unconfigured";
    let manifest = scene.manifest(name, json!({ "store": { "credentialsSecret": "partial" } }));
    scene.apply(&manifest).expect("kubectl apply");
    // The operator itself cannot read the Secret's missing key either.
    let status = scene
        .until(name, "a degraded status naming the Secret", LONG, |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.message.contains("partial"))
        })
        .await;
    assert_ne!(phase(&status), Some(Phase::Running), "{status:?}");

    // A device this node does not have: the trainer exits 78, the Job fails at once, and the
    // experiment is Failed instead of burning pods.
    let name = "no-gpu";
    let manifest = scene.manifest(name, json!({ "worker": { "device": "cuda:0" } }));
    scene.apply(&manifest).expect("kubectl apply");
    let status = scene
        .until(name, "phase Failed", LONG, |s| {
            phase(s) == Some(Phase::Failed)
        })
        .await;
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(progressing.reason, "WorkersFailed", "{progressing:?}");
    let job = scene
        .jobs()
        .get(&operator::jobs::job_name(name, "workers"))
        .await
        .expect("the Job stays for its logs");
    let failed = job.status.and_then(|s| s.failed).unwrap_or(0);
    assert!(failed <= 2, "{failed} pods burnt on a configuration error");
}

#[tokio::test]
async fn deleting_a_namespace_never_hangs() {
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("teardown").await;
    // 63 characters: the longest name a label value takes whole.
    let long = format!("long-{}", "n".repeat(58));
    assert_eq!(long.len(), 63);
    let manifest = scene.manifest(
        &long,
        json!({ "store": { "retention": "Delete" }, "stop": { "individualsTrained": 100000 } }),
    );
    scene.apply(&manifest).expect("kubectl apply");
    scene
        .until(&long, "workers running", LONG, |s| {
            phase(s) == Some(Phase::Running)
        })
        .await;
    // A store nobody can reach, with retention Delete.
    let manifest = scene.manifest(
        "unreachable",
        json!({ "store": { "retention": "Delete", "endpoint": "http://127.0.0.1:9" }, "suspend": true }),
    );
    scene.apply(&manifest).expect("kubectl apply");
    scene
        .until("unreachable", "a store error", LONG, |s| {
            s.conditions.iter().any(|c| c.reason == "StoreUnavailable")
        })
        .await;
    let namespaces: Api<Namespace> = Api::all(scene.client.clone());
    namespaces
        .delete(&scene.namespace, &DeleteParams::default())
        .await
        .expect("delete namespace");
    eventually(
        "the namespace to be gone",
        Duration::from_secs(300),
        || async {
            namespaces
                .get_opt(&scene.namespace)
                .await
                .ok()
                .map(|n| n.is_none())
                .filter(|gone| *gone)
        },
    )
    .await;
    let left = scene.stored(&long).await;
    assert!(left.is_empty(), "objects left in the store: {left:?}");
}

#[tokio::test]
async fn the_operator_survives_being_killed_and_a_standby_takes_over() {
    let _operator = OPERATOR.write().await;
    let scene = Scene::new("failover").await;
    let name = "steady";
    let manifest = scene.manifest(name, json!({ "stop": { "individualsTrained": 100000 } }));
    scene.apply(&manifest).expect("kubectl apply");
    scene
        .until(name, "workers running", LONG, |s| {
            phase(s) == Some(Phase::Running)
        })
        .await;

    let deployments: Api<Deployment> = Api::namespaced(scene.client.clone(), OPERATOR_NAMESPACE);
    let deployment = deployments
        .list(&ListParams::default())
        .await
        .expect("deployments")
        .items
        .into_iter()
        .next()
        .expect("the operator's Deployment");
    deployments
        .patch(
            &deployment.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .expect("scale the operator");
    let operator_pods: Api<Pod> = Api::namespaced(scene.client.clone(), OPERATOR_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(scene.client.clone(), OPERATOR_NAMESPACE);
    let running_operators = || async {
        operator_pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    };
    let leader = eventually("two operator replicas and a leader", LONG, || async {
        let pods = running_operators().await;
        let lease = leases.get_opt("cambrian-operator").await.ok()??;
        let holder = lease.spec?.holder_identity?;
        (pods.len() == 2 && pods.contains(&holder)).then_some(holder)
    })
    .await;
    operator_pods
        .delete(&leader, &DeleteParams::default())
        .await
        .expect("kill the leader");
    let next = eventually("another replica to lead", LONG, || async {
        let lease = leases.get_opt("cambrian-operator").await.ok()??;
        let holder = lease.spec?.holder_identity?;
        (holder != leader && running_operators().await.contains(&holder)).then_some(holder)
    })
    .await;
    assert_ne!(next, leader);
    // Nothing was lost: the new leader takes an edit, and the experiment goes on to its end.
    let trained = scene
        .until(name, "training under the new leader", LONG, |s| {
            s.trained.unwrap_or(0) >= 2
        })
        .await
        .trained
        .unwrap_or(0);
    scene
        .patch_spec(
            name,
            json!({ "stop": { "individualsTrained": trained + 2 } }),
        )
        .await
        .expect("a nearer stop");
    let status = scene
        .until(name, "phase Succeeded", Duration::from_secs(420), |s| {
            phase(s) == Some(Phase::Succeeded)
        })
        .await;
    assert!(status.trained.unwrap_or(0) >= trained + 2);
}

/// The `host:port` each running operator replica serves its metrics on, from the line its
/// server logs at start (pods share this machine's loopback and bind port 0).
async fn operator_metrics_addresses(client: &kube::Client) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let mut addresses = Vec::new();
    for pod in pods
        .list(&ListParams::default())
        .await
        .expect("operator pods")
        .items
    {
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let log = cluster()
            .node
            .log(OPERATOR_NAMESPACE, &pod.name_any(), "operator");
        let address = log
            .lines()
            .rev()
            .filter(|l| l.contains("serving /metrics"))
            .find_map(|l| {
                let plain: String = strip_ansi(l);
                let at = plain.find("address=")? + "address=".len();
                plain[at..].split_whitespace().next().map(str::to_string)
            });
        addresses.extend(address);
    }
    addresses
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prometheus (Debian's package) scraping the operator while it runs an experiment, with the
/// chart's alerts loaded: every query of the chart's dashboard returns series for it, and no
/// alert fires for a healthy experiment.
#[tokio::test]
async fn prometheus_scrapes_the_operator_and_every_dashboard_query_has_series() {
    use cambrian_tests::prometheus::Prometheus;
    let _operator = OPERATOR.read().await;
    let scene = Scene::new("metrics").await;
    let name = "watched";
    let manifest = scene.manifest(
        name,
        json!({ "workers": 1, "stop": { "individualsTrained": 100000 } }),
    );
    scene.apply(&manifest).expect("kubectl apply");
    scene
        .until(name, "training", LONG, |s| {
            phase(s) == Some(Phase::Running) && s.trained.unwrap_or(0) >= 1
        })
        .await;
    let addresses = eventually(
        "the operator's metrics address in its log",
        LONG,
        || async {
            let found = operator_metrics_addresses(&scene.client).await;
            (!found.is_empty()).then_some(found)
        },
    )
    .await;
    let monitoring = repo().join("charts/evolution-operator/monitoring");
    let prometheus = Prometheus::start(&addresses, &[monitoring.join("rules.yaml")]);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring.join("dashboard.json")).unwrap())
            .unwrap();
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    // The template variables' queries, as series selectors.
    queries.push("cambrian_experiment_trained".into());
    assert!(queries.len() >= 10, "{queries:?}");
    for query in queries {
        let concrete = query
            .replace("$namespace", &scene.namespace)
            .replace("$experiment", name)
            .replace("$__rate_interval", "15s");
        let series = eventually(&format!("series for {concrete}"), LONG, || async {
            let series = prometheus
                .query(&concrete)
                .unwrap_or_else(|e| panic!("{e}"));
            (!series.is_empty()).then_some(series)
        })
        .await;
        if concrete.contains("cambrian_experiment") {
            assert!(
                series
                    .iter()
                    .any(|s| s["metric"]["namespace"] == scene.namespace.as_str()),
                "{concrete}: {series:?}"
            );
        }
    }
    let alerts = prometheus
        .query(&format!(
            "ALERTS{{namespace=\"{}\", alertstate=\"firing\"}}",
            scene.namespace
        ))
        .unwrap();
    assert!(
        alerts.is_empty(),
        "alerts for a healthy experiment: {alerts:?}"
    );
    scene
        .experiments()
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
}
