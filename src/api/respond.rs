//! One request's choices: submit them to the engine, turn their token events into text (whole
//! UTF-8 characters, stop strings held back and never sent), and shape the OpenAI bodies and
//! SSE chunks for chat and legacy completions.

use super::error::ApiError;
use super::wire::ValidParams;
use crate::engine::metrics::Metrics;
use crate::engine::{EngineHandle, EngineRequest, EngineStatus, Event, Finish, TokenLogprob};
use crate::sampling::stop::StopMatcher;
use crate::structured::tools::{ToolCallParser, ToolDelta, ToolOutput};
use crate::structured::Constraint;
use crate::tenancy::fair::Share;
use crate::tenancy::Account;
use crate::tokenizer::stream::drain_utf8;
use crate::tokenizer::Tokenizer;
use crate::usage::{self, Ledger as UsageLedger, Row};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Everything one request needs besides its prompts.
pub struct Job {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub params: ValidParams,
    /// `[prompts]` token ids
    pub prompts: Vec<Vec<u32>>,
    /// `[prompts]` prompt text to put before the output (`echo`)
    pub echo: Option<Vec<String>>,
    pub max_model_len: usize,
    pub arrived: Instant,
    /// the grammar every choice starts from (each gets its own copy)
    pub constraint: Option<Constraint>,
    /// the output is read for tool calls (`tools` offered, `tool_choice` not none)
    pub tool_calls: bool,
    /// prefix-cache key (the tenant's; 0 = shared)
    pub cache_salt: u64,
    /// whose request it is, for the scheduler's fair share and priority
    pub share: Share,
    /// the tenant's concurrency slot, held until the response ends
    pub slot: Option<crate::tenancy::Slot>,
    /// who pays: the tenant, its tpm account, the usage ledger
    pub bill: Bill,
}

/// What a finished request is charged to: its tenant's name (metrics and the usage ledger),
/// its tokens-per-minute account, the ledger its row goes to.
pub struct Bill {
    pub tenant: Arc<str>,
    pub account: Option<Account>,
    pub ledger: Option<Arc<UsageLedger>>,
    /// the client's `X-Request-Id`
    pub client_request_id: Option<String>,
    /// milliseconds since the Unix epoch
    pub received_ms: i64,
}

impl Default for Bill {
    fn default() -> Self {
        Bill {
            tenant: Arc::from("default"),
            account: None,
            ledger: None,
            client_request_id: None,
            received_ms: usage::now_ms(),
        }
    }
}

impl Job {
    /// The id of choice `i`'s call `k` (stable across stream and whole responses).
    fn call_id(&self, i: usize, k: usize) -> String {
        let suffix = self.id.rsplit('-').next().unwrap_or("");
        format!("call_{suffix}_{i}_{k}")
    }
}

pub const FINGERPRINT: &str = concat!("kojo-", env!("CARGO_PKG_VERSION"));

/// Text, finish and log-probabilities of one choice as its events arrive.
struct Choice {
    index: usize,
    pending: Vec<u8>,
    stop: StopMatcher,
    text: String,
    tokens: usize,
    finish: Option<&'static str>,
    /// chat: `logprobs.content` entries; completions: (token, logprob, top, offset)
    logprobs: Vec<Value>,
    offset: usize,
    /// reads tool calls out of the text (tool requests only)
    tools: Option<ToolCallParser>,
    /// content and calls summed from the parser's deltas
    parsed: ToolOutput,
    /// the parser's deltas not yet streamed
    deltas: Vec<ToolDelta>,
}

impl Choice {
    fn new(index: usize, stop: &[String], tools: bool) -> Self {
        Choice {
            index,
            pending: Vec::new(),
            stop: StopMatcher::new(stop),
            text: String::new(),
            tokens: 0,
            finish: None,
            logprobs: Vec::new(),
            offset: 0,
            tools: tools.then(ToolCallParser::new),
            parsed: ToolOutput::default(),
            deltas: Vec::new(),
        }
    }

    /// Text that became final: to the tool-call parser, if there is one (`end`: the output
    /// ended, so what it held back is decided too).
    fn route(&mut self, text: &str, end: bool) {
        let Some(p) = &mut self.tools else { return };
        let mut d = p.push(text);
        if end {
            d.extend(p.finish());
        }
        for x in &d {
            self.parsed.apply(x);
        }
        self.deltas.extend(d);
    }

    /// The finish reason: a tool request that ended on its own after a whole call ends in
    /// `tool_calls`.
    fn reason(&self, reason: &'static str) -> &'static str {
        match &self.tools {
            Some(p) if reason == "stop" && p.complete_calls() > 0 => "tool_calls",
            _ => reason,
        }
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let mut b = Vec::new();
    tok.token_bytes(id, false, &mut b);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

fn logprob_entry(kind: Kind, tok: &Tokenizer, id: u32, lp: &TokenLogprob, offset: usize) -> Value {
    let (text, bytes) = token_text(tok, id);
    match kind {
        Kind::Chat => json!({
            "token": text,
            "logprob": lp.logprob,
            "bytes": bytes,
            "top_logprobs": lp.top.iter().map(|&(t, l)| {
                let (tt, tb) = token_text(tok, t);
                json!({"token": tt, "logprob": l, "bytes": tb})
            }).collect::<Vec<_>>(),
        }),
        Kind::Completion => {
            let mut top = serde_json::Map::new();
            for &(t, l) in &lp.top {
                top.insert(token_text(tok, t).0, json!(l));
            }
            json!({"token": text, "logprob": lp.logprob, "top": top, "offset": offset})
        }
    }
}

/// What happened to one choice on one event.
enum Step {
    /// New text (may be empty).
    Text(String, Option<Value>),
    /// Finished: trailing text, finish reason.
    Finished(String, &'static str),
    Error(String),
}

impl Choice {
    fn on_event(&mut self, kind: Kind, tok: &Tokenizer, ev: Event) -> Option<Step> {
        match ev {
            Event::Scheduled { .. } => None,
            Event::Token { id, logprob } => {
                self.tokens += 1;
                tok.token_bytes(id, false, &mut self.pending);
                let lp = logprob.map(|lp| logprob_entry(kind, tok, id, &lp, self.offset));
                let pushed = self.stop.push(&drain_utf8(&mut self.pending));
                self.offset += pushed.emit.len();
                self.text += &pushed.emit;
                if let Some(lp) = &lp {
                    self.logprobs.push(lp.clone());
                }
                let stopped = pushed.stopped.is_some();
                self.route(&pushed.emit, stopped);
                if stopped {
                    let reason = self.reason("stop");
                    self.finish = Some(reason);
                    return Some(Step::Finished(pushed.emit, reason));
                }
                Some(Step::Text(pushed.emit, lp))
            }
            Event::Done { finish, .. } => {
                let rest = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
                let pushed = self.stop.push(&rest);
                let mut tail = pushed.emit;
                let reason = if pushed.stopped.is_some() {
                    "stop"
                } else {
                    tail += &self.stop.finish();
                    match finish {
                        Finish::Eos => "stop",
                        Finish::Length => "length",
                    }
                };
                self.text += &tail;
                self.route(&tail, true);
                let reason = self.reason(reason);
                self.finish = Some(reason);
                Some(Step::Finished(tail, reason))
            }
            Event::Error(e) => {
                self.finish = Some("error");
                Some(Step::Error(e))
            }
        }
    }
}

/// One request's metrics and bill as its events arrive. The counters move at once: each
/// prompt's tokens when one of its choices is first scheduled (so once, however many choices,
/// cached tokens included, a recompute after a preemption not), each token as it arrives (so
/// the sum is the usage's `completion_tokens`). The outcome, the per-request histograms, the
/// tenant's tpm settlement and the usage-ledger row are recorded once, when the request ends; a
/// request dropped before that is an abort.
///
/// The request's phases are timed here on the HTTP side, not in the engine, from the arrival of
/// its events: the first `Event::Scheduled` of any choice (the engine sends it when it first
/// schedules a sequence), the first and the last `Event::Token` of any choice. Each lags the
/// engine's own instant by one channel hop.
struct Meter {
    metrics: Arc<Metrics>,
    arrived: Instant,
    /// choices per prompt
    n: usize,
    /// `[prompts]` prompt tokens, until counted
    uncounted: Vec<Option<usize>>,
    /// `[prompts]` prompt tokens found in the prefix cache
    cached: Vec<usize>,
    scheduled: Option<Instant>,
    /// the request's first and last token
    first: Option<Instant>,
    last: Option<Instant>,
    /// `[choices]` first token, last token, tokens
    per_choice: Vec<Option<(Instant, Instant, usize)>>,
    done: bool,
    bill: Bill,
    id: String,
    model: String,
    prompt_tokens: usize,
}

impl Meter {
    fn new(metrics: Arc<Metrics>, job: &mut Job, total: usize) -> Self {
        Meter {
            metrics,
            arrived: job.arrived,
            n: job.params.n,
            uncounted: job.prompts.iter().map(|p| Some(p.len())).collect(),
            cached: vec![0; job.prompts.len()],
            scheduled: None,
            first: None,
            last: None,
            per_choice: vec![None; total],
            done: false,
            bill: std::mem::take(&mut job.bill),
            id: job.id.clone(),
            model: job.model.clone(),
            prompt_tokens: job.prompts.iter().map(Vec::len).sum(),
        }
    }

    /// Choice `i` was first scheduled, `cached` of its `prompt_len` tokens from the cache.
    fn scheduled(&mut self, i: usize, prompt_len: usize, cached: usize) {
        let m = &self.metrics;
        self.scheduled.get_or_insert_with(Instant::now);
        m.prefix_query_tokens.add(prompt_len as u64);
        m.prefix_hit_tokens.add(cached as u64);
        if let Some(len) = self.uncounted[i / self.n].take() {
            m.prompt_tokens.add(len as u64);
            m.tenant_tokens(&self.bill.tenant, len as u64, 0);
        }
        // the usage reports the first choice's hits
        if i % self.n == 0 {
            self.cached[i / self.n] = cached;
        }
    }

    fn token(&mut self, i: usize) {
        let m = &self.metrics;
        let now = Instant::now();
        m.generation_tokens.add(1);
        m.tenant_tokens(&self.bill.tenant, 0, 1);
        if self.first.is_none() {
            m.ttft.observe((now - self.arrived).as_secs_f64());
            self.first = Some(now);
        }
        self.last = Some(now);
        self.per_choice[i] = Some(match self.per_choice[i] {
            None => (now, now, 1),
            Some((first, last, k)) => {
                m.itl.observe((now - last).as_secs_f64());
                (first, now, k + 1)
            }
        });
    }

    /// Count the outcome, settle the tenant's tokens; the request's ledger row.
    fn close(
        &mut self,
        outcome: &'static str,
        completion: usize,
    ) -> Option<(Arc<UsageLedger>, Row)> {
        if std::mem::replace(&mut self.done, true) {
            return None;
        }
        self.metrics.outcome(outcome);
        self.metrics.tenant_outcome(&self.bill.tenant, outcome);
        if let Some(a) = &mut self.bill.account {
            a.settle((self.prompt_tokens + completion) as u64);
        }
        let ledger = self.bill.ledger.clone()?;
        let received = self.bill.received_ms;
        let since =
            |t: Instant| received + t.saturating_duration_since(self.arrived).as_millis() as i64;
        let row = Row {
            id: self.id.clone(),
            tenant: self.bill.tenant.to_string(),
            model: self.model.clone(),
            received_ms: received,
            started_ms: self.scheduled.map(since),
            finished_ms: usage::now_ms().max(received),
            prompt_tokens: self.prompt_tokens as u64,
            cached_tokens: self.cached.iter().sum::<usize>() as u64,
            completion_tokens: completion as u64,
            outcome,
            client_request_id: self.bill.client_request_id.clone(),
        };
        Some((ledger, row))
    }

    /// The request ended unfinished (`error`, `abort`): its row is written, nobody waits.
    fn end(&mut self, outcome: &'static str) {
        let made = self.per_choice.iter().flatten().map(|c| c.2).sum();
        if let Some((ledger, row)) = self.close(outcome, made) {
            ledger.record_later(row);
        }
    }

    /// The request finished for `reason`: its histograms, its outcome; the ledger row the
    /// caller must see committed before the client gets its usage.
    fn finish(
        &mut self,
        reason: &'static str,
        completion_tokens: usize,
    ) -> Option<(Arc<UsageLedger>, Row)> {
        if self.done {
            return None;
        }
        let m = &self.metrics;
        let now = Instant::now();
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let scheduled = self.scheduled.unwrap_or(now);
        let first = self.first.unwrap_or(now);
        let last = self.last.unwrap_or(first);
        m.e2e.observe(secs(self.arrived, now));
        m.queue_time.observe(secs(self.arrived, scheduled));
        m.prefill_time.observe(secs(scheduled, first));
        m.decode_time.observe(secs(first, last));
        m.inference_time.observe(secs(scheduled, last));
        let tpots: Vec<f64> = self
            .per_choice
            .iter()
            .flatten()
            .filter(|c| c.2 > 1)
            .map(|&(a, b, k)| secs(a, b) / (k - 1) as f64)
            .collect();
        m.request_tpot
            .observe(tpots.iter().sum::<f64>() / tpots.len().max(1) as f64);
        m.request_prompt_tokens.observe(self.prompt_tokens as f64);
        m.request_generation_tokens
            .observe(completion_tokens as f64);
        self.close(reason, completion_tokens)
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.end("abort");
    }
}

/// Submit every choice; a receiver per choice index.
fn submit(
    engine: &EngineHandle,
    job: &Job,
) -> Result<StreamMap<usize, UnboundedReceiverStream<Event>>, ApiError> {
    let p = &job.params;
    let n = p.n;
    let base_seed = p.seed.unwrap_or_else(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(job.arrived.elapsed().as_nanos());
        h.finish()
    });
    let mut map = StreamMap::new();
    for (pi, prompt) in job.prompts.iter().enumerate() {
        let room = job.max_model_len.saturating_sub(prompt.len());
        let max_tokens = p.max_tokens.unwrap_or(room);
        for i in 0..n {
            let index = pi * n + i;
            let (tx, rx) = mpsc::unbounded_channel();
            engine
                .submit(EngineRequest {
                    prompt: prompt.clone(),
                    params: p.sampling(base_seed.wrapping_add(index as u64)),
                    max_tokens,
                    min_tokens: p.min_tokens,
                    ignore_eos: p.ignore_eos,
                    logit_bias: p.logit_bias.clone(),
                    logprobs: p.logprobs,
                    constraint: job.constraint.as_ref().map(Constraint::fork),
                    cache_salt: job.cache_salt,
                    share: job.share.clone(),
                    events: tx,
                    arrived: job.arrived,
                })
                .map_err(ApiError::unavailable)?;
            map.insert(index, UnboundedReceiverStream::new(rx));
        }
    }
    Ok(map)
}

fn usage(prompt_tokens: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn completion_logprobs(entries: &[Value]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| e["top"].clone()).collect::<Vec<_>>(),
        "text_offset": entries.iter().map(|e| e["offset"].clone()).collect::<Vec<_>>(),
    })
}

/// Why the engine ended a request's stream unfinished (it stopped; its reason may take a
/// moment to be set, as the stream ends while the engine thread unwinds).
async fn why_stopped(status: &EngineStatus) -> String {
    tokio::time::timeout(Duration::from_millis(500), status.stopped())
        .await
        .unwrap_or_else(|_| "the engine stopped before the request finished".into())
}

/// Run the job and answer: a JSON body, or an SSE stream.
pub async fn respond(engine: EngineHandle, tok: Arc<Tokenizer>, mut job: Job) -> Response {
    let metrics = engine.metrics.clone();
    let streams = match submit(&engine, &job) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let meter = Meter::new(metrics, &mut job, streams.len());
    let status = engine.status.clone();
    if job.params.stream {
        stream(job, tok, streams, meter, status)
    } else {
        whole(job, tok, streams, meter, status).await
    }
}

/// One request's choices as their events arrive: text, cached prompt tokens, metrics.
struct Progress {
    choices: Vec<Choice>,
    meter: Meter,
}

impl Progress {
    fn new(job: &Job, total: usize, meter: Meter) -> Self {
        Progress {
            choices: (0..total)
                .map(|i| Choice::new(i, &job.params.stop, job.tool_calls))
                .collect(),
            meter,
        }
    }

    /// Apply choice `i`'s event; `None` when there is nothing to tell the client.
    fn on_event(&mut self, job: &Job, tok: &Tokenizer, i: usize, ev: Event) -> Option<Step> {
        let n = job.params.n;
        if let Event::Scheduled { cached_tokens } = ev {
            self.meter
                .scheduled(i, job.prompts[i / n].len(), cached_tokens);
            return None;
        }
        if matches!(ev, Event::Token { .. }) {
            self.meter.token(i);
        }
        self.choices[i].on_event(job.kind, tok, ev)
    }

    fn fail(&mut self) {
        self.meter.end("error");
    }

    /// Record the finished request (its usage must be what the client got): in the metrics,
    /// and committed to the usage ledger before this returns.
    async fn finish(&mut self) {
        let completion = self.choices.iter().map(|c| c.tokens).sum();
        if let Some((ledger, row)) = self.meter.finish(self.outcome(), completion) {
            if let Err(e) = ledger.record(row).await {
                tracing::error!(
                    "usage ledger: request {} not committed: {e} (kept for the next write)",
                    self.meter.id
                );
            }
        }
    }

    fn unfinished(&self) -> bool {
        self.choices.iter().any(|c| c.finish.is_none())
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        let m = &self.meter;
        usage(m.prompt_tokens, completion, m.cached.iter().sum())
    }

    /// The request's outcome for the metrics.
    fn outcome(&self) -> &'static str {
        if self.choices.iter().all(|c| c.finish == Some("length")) {
            "length"
        } else {
            "stop"
        }
    }
}

async fn whole(
    job: Job,
    tok: Arc<Tokenizer>,
    mut streams: StreamMap<usize, UnboundedReceiverStream<Event>>,
    meter: Meter,
    status: Arc<EngineStatus>,
) -> Response {
    let mut progress = Progress::new(&job, streams.len(), meter);
    while let Some((i, ev)) = streams.next().await {
        match progress.on_event(&job, &tok, i, ev) {
            Some(Step::Finished(..)) => {
                streams.remove(&i); // a stop string: the engine aborts the rest
            }
            Some(Step::Error(e)) => {
                progress.fail();
                return ApiError::internal(e).into_response();
            }
            _ => {}
        }
    }
    if progress.unfinished() {
        progress.fail();
        return ApiError::unavailable(why_stopped(&status).await).into_response();
    }
    let usage = progress.usage();
    progress.finish().await;
    let choices = &progress.choices;
    let body = match job.kind {
        Kind::Chat => json!({
            "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices.iter().map(|c| {
                let mut message = json!({"role": "assistant", "content": c.text, "refusal": null, "annotations": []});
                if c.tools.is_some() {
                    let calls = &c.parsed.calls;
                    message["content"] = if c.parsed.content.is_empty() && !calls.is_empty() {
                        Value::Null
                    } else {
                        json!(c.parsed.content)
                    };
                    if !calls.is_empty() {
                        message["tool_calls"] = calls.iter().enumerate().map(|(k, (name, args))| json!({
                            "id": job.call_id(c.index, k), "type": "function",
                            "function": {"name": name, "arguments": args},
                        })).collect();
                    }
                }
                json!({
                    "index": c.index,
                    "message": message,
                    "logprobs": job.params.logprobs.map(|_| json!({"content": c.logprobs, "refusal": null})),
                    "finish_reason": c.finish,
                })
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices.iter().map(|c| {
                let prefix = job.echo.as_ref().map(|e| e[c.index / job.params.n].clone()).unwrap_or_default();
                json!({
                    "index": c.index,
                    "text": prefix + &c.text,
                    "logprobs": job.params.logprobs.map(|_| completion_logprobs(&c.logprobs)),
                    "finish_reason": c.finish,
                })
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
    };
    axum::Json(body).into_response()
}

fn stream(
    job: Job,
    tok: Arc<Tokenizer>,
    mut streams: StreamMap<usize, UnboundedReceiverStream<Event>>,
    meter: Meter,
    status: Arc<EngineStatus>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let total = streams.len();
        let mut progress = Progress::new(&job, total, meter);
        let with_usage = job.params.include_usage;
        let object = match job.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let chunk = |choice: Value| {
            let mut c = json!({
                "id": job.id, "object": object, "created": job.created, "model": job.model,
                "system_fingerprint": FINGERPRINT, "choices": [choice],
            });
            if with_usage {
                c["usage"] = Value::Null;
            }
            SseEvent::default().data(c.to_string())
        };
        let delta = |index: usize,
                     text: Option<&str>,
                     role: bool,
                     lp: Option<Value>,
                     finish: Option<&str>| match job.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": d,
                       "logprobs": lp.map(|l| json!({"content": [l], "refusal": null})),
                       "finish_reason": finish})
            }
            Kind::Completion => json!({"index": index, "text": text.unwrap_or(""),
                                       "logprobs": lp.map(|l| completion_logprobs(&[l])),
                                       "finish_reason": finish}),
        };
        if job.kind == Kind::Chat {
            for i in 0..total {
                if tx
                    .send(Ok(chunk(delta(i, Some(""), true, None, None))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        // a tool-call delta as OpenAI streams it: the first of a call carries its index, id,
        // type and name; the later ones append to its arguments
        let tool_delta = |i: usize, d: &ToolDelta| -> Value {
            let d = match d {
                ToolDelta::Content(t) => json!({"content": t}),
                ToolDelta::Start { index, name } => json!({"tool_calls": [{
                    "index": index, "id": job.call_id(i, *index), "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]}),
                ToolDelta::Args { index, fragment } => json!({"tool_calls": [{
                    "index": index, "function": {"arguments": fragment},
                }]}),
            };
            json!({"index": i, "delta": d, "logprobs": null, "finish_reason": null})
        };
        while let Some((i, ev)) = streams.next().await {
            let step = progress.on_event(&job, &tok, i, ev);
            if job.tool_calls {
                // the text goes out as the parser's deltas
                let mut v: Vec<SseEvent> = progress.choices[i]
                    .deltas
                    .drain(..)
                    .map(|d| chunk(tool_delta(i, &d)))
                    .collect();
                let mut last = false;
                match step {
                    Some(Step::Finished(_, reason)) => {
                        streams.remove(&i);
                        v.push(chunk(delta(i, None, false, None, Some(reason))));
                    }
                    Some(Step::Error(e)) => {
                        progress.fail();
                        v.push(SseEvent::default().data(ApiError::internal(e).body().to_string()));
                        last = true;
                    }
                    _ => {}
                }
                for ev in v {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
                continue;
            }
            let out = match step {
                None => continue,
                Some(Step::Text(t, lp)) => {
                    if t.is_empty() && lp.is_none() {
                        continue;
                    }
                    vec![chunk(delta(i, Some(&t), false, lp, None))]
                }
                Some(Step::Finished(t, reason)) => {
                    streams.remove(&i);
                    let mut v = Vec::new();
                    if !t.is_empty() {
                        v.push(chunk(delta(i, Some(&t), false, None, None)));
                    }
                    v.push(chunk(delta(
                        i,
                        if job.kind == Kind::Chat {
                            None
                        } else {
                            Some("")
                        },
                        false,
                        None,
                        Some(reason),
                    )));
                    v
                }
                Some(Step::Error(e)) => {
                    progress.fail();
                    let _ = tx
                        .send(Ok(
                            SseEvent::default().data(ApiError::internal(e).body().to_string())
                        ))
                        .await;
                    return;
                }
            };
            for ev in out {
                if tx.send(Ok(ev)).await.is_err() {
                    return; // the client went away: dropping `streams` aborts the choices
                }
            }
        }
        if progress.unfinished() {
            // the engine dropped the request without a word: it died
            progress.fail();
            let e = ApiError::unavailable(why_stopped(&status).await);
            let _ = tx
                .send(Ok(SseEvent::default().data(e.body().to_string())))
                .await;
            return;
        }
        // counted before `[DONE]`: a client that reads /metrics next sees its request
        progress.finish().await;
        if with_usage {
            let u = json!({
                "id": job.id, "object": object, "created": job.created, "model": job.model,
                "system_fingerprint": FINGERPRINT, "choices": [],
                "usage": progress.usage(),
            });
            let _ = tx.send(Ok(SseEvent::default().data(u.to_string()))).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
