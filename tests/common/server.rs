//! A real `carina serve` process on a loopback port, and plain HTTP/1.1 requests to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::root;

/// A running server; killed on drop.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Its HTTP address.
    pub http: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `carina serve` with the shipped models and `env`.
pub fn start(data: &Path, env: &[(&str, &str)]) -> Server {
    start_with(data, env, None)
}

/// [`start`] with a config file.
pub fn start_with(data: &Path, env: &[(&str, &str)], config: Option<&Path>) -> Server {
    start_models(data, &root().join("models"), env, config)
}

/// [`start_with`] with the model packages in `models`.
pub fn start_models(
    data: &Path,
    models: &Path,
    env: &[(&str, &str)],
    config: Option<&Path>,
) -> Server {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_carina"));
    cmd.current_dir(root())
        .arg("serve")
        .args(["--http", &http.to_string()])
        .arg("--data-dir")
        .arg(data)
        .arg("--models")
        .arg(models)
        .env("CARINA_MIN_FREE_MB", "0")
        .env("CARINA_LOG_FORMAT", "json")
        .env("CARINA_INTRA_THREADS", "1")
        .env("CARINA_SESSIONS_PER_MODEL", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut s = Server {
        child: cmd.spawn().unwrap(),
        http,
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while request(http, "GET", "/readyz", &[], &[]).map(|a| a.0) != Some(200) {
        assert!(s.child.try_wait().unwrap().is_none(), "carina exited");
        assert!(Instant::now() < deadline, "carina not ready in 90 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

/// Status, headers (lower-case names), body.
pub type Answer = (u16, HashMap<String, String>, Vec<u8>);

/// One HTTP/1.1 request (`Connection: close`); `None` when no answer came.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    // the server may answer (413) and close before the whole body is sent
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
}
