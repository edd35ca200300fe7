//! The one validation of a spec, used by every entry point (local run, worker, operator), so
//! that a bad manifest fails the same way everywhere, naming the field and why.

use std::ops::Deref;

use serde::Serialize;

use crate::parse::{parse_duration, parse_store_url, StoreLocation};
use crate::spec::EvolutionExperimentSpec;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The field's path, e.g. `spec.stop.wallTime`.
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> Result<(), SpecError> {
    Err(SpecError {
        field: field.to_string(),
        reason: reason.into(),
    })
}

/// A spec that [`validate`] accepted: what the entry points (local run, worker, evaluation,
/// operator) take, so that nothing runs on a spec nobody checked. Change one by taking it
/// apart ([`ValidatedSpec::into_inner`]) and validating the result again.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ValidatedSpec(EvolutionExperimentSpec);

impl ValidatedSpec {
    pub fn into_inner(self) -> EvolutionExperimentSpec {
        self.0
    }
}

impl Deref for ValidatedSpec {
    type Target = EvolutionExperimentSpec;

    fn deref(&self) -> &EvolutionExperimentSpec {
        &self.0
    }
}

impl TryFrom<EvolutionExperimentSpec> for ValidatedSpec {
    type Error = SpecError;

    fn try_from(spec: EvolutionExperimentSpec) -> Result<Self, SpecError> {
        check(&spec)?;
        Ok(Self(spec))
    }
}

/// Checks every field; the first problem found is reported.
pub fn validate(spec: &EvolutionExperimentSpec) -> Result<ValidatedSpec, SpecError> {
    check(spec)?;
    Ok(ValidatedSpec(spec.clone()))
}

fn check(spec: &EvolutionExperimentSpec) -> Result<(), SpecError> {
    if spec.population < 2 {
        return bad(
            "spec.population",
            format!(
                "a tournament needs at least 2 individuals, got {}",
                spec.population
            ),
        );
    }
    if let Some(workers) = spec.workers {
        if workers == 0 {
            return bad("spec.workers", "must be at least 1");
        }
        if workers > spec.population {
            return bad(
                "spec.workers",
                format!(
                    "must be at most spec.population ({}), got {workers}",
                    spec.population
                ),
            );
        }
    }
    if spec.mutation_rate == 0 {
        return bad("spec.mutationRate", "must be at least 1");
    }
    let t = &spec.training;
    if t.steps == 0 {
        return bad("spec.training.steps", "must be at least 1");
    }
    if t.batch_size == 0 {
        return bad("spec.training.batchSize", "must be at least 1");
    }
    if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
        return bad(
            "spec.training.momentum",
            format!("must be in [0, 1), got {}", t.momentum),
        );
    }
    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        return bad(
            "spec.training.weightDecay",
            format!("must be a non-negative number, got {}", t.weight_decay),
        );
    }
    if !(t.initial_learning_rate.is_finite() && t.initial_learning_rate > 0.0) {
        return bad(
            "spec.training.initialLearningRate",
            format!("must be positive, got {}", t.initial_learning_rate),
        );
    }
    if let Some(v) = spec.data.validation_images {
        if v == 0 || v >= 50_000 {
            return bad(
                "spec.data.validationImages",
                format!("must be between 1 and 49,999, got {v}"),
            );
        }
    }
    if let Some(source) = &spec.data.source {
        let ok = source.starts_with("https://")
            || source.starts_with("http://")
            || source.starts_with("s3://")
            || source.starts_with('/')
            || source.starts_with("file://");
        if !ok {
            return bad(
                "spec.data.source",
                format!(
                    "must be an absolute folder, file://, s3:// or http(s):// URL, got {source:?}"
                ),
            );
        }
        if let Some(rest) = source.strip_prefix("s3://") {
            if let Err(e) = parse_store_url(&format!("s3://{rest}")) {
                return bad("spec.data.source", e.to_string());
            }
        }
    }
    if let Some(sha) = &spec.data.sha256 {
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return bad("spec.data.sha256", "must be 64 hexadecimal digits");
        }
    }
    let location = match parse_store_url(&spec.store.url) {
        Ok(l) => l,
        Err(e) => return bad("spec.store.url", e.to_string()),
    };
    if let Some(endpoint) = &spec.store.endpoint {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return bad(
                "spec.store.endpoint",
                format!("must be an http:// or https:// URL, got {endpoint:?}"),
            );
        }
        if matches!(location, StoreLocation::File { .. }) {
            return bad("spec.store.endpoint", "only applies to s3:// stores");
        }
    }
    if let Some(secret) = &spec.store.credentials_secret {
        let ok = !secret.is_empty()
            && secret.len() <= 253
            && secret
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !ok {
            return bad(
                "spec.store.credentialsSecret",
                format!("{secret:?} is not a valid Secret name"),
            );
        }
    }
    if let Some(n) = spec.stop.individuals_trained {
        if n == 0 {
            return bad("spec.stop.individualsTrained", "must be at least 1");
        }
    }
    if let Some(wall) = &spec.stop.wall_time {
        match parse_duration(wall) {
            Ok(d) if d.is_zero() => return bad("spec.stop.wallTime", "must be positive"),
            Ok(_) => {}
            Err(e) => return bad("spec.stop.wallTime", e.to_string()),
        }
    }
    if let Some(acc) = spec.stop.target_validation_accuracy {
        if !(acc.is_finite() && acc > 0.0 && acc <= 1.0) {
            return bad(
                "spec.stop.targetValidationAccuracy",
                format!("must be in (0, 1], got {acc}"),
            );
        }
    }
    let when = |field: String, when: &crate::spec::When| -> Result<(), SpecError> {
        match (&when.after, when.trained) {
            (Some(_), Some(_)) | (None, None) => bad(
                &field,
                "give exactly one of after (a wall time) and trained (a count)",
            ),
            (Some(after), None) => parse_duration(after)
                .map(|_| ())
                .or_else(|e| bad(&format!("{field}.after"), e.to_string())),
            (None, Some(_)) => Ok(()),
        }
    };
    for (i, entry) in spec.mutation_schedule.iter().enumerate() {
        when(format!("spec.mutationSchedule[{i}]"), &entry.when())?;
        if entry.rate == 0 {
            return bad(
                &format!("spec.mutationSchedule[{i}].rate"),
                "must be at least 1",
            );
        }
    }
    for (i, entry) in spec.weight_resets.iter().enumerate() {
        when(format!("spec.weightResets[{i}]"), entry)?;
    }
    let sample = spec.controls.sample_size;
    if sample < 2 || sample > spec.population {
        return bad(
            "spec.controls.sampleSize",
            format!(
                "must be between 2 and spec.population ({}), got {sample}",
                spec.population
            ),
        );
    }
    if spec.worker.workers_per_pod == Some(0) {
        return bad("spec.worker.workersPerPod", "must be at least 1");
    }
    if let Some(device) = &spec.worker.device {
        let ok = device == "auto"
            || device == "cpu"
            || device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<u32>().is_ok())
            || device == "cuda";
        if !ok {
            return bad(
                "spec.worker.device",
                format!("must be auto, cpu, cuda or cuda:N, got {device:?}"),
            );
        }
    }
    Ok(())
}
