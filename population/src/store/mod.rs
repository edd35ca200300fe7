//! The population store: the only state workers share (§3.1). Backends provide a handful of
//! object operations with the one atomic primitive the algorithm needs, a create-only write;
//! [`Population`] builds the experiment's layout and semantics on top of them once, so both
//! backends behave the same by construction and pass the same conformance suite.

mod counting;
mod file;
mod interventions;
pub mod layout;
mod population;
mod resilient;
mod s3;
mod vacancies;

pub use counting::{CountingStore, RequestCounts};
pub use file::FileStore;
pub use interventions::{Change, Intervention, Interventions};
pub use layout::{check_worker_name, AliveEntry, InvalidWorkerName, Lease, ProgressEntry, Vacancy};
pub use population::{
    Claim, ExperimentRecord, Population, StopMarker, StoreOwner, Summary, TestResult,
};
pub use resilient::{Resilient, RetryPolicy};
pub use s3::{S3Settings, S3Store};
pub use vacancies::{adoptable, Audit, Sweep, VacancyState, CLOCK_SKEW};

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A request that did not answer within its attempt timeout.
    #[error("{store}: {operation} {key}: no answer within {seconds} s")]
    Timeout {
        store: String,
        operation: &'static str,
        key: String,
        seconds: u64,
    },
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// Its reason is not a `source`: the message already says it, and error chains would
    /// print it twice.
    #[error("store URL {url:?}: {reason}")]
    Url {
        url: String,
        reason: crds::StoreUrlError,
    },
    #[error("{store}: {operation} {key}: {message}")]
    Backend {
        store: String,
        operation: &'static str,
        key: String,
        message: String,
    },
    #[error("{store}: cannot authenticate: {message}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or spec.store.credentialsSecret on a cluster)")]
    Credentials { store: String, message: String },
    #[error("{store}: {key} is corrupt: {reason}")]
    Corrupt {
        store: String,
        key: String,
        reason: String,
    },
    #[error("{store}: {message}")]
    Conflict { store: String, message: String },
}

/// The object operations a backend provides. Keys are relative to the experiment's root and
/// checked by [`check_key`]; a backend never sees a key that could leave its root.
#[async_trait]
pub trait ObjectStore: Send + Sync + Debug {
    /// The store's URL, for messages.
    fn url(&self) -> &str;
    /// The object, or `None` if there is none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError>;
    /// Writes the object whole, replacing any previous one; readers never see part of it.
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError>;
    /// Writes the object only if none exists: `true` if this call created it. Among concurrent
    /// callers exactly one gets `true`. A write whose response was lost and that is retried
    /// finds the key taken; backends then read the object and answer `true` if it holds
    /// exactly `body`, so callers make every body unique (a nonce) and a lost response never
    /// reads as a lost race.
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError>;
    /// Removes the object; removing a missing one is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every key under `prefix` (which ends with `/`), at any depth.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
}

/// A shared store is a store, so that wrappers such as [`Resilient`] can hold either.
#[async_trait]
impl ObjectStore for Arc<dyn ObjectStore> {
    fn url(&self) -> &str {
        (**self).url()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        (**self).get(key).await
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        (**self).put(key, body).await
    }
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        (**self).put_new(key, body).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        (**self).delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        (**self).list(prefix).await
    }
}

/// Opens the store a spec names, with S3 credentials from the usual chain (environment,
/// profile, web identity, instance metadata).
pub async fn open(store: &crds::StoreSpec) -> Result<Arc<dyn ObjectStore>, StoreError> {
    open_with_credentials(store, None).await
}

/// Opens the store a spec names with explicit S3 credentials (access key, secret), as the
/// operator does with the experiment's Secret.
pub async fn open_with_credentials(
    store: &crds::StoreSpec,
    credentials: Option<(String, String)>,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    match crds::parse_store_url(&store.url).map_err(|reason| StoreError::Url {
        url: store.url.clone(),
        reason,
    })? {
        crds::StoreLocation::File { path } => Ok(Arc::new(FileStore::open(path.as_ref()).await?)),
        crds::StoreLocation::S3 { bucket, prefix } => Ok(Arc::new(
            S3Store::connect(S3Settings {
                credentials,
                ..S3Settings::at(bucket, prefix, store)
            })
            .await?,
        )),
    }
}

impl StoreError {
    /// Whether trying again later can succeed: an outage, a timeout, a server error. Bad keys,
    /// corrupt objects, conflicts and credentials need a person.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Backend { .. } | StoreError::Timeout { .. }
        )
    }
}

/// Keys are `/`-separated segments of letters, digits and `-_.@`; no segment is empty, `.`
/// or `..`. Everything that becomes part of a key (ids, worker names) is checked before it
/// gets there; this is the last line.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let reason = if key.is_empty() || key.len() > 512 {
        Some("must be 1 to 512 characters")
    } else if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        Some("has an empty, '.' or '..' segment")
    } else if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '@'))
    {
        Some("has characters other than letters, digits and -_.@/")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// A listing prefix: like a key, but ending with `/`.
pub fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    match prefix.strip_suffix('/') {
        Some(inner) => check_key(inner),
        None => Err(StoreError::InvalidKey {
            key: prefix.to_string(),
            reason: "a listing prefix ends with '/'".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for ok in [
            "alive/abc@0.5123",
            "individuals/x-1/weights.safetensors",
            "experiment.json",
        ] {
            check_key(ok).unwrap();
        }
        for bad in [
            "", "../x", "a/../b", "/abs", "a//b", "a/./b", "a b", "a\\b", "a/%2e%2e",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        check_prefix("alive/").unwrap();
        assert!(check_prefix("alive").is_err());
    }
}
