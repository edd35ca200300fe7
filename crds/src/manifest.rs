//! Reading a manifest, as `kubectl apply` would take it: a file for the local runner, the
//! JSON the operator hands its pods for the worker and the evaluation.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

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
    parse_value(path, value)
}

fn parse_value(path: &str, value: serde_json::Value) -> Result<Experiment, ManifestError> {
    let parse_error = |reason: String| ManifestError::Parse {
        path: path.to_string(),
        reason,
    };
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

/// Parses the experiment the operator hands its pods. The operator may be newer than this
/// trainer and know fields it does not: they are dropped, as the API server drops fields its
/// schema lacks, and returned so that the caller can warn. Everything this version knows is
/// validated as from a file.
pub fn parse_from_operator(
    path: &str,
    text: &str,
) -> Result<(Experiment, Vec<String>), ManifestError> {
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
    let crd = <EvolutionExperiment as kube::CustomResourceExt>::crd();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"));
    let mut dropped = Vec::new();
    if let (Some(schema), Some(spec)) = (schema, value.get_mut("spec")) {
        prune(spec, schema, "spec", &mut dropped);
    }
    let experiment = parse_value(path, value)?;
    Ok((experiment, dropped))
}

/// Removes from `value` what `schema` does not describe, recording each path removed.
fn prune(
    value: &mut serde_json::Value,
    schema: &JSONSchemaProps,
    at: &str,
    dropped: &mut Vec<String>,
) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(properties) = &schema.properties {
                map.retain(|key, child| match properties.get(key) {
                    Some(s) => {
                        prune(child, s, &format!("{at}.{key}"), dropped);
                        true
                    }
                    None => {
                        dropped.push(format!("{at}.{key}"));
                        false
                    }
                });
            } else if let Some(JSONSchemaPropsOrBool::Schema(s)) = &schema.additional_properties {
                for (key, child) in map.iter_mut() {
                    prune(child, s, &format!("{at}.{key}"), dropped);
                }
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(s)) = &schema.items {
                for (i, child) in items.iter_mut().enumerate() {
                    prune(child, s, &format!("{at}[{i}]"), dropped);
                }
            }
        }
        _ => {}
    }
}

pub fn load(path: &Path) -> Result<Experiment, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator_json(spec: serde_json::Value) -> String {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": { "name": "skew" },
            "spec": spec,
        })
        .to_string()
    }

    #[test]
    fn fields_from_a_newer_operator_are_dropped_and_named() {
        let text = operator_json(serde_json::json!({
            "population": 8,
            "store": { "url": "s3://bucket/p", "futureOption": true },
            "training": { "steps": 3, "futureKnob": 1 },
            "futureField": "x",
        }));
        // A file with an unknown field is a typo, refused.
        assert!(parse("f", &text).is_err());
        // From the operator it is version skew: dropped, named, the rest runs.
        let (experiment, mut dropped) = parse_from_operator("env", &text).unwrap();
        dropped.sort();
        assert_eq!(
            dropped,
            [
                "spec.futureField",
                "spec.store.futureOption",
                "spec.training.futureKnob"
            ]
        );
        assert_eq!(experiment.spec.population, 8);
        assert_eq!(experiment.spec.training.steps, 3);
    }

    #[test]
    fn maps_and_lists_keep_their_entries() {
        let text = operator_json(serde_json::json!({
            "store": { "url": "s3://bucket/p" },
            "worker": {
                "nodeSelector": { "gpu": "h100" },
                "tolerations": [{ "key": "gpu", "operator": "Exists", "future": 1 }],
            },
        }));
        let (experiment, dropped) = parse_from_operator("env", &text).unwrap();
        assert_eq!(dropped, ["spec.worker.tolerations[0].future"]);
        assert_eq!(
            experiment.spec.worker.node_selector.as_ref().unwrap()["gpu"],
            "h100"
        );
    }
}
