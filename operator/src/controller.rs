//! The reconciler. Level-triggered: every reconcile observes the spec, the store and the Jobs,
//! makes the Jobs what they should be, and writes the status that follows from what it saw.
//! `reconcile` only hands the object to kube-runtime's finalizer helper, which calls
//! [`apply`] or [`cleanup`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crds::{EvolutionExperiment, EvolutionExperimentStatus, Experiment, Phase, Retention};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::{predicates, reflector, watcher, Predicate, WatchStreamExt};
use kube::{Client, ResourceExt};
use population::stop::conditions_met;
use population::store::{self, Population, StoreError, StoreOwner};

use crate::events::{publish, Reason};
use crate::jobs::{self, JobSettings, JobState};
use crate::metrics::Metrics;
use crate::status::{
    self, already_said, condition_of, ConditionReason, ConditionType, Observation, Refusal,
    StoreView,
};
use crate::{Error, Result, FINALIZER, MANAGER};

/// Which stores the operator accepts on a cluster.
#[derive(Clone, Copy, Debug, Default)]
pub struct StorePolicy {
    /// `file://` stores: a folder inside each pod, so every worker would keep a private
    /// population. Only where every pod mounts the same folder (one node, a hostPath).
    pub allow_file_stores: bool,
    /// S3 stores without `credentialsSecret`, reached with the operator's and the workers'
    /// own identity (IRSA, instance profiles). Off: an experiment could otherwise read and
    /// delete any prefix that identity reaches.
    pub ambient_credentials: bool,
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub jobs: JobSettings,
    pub stores: StorePolicy,
    /// Failed workers Jobs replaced before the experiment is marked Failed.
    pub max_worker_restarts: u32,
    /// How often a running experiment's status is refreshed from its store.
    pub refresh: Duration,
    /// Store clients by experiment, reused while the store and its credentials stay the
    /// same: building an S3 client costs more than the reads a reconcile makes.
    populations: Mutex<HashMap<String, (String, Population)>>,
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
            stores: StorePolicy::default(),
            max_worker_restarts: 3,
            refresh: Duration::from_secs(30),
            populations: Mutex::new(HashMap::new()),
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
    if let Error::Finalizer(inner) = error {
        if let kube::runtime::finalizer::Error::CleanupFailed(Error::Waiting(what)) = &**inner {
            tracing::debug!(experiment = %exp.name_any(), waiting_for = %what, "cleanup waits");
            return Action::requeue(Duration::from_secs(2));
        }
    }
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
    let mut key = serde_json::to_string(&exp.spec.store).unwrap_or_default();
    let credentials = match &exp.spec.store.credentials_secret {
        None => None,
        Some(name) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
            let Some(secret) = secrets.get_opt(name).await? else {
                // A namespace being deleted loses its Secrets before the experiment's
                // cleanup is done: the client made while the Secret existed still works.
                if let Some(population) = cached_population(exp, ctx) {
                    return Ok(population);
                }
                return Err(Error::Secret {
                    name: name.clone(),
                    reason: "not found in the experiment's namespace".into(),
                });
            };
            key.push_str(&secret.resource_version().unwrap_or_default());
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
    let uid = exp.uid().unwrap_or_else(|| exp.name_any());
    if let Ok(cache) = ctx.populations.lock() {
        if let Some((cached, population)) = cache.get(&uid) {
            if *cached == key {
                return Ok(population.clone());
            }
        }
    }
    let store = store::open_with_credentials(&exp.spec.store, credentials).await?;
    let population = Population::new(store);
    if let Ok(mut cache) = ctx.populations.lock() {
        cache.insert(uid, (key, population.clone()));
    }
    Ok(population)
}

fn cached_population(exp: &EvolutionExperiment, ctx: &Context) -> Option<Population> {
    let uid = exp.uid().unwrap_or_else(|| exp.name_any());
    let cache = ctx.populations.lock().ok()?;
    cache.get(&uid).map(|(_, population)| population.clone())
}

fn owner_of(exp: &EvolutionExperiment) -> StoreOwner {
    StoreOwner {
        namespace: exp.namespace().unwrap_or_default(),
        name: exp.name_any(),
        uid: exp.uid().unwrap_or_default(),
    }
}

/// What the operator refuses to run on a cluster, whatever the spec's own validity.
fn refusal_for_cluster(exp: &EvolutionExperiment, policy: StorePolicy) -> Option<Refusal> {
    let store = &exp.spec.store;
    if store.url.starts_with("file://") && !policy.allow_file_stores {
        return Some(Refusal {
            reason: ConditionReason::StoreNotShared,
            message: format!(
                "store.url {} is a folder inside each pod, so every worker would keep a population of its own; use an s3:// store on a cluster (file:// is for `trainer run` on one machine)",
                store.url
            ),
        });
    }
    if store.url.starts_with("s3://")
        && store.credentials_secret.is_none()
        && !policy.ambient_credentials
    {
        return Some(Refusal {
            reason: ConditionReason::NoCredentials,
            message: "store.credentialsSecret is not set: name a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or install the operator with store.ambientCredentials=true to use the pods' own identity".into(),
        });
    }
    None
}

/// Reads what the status needs from the store: two LISTs (`alive/`, `progress/`) and a few
/// GETs (experiment, stop marker, best record, its test result). Stop conditions met are
/// turned into the stop marker here.
pub async fn observe_store(experiment: &Experiment, population: &Population) -> Result<StoreView> {
    let record = population
        .start_experiment(&experiment.name, &experiment.spec)
        .await?;
    // Stop conditions, the mutation rate and the interventions' schedules are the parts of
    // a running experiment that may be edited: the stored record, which workers read,
    // follows the spec.
    if record.spec.with_edits_of(&experiment.spec) != record.spec {
        population.update_mutable(&experiment.spec).await?;
    }
    let mut stop = population.stop_marker().await?;
    if stop.is_none() {
        let met = conditions_met(population, &experiment.spec.stop, record.created_at_ms).await?;
        if let Some(reason) = met {
            population.request_stop(&reason).await?;
            stop = population.stop_marker().await?;
        }
    }
    let summary = population.summary().await?;
    // Scheduled interventions are written by whoever first sees their point: the workers,
    // and here, where the trained total is known anyway.
    let spec = record.spec.with_edits_of(&experiment.spec);
    if !spec.mutation_schedule.is_empty() || !spec.weight_resets.is_empty() {
        let known = population.interventions().await?;
        population
            .schedule_due(&spec, record.created_at_ms, summary.trained, &known)
            .await?;
    }
    // The evaluation reports the best readable individual: the best by validation unless its
    // weights are unreadable, when the status follows the evaluation's choice.
    let reported = population.reported_test_result().await?;
    let best_id = match &reported {
        Some(r) => Some(r.id.clone()),
        None => summary.best.as_ref().map(|b| b.id.clone()),
    };
    let best = match &best_id {
        Some(id) => population.individual(id).await?,
        None => None,
    };
    let test = match (&reported, &best) {
        (Some(r), _) => Some(r.clone()),
        (None, Some(b)) => population.test_result(&b.id).await?,
        (None, None) => None,
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
        Err(error) => {
            let refusal = Refusal {
                reason: ConditionReason::InvalidSpec,
                message: error.to_string(),
            };
            return refuse(exp, ctx, &previous, obs, refusal).await;
        }
    };
    if let Some(refusal) = refusal_for_cluster(exp, ctx.stores) {
        return refuse(exp, ctx, &previous, obs, refusal).await;
    }

    let view = match population(exp, ctx, &namespace).await {
        Ok(population) => match claim(exp, &population).await {
            Ok(()) => observe_store(&experiment, &population).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    // A store that holds another experiment, or this one with another spec, is not a store
    // problem: the spec must change. Running Jobs are left as they are.
    let conflict = match &view {
        Err(Error::Store(StoreError::Conflict { store, message })) => Some(Refusal {
            reason: ConditionReason::ImmutableField,
            message: format!("store {store}: {message}"),
        }),
        Err(Error::StoreInUse(owner)) => Some(Refusal {
            reason: ConditionReason::StoreInUse,
            message: format!(
                "store {} belongs to experiment {owner}; give this experiment a store URL of its own",
                exp.spec.store.url
            ),
        }),
        _ => None,
    };
    if let Some(refusal) = conflict {
        return refuse(exp, ctx, &previous, obs, refusal).await;
    }
    let store_error = view.as_ref().err().map(|e| e.to_string());
    obs.store = Some(view.map_err(|e| e.to_string()));
    let stopped = obs
        .store
        .as_ref()
        .and_then(|s| s.as_ref().ok())
        .is_some_and(|v| v.stop.is_some());

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = jobs.get_opt(&jobs::workers_name(exp)).await?;
    obs.workers = JobState::of(existing.as_ref());
    let mut restarts = previous.worker_restarts.unwrap_or(0);
    let requeue = if !stopped {
        let outcome = ensure_workers(exp, ctx, &jobs, &obs.workers, &previous).await?;
        restarts += u32::from(outcome.restarted);
        obs.workers_failed = outcome.gave_up;
        outcome.requeue
    } else if obs.workers.active > 0 {
        // Stopped: running workers finish their child and exit; pods that never started
        // (unschedulable, no image) would keep the experiment Stopping for ever, so once no
        // worker is ready the Job is suspended, which removes them.
        if obs.workers.ready == 0 && !obs.workers.deleting {
            let history = obs.workers.history;
            apply_job(&jobs, &jobs::workers(exp, &ctx.jobs, true, history)).await?;
        }
        Duration::from_secs(5)
    } else {
        obs.evaluation = ensure_evaluation(exp, ctx, &jobs).await?;
        Duration::from_secs(10)
    };

    let mut status = status::compute(&experiment.spec, &previous, &obs, &now());
    status.worker_restarts = (restarts > 0).then_some(restarts);
    tracing::debug!(
        experiment = %experiment.name,
        namespace = %namespace,
        phase = %status.phase.map_or("none".to_string(), |p| format!("{p:?}")),
        stopped,
        active = obs.workers.active,
        ready = obs.workers.ready,
        trained = status.trained.unwrap_or(0),
        store_error = %store_error.as_deref().unwrap_or("none"),
        "reconciled"
    );
    announce(exp, ctx, &previous, &status, store_error.as_deref()).await;
    write_status(exp, ctx, &status).await?;
    ctx.metrics
        .experiment(&namespace, &experiment.name, &status, store_error.is_none());
    Ok(match status.phase {
        Some(Phase::Succeeded | Phase::Failed) => Action::await_change(),
        _ => Action::requeue(requeue),
    })
}

/// Claims the store for this experiment, or finds that another one owns it.
async fn claim(exp: &EvolutionExperiment, population: &Population) -> Result<()> {
    let owner = owner_of(exp);
    let found = population.claim(&owner).await?;
    if found.uid == owner.uid {
        Ok(())
    } else {
        Err(Error::StoreInUse(found))
    }
}

/// A spec the operator will not run: say why once, report it, and run nothing new until the
/// spec changes (which triggers a reconcile by itself).
async fn refuse(
    exp: &EvolutionExperiment,
    ctx: &Context,
    previous: &EvolutionExperimentStatus,
    mut obs: Observation,
    refusal: Refusal,
) -> Result<Action> {
    let said = already_said(
        previous,
        ConditionType::Valid,
        refusal.reason,
        &refusal.message,
    );
    if !said {
        let reason = match refusal.reason {
            ConditionReason::InvalidSpec => Reason::InvalidSpec,
            _ => Reason::Refused,
        };
        publish(exp, ctx, reason, refusal.message.clone()).await;
    }
    obs.refusal = Some(refusal);
    let status = status::compute(&exp.spec, previous, &obs, &now());
    write_status(exp, ctx, &status).await?;
    Ok(Action::await_change())
}

/// What [`ensure_workers`] did.
struct WorkersOutcome {
    requeue: Duration,
    /// A failed Job was replaced.
    restarted: bool,
    /// The workers will not be replaced again, and why.
    gave_up: Option<String>,
}

/// The workers Job as the spec says. Parallelism and suspension are patched in place; any
/// other change (image, resources, placement) needs a new pod template, which a Job cannot
/// take, so the Job is replaced and the new workers continue from the store. A Job that gave
/// up after too many failed pods is replaced too, up to `max_worker_restarts` times; one that
/// failed on a configuration error is not, since its replacement would fail the same way.
async fn ensure_workers(
    exp: &EvolutionExperiment,
    ctx: &Context,
    jobs: &Api<Job>,
    workers: &JobState,
    previous: &EvolutionExperimentStatus,
) -> Result<WorkersOutcome> {
    let outcome = |requeue, restarted, gave_up| WorkersOutcome {
        requeue,
        restarted,
        gave_up,
    };
    if workers.deleting {
        return Ok(outcome(Duration::from_secs(2), false, None));
    }
    let restarts = previous.worker_restarts.unwrap_or(0);
    if workers.failed && !workers.succeeded {
        let (reason, message) = workers.failure.clone().unwrap_or_default();
        if workers.misconfigured() {
            let why = format!(
                "a worker reported a configuration error (exit {}), so the workers Job failed: {message}; see the logs of its pods, fix the spec or the image, and the workers restart",
                jobs::CONFIGURATION_EXIT
            );
            return Ok(outcome(ctx.refresh, false, Some(why)));
        }
        if restarts >= ctx.max_worker_restarts {
            let why = format!(
                "the workers Job failed {} times ({reason}: {message}); not replacing it again: see the logs of its pods",
                restarts + 1
            );
            return Ok(outcome(ctx.refresh, false, Some(why)));
        }
        delete_job(
            jobs,
            &jobs::workers_name(exp),
            PropagationPolicy::Background,
        )
        .await?;
        let note = format!(
            "the workers Job failed after {} failed pods ({reason}); starting a new one ({} of {} replacements)",
            workers.failed_pods,
            restarts + 1,
            ctx.max_worker_restarts
        );
        publish(exp, ctx, Reason::WorkersRestarted, note).await;
        return Ok(outcome(Duration::from_secs(2), true, None));
    }
    let history = if workers.exists {
        workers.history
    } else {
        jobs::History {
            restarts,
            failed_before: previous.failed_workers.unwrap_or(0),
        }
    };
    let desired = jobs::workers(exp, &ctx.jobs, exp.spec.suspend, history);
    if workers.exists && workers.template_hash.as_deref() != jobs::template_hash(&desired) {
        delete_job(
            jobs,
            &jobs::workers_name(exp),
            PropagationPolicy::Background,
        )
        .await?;
        let note = "the workers' pod template changed (image, resources, device or placement), which a Job cannot take: replacing the workers Job; the population continues from the store".into();
        publish(exp, ctx, Reason::WorkersReplaced, note).await;
        return Ok(outcome(Duration::from_secs(2), false, None));
    }
    apply_job(jobs, &desired).await?;
    if !workers.exists {
        let note = format!("{} workers started", exp.spec.workers());
        publish(exp, ctx, Reason::WorkersCreated, note).await;
    }
    Ok(outcome(ctx.refresh, false, None))
}

async fn delete_job(jobs: &Api<Job>, name: &str, policy: PropagationPolicy) -> Result<()> {
    let params = DeleteParams {
        propagation_policy: Some(policy),
        ..DeleteParams::default()
    };
    match jobs.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
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
        publish(exp, ctx, Reason::EvaluationStarted, note).await;
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
) {
    if let Some(best) = &status.best {
        if previous.best.as_ref().map(|b| &b.id) != Some(&best.id) {
            let note = format!(
                "individual {} reached validation accuracy {:.4} ({} convolutions, {} parameters)",
                best.id, best.validation_accuracy, best.convolutions, best.parameters
            );
            publish(exp, ctx, Reason::NewBest, note).await;
        }
    }
    if let (None, Some(reason)) = (&previous.stop_reason, &status.stop_reason) {
        publish(exp, ctx, Reason::Stopping, reason.clone()).await;
    }
    if status.failed_workers.unwrap_or(0) > previous.failed_workers.unwrap_or(0) {
        let note = format!(
            "{} worker pods have failed so far; see the pods of Job {}",
            status.failed_workers.unwrap_or(0),
            jobs::workers_name(exp)
        );
        publish(exp, ctx, Reason::WorkerFailed, note).await;
    }
    if let Some(error) = store_error {
        let said = already_said(
            previous,
            ConditionType::Degraded,
            ConditionReason::StoreUnavailable,
            error,
        );
        if !said {
            publish(exp, ctx, Reason::StoreUnavailable, error.to_string()).await;
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
                publish(exp, ctx, Reason::Succeeded, note).await;
            }
            Some(Phase::Failed) => match condition_of(status, ConditionType::Progressing) {
                Some(c) if c.reason == ConditionReason::WorkersFailed.as_str() => {
                    publish(exp, ctx, Reason::WorkersFailed, c.message.clone()).await;
                }
                _ => {
                    let note = format!("Job {} failed; see its pod", jobs::evaluation_name(exp));
                    publish(exp, ctx, Reason::EvaluationFailed, note).await;
                }
            },
            _ => {}
        }
    }
}

/// The experiment is being deleted: stop the workers and honour the retention policy.
/// Nothing here may hang a deletion for ever: events are best effort, and a store that
/// cannot be reached while the namespace itself is going away keeps its data (logged with
/// its URL) rather than holding up the namespace.
pub async fn cleanup(exp: &EvolutionExperiment, ctx: &Context) -> Result<Action> {
    let namespace = namespace_of(exp)?;
    let name = exp.name_any();
    let population = population(exp, ctx, &namespace).await;
    if let Ok(population) = &population {
        if let Err(e) = stop_workers(exp, population).await {
            tracing::warn!(experiment = %name, error = %e, "cannot write the stop marker");
        }
    }
    match exp.spec.store.retention {
        Retention::Retain => {
            let note = format!("the population stays in {}", exp.spec.store.url);
            publish(exp, ctx, Reason::Retained, note).await;
        }
        Retention::Delete => {
            // Workers must be gone before their store is emptied, or their last writes would
            // land after it: the Jobs are deleted in the foreground, and the store waits
            // until they (and so their pods) no longer exist.
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            let mut remaining = Vec::new();
            for job in [jobs::workers_name(exp), jobs::evaluation_name(exp)] {
                if jobs.get_opt(&job).await?.is_some() {
                    delete_job(&jobs, &job, PropagationPolicy::Foreground).await?;
                    remaining.push(job);
                }
            }
            if !remaining.is_empty() {
                return Err(Error::Waiting(format!(
                    "Jobs {} and their pods to be gone",
                    remaining.join(", ")
                )));
            }
            // Pods can outlive their Job: a namespace being deleted removes Jobs and pods
            // side by side, and a terminating worker still writes until it exits.
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let selector = format!(
                "cambrian.dev/experiment={},app.kubernetes.io/managed-by={MANAGER}",
                jobs::label_value(&name)
            );
            let left = pods.list(&ListParams::default().labels(&selector)).await?;
            if !left.items.is_empty() {
                return Err(Error::Waiting(format!(
                    "{} pods of the experiment to terminate",
                    left.items.len()
                )));
            }
            let emptied = match population {
                Ok(population) => empty_store(exp, &population).await,
                Err(e) => Err(e),
            };
            match emptied {
                Ok(note) => publish(exp, ctx, Reason::Deleted, note).await,
                Err(error) if namespace_terminating(ctx, &namespace).await => {
                    tracing::warn!(
                        experiment = %name,
                        store = %exp.spec.store.url,
                        %error,
                        "the namespace is being deleted and the store cannot be emptied; its objects stay"
                    );
                }
                Err(error) => {
                    let note = format!(
                        "cannot empty {}: {error}. Fix the store or its Secret, or keep the data: kubectl patch evo {name} -n {namespace} --type merge -p '{{\"spec\":{{\"store\":{{\"retention\":\"Retain\"}}}}}}'",
                        exp.spec.store.url
                    );
                    publish(exp, ctx, Reason::CleanupBlocked, note).await;
                    return Err(error);
                }
            }
        }
    }
    ctx.metrics.forget(&namespace, &name);
    if let Ok(mut cache) = ctx.populations.lock() {
        cache.remove(&exp.uid().unwrap_or_else(|| exp.name_any()));
    }
    Ok(Action::await_change())
}

/// Writes the stop marker, but only into a store that holds an experiment and no other
/// experiment owns: a cleanup that runs again after the store was emptied (its finalizer
/// patch lost a race) must not leave a marker behind, and another experiment's store is
/// not ours to stop.
async fn stop_workers(exp: &EvolutionExperiment, population: &Population) -> Result<()> {
    let ours = owner_of(exp);
    let foreign = population
        .owner()
        .await?
        .is_some_and(|owner| owner.uid != ours.uid);
    if !foreign && population.experiment().await?.is_some() {
        population
            .request_stop("the experiment was deleted")
            .await?;
    }
    Ok(())
}

/// Deletes the store's objects if this experiment owns them; returns what it did.
async fn empty_store(exp: &EvolutionExperiment, population: &Population) -> Result<String> {
    let ours = owner_of(exp);
    if let Some(owner) = population.owner().await? {
        if owner.uid != ours.uid {
            return Ok(format!(
                "{} belongs to experiment {owner}; nothing deleted",
                exp.spec.store.url
            ));
        }
    }
    let deleted = population.delete_everything().await?;
    Ok(format!(
        "{deleted} objects deleted from {}",
        exp.spec.store.url
    ))
}

async fn namespace_terminating(ctx: &Context, namespace: &str) -> bool {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    match namespaces.get_opt(namespace).await {
        Ok(Some(ns)) => ns.metadata.deletion_timestamp.is_some(),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) {
    let experiments = Api::<EvolutionExperiment>::all(ctx.client.clone());
    let jobs = Api::<Job>::all(ctx.client.clone());
    // Only changes people make (spec, deletion, finalizers) trigger a reconcile, not the
    // status writes of the reconciler itself: those would make every reconcile trigger the
    // next. Job changes and the periodic refresh cover the rest.
    let (reader, writer) = reflector::store();
    let triggers = watcher(experiments, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );
    Controller::for_stream(triggers, reader)
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
