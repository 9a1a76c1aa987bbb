//! The engine: one thread owns the scheduler, the KV cache and the model, and runs
//! `schedule → execute → update` in a loop. Requests arrive over a channel; each carries the
//! sender of its own event stream. A request whose receiver is gone (the client went away,
//! streaming or not, queued or running) is aborted at the next step and its blocks freed.
//!
//! - [`scheduler`]: sequences, the waiting queue, token budget, prefix hits, preemption
//! - [`metrics`]: gauges, counters and histograms, also under vLLM's names

pub mod metrics;
pub mod scheduler;

use crate::backend::Backend;
use crate::model::Transformer;
use crate::sampling::SamplingParams;
use metrics::Metrics;
use scheduler::{Scheduler, SchedulerConfig};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// A validated request as the engine runs it.
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    /// `(token, bias)` added to the logits before sampling
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(k)`: report the chosen token's log-probability and the top `k`.
    pub logprobs: Option<usize>,
    /// The grammar the output must match (structured outputs, tool calls).
    pub constraint: Option<crate::structured::Constraint>,
    /// Prefix-cache key separating tenants (0 = shared).
    pub cache_salt: u64,
    /// Whose request it is, for fair share and priority ([`crate::tenancy::fair`]).
    pub share: crate::tenancy::fair::Share,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// `[k]` (token, log-probability), best first
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token.
    Eos,
    /// `max_tokens` or the context's end.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request was scheduled for the first time; `cached_tokens` prompt tokens came from
    /// the prefix cache.
    Scheduled {
        cached_tokens: usize,
    },
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Error(String),
}

/// Whether the engine thread can still serve: set once, when it stops for good (a panic, a
/// device fault, or its request channel closing).
#[derive(Default)]
pub struct EngineStatus {
    failure: OnceLock<String>,
    notify: tokio::sync::Notify,
}

impl EngineStatus {
    /// Why the engine stopped, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Wait until the engine stops; its reason.
    pub async fn stopped(&self) -> String {
        loop {
            let wait = self.notify.notified();
            if let Some(f) = self.failure() {
                return f.to_string();
            }
            wait.await;
        }
    }

    fn set(&self, why: String) {
        let _ = self.failure.set(why);
        self.notify.notify_waiters();
    }
}

/// What the HTTP side holds: a way to submit requests, and the engine's health.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<EngineRequest>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<EngineStatus>,
}

impl EngineHandle {
    /// Hand a request to the engine; `Err` if the engine has stopped.
    pub fn submit(&self, r: EngineRequest) -> Result<(), String> {
        if let Some(f) = self.status.failure() {
            return Err(f.to_string());
        }
        self.metrics.waiting.add(1);
        self.metrics.waiting_tokens.add(r.prompt.len() as u64);
        self.tx.send(r).map_err(|e| {
            let m = &self.metrics;
            m.waiting.set(m.waiting.get().saturating_sub(1));
            let len = e.0.prompt.len() as u64;
            m.waiting_tokens
                .set(m.waiting_tokens.get().saturating_sub(len));
            "the engine has stopped".to_string()
        })
    }
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Start the engine thread. `eog` are the end-of-generation token ids.
pub fn start<B: Backend + Send + 'static>(
    be: B,
    model: Transformer<B>,
    cfg: SchedulerConfig,
    eog: Vec<u32>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)>
where
    B::KvCache: Send,
    Transformer<B>: Send,
{
    let kv = be.alloc_kv(model.kv_shape(cfg.num_blocks, cfg.block_size))?;
    metrics.kv_blocks_total.set(cfg.num_blocks as u64);
    let (tx, rx) = mpsc::channel::<EngineRequest>();
    let m = metrics.clone();
    let status = Arc::new(EngineStatus::default());
    let st = status.clone();
    let join = std::thread::Builder::new()
        .name("kojo-engine".into())
        .spawn(move || {
            // Scheduler::run fails every request it holds before it returns an error; a panic
            // drops them (their streams end unfinished, which the HTTP side reports).
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut sched = Scheduler::new(cfg, eog, m);
                sched.run(&be, &model, kv, rx)
            }));
            let why = match r {
                Ok(Ok(())) => "the engine has stopped".to_string(),
                Ok(Err(e)) => format!("the engine failed: {e}"),
                Err(p) => format!("the engine panicked: {}", panic_message(&*p)),
            };
            st.set(why);
        })?;
    Ok((
        EngineHandle {
            tx,
            metrics,
            status,
        },
        join,
    ))
}
