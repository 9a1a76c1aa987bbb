//! Counters, gauges and histograms shared by the engine thread (writer of the gauges) and the
//! HTTP side (request outcomes, latencies), rendered in Prometheus' text format under kojo's
//! names and under vLLM's, so dashboards, autoscalers and the Kubernetes inference gateway that
//! read vLLM's metrics work unchanged.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new((Vec::new(), 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.is_empty() {
            g.0 = vec![0; self.bounds.len()];
        }
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let c = g.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            g.2, g.1, g.2
        );
    }
}

const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

#[derive(Default)]
pub struct Gauge(AtomicU64);
impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn add(&self, v: u64) {
        self.0.fetch_add(v, Relaxed);
    }
}

/// Request outcomes counted by `kojo_requests_total{outcome=...}`.
pub const OUTCOMES: [&str; 6] = ["stop", "length", "abort", "error", "rejected", "invalid"];

pub struct Metrics {
    pub model_name: String,
    pub waiting: Gauge,
    /// Prompt tokens of the waiting requests (admission control bounds it).
    pub waiting_tokens: Gauge,
    pub running: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_total: Gauge,
    pub prefix_queries: Gauge,
    pub prefix_hits: Gauge,
    pub preemptions: Gauge,
    pub prompt_tokens: Gauge,
    pub generation_tokens: Gauge,
    pub outcomes: [Gauge; 6],
    pub ttft: Histogram,
    pub itl: Histogram,
    pub queue_time: Histogram,
    pub e2e: Histogram,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        Metrics {
            model_name: model_name.to_string(),
            waiting: Gauge::default(),
            waiting_tokens: Gauge::default(),
            running: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            prefix_queries: Gauge::default(),
            prefix_hits: Gauge::default(),
            preemptions: Gauge::default(),
            prompt_tokens: Gauge::default(),
            generation_tokens: Gauge::default(),
            outcomes: Default::default(),
            ttft: Histogram::new(LATENCY),
            itl: Histogram::new(LATENCY),
            queue_time: Histogram::new(LATENCY),
            e2e: Histogram::new(LATENCY),
        }
    }

    pub fn outcome(&self, name: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == name) {
            self.outcomes[i].add(1);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let m = format!("model_name=\"{}\"", self.model_name.replace('"', "'"));
        let gauge = |s: &mut String, name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{m}}} {v}"
            );
        };
        let total = self.kv_blocks_total.get().max(1) as f64;
        let usage = self.kv_blocks_used.get() as f64 / total;
        for (prefix, vllm) in [("kojo:", false), ("vllm:", true)] {
            let n = |x: &str| format!("{prefix}{x}");
            gauge(
                &mut s,
                &n("num_requests_waiting"),
                "gauge",
                "Requests waiting to be scheduled.",
                self.waiting.get() as f64,
            );
            gauge(
                &mut s,
                &n("num_requests_running"),
                "gauge",
                "Requests in the running batch.",
                self.running.get() as f64,
            );
            gauge(
                &mut s,
                &n("kv_cache_usage_perc"),
                "gauge",
                "Fraction of KV-cache blocks in use (1 = full).",
                usage,
            );
            gauge(
                &mut s,
                &n("prefix_cache_queries"),
                "counter",
                "KV blocks looked up in the prefix cache.",
                self.prefix_queries.get() as f64,
            );
            gauge(
                &mut s,
                &n("prefix_cache_hits"),
                "counter",
                "KV blocks found in the prefix cache.",
                self.prefix_hits.get() as f64,
            );
            gauge(
                &mut s,
                &n("num_preemptions"),
                "counter",
                "Sequences preempted (recomputed later) for KV space.",
                self.preemptions.get() as f64,
            );
            gauge(
                &mut s,
                &n("prompt_tokens"),
                "counter",
                "Prompt tokens processed.",
                self.prompt_tokens.get() as f64,
            );
            gauge(
                &mut s,
                &n("generation_tokens"),
                "counter",
                "Tokens generated.",
                self.generation_tokens.get() as f64,
            );
            self.ttft.render(
                &mut s,
                &n("time_to_first_token_seconds"),
                "Time to first token.",
            );
            self.itl.render(
                &mut s,
                &n("inter_token_latency_seconds"),
                "Time between tokens of a stream.",
            );
            self.queue_time.render(
                &mut s,
                &n("request_queue_time_seconds"),
                "Time spent waiting before the first schedule.",
            );
            self.e2e.render(
                &mut s,
                &n("e2e_request_latency_seconds"),
                "Request latency, arrival to finish.",
            );
            if !vllm {
                gauge(
                    &mut s,
                    "kojo:kv_blocks_used",
                    "gauge",
                    "KV-cache blocks in use.",
                    self.kv_blocks_used.get() as f64,
                );
                gauge(
                    &mut s,
                    "kojo:kv_blocks_total",
                    "gauge",
                    "KV-cache blocks in the pool.",
                    self.kv_blocks_total.get() as f64,
                );
                let _ = writeln!(s, "# HELP kojo:requests_total Finished requests by outcome.\n# TYPE kojo:requests_total counter");
                for (i, o) in OUTCOMES.iter().enumerate() {
                    let _ = writeln!(
                        s,
                        "kojo:requests_total{{{m},outcome=\"{o}\"}} {}",
                        self.outcomes[i].get()
                    );
                }
            }
        }
        s
    }
}
