//! A model-based test of the scheduler (issue 14): [`Scheduler::run`] over a tiny random-weight
//! model on the CPU backend and a tiny KV cache (16 blocks of 4 tokens, so sequences are
//! preempted all the time), driven from its own loop by a hook that runs after every step.
//!
//! For each seed, a random plan of requests: arrivals spread over the steps, random prompt
//! lengths, prompts that share prefixes or repeat earlier ones (prefix-cache hits), groups of
//! identical requests submitted together (as `n > 1` does), random `max_tokens`/`min_tokens`,
//! greedy and sampled requests, with and without log-probabilities, and aborts (the event
//! receiver dropped) of queued, waiting and running requests.
//!
//! After every step the hook checks the scheduler against a model of what each client has
//! seen: the event streams (one `Scheduled` first, tokens, exactly one terminal event, nothing
//! after it, the stream closed after it and only after it), the tokens each sequence holds,
//! the limits, the block pool (refcounts equal the holders, no block written while shared, the
//! hash chains, the pool's own free-queue and prefix-cache bookkeeping), the gauges and the
//! counters. At the end every block is free (possibly still in the prefix cache) and the gauges
//! are zero; then each finished request is replayed on a plain [`Session`]: a greedy request's
//! tokens must be (up to float noise) the argmax of the replay's logits, and reported
//! log-probabilities the replay's, which a KV block mixed up by a preemption or a prefix hit
//! would break.

use super::{Scheduler, SchedulerConfig, Seq};
use crate::backend::cpu::{CpuBackend, MatmulMode};
use crate::backend::Backend;
use crate::engine::metrics::Metrics;
use crate::engine::{EngineHandle, EngineRequest, EngineStatus, Event, Finish};
use crate::kv::hash_block;
use crate::model::random::Rnd;
use crate::model::session::{Logits, Session};
use crate::model::{ModelSource, Transformer};
use crate::sampling::{log_softmax, SamplingParams};
use crate::tenancy::fair::Share;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const CFG: SchedulerConfig = SchedulerConfig {
    num_blocks: 16,
    block_size: 4,
    max_num_seqs: 6,
    max_batch_tokens: 16,
    max_model_len: 40,
};
/// End-of-generation ids: common enough in a random model's output to end some requests.
const EOG: std::ops::Range<u32> = 0..32;
const VOCAB: usize = 512;
const SEEDS: std::ops::Range<u64> = 1..25;
/// Request groups per seed (a group is one request, or several identical ones).
const GROUPS: usize = 40;
/// Turns of the loop a seed may take before it counts as stuck.
const MAX_TURNS: usize = 20_000;
/// How far (in logits) a greedy token may be from the replay's best: float noise, not a bug.
const EPS: f32 = 1e-3;

fn below(r: &mut Rnd, n: usize) -> usize {
    (r.u64() % n as u64) as usize
}

fn chance(r: &mut Rnd, p: f64) -> bool {
    ((r.u64() >> 11) as f64) < p * (1u64 << 53) as f64
}

fn tokens(r: &mut Rnd, n: usize) -> Vec<u32> {
    (0..n).map(|_| below(r, VOCAB) as u32).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not submitted yet.
    Unsent,
    /// Submitted; the scheduler holds it (the channel is drained at every turn).
    Live,
    /// Its terminal event was seen and the scheduler dropped it.
    Finished,
    /// Its receiver was dropped.
    Aborted,
}

/// Where a request was when its receiver was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AbortedIn {
    /// Submitted in the same turn: still in the request channel.
    Channel,
    Waiting,
    Running,
}

struct Req {
    /// Also its sampling seed: how a [`Seq`] is told apart.
    id: u64,
    prompt: Vec<u32>,
    max_tokens: usize,
    min_tokens: usize,
    ignore_eos: bool,
    greedy: bool,
    top_k: usize,
    logprobs: Option<usize>,
    /// Turn of arrival (moved earlier when the scheduler would idle).
    arrive: usize,
    /// Turns after its arrival at which its receiver is dropped, if still open.
    abort_after: Option<usize>,
    /// its tenant (one of three, weights 1, 2 and 0.5) and priority band: the admission and
    /// preemption orders are fair share's, not the queue's
    share: Share,
    state: State,
    rx: Option<UnboundedReceiver<Event>>,
    /// `Some(cached_tokens)` once `Scheduled` was seen.
    scheduled: Option<usize>,
    tokens: Vec<u32>,
    logprobs_seen: Vec<f32>,
    finish: Option<Finish>,
    /// The event stream ended (every sender dropped).
    closed: bool,
}

/// What the whole run must have shown, over all seeds (so that it cannot pass vacuously).
#[derive(Default, Debug)]
struct Coverage {
    requests: usize,
    duplicate_groups: usize,
    preemptions: u64,
    preemptions_seen: usize,
    block_hits: u64,
    cached_prompts: usize,
    shared_blocks_seen: usize,
    aborted: HashMap<AbortedIn, usize>,
    eos: usize,
    length: usize,
    context_end: usize,
    replayed_tokens: usize,
    turns: usize,
}

struct World {
    reqs: Vec<Req>,
    /// `None` once every request is in: the request channel closes and `run` returns.
    handle: Option<EngineHandle>,
    metrics: Arc<Metrics>,
    turn: usize,
    /// ids running after the previous turn
    was_running: HashSet<u64>,
    last_preemptions: u64,
    last_queries: u64,
    last_hits: u64,
    cov: Coverage,
}

/// A random plan of requests for one seed.
fn plan(r: &mut Rnd) -> (Vec<Req>, usize) {
    let bs = CFG.block_size;
    // system prompts: 1-3 full blocks and maybe a partial one
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            let n = bs * (1 + below(r, 3)) + below(r, bs);
            tokens(r, n)
        })
        .collect();
    let mut reqs: Vec<Req> = Vec::new();
    let mut dups = 0;
    let mut t = 0;
    for _ in 0..GROUPS {
        t += below(r, 4);
        let prompt = if !reqs.is_empty() && chance(r, 0.15) {
            reqs[below(r, reqs.len())].prompt.clone()
        } else if chance(r, 0.6) {
            let mut p = prefixes[below(r, prefixes.len())].clone();
            let n = 1 + below(r, 10);
            p.extend(tokens(r, n));
            p
        } else {
            let n = 1 + below(r, 24);
            tokens(r, n)
        };
        assert!(prompt.len() < CFG.max_model_len);
        let copies = if chance(r, 0.2) {
            dups += 1;
            2 + below(r, 3)
        } else {
            1
        };
        let max_tokens = 1 + below(r, 24);
        let min_tokens = if chance(r, 0.2) {
            below(r, max_tokens.min(4) + 1)
        } else {
            0
        };
        let ignore_eos = chance(r, 0.3);
        let greedy = chance(r, 0.6);
        let top_k = if !greedy && chance(r, 0.5) { 20 } else { 0 };
        let logprobs = chance(r, 0.25).then(|| 1 + below(r, 3));
        let tenant = below(r, 3);
        let share = Share {
            tenant: Arc::from(["t0", "t1", "t2"][tenant]),
            weight: [1.0, 2.0, 0.5][tenant],
            priority: if chance(r, 0.15) { -1 } else { 0 },
        };
        for _ in 0..copies {
            // the receiver dropped: at once (still in the request channel), or some turns on
            let abort_after =
                chance(r, 0.12).then(|| if chance(r, 0.25) { 0 } else { 1 + below(r, 30) });
            reqs.push(Req {
                id: reqs.len() as u64,
                prompt: prompt.clone(),
                max_tokens,
                min_tokens,
                ignore_eos,
                greedy,
                top_k,
                logprobs,
                arrive: t,
                abort_after,
                share: share.clone(),
                state: State::Unsent,
                rx: None,
                scheduled: None,
                tokens: Vec::new(),
                logprobs_seen: Vec::new(),
                finish: None,
                closed: false,
            });
        }
    }
    (reqs, dups)
}

impl Req {
    /// Check one event against what this request has seen so far.
    fn see(&mut self, ev: Event) {
        let id = self.id;
        assert!(
            self.finish.is_none(),
            "request {id}: {ev:?} after its terminal event"
        );
        match ev {
            Event::Scheduled { cached_tokens } => {
                assert!(self.scheduled.is_none(), "request {id}: a second Scheduled");
                let full = (self.prompt.len() - 1) / CFG.block_size * CFG.block_size;
                assert!(
                    cached_tokens % CFG.block_size == 0 && cached_tokens <= full,
                    "request {id}: {cached_tokens} cached tokens of a {}-token prompt",
                    self.prompt.len()
                );
                self.scheduled = Some(cached_tokens);
            }
            Event::Token { id: tok, logprob } => {
                assert!(
                    self.scheduled.is_some(),
                    "request {id}: a token before Scheduled"
                );
                assert!(
                    self.tokens.len() < self.max_tokens,
                    "request {id}: more than max_tokens {}",
                    self.max_tokens
                );
                assert!((tok as usize) < VOCAB, "request {id}: token {tok}");
                assert!(
                    self.ignore_eos || !EOG.contains(&tok),
                    "request {id}: end-of-generation token {tok} given as a token"
                );
                match (self.logprobs, logprob) {
                    (None, None) => {}
                    (Some(k), Some(lp)) => {
                        assert_eq!(lp.top.len(), k, "request {id}: top-k size");
                        assert!(lp.logprob <= 1e-6, "request {id}: log-probability > 0");
                        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                        assert!(lp.logprob <= lp.top[0].1 + 1e-6);
                        self.logprobs_seen.push(lp.logprob);
                    }
                    (want, got) => {
                        panic!("request {id}: logprobs {want:?} asked, {got:?} given")
                    }
                }
                self.tokens.push(tok);
            }
            Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
            } => {
                assert!(
                    self.scheduled.is_some(),
                    "request {id}: Done before Scheduled"
                );
                assert_eq!(
                    prompt_tokens,
                    self.prompt.len(),
                    "request {id}: prompt_tokens"
                );
                assert_eq!(
                    Some(cached_tokens),
                    self.scheduled,
                    "request {id}: Done's cached_tokens against Scheduled's"
                );
                let g = self.tokens.len();
                match finish {
                    Finish::Eos => assert!(
                        !self.ignore_eos && g >= self.min_tokens && g < self.max_tokens,
                        "request {id}: Eos after {g} tokens (min {}, max {}, ignore_eos {})",
                        self.min_tokens,
                        self.max_tokens,
                        self.ignore_eos
                    ),
                    Finish::Length => assert!(
                        g == self.max_tokens || self.prompt.len() + g >= CFG.max_model_len,
                        "request {id}: Length after {g} tokens (max {})",
                        self.max_tokens
                    ),
                }
                self.finish = Some(finish);
            }
            Event::Error(e) => panic!("request {id}: unexpected error: {e}"),
        }
    }
}

impl World {
    /// One turn of the loop: see the events, check the scheduler, then act (aborts, arrivals).
    fn turn(&mut self, s: &Scheduler) {
        self.turn += 1;
        self.cov.turns += 1;
        assert!(self.turn < MAX_TURNS, "stuck: {} turns", self.turn);
        // the events every open stream has seen since the last turn
        for q in &mut self.reqs {
            if q.state != State::Live || q.closed {
                continue;
            }
            let mut rx = q.rx.take().unwrap();
            loop {
                match rx.try_recv() {
                    Ok(ev) => q.see(ev),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        q.closed = true;
                        break;
                    }
                }
            }
            q.rx = Some(rx);
        }
        self.check(s);
        self.act(s);
    }

    fn check(&mut self, s: &Scheduler) {
        let bs = CFG.block_size;
        let pool = &s.pool;
        assert_eq!(pool.num_blocks(), CFG.num_blocks);
        assert_eq!(pool.block_size(), bs);
        pool.check_invariants();
        Self::check_blocks(s);

        // every sequence is one live request, once
        let mut held: HashMap<u64, (bool, &Seq)> = HashMap::new();
        for (running, q) in s
            .waiting
            .iter()
            .map(|q| (false, q))
            .chain(s.running.iter().map(|q| (true, q)))
        {
            let id = q.req.params.seed;
            assert!(
                held.insert(id, (running, q)).is_none(),
                "request {id} held twice"
            );
        }
        assert!(s.running.len() <= CFG.max_num_seqs);

        for q in &mut self.reqs {
            let id = q.id;
            match q.state {
                State::Unsent => assert!(!held.contains_key(&id)),
                State::Aborted => assert!(
                    !held.contains_key(&id),
                    "request {id}: still held a step after its receiver was dropped"
                ),
                State::Finished => assert!(!held.contains_key(&id), "request {id}: back"),
                State::Live => {
                    if let Some(finish) = q.finish {
                        assert!(
                            !held.contains_key(&id),
                            "request {id}: still held after its terminal event"
                        );
                        assert!(
                            q.closed,
                            "request {id}: stream open after its terminal event"
                        );
                        q.state = State::Finished;
                        q.rx = None;
                        match finish {
                            Finish::Eos => self.cov.eos += 1,
                            Finish::Length if q.tokens.len() < q.max_tokens => {
                                self.cov.context_end += 1
                            }
                            Finish::Length => self.cov.length += 1,
                        }
                        continue;
                    }
                    assert!(
                        !q.closed,
                        "request {id}: its stream ended with no terminal event"
                    );
                    let &(running, seq) = held
                        .get(&id)
                        .unwrap_or_else(|| panic!("request {id}: lost (not held, not finished)"));
                    check_seq(q, running, seq);
                }
            }
        }
        let live = self.reqs.iter().filter(|q| q.state == State::Live).count();
        assert_eq!(held.len(), live, "sequences held against live requests");

        // the blocks: a reference per holder, no block twice in one table, every used block held
        let mut holders = [0u32; CFG.num_blocks];
        for (_, seq) in held.values() {
            let mut own = HashSet::new();
            for &b in &seq.blocks {
                assert!(own.insert(b), "block {b} twice in one block table");
                holders[b as usize] += 1;
            }
        }
        for (b, &h) in holders.iter().enumerate() {
            assert_eq!(
                pool.refcount(b as u32),
                h,
                "block {b}: refcount against the sequences holding it"
            );
            if h > 1 {
                self.cov.shared_blocks_seen += 1;
            }
        }
        let used = holders.iter().filter(|&&h| h > 0).count();
        assert_eq!(pool.num_used(), used);
        assert_eq!(pool.num_free() + pool.num_used(), CFG.num_blocks);

        // gauges (published at the end of the previous turn; the channel is empty)
        let m = &self.metrics;
        assert_eq!(m.running.get(), s.running.len() as u64, "running gauge");
        assert_eq!(m.waiting.get(), s.waiting.len() as u64, "waiting gauge");
        let waiting_tokens: usize = s.waiting.iter().map(|q| q.prompt_len).sum();
        assert_eq!(
            m.waiting_tokens.get(),
            waiting_tokens as u64,
            "waiting_tokens gauge"
        );
        assert_eq!(m.kv_blocks_used.get(), used as u64, "kv_blocks_used gauge");
        assert_eq!(
            m.prefix_queries.get(),
            pool.stats.queries,
            "prefix_queries gauge"
        );
        assert_eq!(m.prefix_hits.get(), pool.stats.hits, "prefix_hits gauge");
        assert!(pool.stats.hits <= pool.stats.queries);

        // counters only grow; a sequence that went from running back to waiting was preempted
        let preemptions = m.preemptions.get();
        assert!(preemptions >= self.last_preemptions);
        assert!(pool.stats.queries >= self.last_queries && pool.stats.hits >= self.last_hits);
        let requeued = s
            .waiting
            .iter()
            .filter(|q| self.was_running.contains(&q.req.params.seed))
            .count();
        assert!(
            preemptions - self.last_preemptions >= requeued as u64,
            "{requeued} sequences went back to the queue, {} preemptions counted",
            preemptions - self.last_preemptions
        );
        self.cov.preemptions_seen += requeued;
        self.last_preemptions = preemptions;
        self.last_queries = pool.stats.queries;
        self.last_hits = pool.stats.hits;
        self.was_running = s.running.iter().map(|q| q.req.params.seed).collect();
    }
}

/// A held sequence against its request's model.
fn check_seq(q: &Req, running: bool, seq: &Seq) {
    {
        let (id, bs) = (q.id, CFG.block_size);
        assert_eq!(seq.prompt_len, q.prompt.len());
        assert_eq!(
            &seq.tokens[..seq.prompt_len],
            &q.prompt[..],
            "request {id}: prompt"
        );
        assert_eq!(
            &seq.tokens[seq.prompt_len..],
            &q.tokens[..],
            "request {id}: generated tokens against the tokens streamed"
        );
        assert_eq!(seq.generated, q.tokens.len());
        assert!(seq.generated <= q.max_tokens);
        assert!(
            seq.known() < CFG.max_model_len,
            "request {id}: past the context"
        );
        assert!(seq.computed <= seq.known());
        assert_eq!(seq.started, q.scheduled.is_some(), "request {id}: started");
        if let Some(c) = q.scheduled {
            assert_eq!(seq.cached_tokens, c, "request {id}: cached_tokens");
        }
        if !running {
            assert!(
                seq.blocks.is_empty() && seq.hashes.is_empty() && seq.computed == 0,
                "request {id}: waiting with {} blocks, {} computed",
                seq.blocks.len(),
                seq.computed
            );
            return;
        }
        assert!(
            seq.started,
            "request {id}: running before Scheduled was sent"
        );
        assert_eq!(
            seq.blocks.len(),
            seq.computed.div_ceil(bs),
            "request {id}: blocks against computed tokens"
        );
        assert_eq!(
            seq.hashes.len(),
            seq.computed / bs,
            "request {id}: registered blocks"
        );
    }
}

impl World {
    /// The blocks of one running sequence against the pool: its full blocks carry its hash
    /// chain, its partial block is its own.
    fn check_blocks(s: &Scheduler) {
        let bs = CFG.block_size;
        for seq in &s.running {
            let id = seq.req.params.seed;
            let mut parent = None;
            for (j, h) in seq.hashes.iter().enumerate() {
                let want = hash_block(
                    parent.as_ref(),
                    seq.req.cache_salt,
                    &seq.tokens[j * bs..(j + 1) * bs],
                );
                assert_eq!(*h, want, "request {id}: hash of block {j}");
                assert_eq!(
                    s.pool.hash_of(seq.blocks[j]),
                    Some(*h),
                    "request {id}: block {j} ({}) holds another hash",
                    seq.blocks[j]
                );
                parent = Some(*h);
            }
            for &b in &seq.blocks[seq.hashes.len()..] {
                assert_eq!(
                    s.pool.refcount(b),
                    1,
                    "request {id}: block {b} is being written while shared"
                );
                assert_eq!(
                    s.pool.hash_of(b),
                    None,
                    "request {id}: block {b} is partial"
                );
            }
        }
    }

    fn act(&mut self, s: &Scheduler) {
        let where_is = |id: u64| {
            if s.running.iter().any(|q| q.req.params.seed == id) {
                AbortedIn::Running
            } else {
                AbortedIn::Waiting
            }
        };
        // aborts that are due
        for q in &mut self.reqs {
            if q.state == State::Live
                && q.finish.is_none()
                && q.abort_after.is_some_and(|a| q.arrive + a == self.turn)
            {
                q.rx = None;
                q.state = State::Aborted;
                *self.cov.aborted.entry(where_is(q.id)).or_default() += 1;
            }
        }
        // arrivals that are due, or the next ones if the scheduler would wait for them
        let idle = s.waiting.is_empty() && s.running.is_empty();
        let next = self
            .reqs
            .iter()
            .filter(|q| q.state == State::Unsent)
            .map(|q| q.arrive)
            .min();
        let now = match next {
            Some(t) if t <= self.turn => Some(t),
            Some(t) if idle => {
                let shift = t - self.turn;
                for q in &mut self.reqs {
                    if q.state == State::Unsent {
                        q.arrive -= shift;
                    }
                }
                Some(self.turn)
            }
            _ => None,
        };
        let Some(_) = now else {
            if idle && next.is_none() {
                assert!(
                    self.reqs
                        .iter()
                        .all(|q| matches!(q.state, State::Finished | State::Aborted)),
                    "idle with requests outstanding"
                );
                self.handle = None; // run returns
            }
            return;
        };
        let handle = self.handle.as_ref().unwrap();
        for q in &mut self.reqs {
            if q.state != State::Unsent || q.arrive > self.turn {
                continue;
            }
            let (tx, rx) = unbounded_channel();
            handle
                .submit(EngineRequest {
                    prompt: q.prompt.clone(),
                    params: SamplingParams {
                        temperature: if q.greedy { 0.0 } else { 0.8 },
                        top_k: q.top_k,
                        seed: q.id,
                        ..Default::default()
                    },
                    max_tokens: q.max_tokens,
                    min_tokens: q.min_tokens,
                    ignore_eos: q.ignore_eos,
                    logit_bias: vec![],
                    logprobs: q.logprobs,
                    constraint: None,
                    cache_salt: 0,
                    share: q.share.clone(),
                    events: tx,
                    arrived: std::time::Instant::now(),
                })
                .unwrap();
            q.state = State::Live;
            q.arrive = self.turn;
            if q.abort_after == Some(0) {
                // dropped before the engine has even received it
                q.state = State::Aborted;
                *self.cov.aborted.entry(AbortedIn::Channel).or_default() += 1;
            } else {
                q.rx = Some(rx);
            }
        }
    }
}

/// Replay a finished request on a plain session: greedy tokens are the argmax (EOG masked
/// before `min_tokens`), an Eos stop had an EOG token best, log-probabilities match.
fn replay<B: Backend>(be: &B, model: &Transformer<B>, q: &Req) -> usize {
    let (id, p, g) = (q.id, q.prompt.len(), q.tokens.len());
    let mut sess = Session::new(be, model, CFG.max_model_len + 8, 64).unwrap();
    let mut all = q.prompt.clone();
    all.extend(&q.tokens);
    let logits = sess.feed(&all, Logits::From(p - 1)).unwrap();
    assert_eq!(logits.len(), (g + 1) * VOCAB);
    let row = |k: usize| &logits[k * VOCAB..(k + 1) * VOCAB];
    let best = |l: &[f32], skip_eog: bool| {
        l.iter()
            .enumerate()
            .filter(|&(t, _)| !(skip_eog && EOG.contains(&(t as u32))))
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max)
    };
    for (k, &tok) in q.tokens.iter().enumerate() {
        let l = row(k);
        if q.greedy {
            let b = best(l, k < q.min_tokens);
            assert!(
                l[tok as usize] >= b - EPS,
                "request {id}: token {k} ({tok}) has logit {} where the best is {b}",
                l[tok as usize]
            );
        }
        if q.logprobs.is_some() {
            let want = log_softmax(l)[tok as usize];
            let got = q.logprobs_seen[k];
            assert!(
                (want - got).abs() < EPS,
                "request {id}: token {k} log-probability {got}, replayed {want}"
            );
        }
    }
    if q.greedy && q.finish == Some(Finish::Eos) {
        let l = row(g);
        let eog = l[EOG.start as usize..EOG.end as usize]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert!(
            eog >= best(l, false) - EPS,
            "request {id}: stopped at an EOG token that was not the best"
        );
    }
    g
}

fn run_seed(be: &CpuBackend, model: &Transformer<CpuBackend>, seed: u64, cov: &mut Coverage) {
    let mut rnd = Rnd::new(seed);
    let (reqs, dups) = plan(&mut rnd);
    cov.requests += reqs.len();
    cov.duplicate_groups += dups;
    let metrics = Arc::new(Metrics::new("tiny"));
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = EngineHandle {
        tx,
        metrics: metrics.clone(),
        status: Arc::new(EngineStatus::default()),
    };
    let world = Arc::new(Mutex::new(World {
        reqs,
        handle: Some(handle),
        metrics: metrics.clone(),
        turn: 0,
        was_running: HashSet::new(),
        last_preemptions: 0,
        last_queries: 0,
        last_hits: 0,
        cov: Coverage::default(),
    }));
    let mut sched = Scheduler::new(CFG, EOG.collect(), metrics.clone());
    let w = world.clone();
    sched.on_turn = Some(Box::new(move |s: &Scheduler| w.lock().unwrap().turn(s)));
    let kv = be
        .alloc_kv(model.kv_shape(CFG.num_blocks, CFG.block_size))
        .unwrap();
    sched.run(be, model, kv, rx).expect("the step loop failed");
    sched.on_turn = None;

    // the end: nothing held, every block free (some still in the prefix cache), gauges zero
    let mut w = world.lock().unwrap();
    assert!(sched.waiting.is_empty() && sched.running.is_empty());
    assert!(w
        .reqs
        .iter()
        .all(|q| matches!(q.state, State::Finished | State::Aborted)));
    sched.pool.check_invariants();
    assert_eq!(sched.pool.num_free(), CFG.num_blocks, "blocks leaked");
    assert!((0..CFG.num_blocks as u32).all(|b| sched.pool.refcount(b) == 0));
    for (name, g) in [
        ("running", &metrics.running),
        ("waiting", &metrics.waiting),
        ("waiting_tokens", &metrics.waiting_tokens),
        ("kv_blocks_used", &metrics.kv_blocks_used),
    ] {
        assert_eq!(g.get(), 0, "{name} gauge at the end");
    }
    assert_eq!(metrics.prefix_hits.get(), sched.pool.stats.hits);

    let c = std::mem::take(&mut w.cov);
    cov.preemptions += metrics.preemptions.get();
    cov.block_hits += sched.pool.stats.hits;
    cov.preemptions_seen += c.preemptions_seen;
    cov.shared_blocks_seen += c.shared_blocks_seen;
    cov.eos += c.eos;
    cov.length += c.length;
    cov.context_end += c.context_end;
    cov.turns += c.turns;
    for (k, v) in c.aborted {
        *cov.aborted.entry(k).or_default() += v;
    }
    for q in w.reqs.iter().filter(|q| q.state == State::Finished) {
        if q.scheduled.unwrap() > 0 {
            cov.cached_prompts += 1;
        }
        cov.replayed_tokens += replay(be, model, q);
    }
}

#[test]
fn scheduler_model_test() {
    let be = CpuBackend::new(MatmulMode::Exact);
    let src = ModelSource::open(std::path::Path::new("random:tiny:bf16:1")).unwrap();
    let model = Transformer::load(&be, &src).unwrap();
    assert_eq!(model.cfg.vocab_size, VOCAB);
    let mut cov = Coverage::default();
    for seed in SEEDS {
        run_seed(&be, &model, seed, &mut cov);
    }
    eprintln!("{cov:?}");
    // the run exercised what it checks
    assert!(
        cov.preemptions > 0 && cov.preemptions_seen > 0,
        "no preemption: {cov:?}"
    );
    assert!(
        cov.block_hits > 0 && cov.cached_prompts > 0,
        "no prefix hit: {cov:?}"
    );
    assert!(cov.shared_blocks_seen > 0, "no block shared: {cov:?}");
    assert!(cov.duplicate_groups > 0);
    for place in [AbortedIn::Channel, AbortedIn::Waiting, AbortedIn::Running] {
        assert!(
            cov.aborted.get(&place).is_some_and(|&n| n > 0),
            "no abort in {place:?}: {cov:?}"
        );
    }
    assert!(
        cov.eos > 0 && cov.length > 0 && cov.context_end > 0,
        "{cov:?}"
    );
    assert!(cov.replayed_tokens > 0);
}
