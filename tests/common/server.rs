//! A `kojo serve` child process on SmolLM2 for the HTTP tests.
#![allow(dead_code)]

use super::*;
use serde_json::{json, Value};
use std::io::Write as _;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL_ID: &str = "smollm2";

pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::start_with(extra, &[], Stdio::inherit())
    }

    /// A free port on loopback.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Start on SmolLM2 with extra flags, environment variables and a stderr of the caller's.
    pub fn start_with(extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Server {
        let mut s = Server::spawn(extra, env, stderr, None);
        s.wait_ready();
        s
    }

    /// Start without waiting for it, its open-file limit (soft and hard) at `nofile` if given.
    pub fn spawn(
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
        nofile: Option<u64>,
    ) -> Server {
        Server::spawn_limited(extra, env, stderr, nofile.map(|n| (libc::RLIMIT_NOFILE, n)))
    }

    /// Start without waiting for it, with one resource limit (soft and hard) set if given.
    pub fn spawn_limited(
        extra: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
        limit: Option<(libc::__rlimit_resource_t, u64)>,
    ) -> Server {
        let port = Server::free_port();
        let m = smollm2();
        let port_s = port.to_string();
        let mut args = vec![
            "serve",
            "-m",
            m.to_str().unwrap(),
            "--port",
            &port_s,
            "--served-model-name",
            MODEL_ID,
        ];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kojo"));
        cmd.args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some((what, n)) = limit {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(what, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        Server { child, port }
    }

    /// The exit status, waiting up to `limit` for it.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Wait until /health answers 200 (panics after 60 s or if the process exits).
    pub fn wait_ready(&mut self) {
        let t = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&self.url("/health")).call() {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("the server exited before it was ready: {st}");
            }
            assert!(t.elapsed() < Duration::from_secs(60), "server not ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Run the Python client `tests/clients/SCRIPT BASE_URL MODEL_ID EXTRA...` against this
    /// server; panics with its output unless it exits 0 having printed "all checks passed".
    pub fn python_client(&self, script: &str, extra: &[&str]) {
        let out = Command::new(python())
            .arg(root().join("tests/clients").join(script))
            .args([&self.url("/v1"), MODEL_ID])
            .args(extra)
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout);
        eprintln!("{log}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && log.contains("all checks passed"));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// (status, body)
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        match ureq::post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    pub fn chat(&self, content: &str, max_tokens: usize) -> Value {
        self.chat_with(content, max_tokens, false)
    }

    pub fn chat_with(&self, content: &str, max_tokens: usize, ignore_eos: bool) -> Value {
        let (s, v) = self.post(
            "/v1/chat/completions",
            &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos})
            .to_string(),
        );
        assert_eq!(s, 200, "{v}");
        v
    }

    /// The value of metric `name`'s series whose labels include `label` (`key="value"`).
    pub fn metric_with(&self, name: &str, label: &str) -> f64 {
        let text = ureq::get(&self.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}{{{label}}} not in /metrics"))
    }

    /// One metric's value from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = ureq::get(&self.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A POST over a raw socket, for tests that read (or drop) the stream themselves.
pub fn raw_post(port: u16, path: &str, body: &str) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    c
}
