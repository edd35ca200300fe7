//! The spec's values written as text: durations (`10m`, `3d 12h`) and store URLs
//! (`s3://bucket/prefix`, `file:///path`). Every part of a URL that ends up in an object key
//! or a path is checked here, once.

use std::time::Duration;

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (examples: 90s, 10m, 2d 3h)")]
pub struct DurationError {
    pub message: String,
}

/// Parses a duration such as `90s`, `10m` or `2d 3h`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(text.trim()).map_err(|e| DurationError {
        message: e.to_string(),
    })
}

/// Which kind of store a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    S3 { bucket: String, prefix: String },
    File { path: String },
}

/// A store URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("must start with s3:// or file://, got {url:?}")]
    Scheme { url: String },
    #[error("a file URL needs an absolute path (file:///data/evolution), got {url:?}")]
    RelativePath { url: String },
    #[error("bucket name {bucket:?} is not valid (3-63 lower-case letters, digits, '.', '-')")]
    Bucket { bucket: String },
    #[error(
        "path segment {segment:?} is not allowed (letters, digits, '-', '_', '.'; not '.' or '..')"
    )]
    Segment { segment: String },
}

/// Parses `s3://bucket/prefix` or `file:///absolute/path`, checking every part that will end
/// up in an object key or a path.
pub fn parse_store_url(url: &str) -> Result<StoreLocation, StoreUrlError> {
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
            return Err(StoreUrlError::RelativePath {
                url: url.to_string(),
            });
        }
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            check_segment(segment)?;
        }
        Ok(StoreLocation::File {
            path: path.trim_end_matches('/').to_string(),
        })
    } else {
        Err(StoreUrlError::Scheme {
            url: url.to_string(),
        })
    }
}

/// S3 bucket naming rules: 3-63 characters of lower-case letters, digits, dots and hyphens,
/// starting and ending with a letter or digit.
fn check_bucket(bucket: &str) -> Result<(), StoreUrlError> {
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
        Err(StoreUrlError::Bucket {
            bucket: bucket.to_string(),
        })
    }
}

/// One segment of a key prefix or path: letters, digits, `-`, `_`, `.`; never `.` or `..`.
fn check_segment(segment: &str) -> Result<(), StoreUrlError> {
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
        Err(StoreUrlError::Segment {
            segment: segment.to_string(),
        })
    }
}
