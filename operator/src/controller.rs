//! The reconciler. Level-triggered: every reconcile observes the spec, the store and the Jobs,
//! makes the Jobs what they should be, and writes the status that follows from what it saw.
//! `reconcile` only hands the object to kube-runtime's finalizer helper, which calls
//! [`apply`] or [`cleanup`].

use std::sync::Arc;
use std::time::Duration;

use crds::{EvolutionExperiment, EvolutionExperimentStatus, Phase, Retention};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use trainer::store::{self, Population};

use crate::jobs::{self, JobSettings, JobState};
use crate::metrics::Metrics;
use crate::status::{self, Observation, StoreView};
use crate::{Error, Result, FINALIZER, MANAGER};

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub jobs: JobSettings,
    /// How often a running experiment's status is refreshed from its store.
    pub refresh: Duration,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, jobs: JobSettings) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            jobs,
            refresh: Duration::from_secs(30),
        }
    }
}

pub async fn reconcile(exp: Arc<EvolutionExperiment>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let namespace = exp
        .namespace()
        .ok_or_else(|| Error::NoNamespace(exp.name_any()))?;
    let api: Api<EvolutionExperiment> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, exp, |event| async {
        match event {
            Finalizer::Apply(exp) => apply(&exp, &ctx).await,
            Finalizer::Cleanup(exp) => cleanup(&exp, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(exp: Arc<EvolutionExperiment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(experiment = %exp.name_any(), error = %error, "reconcile failed");
    ctx.metrics.failure(error.kind());
    Action::requeue(Duration::from_secs(15))
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The store of an experiment, with the credentials of its Secret if it names one. Secret
/// values go into the client and nowhere else.
async fn population(
    exp: &EvolutionExperiment,
    ctx: &Context,
    namespace: &str,
) -> Result<Population> {
    let credentials = match &exp.spec.store.credentials_secret {
        None => None,
        Some(name) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
            let secret = secrets.get_opt(name).await?.ok_or_else(|| Error::Secret {
                name: name.clone(),
                reason: "not found in the experiment's namespace".into(),
            })?;
            let value = |key: &str| -> Result<String> {
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .ok_or_else(|| Error::Secret {
                        name: name.clone(),
                        reason: format!("has no {key} key"),
                    })?;
                String::from_utf8(bytes.0.clone()).map_err(|_| Error::Secret {
                    name: name.clone(),
                    reason: format!("{key} is not UTF-8"),
                })
            };
            Some((value("AWS_ACCESS_KEY_ID")?, value("AWS_SECRET_ACCESS_KEY")?))
        }
    };
    let store = store::open_with_credentials(&exp.spec.store, credentials).await?;
    Ok(Population::new(store))
}

/// Reads what the status needs from the store: two LISTs (`alive/`, `progress/`) and a few
/// GETs (experiment, stop marker, best record, its test result). Stop conditions met are
/// turned into the stop marker here.
pub async fn observe_store(
    exp: &EvolutionExperiment,
    population: &Population,
) -> Result<StoreView> {
    let record = population
        .start_experiment(&exp.name_any(), &exp.spec)
        .await?;
    let mut stop = population.stop_marker().await?;
    if stop.is_none() {
        if let Some(reason) = trainer::worker::stop_reason(population, &record).await? {
            population.request_stop(&reason).await?;
            stop = population.stop_marker().await?;
        }
    }
    let summary = population.summary().await?;
    let best = match &summary.best {
        Some(entry) => population.individual(&entry.id).await?,
        None => None,
    };
    let test = match &best {
        Some(b) => population.test_result(&b.id).await?,
        None => None,
    };
    Ok(StoreView {
        summary,
        started_at_ms: Some(record.created_at_ms),
        stop,
        best,
        test,
    })
}

fn namespace_or_err(exp: &EvolutionExperiment) -> Result<String> {
    exp.namespace()
        .ok_or_else(|| Error::NoNamespace(exp.name_any()))
}

async fn publish(
    exp: &EvolutionExperiment,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    note: String,
) -> Result<()> {
    ctx.recorder
        .publish(
            &Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Reconcile".into(),
                secondary: None,
            },
            &exp.object_ref(&()),
        )
        .await?;
    Ok(())
}

async fn write_status(
    exp: &EvolutionExperiment,
    ctx: &Context,
    status: &EvolutionExperimentStatus,
) -> Result<()> {
    let api: Api<EvolutionExperiment> =
        Api::namespaced(ctx.client.clone(), &namespace_or_err(exp)?);
    let patch = Patch::Apply(serde_json::json!({
        "apiVersion": crds::manifest::API_VERSION,
        "kind": crds::manifest::KIND,
        "status": status,
    }));
    api.patch_status(
        &exp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &patch,
    )
    .await?;
    Ok(())
}

async fn apply_job(exp: &EvolutionExperiment, ctx: &Context, job: &Job) -> Result<()> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace_or_err(exp)?);
    let name = job.metadata.name.clone().unwrap_or_default();
    jobs.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(job),
    )
    .await?;
    Ok(())
}

/// Brings the world in line with the spec and reports it.
pub async fn apply(exp: &EvolutionExperiment, ctx: &Context) -> Result<Action> {
    let namespace = namespace_or_err(exp)?;
    let name = exp.name_any();
    let previous = exp.status.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut obs = Observation {
        generation: exp.meta().generation,
        ..Observation::default()
    };

    if let Err(error) = crds::validate(&exp.spec) {
        obs.spec_error = Some(error.clone());
        let status = status::compute(&exp.spec, &previous, &obs, &now());
        let already = previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Valid" && c.status == "False" && c.message == error.to_string());
        if !already {
            publish(
                exp,
                ctx,
                EventType::Warning,
                "InvalidSpec",
                error.to_string(),
            )
            .await?;
        }
        write_status(exp, ctx, &status).await?;
        // Nothing runs until the spec changes, which triggers a reconcile by itexp.
        return Ok(Action::await_change());
    }

    let view = match population(exp, ctx, &namespace).await {
        Ok(population) => observe_store(exp, &population).await,
        Err(e) => Err(e),
    };
    let store_error = view.as_ref().err().map(|e| e.to_string());
    obs.store = Some(view.map_err(|e| e.to_string()));
    let stopped = obs
        .store
        .as_ref()
        .and_then(|s| s.as_ref().ok())
        .is_some_and(|v| v.stop.is_some());

    let workers = jobs.get_opt(&jobs::workers_name(exp)).await?;
    obs.workers = JobState::of(workers.as_ref());
    let mut requeue = ctx.refresh;
    if !stopped {
        if obs.workers.failed && !obs.workers.finished_by_stop() {
            // The Job gave up after too many failed pods; the experiment has not: start a
            // new Job once this one is gone, continuing from the store.
            jobs.delete(
                &jobs::workers_name(exp),
                &DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..DeleteParams::default()
                },
            )
            .await?;
            publish(
                exp,
                ctx,
                EventType::Warning,
                "WorkersRestarted",
                format!(
                    "the workers Job failed after {} failed pods; starting a new one",
                    obs.workers.failed_pods
                ),
            )
            .await?;
            requeue = Duration::from_secs(5);
        } else {
            apply_job(exp, ctx, &jobs::workers(exp, &ctx.jobs)).await?;
            if !obs.workers.exists {
                publish(
                    exp,
                    ctx,
                    EventType::Normal,
                    "WorkersCreated",
                    format!("{} workers started", exp.spec.workers()),
                )
                .await?;
            }
        }
    } else if obs.workers.active == 0 {
        let evaluation = jobs.get_opt(&jobs::evaluation_name(exp)).await?;
        obs.evaluation = JobState::of(evaluation.as_ref());
        if !obs.evaluation.exists {
            apply_job(exp, ctx, &jobs::evaluation(exp, &ctx.jobs)).await?;
            publish(
                exp,
                ctx,
                EventType::Normal,
                "EvaluationStarted",
                "measuring the best individual by validation on the test set".into(),
            )
            .await?;
        }
        requeue = Duration::from_secs(10);
    }

    let status = status::compute(&exp.spec, &previous, &obs, &now());
    announce(exp, ctx, &previous, &status, store_error.as_deref()).await?;
    write_status(exp, ctx, &status).await?;
    ctx.metrics.experiment(&namespace, &name, &status);
    Ok(match status.phase {
        Some(Phase::Succeeded | Phase::Failed) => Action::await_change(),
        _ => Action::requeue(requeue),
    })
}

/// Events for what changed since the last status: a new best individual, the stop, worker
/// failures, the end, a store that cannot be read.
async fn announce(
    exp: &EvolutionExperiment,
    ctx: &Context,
    previous: &EvolutionExperimentStatus,
    status: &EvolutionExperimentStatus,
    store_error: Option<&str>,
) -> Result<()> {
    if let Some(best) = &status.best {
        if previous.best.as_ref().map(|b| &b.id) != Some(&best.id) {
            publish(exp,
                ctx,
                EventType::Normal,
                "NewBest",
                format!(
                    "individual {} reached validation accuracy {:.4} ({} convolutions, {} parameters)",
                    best.id, best.validation_accuracy, best.convolutions, best.parameters
                ),
            )
            .await?;
        }
    }
    if let (None, Some(reason)) = (&previous.stop_reason, &status.stop_reason) {
        publish(exp, ctx, EventType::Normal, "Stopping", reason.clone()).await?;
    }
    if status.failed_workers.unwrap_or(0) > previous.failed_workers.unwrap_or(0) {
        publish(
            exp,
            ctx,
            EventType::Warning,
            "WorkerFailed",
            format!(
                "{} worker pods have failed so far; see the pods of Job {}",
                status.failed_workers.unwrap_or(0),
                jobs::workers_name(exp)
            ),
        )
        .await?;
    }
    if let Some(error) = store_error {
        let was = previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "StoreUnavailable" && c.message == error);
        if !was {
            publish(
                exp,
                ctx,
                EventType::Warning,
                "StoreUnavailable",
                error.to_string(),
            )
            .await?;
        }
    }
    if status.phase != previous.phase {
        match status.phase {
            Some(Phase::Succeeded) => {
                let test = status
                    .best
                    .as_ref()
                    .and_then(|b| b.test_accuracy)
                    .unwrap_or_default();
                publish(
                    exp,
                    ctx,
                    EventType::Normal,
                    "Succeeded",
                    format!("the best individual by validation scored {test:.4} on the test set"),
                )
                .await?;
            }
            Some(Phase::Failed) => {
                publish(
                    exp,
                    ctx,
                    EventType::Warning,
                    "EvaluationFailed",
                    format!("Job {} failed; see its pod", jobs::evaluation_name(exp)),
                )
                .await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The experiment is being deleted: stop the workers and honour the retention policy.
pub async fn cleanup(exp: &EvolutionExperiment, ctx: &Context) -> Result<Action> {
    let namespace = namespace_or_err(exp)?;
    let name = exp.name_any();
    let population = population(exp, ctx, &namespace).await;
    if let Ok(population) = &population {
        if let Err(e) = population.request_stop("the experiment was deleted").await {
            tracing::warn!(experiment = %name, error = %e, "cannot write the stop marker");
        }
    }
    match exp.spec.store.retention {
        Retention::Retain => {
            publish(
                exp,
                ctx,
                EventType::Normal,
                "Retained",
                format!("the population stays in {}", exp.spec.store.url),
            )
            .await?;
        }
        Retention::Delete => {
            // Workers must be gone before their store is emptied, or they would write into it.
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            for job in [jobs::workers_name(exp), jobs::evaluation_name(exp)] {
                match jobs.delete(&job, &DeleteParams::foreground()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let deleted = population?.delete_everything().await?;
            publish(
                exp,
                ctx,
                EventType::Normal,
                "Deleted",
                format!("{deleted} objects deleted from {}", exp.spec.store.url),
            )
            .await?;
        }
    }
    ctx.metrics.forget(&namespace, &name);
    Ok(Action::await_change())
}

impl JobState {
    /// A Job whose pods all exited because the experiment stopped counts as done, not failed.
    fn finished_by_stop(&self) -> bool {
        self.succeeded
    }
}

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) {
    let experiments = Api::<EvolutionExperiment>::all(ctx.client.clone());
    let jobs = Api::<Job>::all(ctx.client.clone());
    Controller::new(experiments, watcher::Config::default())
        .owns(
            jobs,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=cambrian-operator"),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile result");
            }
        })
        .await;
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
