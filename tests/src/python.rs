//! Python tools from PyPI (moto's S3 server, ONNX Runtime), each in a virtual environment of
//! its own under `target/test-tools/`, made on first use under a lock: test binaries run in
//! parallel and must not install into one environment at once.

use std::path::PathBuf;
use std::process::Command;

use crate::cluster::FileLock;
use crate::tools::tools;

/// The virtual environment `name`, with `packages` installed; `probe` is Python code that
/// succeeds once they are (an import), so a ready environment costs one interpreter start.
pub fn venv(name: &str, packages: &[&str], probe: &str) -> Result<PathBuf, String> {
    let venv = tools().join(name);
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", probe])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if ready() {
        return Ok(venv);
    }
    let _lock =
        FileLock::acquire(&tools().join(format!(".{name}.lock"))).map_err(|e| e.to_string())?;
    if ready() {
        return Ok(venv);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(packages))?;
    if ready() {
        Ok(venv)
    } else {
        Err(format!(
            "{probe:?} fails after installing {packages:?} into {}",
            venv.display()
        ))
    }
}
