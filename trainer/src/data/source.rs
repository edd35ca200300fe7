//! Where a manifest's data comes from: a local folder, an `s3://` prefix holding the binary
//! files, or an `http(s)://` URL of the official archive (the default). Downloads land once in
//! a cache, checked against a SHA-256, and are reused from there.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crds::{Dataset, ValidatedSpec};
use population::store::{ObjectStore, S3Settings, S3Store, StoreError};

use super::cifar::BinaryFormat;

pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR10_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";
pub const CIFAR100_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";
pub const CIFAR100_SHA256: &str =
    "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("downloading {url}: {message}. On a machine without internet, pass --data DIR with the unpacked files")]
    Download { url: String, message: String },
    #[error("{url}: SHA-256 {got} does not match the expected {expected}; the download is corrupt or the URL serves another file")]
    Checksum {
        url: String,
        expected: String,
        got: String,
    },
    #[error("unpacking {path}: {message}")]
    Unpack { path: PathBuf, message: String },
    #[error("cache folder {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data source {source_url}: {error}")]
    Store {
        source_url: String,
        error: StoreError,
    },
    #[error("data source {0} does not hold {1}")]
    MissingObject(String, String),
}

/// The default cache: `$CAMBRIAN_CACHE`, else `$XDG_CACHE_HOME/cambrian`, else
/// `~/.cache/cambrian`.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAMBRIAN_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("cambrian");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/cambrian"))
        .unwrap_or_else(|| std::env::temp_dir().join("cambrian-cache"))
}

fn cache_error(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Cache {
        path: path.to_path_buf(),
        source,
    }
}

/// The data folder of an experiment: `given` (a `--data` folder), else its spec's source,
/// fetched into the default cache.
pub async fn folder(spec: &ValidatedSpec, given: Option<PathBuf>) -> Result<PathBuf, SourceError> {
    match given {
        Some(dir) => Ok(dir),
        None => resolve(&spec.data, &default_cache(), &spec.store).await,
    }
}

/// The local folder with the data of `data`, fetching it into `cache` first if needed. An
/// `s3://` source is reached with the endpoint, region and addressing of `store` (the
/// experiment's store).
pub async fn resolve(
    data: &crds::DataSpec,
    cache: &Path,
    store: &crds::StoreSpec,
) -> Result<PathBuf, SourceError> {
    let kind = data.dataset;
    let (default_url, default_sha) = match kind {
        Dataset::Cifar10 => (CIFAR10_URL, CIFAR10_SHA256),
        Dataset::Cifar100 => (CIFAR100_URL, CIFAR100_SHA256),
    };
    let source = data.source.as_deref().unwrap_or(default_url);
    if let Some(path) = source.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if source.starts_with('/') {
        return Ok(PathBuf::from(source));
    }
    if source.starts_with("s3://") {
        return fetch_s3(source, kind, cache, store).await;
    }
    let expected = data
        .sha256
        .clone()
        .unwrap_or_else(|| {
            if source == default_url {
                default_sha.to_string()
            } else {
                String::new()
            }
        })
        .to_ascii_lowercase();
    let url = source.to_string();
    let cache = cache.to_path_buf();
    tokio::task::spawn_blocking(move || fetch_archive(&url, &expected, &cache))
        .await
        .map_err(|e| SourceError::Download {
            url: source.to_string(),
            message: e.to_string(),
        })?
}

/// Downloads and unpacks an archive once; the folder is named by the archive's checksum.
pub fn fetch_archive(url: &str, expected_sha: &str, cache: &Path) -> Result<PathBuf, SourceError> {
    let name = if expected_sha.is_empty() {
        format!("url-{:016x}", fnv(url.as_bytes()))
    } else {
        format!("sha256-{}", &expected_sha[..16.min(expected_sha.len())])
    };
    let dir = cache.join(name);
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(cache_error(cache))?;
    let archive = cache.join(format!(".download-{}", std::process::id()));
    let download = |message: String| SourceError::Download {
        url: url.to_string(),
        message,
    };
    let mut response = ureq::get(url).call().map_err(|e| download(e.to_string()))?;
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = match length {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {url}"));
    let mut reader = response.body_mut().as_reader();
    let mut file = std::fs::File::create(&archive).map_err(cache_error(&archive))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| download(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        std::io::Write::write_all(&mut file, &buffer[..n]).map_err(cache_error(&archive))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    drop(file);
    let got = hex(&hasher.finalize());
    if !expected_sha.is_empty() && got != expected_sha {
        let _ = std::fs::remove_file(&archive);
        return Err(SourceError::Checksum {
            url: url.to_string(),
            expected: expected_sha.to_string(),
            got,
        });
    }
    if expected_sha.is_empty() {
        tracing::warn!(url = %url, sha256 = %got, "no checksum to verify the download against; set spec.data.sha256");
    }
    let staging = cache.join(format!(".unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let unpack = |message: String| SourceError::Unpack {
        path: archive.clone(),
        message,
    };
    let file = std::fs::File::open(&archive).map_err(cache_error(&archive))?;
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(&staging)
        .map_err(|e| unpack(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(cache_error(&dir))?;
    std::fs::write(&done, got.as_bytes()).map_err(cache_error(&done))?;
    let _ = std::fs::remove_file(&archive);
    Ok(dir)
}

/// Copies the binary files from `s3://bucket/prefix/` into the cache.
async fn fetch_s3(
    source: &str,
    kind: Dataset,
    cache: &Path,
    store_spec: &crds::StoreSpec,
) -> Result<PathBuf, SourceError> {
    let store_error = |error| SourceError::Store {
        source_url: source.to_string(),
        error,
    };
    let (bucket, prefix) = match crds::parse_store_url(source) {
        Ok(crds::StoreLocation::S3 { bucket, prefix }) => (bucket, prefix),
        _ => {
            return Err(SourceError::Download {
                url: source.to_string(),
                message: "not an s3://bucket/prefix URL".into(),
            })
        }
    };
    let dir = cache.join(format!("s3-{:016x}", fnv(source.as_bytes())));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(cache_error(&dir))?;
    let store = S3Store::connect(S3Settings::at(bucket, prefix, store_spec))
        .await
        .map_err(store_error)?;
    let names: Vec<&str> = kind
        .training_files()
        .iter()
        .copied()
        .chain(std::iter::once(kind.test_file()))
        .collect();
    for name in names {
        let bytes = store
            .get(name)
            .await
            .map_err(store_error)?
            .ok_or_else(|| SourceError::MissingObject(source.to_string(), name.to_string()))?;
        let path = dir.join(name);
        std::fs::write(&path, &bytes).map_err(cache_error(&path))?;
    }
    std::fs::write(dir.join(".complete"), b"").map_err(cache_error(&dir))?;
    Ok(dir)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable, dependency-free hash for cache folder names.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A one-shot HTTP server on a loopback port serving `body` to every request.
    fn serve(body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz")
    }

    /// A .tar.gz laid out like the official one: cifar-10-batches-bin/<files>.
    fn archive() -> Vec<u8> {
        let files = tempfile::tempdir().unwrap();
        crate::data::fixture::write(files.path(), Dataset::Cifar10, 4, 0).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        tar.append_dir_all("cifar-10-batches-bin", files.path())
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn downloads_checks_unpacks_and_caches() {
        let body = archive();
        let sha = hex(&Sha256::digest(&body));
        let url = serve(body);
        let cache = tempfile::tempdir().unwrap();
        let dir = fetch_archive(&url, &sha, cache.path()).unwrap();
        let images = crate::data::cifar::read_training(&dir, Dataset::Cifar10).unwrap();
        assert_eq!(images.len(), 20);
        // The second time it comes from the cache, even with the server gone.
        let again = fetch_archive("http://127.0.0.1:9/nothing", &sha, cache.path()).unwrap();
        assert_eq!(again, dir);
    }

    #[test]
    fn wrong_checksum_is_an_error_and_leaves_nothing() {
        let url = serve(archive());
        let cache = tempfile::tempdir().unwrap();
        let err = fetch_archive(&url, &"0".repeat(64), cache.path()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!cache
            .path()
            .join(format!("sha256-{}", "0".repeat(16)))
            .exists());
    }

    #[test]
    fn unreachable_source_says_what_to_do() {
        let cache = tempfile::tempdir().unwrap();
        let err = fetch_archive("http://127.0.0.1:9/x.tar.gz", "", cache.path()).unwrap_err();
        assert!(err.to_string().contains("--data"), "{err}");
    }
}
