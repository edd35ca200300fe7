//! A real Kubernetes control plane for the tests, started by the tests themselves: etcd,
//! kube-apiserver and kube-controller-manager built from Kubernetes' own Go modules
//! (`tests/control-plane`, pinned in its go.mod) and run on loopback, with certificates made
//! for each run; and a [`node::TestNode`] that runs pods' containers as local processes.
//!
//! The control-plane binary is built once into `target/control-plane/` and rebuilt only when
//! its sources change, so a warm start takes seconds. Every test binary that asks for it gets
//! one control plane ([`ControlPlane::shared`]); each test works in its own namespace.

pub mod node;

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The Kubernetes release the control plane is built from (`tests/control-plane/go.mod`).
pub const KUBERNETES_VERSION: &str = "1.35.4";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("building the control plane ({command}): {message}")]
    Build { command: String, message: String },
    #[error("starting the control plane: {0}")]
    Start(String),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cargo target folder, where built tools and binaries are kept between runs.
pub fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Holds an exclusive lock on a file for as long as it lives: test binaries run in parallel
/// and must not build the same thing at once.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = File::create(path)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { _file: file })
    }
}

fn newest_source(dir: &Path) -> std::io::Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".go") || name == "go.mod" || name == "go.sum" {
            newest = newest.max(entry.metadata()?.modified()?);
        }
    }
    Ok(newest)
}

/// The control-plane binary, built with `go build` if it is missing or older than its sources.
pub fn control_plane_binary() -> Result<PathBuf, ClusterError> {
    let sources = repo().join("tests/control-plane");
    let out = target().join("control-plane");
    let binary = out.join("cambrian-control-plane");
    let _lock = FileLock::acquire(&out.join(".lock"))?;
    let fresh = binary
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|built| newest_source(&sources).is_ok_and(|src| src <= built));
    if fresh {
        return Ok(binary);
    }
    let started = Instant::now();
    eprintln!(
        "building the Kubernetes {KUBERNETES_VERSION} control plane from Go modules (once; several minutes on 2 cores)"
    );
    let mut cmd = Command::new("go");
    cmd.args(["build", "-trimpath", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&sources)
        .env("GOFLAGS", "-mod=readonly -buildvcs=false")
        .env("GOTOOLCHAIN", "local");
    let output = cmd.output().map_err(|e| ClusterError::Build {
        command: format!("{cmd:?}"),
        message: format!("{e}: is Go installed?"),
    })?;
    if !output.status.success() {
        return Err(ClusterError::Build {
            command: format!("{cmd:?}"),
            message: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    eprintln!(
        "built {} in {:.0} s",
        binary.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(binary)
}

/// A running control plane. It stops when this value is dropped or the test process ends:
/// the control plane runs until the pipe to its standard input closes.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    server: String,
    process: Mutex<Option<(Child, ChildStdin)>>,
}

impl ControlPlane {
    /// Builds (if needed) and starts a control plane, and waits until it serves.
    pub fn start() -> Result<Self, ClusterError> {
        let binary = control_plane_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("cambrian-cluster-")
            .tempdir()?;
        let log = File::create(dir.path().join("up.log"))?;
        let mut child = Command::new(&binary)
            .arg("up")
            .arg("--dir")
            .arg(dir.path().join("run"))
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| ClusterError::Start(format!("{}: {e}", binary.display())))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| ClusterError::Start("no stdin pipe".into()))?;
        let ready = dir.path().join("run/ready");
        let deadline = Instant::now() + Duration::from_secs(240);
        let server = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break text.trim().to_string();
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
                return Err(ClusterError::Start(format!(
                    "the control plane exited ({status}):\n{log}"
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(ClusterError::Start(format!(
                    "not ready after 240 s; logs in {}",
                    dir.path().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        Ok(Self {
            dir,
            server,
            process: Mutex::new(Some((child, stdin))),
        })
    }

    /// One control plane for the whole test binary, started on first use.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| match ControlPlane::start() {
            Ok(cp) => cp,
            Err(e) => panic!("{e}"),
        })
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A cluster-admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("run/admin.kubeconfig")
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> Result<Vec<u8>, ClusterError> {
        Ok(std::fs::read(self.dir.path().join("run/pki/ca.crt"))?)
    }

    /// Where the components' logs are.
    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A cluster-admin client. Each test's runtime needs its own: a client's connections
    /// belong to the runtime that made them.
    pub async fn client(&self) -> Result<kube::Client, ClusterError> {
        // kube and the AWS SDK both enable a rustls crypto provider; with two, rustls picks
        // none.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let path = self.kubeconfig();
        let error = |message: String| ClusterError::Kubeconfig {
            path: path.clone(),
            message,
        };
        let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| error(e.to_string()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| error(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| error(e.to_string()))
    }

    /// Stops the control plane now (it also stops when dropped).
    pub fn stop(&self) {
        if let Ok(mut process) = self.process.lock() {
            if let Some((mut child, stdin)) = process.take() {
                drop(stdin);
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `text` to a new file in `dir` and returns its path (manifests for kubectl).
pub fn write_file(dir: &Path, name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let mut file = File::create(&path)?;
    file.write_all(text.as_bytes())?;
    Ok(path)
}
