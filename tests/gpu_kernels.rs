//! Every CUDA kernel, run on the CPU by the fiber executor (crates/kexec), through the GPU
//! backend's own launch code, against the CPU backend's op:
//! - fresh random inputs each run (the seed is printed: KOJO_TEST_SEED replays it);
//! - every device buffer starts poisoned (0xff bytes: NaN), with a guard zone after it that is
//!   checked when it is freed, so an element a kernel forgets to write, or one it writes past
//!   its buffer, fails the test;
//! - ragged batches and odd sizes (rows not a multiple of a block's, contexts over one split,
//!   query groups over one block);
//! - then whole tiny random models, CPU against GPU backend, logits and greedy tokens.
//! `every_kernel_is_tested` checks that the tests launched every kernel the sources define.

mod common;

use common::tiny::*;
use kojo::backend::cpu::{CpuBackend, MatmulMode};
use kojo::backend::gpu::{Arg, Device, GpuBackend, Grid};
use kojo::backend::{AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, Rope, RopeLayout};
use kojo::formats::GgmlType;
use kojo::model::session::{Logits, Session};
use kojo::model::{ModelSource, Transformer};
use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0xa5;

/// Device memory that is host memory; launches run the kernels on the CPU.
#[derive(Default)]
struct HostDevice {
    /// pointer -> size
    live: Mutex<BTreeMap<u64, usize>>,
    launched: Mutex<BTreeSet<String>>,
    overruns: Mutex<Vec<String>>,
}

impl HostDevice {
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
        assert!(ok, "host copy of {len} bytes at {ptr:#x} outside any allocation");
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
        Ok(p as u64)
    }

    unsafe fn free(&self, ptr: u64) {
        let bytes = self.live.lock().unwrap().remove(&ptr).expect("free of an unknown pointer");
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

    unsafe fn upload(&self, dst: u64, src: &[u8]) -> anyhow::Result<()> {
        self.check_range(dst, src.len());
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn download(&self, src: u64, dst: &mut [u8]) -> anyhow::Result<()> {
        self.check_range(src, dst.len());
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }

    unsafe fn zero(&self, dst: u64, bytes: usize) -> anyhow::Result<()> {
        self.check_range(dst, bytes);
        std::ptr::write_bytes(dst as *mut u8, 0, bytes);
        Ok(())
    }

    unsafe fn launch(&self, name: &str, g: Grid, args: &[Arg]) -> anyhow::Result<()> {
        self.launched.lock().unwrap().insert(name.to_string());
        let mut params: Vec<_> = args.iter().map(|a| a.as_param()).collect();
        let sizes: Vec<usize> = args.iter().map(|a| a.size()).collect();
        kexec::launch(name, g.grid, g.block, 0, &mut params, &sizes).map_err(anyhow::Error::msg)
    }
}

struct Fixture {
    cpu: CpuBackend,
    gpu: GpuBackend,
    dev: Arc<HostDevice>,
    r: Rnd,
}

impl Fixture {
    fn new() -> Fixture {
        let dev = Arc::new(HostDevice::default());
        Fixture {
            cpu: CpuBackend::new(MatmulMode::Exact),
            gpu: GpuBackend::new(dev.clone()),
            dev,
            r: Rnd::new(),
        }
    }

    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.r.f() * amp).collect()
    }

    fn both(&self, data: &[f32], rows: usize, cols: usize) -> (kojo::backend::cpu::CpuTensor, kojo::backend::gpu::GpuTensor) {
        (self.cpu.upload(data, rows, cols), self.gpu.upload(data, rows, cols))
    }

    fn weight(&self, name: &str, ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> (kojo::backend::cpu::CpuWeight, kojo::backend::gpu::GpuWeight) {
        let dims = if rows == 1 { vec![cols] } else { vec![cols, rows] };
        let w = HostWeight {
            name: name.into(),
            ty,
            dims,
            data: data.into(),
        };
        (self.cpu.load_weight(&w).unwrap(), self.gpu.load_weight(&w).unwrap())
    }

    fn vector(&mut self, name: &str, n: usize, around: f32, amp: f32) -> (kojo::backend::cpu::CpuWeight, kojo::backend::gpu::GpuWeight) {
        let v: Vec<u8> = (0..n)
            .flat_map(|_| (around + amp * self.r.f()).to_le_bytes())
            .collect();
        self.weight(name, GgmlType::F32, 1, n, v)
    }

    /// Compare the two tensors: every element within `tol` of the largest reference magnitude.
    fn close(&self, what: &str, c: &kojo::backend::cpu::CpuTensor, g: &kojo::backend::gpu::GpuTensor, tol: f32) {
        assert_eq!(self.cpu.shape(c), self.gpu.shape(g), "{what}: shapes");
        close(what, &self.gpu.download(g).unwrap(), &self.cpu.download(c).unwrap(), tol);
    }

    fn finish(self) {
        drop(self.gpu);
        let overruns = self.dev.overruns.lock().unwrap();
        assert!(overruns.is_empty(), "{overruns:?}");
    }
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= tol * scale,
            "{what}: element {i} is {g}, the CPU backend says {w} (tolerance {} of {scale})",
            tol
        );
    }
}

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

fn check_matmul(f: &mut Fixture) {
    let (k, m) = (512, 37);
    for (i, ty) in TYPES.into_iter().enumerate() {
        let data = random_tensor(&mut f.r, ty, m * k, 0.2);
        let (cw, gw) = f.weight("w", ty, m, k, data);
        let bias = (i % 3 == 0).then(|| f.vector("b", m, 0.0, 1.0));
        for n in [1, 6] {
            let x = f.vec(n * k, 1.0);
            let (cx, gx) = f.both(&x, n, k);
            let c = f.cpu.matmul(&cx, &cw, bias.as_ref().map(|b| &b.0));
            let g = f.gpu.matmul(&gx, &gw, bias.as_ref().map(|b| &b.1));
            f.close(&format!("matmul {} n={n}", ty.name()), &c, &g, 2e-5);
        }
    }
}

fn check_embed(f: &mut Fixture) {
    let (rows, cols) = (40, 256);
    for ty in TYPES {
        let data = random_tensor(&mut f.r, ty, rows * cols, 1.0);
        let (cw, gw) = f.weight("emb", ty, rows, cols, data);
        for scale in [1.0, 2.5] {
            let ids = [0, 39, 7, 7, 21];
            let c = f.cpu.embed(&cw, &ids, scale).unwrap();
            let g = f.gpu.embed(&gw, &ids, scale).unwrap();
            f.close(&format!("embed {}", ty.name()), &c, &g, 1e-6);
        }
        assert!(f.gpu.embed(&gw, &[40], 1.0).is_err(), "a token id past the table");
    }
}

fn check_rows(f: &mut Fixture) {
    let (rows, cols) = (5, 96);
    for seg in [96, 32] {
        let (cw, gw) = f.vector("norm", seg, 1.0, 0.3);
        let x = f.vec(rows * cols, 3.0);
        let (cx, gx) = f.both(&x, rows, cols);
        let c = f.cpu.rms_norm(&cx, &cw, 1e-6);
        let g = f.gpu.rms_norm(&gx, &gw, 1e-6);
        f.close(&format!("rms_norm seg {seg}"), &c, &g, 1e-5);

        let r = f.vec(rows * cols, 2.0);
        let (mut cr, mut gr) = f.both(&r, rows, cols);
        let c = f.cpu.add_rms_norm(&mut cr, &cx, &cw, 1e-5);
        let g = f.gpu.add_rms_norm(&mut gr, &gx, &gw, 1e-5);
        f.close("add_rms_norm", &c, &g, 1e-5);
        f.close("add_rms_norm residual", &cr, &gr, 1e-6);
    }
    let (a, b) = (f.vec(rows * cols, 1.0), f.vec(rows * cols, 1.0));
    let (mut ca, mut ga) = f.both(&a, rows, cols);
    let (cb, gb) = f.both(&b, rows, cols);
    f.cpu.add(&mut ca, &cb);
    f.gpu.add(&mut ga, &gb);
    f.close("add", &ca, &ga, 0.0);
    f.cpu.scale(&mut ca, -1.75);
    f.gpu.scale(&mut ga, -1.75);
    f.close("scale", &ca, &ga, 0.0);
    let pick = [4, 0, 4, 2];
    f.close(
        "gather_rows",
        &f.cpu.gather_rows(&ca, &pick),
        &f.gpu.gather_rows(&ga, &pick),
        0.0,
    );
    let (gate, up) = (f.vec(3 * 100, 6.0), f.vec(3 * 100, 2.0));
    let (cg, gg) = f.both(&gate, 3, 100);
    let (cu, gu) = f.both(&up, 3, 100);
    for act in [Glu::Silu, Glu::GeluTanh] {
        let c = f.cpu.glu(&cg, &cu, act);
        let g = f.gpu.glu(&gg, &gu, act);
        f.close(&format!("glu {act:?}"), &c, &g, 1e-5);
    }
}

fn ropes() -> [Rope; 2] {
    [
        Rope {
            layout: RopeLayout::Interleaved,
            n_rot: 64,
            base: 10_000.0,
            freq_scale: 1.0,
        },
        Rope {
            layout: RopeLayout::Halves,
            n_rot: 32,
            base: 1_000_000.0,
            freq_scale: 0.5,
        },
    ]
}

fn check_rope(f: &mut Fixture) {
    let positions = [0, 7, 300, 4095];
    let hd = 64;
    let factors: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.5).collect();
    for (rope, fac) in ropes().iter().zip([None, Some(&factors[..])]) {
        let x = f.vec(4 * 3 * hd, 2.0);
        let (mut c, mut g) = f.both(&x, 4, 3 * hd);
        f.cpu.rope(&mut c, &positions, hd, rope, fac);
        f.gpu.rope(&mut g, &positions, hd, rope, fac);
        f.close(&format!("rope {:?}", rope.layout), &c, &g, 1e-5);
    }
}

/// A ragged batch over a paged cache: a decode token past the first split, a prefill from 0,
/// and a chunk continuing a sequence; K/V of the earlier positions written first (unfused),
/// the batch's own with RoPE fused into the write.
fn check_attention(f: &mut Fixture, n_heads: usize, n_kv: usize, hd: usize, window: Option<usize>) {
    let bs = 16;
    let shape = KvShape {
        n_layers: 2,
        num_blocks: 64,
        block_size: bs,
        n_kv_heads: n_kv,
        head_dim: hd,
    };
    let mut ck = f.cpu.alloc_kv(shape).unwrap();
    let mut gk = f.gpu.alloc_kv(shape).unwrap();
    // block ids: a shuffled pool shared out to the sequences
    let mut ids: Vec<u32> = (0..64).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, f.r.u64() as usize % (i + 1));
    }
    // (tokens before, tokens now) per sequence
    let seqs = [(290usize, 1usize), (0, 19), (40, 5)];
    let mut tables = Vec::new();
    let mut next = 0;
    for &(before, now) in &seqs {
        let need = (before + now).div_ceil(bs);
        tables.push(ids[next..next + need].to_vec());
        next += need;
    }
    let kvw = n_kv * hd;
    let layer = 1;
    let rope = ropes()[1];
    for phase in 0..2 {
        let (mut positions, mut starts, mut slots) = (Vec::new(), vec![0], Vec::new());
        for (s, &(before, now)) in seqs.iter().enumerate() {
            let range = if phase == 0 { 0..before } else { before..before + now };
            for p in range {
                positions.push(p as u32);
                slots.push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
            }
            starts.push(positions.len());
        }
        let tref: Vec<&[u32]> = tables.iter().map(|t| &t[..]).collect();
        let lay = BatchLayout {
            positions: &positions,
            seq_starts: &starts,
            block_tables: &tref,
            slots: &slots,
        };
        let n = positions.len();
        let (k, v) = (f.vec(n * kvw, 2.0), f.vec(n * kvw, 2.0));
        let (mut c_k, mut g_k) = f.both(&k, n, kvw);
        let (c_v, g_v) = f.both(&v, n, kvw);
        if phase == 0 {
            f.cpu.write_kv(&mut ck, layer, &c_k, &c_v, &lay).unwrap();
            f.gpu.write_kv(&mut gk, layer, &g_k, &g_v, &lay).unwrap();
            continue;
        }
        f.cpu
            .rope_write_kv(&mut ck, layer, &mut c_k, &c_v, &lay, hd, &rope, None)
            .unwrap();
        f.gpu
            .rope_write_kv(&mut gk, layer, &mut g_k, &g_v, &lay, hd, &rope, None)
            .unwrap();
        let q = f.vec(n * n_heads * hd, 2.0);
        let (cq, gq) = f.both(&q, n, n_heads * hd);
        let p = AttnParams {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let c = f.cpu.attention(&ck, layer, &cq, &lay, &p).unwrap();
        let g = f.gpu.attention(&gk, layer, &gq, &lay, &p).unwrap();
        f.close(
            &format!("attention {n_heads}/{n_kv} heads x {hd}, window {window:?}"),
            &c,
            &g,
            2e-5,
        );
        // a position past its block table is an error, not a read out of bounds
        let short: Vec<&[u32]> = tables.iter().map(|t| &t[..1]).collect();
        let bad = BatchLayout {
            block_tables: &short,
            ..lay
        };
        assert!(f.gpu.attention(&gk, layer, &gq, &bad, &p).is_err());
    }
}

fn check_sampling(f: &mut Fixture) {
    use kojo::sampling::{argmax, Rng, Sampler, SamplingParams};
    let (rows, vocab) = (3, 500);
    let mut logits = f.vec(rows * vocab, 4.0);
    // an exact tie for the largest logit in row 1: the lower id wins
    logits[vocab + 10] = 9.0;
    logits[vocab + 20] = 9.0;
    let g = f.gpu.upload(&logits, rows, vocab);
    let want: Vec<u32> = logits.chunks(vocab).map(argmax).collect();
    assert_eq!(f.gpu.argmax(&g).unwrap(), want);
    assert_eq!(want[1], 10);
    for seed in 0..6u64 {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: [40, 1, 64, 5, 17, 64][seed as usize],
            top_p: [0.9, 1.0, 0.5, 1.0, 0.95, 1.0][seed as usize],
            min_p: [0.02, 0.0, 0.0, 0.1, 0.0, 0.0][seed as usize],
            seed: seed + f.r.u64() % 1000,
            ..Default::default()
        };
        let u = Rng::new(params.seed).next_f64() as f32;
        let got = f
            .gpu
            .sample_top_k(&g, params.top_k, params.temperature, params.top_p, params.min_p, &[u; 3])
            .unwrap();
        for (r, row) in logits.chunks(vocab).enumerate() {
            let want = Sampler::new(params.clone()).sample(row);
            assert_eq!(got[r], want, "row {r}, {params:?}");
        }
    }
}

#[test]
fn matmul_every_weight_type() {
    let mut f = Fixture::new();
    check_matmul(&mut f);
    f.finish();
}

#[test]
fn embedding_every_weight_type() {
    let mut f = Fixture::new();
    check_embed(&mut f);
    f.finish();
}

#[test]
fn norms_activations_and_row_ops() {
    let mut f = Fixture::new();
    check_rows(&mut f);
    check_rope(&mut f);
    f.finish();
}

#[test]
fn paged_attention_ragged_batch() {
    let mut f = Fixture::new();
    check_attention(&mut f, 6, 2, 64, None);
    // a query group wider than one block (10 heads on one KV head), a sliding window
    check_attention(&mut f, 10, 1, 32, Some(20));
    f.finish();
}

#[test]
fn greedy_and_top_k_sampling() {
    let mut f = Fixture::new();
    check_sampling(&mut f);
    f.finish();
}

#[test]
fn every_kernel_is_tested() {
    let mut f = Fixture::new();
    check_matmul(&mut f);
    check_embed(&mut f);
    check_rows(&mut f);
    check_rope(&mut f);
    check_attention(&mut f, 6, 2, 64, None);
    check_sampling(&mut f);
    let launched = f.dev.launched.lock().unwrap().clone();
    f.finish();
    let all: BTreeSet<String> = kexec::kernel_names().into_iter().collect();
    let untested: Vec<_> = all.difference(&launched).collect();
    assert!(untested.is_empty(), "kernels no test launches: {untested:?}");
}

/// A tiny random model on both backends: logits of a prompt and of greedy decoding.
fn check_model(t: Tiny) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut r = Rnd::new();
    write_tiny(&t, &mut r, &path);
    let src = ModelSource::open(&path).unwrap();
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
        close(&format!("{} logits at step {step}", t.arch), &g, &c, 2e-4);
        let (ci, gi) = (kojo::sampling::argmax(&c), kojo::sampling::argmax(&g));
        assert_eq!(gi, ci, "{}: greedy token at step {step}", t.arch);
        c = cs.feed(&[ci], want).unwrap();
        g = gs.feed(&[gi], want).unwrap();
    }
    drop(gs);
    drop(gm);
    drop(gpu);
    assert!(dev.overruns.lock().unwrap().is_empty());
}

#[test]
fn tiny_llama_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(Tiny {
        arch: "llama",
        types: [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, Q4_0, Q8_0],
        output: Some(F16),
        layers: 2,
        rope_freqs: true,
        vocab: Some(96),
    });
}

#[test]
fn tiny_qwen2_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(Tiny {
        arch: "qwen2",
        types: [Q4K, Q5K, Q6K, Q4K, Q6K, Q4K, Q6K, Q8_0],
        output: None,
        layers: 2,
        rope_freqs: false,
        vocab: Some(96),
    });
}

#[test]
fn tiny_gemma3_cpu_and_gpu_agree() {
    use GgmlType::*;
    check_model(Tiny {
        arch: "gemma3",
        types: [Q5_0, Q8_0, F32, Q4K, BF16, Q5_0, Q6K, Q8_0],
        output: None,
        layers: 7,
        rope_freqs: false,
        vocab: Some(96),
    });
}
