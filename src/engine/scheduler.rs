//! The scheduler and the step loop.
//!
//! **Invariant: each sequence's computed tokens catch up with its known tokens.** Prefill is not
//! a phase: a step gives every running sequence the tokens it still lacks (one, for a sequence
//! that is decoding; up to the budget, for a prompt), then admits waiting sequences while the
//! token budget and the KV blocks last. A sequence whose last known token was computed in this
//! step gets logits and samples its next token.
//!
//! - Prefix hits: a waiting sequence with no blocks looks up its full prompt blocks by hash
//!   chain; every hit is a block it does not compute.
//! - Fair share ([`crate::tenancy::fair`]): the next sequence admitted is the waiting one with
//!   the best `(priority, its tenant's virtual token counter, place in the queue)`; running
//!   sequences are kept in the same order, so that the step's budget goes to them in it.
//!   Without tenants this is first come, first served.
//! - Preemption by recompute: when a running sequence needs a block and none is free, the
//!   last running sequence in that order (the worst band, the tenant served most, the newest)
//!   gives all of its blocks back and goes to the front of the queue (its tokens so far become
//!   a longer prompt; its own freed blocks are likely prefix hits).
//! - Aborts: a sequence whose event receiver is gone is dropped at the next step.

use super::metrics::Metrics;
use super::{EngineRequest, Event, Finish, TokenLogprob};
use crate::backend::{Backend, BatchLayout};
use crate::kv::{hash_block, BlockHash, BlockPool};
use crate::model::transformer::{Step, Transformer};
use crate::sampling::Pick;
use crate::sampling::{log_softmax, Sampler};
use crate::structured::Constraint;
use crate::tenancy::fair::{FairShare, W_IN, W_OUT};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    /// Tokens per step (decodes and prefill chunks together).
    pub max_batch_tokens: usize,
    /// Longest sequence (prompt + output).
    pub max_model_len: usize,
}

struct Seq {
    req: EngineRequest,
    /// prompt, then generated tokens
    tokens: Vec<u32>,
    prompt_len: usize,
    /// tokens whose K/V are in the cache
    computed: usize,
    blocks: Vec<u32>,
    /// hashes of the full blocks registered so far
    hashes: Vec<BlockHash>,
    sampler: Sampler,
    /// the request's grammar state, if it has one
    constraint: Option<Constraint>,
    /// the grammar's mask for the token this step samples (`Err`: it could not be computed)
    mask: Option<Result<Vec<u32>, String>>,
    generated: usize,
    cached_tokens: usize,
    started: bool,
}

impl Seq {
    /// Tell the client the sequence ended (a closed receiver is not an error: it was aborted).
    fn send_done(&self, finish: Finish) {
        let _ = self.req.events.send(Event::Done {
            finish,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens,
        });
    }

    fn send_error(&self, msg: String) {
        let _ = self.req.events.send(Event::Error(msg));
    }

    fn known(&self) -> usize {
        self.tokens.len()
    }

    /// The next token depends on the raw logits alone, masked by the grammar if there is one
    /// (nothing else reads or changes them: log-probabilities, bias, penalties, the
    /// end-of-generation ban), so the backend can draw it where the logits are.
    fn plain(&self, max_k: usize) -> bool {
        self.sampler.plain(self.generated, max_k) && self.req.logprobs.is_none()
    }
}

/// What a step gives back: the logits of the rows that sample, or (when every one of them is
/// plain) the ids the backend drew.
enum StepOutput {
    Logits(Vec<f32>),
    Ids(Vec<u32>),
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    eog: Vec<u32>,
    metrics: Arc<Metrics>,
    fair: FairShare,
    /// Test-only ([`model_test`]): called at the top of each turn of [`Scheduler::run`]'s
    /// loop, i.e. after every step, with the scheduler at rest.
    #[cfg(test)]
    on_turn: Option<TurnHook>,
}

/// Test-only: what [`Scheduler::run`] calls after every step.
#[cfg(test)]
type TurnHook = Box<dyn FnMut(&Scheduler) + Send>;

/// One step's work: `(index into running, tokens to compute)`.
type Plan = Vec<(usize, usize)>;

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, eog: Vec<u32>, metrics: Arc<Metrics>) -> Self {
        Scheduler {
            pool: BlockPool::new(cfg.num_blocks, cfg.block_size),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            eog,
            metrics,
            fair: FairShare::default(),
            #[cfg(test)]
            on_turn: None,
        }
    }

    /// Test-only: run the hook of [`model_test`], if one is set.
    #[cfg(test)]
    fn call_on_turn(&mut self) {
        if let Some(mut f) = self.on_turn.take() {
            f(self);
            self.on_turn = Some(f);
        }
    }

    /// The step loop; returns `Ok` when the request channel is closed and all work is done,
    /// `Err` when the backend cannot run another step (a device fault: every request it held
    /// has been failed). A step that fails on its own (e.g. out of memory) fails that step's
    /// requests and the loop goes on.
    pub fn run<B: Backend>(
        &mut self,
        be: &B,
        model: &Transformer<B>,
        mut kv: B::KvCache,
        rx: Receiver<EngineRequest>,
    ) -> Result<(), String> {
        let mut open = true;
        // fault injection for the tests of engine death (KOJO_TEST_ENGINE_PANIC_AT_STEP=N)
        let panic_at: Option<u64> = std::env::var("KOJO_TEST_ENGINE_PANIC_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut steps = 0u64;
        loop {
            #[cfg(test)]
            self.call_on_turn();
            if self.waiting.is_empty() && self.running.is_empty() {
                if !open {
                    return Ok(());
                }
                match rx.recv() {
                    Ok(r) => self.add(r),
                    Err(_) => return Ok(()),
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(r) => self.add(r),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.reap_aborted();
            let plan = self.schedule();
            if plan.is_empty() {
                self.publish();
                if !self.waiting.is_empty() && self.running.is_empty() {
                    // cannot happen with admission control; never spin
                    let s = self.waiting.pop_front().unwrap();
                    self.finish_waiting(s, Some("the request does not fit the KV cache"));
                }
                continue;
            }
            steps += 1;
            if panic_at == Some(steps) {
                panic!("injected engine panic at step {steps} (KOJO_TEST_ENGINE_PANIC_AT_STEP)");
            }
            match self.execute(be, model, &mut kv, &plan) {
                Ok(out) => self.update(&plan, &out, model.cfg.vocab_size),
                Err(e) => {
                    if let Err(fatal) = be.recover() {
                        let msg = format!("{fatal} (after: {e:#})");
                        self.fail_all(&msg);
                        return Err(msg);
                    }
                    let msg = format!("forward pass failed: {e:#}");
                    let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                    idx.sort_unstable();
                    for i in idx.into_iter().rev() {
                        let mut s = self.running.remove(i);
                        let _ = s.req.events.send(Event::Error(msg.clone()));
                        self.pool.release_all(&mut s.blocks);
                    }
                }
            }
            self.publish();
        }
    }

    /// Fail every request held, running or waiting.
    fn fail_all(&mut self, msg: &str) {
        for mut s in std::mem::take(&mut self.running) {
            let _ = s.req.events.send(Event::Error(msg.to_string()));
            self.pool.release_all(&mut s.blocks);
        }
        while let Some(s) = self.waiting.pop_front() {
            self.finish_waiting(s, Some(msg));
        }
        self.publish();
    }

    fn add(&mut self, mut req: EngineRequest) {
        let prompt_len = req.prompt.len();
        let sampler = Sampler::new(req.params.clone()).with_rules(
            std::mem::take(&mut req.logit_bias),
            req.min_tokens,
            &self.eog,
        );
        let constraint = req.constraint.take();
        self.fair
            .arrive(&req.share, self.waiting.iter().map(|s| &s.req.share));
        self.waiting.push_back(Seq {
            tokens: req.prompt.clone(),
            req,
            constraint,
            mask: None,
            prompt_len,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            sampler,
            generated: 0,
            cached_tokens: 0,
            started: false,
        });
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.set(self.running.len() as u64);
        m.kv_blocks_used.set(self.pool.num_used() as u64);
        m.prefix_queries.set(self.pool.stats.queries);
        m.prefix_hits.set(self.pool.stats.hits);
        m.publish_tenants(
            self.waiting.iter().map(|s| &*s.req.share.tenant),
            self.running.iter().map(|s| &*s.req.share.tenant),
            self.fair.counters(),
        );
    }

    fn leave_waiting_gauges(&self, s: &Seq) {
        let m = &self.metrics;
        m.waiting.set(m.waiting.get().saturating_sub(1));
        m.waiting_tokens
            .set(m.waiting_tokens.get().saturating_sub(s.prompt_len as u64));
    }

    fn finish_waiting(&mut self, mut s: Seq, error: Option<&str>) {
        self.leave_waiting_gauges(&s);
        self.pool.release_all(&mut s.blocks);
        if let Some(e) = error {
            let _ = s.req.events.send(Event::Error(e.to_string()));
        }
    }

    fn reap_aborted(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].req.events.is_closed() {
                let s = self.waiting.remove(i).unwrap();
                self.finish_waiting(s, None);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.events.is_closed() {
                let mut s = self.running.remove(i);
                self.pool.release_all(&mut s.blocks);
            } else {
                i += 1;
            }
        }
    }

    /// Give `s` blocks for its first `upto` tokens; false if the pool ran out (blocks taken so
    /// far stay with `s`).
    fn ensure_blocks(pool: &mut BlockPool, s: &mut Seq, upto: usize) -> bool {
        let need = upto.div_ceil(pool.block_size());
        while s.blocks.len() < need {
            match pool.allocate() {
                Some(b) => s.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Move running[i] back to the front of the queue, its blocks freed.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.pool.release_all(&mut s.blocks);
        s.hashes.clear();
        s.computed = 0;
        self.metrics.preemptions.add(1);
        self.metrics.waiting.add(1);
        self.metrics.waiting_tokens.add(s.prompt_len as u64);
        self.waiting.push_front(s);
    }

    fn schedule(&mut self) -> Plan {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = Plan::new();
        // the fair-share order (stable: equals keep their order, the newest last)
        let fair = &self.fair;
        self.running
            .sort_by(|a, b| fair.order(&a.req.share, &b.req.share));
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.known() - s.computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let upto = s.computed + n;
            let mut fits = true;
            while !Self::ensure_blocks(&mut self.pool, &mut self.running[i], upto) {
                let victim = self.running.len() - 1;
                self.preempt(victim);
                if victim == i {
                    fits = false;
                    break;
                }
            }
            if fits {
                plan.push((i, n));
                budget -= n;
                i += 1;
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && !self.waiting.is_empty() {
            let next = self
                .fair
                .pick(self.waiting.iter().map(|s| &s.req.share))
                .unwrap_or(0);
            let s = &mut self.waiting[next];
            if s.blocks.is_empty() && s.computed == 0 {
                // prefix hits over full blocks, always leaving the last token to compute
                let full = (s.known() - 1) / bs;
                let mut parent: Option<BlockHash> = None;
                for b in 0..full {
                    let h = hash_block(
                        parent.as_ref(),
                        s.req.cache_salt,
                        &s.tokens[b * bs..(b + 1) * bs],
                    );
                    match self.pool.acquire_cached(&h) {
                        Some(id) => {
                            s.blocks.push(id);
                            s.hashes.push(h);
                            s.computed += bs;
                            parent = Some(h);
                        }
                        None => break,
                    }
                }
                if !s.started {
                    s.cached_tokens = s.computed.min(s.prompt_len);
                }
            }
            let room = (s.blocks.len() + self.pool.num_free()) * bs;
            let n = (s.known() - s.computed)
                .min(budget)
                .min(room.saturating_sub(s.computed));
            if n == 0 {
                // wait for blocks to come back, holding none meanwhile: prefix blocks kept by a
                // waiting request could starve a request preempted in front of it, with
                // nothing left running to free any
                self.pool.release_all(&mut s.blocks);
                s.hashes.clear();
                s.computed = 0;
                break;
            }
            let upto = s.computed + n;
            let ok = Self::ensure_blocks(&mut self.pool, s, upto);
            debug_assert!(ok);
            let mut s = self.waiting.remove(next).unwrap();
            self.leave_waiting_gauges(&s);
            if !s.started {
                s.started = true;
                // the prompt tokens computed for it (prefix hits are nearly free)
                let computed = s.prompt_len - s.cached_tokens;
                self.fair.charge(&s.req.share, W_IN * computed as f64);
                let _ = s.req.events.send(Event::Scheduled {
                    cached_tokens: s.cached_tokens,
                });
            }
            self.running.push(s);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        plan
    }

    fn execute<B: Backend>(
        &mut self,
        be: &B,
        model: &Transformer<B>,
        kv: &mut B::KvCache,
        plan: &Plan,
    ) -> anyhow::Result<StepOutput> {
        let bs = self.cfg.block_size;
        let (mut tokens, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let mut seq_starts = vec![0usize];
        let mut tables: Vec<&[u32]> = Vec::with_capacity(plan.len());
        let mut rows = Vec::new();
        let mut all_plain = true;
        let max_k = be.pick_max_k();
        // the grammars of the rows that sample: their masks are computed while the forward
        // pass runs (each constraint is taken out of its sequence meanwhile)
        let mut grammars: Vec<(usize, Constraint)> = Vec::new();
        for &(i, n) in plan {
            let s = &mut self.running[i];
            if s.computed + n == s.known() {
                if let Some(c) = s.constraint.take() {
                    grammars.push((i, c));
                }
            }
        }
        for &(i, n) in plan {
            let s = &self.running[i];
            for p in s.computed..s.computed + n {
                tokens.push(s.tokens[p]);
                positions.push(p as u32);
                slots.push(s.blocks[p / bs] * bs as u32 + (p % bs) as u32);
            }
            seq_starts.push(tokens.len());
            tables.push(&s.blocks);
            if s.computed + n == s.known() {
                rows.push(tokens.len() - 1);
                all_plain &= s.plain(max_k);
            }
        }
        let step = Step {
            tokens: &tokens,
            layout: BatchLayout {
                positions: &positions,
                seq_starts: &seq_starts,
                block_tables: &tables,
                slots: &slots,
            },
            logit_rows: &rows,
        };
        let compute = |g: Vec<(usize, Constraint)>| {
            g.into_iter()
                .map(|(i, mut c)| {
                    let m = c.mask();
                    (i, c, m)
                })
                .collect::<Vec<_>>()
        };
        let (forward, masks) = if grammars.is_empty() {
            (model.forward(be, kv, &step), Vec::new())
        } else if be.host_idle_during_forward() {
            // a device runs the step: the masks are computed meanwhile
            std::thread::scope(|scope| {
                let masker = scope.spawn(|| compute(grammars));
                let forward = model.forward(be, kv, &step);
                (
                    forward,
                    masker.join().expect("the grammar mask thread panicked"),
                )
            })
        } else {
            // the forward pass needs every core: masks first, then the step
            let masks = compute(grammars);
            (model.forward(be, kv, &step), masks)
        };
        for (i, c, m) in masks {
            let s = &mut self.running[i];
            s.constraint = Some(c);
            s.mask = Some(m);
        }
        let mut logits = forward?;
        if all_plain {
            // the backend draws the ids (after the grammar masks): the logits stay where they are
            let mut picks: Vec<Pick> = Vec::with_capacity(rows.len());
            let mut row_masks: Vec<Option<&[u32]>> = Vec::with_capacity(rows.len());
            for &(i, n) in plan {
                let s = &mut self.running[i];
                if s.computed + n == s.known() {
                    picks.push(s.sampler.next_pick());
                }
            }
            for &(i, n) in plan {
                let s = &self.running[i];
                if s.computed + n == s.known() {
                    row_masks.push(s.mask.as_ref().and_then(|m| m.as_deref().ok()));
                }
            }
            be.mask_rows(&mut logits, &row_masks)?;
            return Ok(StepOutput::Ids(be.pick_rows(&logits, &picks)?));
        }
        Ok(StepOutput::Logits(be.download(&logits)?))
    }

    fn update(&mut self, plan: &Plan, out: &StepOutput, n_vocab: usize) {
        let bs = self.cfg.block_size;
        // tokens per step (the HTTP side counts prompt and generated tokens, times requests)
        let step_tokens: usize = plan.iter().map(|&(_, n)| n).sum();
        self.metrics.iteration_tokens.observe(step_tokens as f64);
        let rows = plan
            .iter()
            .filter(|&&(i, n)| self.running[i].computed + n == self.running[i].known())
            .count();
        let (logits, ids): (&[f32], &[u32]) = match out {
            StepOutput::Logits(l) => (l, &[]),
            StepOutput::Ids(i) => (&[], i),
        };
        let vocab = if rows > 0 { logits.len() / rows } else { 0 };
        let mut row = 0;
        let mut done: Vec<usize> = Vec::new();
        for &(i, n) in plan {
            let s = &mut self.running[i];
            let samples = s.computed + n == s.known();
            s.computed += n;
            // register the blocks this step filled
            while (s.hashes.len() + 1) * bs <= s.computed {
                let b = s.hashes.len();
                let h = hash_block(
                    s.hashes.last(),
                    s.req.cache_salt,
                    &s.tokens[b * bs..(b + 1) * bs],
                );
                self.pool.set_hash(s.blocks[b], h);
                s.hashes.push(h);
            }
            if !samples {
                continue;
            }
            // the grammar allows nothing more: the output is complete; a grammar that failed
            // (llguidance's per-step limits) fails this request only
            let mask = match s.mask.take().transpose() {
                Ok(m) => m,
                Err(e) => {
                    row += 1;
                    s.send_error(format!("the grammar failed: {e}"));
                    done.push(i);
                    continue;
                }
            };
            if mask.as_ref().is_some_and(|m| m.iter().all(|&w| w == 0)) {
                row += 1;
                s.send_done(Finish::Eos);
                done.push(i);
                continue;
            }
            // nothing to draw from: every logit NaN (the device's draw of such a row is no
            // token id at all)
            let nan_row = match out {
                StepOutput::Logits(_) => logits[row * vocab..(row + 1) * vocab]
                    .iter()
                    .all(|x| x.is_nan()),
                StepOutput::Ids(_) => ids[row] as usize >= n_vocab,
            };
            if nan_row {
                // this request fails, the others go on
                row += 1;
                s.send_error("the model produced NaN logits for this request".into());
                done.push(i);
                continue;
            }
            let (id, logprob) = match out {
                // plain (checked when the step was built): the backend's draw
                StepOutput::Ids(_) => (ids[row], None),
                StepOutput::Logits(_) => {
                    let mut l = logits[row * vocab..(row + 1) * vocab].to_vec();
                    let logprob_of = s.req.logprobs.map(|_| log_softmax(&l));
                    s.sampler.process(
                        &mut l,
                        &s.tokens[..s.prompt_len],
                        &s.tokens[s.prompt_len..],
                        mask.as_deref(),
                    );
                    let id = s.sampler.sample(&l);
                    let logprob = match (s.req.logprobs, &logprob_of) {
                        (Some(k), Some(lp)) if (id as usize) < lp.len() => Some(TokenLogprob {
                            logprob: lp[id as usize],
                            top: crate::sampling::top_of(lp, k),
                        }),
                        _ => None,
                    };
                    (id, logprob)
                }
            };
            row += 1;
            if id as usize >= n_vocab {
                // every allowed logit was NaN or -inf (penalties and a grammar together)
                s.send_error("no token the request allows has a finite logit".into());
                done.push(i);
                continue;
            }
            let eos_allowed = !s.req.ignore_eos && s.generated >= s.req.min_tokens;
            // under a grammar, an end-of-generation token was allowed only where the grammar
            // may end
            if (eos_allowed || s.constraint.is_some()) && self.eog.contains(&id) {
                s.send_done(Finish::Eos);
                done.push(i);
                continue;
            }
            if let Some(c) = &mut s.constraint {
                if let Err(e) = c.consume(id) {
                    s.send_error(format!("the grammar rejected a token: {e}"));
                    done.push(i);
                    continue;
                }
            }
            s.tokens.push(id);
            s.generated += 1;
            self.fair.charge(&s.req.share, W_OUT);
            if s.req.events.send(Event::Token { id, logprob }).is_err() {
                done.push(i);
                continue;
            }
            let complete = s.constraint.as_ref().is_some_and(Constraint::is_stopped);
            if complete {
                s.send_done(Finish::Eos);
                done.push(i);
            } else if s.generated >= s.req.max_tokens || s.known() >= self.cfg.max_model_len {
                s.send_done(Finish::Length);
                done.push(i);
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.pool.release_all(&mut s.blocks);
        }
    }
}

#[cfg(test)]
#[path = "scheduler_model_test.rs"]
mod model_test;
