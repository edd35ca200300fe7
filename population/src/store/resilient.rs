//! A store that rides out outages: every request has an attempt timeout, and a request that
//! fails for a reason that can pass (an outage, a timeout, a server error) is tried again with
//! capped exponential backoff and full jitter, for ever or until the policy's operation
//! timeout. Workers wrap their store in one so that a store outage of any length pauses them
//! instead of crashing every pod at once; what still reaches them needs a person (bad
//! credentials, a corrupt object).
//!
//! Retrying a create-only write is safe because backends recognise their own earlier write
//! by its unique body (see [`ObjectStore::put_new`]).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{ObjectStore, StoreError};

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// How long one request may take before it counts as failed.
    pub attempt_timeout: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one operation may keep trying; `None`: for ever.
    pub give_up_after: Option<Duration>,
    /// How long an outage lasts before it is logged as a warning (and then once a minute).
    pub warn_after: Duration,
}

impl RetryPolicy {
    /// A worker's: it has nothing better to do than wait for its store.
    pub fn forever() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(120),
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            give_up_after: None,
            warn_after: Duration::from_secs(5),
        }
    }

    /// A command's or a controller's: try for `limit`, then report.
    pub fn bounded(limit: Duration) -> Self {
        Self {
            give_up_after: Some(limit),
            ..Self::forever()
        }
    }
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    warned: Option<Instant>,
}

#[derive(Debug)]
pub struct Resilient<S> {
    inner: S,
    policy: RetryPolicy,
    outage: Mutex<Option<Outage>>,
}

impl<S: ObjectStore> Resilient<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self {
            inner,
            policy,
            outage: Mutex::new(None),
        }
    }

    async fn retry<T, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = Instant::now();
        let mut backoff = self.policy.first_backoff;
        loop {
            let result = match tokio::time::timeout(self.policy.attempt_timeout, f()).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout {
                    store: self.inner.url().to_string(),
                    operation,
                    key: key.to_string(),
                    seconds: self.policy.attempt_timeout.as_secs(),
                }),
            };
            let error = match result {
                Ok(value) => {
                    self.recovered();
                    return Ok(value);
                }
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            if self
                .policy
                .give_up_after
                .is_some_and(|limit| started.elapsed() + backoff > limit)
            {
                return Err(error);
            }
            self.failed(&error);
            let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            tokio::time::sleep(jittered).await;
            backoff = (backoff * 2).min(self.policy.max_backoff);
        }
    }

    fn failed(&self, error: &StoreError) {
        let Ok(mut outage) = self.outage.lock() else {
            return;
        };
        let now = Instant::now();
        let outage = outage.get_or_insert(Outage {
            since: now,
            warned: None,
        });
        let due = match outage.warned {
            None => now.duration_since(outage.since) >= self.policy.warn_after,
            Some(at) => now.duration_since(at) >= Duration::from_secs(60),
        };
        if due {
            outage.warned = Some(now);
            tracing::warn!(
                store = %self.inner.url(),
                seconds = now.duration_since(outage.since).as_secs(),
                error = %error,
                "the store is unreachable; retrying until it answers"
            );
        } else {
            tracing::debug!(store = %self.inner.url(), error = %error, "store request failed; retrying");
        }
    }

    fn recovered(&self) {
        let Ok(mut outage) = self.outage.lock() else {
            return;
        };
        if let Some(past) = outage.take() {
            if past.warned.is_some() {
                tracing::info!(
                    store = %self.inner.url(),
                    seconds = past.since.elapsed().as_secs(),
                    "the store answers again"
                );
            }
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Resilient<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.retry("get", key, || self.inner.get(key)).await
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.retry("put", key, || self.inner.put(key, body.clone()))
            .await
    }

    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        self.retry("put-if-absent", key, || {
            self.inner.put_new(key, body.clone())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.retry("delete", key, || self.inner.delete(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.retry("list", prefix, || self.inner.list(prefix)).await
    }
}
