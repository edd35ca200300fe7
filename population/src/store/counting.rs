//! A store wrapper that counts requests by kind, for the coordination benchmark and for tests
//! that pin down what a reproduction costs.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectStore, StoreError};

#[derive(Debug, Default)]
pub struct CountingStore<S> {
    inner: S,
    gets: AtomicU64,
    puts: AtomicU64,
    put_news: AtomicU64,
    deletes: AtomicU64,
    lists: AtomicU64,
    weights: AtomicU64,
}

/// Requests by kind; `weights` counts, separately, those on weight files (any kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub gets: u64,
    pub puts: u64,
    pub put_news: u64,
    pub deletes: u64,
    pub lists: u64,
    pub weights: u64,
}

impl RequestCounts {
    /// Every request, weights included.
    pub fn total(&self) -> u64 {
        self.gets + self.puts + self.put_news + self.deletes + self.lists
    }

    pub fn minus(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            gets: self.gets - earlier.gets,
            puts: self.puts - earlier.puts,
            put_news: self.put_news - earlier.put_news,
            deletes: self.deletes - earlier.deletes,
            lists: self.lists - earlier.lists,
            weights: self.weights - earlier.weights,
        }
    }
}

fn is_weights(key: &str) -> bool {
    key.ends_with(".safetensors")
}

impl<S> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            gets: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            put_news: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            weights: AtomicU64::new(0),
        }
    }

    fn count(&self, counter: &AtomicU64, key: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        if is_weights(key) {
            self.weights.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            gets: self.gets.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            put_news: self.put_news.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            weights: self.weights.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for CountingStore<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.count(&self.gets, key);
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.count(&self.puts, key);
        self.inner.put(key, body).await
    }
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        self.count(&self.put_news, key);
        self.inner.put_new(key, body).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.count(&self.deletes, key);
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.count(&self.lists, prefix);
        self.inner.list(prefix).await
    }
}
