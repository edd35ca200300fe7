//! Stores that misbehave on purpose, wrapped around a real one: one that dies after its n-th
//! request (a worker crashing at any point of a reproduction), and one that fails or stalls
//! every request for a while (an outage).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use population::store::{ObjectStore, StoreError};

/// Serves its first `survive` requests, then refuses every request as if its process had
/// died: the caller's loop ends at that point, with whatever it had written so far.
#[derive(Debug)]
pub struct Dying {
    inner: Arc<dyn ObjectStore>,
    survive: u64,
    served: AtomicU64,
    dead: AtomicBool,
}

impl Dying {
    pub fn new(inner: Arc<dyn ObjectStore>, survive: u64) -> Self {
        Self {
            inner,
            survive,
            served: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// Whether it died (a caller made more requests than it survives).
    pub fn died(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn admit(&self, key: &str) -> Result<(), StoreError> {
        if self.served.fetch_add(1, Ordering::SeqCst) >= self.survive {
            self.dead.store(true, Ordering::SeqCst);
            return Err(StoreError::Conflict {
                store: self.inner.url().to_string(),
                message: format!("the worker died before requesting {key}"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Dying {
    fn url(&self) -> &str {
        self.inner.url()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.admit(key)?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.admit(key)?;
        self.inner.put(key, body).await
    }
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        self.admit(key)?;
        self.inner.put_new(key, body).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.admit(key)?;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.admit(prefix)?;
        self.inner.list(prefix).await
    }
}

/// How a [`Flaky`] store misbehaves during its outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Every request fails at once, as when the server is down.
    Fail,
    /// Every request hangs (longer than any sane attempt timeout), as when the server
    /// accepts connections and never answers.
    Stall,
    /// Writes are made but their responses are lost: the caller sees an error for a request
    /// that took effect.
    LoseResponses,
}

/// A store that misbehaves from `from` for `length` after it is armed, then recovers.
#[derive(Debug)]
pub struct Flaky {
    inner: Arc<dyn ObjectStore>,
    kind: Outage,
    window: Mutex<Option<(Instant, Instant)>>,
    pub failed: AtomicU64,
}

impl Flaky {
    pub fn new(inner: Arc<dyn ObjectStore>, kind: Outage) -> Self {
        Self {
            inner,
            kind,
            window: Mutex::new(None),
            failed: AtomicU64::new(0),
        }
    }

    /// Misbehaves from now on for `length`.
    pub fn arm(&self, length: Duration) {
        let now = Instant::now();
        *self.window.lock().expect("window") = Some((now, now + length));
    }

    fn out(&self) -> bool {
        let now = Instant::now();
        matches!(*self.window.lock().expect("window"), Some((a, b)) if a <= now && now < b)
    }

    fn error(&self, key: &str) -> StoreError {
        self.failed.fetch_add(1, Ordering::Relaxed);
        StoreError::Backend {
            store: self.inner.url().to_string(),
            operation: "injected",
            key: key.to_string(),
            message: "connection refused (injected outage)".into(),
        }
    }

    /// What happens to a request during the outage, before (`true`: go on) or instead of it.
    async fn before(&self, key: &str, write: bool) -> Result<bool, StoreError> {
        if !self.out() {
            return Ok(true);
        }
        match self.kind {
            Outage::Fail => Err(self.error(key)),
            Outage::Stall => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(self.error(key))
            }
            Outage::LoseResponses if write => Ok(false),
            Outage::LoseResponses => Err(self.error(key)),
        }
    }
}

#[async_trait]
impl ObjectStore for Flaky {
    fn url(&self) -> &str {
        self.inner.url()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.before(key, false).await?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let answered = self.before(key, true).await?;
        self.inner.put(key, body).await?;
        if answered {
            Ok(())
        } else {
            Err(self.error(key))
        }
    }
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        let answered = self.before(key, true).await?;
        let won = self.inner.put_new(key, body).await?;
        if answered {
            Ok(won)
        } else {
            Err(self.error(key))
        }
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let answered = self.before(key, true).await?;
        self.inner.delete(key).await?;
        if answered {
            Ok(())
        } else {
            Err(self.error(key))
        }
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.before(prefix, false).await?;
        self.inner.list(prefix).await
    }
}
