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
use std::sync::Arc;
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
    /// Prefix-cache key separating tenants (0 = shared).
    pub cache_salt: u64,
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

/// What the HTTP side holds: a way to submit requests.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<EngineRequest>,
    pub metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Hand a request to the engine; `Err` if the engine has stopped.
    pub fn submit(&self, r: EngineRequest) -> Result<(), String> {
        self.metrics.waiting.add(1);
        self.metrics.waiting_tokens.add(r.prompt.len() as u64);
        self.tx
            .send(r)
            .map_err(|_| "the engine has stopped".to_string())
    }
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
    let join = std::thread::Builder::new()
        .name("kojo-engine".into())
        .spawn(move || {
            let mut sched = Scheduler::new(cfg, eog, m);
            sched.run(&be, &model, kv, rx);
        })?;
    Ok((EngineHandle { tx, metrics }, join))
}
