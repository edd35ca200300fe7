//! `s3s-fs` served in process over real HTTP, made atomic by locks around every request that
//! is not a read (GET, HEAD, LIST), and able to answer chosen requests with chosen faults.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};

/// A fault to answer instead of serving a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 503 SlowDown, which AWS answers under load; the SDK retries it.
    SlowDown,
    /// 409 ConditionalRequestConflict, which AWS answers to a conditional write racing
    /// another; the store retries it.
    Conflict,
}

/// Faults for the next PUT requests, in order.
#[derive(Default)]
pub struct Faults {
    planned: Mutex<VecDeque<Fault>>,
    served: Mutex<Vec<Fault>>,
}

impl Faults {
    pub fn plan(&self, faults: &[Fault]) {
        self.planned.lock().unwrap().extend(faults);
    }

    pub fn served(&self) -> Vec<Fault> {
        self.served.lock().unwrap().clone()
    }

    fn next(&self) -> Option<Fault> {
        let fault = self.planned.lock().unwrap().pop_front();
        if let Some(f) = fault {
            self.served.lock().unwrap().push(f);
        }
        fault
    }
}

struct Locked {
    inner: s3s_fs::FileSystem,
    root: std::path::PathBuf,
    /// Writes to one key take that key's lock (one of 64 stripes), so a conditional write's
    /// check and write are one step; writes to different keys, which s3s-fs keeps in different
    /// files, go on in parallel. Bucket-wide writes take all stripes.
    stripes: Vec<tokio::sync::Mutex<()>>,
    faults: Arc<Faults>,
}

impl Locked {
    fn stripe(&self, bucket: &str, key: &str) -> &tokio::sync::Mutex<()> {
        let hash = bucket
            .bytes()
            .chain([b'/'])
            .chain(key.bytes())
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
            });
        &self.stripes[(hash % self.stripes.len() as u64) as usize]
    }

    async fn lock_all(&self) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(self.stripes.len());
        for stripe in &self.stripes {
            guards.push(stripe.lock().await);
        }
        guards
    }
}

#[async_trait::async_trait]
impl S3 for Locked {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let _guard = self.lock_all().await;
        self.inner.create_bucket(req).await
    }
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }
    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.inner.get_object(req).await
    }
    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.inner.head_object(req).await
    }
    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        match self.faults.next() {
            Some(Fault::SlowDown) => return Err(s3_error!(SlowDown, "injected")),
            Some(Fault::Conflict) => return Err(s3_error!(ConditionalRequestConflict, "injected")),
            None => {}
        }
        let _guard = self.stripe(&req.input.bucket, &req.input.key).lock().await;
        self.inner.put_object(req).await
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let _guard = self.stripe(&req.input.bucket, &req.input.key).lock().await;
        self.inner.delete_object(req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let _guard = self.lock_all().await;
        self.inner.delete_objects(req).await
    }
    /// A read, like GET, so it takes no lock: objects appear by rename, whole. Served here
    /// rather than by s3s-fs, whose listing walks the whole bucket with one asynchronous file
    /// system call per entry whatever the prefix (slow once a bucket holds thousands of
    /// objects); this one walks only the prefix's folder.
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let bucket_root = self.root.join(&input.bucket);
        if !bucket_root.is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        let prefix = input.prefix.clone().unwrap_or_default();
        if prefix.contains("..") || input.delimiter.is_some() {
            return Err(s3_error!(
                NotImplemented,
                "test server: no '..' or delimiter in listings"
            ));
        }
        let start = match (&input.continuation_token, &input.start_after) {
            (Some(token), _) => Some(token.clone()),
            (None, after) => after.clone(),
        };
        let max_keys = input.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let root = bucket_root.clone();
        let scan_prefix = prefix.clone();
        let mut keys = tokio::task::spawn_blocking(move || list_under(&root, &scan_prefix))
            .await
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        keys.sort();
        if let Some(start) = &start {
            keys.retain(|(k, _)| k > start);
        }
        let truncated = keys.len() > max_keys;
        keys.truncate(max_keys);
        let next = if truncated {
            keys.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        let contents: Vec<Object> = keys
            .into_iter()
            .map(|(key, size)| Object {
                key: Some(key),
                size: Some(size as i64),
                ..Default::default()
            })
            .collect();
        let output = ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            key_count: Some(contents.len() as i32),
            max_keys: Some(max_keys as i32),
            is_truncated: Some(truncated),
            continuation_token: input.continuation_token,
            next_continuation_token: next,
            contents: Some(contents),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let _guard = self.stripe(&req.input.bucket, &req.input.key).lock().await;
        self.inner.copy_object(req).await
    }
}

/// Keys (relative to `bucket_root`, `/`-separated) under `prefix`, with their sizes.
fn list_under(bucket_root: &std::path::Path, prefix: &str) -> Vec<(String, u64)> {
    // Walk from the deepest folder the prefix names fully.
    let start_dir = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let mut out = Vec::new();
    let mut pending = vec![bucket_root.join(start_dir)];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                pending.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(bucket_root) else {
                continue;
            };
            let key = relative.to_string_lossy().replace('\\', "/");
            if key.starts_with(prefix) {
                // Sizes cost a stat per key and nothing here reads them.
                out.push((key, 0));
            }
        }
    }
    out
}

/// A running server; it stops when dropped (with the runtime that serves it).
pub struct S3Server {
    pub endpoint: String,
    pub faults: Arc<Faults>,
    _root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3Server {
    /// Starts a server on a free loopback port, on the current tokio runtime.
    pub async fn start() -> S3Server {
        Self::start_with(tempfile::tempdir().expect("temporary folder")).await
    }

    /// Starts a server that keeps its objects in `root` (deleted with the server).
    pub async fn start_with(root: tempfile::TempDir) -> S3Server {
        let faults = Arc::new(Faults::default());
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs root");
        let mut builder = s3s::service::S3ServiceBuilder::new(Locked {
            inner: fs,
            root: root.path().canonicalize().expect("root"),
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            faults: faults.clone(),
        });
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            crate::ACCESS_KEY,
            crate::SECRET_KEY,
        ));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback port");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // Without it, a response written in two parts waits for the client's delayed
                // ACK: a delayed-ACK timeout per GET.
                let _ = socket.set_nodelay(true);
                let connection = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
        });
        S3Server {
            endpoint,
            faults,
            _root: root,
            task,
        }
    }
}
