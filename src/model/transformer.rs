//! The decoder-only transformer, written once against [`Backend`] for every supported
//! architecture. What differs between architectures is data ([`ArchSpec`]), not code paths:
//!
//! - **llama** (Llama 2/3, Mistral, SmolLM): pre-norm, SwiGLU, RoPE on adjacent pairs in GGUF
//!   (the converter permuted Q/K), on halves from Hugging Face files.
//! - **qwen2**: llama plus Q/K/V biases, RoPE on halves.
//! - **gemma3**: embeddings scaled by `sqrt(hidden)`; RMSNorm on each query and key head;
//!   norms after attention and after the FFN (before each residual add); GeGLU; sliding-window
//!   attention on five layers of every six, with RoPE base 10,000 there and the model's base on
//!   the global layers.
//!
//! One forward pass runs a ragged batch (tokens of several sequences, each at its own positions)
//! and returns logits only for the rows asked for.

use super::{ModelConfig, ModelSource};
use crate::backend::{
    AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, QkvWeights, Rope, RopeLayout,
    Stack, StepInputs,
};
use anyhow::{bail, Context, Result};

/// What one architecture does differently.
#[derive(Debug, Clone)]
pub struct ArchSpec {
    pub glu: Glu,
    /// Multiplies the token embeddings.
    pub embed_scale: f32,
    /// Multiplies `q . k`.
    pub attn_scale: f32,
    pub qkv_bias: bool,
    /// RMSNorm on each query and key head (gemma3).
    pub qk_norm: bool,
    /// RMSNorm on the attention and FFN outputs before the residual add (gemma3).
    pub post_norms: bool,
    /// `[n_layers]` RoPE of each layer.
    pub rope: Vec<Rope>,
    /// `[n_layers]` sliding window of each layer, if any.
    pub window: Vec<Option<usize>>,
}

impl ArchSpec {
    pub fn new(cfg: &ModelConfig, from_hf: bool) -> Result<Self> {
        let n_rot = cfg.rope_dim.unwrap_or(cfg.head_dim);
        let rope = |layout, base| Rope {
            layout,
            n_rot,
            base,
            freq_scale: 1.0 / cfg.rope_scale,
        };
        let default_scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let n = cfg.n_layers;
        Ok(match cfg.arch.as_str() {
            "llama" => {
                let layout = if from_hf {
                    RopeLayout::Halves
                } else {
                    RopeLayout::Interleaved
                };
                ArchSpec {
                    glu: Glu::Silu,
                    embed_scale: 1.0,
                    attn_scale: default_scale,
                    qkv_bias: false,
                    qk_norm: false,
                    post_norms: false,
                    rope: vec![rope(layout, cfg.rope_base); n],
                    window: vec![cfg.sliding_window; n],
                }
            }
            "qwen2" => ArchSpec {
                glu: Glu::Silu,
                embed_scale: 1.0,
                attn_scale: default_scale,
                qkv_bias: true,
                qk_norm: false,
                post_norms: false,
                rope: vec![rope(RopeLayout::Halves, cfg.rope_base); n],
                window: vec![None; n],
            },
            "gemma3" => {
                if from_hf {
                    bail!("gemma3 from safetensors is not supported yet (use its GGUF)");
                }
                let pattern = cfg.swa_pattern.unwrap_or(6);
                let is_swa = |l: usize| {
                    cfg.sliding_window.is_some() && (pattern == 0 || l % pattern < pattern - 1)
                };
                let swa_base = cfg.rope_base_swa.unwrap_or(10_000.0);
                ArchSpec {
                    glu: Glu::GeluTanh,
                    embed_scale: (cfg.hidden as f32).sqrt(),
                    attn_scale: default_scale,
                    qkv_bias: false,
                    qk_norm: true,
                    post_norms: true,
                    rope: (0..n)
                        .map(|l| {
                            if is_swa(l) {
                                Rope {
                                    freq_scale: 1.0,
                                    ..rope(RopeLayout::Halves, swa_base)
                                }
                            } else {
                                rope(RopeLayout::Halves, cfg.rope_base)
                            }
                        })
                        .collect(),
                    window: (0..n)
                        .map(|l| if is_swa(l) { cfg.sliding_window } else { None })
                        .collect(),
                }
            }
            other => bail!("architecture '{other}' is not supported (llama, qwen2, gemma3)"),
        })
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    qkv: QkvWeights<B::Weight>,
    wo: B::Weight,
    /// after attention, after the FFN (gemma3)
    post_norm: Option<[B::Weight; 2]>,
    ffn_norm: B::Weight,
    /// gate and up
    gate_up: Stack<B::Weight>,
    down: B::Weight,
}

pub struct Transformer<B: Backend> {
    pub cfg: ModelConfig,
    pub spec: ArchSpec,
    tok_embd: B::Weight,
    output_norm: B::Weight,
    /// `None`: tied to the token embeddings
    output: Option<B::Weight>,
    /// `[n_rot / 2]` frequency divisors (Llama 3.1+'s `rope_freqs.weight`)
    rope_factors: Option<Vec<f32>>,
    layers: Vec<Layer<B>>,
}

/// One forward pass: the tokens of a ragged batch and where they go.
pub struct Step<'a> {
    /// `[num_tokens]`
    pub tokens: &'a [u32],
    pub layout: BatchLayout<'a>,
    /// Rows (token indices) whose logits are wanted, in output order.
    pub logit_rows: &'a [usize],
}

impl<B: Backend> Transformer<B> {
    /// Load every weight of `src` onto `backend`, checking each shape against the config.
    pub fn load(backend: &B, src: &ModelSource) -> Result<Self> {
        let cfg = src.config()?;
        let spec = ArchSpec::new(&cfg, matches!(src, ModelSource::Hf { .. }))?;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let upload = |w: &HostWeight| -> Result<B::Weight> {
            let loaded = backend
                .load_weight(w)
                .with_context(|| format!("{}", src.path().display()))?;
            // the backend holds its own copy now: let the file's pages go, so loading does
            // not need the model's size twice in memory
            src.release(&w.data);
            Ok(loaded)
        };
        let get =
            |name: &str, dims: &[usize]| -> Result<B::Weight> { upload(&src.weight(name, dims)?) };
        // weights a fused op takes together: stacked when the backend has such an op
        let stack = |parts: &[(String, &[usize])], allow: bool| -> Result<Stack<B::Weight>> {
            let ws = parts
                .iter()
                .map(|(name, dims)| src.weight(name, dims))
                .collect::<Result<Vec<_>>>()?;
            let stacked = if allow {
                backend
                    .load_stacked(&ws)
                    .with_context(|| format!("{}", src.path().display()))?
            } else {
                None
            };
            Ok(match stacked {
                Some(w) => {
                    ws.iter().for_each(|w| src.release(&w.data));
                    Stack::One(w)
                }
                None => Stack::Parts(ws.iter().map(upload).collect::<Result<_>>()?),
            })
        };
        let tok_embd = get("token_embd.weight", &[h, cfg.vocab_size])?;
        let output_norm = get("output_norm.weight", &[h])?;
        let output = if src.has_weight("output.weight") {
            Some(get("output.weight", &[h, cfg.vocab_size])?)
        } else {
            None
        };
        let n_rot = cfg.rope_dim.unwrap_or(hd);
        let rope_factors = if src.has_weight("rope_freqs.weight") {
            let w = src.weight("rope_freqs.weight", &[n_rot / 2])?;
            let f = crate::formats::quant::dequantize_to_vec(w.ty, &w.data, n_rot / 2)?;
            if f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                bail!(
                    "{}: rope_freqs.weight has a factor that is not a positive number",
                    src.path().display()
                );
            }
            Some(f)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let w = |part: &str, dims: &[usize]| get(&format!("blk.{l}.{part}"), dims);
            layers.push(Layer {
                attn_norm: w("attn_norm.weight", &[h])?,
                qkv: {
                    let qkv = stack(
                        &[
                            (format!("blk.{l}.attn_q.weight"), &[h, q_dim]),
                            (format!("blk.{l}.attn_k.weight"), &[h, kv_dim]),
                            (format!("blk.{l}.attn_v.weight"), &[h, kv_dim]),
                        ],
                        true,
                    )?;
                    let stacked = matches!(qkv, Stack::One(_));
                    QkvWeights {
                        w: qkv,
                        // biases stacked as their weights are
                        bias: if spec.qkv_bias {
                            Some(stack(
                                &[
                                    (format!("blk.{l}.attn_q.bias"), &[q_dim]),
                                    (format!("blk.{l}.attn_k.bias"), &[kv_dim]),
                                    (format!("blk.{l}.attn_v.bias"), &[kv_dim]),
                                ],
                                stacked,
                            )?)
                        } else {
                            None
                        },
                        qk_norm: if spec.qk_norm {
                            Some([
                                w("attn_q_norm.weight", &[hd])?,
                                w("attn_k_norm.weight", &[hd])?,
                            ])
                        } else {
                            None
                        },
                    }
                },
                wo: w("attn_output.weight", &[q_dim, h])?,
                post_norm: if spec.post_norms {
                    Some([
                        w("post_attention_norm.weight", &[h])?,
                        w("post_ffw_norm.weight", &[h])?,
                    ])
                } else {
                    None
                },
                ffn_norm: w("ffn_norm.weight", &[h])?,
                gate_up: stack(
                    &[
                        (format!("blk.{l}.ffn_gate.weight"), &[h, cfg.ffn]),
                        (format!("blk.{l}.ffn_up.weight"), &[h, cfg.ffn]),
                    ],
                    true,
                )?,
                down: w("ffn_down.weight", &[cfg.ffn, h])?,
            });
        }
        Ok(Transformer {
            cfg,
            spec,
            tok_embd,
            output_norm,
            output,
            rope_factors,
            layers,
        })
    }

    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            n_layers: self.cfg.n_layers,
            num_blocks,
            block_size,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Logits `[step.logit_rows.len(), vocab]`.
    pub fn forward(&self, be: &B, kv: &mut B::KvCache, step: &Step) -> Result<B::Tensor> {
        let lay = &step.layout;
        if step.tokens.len() != lay.positions.len() || lay.positions.len() != lay.slots.len() {
            bail!("forward: tokens, positions and slots differ in length");
        }
        if step.logit_rows.iter().any(|&r| r >= step.tokens.len()) {
            bail!("forward: a logit row is outside the batch");
        }
        let factors = self.rope_factors.as_deref();
        let mut ropes: Vec<(Rope, Option<&[f32]>)> = Vec::new();
        for r in &self.spec.rope {
            if !ropes.iter().any(|(x, _)| x == r) {
                ropes.push((*r, factors));
            }
        }
        let inputs = StepInputs {
            tokens: step.tokens,
            layout: step.layout,
            logit_rows: step.logit_rows,
            ropes: &ropes,
        };
        be.run_step(kv, &inputs, &mut |kv, s| self.ops(be, kv, s))
    }

    /// The ops of one forward pass.
    fn ops(&self, be: &B, kv: &mut B::KvCache, step: &StepInputs) -> Result<B::Tensor> {
        let c = &self.cfg;
        let eps = c.rms_eps as f32;
        let lay = &step.layout;
        if step.tokens.len() != lay.positions.len() || lay.positions.len() != lay.slots.len() {
            bail!("forward: tokens, positions and slots differ in length");
        }
        let mut x = be.embed(&self.tok_embd, step.tokens, self.spec.embed_scale)?; // [n, hidden]
        for (l, layer) in self.layers.iter().enumerate() {
            let rope = &self.spec.rope[l];
            let factors = self.rope_factors.as_deref();
            // [n, n_heads * hd], rotated; K and V are in the cache
            let q = be.attention_input(
                &x,
                &layer.attn_norm,
                &layer.qkv,
                eps,
                kv,
                l,
                lay,
                c.head_dim,
                rope,
                factors,
            )?;
            let p = AttnParams {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: self.spec.attn_scale,
                window: self.spec.window[l],
            };
            let a = be.attention(kv, l, &q, lay, &p)?; // [n, n_heads * hd]
            match &layer.post_norm {
                Some([post_attn, _]) => {
                    let o = be.matmul(&a, &layer.wo, None);
                    be.add(&mut x, &be.rms_norm(&o, post_attn, eps));
                }
                None => be.matmul_add(&mut x, &a, &layer.wo),
            }
            let act = be.ffn_glu(&x, &layer.ffn_norm, eps, &layer.gate_up, self.spec.glu)?; // [n, ffn]
            match &layer.post_norm {
                Some([_, post_ffn]) => {
                    let d = be.matmul(&act, &layer.down, None);
                    be.add(&mut x, &be.rms_norm(&d, post_ffn, eps));
                }
                None => be.matmul_add(&mut x, &act, &layer.down),
            }
        }
        // [rows, hidden]; every row in order (as in decoding) needs no gather
        let every_row = step.logit_rows.len() == step.tokens.len()
            && step.logit_rows.iter().enumerate().all(|(i, &r)| i == r);
        let output = self.output.as_ref().unwrap_or(&self.tok_embd);
        Ok(if every_row {
            be.matmul_normed(&x, &self.output_norm, eps, output)
        } else {
            let last = be.gather_rows(&x, step.logit_rows);
            be.matmul_normed(&last, &self.output_norm, eps, output)
        })
    }
}
