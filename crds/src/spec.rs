//! What a user writes: one `EvolutionExperiment` is one experiment of the paper. Every default
//! is the paper's (§3, §4), so a manifest only names what it changes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::EvolutionExperimentStatus;

/// An evolution experiment: a population of image classifiers evolved by tournament selection
/// (Real et al., 2017), its workers, where it keeps its population and when it stops.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cambrian.dev",
    version = "v1alpha1",
    kind = "EvolutionExperiment",
    namespaced,
    status = "EvolutionExperimentStatus",
    shortname = "evo",
    category = "cambrian",
    doc = "An evolution experiment: a population of image classifiers evolved by tournament selection.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Workers","type":"integer","jsonPath":".status.workers"}"#,
    printcolumn = r#"{"name":"Population","type":"integer","jsonPath":".status.population"}"#,
    printcolumn = r#"{"name":"Trained","type":"integer","jsonPath":".status.trained"}"#,
    printcolumn = r#"{"name":"Best-Val","type":"number","format":"float","jsonPath":".status.best.validationAccuracy"}"#,
    printcolumn = r#"{"name":"Test","type":"number","format":"float","jsonPath":".status.best.testAccuracy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.workers) || self.workers <= self.population", "message": "spec.workers must be at most spec.population"},
    {"rule": "self.population == oldSelf.population", "message": "spec.population cannot change: the store holds this experiment's population; start a new experiment with another store URL"},
    {"rule": "self.seed == oldSelf.seed", "message": "spec.seed cannot change while the experiment exists; start a new experiment with another store URL"},
    {"rule": "has(self.training) == has(oldSelf.training) && (!has(self.training) || self.training == oldSelf.training)", "message": "spec.training cannot change while the experiment exists; start a new experiment with another store URL"},
    {"rule": "has(self.data) == has(oldSelf.data) && (!has(self.data) || self.data == oldSelf.data)", "message": "spec.data cannot change while the experiment exists; start a new experiment with another store URL"},
    {"rule": "has(self.controls) == has(oldSelf.controls) && (!has(self.controls) || self.controls == oldSelf.controls)", "message": "spec.controls cannot change while the experiment exists; start a new experiment with another store URL"},
    {"rule": "self.store.url == oldSelf.store.url && has(self.store.endpoint) == has(oldSelf.store.endpoint) && (!has(self.store.endpoint) || self.store.endpoint == oldSelf.store.endpoint)", "message": "spec.store.url and spec.store.endpoint cannot change: they name where the population is"},
]))]
pub struct EvolutionExperimentSpec {
    /// Individuals alive at any time (the paper's P).
    #[serde(default = "default_population")]
    #[schemars(range(min = 2))]
    pub population: u32,
    /// Workers training children in parallel; default population / 4, as in the paper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub workers: Option<u32>,
    /// Mutations applied to each child (§5 raises it to 5 to escape local optima). It may be
    /// edited while the experiment runs: the change is recorded in the store as an
    /// intervention and every child born after it uses the new rate.
    #[serde(default = "default_mutation_rate")]
    #[schemars(range(min = 1))]
    pub mutation_rate: u32,
    /// Changes of the mutation rate at given points of the run (§5's bursts), e.g.
    /// `[{after: 20m, rate: 5}, {after: 40m, rate: 1}]`. May be edited while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mutation_schedule: Vec<ScheduledRate>,
    /// Population-wide weight resets (§5) at given points of the run: every alive individual
    /// retrains its own DNA from fresh weights before tournaments compare it again. May be
    /// edited while it runs; an entry whose point has passed resets once, when it is added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weight_resets: Vec<When>,
    /// Seed of every random choice; a run with the same seed and one worker repeats exactly.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default)]
    pub data: DataSpec,
    pub store: StoreSpec,
    #[serde(default)]
    pub stop: StopSpec,
    #[serde(default)]
    pub controls: ControlsSpec,
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Stop the workers without ending the experiment; unsuspending continues from the store.
    #[serde(default)]
    pub suspend: bool,
}

fn default_population() -> u32 {
    1000
}

fn default_mutation_rate() -> u32 {
    1
}

impl EvolutionExperimentSpec {
    /// The number of workers, defaulted as in the paper.
    pub fn workers(&self) -> u32 {
        self.workers.unwrap_or((self.population / 4).max(1))
    }

    /// Worker loops in each pod.
    pub fn workers_per_pod(&self) -> u32 {
        self.worker.workers_per_pod.unwrap_or(1).max(1)
    }

    /// This spec with the parts a running experiment may change (stop conditions, mutation
    /// rate and schedule, weight resets) taken from `edited`.
    pub fn with_edits_of(&self, edited: &EvolutionExperimentSpec) -> EvolutionExperimentSpec {
        EvolutionExperimentSpec {
            stop: edited.stop.clone(),
            mutation_rate: edited.mutation_rate,
            mutation_schedule: edited.mutation_schedule.clone(),
            weight_resets: edited.weight_resets.clone(),
            ..self.clone()
        }
    }

    /// Pods the workers Job runs: enough for every worker.
    pub fn worker_pods(&self) -> u32 {
        self.workers().div_ceil(self.workers_per_pod())
    }
}

/// A point of a run: a wall time since the experiment started, or a number of individuals
/// trained (as the status counts them). Exactly one is given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.after) != has(self.trained)", "message": "give exactly one of after and trained"},
]))]
pub struct When {
    /// Wall time since the experiment started, e.g. `20m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Individuals trained, the initial population included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<u64>,
}

impl When {
    /// A name that stays the same while the entry does, whatever else in its list changes:
    /// it keys the entry's record in the store, so an entry fires once.
    pub fn tag(&self) -> String {
        match (&self.after, self.trained) {
            (Some(after), _) => format!(
                "after-{}",
                after.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '.'), "")
            ),
            (None, Some(n)) => format!("trained-{n}"),
            (None, None) => "never".into(),
        }
    }

    /// Whether the point has been reached `elapsed` after the start with `trained` trained.
    pub fn reached(&self, elapsed: std::time::Duration, trained: u64) -> bool {
        match (&self.after, self.trained) {
            (Some(after), _) => crate::parse_duration(after).is_ok_and(|d| elapsed >= d),
            (None, Some(n)) => trained >= n,
            (None, None) => false,
        }
    }
}

/// A change of the mutation rate at a point of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.after) != has(self.trained)", "message": "give exactly one of after and trained"},
]))]
pub struct ScheduledRate {
    /// Wall time since the experiment started, e.g. `20m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Individuals trained, the initial population included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<u64>,
    #[schemars(range(min = 1))]
    pub rate: u32,
}

impl ScheduledRate {
    pub fn when(&self) -> When {
        When {
            after: self.after.clone(),
            trained: self.trained,
        }
    }
}

/// How each individual is trained (§3.4).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.momentum >= 0.0 && self.momentum < 1.0", "message": "momentum must be in [0, 1)"},
    {"rule": "self.weightDecay >= 0.0", "message": "weightDecay must not be negative"},
    {"rule": "self.initialLearningRate > 0.0", "message": "initialLearningRate must be positive"},
]))]
pub struct TrainingSpec {
    /// Training steps per individual (the paper's T).
    #[schemars(range(min = 1))]
    pub steps: u64,
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Learning rate of the initial individuals (§3.3); children mutate their own.
    pub initial_learning_rate: f64,
    /// Let CUDA matrix products use TF32 (Hopper and Ampere tensor cores): faster, with a
    /// 10-bit mantissa in the products. Off by default; each individual records whether it
    /// trained with it.
    pub tf32: bool,
    /// The most trainable parameters a child may have. A larger one is not trained: it goes
    /// into the population as a failed individual (fitness 0) and loses its next tournament.
    /// Unset: only the memory the device has free limits a child (checked on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parameters: Option<u64>,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            steps: 25_600,
            batch_size: 50,
            momentum: 0.9,
            weight_decay: 1e-4,
            initial_learning_rate: 0.1,
            tf32: false,
            max_parameters: None,
        }
    }
}

/// The data set an experiment evolves classifiers for; the trainer knows each one's official
/// files.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    #[default]
    Cifar10,
    Cifar100,
}

impl Dataset {
    pub fn as_str(self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar10",
            Dataset::Cifar100 => "cifar100",
        }
    }

    pub fn classes(self) -> usize {
        match self {
            Dataset::Cifar10 => 10,
            Dataset::Cifar100 => 100,
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A data set name that is not one of [`Dataset`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown data set {name:?}; expected cifar10 or cifar100")]
pub struct UnknownDataset {
    pub name: String,
}

impl FromStr for Dataset {
    type Err = UnknownDataset;

    /// Also takes `CIFAR-10` and `cifar-100`, as people write them.
    fn from_str(s: &str) -> Result<Self, UnknownDataset> {
        match s.to_ascii_lowercase().replace('-', "").as_str() {
            "cifar10" => Ok(Self::Cifar10),
            "cifar100" => Ok(Self::Cifar100),
            _ => Err(UnknownDataset {
                name: s.to_string(),
            }),
        }
    }
}

/// The images: which data set, and where its official binary files come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataSpec {
    #[serde(default)]
    pub dataset: Dataset,
    /// A local folder, an `s3://bucket/prefix` holding the binary files, or an `http(s)://` URL
    /// of the official `.tar.gz` archive. Default: the official archive of the data set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// SHA-256 of the archive behind an `http(s)` source; default: the official archive's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Training images held out for validation (the paper: 5,000 of 50,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub validation_images: Option<u32>,
    /// Seed of the train/validation split, apart from `spec.seed` so that repeats and
    /// controls with other seeds are validated on the same images and compare like with
    /// like. Part of the experiment's identity.
    #[serde(default)]
    pub split_seed: u64,
}

/// Where the population lives: the only state workers share (§3.1).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.url.startsWith('s3://') || self.url.startsWith('file:///')", "message": "store.url must be s3://bucket/prefix or file:///path"},
]))]
pub struct StoreSpec {
    /// `s3://bucket/prefix` or `file:///path`; the experiment's objects live under it.
    pub url: String,
    /// S3 endpoint for S3-compatible servers (MinIO, Ceph...); default: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[serde(default)]
    pub path_style: bool,
    /// A Secret in the experiment's namespace with `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`; without one, workers use their ambient credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// What deleting the experiment does to its stored population.
    #[serde(default)]
    pub retention: Retention,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Retention {
    #[default]
    Retain,
    Delete,
}

/// When the experiment ends; the first condition met ends it. None set: it runs until stopped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.targetValidationAccuracy) || (self.targetValidationAccuracy > 0.0 && self.targetValidationAccuracy <= 1.0)", "message": "targetValidationAccuracy must be in (0, 1]"},
]))]
pub struct StopSpec {
    /// Individuals trained, the initial population included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub individuals_trained: Option<u64>,
    /// Wall time since the experiment started, e.g. `10m`, `3d 12h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<String>,
    /// Best validation accuracy (0 to 1) that ends the experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_validation_accuracy: Option<f64>,
}

/// The paper's controls (§4).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlsSpec {
    #[serde(default)]
    pub selection: Selection,
    /// Children start from their parent's weights where shapes match (§3.6).
    #[serde(default = "yes")]
    pub weight_inheritance: bool,
    /// Individuals each selection samples (S): the best of them reproduces. Under
    /// `tournament` the worst of them dies; under `aging` the oldest of the population does.
    /// The paper's pairwise tournament is 2.
    #[serde(default = "two")]
    #[schemars(range(min = 2))]
    pub sample_size: u32,
}

fn two() -> u32 {
    2
}

fn yes() -> bool {
    true
}

impl Default for ControlsSpec {
    fn default() -> Self {
        Self {
            selection: Selection::Tournament,
            weight_inheritance: true,
            sample_size: 2,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Kill the worse of two random individuals, reproduce the better.
    #[default]
    Tournament,
    /// Kill and reproduce random individuals: the paper's random-search control.
    None,
    /// Aging ("regularized") evolution (Real et al., 2019): the best of a sample reproduces
    /// and the oldest individual of the population dies, so no individual lives for ever on
    /// a lucky evaluation.
    Aging,
}

/// How worker pods run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerSpec {
    /// Trainer image; default: the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `auto` (CUDA when present), `cpu` or `cuda:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Worker loops per pod, sharing the pod's device: the paper's early individuals are tiny
    /// and one of them cannot keep a GPU busy. The Job runs workers / workersPerPod pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub workers_per_pod: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}
