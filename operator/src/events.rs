//! The events the operator publishes on an experiment: one reason per thing that happened,
//! each a Warning or not by what it means, so that `kubectl describe` and alerts read the same
//! words the code and the tests use.

use std::fmt;

use crds::EvolutionExperiment;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use crate::controller::Context;

/// Why an event was published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The workers Job was created.
    WorkersCreated,
    /// An individual beat the best validation accuracy so far.
    NewBest,
    /// A stop condition was met, or the stop marker appeared.
    Stopping,
    /// More worker pods failed since the last status.
    WorkerFailed,
    /// The workers Job exhausted its backoff and is being replaced.
    WorkersRestarted,
    /// The final evaluation Job was created.
    EvaluationStarted,
    /// The best individual was measured on the test set.
    Succeeded,
    /// The evaluation Job failed.
    EvaluationFailed,
    /// The store could not be read.
    StoreUnavailable,
    /// The spec does not validate.
    InvalidSpec,
    /// The experiment was deleted and its population kept.
    Retained,
    /// The experiment was deleted and its population deleted from the store.
    Deleted,
    /// The workers' pod template changed, so their Job was replaced.
    WorkersReplaced,
    /// The spec validates but cannot run on this cluster or against this store.
    Refused,
    /// The workers Job failed for good: a configuration error, or too many replacements.
    WorkersFailed,
    /// Deleting the experiment waits for a store that cannot be emptied.
    CleanupBlocked,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WorkersCreated => "WorkersCreated",
            Reason::NewBest => "NewBest",
            Reason::Stopping => "Stopping",
            Reason::WorkerFailed => "WorkerFailed",
            Reason::WorkersRestarted => "WorkersRestarted",
            Reason::EvaluationStarted => "EvaluationStarted",
            Reason::Succeeded => "Succeeded",
            Reason::EvaluationFailed => "EvaluationFailed",
            Reason::StoreUnavailable => "StoreUnavailable",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::Retained => "Retained",
            Reason::Deleted => "Deleted",
            Reason::WorkersReplaced => "WorkersReplaced",
            Reason::Refused => "Refused",
            Reason::WorkersFailed => "WorkersFailed",
            Reason::CleanupBlocked => "CleanupBlocked",
        }
    }

    /// Warnings are what a person may have to act on.
    pub fn event_type(self) -> EventType {
        match self {
            Reason::WorkerFailed
            | Reason::WorkersRestarted
            | Reason::EvaluationFailed
            | Reason::StoreUnavailable
            | Reason::InvalidSpec
            | Reason::Refused
            | Reason::WorkersFailed
            | Reason::CleanupBlocked => EventType::Warning,
            Reason::WorkersCreated
            | Reason::NewBest
            | Reason::Stopping
            | Reason::EvaluationStarted
            | Reason::Succeeded
            | Reason::Retained
            | Reason::Deleted
            | Reason::WorkersReplaced => EventType::Normal,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Publishes an event about `exp`. Events inform and never decide: one that cannot be
/// written (a Terminating namespace refuses new objects) is logged, and the reconcile goes
/// on, so that it can never hold up a deletion.
pub async fn publish(exp: &EvolutionExperiment, ctx: &Context, reason: Reason, note: String) {
    let result = ctx
        .recorder
        .publish(
            &Event {
                type_: reason.event_type(),
                reason: reason.as_str().into(),
                note: Some(note.clone()),
                action: "Reconcile".into(),
                secondary: None,
            },
            &exp.object_ref(&()),
        )
        .await;
    if let Err(error) = result {
        tracing::warn!(
            experiment = %exp.name_any(),
            reason = %reason.as_str(),
            %note,
            %error,
            "cannot publish an event"
        );
    }
}
