//! The CPU backend: the reference every other backend is checked against, and a real fallback.
//!
//! - [`matmul`]: products against dense and GGUF-block weights (integer or exact f32)
//! - [`attention`]: the paged f16 KV cache and causal attention over it
//!
//! - [`simd`]: hand-written x86-64 kernels for the quantized matmuls
//! - [`pool`]: the persistent worker threads matmul and attention run on
//!
//! Element-wise ops are plain loops on the calling thread.

pub mod attention;
pub mod math;
pub mod matmul;
pub mod pool;
#[cfg(target_arch = "x86_64")]
pub mod simd;
#[cfg(target_arch = "x86_64")]
pub mod x8;

use super::{AttnParams, Backend, BatchLayout, Glu, HostWeight, KvShape, Result, Rope, RopeLayout};
use crate::formats::quant::dequantize_to_vec;
use crate::formats::GgmlType;
use anyhow::{bail, Context};
pub use attention::CpuKvCache;
pub use matmul::{MatmulMode, Matrix};

/// `[rows, cols]` f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// A weight: a matrix `[rows, cols]` (a vector is one row).
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub m: Matrix,
}

impl CpuWeight {
    fn vector(&self) -> &[f32] {
        match &self.m {
            Matrix::Dense(v) => v,
            _ => unreachable!("vectors are loaded dense"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    pub mode: MatmulMode,
}

impl CpuBackend {
    pub fn new(mode: MatmulMode) -> Self {
        CpuBackend { mode }
    }

    /// A quantized weight in the layout this CPU's kernels read best: repacked eight rows at a
    /// time where the AVX-512 VNNI kernels take the type, else the file's blocks.
    fn weight_matrix(&self, ty: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Matrix {
        #[cfg(target_arch = "x86_64")]
        if self.mode == MatmulMode::Quantized
            && std::env::var_os("KOJO_NO_X8").is_none()
            && matmul::Kernels::detect() == matmul::Kernels::Simd(simd::Isa::Vnni)
        {
            if let Some(data) = x8::repack(ty, data, rows, row_bytes) {
                return Matrix::X8 { ty, data };
            }
        }
        Matrix::Blocks {
            ty,
            data: data.to_vec(),
            row_bytes,
        }
    }
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xs, os) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let ss: f64 = xs.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / w.len() as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in os.iter_mut().zip(xs).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// What a RoPE cos/sin table depends on.
#[derive(PartialEq)]
struct RopeKey {
    positions: Vec<u32>,
    base: u64,
    freq_scale: u64,
    n_rot: usize,
    factors: Option<Vec<f32>>,
}

thread_local! {
    /// The last two RoPE tables computed on this thread (`[positions, n_rot / 2]` cos/sin).
    static ROPE_TABLES: std::cell::RefCell<Vec<(RopeKey, Vec<(f32, f32)>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

#[inline(always)]
fn glu_body(o: &mut [f32], g: &[f32], u: &[f32], act: Glu) {
    match act {
        Glu::Silu => {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = math::silu(g) * u;
            }
        }
        Glu::GeluTanh => {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = math::gelu_tanh(g) * u;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_avx2(o: &mut [f32], g: &[f32], u: &[f32], act: Glu) {
    glu_body(o, g, u, act)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn load_weight(&self, w: &HostWeight) -> Result<CpuWeight> {
        let (rows, cols) = (w.rows(), w.cols());
        let n = rows * cols;
        let m = match w.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Matrix::Dense(
                dequantize_to_vec(w.ty, &w.data, n)
                    .with_context(|| format!("tensor {}", w.name))?,
            ),
            ty if ty.is_supported() => {
                let bs = ty.block_size().unwrap_or(1);
                if cols % bs != 0 {
                    bail!(
                        "tensor {}: row of {cols} is not whole {} blocks",
                        w.name,
                        ty.name()
                    );
                }
                if rows == 1 {
                    // vectors (norm weights) are read element-wise: keep them dense
                    Matrix::Dense(
                        dequantize_to_vec(ty, &w.data, n)
                            .with_context(|| format!("tensor {}", w.name))?,
                    )
                } else {
                    let row_bytes = cols / bs * ty.type_size().unwrap_or(0);
                    if w.data.len() != rows * row_bytes {
                        bail!(
                            "tensor {}: {} bytes for {rows} rows of {row_bytes}",
                            w.name,
                            w.data.len()
                        );
                    }
                    self.weight_matrix(ty, &w.data, rows, row_bytes)
                }
            }
            ty => bail!("tensor {}: type {} is not supported", w.name, ty.name()),
        };
        Ok(CpuWeight { rows, cols, m })
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(data.len(), rows * cols);
        CpuTensor {
            data: data.to_vec(),
            rows,
            cols,
        }
    }

    fn mask_rows(&self, logits: &mut CpuTensor, masks: &[Option<&[u32]>]) -> Result<()> {
        if masks.len() != logits.rows {
            anyhow::bail!("mask_rows: {} masks for {} rows", masks.len(), logits.rows);
        }
        let cols = logits.cols;
        for (r, m) in masks.iter().enumerate() {
            if let Some(m) = m {
                crate::sampling::apply_mask(&mut logits.data[r * cols..(r + 1) * cols], m);
            }
        }
        Ok(())
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CpuKvCache> {
        CpuKvCache::new(shape)
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], scale: f32) -> Result<CpuTensor> {
        let k = table.cols;
        let mut out = self.zeros(tokens.len(), k);
        for (&tok, row) in tokens.iter().zip(out.data.chunks_exact_mut(k)) {
            if tok as usize >= table.rows {
                bail!("token id {tok} is outside the vocabulary of {}", table.rows);
            }
            table.m.row_f32(tok as usize, k, row);
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(out)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        CpuTensor {
            data,
            rows: rows.len(),
            cols: x.cols,
        }
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> CpuTensor {
        let mut out = self.zeros(x.rows, x.cols);
        rms_norm_row(&x.data, w.vector(), eps, &mut out.data);
        out
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &CpuWeight,
        eps: f32,
    ) -> CpuTensor {
        self.add(residual, x);
        self.rms_norm(residual, w, eps)
    }

    fn add(&self, residual: &mut CpuTensor, x: &CpuTensor) {
        assert_eq!((residual.rows, residual.cols), (x.rows, x.cols));
        residual
            .data
            .iter_mut()
            .zip(&x.data)
            .for_each(|(r, v)| *r += v);
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> CpuTensor {
        assert_eq!(
            x.cols, w.cols,
            "matmul: x has {} columns, weight {}",
            x.cols, w.cols
        );
        let mut data = w.m.matmul(&x.data, x.cols, w.rows, self.mode);
        if let Some(b) = bias {
            for row in data.chunks_exact_mut(w.rows) {
                row.iter_mut().zip(b.vector()).for_each(|(o, b)| *o += b);
            }
        }
        CpuTensor {
            data,
            rows: x.rows,
            cols: w.rows,
        }
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        positions: &[u32],
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) {
        assert_eq!(x.rows, positions.len());
        let half = rope.n_rot / 2;
        ROPE_TABLES.with(|tables| {
            let mut tables = tables.borrow_mut();
            let key = RopeKey {
                positions: positions.to_vec(),
                base: rope.base.to_bits(),
                freq_scale: rope.freq_scale.to_bits(),
                n_rot: rope.n_rot,
                factors: factors.map(|f| f.to_vec()),
            };
            // the same positions and frequencies come back for K after Q and for every layer
            // of the step (two tables: Gemma alternates two bases)
            let at = match tables.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    let cs = super::rope_table(positions, rope, factors);
                    if tables.len() == 2 {
                        tables.remove(0);
                    }
                    tables.push((key, cs));
                    tables.len() - 1
                }
            };
            let cs_all = &tables[at].1;
            for (t, row) in x.data.chunks_exact_mut(x.cols).enumerate() {
                let cs = &cs_all[t * half..(t + 1) * half];
                for head in row.chunks_exact_mut(head_dim) {
                    for (i, &(cos, sin)) in cs.iter().enumerate() {
                        let (a, b) = match rope.layout {
                            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                            RopeLayout::Halves => (i, i + half),
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * cos - x1 * sin;
                        head[b] = x0 * sin + x1 * cos;
                    }
                }
            }
        });
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) {
        x.data.iter_mut().for_each(|v| *v *= s);
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        layout: &BatchLayout,
    ) -> Result<()> {
        cache.write(layer, k, v, layout)
    }

    fn attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        q: &CpuTensor,
        layout: &BatchLayout,
        p: &AttnParams,
    ) -> Result<CpuTensor> {
        cache.attention(layer, q, layout, p)
    }

    fn glu(&self, gate: &CpuTensor, up: &CpuTensor, act: Glu) -> CpuTensor {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols));
        let mut out = self.zeros(gate.rows, gate.cols);
        let ptr = matmul::Out(out.data.as_mut_ptr());
        let avx2 = matmul::has_avx2();
        let f = |range: std::ops::Range<usize>| {
            // SAFETY: ranges are disjoint and inside `out`
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.at(range.start), range.len()) };
            let (g, u) = (&gate.data[range.clone()], &up.data[range]);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 and FMA (checked)
                return unsafe { glu_avx2(o, g, u, act) };
            }
            let _ = avx2;
            glu_body(o, g, u, act)
        };
        let n = out.data.len();
        if n >= 1 << 14 {
            pool::global().for_ranges(n, f);
        } else {
            f(0..n);
        }
        out
    }
}
