//! From what the reconciler observes (the spec, the store, the Jobs) to the status it writes.
//! A pure function: level-triggered, so the same world always gives the same status, and
//! re-reconciling changes nothing.

use std::fmt;

use crds::{BestIndividual, EvolutionExperimentSpec, EvolutionExperimentStatus, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use population::individual::Individual;
use population::store::{StopMarker, Summary, TestResult};

use crate::jobs::JobState;

/// The conditions every status carries (`Valid` alone while the spec is invalid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    Valid,
    Progressing,
    Degraded,
    Complete,
}

/// Why a condition has the status it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionReason {
    ValidSpec,
    InvalidSpec,
    WorkersRunning,
    WorkersStarting,
    Suspended,
    Stopping,
    Completed,
    EvaluationFailed,
    StoreUnavailable,
    WorkerFailures,
    Healthy,
    Evaluated,
    NotComplete,
    StoreNotShared,
    NoCredentials,
    StoreInUse,
    ImmutableField,
    WorkersFailed,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Valid => "Valid",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
            ConditionType::Complete => "Complete",
        }
    }
}

impl ConditionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionReason::ValidSpec => "ValidSpec",
            ConditionReason::InvalidSpec => "InvalidSpec",
            ConditionReason::WorkersRunning => "WorkersRunning",
            ConditionReason::WorkersStarting => "WorkersStarting",
            ConditionReason::Suspended => "Suspended",
            ConditionReason::Stopping => "Stopping",
            ConditionReason::Completed => "Completed",
            ConditionReason::EvaluationFailed => "EvaluationFailed",
            ConditionReason::StoreUnavailable => "StoreUnavailable",
            ConditionReason::WorkerFailures => "WorkerFailures",
            ConditionReason::Healthy => "Healthy",
            ConditionReason::Evaluated => "Evaluated",
            ConditionReason::NotComplete => "NotComplete",
            ConditionReason::StoreNotShared => "StoreNotShared",
            ConditionReason::NoCredentials => "NoCredentials",
            ConditionReason::StoreInUse => "StoreInUse",
            ConditionReason::ImmutableField => "ImmutableField",
            ConditionReason::WorkersFailed => "WorkersFailed",
        }
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ConditionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The condition of type `type_` in `status`, if it has one.
pub fn condition_of(
    status: &EvolutionExperimentStatus,
    type_: ConditionType,
) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Whether `status` holds condition `type_` with this reason and message: what was already
/// said need not be said again.
pub fn already_said(
    status: &EvolutionExperimentStatus,
    type_: ConditionType,
    reason: ConditionReason,
    message: &str,
) -> bool {
    condition_of(status, type_).is_some_and(|c| c.reason == reason.as_str() && c.message == message)
}

/// What the store says about the experiment.
#[derive(Clone, Debug, Default)]
pub struct StoreView {
    pub summary: Summary,
    /// When the experiment started (its `experiment.json`), if workers have started it.
    pub started_at_ms: Option<u64>,
    pub stop: Option<StopMarker>,
    /// The record of the best individual by validation accuracy.
    pub best: Option<Individual>,
    /// The test accuracy measured for it, once the evaluation has run.
    pub test: Option<TestResult>,
}

/// Why the operator will not run the spec as it stands: `Valid` is False with this reason
/// and message until the spec changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ConditionReason,
    pub message: String,
}

/// Everything one reconcile observed.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub generation: Option<i64>,
    pub refusal: Option<Refusal>,
    /// Why the workers will not be replaced again, once their Job failed for good.
    pub workers_failed: Option<String>,
    /// The store's view, or why it could not be read (never with credentials in it).
    pub store: Option<Result<StoreView, String>>,
    pub workers: JobState,
    pub evaluation: JobState,
}

pub fn time_of_ms(ms: u64) -> Option<Time> {
    Timestamp::from_millisecond(ms as i64).ok().map(Time)
}

fn condition(
    previous: &EvolutionExperimentStatus,
    generation: Option<i64>,
    now: &Time,
    type_: ConditionType,
    status: bool,
    reason: ConditionReason,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let last_transition_time = condition_of(previous, type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.as_str().into(),
        status,
        reason: reason.as_str().into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

pub fn phase(spec: &EvolutionExperimentSpec, obs: &Observation) -> Phase {
    if obs.refusal.is_some() {
        return Phase::Invalid;
    }
    let view = obs.store.as_ref().and_then(|s| s.as_ref().ok());
    if let Some(view) = view.filter(|v| v.stop.is_some()) {
        if obs.evaluation.succeeded && view.test.is_some() {
            return Phase::Succeeded;
        }
        if obs.evaluation.failed {
            return Phase::Failed;
        }
        if obs.workers.active > 0 {
            return Phase::Stopping;
        }
        return Phase::Evaluating;
    }
    if obs.workers_failed.is_some() {
        return Phase::Failed;
    }
    if spec.suspend {
        return Phase::Suspended;
    }
    // Running means training: a pod that is scheduled but cannot start (no image, no Secret
    // key) is not a worker yet.
    if obs.workers.ready > 0 {
        Phase::Running
    } else {
        Phase::Pending
    }
}

/// The status for what was observed; `previous` only keeps transition and completion times.
pub fn compute(
    spec: &EvolutionExperimentSpec,
    previous: &EvolutionExperimentStatus,
    obs: &Observation,
    now: &Time,
) -> EvolutionExperimentStatus {
    let phase = phase(spec, obs);
    use ConditionReason as R;
    use ConditionType as T;
    let cond = |type_: T, status: bool, reason: R, message: String| {
        condition(
            previous,
            obs.generation,
            now,
            type_,
            status,
            reason,
            message,
        )
    };
    let mut conditions = Vec::new();
    if let Some(refusal) = &obs.refusal {
        conditions.push(cond(
            T::Valid,
            false,
            refusal.reason,
            refusal.message.clone(),
        ));
        return EvolutionExperimentStatus {
            phase: Some(phase),
            observed_generation: obs.generation,
            conditions,
            ..previous.clone()
        };
    }
    conditions.push(cond(
        T::Valid,
        true,
        R::ValidSpec,
        "the spec is valid".into(),
    ));
    let (progressing, reason, message) = match phase {
        Phase::Running => (
            true,
            R::WorkersRunning,
            format!(
                "{} of {} worker pods ready",
                obs.workers.ready,
                spec.worker_pods()
            ),
        ),
        Phase::Pending => (
            true,
            R::WorkersStarting,
            format!(
                "waiting for worker pods: {} created, none ready yet",
                obs.workers.active
            ),
        ),
        Phase::Suspended => (false, R::Suspended, "spec.suspend is set".into()),
        Phase::Stopping | Phase::Evaluating => (
            true,
            R::Stopping,
            "workers finish, then the best individual is evaluated".into(),
        ),
        Phase::Succeeded => (false, R::Completed, "the experiment is complete".into()),
        Phase::Failed => match &obs.workers_failed {
            Some(why) => (false, R::WorkersFailed, why.clone()),
            None => (
                false,
                R::EvaluationFailed,
                "the evaluation Job failed".into(),
            ),
        },
        Phase::Invalid => (false, R::InvalidSpec, String::new()),
    };
    conditions.push(cond(T::Progressing, progressing, reason, message));
    let store_error = obs.store.as_ref().and_then(|s| s.as_ref().err());
    let degraded = match store_error {
        Some(e) => cond(T::Degraded, true, R::StoreUnavailable, e.clone()),
        // Degraded while failures leave it short of workers, not for the rest of the Job's
        // life: once every pod is replaced and ready, it is healthy again.
        None if obs.workers.failed_pods > 0
            && !phase_done(phase)
            && phase != Phase::Suspended
            && obs.workers.ready < spec.worker_pods() as i32 =>
        {
            cond(
                T::Degraded,
                true,
                R::WorkerFailures,
                format!(
                    "{} worker pods failed; {} of {} ready, the Job replaces the others",
                    obs.workers.failed_total(),
                    obs.workers.ready,
                    spec.worker_pods()
                ),
            )
        }
        None => cond(
            T::Degraded,
            false,
            R::Healthy,
            match obs.workers.failed_total() {
                0 => "workers and store are healthy".into(),
                n => format!(
                    "workers and store are healthy; {n} worker pods failed and were replaced"
                ),
            },
        ),
    };
    conditions.push(degraded);
    conditions.push(cond(
        T::Complete,
        phase == Phase::Succeeded,
        if phase == Phase::Succeeded {
            R::Evaluated
        } else {
            R::NotComplete
        },
        if phase == Phase::Succeeded {
            "the best individual was measured on the test set".into()
        } else {
            String::new()
        },
    ));

    let view = obs.store.as_ref().and_then(|s| s.as_ref().ok());
    let mut status = EvolutionExperimentStatus {
        phase: Some(phase),
        observed_generation: obs.generation,
        conditions,
        workers: Some(spec.workers()),
        failed_workers: Some(if obs.workers.exists {
            obs.workers.failed_total()
        } else {
            previous.failed_workers.unwrap_or(0)
        }),
        worker_restarts: previous.worker_restarts,
        start_time: previous.start_time.clone(),
        completion_time: previous.completion_time.clone(),
        ..EvolutionExperimentStatus::default()
    };
    match view {
        Some(view) => {
            status.population = Some(view.summary.alive as u32);
            status.trained = Some(view.summary.trained);
            status.total_flops = Some(view.summary.flops);
            status.worker_seconds = Some(view.summary.worker_seconds);
            status.stop_reason = view.stop.as_ref().map(|s| s.reason.clone());
            status.start_time = view
                .started_at_ms
                .and_then(time_of_ms)
                .or(status.start_time);
            status.best = view.best.as_ref().map(|b| BestIndividual {
                id: b.id.to_string(),
                validation_accuracy: b.fitness(),
                test_accuracy: view
                    .test
                    .as_ref()
                    .filter(|t| t.id == b.id)
                    .map(|t| t.test_accuracy),
                parameters: b.outcome.parameters as u64,
                convolutions: b.outcome.convolutions as u32,
            });
        }
        // The store could not be read: keep what was last known.
        None => {
            status.population = previous.population;
            status.trained = previous.trained;
            status.total_flops = previous.total_flops;
            status.worker_seconds = previous.worker_seconds;
            status.stop_reason = previous.stop_reason.clone();
            status.best = previous.best.clone();
        }
    }
    if phase == Phase::Succeeded && status.completion_time.is_none() {
        status.completion_time = Some(now.clone());
    }
    status
}

fn phase_done(phase: Phase) -> bool {
    matches!(phase, Phase::Succeeded | Phase::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::experiment;

    fn now() -> Time {
        time_of_ms(1_800_000_000_000).unwrap()
    }

    #[test]
    fn same_world_same_status() {
        let exp = experiment("x");
        let obs = Observation {
            generation: Some(3),
            store: Some(Ok(StoreView::default())),
            workers: JobState {
                exists: true,
                active: 4,
                ready: 4,
                ..JobState::default()
            },
            ..Observation::default()
        };
        let first = compute(&exp.spec, &Default::default(), &obs, &now());
        let later = time_of_ms(1_800_000_060_000).unwrap();
        let second = compute(&exp.spec, &first, &obs, &later);
        assert_eq!(first, second);
        assert_eq!(first.phase, Some(Phase::Running));
    }

    #[test]
    fn stop_then_evaluation_then_success() {
        let exp = experiment("x");
        let mut view = StoreView {
            stop: Some(StopMarker {
                reason: "wall time".into(),
                at_ms: 0,
                nonce: String::new(),
            }),
            ..StoreView::default()
        };
        let mut obs = Observation {
            store: Some(Ok(view.clone())),
            workers: JobState {
                exists: true,
                active: 2,
                ..JobState::default()
            },
            ..Observation::default()
        };
        assert_eq!(phase(&exp.spec, &obs), Phase::Stopping);
        obs.workers.active = 0;
        assert_eq!(phase(&exp.spec, &obs), Phase::Evaluating);
        obs.evaluation.succeeded = true;
        view.test = Some(TestResult {
            id: population::individual::IndividualId::parse("a").unwrap(),
            test_accuracy: 0.5,
            correct: 1,
            total: 2,
            at_ms: 0,
        });
        obs.store = Some(Ok(view));
        let status = compute(&exp.spec, &Default::default(), &obs, &now());
        assert_eq!(status.phase, Some(Phase::Succeeded));
        assert!(status.completion_time.is_some());
        assert_eq!(status.stop_reason.as_deref(), Some("wall time"));
    }

    #[test]
    fn store_outage_keeps_the_last_known_counts() {
        let exp = experiment("x");
        let previous = EvolutionExperimentStatus {
            trained: Some(42),
            population: Some(10),
            ..Default::default()
        };
        let obs = Observation {
            store: Some(Err("connection refused".into())),
            ..Observation::default()
        };
        let status = compute(&exp.spec, &previous, &obs, &now());
        assert_eq!(status.trained, Some(42));
        let degraded = condition_of(&status, ConditionType::Degraded).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", ConditionReason::StoreUnavailable.as_str())
        );
    }
}
