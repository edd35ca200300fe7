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
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub gets: u64,
    pub puts: u64,
    pub put_news: u64,
    pub deletes: u64,
    pub lists: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.gets + self.puts + self.put_news + self.deletes + self.lists
    }
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
        }
    }

    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            gets: self.gets.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            put_news: self.put_news.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for CountingStore<S> {
    fn url(&self) -> &str {
        self.inner.url()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put(key, body).await
    }
    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        self.put_news.fetch_add(1, Ordering::Relaxed);
        self.inner.put_new(key, body).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.deletes.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix).await
    }
}
