//! Counters, gauges and histograms shared by the engine thread (the scheduler's gauges, the
//! preemption and per-step counts) and the HTTP side (what each request was given back, its
//! outcome and timings), rendered in Prometheus' text format 0.0.4 under kojo's names and under
//! vLLM's, so dashboards, alerts, autoscalers and the Kubernetes inference gateway written for
//! vLLM work unchanged.
//!
//! The text is what Python's `prometheus_client` (which vLLM uses) writes: a counter's family
//! and sample are both named with `_total`; histogram samples `_bucket` (cumulative, `le` last
//! in label order as the labels are sorted), `_count`, `_sum`; numbers as Go would print them
//! (`1.0`, `0.001`, `1e+06`, `+Inf`). Every sample carries `model_name`. Not written: the
//! `_created` series and the `engine` label, which nothing charts.
//!
//! Meanings, each vLLM's (`vllm/v1/metrics/loggers.py`, `stats.py`):
//! - `prompt_tokens_total`: each request's prompts once, cached tokens included, when the
//!   prompt is first scheduled (a recompute after a preemption is not counted again, nor `n`).
//! - `generation_tokens_total`: the tokens the clients were given: the sum of
//!   `usage.completion_tokens`.
//! - `prefix_cache_queries_total` / `_hits_total`: prompt tokens looked up in the prefix cache
//!   when a sequence is first scheduled, and those found (kojo's block counts are
//!   `kojo:prefix_cache_block_*`).
//! - `request_*` histograms and `e2e_request_latency_seconds`: once per finished request.
//! - `iteration_tokens_total`: a histogram of the tokens each engine step computes.

use crate::model::session::BLOCK_SIZE;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// A histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramState>,
}

struct HistogramState {
    /// `[bounds]` observations in each bucket alone (not cumulative); empty until the first one
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramState {
                counts: Vec::new(),
                sum: 0.0,
                count: 0,
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.counts.is_empty() {
            g.counts = vec![0; self.bounds.len()];
        }
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            g.counts[i] += 1;
        }
        g.sum += v;
        g.count += 1;
    }

    /// The samples (no `# HELP`/`# TYPE`); `labels` are the ones sorted before `le`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += g.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\",{labels}}} {}",
                go_float(*b),
                go_float(acc as f64)
            );
        }
        let count = go_float(g.count as f64);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\",{labels}}} {count}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", go_float(g.sum));
    }
}

/// A number as `prometheus_client` writes it (Python's `repr`, with Go's switch to an exponent
/// past six integer digits): `1.0`, `0.25`, `100000.0`, `1e+06`, `+Inf`.
pub fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let s = format!("{v:?}");
    match s.find('.') {
        Some(dot) if v > 0.0 && dot > 6 => {
            let digits = format!("{}.{}{}", &s[..1], &s[1..dot], &s[dot + 1..]);
            let mantissa = digits.trim_end_matches(['0', '.']);
            format!("{mantissa}e+0{}", dot - 1)
        }
        _ => s,
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// Upper bounds, each vLLM's for the same metric.
const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const PER_TOKEN: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_TIME: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const STEP_TOKENS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// vLLM's 1-2-5 series stops at `max_model_len`; this one at a million, past any context.
const REQUEST_TOKENS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5,
    5e5, 1e6,
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

/// Request outcomes counted by `kojo:requests_total{outcome=...}`.
pub const OUTCOMES: [&str; 6] = ["stop", "length", "abort", "error", "rejected", "invalid"];

/// vLLM's `finished_reason` values (`FINISH_REASON_STRINGS`); the first four are also the first
/// four `OUTCOMES`; kojo never stops for repetition.
const FINISHED_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

pub struct Metrics {
    pub model_name: String,
    pub waiting: Gauge,
    /// Prompt tokens of the waiting requests (admission control bounds it).
    pub waiting_tokens: Gauge,
    pub running: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_total: Gauge,
    /// KV blocks looked up in the prefix cache, and found (the scheduler's pool counts).
    pub prefix_queries: Gauge,
    pub prefix_hits: Gauge,
    /// Prompt tokens looked up in the prefix cache at a sequence's first schedule, and found.
    pub prefix_query_tokens: Gauge,
    pub prefix_hit_tokens: Gauge,
    pub preemptions: Gauge,
    /// Each request's prompt tokens, once per prompt.
    pub prompt_tokens: Gauge,
    /// Tokens given to the clients.
    pub generation_tokens: Gauge,
    /// `[OUTCOMES]`
    pub outcomes: [Gauge; 6],
    pub ttft: Histogram,
    /// Between two tokens of one choice.
    pub itl: Histogram,
    /// Per request: arrival to the first schedule.
    pub queue_time: Histogram,
    /// Per request: the first schedule to the first token.
    pub prefill_time: Histogram,
    /// Per request: the first token to the last.
    pub decode_time: Histogram,
    /// Per request: the first schedule to the last token.
    pub inference_time: Histogram,
    /// Per request: decode time over the tokens after the first, a mean over its choices.
    pub request_tpot: Histogram,
    pub e2e: Histogram,
    /// Per request: its prompt tokens, its generated tokens.
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    /// Tokens computed by each engine step (prompt chunks and decodes together).
    pub iteration_tokens: Histogram,
    /// `kojo:tenant_*`, by tenant name
    tenants: Mutex<BTreeMap<String, TenantSeries>>,
}

/// One tenant's series: the engine's gauges (its sequences waiting and running, its virtual
/// token counter) and the HTTP side's counters (its requests by outcome, its tokens).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TenantSeries {
    pub waiting: u64,
    pub running: u64,
    pub vtc: f64,
    /// `[OUTCOMES]`
    pub outcomes: [u64; 6],
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

/// Which series a family renders from.
enum Source<'a> {
    Gauge(f64),
    Counter(f64),
    Histogram(&'a Histogram),
}

/// One family: the name after the prefix (counters without `_total`), help, source.
type Family<'a> = (&'static str, &'static str, Source<'a>);

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
            prefix_query_tokens: Gauge::default(),
            prefix_hit_tokens: Gauge::default(),
            preemptions: Gauge::default(),
            prompt_tokens: Gauge::default(),
            generation_tokens: Gauge::default(),
            outcomes: Default::default(),
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(PER_TOKEN),
            queue_time: Histogram::new(REQUEST_TIME),
            prefill_time: Histogram::new(REQUEST_TIME),
            decode_time: Histogram::new(REQUEST_TIME),
            inference_time: Histogram::new(REQUEST_TIME),
            request_tpot: Histogram::new(PER_TOKEN),
            e2e: Histogram::new(REQUEST_TIME),
            request_prompt_tokens: Histogram::new(REQUEST_TOKENS),
            request_generation_tokens: Histogram::new(REQUEST_TOKENS),
            iteration_tokens: Histogram::new(STEP_TOKENS),
            tenants: Mutex::new(BTreeMap::new()),
        }
    }

    /// Change `tenant`'s series.
    fn tenant(&self, tenant: &str, f: impl FnOnce(&mut TenantSeries)) {
        let mut g = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(tenant) {
            Some(t) => f(t),
            None => f(g.entry(tenant.to_string()).or_default()),
        }
    }

    /// A copy of `tenant`'s series.
    pub fn tenant_series(&self, tenant: &str) -> Option<TenantSeries> {
        let g = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        g.get(tenant).cloned()
    }

    pub fn tenant_outcome(&self, tenant: &str, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.tenant(tenant, |t| t.outcomes[i] += 1);
        }
    }

    pub fn tenant_tokens(&self, tenant: &str, prompt: u64, generation: u64) {
        self.tenant(tenant, |t| {
            t.prompt_tokens += prompt;
            t.generation_tokens += generation;
        });
    }

    /// The engine's per-tenant gauges: the tenant of each waiting and each running sequence,
    /// and every tenant's virtual token counter.
    pub fn publish_tenants<'a>(
        &self,
        waiting: impl Iterator<Item = &'a str>,
        running: impl Iterator<Item = &'a str>,
        counters: impl Iterator<Item = (&'a str, f64)>,
    ) {
        let mut g = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        for t in g.values_mut() {
            t.waiting = 0;
            t.running = 0;
        }
        fn at<'m>(g: &'m mut BTreeMap<String, TenantSeries>, name: &str) -> &'m mut TenantSeries {
            if !g.contains_key(name) {
                g.insert(name.to_string(), TenantSeries::default());
            }
            g.get_mut(name).unwrap()
        }
        for w in waiting {
            at(&mut g, w).waiting += 1;
        }
        for r in running {
            at(&mut g, r).running += 1;
        }
        for (name, c) in counters {
            at(&mut g, name).vtc = c;
        }
    }

    pub fn outcome(&self, name: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == name) {
            self.outcomes[i].add(1);
        }
    }

    /// The families both prefixes have.
    fn families(&self) -> Vec<Family<'_>> {
        let total = self.kv_blocks_total.get().max(1) as f64;
        let usage = self.kv_blocks_used.get() as f64 / total;
        let c = |g: &Gauge| Source::Counter(g.get() as f64);
        use Source::Histogram as H;
        vec![
            (
                "num_requests_running",
                "Number of requests in model execution batches.",
                Source::Gauge(self.running.get() as f64),
            ),
            (
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
                Source::Gauge(self.waiting.get() as f64),
            ),
            (
                "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                Source::Gauge(usage),
            ),
            (
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                c(&self.prefix_query_tokens),
            ),
            (
                "prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                c(&self.prefix_hit_tokens),
            ),
            (
                "num_preemptions",
                "Cumulative number of preemption from the engine.",
                c(&self.preemptions),
            ),
            (
                "prompt_tokens",
                "Number of prefill tokens processed.",
                c(&self.prompt_tokens),
            ),
            (
                "generation_tokens",
                "Number of generation tokens processed.",
                c(&self.generation_tokens),
            ),
            (
                "request_prompt_tokens",
                "Number of prefill tokens processed.",
                H(&self.request_prompt_tokens),
            ),
            (
                "request_generation_tokens",
                "Number of generation tokens processed.",
                H(&self.request_generation_tokens),
            ),
            (
                "time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                H(&self.ttft),
            ),
            (
                "inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                H(&self.itl),
            ),
            (
                "request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                H(&self.request_tpot),
            ),
            (
                "e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                H(&self.e2e),
            ),
            (
                "request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                H(&self.queue_time),
            ),
            (
                "request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                H(&self.inference_time),
            ),
            (
                "request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                H(&self.prefill_time),
            ),
            (
                "request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                H(&self.decode_time),
            ),
        ]
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let m = format!("model_name=\"{}\"", escape(&self.model_name));
        let kojo_only: Vec<Family<'_>> = vec![
            (
                "iteration_tokens",
                "Tokens computed by each engine step.",
                Source::Histogram(&self.iteration_tokens),
            ),
            (
                "kv_blocks_used",
                "KV-cache blocks in use.",
                Source::Gauge(self.kv_blocks_used.get() as f64),
            ),
            (
                "kv_blocks_capacity",
                "KV-cache blocks in the pool.",
                Source::Gauge(self.kv_blocks_total.get() as f64),
            ),
            (
                "prefix_cache_block_queries",
                "KV blocks looked up in the prefix cache.",
                Source::Counter(self.prefix_queries.get() as f64),
            ),
            (
                "prefix_cache_block_hits",
                "KV blocks found in the prefix cache.",
                Source::Counter(self.prefix_hits.get() as f64),
            ),
        ];
        let vllm_only: Vec<Family<'_>> = vec![
            // vLLM's name, though a histogram: kept so that its dashboards find it
            (
                "iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                Source::Histogram(&self.iteration_tokens),
            ),
            (
                "time_per_output_token_seconds",
                "Seconds between two tokens (the old name of inter_token_latency_seconds).",
                Source::Histogram(&self.itl),
            ),
        ];
        for (prefix, extra) in [("kojo:", kojo_only), ("vllm:", vllm_only)] {
            for (name, help, src) in self.families().into_iter().chain(extra) {
                render_family(&mut s, &format!("{prefix}{name}"), help, &src, &m);
            }
        }
        let _ = writeln!(
            s,
            "# HELP kojo:requests_total Finished requests by outcome.\n\
             # TYPE kojo:requests_total counter"
        );
        for (i, o) in OUTCOMES.iter().enumerate() {
            let v = go_float(self.outcomes[i].get() as f64);
            let _ = writeln!(s, "kojo:requests_total{{{m},outcome=\"{o}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n\
             # TYPE vllm:request_success_total counter"
        );
        for r in FINISHED_REASONS {
            let n = OUTCOMES
                .iter()
                .position(|o| *o == r)
                .map_or(0, |i| self.outcomes[i].get());
            let v = go_float(n as f64);
            let _ = writeln!(
                s,
                "vllm:request_success_total{{finished_reason=\"{r}\",{m}}} {v}"
            );
        }
        self.render_tenants(&mut s, &m);
        let blocks = self.kv_blocks_total.get();
        if blocks > 0 {
            // an info metric, as vLLM writes it once the engine knows its KV cache
            let labels = format!(
                "block_size=\"{BLOCK_SIZE}\",enable_prefix_caching=\"True\",{m},\
                 num_gpu_blocks=\"{blocks}\""
            );
            let _ = writeln!(
                s,
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
                 # TYPE vllm:cache_config_info gauge\n\
                 vllm:cache_config_info{{{labels}}} 1.0"
            );
        }
        s
    }
}

impl Metrics {
    /// `kojo:tenant_*`: a series per tenant seen (labels `model_name`, `outcome`, `tenant`).
    fn render_tenants(&self, s: &mut String, m: &str) {
        let g = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "# HELP kojo:tenant_requests_total Finished requests by tenant and outcome.\n\
             # TYPE kojo:tenant_requests_total counter"
        );
        for (name, t) in g.iter() {
            for (i, o) in OUTCOMES.iter().enumerate() {
                let v = go_float(t.outcomes[i] as f64);
                let n = escape(name);
                let _ = writeln!(
                    s,
                    "kojo:tenant_requests_total{{{m},outcome=\"{o}\",tenant=\"{n}\"}} {v}"
                );
            }
        }
        type Get = fn(&TenantSeries) -> f64;
        let families: [(&str, &str, &str, Get); 5] = [
            (
                "tenant_prompt_tokens_total",
                "counter",
                "Prompt tokens of the tenant's requests, once per prompt.",
                |t| t.prompt_tokens as f64,
            ),
            (
                "tenant_generation_tokens_total",
                "counter",
                "Tokens given to the tenant's clients.",
                |t| t.generation_tokens as f64,
            ),
            (
                "tenant_num_requests_waiting",
                "gauge",
                "The tenant's sequences waiting.",
                |t| t.waiting as f64,
            ),
            (
                "tenant_num_requests_running",
                "gauge",
                "The tenant's sequences running.",
                |t| t.running as f64,
            ),
            (
                "tenant_vtc",
                "gauge",
                "The tenant's virtual token counter (weighted service received).",
                |t| t.vtc,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(s, "# HELP kojo:{name} {help}\n# TYPE kojo:{name} {kind}");
            for (tenant, t) in g.iter() {
                let v = go_float(get(t));
                let n = escape(tenant);
                let _ = writeln!(s, "kojo:{name}{{{m},tenant=\"{n}\"}} {v}");
            }
        }
    }
}

fn render_family(s: &mut String, name: &str, help: &str, src: &Source<'_>, labels: &str) {
    let (name, kind) = match src {
        Source::Gauge(_) => (name.to_string(), "gauge"),
        Source::Counter(_) => (format!("{name}_total"), "counter"),
        Source::Histogram(_) => (name.to_string(), "histogram"),
    };
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    match src {
        Source::Gauge(v) | Source::Counter(v) => {
            let _ = writeln!(s, "{name}{{{labels}}} {}", go_float(*v));
        }
        Source::Histogram(h) => h.render(s, &name, labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_prometheus_client_writes_them() {
        let cases = [
            (1.0, "1.0"),
            (0.001, "0.001"),
            (0.25, "0.25"),
            (7680.0, "7680.0"),
            (100000.0, "100000.0"),
            (1e6, "1e+06"),
            (12345678.0, "1.2345678e+07"),
            (0.0, "0.0"),
            (f64::INFINITY, "+Inf"),
        ];
        for (v, want) in cases {
            assert_eq!(go_float(v), want, "{v}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_count_and_sum() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 9.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "model_name=\"m\"");
        assert_eq!(
            s,
            "x_bucket{le=\"1.0\",model_name=\"m\"} 1.0\n\
             x_bucket{le=\"2.0\",model_name=\"m\"} 3.0\n\
             x_bucket{le=\"+Inf\",model_name=\"m\"} 4.0\n\
             x_count{model_name=\"m\"} 4.0\n\
             x_sum{model_name=\"m\"} 12.5\n"
        );
    }

    #[test]
    fn counters_end_in_total_and_every_sample_names_the_model() {
        let m = Metrics::new("a \"b\"");
        m.prompt_tokens.add(7);
        m.kv_blocks_total.set(3);
        let text = m.render();
        assert!(text.contains("# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"a \\\"b\\\"\"} 7.0\n"));
        assert!(text.contains(&format!(
            "vllm:cache_config_info{{block_size=\"{BLOCK_SIZE}\",enable_prefix_caching=\"True\",\
             model_name=\"a \\\"b\\\"\",num_gpu_blocks=\"3\"}} 1.0\n"
        )));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("model_name=\"a \\\"b\\\"\""), "{line}");
        }
    }
}
