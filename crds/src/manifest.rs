//! Reading a manifest file, as `kubectl apply` would take it, for the local runner and the
//! worker.

use std::path::Path;

use crate::spec::EvolutionExperiment;
use crate::validate::{validate, SpecError};

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

/// Parses and validates a manifest.
pub fn parse(path: &str, text: &str) -> Result<EvolutionExperiment, ManifestError> {
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
    let experiment: EvolutionExperiment =
        serde_json::from_value(value).map_err(|e| parse_error(e.to_string()))?;
    validate(&experiment.spec).map_err(|source| ManifestError::Invalid {
        path: path.to_string(),
        source,
    })?;
    Ok(experiment)
}

pub fn load(path: &Path) -> Result<EvolutionExperiment, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}
