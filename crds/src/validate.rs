//! The one validation of a spec, used by every entry point (local run, worker, operator), so
//! that a bad manifest fails the same way everywhere, naming the field and why.

use std::time::Duration;

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

/// Parses a duration such as `90s`, `10m` or `2d 3h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{e} (examples: 90s, 10m, 2d 3h)"))
}

/// Which kind of store a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    S3 { bucket: String, prefix: String },
    File { path: String },
}

/// Parses `s3://bucket/prefix` or `file:///absolute/path`, checking every part that will end
/// up in an object key or a path.
pub fn parse_store_url(url: &str) -> Result<StoreLocation, String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        check_bucket(bucket)?;
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            for segment in prefix.split('/') {
                check_segment(segment)?;
            }
        }
        Ok(StoreLocation::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!(
                "a file URL needs an absolute path (file:///data/evolution), got {url:?}"
            ));
        }
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            check_segment(segment)?;
        }
        Ok(StoreLocation::File {
            path: path.trim_end_matches('/').to_string(),
        })
    } else {
        Err(format!("must start with s3:// or file://, got {url:?}"))
    }
}

/// S3 bucket naming rules: 3-63 characters of lower-case letters, digits, dots and hyphens,
/// starting and ending with a letter or digit.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ok_ends = bucket
        .chars()
        .next()
        .zip(bucket.chars().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && ok_chars && ok_ends && !bucket.contains("..") {
        Ok(())
    } else {
        Err(format!(
            "bucket name {bucket:?} is not valid (3-63 lower-case letters, digits, '.', '-')"
        ))
    }
}

/// One segment of a key prefix or path: letters, digits, `-`, `_`, `.`; never `.` or `..`.
fn check_segment(segment: &str) -> Result<(), String> {
    let ok = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment.len() <= 128
        && segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "path segment {segment:?} is not allowed (letters, digits, '-', '_', '.'; not '.' or '..')"
        ))
    }
}

/// Checks every field; the first problem found is reported.
pub fn validate(spec: &EvolutionExperimentSpec) -> Result<(), SpecError> {
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
            if let Err(reason) = parse_store_url(&format!("s3://{rest}")) {
                return bad("spec.data.source", reason);
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
        Err(reason) => return bad("spec.store.url", reason),
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
            Err(reason) => return bad("spec.stop.wallTime", reason),
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
