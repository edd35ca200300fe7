//! A store in a local folder or a shared volume, as in the paper (§3.1: "atomic renames on
//! the directory"). Every write goes to a temporary file first; `put` then renames it over the
//! key (readers see the old object or the new one, never part of one), and `put_new` hard-links
//! it to the key, which fails if the key exists: the create-only primitive, atomic on POSIX
//! file systems including NFS.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, check_prefix, ObjectStore, StoreError};

const TMP: &str = ".tmp";

#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    url: String,
    counter: AtomicU64,
}

impl FileStore {
    pub async fn open(root: &Path) -> Result<Self, StoreError> {
        let url = format!("file://{}", root.display());
        tokio::fs::create_dir_all(root.join(TMP))
            .await
            .map_err(|e| StoreError::Backend {
                store: url.clone(),
                operation: "create",
                key: String::new(),
                message: e.to_string(),
            })?;
        Ok(Self {
            root: root.to_path_buf(),
            url,
            counter: AtomicU64::new(0),
        })
    }

    fn error(&self, operation: &'static str, key: &str, e: std::io::Error) -> StoreError {
        StoreError::Backend {
            store: self.url.clone(),
            operation,
            key: key.to_string(),
            message: e.to_string(),
        }
    }

    /// Writes `body` to a fresh temporary file, synced, and returns its path.
    async fn stage(&self, key: &str, body: &[u8]) -> Result<PathBuf, StoreError> {
        let name = format!(
            "{}-{}-{:016x}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        );
        let tmp = self.root.join(TMP).join(name);
        let body = body.to_vec();
        let path = tmp.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&body)?;
            f.sync_all()
        })
        .await
        .map_err(|e| self.error("write", key, std::io::Error::other(e)))?
        .map_err(|e| self.error("write", key, e))?;
        Ok(tmp)
    }

    async fn links(path: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        tokio::fs::metadata(path).await.ok().map(|m| m.nlink())
    }

    async fn parent_dir(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| self.error("write", key, e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FileStore {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        match tokio::fs::read(self.root.join(key)).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => {
                Ok(None)
            }
            Err(e) => Err(self.error("read", key, e)),
        }
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        let path = self.root.join(key);
        self.parent_dir(key, &path).await?;
        let tmp = self.stage(key, &body).await?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| self.error("rename", key, e))
    }

    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        check_key(key)?;
        let path = self.root.join(key);
        self.parent_dir(key, &path).await?;
        let tmp = self.stage(key, &body).await?;
        let linked = tokio::fs::hard_link(&tmp, &path).await;
        let outcome = match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // On NFS a link whose reply was lost is retransmitted and fails with EEXIST
                // although it was made: the staged file then has two links. Failing that, an
                // earlier attempt of this same write (a retry) left exactly this body.
                let ours = Self::links(&tmp).await == Some(2)
                    || self
                        .get(key)
                        .await?
                        .is_some_and(|existing| existing == body);
                Ok(ours)
            }
            Err(e) => Err(self.error("link", key, e)),
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        outcome
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        match tokio::fs::remove_file(self.root.join(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        // One blocking walk: a thousand small asynchronous calls would cost more than the walk.
        let root = self.root.clone();
        let start = prefix.trim_end_matches('/').to_string();
        let walk = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let mut keys = Vec::new();
            let mut pending = vec![start];
            while let Some(dir) = pending.pop() {
                let entries = match std::fs::read_dir(root.join(&dir)) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let key = format!("{dir}/{}", entry.file_name().to_string_lossy());
                    if entry.file_type()?.is_dir() {
                        pending.push(key);
                    } else {
                        keys.push(key);
                    }
                }
            }
            keys.sort();
            Ok(keys)
        });
        walk.await
            .map_err(|e| self.error("list", prefix, std::io::Error::other(e)))?
            .map_err(|e| self.error("list", prefix, e))
    }
}
