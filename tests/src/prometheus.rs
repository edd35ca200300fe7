//! A real Prometheus and its `promtool`, from Debian's `prometheus` package, unpacked into
//! `target/test-tools/prometheus/` on first use (`apt-get download`, `dpkg-deb -x`: nothing is
//! installed on the machine; only a machine without package lists needs `apt-get update`, as
//! root), and a server started on a loopback port, scraping the targets a test gives it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::FileLock;
use crate::tools::{run, tools};

/// The folder that holds `prometheus` and `promtool`.
fn bin() -> PathBuf {
    let dir = tools().join("prometheus");
    let bin = dir.join("root/usr/bin");
    let _lock = FileLock::acquire(&tools().join(".prometheus.lock")).expect("tool lock");
    if bin.join("promtool").exists() && bin.join("prometheus").exists() {
        return bin;
    }
    std::fs::create_dir_all(&dir).expect("tools folder");
    let download = |dir: &Path| {
        Command::new("apt-get")
            .args(["download", "prometheus"])
            .current_dir(dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    // A fresh machine may have no package lists yet.
    if !download(&dir) {
        run(Command::new("apt-get").arg("update"));
        assert!(download(&dir), "apt-get download prometheus failed");
    }
    let deb = std::fs::read_dir(&dir)
        .expect("tools folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download wrote a .deb");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")));
    bin
}

pub fn promtool() -> PathBuf {
    bin().join("promtool")
}

/// A Prometheus server, killed when dropped.
pub struct Prometheus {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts a server that scrapes `targets` (`host:port`, `/metrics`) every second and
    /// evaluates `rule_files` every second.
    pub fn start(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        let prometheus = bin().join("prometheus");
        let dir = tempfile::tempdir().expect("a folder");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("  - \"{}\"", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: cambrian\n    static_configs:\n      - targets: [{}]\n",
            if rules.is_empty() { "  []".to_string() } else { rules.join("\n") },
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("config");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(prometheus)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let server = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&format!("{}/-/ready", server.url))
            .call()
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// The result of an instant query: one entry per series (`metric` and `value`).
    /// Blocking.
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let mut response = ureq::get(&format!("{}/api/v1/query", self.url))
            .query("query", expr)
            .call()
            .map_err(|e| format!("query {expr:?}: {e}"))?;
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("query {expr:?}: {e}"))?;
        let body: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("query {expr:?}: {e}: {text}"))?;
        if body["status"] != "success" {
            return Err(format!("query {expr:?}: {body}"));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
