//! `kojo bench-serve`: a load generator for any OpenAI-compatible server (kojo, llama-server,
//! vLLM). Streams `/v1/completions` at each concurrency level and reports TTFT p50/p90,
//! inter-token latency p50, per-stream and aggregate output tokens per second.
//!
//! It speaks plain HTTP/1.1 over a TCP socket and reads the SSE events as they arrive; one
//! content event is counted as one token unless the server reports usage at the end.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchServeArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000
    #[arg(long)]
    pub url: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Model id to send (default: the server's first /v1/models entry).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(
        long,
        default_value = "Write a detailed essay about the history of bicycles."
    )]
    pub prompt: String,
    #[arg(long)]
    pub api_key: Option<String>,
    /// A JSON object merged into every request body (e.g. `{"guided_json": {...}}` to time
    /// constrained decoding).
    #[arg(long)]
    pub extra_body: Option<String>,
    #[arg(long)]
    pub json: bool,
}

struct Sample {
    ttft: f64,
    itl: Vec<f64>,
    tokens: usize,
    /// seconds from the first token to the last
    gen_time: f64,
}

fn host_port(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let hp = rest.split('/').next().unwrap_or(rest);
    Ok(if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:80")
    })
}

fn request(
    hp: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Result<TcpStream> {
    let mut s = TcpStream::connect(hp).with_context(|| format!("connecting to {hp}"))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {hp}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    Ok(s)
}

fn model_id(hp: &str, key: Option<&str>) -> Result<String> {
    let s = request(hp, "GET", "/v1/models", None, key)?;
    let mut text = String::new();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while r.read_line(&mut line)? > 0 {
        text += &line;
        line.clear();
    }
    let start = text.find('{').context("no JSON in the /v1/models answer")?;
    let end = text
        .rfind('}')
        .context("no JSON in the /v1/models answer")?;
    let v: Value = serde_json::from_str(&text[start..=end])?;
    Ok(v["data"][0]["id"]
        .as_str()
        .context("no model in /v1/models")?
        .to_string())
}

fn one(hp: &str, body: &str, key: Option<&str>) -> Result<Sample> {
    let t0 = Instant::now();
    let s = request(hp, "POST", "/v1/completions", Some(body), key)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let (mut times, mut usage_tokens) = (Vec::new(), None);
    r.read_line(&mut line)?;
    if !line.contains(" 200") {
        bail!("server answered {}", line.trim());
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage_tokens = Some(n as usize);
        }
        if v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    if times.is_empty() {
        bail!("no tokens streamed");
    }
    let itl = times.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Sample {
        ttft: times[0],
        itl,
        tokens: usage_tokens.unwrap_or(times.len()),
        gen_time: times[times.len() - 1] - times[0],
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: BenchServeArgs) -> Result<()> {
    let hp = host_port(&a.url)?;
    let key = a.api_key.as_deref();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => model_id(&hp, key)?,
    };
    let mut body = json!({"model": model, "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true});
    if let Some(extra) = &a.extra_body {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(extra) else {
            bail!("--extra-body must be a JSON object");
        };
        for (k, v) in m {
            body[k] = v;
        }
    }
    let body = body.to_string();
    let mut rows = Vec::new();
    if !a.json {
        println!("| concurrency | requests | TTFT p50 (s) | TTFT p90 (s) | ITL p50 (ms) | tok/s per stream | tok/s aggregate |");
        println!("|---|---|---|---|---|---|---|");
    }
    for &c in &a.concurrency {
        if c == 0 {
            bail!("concurrency must be at least 1");
        }
        let next = AtomicUsize::new(0);
        let samples = Mutex::new(Vec::new());
        let errors = Mutex::new(Vec::new());
        let t = Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..c {
                sc.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < a.requests {
                        match one(&hp, &body, key) {
                            Ok(s) => samples.lock().unwrap().push(s),
                            Err(e) => errors.lock().unwrap().push(e.to_string()),
                        }
                    }
                });
            }
        });
        let wall = t.elapsed().as_secs_f64();
        let samples = samples.into_inner().unwrap();
        let errors = errors.into_inner().unwrap();
        if let Some(e) = errors.first() {
            bail!(
                "{} of {} requests failed at concurrency {c}: {e}",
                errors.len(),
                a.requests
            );
        }
        let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
        let mut per: Vec<f64> = samples
            .iter()
            .filter(|s| s.gen_time > 0.0)
            .map(|s| (s.tokens - 1) as f64 / s.gen_time)
            .collect();
        let total: usize = samples.iter().map(|s| s.tokens).sum();
        let row = json!({
            "concurrency": c, "requests": samples.len(),
            "ttft_p50_s": pct(&mut ttft, 0.5), "ttft_p90_s": pct(&mut ttft, 0.9),
            "itl_p50_ms": pct(&mut itl, 0.5) * 1000.0,
            "per_stream_tok_s": pct(&mut per, 0.5),
            "aggregate_tok_s": total as f64 / wall,
        });
        if !a.json {
            // a figure there is none of (one token per request: no inter-token latency) is "-"
            let f = |k: &str, digits: usize| {
                row[k]
                    .as_f64()
                    .map_or("-".to_string(), |v| format!("{v:.digits$}"))
            };
            println!(
                "| {c} | {} | {} | {} | {} | {} | {} |",
                samples.len(),
                f("ttft_p50_s", 3),
                f("ttft_p90_s", 3),
                f("itl_p50_ms", 1),
                f("per_stream_tok_s", 1),
                f("aggregate_tok_s", 1)
            );
        }
        rows.push(row);
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"url": a.url, "model": model, "max_tokens": a.max_tokens, "results": rows})
            )?
        );
    }
    Ok(())
}
