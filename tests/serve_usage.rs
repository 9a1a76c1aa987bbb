//! The usage ledger (`--usage-db`) on SmolLM2: its totals equal the `usage` the clients got,
//! by tenant, through `GET /v1/usage` (the admin sees all, a tenant its own) and `kojo usage`
//! offline; per-tenant metrics agree; after `kill -9` under load every request whose client got
//! its final usage is in the ledger; a file that is not a ledger is a clear error at start.

mod common;

use common::kojo_ok;
use common::server::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let h = kojo::tenancy::hash_key;
    let text = format!(
        "[admin]\nkey_sha256 = [\"{}\"]\n\n\
         [[tenant]]\nname = \"a\"\nkey_sha256 = [\"{}\"]\n\n\
         [[tenant]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\nweight = 2.0\n\n\
         [[tenant]]\nname = \"rl\"\nkey_sha256 = [\"{}\"]\nrpm = 1\n",
        h("root"),
        h("key-a"),
        h("key-b"),
        h("key-rl"),
    );
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn call(s: &Server, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let req = ureq::request(method, &s.url(path))
        .set("Authorization", &format!("Bearer {key}"))
        .set("X-Request-Id", "client-id-7");
    let r = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

/// A streamed request's final usage (it asked for it), read from the SSE lines.
fn stream_usage(s: &Server, key: &str, body: &Value) -> Value {
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(body.clone())
        .unwrap();
    let mut usage = Value::Null;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            if d != "[DONE]" {
                let v: Value = serde_json::from_str(d).unwrap();
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
            }
        }
    }
    usage
}

#[derive(Default, Debug, PartialEq)]
struct Sum {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
}

impl Sum {
    fn add(&mut self, u: &Value) {
        self.requests += 1;
        self.prompt += u["prompt_tokens"].as_u64().unwrap();
        self.cached += u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        self.completion += u["completion_tokens"].as_u64().unwrap();
    }

    fn of(v: &Value) -> Sum {
        let o = &v["by_outcome"];
        let ok = |k: &str| o[k]["requests"].as_u64().unwrap_or(0);
        Sum {
            requests: ok("stop") + ok("length"),
            prompt: v["prompt_tokens"].as_u64().unwrap(),
            cached: v["cached_prompt_tokens"].as_u64().unwrap(),
            completion: v["completion_tokens"].as_u64().unwrap(),
        }
    }
}

#[test]
fn the_ledger_totals_are_the_usage_the_clients_got() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = file(&dir);
    let db = dir.path().join("usage.sqlite");
    let s = Server::start(&[
        "--tenants",
        tenants.to_str().unwrap(),
        "--usage-db",
        db.to_str().unwrap(),
    ]);
    let mut want: BTreeMap<&str, Sum> = BTreeMap::new();
    let long = "Tell me about the history of tea in Japan. ".repeat(6);
    for (key, tenant) in [("key-a", "a"), ("key-b", "b"), ("root", "admin")] {
        for (i, content) in ["hi", long.as_str(), long.as_str()].iter().enumerate() {
            let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
                              "max_tokens": 4 + i, "temperature": 0, "n": 1 + i % 2});
            let (code, v) = call(&s, "POST", "/v1/chat/completions", key, Some(&body));
            assert_eq!(code, 200, "{v}");
            want.entry(tenant).or_default().add(&v["usage"]);
        }
        let body = json!({"model": MODEL_ID, "prompt": ["Once upon a time", "The tea"],
                          "max_tokens": 3, "temperature": 0});
        let (code, v) = call(&s, "POST", "/v1/completions", key, Some(&body));
        assert_eq!(code, 200, "{v}");
        want.entry(tenant).or_default().add(&v["usage"]);
        let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Count to ten."}],
                          "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}});
        let u = stream_usage(&s, key, &body);
        want.entry(tenant).or_default().add(&u);
    }
    // rpm 1: the second is refused, and written as rejected
    let one = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (code, v) = call(&s, "POST", "/v1/chat/completions", "key-rl", Some(&one));
    assert_eq!(code, 200);
    want.entry("rl").or_default().add(&v["usage"]);
    assert_eq!(
        call(&s, "POST", "/v1/chat/completions", "key-rl", Some(&one)).0,
        429
    );

    // the admin sees every tenant
    let (code, all) = call(&s, "GET", "/v1/usage?group_by=tenant", "root", None);
    assert_eq!(code, 200, "{all}");
    let got: BTreeMap<String, &Value> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["tenant"].as_str().unwrap().to_string(), r))
        .collect();
    for (tenant, sum) in &want {
        assert_eq!(&Sum::of(got[*tenant]), sum, "tenant {tenant}: {all}");
    }
    assert_eq!(got["rl"]["by_outcome"]["rejected"]["requests"], 1, "{all}");
    // a tenant sees its own rows only, whatever it asks for
    let (code, own) = call(
        &s,
        "GET",
        "/v1/usage?group_by=tenant&tenant=b",
        "key-a",
        None,
    );
    assert_eq!(code, 200, "{own}");
    let rows = own["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{own}");
    assert_eq!(rows[0]["tenant"], "a");
    // by day (today, UTC) and by model: the same totals
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (_, by_day) = call(
        &s,
        "GET",
        &format!("/v1/usage?from={today}&to={today}&group_by=day"),
        "root",
        None,
    );
    let total: u64 = want.values().map(|s| s.completion).sum();
    assert_eq!(by_day["data"][0]["completion_tokens"], total, "{by_day}");
    let (_, by_model) = call(&s, "GET", "/v1/usage?group_by=model", "root", None);
    assert_eq!(by_model["data"][0]["model"], MODEL_ID);
    assert_eq!(by_model["data"][0]["completion_tokens"], total);
    // bad queries name the parameter
    let (code, e) = call(&s, "GET", "/v1/usage?from=2026-13-40", "root", None);
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("from")),
        "{e}"
    );
    let (code, e) = call(&s, "GET", "/v1/usage?group_by=week", "root", None);
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("group_by")),
        "{e}"
    );

    // the metrics, by tenant
    let a = &want["a"];
    assert_eq!(
        s.metric_with("kojo:tenant_generation_tokens_total", "tenant=\"a\""),
        a.completion as f64
    );
    assert_eq!(
        s.metric_with("kojo:tenant_prompt_tokens_total", "tenant=\"a\""),
        a.prompt as f64
    );
    let text = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let done: f64 = text
        .lines()
        .filter(|l| l.starts_with("kojo:tenant_requests_total{") && l.contains("tenant=\"a\""))
        .filter(|l| l.contains("outcome=\"stop\"") || l.contains("outcome=\"length\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(done, a.requests as f64);
    assert_eq!(
        s.metric_with(
            "kojo:tenant_requests_total",
            "outcome=\"rejected\",tenant=\"rl\""
        ),
        1.0
    );
    assert!(s.metric_with("kojo:tenant_vtc", "tenant=\"a\"") > 0.0);
    let health: Value = ureq::get(&s.url("/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["usage_ledger"], "ok");

    // the client's request id is kept
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ids: i64 = conn
        .query_row(
            "SELECT count(*) FROM usage WHERE client_request_id = 'client-id-7'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(ids > 0);

    // offline, while the server runs: the same totals
    let offline: Value =
        serde_json::from_str(&kojo_ok(&["usage", "--db", db.to_str().unwrap()])).unwrap();
    assert_eq!(offline["data"], all["data"]);
    let csv = kojo_ok(&["usage", "--db", db.to_str().unwrap(), "--csv"]);
    assert!(
        csv.starts_with(
            "tenant,outcome,requests,prompt_tokens,cached_prompt_tokens,completion_tokens\n"
        ),
        "{csv}"
    );
    let a_rows: u64 = csv
        .lines()
        .filter(|l| l.starts_with("a,stop,") || l.starts_with("a,length,"))
        .map(|l| l.split(',').nth(2).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(a_rows, a.requests);
}

/// Under load from several clients, `kill -9`: every request whose client had its final usage
/// (a whole body, or a stream's usage chunk) is in the ledger after the restart.
#[test]
fn after_kill_9_every_request_whose_client_got_its_usage_is_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.sqlite");
    // a slow disk: each commit takes 30 ms more, so a row written after its answer would be
    // lost to the kill
    let mut s = Server::start_with(
        &["--usage-db", db.to_str().unwrap()],
        &[("KOJO_TEST_LEDGER_DELAY_MS", "30")],
        Stdio::inherit(),
    );
    let got: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = s.port;
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let got = got.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let streamed = c % 2 == 1;
                    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Say something."}],
                                      "max_tokens": 3, "stream": streamed,
                                      "stream_options": if streamed { json!({"include_usage": true}) } else { Value::Null }});
                    let Ok(r) = ureq::post(&url).send_json(body) else {
                        break;
                    };
                    if !streamed {
                        if let Ok(v) = r.into_json::<Value>() {
                            if v["usage"].is_object() {
                                got.lock().unwrap().insert(v["id"].as_str().unwrap().to_string());
                            }
                        }
                        continue;
                    }
                    for line in BufReader::new(r.into_reader()).lines() {
                        let Ok(line) = line else { break };
                        let Some(d) = line.strip_prefix("data: ") else { continue };
                        if let Ok(v) = serde_json::from_str::<Value>(d) {
                            if v["usage"].is_object() {
                                got.lock().unwrap().insert(v["id"].as_str().unwrap().to_string());
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    // the kill comes within a millisecond of a client getting its usage
    while got.lock().unwrap().len() < 40 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_micros(200));
    }
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let got = got.lock().unwrap().clone();
    assert!(got.len() >= 40, "{} requests before the kill", got.len());
    // a restart opens the same ledger
    let s2 = Server::start(&["--usage-db", db.to_str().unwrap()]);
    drop(s2);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut st = conn.prepare("SELECT id FROM usage").unwrap();
    let stored: BTreeSet<String> = st
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let missing: Vec<&String> = got.difference(&stored).collect();
    eprintln!(
        "{} requests got their usage before the kill; {} rows in the ledger",
        got.len(),
        stored.len()
    );
    assert!(missing.is_empty(), "not in the ledger: {missing:?}");
}

#[test]
fn a_file_that_is_not_a_ledger_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("junk.sqlite");
    std::fs::File::create(&db)
        .unwrap()
        .write_all(&[7u8; 8192])
        .unwrap();
    let mut s = Server::spawn(
        &["--usage-db", db.to_str().unwrap()],
        &[],
        Stdio::piped(),
        None,
    );
    let st = s.wait_exit(Duration::from_secs(30)).expect("it must exit");
    assert!(!st.success());
    let mut err = String::new();
    std::io::Read::read_to_string(s.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("junk.sqlite"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A ledger that can no longer grow (the file-size limit stands in for a full disk): serving
/// goes on, the failure is logged and shown in /health and the metrics.
#[test]
fn a_full_disk_is_surfaced_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.sqlite");
    let mut s = Server::spawn_limited(
        &["--usage-db", db.to_str().unwrap()],
        &[],
        Stdio::inherit(),
        Some((libc::RLIMIT_FSIZE, 96 * 1024)),
    );
    s.wait_ready();
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let t = Instant::now();
    loop {
        let (code, v) = call(&s, "POST", "/v1/chat/completions", "", Some(&body));
        assert_eq!(code, 200, "{v}");
        let h: Value = ureq::get(&s.url("/health"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if h["usage_ledger"].as_str().unwrap().starts_with("failing") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the ledger never filled: {h}"
        );
    }
    assert!(s.metric("kojo:usage_ledger_write_errors_total") >= 1.0);
    // still serving
    for _ in 0..3 {
        assert_eq!(
            call(&s, "POST", "/v1/chat/completions", "", Some(&body)).0,
            200
        );
    }
    assert!(s.alive());
}
