//! Reconciler scenarios against the scripted API server and a real store.

use std::sync::Arc;

use bytes::Bytes;
use crds::{EvolutionExperiment, EvolutionExperimentStatus, Phase, Retention};
use kube::{Resource, ResourceExt};
use population::fixtures;
use population::individual::{now_ms, Individual};
use population::store::{FileStore, Population, ProgressEntry, TestResult};
use serde_json::{json, Value};

use super::reconcile;
use crate::events::Reason;
use crate::fixtures::*;
use crate::jobs;
use crate::status::{condition_of, ConditionReason, ConditionType};

struct World {
    _dir: tempfile::TempDir,
    exp: EvolutionExperiment,
    population: Population,
}

impl World {
    /// Records the experiment with `spec` in the store, as its first worker would.
    async fn start(&self, spec: &crds::EvolutionExperimentSpec) {
        let spec = crds::validate(spec).expect("a valid spec");
        let name = self.exp.name_any();
        self.population
            .start_experiment(&name, &spec)
            .await
            .unwrap();
    }

    /// Puts a trained individual in.
    async fn add(&self, individual: &Individual) {
        let weights = Bytes::from_static(b"w");
        self.population.add(individual, weights).await.unwrap();
    }
}

async fn world(name: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut exp = finalized(experiment(name));
    exp.spec.store.url = format!("file://{}", dir.path().display());
    exp.spec.population = 8;
    exp.spec.workers = Some(4);
    let population = Population::new(Arc::new(FileStore::open(dir.path()).await.unwrap()));
    World {
        _dir: dir,
        exp,
        population,
    }
}

/// An individual with `fitness` and, as its record says, `convolutions` convolutions.
fn individual(fitness: f64, convolutions: usize) -> Individual {
    let mut individual = fixtures::individual(fitness);
    individual.outcome.convolutions = convolutions;
    individual
}

fn said(reasons: &[Reason]) -> Vec<String> {
    reasons.iter().map(|r| r.as_str().to_string()).collect()
}

/// The status the reconciler patched, from the requests the mock saw.
fn patched_status(seen: &[Seen]) -> EvolutionExperimentStatus {
    let patch = seen
        .iter()
        .rev()
        .find(|s| s.path.ends_with("/status"))
        .expect("a status patch");
    assert!(
        patch.query.contains("fieldManager=cambrian-operator"),
        "server-side apply"
    );
    serde_json::from_value(patch.body["status"].clone()).expect("status")
}

/// The reasons of the events the reconciler published, in order.
fn events(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.method == "POST" && s.path == events_path())
        .map(|s| s.body["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// GET of a Job whose pods are `active`, and all of them ready.
fn active_job(exp: &EvolutionExperiment, name: &str, active: i32) -> Step {
    found_job(exp, name, json!({ "active": active, "ready": active }))
}

/// GET of a Job that completed.
fn complete_job(exp: &EvolutionExperiment, name: &str) -> Step {
    found_job(
        exp,
        name,
        json!({ "succeeded": 1, "conditions": [{ "type": "Complete", "status": "True" }] }),
    )
}

/// GET of the Job the operator makes for `exp` (its workers or its evaluation), with `status`.
fn found_job(exp: &EvolutionExperiment, name: &str, status: Value) -> Step {
    let settings = jobs::JobSettings::default();
    let job = if name == jobs::workers_name(exp) {
        jobs::workers(exp, &settings, false, jobs::History::default())
    } else {
        jobs::evaluation(exp, &settings)
    };
    let mut job = serde_json::to_value(job).unwrap();
    job["status"] = status;
    step("GET", job_path(name), Reply::Json(200, job))
}

/// GET of a Job that does not exist.
fn missing_job(name: &str) -> Step {
    step("GET", job_path(name), Reply::NotFound)
}

/// Server-side apply of a Job.
fn apply_job(name: &str) -> Step {
    step("PATCH", job_path(name), Reply::Echo)
}

/// A DELETE of a Job, answered as an API server does.
fn delete_job(name: &str) -> Step {
    let job = job_with_status(name, json!({ "active": 0 }));
    step("DELETE", job_path(name), Reply::Json(200, job))
}

/// A LIST of the experiment's pods that finds none.
fn no_pods() -> Step {
    let list = json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [] });
    step(
        "GET",
        format!("/api/v1/namespaces/{NAMESPACE}/pods"),
        Reply::Json(200, list),
    )
}

/// An event published.
fn event() -> Step {
    step("POST", events_path(), Reply::Echo)
}

/// A patch of the object itself (its finalizers), answered with `exp`.
fn patch_object(exp: &EvolutionExperiment) -> Step {
    let object = serde_json::to_value(exp).unwrap();
    step(
        "PATCH",
        experiment_path(&exp.name_any()),
        Reply::Json(200, object),
    )
}

/// The status patch of `exp`, answered with the object carrying it.
fn patch_status(exp: &EvolutionExperiment) -> Step {
    let path = format!("{}/status", experiment_path(&exp.name_any()));
    step(
        "PATCH",
        path,
        Reply::WithStatus(serde_json::to_value(exp).unwrap()),
    )
}

async fn run(exp: &EvolutionExperiment, script: Vec<Step>) -> Vec<Seen> {
    let (seen, result) = run_result(exp, script).await;
    result.expect("reconcile");
    seen
}

/// The requests a reconcile made, and what it returned.
async fn run_result(
    exp: &EvolutionExperiment,
    script: Vec<Step>,
) -> (Vec<Seen>, crate::Result<kube::runtime::controller::Action>) {
    let (ctx, server) = context();
    let mock = server.run(script);
    let result = reconcile(Arc::new(exp.clone()), ctx).await;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(5), mock)
        .await
        .expect("mock finished")
        .expect("mock ok");
    (seen, result)
}

#[tokio::test]
async fn a_new_experiment_gets_a_finalizer_first() {
    let w = world("fresh").await;
    let mut exp = w.exp.clone();
    exp.meta_mut().finalizers = None;
    let seen = run(&exp, vec![patch_object(&w.exp)]).await;
    assert!(seen[0].body.to_string().contains(crate::FINALIZER));
}

#[tokio::test]
async fn creation_starts_the_workers_job_and_reports_pending() {
    let w = world("create").await;
    let exp = w.exp.clone();
    let workers = jobs::workers_name(&w.exp);
    let seen = run(
        &w.exp,
        vec![
            missing_job(&workers),
            apply_job(&workers),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    let job = &seen[1].body;
    assert_eq!(job["spec"]["parallelism"], 4);
    assert_eq!(job["spec"]["suspend"], false);
    assert_eq!(job["metadata"]["ownerReferences"][0]["name"], "create");
    assert_eq!(events(&seen), said(&[Reason::WorkersCreated]));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(status.workers, Some(4));
    assert!(status.start_time.is_some());
    // The operator recorded the experiment in the store.
    assert!(w.population.experiment().await.unwrap().is_some());
}

#[tokio::test]
async fn status_comes_from_the_store() {
    let w = world("running").await;
    w.start(&w.exp.spec).await;
    let best = individual(0.61, 3);
    w.add(&individual(0.4, 0)).await;
    w.add(&best).await;
    let entry = ProgressEntry {
        worker: "w1".into(),
        trained: 17,
        flops: 2e12,
        seconds: 90.0,
        best: None,
    };
    w.population.record_progress(&entry, None).await.unwrap();
    let exp = w.exp.clone();
    let workers = jobs::workers_name(&w.exp);
    let seen = run(
        &w.exp,
        vec![
            active_job(&w.exp, &workers, 4),
            apply_job(&workers),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(events(&seen), said(&[Reason::NewBest]));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!((status.population, status.trained), (Some(2), Some(17)));
    let b = status.best.unwrap();
    assert_eq!(
        (b.id, b.convolutions, b.parameters),
        (best.id.to_string(), 3, 30730)
    );
    assert!((b.validation_accuracy - 0.61).abs() < 1e-9);
    assert_eq!(status.total_flops, Some(2e12));
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_runs_nothing() {
    let w = world("invalid").await;
    let mut exp = w.exp.clone();
    exp.spec.workers = Some(100);
    let seen = run(&exp, vec![event(), patch_status(&exp)]).await;
    assert_eq!(events(&seen), said(&[Reason::InvalidSpec]));
    assert!(seen[0].body["note"]
        .as_str()
        .unwrap()
        .contains("spec.workers"));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Invalid));
    let valid = condition_of(&status, ConditionType::Valid).unwrap();
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str()),
        ("False", ConditionReason::InvalidSpec.as_str())
    );

    // Reconciling it again says nothing new: no second event.
    exp.status = Some(status);
    let seen = run(&exp, vec![patch_status(&exp)]).await;
    assert!(events(&seen).is_empty());
}

#[tokio::test]
async fn suspend_suspends_the_job_and_resume_unsuspends_it() {
    let w = world("pause").await;
    let workers = jobs::workers_name(&w.exp);
    let mut exp = w.exp.clone();
    // The Job follows spec.suspend both ways; nothing else changes.
    let script = |exp: &EvolutionExperiment| {
        vec![
            active_job(&w.exp, &workers, 0),
            apply_job(&workers),
            patch_status(exp),
        ]
    };
    exp.spec.suspend = true;
    let seen = run(&exp, script(&exp)).await;
    assert_eq!(seen[1].body["spec"]["suspend"], true);
    assert_eq!(patched_status(&seen).phase, Some(Phase::Suspended));

    exp.spec.suspend = false;
    let seen = run(&exp, script(&exp)).await;
    assert_eq!(seen[1].body["spec"]["suspend"], false);
}

#[tokio::test]
async fn stop_then_evaluation_then_succeeded() {
    let w = world("finish").await;
    let mut exp = w.exp.clone();
    exp.spec.stop.individuals_trained = Some(10);
    w.start(&exp.spec).await;
    let best = individual(0.7, 2);
    w.add(&best).await;
    let entry = ProgressEntry {
        worker: "w1".into(),
        trained: 10,
        ..ProgressEntry::default()
    };
    w.population.record_progress(&entry, None).await.unwrap();
    let workers = jobs::workers_name(&exp);
    let evaluation = jobs::evaluation_name(&exp);

    // 1. The stop condition is met: the operator writes the stop marker; workers still run.
    let seen = run(
        &exp,
        vec![
            active_job(&w.exp, &workers, 3),
            event(),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(events(&seen), said(&[Reason::NewBest, Reason::Stopping]));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Stopping));
    assert_eq!(
        status.stop_reason.as_deref(),
        Some("10 individuals trained")
    );
    assert!(w.population.stop_marker().await.unwrap().is_some());

    // 2. The workers have exited: the evaluation Job starts.
    exp.status = Some(status);
    let seen = run(
        &exp,
        vec![
            complete_job(&w.exp, &workers),
            missing_job(&evaluation),
            apply_job(&evaluation),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(
        seen[2].body["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "evaluate"
    );
    assert_eq!(events(&seen), said(&[Reason::EvaluationStarted]));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Evaluating));

    // 3. The evaluation recorded its result and succeeded.
    w.population
        .record_test_result(&TestResult {
            id: best.id.clone(),
            test_accuracy: 0.69,
            correct: 69,
            total: 100,
            at_ms: now_ms(),
        })
        .await
        .unwrap();
    exp.status = Some(status);
    let seen = run(
        &exp,
        vec![
            complete_job(&w.exp, &workers),
            complete_job(&w.exp, &evaluation),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(events(&seen), said(&[Reason::Succeeded]));
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.best.unwrap().test_accuracy, Some(0.69));
    assert!(status.completion_time.is_some());
}

#[tokio::test]
async fn a_second_reconcile_of_the_same_world_changes_nothing() {
    let w = world("again").await;
    w.start(&w.exp.spec).await;
    w.add(&individual(0.5, 1)).await;
    let workers = jobs::workers_name(&w.exp);
    let exp = w.exp.clone();
    let script = |events: usize| {
        let mut s = vec![active_job(&w.exp, &workers, 4), apply_job(&workers)];
        for _ in 0..events {
            s.push(event());
        }
        s.push(patch_status(&exp));
        s
    };
    let first = run(&w.exp, script(1)).await;
    // As if the operator restarted: a new context, the object with the status it wrote.
    let mut again = w.exp.clone();
    again.status = Some(patched_status(&first));
    let second = run(&again, script(0)).await;
    assert_eq!(first[1].body, second[1].body, "the same Job");
    assert_eq!(
        patched_status(&first),
        patched_status(&second),
        "the same status"
    );
    assert!(events(&second).is_empty());
}

fn deleting(mut exp: EvolutionExperiment, retention: Retention) -> EvolutionExperiment {
    exp.spec.store.retention = retention;
    exp.meta_mut().deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    exp
}

#[tokio::test]
async fn deletion_with_retain_keeps_the_population() {
    let w = world("keep").await;
    w.start(&w.exp.spec).await;
    w.add(&individual(0.5, 1)).await;
    let exp = deleting(w.exp.clone(), Retention::Retain);
    let seen = run(&exp, vec![event(), patch_object(&exp)]).await;
    assert_eq!(events(&seen), said(&[Reason::Retained]));
    assert!(
        seen[1].body.to_string().contains("finalizers"),
        "finalizer removed"
    );
    assert_eq!(w.population.alive().await.unwrap().len(), 1);
    assert!(
        w.population.stop_marker().await.unwrap().is_some(),
        "workers told to stop"
    );
}

#[tokio::test]
async fn deletion_with_delete_stops_workers_and_empties_the_store() {
    let w = world("wipe").await;
    w.start(&w.exp.spec).await;
    w.add(&individual(0.5, 1)).await;
    let exp = deleting(w.exp.clone(), Retention::Delete);
    let workers = jobs::workers_name(&exp);
    let evaluation = jobs::evaluation_name(&exp);
    // 1. The workers Job still exists: it is deleted in the foreground, and the store is
    // left alone until it is gone, pods and all.
    let (seen, result) = run_result(
        &exp,
        vec![
            active_job(&w.exp, &workers, 2),
            delete_job(&workers),
            missing_job(&evaluation),
        ],
    )
    .await;
    assert!(result.is_err(), "cleanup waits for the Job");
    assert_eq!(seen[1].body["propagationPolicy"], "Foreground");
    assert_eq!(
        w.population.alive().await.unwrap().len(),
        1,
        "store untouched"
    );
    // 2. The Jobs are gone: the store is emptied and the finalizer removed.
    let seen = run(
        &exp,
        vec![
            missing_job(&workers),
            missing_job(&evaluation),
            no_pods(),
            event(),
            patch_object(&exp),
        ],
    )
    .await;
    assert!(
        seen[2].query.contains("cambrian.dev%2Fexperiment%3Dwipe")
            || seen[2].query.contains("cambrian.dev/experiment=wipe"),
        "{}",
        seen[2].query
    );
    assert_eq!(events(&seen), said(&[Reason::Deleted]));
    let store = w.population.store();
    for prefix in ["alive/", "individuals/", "control/", "slots/"] {
        assert!(
            store.list(prefix).await.unwrap().is_empty(),
            "{prefix} left behind"
        );
    }
    assert!(store.get("experiment.json").await.unwrap().is_none());
    // 3. A cleanup that runs again (its finalizer patch lost a race) writes nothing.
    run(
        &exp,
        vec![
            missing_job(&workers),
            missing_job(&evaluation),
            no_pods(),
            event(),
            patch_object(&exp),
        ],
    )
    .await;
    for prefix in ["control/", "alive/", "individuals/"] {
        let left = store.list(prefix).await.unwrap();
        assert!(left.is_empty(), "objects written after emptying: {left:?}");
    }
}

#[tokio::test]
async fn deletion_leaves_a_store_another_experiment_owns() {
    let w = world("tenant").await;
    w.start(&w.exp.spec).await;
    w.add(&individual(0.5, 1)).await;
    let other = population::store::StoreOwner {
        namespace: NAMESPACE.into(),
        name: "landlord".into(),
        uid: "uid-landlord".into(),
    };
    w.population.claim(&other).await.unwrap();
    let exp = deleting(w.exp.clone(), Retention::Delete);
    let seen = run(
        &exp,
        vec![
            missing_job(&jobs::workers_name(&exp)),
            missing_job(&jobs::evaluation_name(&exp)),
            no_pods(),
            event(),
            patch_object(&exp),
        ],
    )
    .await;
    assert!(seen[3].body["note"]
        .as_str()
        .unwrap()
        .contains("nothing deleted"));
    assert_eq!(w.population.alive().await.unwrap().len(), 1);
    assert!(
        w.population.stop_marker().await.unwrap().is_none(),
        "another experiment's workers were told to stop"
    );
}

#[tokio::test]
async fn worker_failures_degrade_and_a_failed_job_is_replaced() {
    let w = world("flaky").await;
    let exp = w.exp.clone();
    let workers = jobs::workers_name(&exp);
    // Two pods failed, the Job carries on: Degraded, one warning.
    let seen = run(
        &exp,
        vec![
            found_job(
                &w.exp,
                &workers,
                json!({ "active": 4, "ready": 2, "failed": 2 }),
            ),
            apply_job(&workers),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(events(&seen), said(&[Reason::WorkerFailed]));
    let status = patched_status(&seen);
    assert_eq!(status.failed_workers, Some(2));
    let degraded = condition_of(&status, ConditionType::Degraded).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", ConditionReason::WorkerFailures.as_str())
    );
    assert_eq!(status.phase, Some(Phase::Running));

    // The Job hit its backoff limit; the population is fine: the Job is replaced, not the
    // experiment ended.
    let mut failed = exp.clone();
    failed.status = Some(status);
    let seen = run(
        &failed,
        vec![
            found_job(&w.exp, &workers,
                json!({ "failed": 100, "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded" }] }),
            ),
            delete_job(&workers),
            event(),
            event(),
            patch_status(&failed),
        ],
    )
    .await;
    assert_eq!(
        events(&seen),
        said(&[Reason::WorkersRestarted, Reason::WorkerFailed])
    );
    let status = patched_status(&seen);
    assert_ne!(status.phase, Some(Phase::Failed));
    assert_eq!(status.failed_workers, Some(100));
    assert_eq!(status.worker_restarts, Some(1));

    // Its replacement starts with that history, so failedWorkers is a sum over Jobs.
    let mut replaced = exp.clone();
    replaced.status = Some(status);
    let seen = run(
        &replaced,
        vec![
            missing_job(&workers),
            apply_job(&workers),
            event(),
            patch_status(&replaced),
        ],
    )
    .await;
    assert_eq!(
        seen[1].body["metadata"]["annotations"][jobs::FAILED_BEFORE],
        "100"
    );
    let status = patched_status(&seen);
    assert_eq!(status.failed_workers, Some(100));

    // After max_worker_restarts replacements the experiment fails instead.
    let mut exhausted = exp.clone();
    exhausted.status = Some(crds::EvolutionExperimentStatus {
        worker_restarts: Some(3),
        ..status
    });
    let seen = run(
        &exhausted,
        vec![
            found_job(
                &w.exp,
                &workers,
                json!({ "failed": 100, "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded" }] }),
            ),
            event(),
            patch_status(&exhausted),
        ],
    )
    .await;
    assert_eq!(events(&seen), said(&[Reason::WorkersFailed]));
    assert_eq!(patched_status(&seen).phase, Some(Phase::Failed));
}

#[tokio::test]
async fn a_configuration_error_fails_the_experiment_without_replacing_the_job() {
    let w = world("broken").await;
    let workers = jobs::workers_name(&w.exp);
    let seen = run(
        &w.exp,
        vec![
            found_job(
                &w.exp,
                &workers,
                json!({ "failed": 1, "conditions": [{ "type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container trainer for pod x failed with exit code 78" }] }),
            ),
            event(),
            event(),
            patch_status(&w.exp),
        ],
    )
    .await;
    assert_eq!(
        events(&seen),
        said(&[Reason::WorkerFailed, Reason::WorkersFailed])
    );
    let status = patched_status(&seen);
    assert_eq!(status.phase, Some(Phase::Failed));
    let progressing = condition_of(&status, ConditionType::Progressing).unwrap();
    assert!(
        progressing.message.contains("exit code 78"),
        "{}",
        progressing.message
    );
}

#[tokio::test]
async fn a_new_image_replaces_the_workers_job() {
    let w = world("upgrade").await;
    let workers = jobs::workers_name(&w.exp);
    let mut exp = w.exp.clone();
    exp.spec.worker.image = Some("ghcr.io/cambrian-dev/trainer:v2".into());
    // The Job found was made from the old template: it is deleted, not patched (a Job's
    // template is immutable), and the next reconcile creates the new one.
    let seen = run(
        &exp,
        vec![
            active_job(&w.exp, &workers, 4),
            step("DELETE", job_path(&workers), Reply::Echo),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(seen[1].body["propagationPolicy"], "Background");
    assert_eq!(events(&seen), said(&[Reason::WorkersReplaced]));
    // Scaling is an edit a Job takes: patched in place.
    let mut scaled = w.exp.clone();
    scaled.spec.workers = Some(2);
    let seen = run(
        &scaled,
        vec![
            active_job(&w.exp, &workers, 4),
            apply_job(&workers),
            patch_status(&scaled),
        ],
    )
    .await;
    assert_eq!(seen[1].body["spec"]["parallelism"], 2);
}

#[tokio::test]
async fn a_stopped_experiment_with_no_ready_worker_suspends_its_job() {
    let w = world("stuck").await;
    let mut exp = w.exp.clone();
    exp.spec.stop.individuals_trained = Some(1);
    w.start(&exp.spec).await;
    w.population.request_stop("done").await.unwrap();
    let workers = jobs::workers_name(&exp);
    // Two pods can never start (no image, no node): the Job is suspended to remove them.
    let seen = run(
        &exp,
        vec![
            found_job(&w.exp, &workers, json!({ "active": 2, "ready": 0 })),
            apply_job(&workers),
            event(),
            patch_status(&exp),
        ],
    )
    .await;
    assert_eq!(seen[1].body["spec"]["suspend"], true);
    assert_eq!(patched_status(&seen).phase, Some(Phase::Stopping));
}

#[tokio::test]
async fn a_store_owned_by_another_experiment_is_refused() {
    let w = world("squatter").await;
    let other = population::store::StoreOwner {
        namespace: NAMESPACE.into(),
        name: "first".into(),
        uid: "uid-first".into(),
    };
    w.population.claim(&other).await.unwrap();
    let seen = run(&w.exp, vec![event(), patch_status(&w.exp)]).await;
    assert_eq!(events(&seen), said(&[Reason::Refused]));
    let status = patched_status(&seen);
    let valid = condition_of(&status, ConditionType::Valid).unwrap();
    assert_eq!(valid.reason, ConditionReason::StoreInUse.as_str());
    assert!(valid.message.contains("testns/first"), "{}", valid.message);
}

#[tokio::test]
async fn edited_stop_conditions_reach_the_store() {
    let w = world("extend").await;
    let mut exp = w.exp.clone();
    exp.spec.stop.individuals_trained = Some(10);
    w.start(&exp.spec).await;
    exp.spec.stop.individuals_trained = Some(1000);
    let workers = jobs::workers_name(&exp);
    run(
        &exp,
        vec![
            active_job(&w.exp, &workers, 4),
            apply_job(&workers),
            patch_status(&exp),
        ],
    )
    .await;
    let record = w.population.experiment().await.unwrap().unwrap();
    assert_eq!(record.spec.stop.individuals_trained, Some(1000));
}

#[tokio::test]
async fn a_spec_the_store_contradicts_is_refused_and_leaves_the_jobs() {
    let w = world("mutant").await;
    w.start(&w.exp.spec).await;
    let mut exp = w.exp.clone();
    exp.spec.seed = 42;
    let seen = run(&exp, vec![event(), patch_status(&exp)]).await;
    assert_eq!(events(&seen), said(&[Reason::Refused]));
    let status = patched_status(&seen);
    let valid = condition_of(&status, ConditionType::Valid).unwrap();
    assert_eq!(valid.reason, ConditionReason::ImmutableField.as_str());
    assert_ne!(
        condition_of(&status, ConditionType::Degraded).map(|c| c.reason.as_str()),
        Some(ConditionReason::StoreUnavailable.as_str())
    );
}

#[test]
fn stores_a_cluster_cannot_share_or_reach_safely_are_refused() {
    use super::{refusal_for_cluster, StorePolicy};
    let strict = StorePolicy::default();
    let mut exp = experiment("policy");
    exp.spec.store.url = "file:///data/cambrian".into();
    assert_eq!(
        refusal_for_cluster(&exp, strict).map(|r| r.reason),
        Some(ConditionReason::StoreNotShared)
    );
    let single_node = StorePolicy {
        allow_file_stores: true,
        ..strict
    };
    assert!(refusal_for_cluster(&exp, single_node).is_none());

    exp.spec.store.url = "s3://bucket/experiment".into();
    exp.spec.store.credentials_secret = None;
    assert_eq!(
        refusal_for_cluster(&exp, strict).map(|r| r.reason),
        Some(ConditionReason::NoCredentials)
    );
    let ambient = StorePolicy {
        ambient_credentials: true,
        ..strict
    };
    assert!(refusal_for_cluster(&exp, ambient).is_none());
    exp.spec.store.credentials_secret = Some("s3".into());
    assert!(refusal_for_cluster(&exp, strict).is_none());
}
