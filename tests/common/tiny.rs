//! Tiny random-weight models of each architecture, written as GGUF.

use super::smollm2;
use kojo::formats::gguf_write::GgufWriter;
use kojo::formats::{GgmlType, GgufFile, Value};
use std::path::Path;

pub use kojo::model::random::{random_tensor, Rnd};

/// A generator seeded from the clock, or from KOJO_TEST_SEED; the seed is printed so a
/// failure can be replayed.
pub fn test_rnd() -> Rnd {
    let seed = std::env::var("KOJO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("KOJO_TEST_SEED={seed}");
    Rnd::new(seed)
}

#[derive(Clone, Copy)]
pub struct Tiny {
    pub arch: &'static str,
    /// types of q, k, v, output, gate, up, down, token_embd, output.weight (None = tied)
    pub types: [GgmlType; 8],
    pub output: Option<GgmlType>,
    pub layers: usize,
    /// Llama 3.1-style `rope_freqs.weight`
    pub rope_freqs: bool,
    /// `None`: SmolLM2's tokenizer and vocabulary; `Some(n)`: no tokenizer, `n` token ids
    pub vocab: Option<usize>,
}

pub const HIDDEN: usize = 256;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 64;
pub const FFN: usize = 512;

/// A tiny model with random weights and SmolLM2's tokenizer (so prompts are real text), or
/// with `t.vocab` token ids and no tokenizer.
pub fn write_tiny(t: &Tiny, r: &mut Rnd, path: &Path) {
    let tok = match t.vocab {
        None => Some(GgufFile::open(smollm2()).unwrap()),
        Some(_) => None,
    };
    let vocab = match (&tok, t.vocab) {
        (Some(tok), _) => tok
            .get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        (None, n) => n.unwrap(),
    };
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
    match &tok {
        Some(tok) => {
            for (k, v) in &tok.metadata {
                if k.starts_with("tokenizer.") {
                    w = w.kv(k, v.clone());
                }
            }
        }
        None => w = w.kv(&format!("{a}.vocab_size"), Value::U32(vocab as u32)),
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
