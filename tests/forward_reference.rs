//! The forward pass against an independent float64 implementation (scripts/reference_forward.py,
//! numpy + the `gguf` package's dequantizers), through `kojo generate --json`:
//! - tiny random-weight models of each architecture, written here, covering every weight type;
//! - the tiny llama as a Hugging Face safetensors folder;
//! - the two real models.
//!
//! The reference rounds K, V and the query to f16 as kojo's f16 cache does; with
//! `--matmul exact` kojo then differs from it only by f32 rounding; with the default integer
//! path, by activation quantization as well.

mod common;

use common::*;
use half::{bf16, f16};
use kojo::formats::gguf_write::GgufWriter;
use kojo::formats::{GgmlType, GgufFile, Value};
use std::path::Path;
use std::process::Command;

/// xorshift64*, seeded from the clock; the seed is printed so a failure can be replayed.
struct Rnd(u64);
impl Rnd {
    fn new() -> Self {
        let seed = std::env::var("KOJO_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("KOJO_TEST_SEED={seed}");
        Rnd(seed)
    }
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random valid blocks of `ty` for `n` weights whose magnitudes stay around `amp`.
fn random_tensor(r: &mut Rnd, ty: GgmlType, n: usize, amp: f32) -> Vec<u8> {
    let le16 = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
    match ty {
        GgmlType::F32 => (0..n).flat_map(|_| (r.f() * amp).to_le_bytes()).collect(),
        GgmlType::F16 => (0..n).flat_map(|_| le16(r.f() * amp)).collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(r.f() * amp).to_bits().to_le_bytes())
            .collect(),
        _ => {
            let (bs, ts) = (ty.block_size().unwrap(), ty.type_size().unwrap());
            let mut data: Vec<u8> = (0..n / bs * ts).map(|_| r.u64() as u8).collect();
            // (offset of f16 scale, largest |q * sub-scale|), (offset of f16 min, largest m)
            let (d, dmin): ((usize, f32), Option<(usize, f32)>) = match ty {
                GgmlType::Q4_0 => ((0, 8.0), None),
                GgmlType::Q4_1 => ((0, 15.0), Some((2, 1.0))),
                GgmlType::Q5_0 => ((0, 16.0), None),
                GgmlType::Q5_1 => ((0, 31.0), Some((2, 1.0))),
                GgmlType::Q8_0 => ((0, 127.0), None),
                GgmlType::Q2K => ((80, 45.0), Some((82, 15.0))),
                GgmlType::Q3K => ((108, 128.0), None),
                GgmlType::Q4K => ((0, 945.0), Some((2, 63.0))),
                GgmlType::Q5K => ((0, 1953.0), Some((2, 63.0))),
                GgmlType::Q6K => ((208, 4096.0), None),
                _ => unreachable!(),
            };
            for blk in data.chunks_exact_mut(ts) {
                blk[d.0..d.0 + 2].copy_from_slice(&le16(amp / d.1 * (0.5 + 0.5 * r.f().abs())));
                if let Some((o, m)) = dmin {
                    blk[o..o + 2].copy_from_slice(&le16(amp / m * 0.5 * r.f().abs()));
                }
            }
            data
        }
    }
}

#[derive(Clone, Copy)]
struct Tiny {
    arch: &'static str,
    /// types of q, k, v, output, gate, up, down, token_embd, output.weight (None = tied)
    types: [GgmlType; 8],
    output: Option<GgmlType>,
    layers: usize,
    /// Llama 3.1-style `rope_freqs.weight`
    rope_freqs: bool,
}

const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const FFN: usize = 512;

/// A tiny model with SmolLM2's tokenizer (so prompts are real text) and random weights.
fn write_tiny(t: &Tiny, r: &mut Rnd, path: &Path) {
    let tok = GgufFile::open(smollm2()).unwrap();
    let vocab = tok
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let a = t.arch;
    let mut w = GgufWriter::new()
        .kv("general.architecture", Value::String(a.into()))
        .kv(&format!("{a}.block_count"), Value::U32(t.layers as u32))
        .kv(&format!("{a}.context_length"), Value::U32(256))
        .kv(&format!("{a}.embedding_length"), Value::U32(HIDDEN as u32))
        .kv(&format!("{a}.feed_forward_length"), Value::U32(FFN as u32))
        .kv(
            &format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        )
        .kv(
            &format!("{a}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        )
        .kv(
            &format!("{a}.attention.key_length"),
            Value::U32(HEAD_DIM as u32),
        )
        .kv(
            &format!("{a}.attention.value_length"),
            Value::U32(HEAD_DIM as u32),
        )
        .kv(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        )
        .kv(&format!("{a}.rope.freq_base"), Value::F32(10_000.0));
    if a == "gemma3" {
        // a window shorter than the prompt, so the sliding layers really slide
        w = w.kv("gemma3.attention.sliding_window", Value::U32(5));
    }
    for (k, v) in &tok.metadata {
        if k.starts_with("tokenizer.") {
            w = w.kv(k, v.clone());
        }
    }
    let h = HIDDEN as u64;
    let (q, kv, ffn) = (
        (HEADS * HEAD_DIM) as u64,
        (KV_HEADS * HEAD_DIM) as u64,
        FFN as u64,
    );
    let add = |w: GgmlType, name: String, dims: &[u64], amp: f32, r: &mut Rnd| {
        let n = dims.iter().product::<u64>() as usize;
        (name, dims.to_vec(), w, random_tensor(r, w, n, amp))
    };
    let mut tensors = Vec::new();
    let norm = |r: &mut Rnd| {
        (0..HIDDEN)
            .flat_map(|_| (1.0 + 0.2 * r.f()).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    tensors.push(add(
        t.types[7],
        "token_embd.weight".into(),
        &[h, vocab as u64],
        1.0,
        r,
    ));
    tensors.push(("output_norm.weight".into(), vec![h], GgmlType::F32, norm(r)));
    if let Some(o) = t.output {
        tensors.push(add(o, "output.weight".into(), &[h, vocab as u64], 0.1, r));
    }
    if t.rope_freqs {
        // Llama 3.1-style frequency divisors, 1..8
        let f: Vec<u8> = (0..HEAD_DIM / 2)
            .flat_map(|_| (4.5 + 3.5 * r.f()).to_le_bytes())
            .collect();
        tensors.push((
            "rope_freqs.weight".into(),
            vec![(HEAD_DIM / 2) as u64],
            GgmlType::F32,
            f,
        ));
    }
    for l in 0..t.layers {
        let b = |s: &str| format!("blk.{l}.{s}");
        tensors.push((b("attn_norm.weight"), vec![h], GgmlType::F32, norm(r)));
        tensors.push((b("ffn_norm.weight"), vec![h], GgmlType::F32, norm(r)));
        tensors.push(add(t.types[0], b("attn_q.weight"), &[h, q], 0.15, r));
        tensors.push(add(t.types[1], b("attn_k.weight"), &[h, kv], 0.15, r));
        tensors.push(add(t.types[2], b("attn_v.weight"), &[h, kv], 0.15, r));
        tensors.push(add(t.types[3], b("attn_output.weight"), &[q, h], 0.1, r));
        tensors.push(add(t.types[4], b("ffn_gate.weight"), &[h, ffn], 0.15, r));
        tensors.push(add(t.types[5], b("ffn_up.weight"), &[h, ffn], 0.15, r));
        tensors.push(add(t.types[6], b("ffn_down.weight"), &[ffn, h], 0.1, r));
        if a == "qwen2" {
            for (s, n) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                tensors.push(add(GgmlType::F32, b(s), &[n], 0.1, r));
            }
        }
        if a == "gemma3" {
            let hn = |r: &mut Rnd| {
                (0..HEAD_DIM)
                    .flat_map(|_| (1.0 + 0.2 * r.f()).to_le_bytes())
                    .collect()
            };
            tensors.push((
                b("attn_q_norm.weight"),
                vec![HEAD_DIM as u64],
                GgmlType::F32,
                hn(r),
            ));
            tensors.push((
                b("attn_k_norm.weight"),
                vec![HEAD_DIM as u64],
                GgmlType::F32,
                hn(r),
            ));
            tensors.push((
                b("post_attention_norm.weight"),
                vec![h],
                GgmlType::F32,
                norm(r),
            ));
            tensors.push((b("post_ffw_norm.weight"), vec![h], GgmlType::F32, norm(r)));
        }
    }
    for (name, dims, ty, data) in tensors {
        w = w.tensor(&name, &dims, ty, data);
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

/// `kojo generate --json` greedy on `model`.
fn generate(model: &Path, prompt: &str, n: usize, extra: &[&str]) -> serde_json::Value {
    let n = n.to_string();
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        prompt,
        "-n",
        &n,
        "--temperature",
        "0",
        "--json",
        "--ignore-eos",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&kojo_ok(&args)).unwrap()
}

/// The float64 reference's top-5 at each generated position of `out` (K/V rounded to f16).
fn reference_top5(model: &Path, out: &serde_json::Value) -> Vec<Vec<(u64, f64)>> {
    let mut ids = ids_of(&out["prompt_ids"]);
    let start = ids.len() - 1;
    ids.extend(ids_of(&out["output_ids"]));
    ids.pop(); // the last sampled token is never fed back
    let o = Command::new(python())
        .arg(root().join("scripts/reference_forward.py"))
        .arg(model)
        .args([
            "--ids",
            &serde_json::to_string(&ids).unwrap(),
            "--from",
            &start.to_string(),
            "--f16-kv",
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference_forward.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Vec<Vec<(u64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
    v
}

/// Every position's top-5 ids and log-probabilities agree within `tol` plus `rel` of the
/// log-probability's size (random models have very peaked distributions, with top-5 entries
/// down at -20); where two candidates are closer than that, their order may differ.
fn assert_close_rel(
    what: &str,
    ours: &serde_json::Value,
    reference: &[Vec<(u64, f64)>],
    tol: f64,
    rel: f64,
) {
    let ours: Vec<Vec<(u64, f64)>> = serde_json::from_value(ours["top_logprobs"].clone()).unwrap();
    assert_eq!(ours.len(), reference.len(), "{what}: positions");
    let mut worst = 0f64;
    for (pos, (a, b)) in ours.iter().zip(reference).enumerate() {
        let floor = a.last().unwrap().1;
        for &(id, lp) in b {
            let tol = tol + rel * lp.abs();
            match a.iter().find(|x| x.0 == id) {
                Some(&(_, mine)) => {
                    worst = worst.max((mine - lp).abs());
                    assert!(
                        (mine - lp).abs() <= tol,
                        "{what}: position {pos} token {id}: {mine} vs {lp}"
                    );
                }
                None => assert!(
                    lp <= floor + tol,
                    "{what}: position {pos}: token {id} ({lp}) missing from {a:?}"
                ),
            }
        }
    }
    eprintln!("{what}: largest log-probability difference {worst:.2e}");
}

fn assert_close(what: &str, ours: &serde_json::Value, reference: &[Vec<(u64, f64)>], tol: f64) {
    assert_close_rel(what, ours, reference, tol, 1e-4)
}

fn check_tiny(t: Tiny) {
    let mut r = Rnd::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("tiny-{}.gguf", t.arch));
    write_tiny(&t, &mut r, &path);
    let prompt = "The quick brown fox jumps over the lazy dog";
    let exact = generate(&path, prompt, 6, &["--matmul", "exact"]);
    let reference = reference_top5(&path, &exact);
    assert_close(&format!("{} exact", t.arch), &exact, &reference, 2e-3);
    // the integer path: the same model within activation-quantization noise, which random
    // weights make large (~0.5 nats near the top, ~1.3 at a -20 tail entry); the arithmetic
    // itself is unit-tested in backend::cpu::matmul, this catches gross mistakes end to end
    let quant = generate(&path, prompt, 6, &[]);
    let ref_q = reference_top5(&path, &quant);
    assert_close_rel(&format!("{} quantized", t.arch), &quant, &ref_q, 0.5, 0.1);
    if t.arch == "llama" {
        // a llama as a Hugging Face folder: f32 safetensors, tokenizer.json, HF's rotary
        // layout (the script undoes llama.cpp's Q/K permutation); HF keeps Llama 3.1's RoPE
        // factors in config.json, which kojo does not read yet, so this one has none
        let path = dir.path().join("tiny-llama-plain.gguf");
        write_tiny(
            &Tiny {
                rope_freqs: false,
                ..t
            },
            &mut r,
            &path,
        );
        let exact = generate(&path, prompt, 6, &["--matmul", "exact"]);
        let hf = dir.path().join("hf");
        let st = Command::new(python())
            .arg(root().join("scripts/gguf_to_hf.py"))
            .args([
                path.to_str().unwrap(),
                hf.to_str().unwrap(),
                "--dtype",
                "F32",
            ])
            .status()
            .unwrap();
        assert!(st.success());
        let from_hf = generate(&hf, prompt, 6, &["--matmul", "exact"]);
        assert_eq!(from_hf["prompt_ids"], exact["prompt_ids"]);
        let gguf_top: Vec<Vec<(u64, f64)>> =
            serde_json::from_value(exact["top_logprobs"].clone()).unwrap();
        assert_close(
            "llama from safetensors vs the GGUF",
            &from_hf,
            &gguf_top,
            1e-3,
        );
        let ref_hf = reference_top5(&path, &from_hf);
        assert_close("llama from safetensors", &from_hf, &ref_hf, 2e-3);
    }
}

#[test]
fn tiny_llama_legacy_quants_and_hf_folder() {
    use GgmlType::*;
    check_tiny(Tiny {
        arch: "llama",
        types: [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, Q4_0, Q8_0],
        output: Some(F16),
        layers: 2,
        rope_freqs: true,
    });
}

#[test]
fn tiny_qwen2_k_quants() {
    use GgmlType::*;
    check_tiny(Tiny {
        arch: "qwen2",
        types: [Q2K, Q3K, Q4K, Q5K, Q6K, Q4K, Q6K, Q6K],
        output: None,
        layers: 2,
        rope_freqs: false,
    });
}

#[test]
fn tiny_gemma3_sliding_window() {
    use GgmlType::*;
    // 7 layers: five sliding, one global (index 5), one sliding
    check_tiny(Tiny {
        arch: "gemma3",
        types: [Q5_0, Q8_0, F32, Q4K, BF16, Q5_0, Q6K, Q8_0],
        output: None,
        layers: 7,
        rope_freqs: false,
    });
}

/// The real models, first 4 generated positions, exact path: float64 agreement to ~2e-3 nats.
#[test]
fn real_models_match_float64() {
    for model in [smollm2(), gemma3()] {
        let out = generate(
            &model,
            "The capital of France is",
            4,
            &["--matmul", "exact"],
        );
        let reference = reference_top5(&model, &out);
        assert_close(&model.display().to_string(), &out, &reference, 1e-2);
    }
}
