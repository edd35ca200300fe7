//! The events the operator publishes on an experiment: one reason per thing that happened,
//! each a Warning or not by what it means, so that `kubectl describe` and alerts read the same
//! words the code and the tests use.

use std::fmt;

use crds::EvolutionExperiment;
use kube::runtime::events::{Event, EventType};
use kube::Resource;

use crate::controller::Context;
use crate::Result;

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
        }
    }

    /// Warnings are what a person may have to act on.
    pub fn event_type(self) -> EventType {
        match self {
            Reason::WorkerFailed
            | Reason::WorkersRestarted
            | Reason::EvaluationFailed
            | Reason::StoreUnavailable
            | Reason::InvalidSpec => EventType::Warning,
            Reason::WorkersCreated
            | Reason::NewBest
            | Reason::Stopping
            | Reason::EvaluationStarted
            | Reason::Succeeded
            | Reason::Retained
            | Reason::Deleted => EventType::Normal,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Publishes an event about `exp`.
pub async fn publish(
    exp: &EvolutionExperiment,
    ctx: &Context,
    reason: Reason,
    note: String,
) -> Result<()> {
    ctx.recorder
        .publish(
            &Event {
                type_: reason.event_type(),
                reason: reason.as_str().into(),
                note: Some(note),
                action: "Reconcile".into(),
                secondary: None,
            },
            &exp.object_ref(&()),
        )
        .await?;
    Ok(())
}
