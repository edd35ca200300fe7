//! The reconciler. Level-triggered: every reconcile observes the spec, the store and the Jobs,
//! makes the Jobs what they should be, and writes the status that follows from what it saw.
//! `reconcile` only hands the object to kube-runtime's finalizer helper, which calls
//! [`apply`] or [`cleanup`].

use std::sync::Arc;
use std::time::Duration;

use crds::{
    EvolutionExperiment, EvolutionExperimentStatus, Experiment, Phase, Retention, SpecError,
};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use population::stop::stop_reason;
use population::store::{self, Population};

use crate::events::{publish, Reason};
use crate::jobs::{self, JobSettings, JobState};
use crate::metrics::Metrics;
use crate::status::{self, already_said, ConditionReason, ConditionType, Observation, StoreView};
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
    let namespace = namespace_of(&exp)?;
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

fn namespace_of(exp: &EvolutionExperiment) -> Result<String> {
    exp.namespace()
        .ok_or_else(|| Error::NoNamespace(exp.name_any()))
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
pub async fn observe_store(experiment: &Experiment, population: &Population) -> Result<StoreView> {
    let record = population
        .start_experiment(&experiment.name, &experiment.spec)
        .await?;
    let mut stop = population.stop_marker().await?;
    if stop.is_none() {
        if let Some(reason) = stop_reason(population, &record).await? {
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

async fn write_status(
    exp: &EvolutionExperiment,
    ctx: &Context,
    status: &EvolutionExperimentStatus,
) -> Result<()> {
    let api: Api<EvolutionExperiment> = Api::namespaced(ctx.client.clone(), &namespace_of(exp)?);
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

async fn apply_job(jobs: &Api<Job>, job: &Job) -> Result<()> {
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
    let namespace = namespace_of(exp)?;
    let previous = exp.status.clone().unwrap_or_default();
    let mut obs = Observation {
        generation: exp.metadata.generation,
        ..Observation::default()
    };
    let experiment = match Experiment::of(exp) {
        Ok(experiment) => experiment,
        Err(error) => return refuse(exp, ctx, &previous, obs, error).await,
    };

    let view = match population(exp, ctx, &namespace).await {
        Ok(population) => observe_store(&experiment, &population).await,
        Err(e) => Err(e),
    };
    let store_error = view.as_ref().err().map(|e| e.to_string());
    obs.store = Some(view.map_err(|e| e.to_string()));
    let stopped = obs
        .store
        .as_ref()
        .and_then(|s| s.as_ref().ok())
        .is_some_and(|v| v.stop.is_some());

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    obs.workers = JobState::of(jobs.get_opt(&jobs::workers_name(exp)).await?.as_ref());
    let requeue = if !stopped {
        ensure_workers(exp, ctx, &jobs, &obs.workers).await?
    } else if obs.workers.active == 0 {
        obs.evaluation = ensure_evaluation(exp, ctx, &jobs).await?;
        Duration::from_secs(10)
    } else {
        ctx.refresh
    };

    let status = status::compute(&experiment.spec, &previous, &obs, &now());
    announce(exp, ctx, &previous, &status, store_error.as_deref()).await?;
    write_status(exp, ctx, &status).await?;
    ctx.metrics
        .experiment(&namespace, &experiment.name, &status);
    Ok(match status.phase {
        Some(Phase::Succeeded | Phase::Failed) => Action::await_change(),
        _ => Action::requeue(requeue),
    })
}

/// An invalid spec: say why once, report it, and run nothing until the spec changes (which
/// triggers a reconcile by itself).
async fn refuse(
    exp: &EvolutionExperiment,
    ctx: &Context,
    previous: &EvolutionExperimentStatus,
    mut obs: Observation,
    error: SpecError,
) -> Result<Action> {
    let message = error.to_string();
    obs.spec_error = Some(error);
    let status = status::compute(&exp.spec, previous, &obs, &now());
    let said = already_said(
        previous,
        ConditionType::Valid,
        ConditionReason::InvalidSpec,
        &message,
    );
    if !said {
        publish(exp, ctx, Reason::InvalidSpec, message).await?;
    }
    write_status(exp, ctx, &status).await?;
    Ok(Action::await_change())
}

/// The workers Job as the spec says (parallelism, suspension), created if missing; a Job that
/// gave up after too many failed pods is deleted so that the next reconcile starts a new one,
/// continuing from the store. Returns when to reconcile next.
async fn ensure_workers(
    exp: &EvolutionExperiment,
    ctx: &Context,
    jobs: &Api<Job>,
    workers: &JobState,
) -> Result<Duration> {
    if workers.failed && !workers.succeeded {
        jobs.delete(
            &jobs::workers_name(exp),
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await?;
        let note = format!(
            "the workers Job failed after {} failed pods; starting a new one",
            workers.failed_pods
        );
        publish(exp, ctx, Reason::WorkersRestarted, note).await?;
        return Ok(Duration::from_secs(5));
    }
    apply_job(jobs, &jobs::workers(exp, &ctx.jobs)).await?;
    if !workers.exists {
        let note = format!("{} workers started", exp.spec.workers());
        publish(exp, ctx, Reason::WorkersCreated, note).await?;
    }
    Ok(ctx.refresh)
}

/// The final evaluation Job, created once the workers are gone; returns its state as found.
async fn ensure_evaluation(
    exp: &EvolutionExperiment,
    ctx: &Context,
    jobs: &Api<Job>,
) -> Result<JobState> {
    let evaluation = JobState::of(jobs.get_opt(&jobs::evaluation_name(exp)).await?.as_ref());
    if !evaluation.exists {
        apply_job(jobs, &jobs::evaluation(exp, &ctx.jobs)).await?;
        let note = "measuring the best individual by validation on the test set".into();
        publish(exp, ctx, Reason::EvaluationStarted, note).await?;
    }
    Ok(evaluation)
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
            let note = format!(
                "individual {} reached validation accuracy {:.4} ({} convolutions, {} parameters)",
                best.id, best.validation_accuracy, best.convolutions, best.parameters
            );
            publish(exp, ctx, Reason::NewBest, note).await?;
        }
    }
    if let (None, Some(reason)) = (&previous.stop_reason, &status.stop_reason) {
        publish(exp, ctx, Reason::Stopping, reason.clone()).await?;
    }
    if status.failed_workers.unwrap_or(0) > previous.failed_workers.unwrap_or(0) {
        let note = format!(
            "{} worker pods have failed so far; see the pods of Job {}",
            status.failed_workers.unwrap_or(0),
            jobs::workers_name(exp)
        );
        publish(exp, ctx, Reason::WorkerFailed, note).await?;
    }
    if let Some(error) = store_error {
        let said = already_said(
            previous,
            ConditionType::Degraded,
            ConditionReason::StoreUnavailable,
            error,
        );
        if !said {
            publish(exp, ctx, Reason::StoreUnavailable, error.to_string()).await?;
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
                let note =
                    format!("the best individual by validation scored {test:.4} on the test set");
                publish(exp, ctx, Reason::Succeeded, note).await?;
            }
            Some(Phase::Failed) => {
                let note = format!("Job {} failed; see its pod", jobs::evaluation_name(exp));
                publish(exp, ctx, Reason::EvaluationFailed, note).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The experiment is being deleted: stop the workers and honour the retention policy.
pub async fn cleanup(exp: &EvolutionExperiment, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(exp)?;
    let name = exp.name_any();
    let population = population(exp, ctx, &namespace).await;
    if let Ok(population) = &population {
        if let Err(e) = population.request_stop("the experiment was deleted").await {
            tracing::warn!(experiment = %name, error = %e, "cannot write the stop marker");
        }
    }
    match exp.spec.store.retention {
        Retention::Retain => {
            let note = format!("the population stays in {}", exp.spec.store.url);
            publish(exp, ctx, Reason::Retained, note).await?;
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
            let note = format!("{deleted} objects deleted from {}", exp.spec.store.url);
            publish(exp, ctx, Reason::Deleted, note).await?;
        }
    }
    ctx.metrics.forget(&namespace, &name);
    Ok(Action::await_change())
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
