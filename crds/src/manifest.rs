//! Reading a manifest, as `kubectl apply` would take it: a file for the local runner, the
//! JSON the operator hands its pods for the worker and the evaluation.

use std::path::Path;

use crate::spec::EvolutionExperiment;
use crate::validate::{validate, SpecError, ValidatedSpec};

pub const API_VERSION: &str = "cambrian.dev/v1alpha1";
pub const KIND: &str = "EvolutionExperiment";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("manifest {path} is not a valid EvolutionExperiment: {reason}")]
    Parse { path: String, reason: String },
    #[error("manifest {path}: {source}")]
    Invalid { path: String, source: SpecError },
}

/// What an entry point runs: an experiment's name and its validated spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub spec: ValidatedSpec,
}

impl Experiment {
    /// The experiment of a resource whose spec validates; unnamed resources are called
    /// `experiment`.
    pub fn of(resource: &EvolutionExperiment) -> Result<Self, SpecError> {
        Ok(Self {
            name: resource
                .metadata
                .name
                .clone()
                .unwrap_or_else(|| "experiment".into()),
            spec: validate(&resource.spec)?,
        })
    }
}

/// Parses and validates a manifest (YAML, or JSON as the operator writes it); `path` names
/// where it came from in errors.
pub fn parse(path: &str, text: &str) -> Result<Experiment, ManifestError> {
    let parse_error = |reason: String| ManifestError::Parse {
        path: path.to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_norway::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    if api_version != Some(API_VERSION) || kind != Some(KIND) {
        return Err(parse_error(format!(
            "expected apiVersion {API_VERSION} and kind {KIND}, got {} and {}",
            api_version.unwrap_or("none"),
            kind.unwrap_or("none")
        )));
    }
    let resource: EvolutionExperiment =
        serde_json::from_value(value).map_err(|e| parse_error(e.to_string()))?;
    Experiment::of(&resource).map_err(|source| ManifestError::Invalid {
        path: path.to_string(),
        source,
    })
}

pub fn load(path: &Path) -> Result<Experiment, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}
