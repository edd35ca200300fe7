//! Test fixtures: experiments, and a scripted mock of the Kubernetes API server (tower-test)
//! that checks each request's method and path, answers it, and keeps its body for assertions.

use std::sync::Arc;

use crds::EvolutionExperiment;
use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::{Client, Resource};
use serde_json::Value;
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::controller::Context;
use crate::jobs::JobSettings;
use crate::metrics::Metrics;

pub const NAMESPACE: &str = "testns";

/// An experiment as a user would apply it, in the test namespace.
pub fn experiment(name: &str) -> EvolutionExperiment {
    let spec: crds::EvolutionExperimentSpec = serde_json::from_value(serde_json::json!({
        "store": { "url": "s3://bucket/runs/test" }
    }))
    .expect("valid spec");
    let mut exp = EvolutionExperiment::new(name, spec);
    exp.meta_mut().namespace = Some(NAMESPACE.into());
    exp.meta_mut().uid = Some(format!("uid-{name}"));
    exp.meta_mut().generation = Some(1);
    exp
}

pub fn finalized(mut exp: EvolutionExperiment) -> EvolutionExperiment {
    exp.meta_mut()
        .finalizers
        .get_or_insert_with(Vec::new)
        .push(crate::FINALIZER.into());
    exp
}

/// How the mock answers one request.
pub enum Reply {
    /// This status code and JSON body.
    Json(u16, Value),
    /// 200 with the request's own body (what an apply or create returns, near enough).
    Echo,
    /// 404 Not Found, as the API server says it.
    NotFound,
    /// 200 with this object, carrying the status the request patched (a status patch).
    WithStatus(Value),
}

/// One expected request.
pub struct Step {
    pub method: &'static str,
    /// The path, without the query.
    pub path: String,
    pub reply: Reply,
}

pub fn step(method: &'static str, path: impl Into<String>, reply: Reply) -> Step {
    Step {
        method,
        path: path.into(),
        reply,
    }
}

/// A request the mock saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

fn not_found() -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "not found", "reason": "NotFound", "code": 404
    })
}

impl ApiServer {
    /// Serves `script` in order; the handle yields every request seen. A request the script
    /// does not expect fails the test.
    pub fn run(self, script: Vec<Step>) -> JoinHandle<Vec<Seen>> {
        let mut handle = self.0;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for expected in script {
                let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                    panic!(
                        "expected {} {}, got nothing",
                        expected.method, expected.path
                    )
                });
                let method = request.method().to_string();
                let path = request.uri().path().to_string();
                let query = request.uri().query().unwrap_or_default().to_string();
                let bytes = request
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                assert_eq!(
                    (method.as_str(), path.as_str()),
                    (expected.method, expected.path.as_str()),
                    "unexpected request; body: {body}"
                );
                let (code, reply) = match expected.reply {
                    Reply::Json(code, value) => (code, value),
                    Reply::Echo => (200, body.clone()),
                    Reply::NotFound => (404, not_found()),
                    Reply::WithStatus(mut object) => {
                        object["status"] = body["status"].clone();
                        (200, object)
                    }
                };
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                        .expect("response"),
                );
                seen.push(Seen {
                    method,
                    path,
                    query,
                    body,
                });
            }
            // Nothing more may come.
            let extra =
                tokio::time::timeout(std::time::Duration::from_millis(100), handle.next_request())
                    .await;
            if let Ok(Some((request, _))) = extra {
                panic!(
                    "unexpected extra request {} {}",
                    request.method(),
                    request.uri()
                );
            }
            seen
        })
    }
}

/// A context whose client talks to the mock.
pub fn context() -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NAMESPACE);
    let mut ctx = Context::new(client, Metrics::default(), JobSettings::default());
    // The scripted tests keep their stores in folders of this machine.
    ctx.stores.allow_file_stores = true;
    (Arc::new(ctx), ApiServer(handle))
}

pub fn experiment_path(name: &str) -> String {
    format!("/apis/cambrian.dev/v1alpha1/namespaces/{NAMESPACE}/evolutionexperiments/{name}")
}

pub fn job_path(name: &str) -> String {
    format!("/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}")
}

pub fn events_path() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events")
}

/// A Job as the API server would return it, with the given status.
pub fn job_with_status(name: &str, status: Value) -> Value {
    serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name, "namespace": NAMESPACE },
        "spec": { "template": { "spec": { "containers": [] } } },
        "status": status,
    })
}
