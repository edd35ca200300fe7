//! `s3s-fs` served in process over real HTTP, made atomic by a lock around every request that
//! is not a read, and able to answer chosen requests with chosen faults.

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
    lock: tokio::sync::Mutex<()>,
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl S3 for Locked {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let _guard = self.lock.lock().await;
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
        let _guard = self.lock.lock().await;
        self.inner.put_object(req).await
    }
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let _guard = self.lock.lock().await;
        self.inner.delete_object(req).await
    }
    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let _guard = self.lock.lock().await;
        self.inner.delete_objects(req).await
    }
    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let _guard = self.lock.lock().await;
        self.inner.list_objects_v2(req).await
    }
    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let _guard = self.lock.lock().await;
        self.inner.copy_object(req).await
    }
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
        let root = tempfile::tempdir().expect("temporary folder");
        let faults = Arc::new(Faults::default());
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs root");
        let mut builder = s3s::service::S3ServiceBuilder::new(Locked {
            inner: fs,
            lock: tokio::sync::Mutex::new(()),
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
