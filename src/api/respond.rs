//! One request's choices: submit them to the engine, turn their token events into text (whole
//! UTF-8 characters, stop strings held back and never sent), and shape the OpenAI bodies and
//! SSE chunks for chat and legacy completions.

use super::error::ApiError;
use super::wire::ValidParams;
use crate::engine::metrics::Metrics;
use crate::engine::{EngineHandle, EngineRequest, Event, Finish, TokenLogprob};
use crate::sampling::stop::StopMatcher;
use crate::sampling::SamplingParams;
use crate::tokenizer::stream::drain_utf8;
use crate::tokenizer::Tokenizer;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
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
}

impl Choice {
    fn new(index: usize, stop: &[String]) -> Self {
        Choice {
            index,
            pending: Vec::new(),
            stop: StopMatcher::new(stop),
            text: String::new(),
            tokens: 0,
            finish: None,
            logprobs: Vec::new(),
            offset: 0,
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
                if pushed.stopped.is_some() {
                    self.finish = Some("stop");
                    return Some(Step::Finished(pushed.emit, "stop"));
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

/// Counts the request's outcome once; a request dropped before finishing is an abort.
struct Outcome {
    metrics: Arc<Metrics>,
    done: bool,
}

impl Outcome {
    fn set(&mut self, o: &str) {
        if !self.done {
            self.metrics.outcome(o);
            self.done = true;
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.outcome("abort");
        }
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
                    params: SamplingParams {
                        temperature: p.temperature,
                        top_k: p.top_k,
                        top_p: p.top_p,
                        min_p: p.min_p,
                        repetition_penalty: p.repetition_penalty,
                        presence_penalty: p.presence_penalty,
                        frequency_penalty: p.frequency_penalty,
                        seed: base_seed.wrapping_add(index as u64),
                    },
                    max_tokens,
                    min_tokens: p.min_tokens,
                    ignore_eos: p.ignore_eos,
                    logit_bias: p.logit_bias.clone(),
                    logprobs: p.logprobs,
                    cache_salt: 0,
                    events: tx,
                    arrived: job.arrived,
                })
                .map_err(ApiError::internal)?;
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

/// Run the job and answer: a JSON body, or an SSE stream.
pub async fn respond(engine: EngineHandle, tok: Arc<Tokenizer>, job: Job) -> Response {
    let metrics = engine.metrics.clone();
    let streams = match submit(&engine, &job) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let outcome = Outcome {
        metrics: metrics.clone(),
        done: false,
    };
    if job.params.stream {
        stream(job, tok, streams, outcome, metrics)
    } else {
        whole(job, tok, streams, outcome, metrics).await
    }
}

struct Timing {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Timing {
    fn token(&mut self, m: &Metrics, arrived: Instant) {
        let now = Instant::now();
        match self.last {
            None => m.ttft.observe((now - arrived).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
}

/// One request's choices as their events arrive: text, cached prompt tokens, latencies.
struct Progress {
    choices: Vec<Choice>,
    /// `[prompts]` prompt tokens found in the prefix cache
    cached: Vec<usize>,
    timing: Timing,
}

impl Progress {
    fn new(job: &Job, total: usize) -> Self {
        Progress {
            choices: (0..total)
                .map(|i| Choice::new(i, &job.params.stop))
                .collect(),
            cached: vec![0; job.prompts.len()],
            timing: Timing {
                first: None,
                last: None,
            },
        }
    }

    /// Apply choice `i`'s event; `None` when there is nothing to tell the client.
    fn on_event(
        &mut self,
        job: &Job,
        tok: &Tokenizer,
        m: &Metrics,
        i: usize,
        ev: Event,
    ) -> Option<Step> {
        if let Event::Scheduled { cached_tokens } = ev {
            if i % job.params.n == 0 {
                self.cached[i / job.params.n] = cached_tokens;
            }
            return None;
        }
        if matches!(ev, Event::Token { .. }) {
            self.timing.token(m, job.arrived);
        }
        self.choices[i].on_event(job.kind, tok, ev)
    }

    fn unfinished(&self) -> bool {
        self.choices.iter().any(|c| c.finish.is_none())
    }

    fn usage(&self, job: &Job) -> Value {
        let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        usage(prompt_tokens, completion, self.cached.iter().sum())
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
    mut outcome: Outcome,
    metrics: Arc<Metrics>,
) -> Response {
    let mut progress = Progress::new(&job, streams.len());
    while let Some((i, ev)) = streams.next().await {
        match progress.on_event(&job, &tok, &metrics, i, ev) {
            Some(Step::Finished(..)) => {
                streams.remove(&i); // a stop string: the engine aborts the rest
            }
            Some(Step::Error(e)) => {
                outcome.set("error");
                return ApiError::internal(e).into_response();
            }
            _ => {}
        }
    }
    if progress.unfinished() {
        outcome.set("error");
        return ApiError::internal("the engine stopped before the request finished")
            .into_response();
    }
    let usage = progress.usage(&job);
    metrics.e2e.observe(job.arrived.elapsed().as_secs_f64());
    let reason = progress.outcome();
    outcome.set(reason);
    let choices = &progress.choices;
    let body = match job.kind {
        Kind::Chat => json!({
            "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices.iter().map(|c| json!({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": null, "annotations": []},
                "logprobs": job.params.logprobs.map(|_| json!({"content": c.logprobs, "refusal": null})),
                "finish_reason": c.finish,
            })).collect::<Vec<_>>(),
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
    mut outcome: Outcome,
    metrics: Arc<Metrics>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let total = streams.len();
        let mut progress = Progress::new(&job, total);
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
        while let Some((i, ev)) = streams.next().await {
            let out = match progress.on_event(&job, &tok, &metrics, i, ev) {
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
                    outcome.set("error");
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
            outcome.set("error");
            return;
        }
        if with_usage {
            let u = json!({
                "id": job.id, "object": object, "created": job.created, "model": job.model,
                "system_fingerprint": FINGERPRINT, "choices": [],
                "usage": progress.usage(&job),
            });
            let _ = tx.send(Ok(SseEvent::default().data(u.to_string()))).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        metrics.e2e.observe(job.arrived.elapsed().as_secs_f64());
        outcome.set(progress.outcome());
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
