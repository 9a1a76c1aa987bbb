//! Every CUDA kernel, run on the CPU by the fiber executor (crates/kexec), through the GPU
//! backend's own launch code, against the CPU backend's op:
//! - fresh random inputs each run (the seed is printed: KOJO_TEST_SEED replays it);
//! - every device buffer starts poisoned (0xff bytes: NaN), with a guard zone after it that is
//!   checked when it is freed, so an element a kernel forgets to write, or one it writes past
//!   its buffer, fails the test;
//! - ragged batches and odd sizes (rows not a multiple of a block's, contexts over one split,
//!   query groups over one block);
//! - then whole models, CPU against GPU backend, logits and greedy tokens: tiny random ones of
//!   each architecture, the serving engine with batched requests, and the real SmolLM2.
//!
//! `every_kernel_is_tested` checks that the tests launched every kernel the sources define.

mod common;

use common::tiny::*;
use kojo::backend::cpu::{CpuBackend, MatmulMode};
use kojo::backend::gpu::selftest::SelfTest;
use kojo::backend::gpu::{Arg, Device, GemmType, GpuBackend, Grid};
use kojo::formats::GgmlType;
use kojo::model::session::{Logits, Session};
use kojo::model::{ModelSource, Transformer};
use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

const GUARD: usize = 64;
/// What the executor says it has: small, so that the attention split sizing (which aims to
/// fill the device) varies across the tests' batches.
const SMS: usize = 4;
const GUARD_BYTE: u8 = 0xa5;

/// Device memory that is host memory; launches run the kernels on the CPU. Recording
/// (graphs) is modeled as CUDA does it: nothing runs while recording; memory allocated while
/// recording belongs to the graph (poisoned again at every launch), and what the graph does not
/// free itself (its output) must be freed before it is launched again; uploads, downloads,
/// waiting, and freeing memory from outside the recording are errors while recording.
#[derive(Default)]
struct HostDevice {
    /// pointer -> size
    live: Mutex<BTreeMap<u64, usize>>,
    launched: Mutex<BTreeSet<String>>,
    overruns: Mutex<Vec<String>>,
    recording: Mutex<Option<Recording>>,
    graphs: Mutex<BTreeMap<u64, HostGraph>>,
    graph_launches: std::sync::atomic::AtomicUsize,
}

#[derive(Clone)]
enum Op {
    Launch(String, Grid, Vec<Arg>),
    Zero(u64, usize),
    Copy(u64, u64, usize),
    Gemm(GemmType, [usize; 3], [u64; 3]),
}

#[derive(Default)]
struct Recording {
    ops: Vec<Op>,
    allocs: Vec<(u64, usize)>,
    freed: BTreeSet<u64>,
}

struct HostGraph {
    ops: Vec<Op>,
    allocs: Vec<(u64, usize)>,
    /// allocated by the graph, not freed by it
    outputs: Vec<u64>,
    /// the outputs of the last launch are not freed yet
    held: bool,
}

impl HostDevice {
    fn recording(&self) -> bool {
        self.recording.lock().unwrap().is_some()
    }

    /// Free for real, checking the guard zone.
    unsafe fn release(&self, ptr: u64) {
        let bytes = self
            .live
            .lock()
            .unwrap()
            .remove(&ptr)
            .expect("free of an unknown pointer");
        let p = ptr as *mut u8;
        let guard = std::slice::from_raw_parts(p.add(bytes), GUARD);
        if guard.iter().any(|&b| b != GUARD_BYTE) {
            self.overruns
                .lock()
                .unwrap()
                .push(format!("a kernel wrote past a buffer of {bytes} bytes"));
        }
        std::alloc::dealloc(p, Self::layout(bytes));
    }

    unsafe fn run(&self, op: &Op) -> anyhow::Result<()> {
        match op {
            Op::Launch(name, g, args) => {
                self.launched.lock().unwrap().insert(name.to_string());
                let mut params: Vec<_> = args.iter().map(|a| a.as_param()).collect();
                let sizes: Vec<usize> = args.iter().map(|a| a.size()).collect();
                kexec::launch(name, g.grid, g.block, 0, &mut params, &sizes)
                    .map_err(anyhow::Error::msg)
            }
            &Op::Zero(dst, bytes) => {
                self.check_range(dst, bytes);
                std::ptr::write_bytes(dst as *mut u8, 0, bytes);
                Ok(())
            }
            &Op::Copy(dst, src, bytes) => {
                self.check_range(dst, bytes);
                self.check_range(src, bytes);
                std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes);
                Ok(())
            }
            &Op::Gemm(ty, [n, k, m], [a, b, c]) => {
                self.host_gemm(ty, n, k, m, a, b, c);
                Ok(())
            }
        }
    }

    /// Run `op` now, or add it to the recording.
    unsafe fn submit(&self, op: Op) -> anyhow::Result<()> {
        if let Some(r) = self.recording.lock().unwrap().as_mut() {
            r.ops.push(op);
            return Ok(());
        }
        self.run(&op)
    }

    fn no_recording(&self, what: &str) -> anyhow::Result<()> {
        if self.recording() {
            anyhow::bail!("{what} while recording");
        }
        Ok(())
    }

    /// The matrix library's twin: plain loops, f64 sums of the rounded operands.
    #[allow(clippy::too_many_arguments)]
    unsafe fn host_gemm(&self, ty: GemmType, n: usize, k: usize, m: usize, a: u64, b: u64, c: u64) {
        self.launched.lock().unwrap().insert("(gemm)".into());
        self.check_range(a, n * k * 2);
        self.check_range(b, m * k * 2);
        self.check_range(c, n * m * 4);
        let widen = |bits: u16| match ty {
            GemmType::Bf16 => half::bf16::from_bits(bits).to_f64(),
            GemmType::F16 => half::f16::from_bits(bits).to_f64(),
        };
        let (a, b) = (
            std::slice::from_raw_parts(a as *const u16, n * k),
            std::slice::from_raw_parts(b as *const u16, m * k),
        );
        let c = std::slice::from_raw_parts_mut(c as *mut f32, n * m);
        for i in 0..n {
            for j in 0..m {
                let s: f64 = (0..k)
                    .map(|x| widen(a[i * k + x]) * widen(b[j * k + x]))
                    .sum();
                c[i * m + j] = s as f32;
            }
        }
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes + GUARD, 256).unwrap()
    }

    /// Panics unless `ptr .. ptr + len` is inside one live allocation.
    fn check_range(&self, ptr: u64, len: usize) {
        let live = self.live.lock().unwrap();
        let ok = live
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&p, &n)| ptr + len as u64 <= p + n as u64);
        assert!(
            ok,
            "host copy of {len} bytes at {ptr:#x} outside any allocation"
        );
    }
}

impl Device for HostDevice {
    fn describe(&self) -> String {
        "CPU fiber executor".into()
    }

    fn alloc(&self, bytes: usize) -> anyhow::Result<u64> {
        // SAFETY: non-zero size
        let p = unsafe { std::alloc::alloc(Self::layout(bytes)) };
        assert!(!p.is_null());
        // SAFETY: the allocation holds bytes + GUARD
        unsafe {
            std::ptr::write_bytes(p, 0xff, bytes);
            std::ptr::write_bytes(p.add(bytes), GUARD_BYTE, GUARD);
        }
        self.live.lock().unwrap().insert(p as u64, bytes);
        if let Some(r) = self.recording.lock().unwrap().as_mut() {
            r.allocs.push((p as u64, bytes));
        }
        Ok(p as u64)
    }

    unsafe fn free(&self, ptr: u64) {
        if let Some(r) = self.recording.lock().unwrap().as_mut() {
            assert!(
                r.allocs.iter().any(|&(p, _)| p == ptr),
                "a recording frees memory allocated outside it"
            );
            r.freed.insert(ptr);
            return;
        }
        for g in self.graphs.lock().unwrap().values_mut() {
            if g.outputs.contains(&ptr) {
                assert!(g.held, "a graph's output freed twice");
                g.held = false;
                return;
            }
        }
        self.release(ptr);
    }

    unsafe fn upload(&self, dst: u64, src: &[u8]) -> anyhow::Result<()> {
        self.no_recording("an upload")?;
        self.check_range(dst, src.len());
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn download(&self, src: u64, dst: &mut [u8]) -> anyhow::Result<()> {
        self.no_recording("a download")?;
        self.check_range(src, dst.len());
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> anyhow::Result<()> {
        self.submit(Op::Copy(dst, src, bytes))
    }

    fn synchronize(&self) -> anyhow::Result<()> {
        self.no_recording("waiting for the device")
    }

    fn begin_capture(&self) -> anyhow::Result<()> {
        let mut r = self.recording.lock().unwrap();
        anyhow::ensure!(r.is_none(), "already recording");
        *r = Some(Recording::default());
        Ok(())
    }

    fn end_capture(&self) -> anyhow::Result<u64> {
        let r = self.recording.lock().unwrap().take();
        let r = r.ok_or_else(|| anyhow::anyhow!("not recording"))?;
        let outputs = r
            .allocs
            .iter()
            .map(|&(p, _)| p)
            .filter(|p| !r.freed.contains(p))
            .collect();
        let mut graphs = self.graphs.lock().unwrap();
        let id = graphs.keys().next_back().map_or(1, |k| k + 1);
        graphs.insert(
            id,
            HostGraph {
                ops: r.ops,
                allocs: r.allocs,
                outputs,
                held: false,
            },
        );
        Ok(id)
    }

    unsafe fn launch_graph(&self, graph: u64) -> anyhow::Result<()> {
        self.no_recording("launching a graph")?;
        let (ops, allocs) = {
            let mut graphs = self.graphs.lock().unwrap();
            let g = graphs.get_mut(&graph).expect("launch of an unknown graph");
            anyhow::ensure!(!g.held, "graph relaunched before its output was freed");
            g.held = !g.outputs.is_empty();
            (g.ops.clone(), g.allocs.clone())
        };
        // the graph's memory holds nothing from its last launch
        for (p, bytes) in allocs {
            std::ptr::write_bytes(p as *mut u8, 0xff, bytes);
        }
        self.graph_launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for op in &ops {
            self.run(op)?;
        }
        Ok(())
    }

    unsafe fn drop_graph(&self, graph: u64) {
        let g = self
            .graphs
            .lock()
            .unwrap()
            .remove(&graph)
            .expect("unknown graph");
        for (p, _) in g.allocs {
            // an output still held stays until its tensor frees it
            if !(g.held && g.outputs.contains(&p)) {
                self.release(p);
            }
        }
    }

    fn multiprocessors(&self) -> usize {
        SMS
    }

    unsafe fn zero(&self, dst: u64, bytes: usize) -> anyhow::Result<()> {
        self.submit(Op::Zero(dst, bytes))
    }

    unsafe fn gemm(
        &self,
        ty: GemmType,
        n: usize,
        k: usize,
        m: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> anyhow::Result<bool> {
        self.submit(Op::Gemm(ty, [n, k, m], [a, b, c]))?;
        Ok(true)
    }

    unsafe fn launch(&self, name: &str, g: Grid, args: &[Arg]) -> anyhow::Result<()> {
        self.submit(Op::Launch(name.to_string(), g, args.to_vec()))
    }
}

/// Run `f` on a fresh GPU backend over the CPU executor; every check must pass and no kernel
/// may have written past a buffer. Returns the kernels launched.
fn run(f: impl FnOnce(&mut SelfTest) -> anyhow::Result<()>) -> BTreeSet<String> {
    let dev = Arc::new(HostDevice::default());
    let gpu = GpuBackend::new(dev.clone());
    let seed = test_rnd().u64();
    let mut st = SelfTest::new(&gpu, seed);
    f(&mut st).unwrap();
    for c in &st.checks {
        eprintln!(
            "{:<60} max {:.2e} (tol {:.0e}), L2 {:.2e}",
            c.name, c.max_rel, c.tol, c.rel_l2
        );
    }
    let failed: Vec<String> = st.failures().iter().map(|c| format!("{c:?}")).collect();
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    assert!(!st.checks.is_empty());
    drop(st);
    drop(gpu);
    let overruns = dev.overruns.lock().unwrap();
    assert!(overruns.is_empty(), "{overruns:?}");
    let launched = dev.launched.lock().unwrap().clone();
    launched
}

#[test]
fn matmul_every_weight_type() {
    run(|st| st.matmul());
}

#[test]
fn embedding_every_weight_type() {
    run(|st| st.embed());
}

#[test]
fn norms_activations_and_row_ops() {
    run(|st| {
        st.rows()?;
        st.rope()
    });
}

#[test]
fn paged_attention_ragged_batch() {
    run(|st| {
        st.attention(6, 2, 64, None)?;
        // a query group wider than one block (10 heads on one KV head), a sliding window
        st.attention(10, 1, 32, Some(20))?;
        // prefill tiles of one token when 20 heads of 256 share a KV head
        st.attention(20, 1, 256, Some(40))
    });
}

#[test]
fn greedy_and_top_k_sampling() {
    run(|st| st.sampling());
}

/// What `kojo gpu-check` runs on a GPU, here on the executor: every kernel the sources define
/// is launched by it.
#[test]
fn every_kernel_is_tested() {
    let launched = run(|st| st.all());
    let all: BTreeSet<String> = kexec::kernel_names().into_iter().collect();
    let untested: Vec<_> = all.difference(&launched).collect();
    assert!(
        untested.is_empty(),
        "kernels no check launches: {untested:?}"
    );
}

/// `t` written as a GGUF file (random weights from `r`) and opened; the folder lives as long as
/// the returned guard.
fn open_tiny(t: &Tiny, r: &mut kojo::model::random::Rnd) -> (tempfile::TempDir, ModelSource) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny(t, r, &path);
    let src = ModelSource::open(&path).unwrap();
    (dir, src)
}

/// A tiny random model on both backends: logits of a prompt and of greedy decoding. `fused`:
/// Q/K/V and gate/up are of one type each, so the GPU stacks them and takes the fused path
/// (checked by the kernels it launched); else it runs the separate ops.
fn check_model(t: Tiny, fused: bool) {
    let mut r = test_rnd();
    let (_dir, src) = open_tiny(&t, &mut r);
    let cpu = CpuBackend::new(MatmulMode::Exact);
    let dev = Arc::new(HostDevice::default());
    let gpu = GpuBackend::new(dev.clone());
    let cm = Transformer::load(&cpu, &src).unwrap();
    let gm = Transformer::load(&gpu, &src).unwrap();
    let mut cs = Session::new(&cpu, &cm, 64, 8).unwrap();
    let mut gs = Session::new(&gpu, &gm, 64, 8).unwrap();
    let vocab = t.vocab.unwrap() as u32;
    let prompt: Vec<u32> = (0..11).map(|_| (r.u64() % vocab as u64) as u32).collect();
    let want = Logits::Last;
    let mut c = cs.feed(&prompt, want).unwrap();
    let mut g = gs.feed(&prompt, want).unwrap();
    for step in 0..6 {
        let mut st = SelfTest::new(&gpu, 0);
        st.compare(&format!("{} logits at step {step}", t.arch), &g, &c, 2e-4);
        assert!(st.failures().is_empty(), "{:?}", st.checks);
        let (ci, gi) = (kojo::sampling::argmax(&c), kojo::sampling::argmax(&g));
        assert_eq!(gi, ci, "{}: greedy token at step {step}", t.arch);
        c = cs.feed(&[ci], want).unwrap();
        g = gs.feed(&[gi], want).unwrap();
    }
    let launched = dev.launched.lock().unwrap().clone();
    let took = |k: &str| launched.iter().any(|n| n.starts_with(k));
    assert_eq!(
        (took("qkv_post"), took("matmul_glu_"), took("rope")),
        (fused, fused, !fused),
        "{}: fused ops taken: {launched:?}",
        t.arch
    );
    drop(gs);
    drop(gm);
    drop(gpu);
    assert!(dev.overruns.lock().unwrap().is_empty());
}

#[test]
fn tiny_llama_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(
        Tiny {
            arch: "llama",
            types: [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, Q4_0, Q8_0],
            output: Some(F16),
            layers: 2,
            rope_freqs: true,
            vocab: Some(96),
        },
        false,
    );
}

#[test]
fn tiny_qwen2_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(
        Tiny {
            arch: "qwen2",
            types: [Q4K, Q5K, Q6K, Q4K, Q6K, Q4K, Q6K, Q8_0],
            output: None,
            layers: 2,
            rope_freqs: false,
            vocab: Some(96),
        },
        false,
    );
}

#[test]
fn tiny_gemma3_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(
        Tiny {
            arch: "gemma3",
            types: [Q5_0, Q8_0, F32, Q4K, BF16, Q5_0, Q6K, Q8_0],
            output: None,
            layers: 7,
            rope_freqs: false,
            vocab: Some(96),
        },
        false,
    );
}

/// The same architectures with Q/K/V and gate/up each of one type: stacked on the GPU, one
/// projection each, RoPE, head norms and the cache write fused after the QKV projection, the
/// activation fused into the gate/up projection.
#[test]
fn tiny_models_fused_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(
        Tiny {
            arch: "llama",
            types: [Q4K, Q4K, Q4K, Q6K, Q5_0, Q5_0, Q8_0, Q8_0],
            output: Some(Q6K),
            layers: 2,
            rope_freqs: true,
            vocab: Some(96),
        },
        true,
    );
    check_model(
        Tiny {
            arch: "qwen2",
            types: [Q8_0, Q8_0, Q8_0, Q4K, Q6K, Q6K, Q4_1, Q8_0],
            output: None,
            layers: 2,
            rope_freqs: false,
            vocab: Some(96),
        },
        true,
    );
    check_model(
        Tiny {
            arch: "gemma3",
            types: [BF16, BF16, BF16, Q4K, F16, F16, Q6K, Q8_0],
            output: None,
            layers: 7,
            rope_freqs: false,
            vocab: Some(96),
        },
        true,
    );
}

/// One request for [`run_engine`]: prompt, sampling, max_tokens, ignore_eos, logprobs, grammar.
type TestRequest = (
    Vec<u32>,
    kojo::sampling::SamplingParams,
    usize,
    bool,
    Option<usize>,
    Option<kojo::structured::Constraint>,
);

/// Run `reqs` together through the serving engine on `be` over the model at `path` (a small
/// scheduler: 16-token blocks, at most 24 tokens a step); each request's ids and
/// log-probabilities.
fn run_engine<B: kojo::backend::Backend + Send + 'static>(
    be: B,
    path: &std::path::Path,
    eog: Vec<u32>,
    reqs: Vec<TestRequest>,
) -> Vec<(Vec<u32>, Vec<f32>)>
where
    B::KvCache: Send,
    Transformer<B>: Send,
{
    use kojo::engine::metrics::Metrics;
    use kojo::engine::scheduler::SchedulerConfig;
    use kojo::engine::{EngineRequest, Event};
    let src = ModelSource::open(path).unwrap();
    let model = Transformer::load(&be, &src).unwrap();
    let cfg = SchedulerConfig {
        num_blocks: 64,
        block_size: 16,
        max_num_seqs: 8,
        max_batch_tokens: 24,
        max_model_len: 128,
    };
    let metrics = Arc::new(Metrics::new("tiny"));
    let (engine, _join) = kojo::engine::start(be, model, cfg, eog, metrics).unwrap();
    let mut rxs = Vec::new();
    for (prompt, params, max_tokens, ignore_eos, logprobs, constraint) in reqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(EngineRequest {
                prompt,
                params,
                max_tokens,
                min_tokens: 0,
                ignore_eos,
                logit_bias: vec![],
                logprobs,
                constraint,
                cache_salt: 0,
                share: Default::default(),
                events: tx,
                arrived: std::time::Instant::now(),
            })
            .unwrap();
        rxs.push(rx);
    }
    rxs.into_iter()
        .map(|mut rx| {
            let (mut ids, mut lps) = (Vec::new(), Vec::new());
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Token { id, logprob } => {
                        ids.push(id);
                        lps.extend(logprob.map(|l| l.logprob));
                    }
                    Event::Done { .. } => break,
                    Event::Error(e) => panic!("{e}"),
                    Event::Scheduled { .. } => {}
                }
            }
            (ids, lps)
        })
        .collect()
}

/// The serving engine on the GPU backend (over the executor) against the CPU backend: several
/// requests batched together, prompts longer than a step (chunked prefill), a prompt that
/// shares a cached prefix with another, greedy requests (ids from the backend's argmax) and
/// requests that need the logits (log-probabilities, temperature sampling).
#[test]
fn engine_batches_on_gpu_match_cpu() {
    use kojo::sampling::SamplingParams;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut r = test_rnd();
    use GgmlType::*;
    let t = Tiny {
        arch: "llama",
        types: [Q8_0, Q4K, Q6K, Q4_0, Q8_0, F16, Q5K, Q8_0],
        output: None,
        layers: 2,
        rope_freqs: false,
        vocab: Some(96),
    };
    write_tiny(&t, &mut r, &path);
    let mut prompts: Vec<Vec<u32>> = [37usize, 5, 20]
        .iter()
        .map(|&n| (0..n).map(|_| (r.u64() % 96) as u32).collect())
        .collect();
    // shares its first two blocks with the first prompt
    let mut shared = prompts[0][..32].to_vec();
    shared.extend((0..7).map(|_| (r.u64() % 96) as u32));
    prompts.push(shared);
    // (prompt, temperature, top_k, logprobs): greedy, top-k sampling (drawn by the backend
    // when no request in the step needs the logits), log-probabilities (the logits come back),
    // and full-vocabulary sampling (on the host)
    let reqs: Vec<(usize, f32, usize, Option<usize>)> = vec![
        (0, 0.0, 0, None),
        (1, 0.0, 0, None),
        (2, 0.0, 0, Some(3)),
        (3, 0.8, 20, None),
        (1, 0.9, 0, None),
    ];

    let make = || -> Vec<TestRequest> {
        reqs.iter()
            .map(|&(p, temperature, top_k, logprobs)| {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    seed: 7,
                    ..Default::default()
                };
                (prompts[p].clone(), params, 6, true, logprobs, None)
            })
            .collect()
    };
    let want = run_engine(CpuBackend::new(MatmulMode::Exact), &path, vec![], make());
    let dev = Arc::new(HostDevice::default());
    let got = run_engine(GpuBackend::new(dev.clone()), &path, vec![], make());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0.len(), 6, "request {i}");
        assert_eq!(g.0, w.0, "request {i}: tokens");
        assert_eq!(g.1.len(), w.1.len());
        for (a, b) in g.1.iter().zip(&w.1) {
            assert!((a - b).abs() < 1e-3, "request {i}: logprob {a} vs {b}");
        }
    }
    let launched = dev.launched.lock().unwrap();
    for k in ["attn_prefill", "attn_split"] {
        assert!(launched.contains(k), "{k} was not used");
    }
    // which steps have only plain requests depends on timing; some do
    assert!(
        launched.contains("argmax_rows") || launched.contains("sample_top_k"),
        "no step drew its tokens on the device"
    );
}

/// A device that runs on [`HostDevice`] and fails when armed: the next `fail_allocs`
/// allocations (as when the memory is full), every launch (`fail_launches`), or the next
/// download and everything after it (`fault_at_download`: a kernel fault that CUDA reports at
/// the next synchronizing copy, the context lost from then on). `hold` stops the engine in its
/// next download (the end of a step) until the test lets it go.
#[derive(Default)]
struct FaultyDevice {
    inner: HostDevice,
    fail_allocs: std::sync::atomic::AtomicUsize,
    fail_launches: std::sync::atomic::AtomicBool,
    fault_at_download: std::sync::atomic::AtomicBool,
    lost: std::sync::atomic::AtomicBool,
    /// (tell the test the engine is here, wait for its go)
    hold: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl FaultyDevice {
    /// Stop at the next download: returns (reached, go).
    fn hold_next_download(&self) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        *self.hold.lock().unwrap() = Some((reached_tx, go_rx));
        (reached, go)
    }

    fn check_lost(&self) -> anyhow::Result<()> {
        if self.lost.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("injected: the device is lost");
        }
        Ok(())
    }

    fn check_launch(&self) -> anyhow::Result<()> {
        self.check_lost()?;
        if self.fail_launches.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("injected launch failure");
        }
        Ok(())
    }
}

impl Device for FaultyDevice {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn alloc(&self, bytes: usize) -> anyhow::Result<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let failing = self
            .fail_allocs
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            anyhow::bail!("allocating {bytes} bytes: injected out of memory");
        }
        self.inner.alloc(bytes)
    }

    unsafe fn free(&self, ptr: u64) {
        self.inner.free(ptr)
    }

    unsafe fn upload(&self, dst: u64, src: &[u8]) -> anyhow::Result<()> {
        self.check_lost()?;
        self.inner.upload(dst, src)
    }

    unsafe fn download(&self, src: u64, dst: &mut [u8]) -> anyhow::Result<()> {
        let hold = self.hold.lock().unwrap().take();
        if let Some((reached, go)) = hold {
            reached.send(()).unwrap();
            go.recv().unwrap();
        }
        self.check_lost()?;
        if self
            .fault_at_download
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.lost.store(true, std::sync::atomic::Ordering::SeqCst);
            anyhow::bail!("GPU work failed: injected kernel fault");
        }
        self.inner.download(src, dst)
    }

    unsafe fn zero(&self, dst: u64, bytes: usize) -> anyhow::Result<()> {
        self.check_lost()?;
        self.inner.zero(dst, bytes)
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> anyhow::Result<()> {
        self.check_lost()?;
        self.inner.copy(dst, src, bytes)
    }

    fn synchronize(&self) -> anyhow::Result<()> {
        self.check_lost()?;
        self.inner.synchronize()
    }

    fn multiprocessors(&self) -> usize {
        self.inner.multiprocessors()
    }

    fn begin_capture(&self) -> anyhow::Result<()> {
        self.check_lost()?;
        self.inner.begin_capture()
    }

    fn end_capture(&self) -> anyhow::Result<u64> {
        self.inner.end_capture()
    }

    unsafe fn launch_graph(&self, graph: u64) -> anyhow::Result<()> {
        self.check_launch()?;
        self.inner.launch_graph(graph)
    }

    unsafe fn drop_graph(&self, graph: u64) {
        self.inner.drop_graph(graph)
    }

    unsafe fn launch(&self, name: &str, g: Grid, args: &[Arg]) -> anyhow::Result<()> {
        self.check_launch()?;
        self.inner.launch(name, g, args)
    }

    unsafe fn gemm(
        &self,
        ty: GemmType,
        n: usize,
        k: usize,
        m: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> anyhow::Result<bool> {
        self.check_launch()?;
        self.inner.gemm(ty, n, k, m, a, b, c)
    }
}

/// Issue 14 through the engine on the GPU backend: running out of memory fails the step it
/// happened in (its requests get an error) and the engine serves the next ones, the same
/// tokens as before; a failed launch, or a kernel fault reported by the next download (the
/// device lost), fails every request held, running or waiting, and ends the engine, which says
/// why and refuses new requests. A hold at the end of a step lets the test place requests in
/// the step that fails.
#[test]
fn one_steps_out_of_memory_fails_that_step_only_and_a_launch_failure_ends_the_engine() {
    use kojo::engine::metrics::Metrics;
    use kojo::engine::scheduler::SchedulerConfig;
    use kojo::engine::{EngineHandle, EngineRequest, Event};
    use kojo::sampling::SamplingParams;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;
    use GgmlType::*;

    let mut r = test_rnd();
    let t = Tiny {
        arch: "llama",
        types: [Q8_0, Q4K, Q6K, Q4_0, Q8_0, Q8_0, Q5K, Q8_0],
        output: None,
        layers: 2,
        rope_freqs: false,
        vocab: Some(96),
    };
    let (_dir, src) = open_tiny(&t, &mut r);
    let prompts: Vec<Vec<u32>> = [9usize, 5, 12]
        .iter()
        .map(|&n| (0..n).map(|_| (r.u64() % 96) as u32).collect())
        .collect();
    let start = |dev: &Arc<FaultyDevice>| {
        let gpu = GpuBackend::new(dev.clone());
        let model = Transformer::load(&gpu, &src).unwrap();
        let cfg = SchedulerConfig {
            num_blocks: 32,
            block_size: 16,
            max_num_seqs: 3,
            max_batch_tokens: 24,
            max_model_len: 64,
        };
        let metrics = Arc::new(Metrics::new("tiny"));
        kojo::engine::start(gpu, model, cfg, vec![], metrics).unwrap()
    };
    // greedy; a salt of its own per phase, so that no phase reads another's prefix cache
    let submit = |e: &EngineHandle, p: &[u32], max_tokens: usize, salt: u64| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        e.submit(EngineRequest {
            prompt: p.to_vec(),
            params: SamplingParams::default(),
            max_tokens,
            min_tokens: 0,
            ignore_eos: true,
            logit_bias: vec![],
            logprobs: None,
            constraint: None,
            cache_salt: salt,
            share: Default::default(),
            events: tx,
            arrived: std::time::Instant::now(),
        })
        .map(|()| rx)
    };
    // the tokens, or the error that ended the request
    let outcome = |mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>| {
        let mut ids = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Done { .. } => return Ok(ids),
                Event::Error(e) => return Err(e),
                Event::Scheduled { .. } => {}
            }
        }
        panic!("the request's events ended without Done or Error");
    };
    let wait_failure = |e: &EngineHandle| {
        for _ in 0..200 {
            if let Some(f) = e.status.failure() {
                return f.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the engine is still up after a device fault");
    };
    let timeout = Duration::from_secs(60);

    let dev = Arc::new(FaultyDevice::default());
    let (engine, join) = start(&dev);
    // an un-faulted run: the tokens every later run must give
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&engine, p, 4, 1).unwrap())
        .collect();
    let want: Vec<Vec<u32>> = rxs.into_iter().map(|rx| outcome(rx).unwrap()).collect();
    assert!(want.iter().all(|w| w.len() == 4), "{want:?}");

    // (a) out of memory: A's first step is held at its end; B and C arrive meanwhile, so the
    // next step is A's decode with B's and C's prefill, and its first allocation fails
    let (reached, go) = dev.hold_next_download();
    let a = submit(&engine, &prompts[0], 4, 2).unwrap();
    reached.recv_timeout(timeout).unwrap();
    let b = submit(&engine, &prompts[1], 4, 2).unwrap();
    let c = submit(&engine, &prompts[2], 4, 2).unwrap();
    dev.fail_allocs.store(1, SeqCst);
    go.send(()).unwrap();
    for (name, rx) in [("A", a), ("B", b), ("C", c)] {
        let e = outcome(rx).expect_err(name);
        assert!(
            e.starts_with("forward pass failed") && e.contains("injected out of memory"),
            "{name}: {e}"
        );
    }
    assert_eq!(
        dev.fail_allocs.load(SeqCst),
        0,
        "the allocation did not fail"
    );
    assert_eq!(
        engine.status.failure(),
        None,
        "out of memory ended the engine"
    );
    // the engine goes on: the same requests again, the same tokens
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&engine, p, 4, 3).expect("a submit after out of memory"))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(
            outcome(rx).unwrap(),
            want[i],
            "request {i} after out of memory"
        );
    }
    assert_eq!(engine.status.failure(), None);

    // (b) a failed launch: D's first step is held; E and F join D in the next step, G waits
    // (3 sequences at most); that step's first launch fails
    let (reached, go) = dev.hold_next_download();
    let d = submit(&engine, &prompts[0], 8, 4).unwrap();
    reached.recv_timeout(timeout).unwrap();
    let held: Vec<_> = [1, 2, 0]
        .iter()
        .map(|&p| submit(&engine, &prompts[p], 8, 4).unwrap())
        .collect();
    dev.fail_launches.store(true, SeqCst);
    go.send(()).unwrap();
    for (i, rx) in std::iter::once(d).chain(held).enumerate() {
        let e = outcome(rx).expect_err("a request held when the launch failed");
        assert!(e.contains("injected launch failure"), "request {i}: {e}");
    }
    let why = wait_failure(&engine);
    assert!(
        why.contains("GPU") && why.contains("injected launch failure"),
        "{why}"
    );
    let refused = submit(&engine, &prompts[0], 4, 5).expect_err("a submit to a dead engine");
    assert_eq!(refused, why);
    drop(engine);
    join.join().unwrap();
    assert!(dev.inner.overruns.lock().unwrap().is_empty());
    assert!(
        dev.inner.live.lock().unwrap().is_empty(),
        "device memory left after the engine went"
    );

    // (c) a kernel fault CUDA reports at the step's download, the device lost from then on
    let dev = Arc::new(FaultyDevice::default());
    let (engine, join) = start(&dev);
    dev.fault_at_download.store(true, SeqCst);
    let h = submit(&engine, &prompts[1], 4, 1).unwrap();
    let e = outcome(h).expect_err("the request in the faulting step");
    assert!(e.contains("injected kernel fault"), "{e}");
    let why = wait_failure(&engine);
    assert!(
        why.contains("GPU") && why.contains("injected kernel fault"),
        "{why}"
    );
    assert!(submit(&engine, &prompts[0], 4, 1).is_err());
    drop(engine);
    join.join().unwrap();
}

/// The real SmolLM2 (Q4_1) on the GPU backend over the executor: a reference prompt, logits
/// against the CPU backend's exact path at every step, 4 greedy tokens equal (" Paris.").
#[test]
fn smollm2_on_gpu_backend_matches_cpu() {
    let src = ModelSource::open(&common::smollm2()).unwrap();
    let tok = src.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", false, true).unwrap();
    let cpu = CpuBackend::new(MatmulMode::Exact);
    let dev = Arc::new(HostDevice::default());
    let gpu = GpuBackend::new(dev.clone());
    let cm = Transformer::load(&cpu, &src).unwrap();
    let gm = Transformer::load(&gpu, &src).unwrap();
    let mut cs = Session::new(&cpu, &cm, 64, 64).unwrap();
    let mut gs = Session::new(&gpu, &gm, 64, 64).unwrap();
    let mut c = cs.feed(&prompt, Logits::Last).unwrap();
    let mut g = gs.feed(&prompt, Logits::Last).unwrap();
    let mut ids = Vec::new();
    for step in 0..8 {
        let mut st = SelfTest::new(&gpu, 0);
        // f32 sums in another order flip an occasional f16 rounding of K, V or q: on 30 real
        // layers that moves logits by ~1e-3 (tiny random models: ~1e-5)
        st.compare(&format!("SmolLM2 logits at step {step}"), &g, &c, 1e-2);
        eprintln!("{:?}", st.checks[0]);
        assert!(st.failures().is_empty(), "{:?}", st.checks);
        let (ci, gi) = (kojo::sampling::argmax(&c), kojo::sampling::argmax(&g));
        assert_eq!(gi, ci, "greedy token at step {step}");
        ids.push(ci);
        if step == 3 {
            break;
        }
        c = cs.feed(&[ci], Logits::Last).unwrap();
        g = gs.feed(&[gi], Logits::Last).unwrap();
    }
    let text = tok.decode(&ids, false).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
}

/// The kernel lab's own code (shapes, timing, rooflines, table) on the executor, at the tiny
/// shapes: every op measured once (the times mean nothing here).
#[test]
fn kernel_lab_runs_on_the_executor() {
    use kojo::backend::gpu::lab;
    let dev = Arc::new(HostDevice::default());
    let gpu = GpuBackend::new(dev.clone());
    let report = lab::run(&gpu, lab::Shapes::tiny(), 7).unwrap();
    let table = report.table();
    for op in [
        "copy",
        "matmul bf16 prefill",
        "matmul q4_k",
        "matmul_normed q4_k",
        "ffn_glu bf16",
        "attention decode",
        "attention prefill",
        "attention_input bf16",
        "add_rms_norm",
    ] {
        assert!(
            table.contains(&format!("| {op} |")),
            "{op} missing:\n{table}"
        );
    }
    // 2 types x 2 batches x (2 matmuls + matmul_normed + ffn_glu), copy, GEMM, 2 decode + 1
    // prefill attention, attention_input, add_rms_norm
    assert_eq!(report.rows.len(), 16 + 2 + 3 + 1 + 1, "{table}");
    assert!(report.copy_gb_s > 0.0 && report.gemm_tflop_s.is_some_and(|t| t > 0.0));
    for r in &report.rows {
        assert!(r.us > 0.0 && r.of_roofline > 0.0, "{r:?}");
        assert!((r.bytes > 0.0) != (r.flops > 0.0), "{r:?}");
    }
    drop(gpu);
    assert!(dev.overruns.lock().unwrap().is_empty());
}

/// Decode steps recorded once per bucket (batch padded to a power of two, block-table width)
/// and replayed: the logits equal, bit for bit, those of the same backend running every step
/// op by op, and match the CPU backend's. The batches grow and shrink (1, 3, 5 sequences) and
/// the contexts cross block boundaries, so buckets are recorded, reused and recorded again
/// when the tables widen.
#[test]
fn recorded_decode_steps_replay_exactly() {
    use kojo::backend::{Backend, BatchLayout};
    use kojo::model::transformer::Step;
    use std::sync::atomic::Ordering::Relaxed;
    use GgmlType::*;
    let mut r = test_rnd();
    let t = Tiny {
        arch: "qwen2",
        types: [Q8_0, Q8_0, Q8_0, Q4K, Q6K, Q6K, Q4_1, Q8_0],
        output: None,
        layers: 2,
        rope_freqs: false,
        vocab: Some(96),
    };
    let (_dir, src) = open_tiny(&t, &mut r);
    let cpu = CpuBackend::new(MatmulMode::Exact);
    let rec_dev = Arc::new(HostDevice::default());
    let plain_dev = Arc::new(HostDevice::default());
    let rec = GpuBackend::new(rec_dev.clone());
    let plain = GpuBackend::new(plain_dev.clone()).without_graphs();
    let cm = Transformer::load(&cpu, &src).unwrap();
    let rm = Transformer::load(&rec, &src).unwrap();
    let pm = Transformer::load(&plain, &src).unwrap();
    let bs = 16;
    let (seqs, per) = (5usize, 4usize); // up to 64 positions each
    let mut ck = cpu.alloc_kv(cm.kv_shape(seqs * per, bs)).unwrap();
    let mut rk = rec.alloc_kv(rm.kv_shape(seqs * per, bs)).unwrap();
    let mut pk = plain.alloc_kv(pm.kv_shape(seqs * per, bs)).unwrap();
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..per as u32).map(|b| (s * per) as u32 + b).collect())
        .collect();
    let mut len = vec![0usize; seqs];
    let mut kept = None;
    // (step, active sequences): 1 sequence, then 3, then 5, then 3 again; 40 steps in all
    for step in 0..40 {
        let active: Vec<usize> = match step {
            0..=7 => vec![0],
            8..=19 => vec![0, 1, 2],
            20..=29 => (0..5).collect(),
            _ => vec![1, 3, 4],
        };
        let tokens: Vec<u32> = active
            .iter()
            .map(|&s| ((step * 7 + s * 13) % 96) as u32)
            .collect();
        let positions: Vec<u32> = active.iter().map(|&s| len[s] as u32).collect();
        let slots: Vec<u32> = active
            .iter()
            .map(|&s| tables[s][len[s] / bs] * bs as u32 + (len[s] % bs) as u32)
            .collect();
        let trefs: Vec<&[u32]> = active
            .iter()
            .map(|&s| &tables[s][..len[s] / bs + 1])
            .collect();
        let starts: Vec<usize> = (0..=active.len()).collect();
        let rows: Vec<usize> = (0..active.len()).collect();
        let st = Step {
            tokens: &tokens,
            layout: BatchLayout {
                positions: &positions,
                seq_starts: &starts,
                block_tables: &trefs,
                slots: &slots,
            },
            logit_rows: &rows,
        };
        if step == 1 {
            // a bad token in the step that would be recorded: an error of its own, and the
            // next step records as if it had not happened
            let bad = [1000u32];
            let st = Step { tokens: &bad, ..st };
            assert!(rm.forward(&rec, &mut rk, &st).is_err());
            rec.check().unwrap();
        }
        let c = cpu
            .download(&cm.forward(&cpu, &mut ck, &st).unwrap())
            .unwrap();
        let gt = rm.forward(&rec, &mut rk, &st).unwrap();
        let g = rec.download(&gt).unwrap();
        if step == 38 {
            // a caller keeping a replay's logits: the next step may not launch over them
            kept = Some((gt, g.clone()));
        }
        let p = plain
            .download(&pm.forward(&plain, &mut pk, &st).unwrap())
            .unwrap();
        assert_eq!(g.len(), active.len() * 96);
        assert!(
            g.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {step}: recorded and op-by-op logits differ"
        );
        let mut check = SelfTest::new(&rec, 0);
        check.compare(&format!("step {step}"), &g, &c, 2e-4);
        assert!(check.failures().is_empty(), "{:?}", check.checks);
        for &s in &active {
            len[s] += 1;
        }
    }
    // every step replays but the first of each (bucket, table width): (1, 1) steps 1-7, (4, 1)
    // steps 9-15, (4, 2) steps 17-19, (8, 2) steps 21-29, and (4, 2) again for steps 30-39
    // (recorded anew, the inputs having grown for 8), but for step 39, run op by op while
    // step 38's logits were kept: 7 + 7 + 3 + 9 + 9
    let launches = rec_dev.graph_launches.load(Relaxed);
    assert_eq!(launches, 35, "replays");
    let (t, v) = kept.unwrap();
    assert_eq!(rec.download(&t).unwrap(), v, "kept logits overwritten");
    drop(t);
    assert_eq!(plain_dev.graph_launches.load(Relaxed), 0);
    drop((rm, rk, rec, pm, pk, plain));
    assert!(rec_dev.overruns.lock().unwrap().is_empty());
    assert!(plain_dev.overruns.lock().unwrap().is_empty());
    assert!(
        rec_dev.live.lock().unwrap().is_empty(),
        "device memory left after the backend went"
    );
}

/// The fusion, counted: one decode step of a llama whose Q/K/V and gate/up share a type
/// launches 6 kernels per layer (QKV with the norm in its prologue, qkv_post, attn_split,
/// the output projection into the residual, gate/up with norm and activation, down into the
/// residual), one embedding gather and one output projection with the final norm: 14 for 2
/// layers (it was 14 per layer plus 4 before issue 6).
#[test]
fn a_fused_decode_step_launches_six_kernels_per_layer() {
    use GgmlType::*;
    let mut r = test_rnd();
    let t = Tiny {
        arch: "llama",
        types: [Q4K, Q4K, Q4K, Q6K, Q5_0, Q5_0, Q8_0, Q8_0],
        output: Some(Q6K),
        layers: 2,
        rope_freqs: true,
        vocab: Some(96),
    };
    let (_dir, src) = open_tiny(&t, &mut r);
    let gpu = GpuBackend::new(Arc::new(HostDevice::default())).without_graphs();
    let gm = Transformer::load(&gpu, &src).unwrap();
    let mut gs = Session::new(&gpu, &gm, 64, 8).unwrap();
    gs.feed(&[1, 2, 3, 4, 5], Logits::Last).unwrap();
    let before = gpu.launch_count();
    gs.feed(&[6], Logits::Last).unwrap();
    assert_eq!(gpu.launch_count() - before, 6 * 2 + 2);
}

/// Constrained decoding through the engine on the GPU backend (over the executor) against the
/// CPU backend: a tiny random llama with SmolLM2's tokenizer, grammars masking rows where the
/// logits are (`apply_token_mask`, then the device's argmax or top-k draw) and on the host
/// (log-probabilities bring the logits back). Same ids on both, and every output matches.
#[test]
fn constrained_engine_on_gpu_matches_cpu() {
    use kojo::sampling::SamplingParams;
    use kojo::structured::{GrammarLimits, GrammarSpec, Grammars};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut r = test_rnd();
    use GgmlType::*;
    let t = Tiny {
        arch: "llama",
        types: [Q8_0, Q4K, Q6K, Q4_0, Q8_0, F16, Q5K, Q8_0],
        output: None,
        layers: 1,
        rope_freqs: false,
        vocab: None,
    };
    write_tiny(&t, &mut r, &path);
    let src = ModelSource::open(&path).unwrap();
    let tok = Arc::new(src.tokenizer().unwrap());
    let eog = tok.end_of_generation();
    let prompt = tok.encode("Answer:", false, false).unwrap();
    // (grammar, temperature, top_k, logprobs)
    let reqs: Vec<(GrammarSpec, f32, usize, Option<usize>)> = vec![
        (GrammarSpec::Regex("[0-9]{3}-[a-z]{4}".into()), 0.0, 0, None),
        (
            GrammarSpec::Choice(vec!["yes".into(), "no".into(), "maybe".into()]),
            0.9,
            20,
            None,
        ),
        (
            GrammarSpec::JsonSchema(serde_json::json!({"type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
            "required": ["n", "ok"], "additionalProperties": false})),
            1.0,
            8,
            None,
        ),
        (GrammarSpec::Regex("[a-c]{2,5}".into()), 0.7, 0, Some(2)),
    ];

    let vocab = ModelSource::open(&path).map(|s| {
        let cpu = CpuBackend::new(MatmulMode::Exact);
        Transformer::load(&cpu, &s).unwrap().cfg.vocab_size
    });
    let grammars = Grammars::new(tok.clone(), vocab.unwrap(), GrammarLimits::default());
    let make = || -> Vec<TestRequest> {
        reqs.iter()
            .map(|(spec, temperature, top_k, logprobs)| {
                let params = SamplingParams {
                    temperature: *temperature,
                    top_k: *top_k,
                    seed: 5,
                    ..Default::default()
                };
                let c = grammars.compile(spec).unwrap();
                (prompt.clone(), params, 24, false, *logprobs, Some(c))
            })
            .collect()
    };
    let ids = |out: Vec<(Vec<u32>, Vec<f32>)>| -> Vec<Vec<u32>> {
        out.into_iter().map(|o| o.0).collect()
    };
    let cpu = CpuBackend::new(MatmulMode::Exact);
    let want = ids(run_engine(cpu, &path, eog.clone(), make()));
    let dev = Arc::new(HostDevice::default());
    let got = ids(run_engine(
        GpuBackend::new(dev.clone()),
        &path,
        eog.clone(),
        make(),
    ));
    assert!(dev.launched.lock().unwrap().contains("apply_token_mask"));
    assert_eq!(got, want);
    let text: Vec<String> = want
        .iter()
        .map(|ids| tok.decode(ids, false).unwrap())
        .collect();
    eprintln!("{text:?}");
    let digits = text[0].as_bytes();
    assert!(
        text[0].len() == 8 && digits[..3].iter().all(u8::is_ascii_digit) && digits[3] == b'-',
        "{}",
        text[0]
    );
    assert!(
        ["yes", "no", "maybe"].contains(&text[1].as_str()),
        "{}",
        text[1]
    );
    let v: serde_json::Value =
        serde_json::from_str(&text[2]).unwrap_or_else(|e| panic!("{e}: {}", text[2]));
    assert!(
        v["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)) && v["ok"].is_boolean(),
        "{v}"
    );
    assert!(
        (2..=5).contains(&text[3].len()) && text[3].bytes().all(|b| (b'a'..=b'c').contains(&b)),
        "{}",
        text[3]
    );
}
