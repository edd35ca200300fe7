//! Test harness for the cross-crate tests: real S3 servers on loopback ports, started by the
//! tests themselves, and small experiments to run against them.
//!
//! - [`s3s::S3Server`]: `s3s-fs` in process. It checks conditional writes and then writes,
//!   without a lock, so on its own it is not atomic under concurrent create-only PUTs; the
//!   wrapper serialises the writes to each key (every request but GET, HEAD and LIST), and
//!   injects 409/503 faults on demand.
//! - [`moto::Moto`]: moto's standalone server (PyPI `moto[server]`) in a virtual environment
//!   kept under the cargo target folder, an independent implementation closer to AWS.
//! - [`prometheus::Prometheus`]: Debian's Prometheus server and promtool, for the chart's
//!   dashboard and alerts; [`python::venv`]: PyPI tools such as ONNX Runtime.

pub mod cluster;
pub mod experiment;
pub mod faults;
pub mod moto;
pub mod prometheus;
pub mod python;
pub mod s3s;
pub mod tools;

use std::sync::Arc;

use population::store::{ObjectStore, S3Settings, S3Store};

pub const ACCESS_KEY: &str = "cambrian-test";
pub const SECRET_KEY: &str = "cambrian-test-secret";

/// A client of the S3 server at `endpoint`, for setting up buckets.
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Creates `bucket` on the server and returns a store on `bucket/prefix` through the project's
/// own S3 backend.
pub async fn s3_store(endpoint: &str, bucket: &str, prefix: &str) -> Arc<S3Store> {
    let client = s3_client(endpoint).await;
    let _ = client.create_bucket().bucket(bucket).send().await;
    Arc::new(
        S3Store::connect(S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(endpoint.to_string()),
            region: Some("us-east-1".into()),
            path_style: true,
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        })
        .await
        .expect("S3 store"),
    )
}

/// A bucket name no other test uses.
pub fn unique_bucket(tag: &str) -> String {
    format!("{tag}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos
        ^ (std::process::id() << 16)
        ^ COUNTER.fetch_add(0x9e37_79b9, std::sync::atomic::Ordering::Relaxed)
}

pub fn as_dyn<S: ObjectStore + 'static>(store: Arc<S>) -> Arc<dyn ObjectStore> {
    store
}
