//! What the operator reports: counts and the best few, never per-individual lists, so the
//! object stays small however long the experiment runs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvolutionExperimentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One per type: a map keyed by type, so that server-side apply merges them by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Workers the trainer Job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// Individuals alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<u32>,
    /// Individuals trained so far, the initial population included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestIndividual>,
    /// Estimated FLOPs spent on all individuals (§3.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_flops: Option<f64>,
    /// Seconds workers spent producing individuals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_seconds: Option<f64>,
    /// Worker pods that failed so far, in every workers Job the experiment had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_workers: Option<u32>,
    /// Workers Jobs replaced after they gave up on failing pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_restarts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// The spec does not validate; nothing runs until it is fixed.
    Invalid,
    Pending,
    Running,
    Suspended,
    Stopping,
    Evaluating,
    Succeeded,
    Failed,
}

/// The best individual by validation accuracy; its test accuracy is measured once, at the end
/// (§3.7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BestIndividual {
    pub id: String,
    pub validation_accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    pub parameters: u64,
    pub convolutions: u32,
}
