//! /metrics as vLLM's users read it: vLLM's names and types, `model_name` on every series,
//! counters that add up to the usage the clients were given, one observation per request, and
//! an exposition that `promtool check metrics` parses (issue 14).

mod common;
use common::server::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

/// One scrape: `# TYPE` per family, and every sample.
struct Scrape {
    text: String,
    types: BTreeMap<String, String>,
    /// (name, labels, value)
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn scrape(s: &Server) -> Scrape {
    let text = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "two TYPE lines for {name}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a bad number: {line}")),
        };
        samples.push((name.to_string(), labels, value));
    }
    Scrape {
        text,
        types,
        samples,
    }
}

impl Scrape {
    /// The sum of the samples named `name` that carry every label in `with`.
    fn get(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let mut found = false;
        let mut sum = 0.0;
        for (n, labels, v) in &self.samples {
            if n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(v))
            {
                found = true;
                sum += v;
            }
        }
        assert!(found, "{name} {with:?} not in /metrics");
        sum
    }

    fn v(&self, name: &str) -> f64 {
        self.get(name, &[])
    }

    /// The `le` labels of a histogram, in order.
    fn bounds(&self, name: &str) -> Vec<String> {
        let bucket = format!("{name}_bucket");
        self.samples
            .iter()
            .filter(|(n, _, _)| *n == bucket)
            .map(|(_, l, _)| l["le"].clone())
            .collect()
    }
}

/// A request and what its usage says.
#[derive(Default, Debug)]
struct Tally {
    requests: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    /// finish reason of the request (all choices "length": "length"; else "stop")
    reasons: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, usage: &Value, finish_reasons: &[String]) {
        self.requests += 1;
        self.prompt_tokens += usage["prompt_tokens"].as_u64().unwrap();
        self.completion_tokens += usage["completion_tokens"].as_u64().unwrap();
        self.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        let reason = if finish_reasons.iter().all(|r| r == "length") {
            "length"
        } else {
            "stop"
        };
        *self.reasons.entry(reason.to_string()).or_default() += 1;
    }
}

fn finish_reasons(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["finish_reason"].as_str().unwrap().to_string())
        .collect()
}

/// POST a JSON body; the body back, counted in `t`.
fn call(s: &Server, t: &mut Tally, path: &str, body: Value) -> Value {
    let (st, v) = s.post(path, &body.to_string());
    assert_eq!(st, 200, "{v}");
    t.add(&v["usage"], &finish_reasons(&v));
    v
}

/// POST a streaming request with `include_usage`, read it to its end; (text per choice, usage),
/// counted in `t`.
fn call_stream(s: &Server, t: &mut Tally, path: &str, mut body: Value) -> Vec<String> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = ureq::post(&s.url(path))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap()
        .into_string()
        .unwrap();
    let mut usage = Value::Null;
    let mut texts: BTreeMap<usize, String> = BTreeMap::new();
    let mut reasons: BTreeMap<usize, String> = BTreeMap::new();
    let mut done = false;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
            *texts.entry(i).or_default() += piece.unwrap_or("");
            if let Some(r) = c["finish_reason"].as_str() {
                reasons.insert(i, r.to_string());
            }
        }
    }
    assert!(done, "no [DONE]: {text}");
    assert!(!usage.is_null(), "no usage chunk: {text}");
    t.add(&usage, &reasons.into_values().collect::<Vec<_>>());
    texts.into_values().collect()
}

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn completion(prompt: Value, max_tokens: usize) -> Value {
    json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true})
}

/// The per-request histograms: one observation per request each.
const PER_REQUEST: [&str; 9] = [
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_inference_time_seconds",
    "request_time_per_output_token_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "time_to_first_token_seconds",
];

#[test]
fn counters_add_up_to_what_the_clients_got() {
    let s = Server::start(&[]);
    s.chat("Hi", 2); // warm up, before the first scrape
    let before = scrape(&s);
    let mut t = Tally::default();

    call(
        &s,
        &mut t,
        "/v1/chat/completions",
        chat("Name three colors.", 8),
    );
    call_stream(&s, &mut t, "/v1/chat/completions", chat("Count to ten.", 6));
    let mut two = chat("Tell me a story.", 5);
    two["n"] = json!(2);
    two["temperature"] = json!(0.9);
    call(&s, &mut t, "/v1/chat/completions", two);
    // two prompts in one completions request: each prompt's tokens once
    call(
        &s,
        &mut t,
        "/v1/completions",
        completion(json!(["The sky is", "Water boils at"]), 4),
    );
    let mut two = completion(json!("Once upon a time"), 5);
    two["n"] = json!(2);
    call_stream(&s, &mut t, "/v1/completions", two);

    // a stop string that ends generation early, for two greedy choices at once
    let prompt = "The three primary colors are";
    let full = call(&s, &mut t, "/v1/completions", completion(json!(prompt), 24));
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 4, "{text:?}");
    let stop = words[words.len() / 3];
    let mut stopped = completion(json!(prompt), 24);
    stopped["stop"] = json!([stop]);
    stopped["n"] = json!(2);
    let v = call(&s, &mut t, "/v1/completions", stopped.clone());
    assert_eq!(finish_reasons(&v), ["stop", "stop"], "stop {stop:?}: {v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 48,
        "{v}"
    );
    stopped["n"] = json!(1);
    call_stream(&s, &mut t, "/v1/completions", stopped);

    // the same long prompt twice: the second is a prefix-cache hit
    let long = "The history of the bicycle spans more than two centuries. ".repeat(12);
    for _ in 0..2 {
        call(&s, &mut t, "/v1/completions", completion(json!(long), 3));
    }
    assert!(t.cached_tokens > 0, "no prefix-cache hit: {t:?}");

    let after = scrape(&s);
    let delta = |name: &str, with: &[(&str, &str)]| after.get(name, with) - before.get(name, with);
    eprintln!("{t:?}");
    for p in ["vllm:", "kojo:"] {
        let d = |name: &str| delta(&format!("{p}{name}"), &[]);
        assert_eq!(d("prompt_tokens_total"), t.prompt_tokens as f64, "{p}");
        assert_eq!(
            d("generation_tokens_total"),
            t.completion_tokens as f64,
            "{p}"
        );
        assert_eq!(
            d("request_prompt_tokens_sum"),
            t.prompt_tokens as f64,
            "{p}"
        );
        assert_eq!(
            d("request_generation_tokens_sum"),
            t.completion_tokens as f64,
            "{p}"
        );
        for h in PER_REQUEST {
            assert_eq!(d(&format!("{h}_count")), t.requests as f64, "{p}{h}");
        }
    }
    for reason in ["stop", "length"] {
        let want = t.reasons.get(reason).copied().unwrap_or(0) as f64;
        let with = [("finished_reason", reason)];
        assert_eq!(delta("vllm:request_success_total", &with), want, "{reason}");
        let with = [("outcome", reason)];
        assert_eq!(delta("kojo:requests_total", &with), want, "{reason}");
    }
    for reason in ["abort", "error"] {
        let with = [("finished_reason", reason)];
        assert_eq!(delta("vllm:request_success_total", &with), 0.0);
    }
}

#[test]
fn prefix_cache_counters_count_prompt_tokens() {
    let s = Server::start(&[]);
    let long = "A lighthouse keeper writes a letter every evening to the sea. ".repeat(10);
    let before = scrape(&s);
    let mut t = Tally::default();
    for _ in 0..3 {
        call(&s, &mut t, "/v1/completions", completion(json!(long), 2));
    }
    let after = scrape(&s);
    let delta = |name: &str| after.v(name) - before.v(name);
    assert!(t.cached_tokens > 0, "{t:?}");
    // vLLM's units: tokens looked up (each prompt, n = 1) and tokens found
    assert_eq!(
        delta("vllm:prefix_cache_queries_total"),
        t.prompt_tokens as f64
    );
    assert_eq!(
        delta("vllm:prefix_cache_hits_total"),
        t.cached_tokens as f64
    );
    // cached tokens are prompt tokens too
    assert_eq!(delta("vllm:prompt_tokens_total"), t.prompt_tokens as f64);
    assert!(delta("kojo:prefix_cache_block_hits_total") > 0.0);
}

/// vLLM's families and their types.
const VLLM_FAMILIES: [(&str, &str); 22] = [
    ("vllm:num_requests_running", "gauge"),
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:cache_config_info", "gauge"),
    ("vllm:prompt_tokens_total", "counter"),
    ("vllm:generation_tokens_total", "counter"),
    ("vllm:num_preemptions_total", "counter"),
    ("vllm:request_success_total", "counter"),
    ("vllm:prefix_cache_queries_total", "counter"),
    ("vllm:prefix_cache_hits_total", "counter"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:time_per_output_token_seconds", "histogram"),
    ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:request_time_per_output_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:request_queue_time_seconds", "histogram"),
    ("vllm:request_prefill_time_seconds", "histogram"),
    ("vllm:request_decode_time_seconds", "histogram"),
    ("vllm:request_inference_time_seconds", "histogram"),
    ("vllm:request_prompt_tokens", "histogram"),
    ("vllm:request_generation_tokens", "histogram"),
    ("vllm:iteration_tokens_total", "histogram"),
];

#[test]
fn vllm_names_types_and_labels() {
    let s = Server::start(&[]);
    let mut t = Tally::default();
    let v = call(
        &s,
        &mut t,
        "/v1/completions",
        completion(json!("Rivers flow to the"), 5),
    );
    let m = scrape(&s);

    let want: BTreeMap<String, String> = VLLM_FAMILIES
        .iter()
        .map(|(n, k)| (n.to_string(), k.to_string()))
        .collect();
    let got: BTreeMap<String, String> = m
        .types
        .iter()
        .filter(|(n, _)| n.starts_with("vllm:"))
        .map(|(n, k)| (n.clone(), k.clone()))
        .collect();
    assert_eq!(got, want);
    for (name, kind) in &m.types {
        // counters end in _total; of the rest only vLLM's histogram of step tokens does
        let total = name.ends_with("_total");
        let quirk = name == "vllm:iteration_tokens_total";
        assert_eq!(kind == "counter", total && !quirk, "{name} {kind}");
    }
    let histogram = |f: &str| m.types.get(f).is_some_and(|k| k == "histogram");
    for (name, labels, _) in &m.samples {
        assert_eq!(
            labels.get("model_name").map(String::as_str),
            Some(MODEL_ID),
            "{name} {labels:?}"
        );
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|f| histogram(f))
            .unwrap_or(name);
        assert!(m.types.contains_key(family), "{name} has no # TYPE");
    }

    // the Kubernetes gateway's prefix scorer reads these labels
    let info = m
        .samples
        .iter()
        .find(|(n, _, _)| n == "vllm:cache_config_info")
        .unwrap();
    assert_eq!(info.2, 1.0);
    assert_eq!(info.1["block_size"], "16");
    let blocks: f64 = info.1["num_gpu_blocks"].parse().unwrap();
    assert_eq!(blocks, m.v("kojo:kv_blocks_capacity"));
    assert!(blocks > 0.0);

    let reasons: BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|(n, _, _)| n == "vllm:request_success_total")
        .map(|(_, l, _)| l["finished_reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["stop", "length", "abort", "error", "repetition"])
    );
    assert_eq!(
        m.get(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        1.0
    );

    // vLLM's buckets, written as prometheus_client writes them
    let steps = [
        "1.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0", "1024.0", "2048.0",
        "4096.0", "8192.0", "16384.0", "+Inf",
    ];
    assert_eq!(m.bounds("vllm:iteration_tokens_total"), steps);
    let ttft = m.bounds("vllm:time_to_first_token_seconds");
    assert_eq!(ttft.first().unwrap(), "0.001");
    assert_eq!(ttft[ttft.len() - 2], "2560.0");
    assert_eq!(m.bounds("vllm:e2e_request_latency_seconds")[0], "0.3");
    assert_eq!(
        m.bounds("vllm:request_prompt_tokens")[..4],
        ["1.0", "2.0", "5.0", "10.0"]
    );
    for (name, kind) in &m.types {
        if kind != "histogram" {
            continue;
        }
        let le = m.bounds(name);
        assert_eq!(le.last().map(String::as_str), Some("+Inf"), "{name}");
        let bounds: Vec<f64> = le
            .iter()
            .map(|b| b.replace("+Inf", "inf").parse().unwrap())
            .collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{name}: {le:?}");
        let counts: Vec<f64> = m
            .samples
            .iter()
            .filter(|(n, _, _)| *n == format!("{name}_bucket"))
            .map(|s| s.2)
            .collect();
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{name} not cumulative"
        );
        assert_eq!(
            *counts.last().unwrap(),
            m.v(&format!("{name}_count")),
            "{name}"
        );
    }

    // one request alone on the server: its prompt (less the cached part) and each generated
    // token but the last went through the engine's steps
    let u = &v["usage"];
    let computed = u["prompt_tokens"].as_u64().unwrap()
        - u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
        + u["completion_tokens"].as_u64().unwrap()
        - 1;
    assert_eq!(m.v("vllm:iteration_tokens_total_sum"), computed as f64);
    assert_eq!(m.v("kojo:iteration_tokens_sum"), computed as f64);
    assert_eq!(m.v("vllm:prompt_tokens_total"), t.prompt_tokens as f64);
    assert_eq!(m.v("vllm:generation_tokens_total"), 5.0);
}

/// The lint problems promtool reports that are vLLM's own naming: the `vllm:` prefix (promtool
/// keeps colons for recording rules) and `vllm:iteration_tokens_total`, a histogram.
fn accepted(problem: &str) -> bool {
    problem.ends_with("metric names should not contain ':'")
        || problem
            == "vllm:iteration_tokens_total non-counter metrics should not have \"_total\" suffix"
}

#[test]
fn promtool_accepts_the_exposition() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    if Command::new(&promtool).arg("--version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("promtool is missing (install Debian's prometheus package: scripts/test does)");
        }
        eprintln!("\n!!!!! SKIPPED: promtool is missing; `apt-get install prometheus` !!!!!\n");
        return;
    }
    let s = Server::start(&[]);
    let mut t = Tally::default();
    call(&s, &mut t, "/v1/chat/completions", chat("Hello there.", 4));
    call_stream(&s, &mut t, "/v1/completions", completion(json!("A cat"), 3));
    let m = scrape(&s);
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(m.text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    eprintln!("promtool: {}\n{report}", out.status);
    // 0: clean; 3: lint problems only (1 would be text it cannot parse)
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool could not parse /metrics: {report}\n{}",
        m.text
    );
    let problems: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    let rejected: Vec<&&str> = problems.iter().filter(|p| !accepted(p)).collect();
    assert!(rejected.is_empty(), "promtool: {rejected:#?}");
    // the two accepted kinds do show up: promtool did read every family
    assert!(problems
        .iter()
        .any(|p| p.starts_with("vllm:prompt_tokens_total ")));
}
