//! Random-weight models with real models' shapes: for GPU checks and benchmarks on machines
//! that cannot receive a real model file, and for tests.
//!
//! `random:<shape>[:<type>[:<seed>]]` opens as a [`crate::model::ModelSource`] whose weights
//! are generated when asked for (no file): `random:llama3-8b:bf16`,
//! `random:smollm2-135m:q4_k`. [`write_hf_folder`] writes one as a Hugging Face folder
//! (config.json + bf16 safetensors) that both kojo and transformers can read.

use super::config::ModelConfig;
use crate::formats::GgmlType;
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use std::path::Path;

/// xorshift64*: small and fast; the same stream everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rnd(pub u64);

impl Rnd {
    pub fn new(seed: u64) -> Self {
        // splitmix the seed so that nearby seeds give unrelated streams; never 0
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rnd((z ^ (z >> 31)) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random valid blocks of `ty` for `n` weights whose magnitudes stay around `amp` (`n` whole
/// blocks).
pub fn random_tensor(r: &mut Rnd, ty: GgmlType, n: usize, amp: f32) -> Vec<u8> {
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
                _ => unreachable!("random blocks of {}", ty.name()),
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

/// [`random_tensor`] on every core, in chunks of `rows` with their own streams from `seed`.
pub fn random_matrix(ty: GgmlType, rows: usize, cols: usize, amp: f32, seed: u64) -> Vec<u8> {
    let row_bytes = cols / ty.block_size().unwrap_or(1) * ty.type_size().unwrap_or(4);
    let mut out = vec![0u8; rows * row_bytes];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.div_ceil(threads * 4).max(1);
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(per * row_bytes).enumerate().collect();
    let next = std::sync::Mutex::new(chunks.into_iter());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some((i, chunk)) = next.lock().unwrap().next() else {
                    break;
                };
                let mut r = Rnd::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                let n = chunk.len() / row_bytes * cols;
                chunk.copy_from_slice(&random_tensor(&mut r, ty, n, amp));
            });
        }
    });
    out
}

/// A random model: a shape, one weight type for its matrices, a seed.
#[derive(Debug, Clone)]
pub struct RandomModel {
    pub spec: String,
    pub cfg: ModelConfig,
    pub ty: GgmlType,
    /// `q4_k_m`: Q4_K with Q6_K where llama.cpp's Q4_K_M puts more bits (see
    /// [`RandomModel::tensor_type`]).
    pub k_mix: bool,
    pub seed: u64,
}

/// The shapes `random:` knows.
pub const SHAPES: &[&str] = &["smollm2-135m", "llama3-8b", "tiny"];

fn llama(
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    heads: (usize, usize),
    vocab: usize,
    rope_base: f64,
    tied: bool,
) -> ModelConfig {
    ModelConfig {
        arch: "llama".into(),
        name: None,
        n_layers,
        hidden,
        ffn,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: hidden / heads.0,
        vocab_size: vocab,
        context_length: 8192,
        rope_base,
        rms_eps: 1e-5,
        tied_embeddings: tied,
        sliding_window: None,
        rope_dim: None,
        rope_scale: 1.0,
        rope_base_swa: None,
        swa_pattern: None,
    }
}

impl RandomModel {
    /// Parse `random:<shape>[:<type>[:<seed>]]` (type default bf16, seed default 0).
    pub fn parse(spec: &str) -> Result<RandomModel> {
        let mut parts = spec.strip_prefix("random:").unwrap_or(spec).split(':');
        let shape = parts.next().unwrap_or("");
        let cfg = match shape {
            "smollm2-135m" => llama(30, 576, 1536, (9, 3), 49152, 100_000.0, true),
            "llama3-8b" => llama(32, 4096, 14336, (32, 8), 128_256, 500_000.0, false),
            "tiny" => llama(2, 128, 256, (4, 2), 512, 10_000.0, false),
            _ => bail!(
                "{spec}: unknown random shape '{shape}' (one of: {})",
                SHAPES.join(", ")
            ),
        };
        let ty_name = parts.next().unwrap_or("bf16");
        let k_mix = ty_name == "q4_k_m";
        let ty = match ty_name {
            "q4_k_m" => GgmlType::Q4K,
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "bf16" => GgmlType::BF16,
            "q4_0" => GgmlType::Q4_0,
            "q4_1" => GgmlType::Q4_1,
            "q5_0" => GgmlType::Q5_0,
            "q5_1" => GgmlType::Q5_1,
            "q8_0" => GgmlType::Q8_0,
            "q4_k" => GgmlType::Q4K,
            "q5_k" => GgmlType::Q5K,
            "q6_k" => GgmlType::Q6K,
            t => bail!("{spec}: unknown weight type '{t}'"),
        };
        let seed = match parts.next() {
            Some(s) => s
                .parse()
                .map_err(|_| anyhow!("{spec}: seed '{s}' is not a number"))?,
            None => 0,
        };
        Ok(RandomModel {
            spec: spec.to_string(),
            cfg,
            ty,
            k_mix,
            seed,
        })
    }

    /// `[cols, rows]` (GGUF order) of every tensor, by GGUF name.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let (h, q, kv) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![h, c.vocab_size]),
            ("output_norm.weight".to_string(), vec![h]),
        ];
        if !c.tied_embeddings {
            t.push(("output.weight".into(), vec![h, c.vocab_size]));
        }
        for l in 0..c.n_layers {
            let b = |s: &str| format!("blk.{l}.{s}.weight");
            t.push((b("attn_norm"), vec![h]));
            t.push((b("ffn_norm"), vec![h]));
            t.push((b("attn_q"), vec![h, q]));
            t.push((b("attn_k"), vec![h, kv]));
            t.push((b("attn_v"), vec![h, kv]));
            t.push((b("attn_output"), vec![q, h]));
            t.push((b("ffn_gate"), vec![h, c.ffn]));
            t.push((b("ffn_up"), vec![h, c.ffn]));
            t.push((b("ffn_down"), vec![c.ffn, h]));
        }
        t
    }

    pub fn n_params(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, d)| d.iter().product::<usize>() as u64)
            .sum()
    }

    /// The type and bytes of tensor `name`: norms as f32 around 1, matrices of the model's
    /// type scaled by 1/sqrt(inputs), the embedding at unit scale.
    pub fn tensor(&self, name: &str) -> Result<(GgmlType, Vec<usize>, Vec<u8>)> {
        let dims = self
            .tensors()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .ok_or_else(|| anyhow!("{}: no tensor {name}", self.spec))?;
        // a stream per tensor: FNV-1a of the name, mixed with the seed
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let seed = h ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if dims.len() == 1 {
            let mut r = Rnd::new(seed);
            let v: Vec<u8> = (0..dims[0])
                .flat_map(|_| (1.0 + 0.1 * r.f()).to_le_bytes())
                .collect();
            return Ok((GgmlType::F32, dims, v));
        }
        let (cols, rows) = (dims[0], dims[1]);
        let amp = if name == "token_embd.weight" {
            1.0
        } else {
            1.7 / (cols as f32).sqrt()
        };
        let ty = self.tensor_type(name, cols);
        Ok((ty, dims, random_matrix(ty, rows, cols, amp, seed)))
    }

    /// The type of matrix `name` with rows of `cols`: the model's, except that a `q4_k_m`
    /// model has Q6_K for the output, and for attn_v and ffn_down in the first and last
    /// eighth of the layers and every third layer between (where llama.cpp's Q4_K_M recipe
    /// spends more bits); unless the rows are not whole blocks of it: then Q8_0, else F16 (as
    /// llama.cpp's quantizer falls back).
    pub fn tensor_type(&self, name: &str, cols: usize) -> GgmlType {
        let n = self.cfg.n_layers;
        // (l < n / 8 is the first case, so the last one sees l >= n / 8)
        let more_bits = |l: usize| l < n / 8 || l >= 7 * n / 8 || (l - n / 8) % 3 == 2;
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        let ty = match (self.k_mix, layer) {
            (true, _) if name == "output.weight" => GgmlType::Q6K,
            (true, Some(l))
                if (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                    && more_bits(l) =>
            {
                GgmlType::Q6K
            }
            _ => self.ty,
        };
        let fits = |t: GgmlType| t.block_size().is_some_and(|b| cols % b == 0);
        [ty, GgmlType::Q8_0, GgmlType::F16]
            .into_iter()
            .find(|&t| fits(t))
            .unwrap_or(GgmlType::F32)
    }

    /// Bytes of all weights, as they would be stored.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(name, d)| match d[..] {
                [n] => 4 * n as u64,
                [cols, rows] => {
                    let t = self.tensor_type(name, cols);
                    (rows * cols / t.block_size().unwrap_or(1) * t.type_size().unwrap_or(4)) as u64
                }
                _ => 0,
            })
            .sum()
    }
}

/// Write `m` (its weights as bf16) as a Hugging Face llama folder: config.json and
/// model.safetensors.
pub fn write_hf_folder(m: &RandomModel, dir: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let c = &m.cfg;
    if c.arch != "llama" {
        bail!(
            "{}: only llama shapes are written as Hugging Face folders",
            m.spec
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": c.n_layers,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rope_theta": c.rope_base,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tied_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut tensors = Vec::new();
    for (name, _) in m.tensors() {
        let (ty, dims, data) = m.tensor(&name)?;
        let n: usize = dims.iter().product();
        let vals = crate::formats::quant::dequantize_to_vec(ty, &data, n)?;
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let hf = super::weights::hf_name(&name)
            .ok_or_else(|| anyhow!("tensor {name} has no Hugging Face name"))?;
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        tensors.push((hf, shape, bytes));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::BF16, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, MatmulMode};
    use crate::model::session::{Logits, Session};
    use crate::model::{ModelSource, Transformer};

    #[test]
    fn specs_parse_and_reject() {
        let m = RandomModel::parse("random:llama3-8b:q4_k:7").unwrap();
        assert_eq!(
            (m.cfg.hidden, m.cfg.n_layers, m.ty, m.seed),
            (4096, 32, GgmlType::Q4K, 7)
        );
        assert_eq!(m.n_params(), 8_030_261_248);
        assert!(RandomModel::parse("random:gpt5").is_err());
        assert!(RandomModel::parse("random:tiny:q9").is_err());
        assert!(RandomModel::parse("random:tiny:bf16:x").is_err());
    }

    #[test]
    fn q4_k_m_spends_more_bits_where_llama_cpp_does() {
        let m = RandomModel::parse("random:llama3-8b:q4_k_m").unwrap();
        let ty = |name: &str| m.tensor_type(name, 4096);
        let more: Vec<usize> = (0..32)
            .filter(|l| ty(&format!("blk.{l}.attn_v.weight")) == GgmlType::Q6K)
            .collect();
        let mut want: Vec<usize> = (0..4).chain(28..32).collect();
        want.extend((6..28).step_by(3));
        want.sort();
        assert_eq!(more, want);
        assert_eq!(ty("blk.6.ffn_down.weight"), GgmlType::Q6K);
        assert_eq!(ty("blk.5.ffn_down.weight"), GgmlType::Q4K);
        assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4K);
        assert_eq!(ty("output.weight"), GgmlType::Q6K);
        assert_eq!(ty("token_embd.weight"), GgmlType::Q4K);
        let plain = RandomModel::parse("random:llama3-8b:q4_k").unwrap();
        assert!(m.weight_bytes() > plain.weight_bytes());
        assert_eq!(plain.tensor_type("output.weight", 4096), GgmlType::Q4K);
    }

    #[test]
    fn tensors_are_deterministic_and_seeded() {
        let a = RandomModel::parse("random:tiny:q8_0:1").unwrap();
        let b = RandomModel::parse("random:tiny:q8_0:2").unwrap();
        let t = "blk.1.ffn_up.weight";
        assert_eq!(a.tensor(t).unwrap().2, a.tensor(t).unwrap().2);
        assert_ne!(a.tensor(t).unwrap().2, b.tensor(t).unwrap().2);
        assert_ne!(
            a.tensor(t).unwrap().2,
            a.tensor("blk.0.ffn_up.weight").unwrap().2
        );
    }

    /// The Hugging Face folder loads (as kojo reads such folders) with the same config and
    /// gives finite logits; the random source itself loads too.
    #[test]
    fn hf_folder_and_random_source_load() {
        let m = RandomModel::parse("random:tiny:bf16:3").unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_hf_folder(&m, dir.path()).unwrap();
        let cpu = CpuBackend::new(MatmulMode::Exact);
        for src in [
            ModelSource::open(dir.path()).unwrap(),
            ModelSource::open(std::path::Path::new("random:tiny:bf16:3")).unwrap(),
        ] {
            let cfg = src.config().unwrap();
            assert_eq!(
                (cfg.hidden, cfg.ffn, cfg.n_kv_heads, cfg.vocab_size),
                (128, 256, 2, 512)
            );
            let model = Transformer::load(&cpu, &src).unwrap();
            let mut s = Session::new(&cpu, &model, 32, 8).unwrap();
            let logits = s.feed(&[1, 2, 3, 4, 5], Logits::Last).unwrap();
            assert_eq!(logits.len(), 512);
            assert!(logits.iter().all(|v| v.is_finite()));
            assert!(logits.iter().any(|&v| v != logits[0]));
        }
    }
}
