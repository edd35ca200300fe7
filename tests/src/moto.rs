//! moto's standalone S3 server, installed into a virtual environment (`python::venv`) on first
//! use (from PyPI) and started on a free loopback port. It lives as long as
//! the test process: a small Python guard kills it when our end of its stdin closes.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Moto {
    pub endpoint: String,
    _guard: Mutex<Child>,
}

fn venv() -> Result<PathBuf, String> {
    crate::python::venv(
        "moto-venv",
        &["moto[server]>=5"],
        "import moto.server, flask",
    )
}

fn start() -> Result<Moto, String> {
    if let Ok(endpoint) = std::env::var("CAMBRIAN_TEST_MOTO_ENDPOINT") {
        return Ok(Moto {
            endpoint,
            _guard: Mutex::new(Command::new("true").spawn().map_err(|e| e.to_string())?),
        });
    }
    let venv = venv()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let guard = r#"
import subprocess, sys
server = subprocess.Popen([sys.argv[1], "-H", "127.0.0.1", "-p", sys.argv[2]],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("started", flush=True)
sys.stdin.read()
server.kill()
"#;
    let mut child = Command::new(venv.join("bin/python"))
        .args(["-c", guard])
        .arg(venv.join("bin/moto_server"))
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting moto: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("moto did not start listening within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Moto {
        endpoint,
        _guard: Mutex::new(child),
    })
}

/// The process-wide moto server, started on first use.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        start().unwrap_or_else(|e| {
            panic!("cannot start moto's S3 server for the tests ({e}); it needs python3 and PyPI, or CAMBRIAN_TEST_MOTO_ENDPOINT")
        })
    })
}
