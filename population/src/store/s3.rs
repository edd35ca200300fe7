//! A store in an S3 bucket (AWS or any S3-compatible server). It relies on nothing beyond
//! what AWS S3 promises: strong read-after-write consistency, whole-object PUTs, and
//! conditional writes with `If-None-Match: *` answered by 412 when the key exists (409 when a
//! concurrent conditional write is in flight, which we retry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{check_key, check_prefix, ObjectStore, StoreError};

/// How to reach a bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix of the experiment, without a trailing `/`; may be empty.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Explicit access key and secret; `None` uses the SDK's credential chain (environment,
    /// profile, web identity, instance metadata).
    pub credentials: Option<(String, String)>,
}

impl S3Settings {
    /// How to reach `bucket/prefix` with the endpoint, region and addressing of `store`, and
    /// the SDK's credential chain.
    pub fn at(bucket: String, prefix: String, store: &crds::StoreSpec) -> Self {
        Self {
            bucket,
            prefix,
            endpoint: store.endpoint.clone(),
            region: store.region.clone(),
            path_style: store.path_style,
            credentials: None,
        }
    }
}

#[derive(Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    url: String,
    list_pages: AtomicU64,
}

/// Attempts for a conditional write answered 409 (another conditional write in flight).
const CONFLICT_ATTEMPTS: u32 = 8;

impl S3Store {
    pub async fn connect(settings: S3Settings) -> Result<Self, StoreError> {
        let url = if settings.prefix.is_empty() {
            format!("s3://{}", settings.bucket)
        } else {
            format!("s3://{}/{}", settings.bucket, settings.prefix)
        };
        let region = aws_config::meta::region::RegionProviderChain::first_try(
            settings.region.clone().map(Region::new),
        )
        .or_default_provider()
        .or_else(Region::new("us-east-1"));
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
        if let Some((key, secret)) = &settings.credentials {
            loader = loader.credentials_provider(Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "cambrian",
            ));
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(6)
                    .with_initial_backoff(Duration::from_millis(50)),
            )
            // A server that accepts a request and never answers must not hang its caller.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .operation_timeout(Duration::from_secs(300))
                    .build(),
            )
            // Checksums only where S3 requires them: S3-compatible servers vary in support.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket,
            prefix: settings.prefix,
            url,
            list_pages: AtomicU64::new(0),
        })
    }

    /// LIST pages requested so far (a listing of more than 1,000 keys takes several).
    pub fn list_pages(&self) -> u64 {
        self.list_pages.load(Ordering::Relaxed)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn error<E, R>(&self, operation: &'static str, key: &str, err: &SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HttpStatus,
    {
        let message = DisplayErrorContext(err).to_string();
        let code = err.code().unwrap_or_default();
        let credential_problem = matches!(status(err), Some(401 | 403))
            || matches!(
                code,
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" | "ExpiredToken"
            )
            || message.to_ascii_lowercase().contains("credentials");
        if credential_problem {
            StoreError::Credentials {
                store: self.url.clone(),
                message: format!("{operation} {key}: {message}"),
            }
        } else {
            StoreError::Backend {
                store: self.url.clone(),
                operation,
                key: key.to_string(),
                message,
            }
        }
    }
}

fn status<E, R: HttpStatus>(err: &SdkError<E, R>) -> Option<u16> {
    match err {
        SdkError::ServiceError(e) => Some(e.raw().status_code()),
        _ => None,
    }
}

trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        check_key(key)?;
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await;
        match response {
            Ok(output) => {
                let body = output
                    .body
                    .collect()
                    .await
                    .map_err(|e| StoreError::Backend {
                        store: self.url.clone(),
                        operation: "get",
                        key: key.to_string(),
                        message: e.to_string(),
                    })?;
                Ok(Some(body.into_bytes()))
            }
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(err) if status(&err) == Some(404) => Ok(None),
            Err(err) => Err(self.error("get", key, &err)),
        }
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        check_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| self.error("put", key, &err))
    }

    async fn put_new(&self, key: &str, body: Bytes) -> Result<bool, StoreError> {
        check_key(key)?;
        let mut backoff = Duration::from_millis(20);
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let response = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .if_none_match("*")
                .body(ByteStream::from(body.clone()))
                .send()
                .await;
            match response {
                Ok(_) => return Ok(true),
                Err(err)
                    if status(&err) == Some(412) || err.code() == Some("PreconditionFailed") =>
                {
                    // The SDK retries a request whose response was lost; the retry of a write
                    // that was made is refused. Our body, found whole, means we won.
                    return Ok(self
                        .get(key)
                        .await?
                        .is_some_and(|existing| existing == body));
                }
                Err(err)
                    if (status(&err) == Some(409)
                        || err.code() == Some("ConditionalRequestConflict"))
                        && attempt < CONFLICT_ATTEMPTS =>
                {
                    tracing::debug!(key = %key, attempt, "conditional write conflict, retrying");
                    tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 20))
                        .await;
                    backoff *= 2;
                }
                Err(err) => return Err(self.error("put-if-absent", key, &err)),
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if status(&err) == Some(404) => Ok(()),
            Err(err) => Err(self.error("delete", key, &err)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        check_prefix(prefix)?;
        let full = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            self.list_pages.fetch_add(1, Ordering::Relaxed);
            let page = page.map_err(|err| self.error("list", prefix, &err))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    if key.len() > strip {
                        keys.push(key[strip..].to_string());
                    }
                }
            }
        }
        Ok(keys)
    }
}
