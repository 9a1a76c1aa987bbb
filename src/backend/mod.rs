//! The narrow boundary between a model and the hardware that runs it.
//!
//! A [`Backend`] offers the dozen ops a decoder-only transformer needs, over activations it
//! owns ([`Backend::Tensor`], always `[rows, cols]` f32 from the model's point of view), weights
//! it was given once at load ([`Backend::Weight`]) and a paged KV cache ([`Backend::KvCache`]).
//! It is not a tensor library: there is no broadcasting, no strides, no graph.
//!
//! - [`gpu`]: kojo's CUDA kernels through a device (a real GPU, or the CPU executor in tests)
//! - [`cpu`]: the reference backend (threads over the machine's cores; integer dot products
//!   against GGUF blocks, or an exact f32 path for tests)

pub mod cpu;
pub mod gpu;

use crate::formats::GgmlType;

/// A weight as read from the model file: raw little-endian bytes of `ty`, row-major with
/// `dims[0]` the contiguous (input) dimension, as GGUF lays it out.
pub struct HostWeight<'a> {
    pub name: String,
    pub ty: GgmlType,
    /// `[cols, rows]` for a matrix (GGUF order), `[n]` for a vector
    pub dims: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

impl HostWeight<'_> {
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }
}

/// How rotary embeddings pair up dimensions within a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs `(2i, 2i+1)`: llama in GGUF (the converter permuted Q and K).
    Interleaved,
    /// Halves `(i, i + n_rot/2)`: NeoX, Hugging Face llama, qwen2, gemma.
    Halves,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub layout: RopeLayout,
    /// Rotated dimensions per head (`<= head_dim`, even).
    pub n_rot: usize,
    pub base: f64,
    /// Linear position scaling: the angle uses `position * freq_scale`.
    pub freq_scale: f64,
}

/// `[positions.len() * n_rot / 2]` (cos, sin) of each token's rotation angle per pair,
/// computed in f64: `position * freq_scale * base^(-2i / n_rot) / factors[i]`.
pub fn rope_table(positions: &[u32], rope: &Rope, factors: Option<&[f32]>) -> Vec<(f32, f32)> {
    let half = rope.n_rot / 2;
    let mut cs = Vec::with_capacity(positions.len() * half);
    for &pos in positions {
        for i in 0..half {
            let inv = rope.base.powf(-2.0 * i as f64 / rope.n_rot as f64);
            let f = factors.map_or(1.0, |f| f[i] as f64);
            let theta = pos as f64 * rope.freq_scale * inv / f;
            cs.push((theta.cos() as f32, theta.sin() as f32));
        }
    }
    cs
}

/// Gated activations: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// SiLU (SwiGLU): llama, qwen2
    Silu,
    /// GELU, tanh approximation (GeGLU): gemma
    GeluTanh,
}

/// Where each token of a ragged batch sits; shared by [`Backend::write_kv`] and
/// [`Backend::attention`].
#[derive(Debug, Clone, Copy)]
pub struct BatchLayout<'a> {
    /// `[num_tokens]` absolute position of each token in its sequence
    pub positions: &'a [u32],
    /// `[num_seqs + 1]` offsets of each sequence's tokens in the batch
    pub seq_starts: &'a [usize],
    /// `[num_seqs][blocks]` KV block ids of each sequence, in position order
    pub block_tables: &'a [&'a [u32]],
    /// `[num_tokens]` cache slot (`block * block_size + offset`) each token's K/V is written to
    pub slots: &'a [u32],
}

/// Checks that `layout` and a query of `q_rows x q_cols` fit an attention with `p` over a
/// cache of `shape` (every position's blocks in its table and in the cache); returns the
/// sequence of each token.
pub fn check_attention(
    layout: &BatchLayout,
    p: &AttnParams,
    shape: &KvShape,
    q_rows: usize,
    q_cols: usize,
) -> Result<Vec<usize>> {
    let hd = p.head_dim;
    let n = layout.positions.len();
    if q_rows != n || q_cols != p.n_heads * hd || hd != shape.head_dim {
        anyhow::bail!(
            "attention: q {q_rows}x{q_cols} for {n} tokens of {} heads x {hd}",
            p.n_heads
        );
    }
    if p.n_kv_heads != shape.n_kv_heads || p.n_kv_heads == 0 || p.n_heads % p.n_kv_heads != 0 {
        anyhow::bail!(
            "attention: {} query heads over {} KV heads",
            p.n_heads,
            p.n_kv_heads
        );
    }
    let num_seqs = layout.seq_starts.len().saturating_sub(1);
    if layout.block_tables.len() != num_seqs
        || layout.seq_starts.last() != Some(&n)
        || layout.seq_starts.windows(2).any(|w| w[0] > w[1])
    {
        anyhow::bail!("attention: batch layout does not cover {n} tokens");
    }
    let mut seq_of = vec![0usize; n];
    for s in 0..num_seqs {
        for x in &mut seq_of[layout.seq_starts[s]..layout.seq_starts[s + 1]] {
            *x = s;
        }
    }
    let bs = shape.block_size;
    for (t, &pos) in layout.positions.iter().enumerate() {
        let need = pos as usize / bs + 1;
        let table = layout.block_tables[seq_of[t]];
        if table.len() < need {
            anyhow::bail!("attention: position {pos} needs {need} blocks, table has fewer");
        }
        if table[..need]
            .iter()
            .any(|&b| b as usize >= shape.num_blocks)
        {
            anyhow::bail!(
                "attention: block id beyond the cache's {}",
                shape.num_blocks
            );
        }
    }
    Ok(seq_of)
}

/// Attention parameters of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k`.
    pub scale: f32,
    /// Sliding window: a token at position `p` sees positions `j` with `p - j < window`.
    pub window: Option<usize>,
}

/// Shape of a paged KV cache: per layer, K and V pools of
/// `[num_blocks, block_size, n_kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

pub type Result<T> = anyhow::Result<T>;

/// Where a model runs: `cpu` (the default) or `cuda[:N]` (GPU N, default 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Target, String> {
        match s {
            "cpu" => Ok(Target::Cpu),
            "cuda" => Ok(Target::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Target::Cuda)
                .ok_or_else(|| format!("'{s}' is not a device: cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cpu => write!(f, "cpu"),
            Target::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One forward pass's inputs, as [`Backend::run_step`] sees them.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    /// `[num_tokens]`
    pub tokens: &'a [u32],
    pub layout: BatchLayout<'a>,
    /// Rows (token indices) whose logits are wanted, in output order.
    pub logit_rows: &'a [usize],
    /// Every RoPE the model's layers use, with its frequency factors.
    pub ropes: &'a [(Rope, Option<&'a [f32]>)],
}

/// The ops of one forward pass, as [`Backend::run_step`] runs (or records) them.
pub type StepFn<'a, B> =
    dyn FnMut(&mut <B as Backend>::KvCache, &StepInputs) -> Result<<B as Backend>::Tensor> + 'a;

/// Weights a backend may have stacked at load ([`Backend::load_stacked`]): their rows in one
/// weight, for a fused op, or each on its own.
pub enum Stack<W> {
    One(W),
    Parts(Vec<W>),
}

/// An attention layer's input projections.
pub struct QkvWeights<W> {
    /// Q `[n_heads * hd, hidden]`, K and V `[n_kv * hd, hidden]`.
    pub w: Stack<W>,
    /// Q, K and V biases (qwen2).
    pub bias: Option<Stack<W>>,
    /// RMSNorm weights `[hd]` of each query and each key head (gemma3).
    pub qk_norm: Option<[W; 2]>,
}

/// [`Backend::attention_input`] as separate ops, for weights that are not stacked.
#[allow(clippy::too_many_arguments)]
pub fn attention_input_by_ops<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    norm: &B::Weight,
    w: &QkvWeights<B::Weight>,
    eps: f32,
    cache: &mut B::KvCache,
    layer: usize,
    layout: &BatchLayout,
    head_dim: usize,
    rope: &Rope,
    factors: Option<&[f32]>,
) -> Result<B::Tensor> {
    let (Stack::Parts(ws), bias) = (&w.w, &w.bias) else {
        anyhow::bail!("attention_input: this backend has no fused op for stacked Q/K/V weights");
    };
    let bias = match bias {
        None => None,
        Some(Stack::Parts(b)) if b.len() == 3 => Some(b),
        Some(_) => anyhow::bail!("attention_input: Q/K/V biases stacked but not their weights"),
    };
    let [wq, wk, wv] = &ws[..] else {
        anyhow::bail!(
            "attention_input: {} projections instead of Q, K and V",
            ws.len()
        );
    };
    let h = be.rms_norm(x, norm, eps);
    let mut q = be.matmul(&h, wq, bias.map(|b| &b[0]));
    let mut k = be.matmul(&h, wk, bias.map(|b| &b[1]));
    let v = be.matmul(&h, wv, bias.map(|b| &b[2]));
    if let Some([qn, kn]) = &w.qk_norm {
        q = be.rms_norm(&q, qn, eps);
        k = be.rms_norm(&k, kn, eps);
    }
    be.rope(&mut q, layout.positions, head_dim, rope, factors);
    be.rope_write_kv(cache, layer, &mut k, &v, layout, head_dim, rope, factors)?;
    Ok(q)
}

/// [`Backend::ffn_glu`] as separate ops, for weights that are not stacked.
pub fn ffn_glu_by_ops<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    norm: &B::Weight,
    eps: f32,
    w: &Stack<B::Weight>,
    act: Glu,
) -> Result<B::Tensor> {
    let Stack::Parts(ws) = w else {
        anyhow::bail!("ffn_glu: this backend has no fused op for stacked gate/up weights");
    };
    let [gate, up] = &ws[..] else {
        anyhow::bail!("ffn_glu: {} projections instead of gate and up", ws.len());
    };
    let h = be.rms_norm(x, norm, eps);
    let g = be.matmul(&h, gate, None);
    let u = be.matmul(&h, up, None);
    Ok(be.glu(&g, &u, act))
}

/// The ops of a decoder-only transformer. Tensors are `[rows, cols]` f32 activations; a
/// "segment" op (RMSNorm, RoPE) works on each `seg`-wide slice of a row, so per-head norms and
/// per-head rotations need no reshape.
pub trait Backend {
    type Tensor;
    type Weight;
    type KvCache;

    /// Take a weight from the file (once, at load).
    fn load_weight(&self, w: &HostWeight) -> Result<Self::Weight>;
    /// `[rows, cols]` zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor;
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Self::Tensor;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    fn alloc_kv(&self, shape: KvShape) -> Result<Self::KvCache>;

    /// `out[i] = table[tokens[i]] * scale`; out `[num_tokens, hidden]`.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], scale: f32) -> Result<Self::Tensor>;
    /// Rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor;
    /// RMSNorm of every `w.len()`-wide segment of each row, times `w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `residual += x`, then returns `rms_norm(residual, w)`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor;
    /// `residual += x`.
    fn add(&self, residual: &mut Self::Tensor, x: &Self::Tensor);
    /// `x [n, k] @ w[m, k]^T (+ bias[m])` → `[n, m]`.
    fn matmul(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Tensor;
    /// Rotate every `head_dim`-wide segment of each row by its token's position. `factors`
    /// (`[n_rot / 2]`, Llama 3's `rope_freqs`) divide each pair's frequency.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        positions: &[u32],
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    );
    /// Scale in place.
    fn scale(&self, x: &mut Self::Tensor, s: f32);
    /// Store `k`, `v` (`[num_tokens, n_kv_heads * head_dim]`) at `layout.slots` of `layer`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        layout: &BatchLayout,
    ) -> Result<()>;
    /// Rotate `k` as [`Backend::rope`] does and store it with `v` as [`Backend::write_kv`] does;
    /// a backend may fuse the two (`k` is then left unrotated).
    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &mut Self::Tensor,
        v: &Self::Tensor,
        layout: &BatchLayout,
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) -> Result<()> {
        self.rope(k, layout.positions, head_dim, rope, factors);
        self.write_kv(cache, layer, k, v, layout)
    }
    /// Causal attention of each token's query heads over its sequence's cached K/V
    /// (positions `0..=position`, within the window). q `[num_tokens, n_heads * head_dim]`.
    fn attention(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        q: &Self::Tensor,
        layout: &BatchLayout,
        p: &AttnParams,
    ) -> Result<Self::Tensor>;
    /// One forward pass: `run` does its ops for the inputs it is given, and returns the
    /// logits of `logit_rows`. The default runs it once as is. A backend may instead pad the
    /// batch, record `run`'s work once and replay it for later steps of the same shape (CUDA
    /// graphs): `run` must then act only through the backend, on what it is given.
    fn run_step(
        &self,
        kv: &mut Self::KvCache,
        step: &StepInputs,
        run: &mut StepFn<Self>,
    ) -> Result<Self::Tensor> {
        run(kv, step)
    }
    /// `parts` (matrices of one type and width, or vectors) as one weight of their rows in
    /// order, when this backend has fused ops that take such a weight
    /// ([`Backend::attention_input`], [`Backend::ffn_glu`]); `Ok(None)` (the default): load
    /// them one by one. A backend that stacks overrides those two ops.
    fn load_stacked(&self, parts: &[HostWeight]) -> Result<Option<Self::Weight>> {
        let _ = parts;
        Ok(None)
    }
    /// The attention input of the residual stream `x`: its RMSNorm by `norm` (`eps`), the Q,
    /// K and V projections with their biases, the per-head norms, RoPE on q and k; K and V
    /// stored at `layout.slots` of `layer`. Returns q `[num_tokens, n_heads * head_dim]`,
    /// rotated.
    #[allow(clippy::too_many_arguments)]
    fn attention_input(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        w: &QkvWeights<Self::Weight>,
        eps: f32,
        cache: &mut Self::KvCache,
        layer: usize,
        layout: &BatchLayout,
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) -> Result<Self::Tensor> {
        attention_input_by_ops(
            self, x, norm, w, eps, cache, layer, layout, head_dim, rope, factors,
        )
    }
    /// `act(h @ gate^T) * (h @ up^T)` for `h` = RMSNorm(x) by `norm` (`eps`) and `w` = gate
    /// and up.
    fn ffn_glu(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        w: &Stack<Self::Weight>,
        act: Glu,
    ) -> Result<Self::Tensor> {
        ffn_glu_by_ops(self, x, norm, eps, w, act)
    }
    /// `RMSNorm(x) @ w^T`, the norm by `norm` (`eps`) over whole rows.
    fn matmul_normed(
        &self,
        x: &Self::Tensor,
        norm: &Self::Weight,
        eps: f32,
        w: &Self::Weight,
    ) -> Self::Tensor {
        self.matmul(&self.rms_norm(x, norm, eps), w, None)
    }
    /// `residual += x @ w^T` (an output projection into the residual stream).
    fn matmul_add(&self, residual: &mut Self::Tensor, x: &Self::Tensor, w: &Self::Weight) {
        let y = self.matmul(x, w, None);
        self.add(residual, &y);
    }
    /// `act(gate) * up`.
    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Glu) -> Self::Tensor;
    /// After a failed step: `Ok` when the backend can run the next one (a failure of that step
    /// alone, such as running out of memory, is cleared), `Err` naming the fault when it cannot
    /// (the device is lost: the engine stops and the process exits).
    fn recover(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Set to -inf, in place, every logit whose bit is clear in its row's mask
    /// ([`crate::sampling::apply_mask`]; `None` leaves a row as it is), so a constrained row
    /// can still be drawn where the logits are.
    fn mask_rows(&self, logits: &mut Self::Tensor, masks: &[Option<&[u32]>]) -> Result<()>;
    /// Whether the host's cores are idle while a forward pass runs (a device computes it), so
    /// host work such as grammar masks is best done beside it. The CPU backend's forward pass
    /// uses every core itself.
    fn host_idle_during_forward(&self) -> bool {
        false
    }
    /// The most candidates [`Backend::pick_rows`] draws from without copying the logits back
    /// (a greedy draw always qualifies).
    fn pick_max_k(&self) -> usize {
        usize::MAX
    }
    /// One token per row of logits, drawn as `picks[row]` says ([`crate::sampling::pick`]),
    /// where the logits are: only the ids come back. Default: copy the logits back and pick on
    /// the host.
    fn pick_rows(
        &self,
        logits: &Self::Tensor,
        picks: &[crate::sampling::Pick],
    ) -> Result<Vec<u32>> {
        let (rows, cols) = self.shape(logits);
        if picks.len() != rows {
            anyhow::bail!("pick_rows: {} picks for {rows} rows", picks.len());
        }
        let v = self.download(logits)?;
        Ok(picks
            .iter()
            .enumerate()
            .map(|(r, p)| crate::sampling::pick(&v[r * cols..(r + 1) * cols], p))
            .collect())
    }
}
