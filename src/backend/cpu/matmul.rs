//! Matrix products on the CPU: `out[n, m] = x[n, k] @ w[m, k]^T`.
//!
//! Weights stay in their GGUF blocks. Each weight row is unpacked once per call into small
//! integers `q[k]` and per-16-weight affine scales (`w = a * q - b`, see
//! [`crate::formats::quant::Unpacked`]), then dotted against every activation row:
//!
//! - **Quantized** (the default, as llama.cpp does): activations are quantized per block like
//!   ggml's `vec_dot_type` of the weight — Q8_0 (32 weights, f16 scale `amax / 127`) for the
//!   legacy types, Q8_K (256 weights, f32 scale `max / -127`, ties to even) for the K-quants —
//!   and each 16-weight group is an integer dot product: `sum(w x) = sum_g a_g dy_g sum(q y) -
//!   b_g dy_g sum(y)`.
//! - **Exact**: the row is dequantized to f32 and dotted against f32 activations. Slower; the
//!   reference that tests compare against.
//!
//! Dense weights (F32; F16 and BF16 are widened to f32 at load) take the f32 path.
//! Work is split over output rows with rayon; the inner loops are written so the compiler
//! vectorizes them, and are compiled twice on x86-64 (baseline and AVX2+FMA), chosen at run time.

use crate::formats::quant::{unpack_block, Unpacked, GROUP};
use crate::formats::GgmlType;
use half::f16;
use rayon::prelude::*;

/// Which arithmetic a quantized matmul uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulMode {
    #[default]
    Quantized,
    Exact,
}

/// A weight matrix `[rows, cols]` in the layout the CPU kernels read.
pub enum Matrix {
    /// `[rows, cols]` f32
    Dense(Vec<f32>),
    /// `[rows, cols / block_size]` GGUF blocks of `ty`
    Blocks {
        ty: GgmlType,
        data: Vec<u8>,
        row_bytes: usize,
    },
}

/// Activations quantized per block, laid out per 16-weight group.
struct QuantActs {
    /// `[n, k]`
    q: Vec<i8>,
    /// `[n, k / 16]` the scale of the block each group belongs to
    d: Vec<f32>,
    /// `[n, k / 16]` `d * sum(q)` of each group
    dsum: Vec<f32>,
}

/// ggml's `nearest_int`: round to nearest, ties to even.
#[inline]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn quantize_acts(x: &[f32], k: usize, block: usize) -> QuantActs {
    let n = x.len() / k;
    let groups = k / GROUP;
    let mut qa = QuantActs {
        q: vec![0; n * k],
        d: vec![0.0; n * groups],
        dsum: vec![0.0; n * groups],
    };
    for t in 0..n {
        for (bi, xb) in x[t * k..(t + 1) * k].chunks_exact(block).enumerate() {
            let qb = &mut qa.q[t * k + bi * block..t * k + (bi + 1) * block];
            let d = if block == 256 {
                // Q8_K: scale from the signed value of largest magnitude
                let mut max = 0f32;
                let mut amax = 0f32;
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    qb.fill(0);
                    0.0
                } else {
                    let iscale = -127.0 / max;
                    for (q, &v) in qb.iter_mut().zip(xb) {
                        *q = nearest_int(iscale * v).min(127) as i8;
                    }
                    1.0 / iscale
                }
            } else {
                // Q8_0/Q8_1 as ggml's x86 code makes them: scale amax / 127 stored as f16,
                // values x * 127 / amax rounded to nearest even
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                for (q, &v) in qb.iter_mut().zip(xb) {
                    *q = nearest_int(v * id) as i8;
                }
                let sum: i32 = qb.iter().map(|&v| v as i32).sum();
                // Q8_1's block sum, f16 like ggml's; the weight's offset is the same over
                // the block, so the whole sum sits on the first group
                let g0 = t * groups + bi * block / GROUP;
                qa.d[g0] = f16::from_f32(d).to_f32();
                qa.d[g0 + 1] = qa.d[g0];
                qa.dsum[g0] = f16::from_f32(d * sum as f32).to_f32();
                qa.dsum[g0 + 1] = 0.0;
                continue;
            };
            let g0 = t * groups + bi * block / GROUP;
            for (g, qg) in qb.chunks_exact(GROUP).enumerate() {
                let s: i32 = qg.iter().map(|&v| v as i32).sum();
                qa.d[g0 + g] = d;
                qa.dsum[g0 + g] = d * s as f32;
            }
        }
    }
    qa
}

/// One weight row, unpacked: `[k]` integers and `[k / 16]` scales.
struct RowBuf {
    q: Vec<i8>,
    a: Vec<f32>,
    b: Vec<f32>,
    /// `[k]` dequantized (exact mode only)
    w: Vec<f32>,
}

impl RowBuf {
    fn new(k: usize) -> Self {
        RowBuf {
            q: vec![0; k],
            a: vec![0.0; k / GROUP],
            b: vec![0.0; k / GROUP],
            w: vec![0.0; k],
        }
    }

    fn unpack(&mut self, ty: GgmlType, row: &[u8], exact: bool) {
        let bs = ty.block_size().unwrap_or(1);
        let ts = ty.type_size().unwrap_or(1);
        let gpb = bs / GROUP;
        let mut u = Unpacked::default();
        for (bi, blk) in row.chunks_exact(ts).enumerate() {
            unpack_block(ty, blk, &mut u);
            self.q[bi * bs..(bi + 1) * bs].copy_from_slice(&u.q[..bs]);
            self.a[bi * gpb..(bi + 1) * gpb].copy_from_slice(&u.a[..gpb]);
            self.b[bi * gpb..(bi + 1) * gpb].copy_from_slice(&u.b[..gpb]);
            if exact {
                u.dequantize(&mut self.w[bi * bs..(bi + 1) * bs]);
            }
        }
    }
}

/// `sum(a * b)` with 16 independent accumulators so the compiler can vectorize.
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `sum_g a_g d_g sum(q y) - sum_g b_g dsum_g` over whole 16-weight groups.
#[inline(always)]
fn dot_q(row: &RowBuf, y: &[i8], d: &[f32], dsum: &[f32], has_b: bool) -> f32 {
    let mut acc = [0f32; 16];
    for (g, (qg, yg)) in row
        .q
        .chunks_exact(GROUP)
        .zip(y.chunks_exact(GROUP))
        .enumerate()
    {
        let s = row.a[g] * d[g];
        for l in 0..16 {
            acc[l] += (qg[l] as i32 * yg[l] as i32) as f32 * s;
        }
    }
    let mut total: f32 = acc.iter().sum();
    if has_b {
        total -= dot_f32(&row.b, dsum);
    }
    total
}

struct OutPtr(*mut f32);
// SAFETY: each task writes a disjoint set of columns (its own rows of the weight).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// Rows per parallel task.
fn chunk_rows(m: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = m.div_ceil(threads * 8).max(1);
    // bigger chunks when each row has a lot of work already
    if n >= 64 { per.max(4) } else { per.max(16) }.min(m.max(1))
}

#[inline(always)]
fn rows_blocks(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    qa: Option<&QuantActs>,
    k: usize,
    m: usize,
    out: &OutPtr,
) {
    let n = x.len() / k;
    let groups = k / GROUP;
    let mut row = RowBuf::new(k);
    let exact = qa.is_none();
    let has_b = !matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q3K | GgmlType::Q6K
    );
    for r in r0..r1 {
        row.unpack(ty, &data[r * row_bytes..(r + 1) * row_bytes], exact);
        for t in 0..n {
            let v = match qa {
                None => dot_f32(&row.w, &x[t * k..(t + 1) * k]),
                Some(qa) => dot_q(
                    &row,
                    &qa.q[t * k..(t + 1) * k],
                    &qa.d[t * groups..(t + 1) * groups],
                    &qa.dsum[t * groups..(t + 1) * groups],
                    has_b,
                ),
            };
            // SAFETY: t < n, r < m; column r belongs to this task only.
            unsafe { *out.0.add(t * m + r) = v };
        }
    }
}

#[inline(always)]
fn rows_dense(w: &[f32], r0: usize, r1: usize, x: &[f32], k: usize, m: usize, out: &OutPtr) {
    let n = x.len() / k;
    for r in r0..r1 {
        let wr = &w[r * k..(r + 1) * k];
        for t in 0..n {
            let v = dot_f32(wr, &x[t * k..(t + 1) * k]);
            // SAFETY: as above
            unsafe { *out.0.add(t * m + r) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_blocks_avx2(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    qa: Option<&QuantActs>,
    k: usize,
    m: usize,
    out: &OutPtr,
) {
    rows_blocks(ty, data, row_bytes, r0, r1, x, qa, k, m, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_dense_avx2(
    w: &[f32],
    r0: usize,
    r1: usize,
    x: &[f32],
    k: usize,
    m: usize,
    out: &OutPtr,
) {
    rows_dense(w, r0, r1, x, k, m, out)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Matrix {
    /// `x [n, k]` times this `[m, k]` matrix transposed → `[n, m]`.
    pub fn matmul(&self, x: &[f32], k: usize, m: usize, mode: MatmulMode) -> Vec<f32> {
        let n = x.len() / k;
        let mut out = vec![0f32; n * m];
        let ptr = OutPtr(out.as_mut_ptr());
        let chunk = chunk_rows(m, n);
        let avx2 = has_avx2();
        match self {
            Matrix::Dense(w) => {
                (0..m.div_ceil(chunk)).into_par_iter().for_each(|c| {
                    let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(m));
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: the CPU has AVX2 and FMA (checked above)
                        return unsafe { rows_dense_avx2(w, r0, r1, x, k, m, &ptr) };
                    }
                    let _ = avx2;
                    rows_dense(w, r0, r1, x, k, m, &ptr)
                });
            }
            Matrix::Blocks {
                ty,
                data,
                row_bytes,
            } => {
                let qa = match mode {
                    MatmulMode::Exact => None,
                    MatmulMode::Quantized => {
                        let act_block = if ty.block_size() == Some(256) {
                            256
                        } else {
                            32
                        };
                        Some(quantize_acts(x, k, act_block))
                    }
                };
                let qa = qa.as_ref();
                (0..m.div_ceil(chunk)).into_par_iter().for_each(|c| {
                    let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(m));
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: the CPU has AVX2 and FMA (checked above)
                        return unsafe {
                            rows_blocks_avx2(*ty, data, *row_bytes, r0, r1, x, qa, k, m, &ptr)
                        };
                    }
                    rows_blocks(*ty, data, *row_bytes, r0, r1, x, qa, k, m, &ptr)
                });
            }
        }
        out
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, k: usize, out: &mut [f32]) {
        match self {
            Matrix::Dense(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            Matrix::Blocks {
                ty,
                data,
                row_bytes,
            } => {
                let mut rb = RowBuf::new(k);
                rb.unpack(*ty, &data[r * row_bytes..(r + 1) * row_bytes], true);
                out.copy_from_slice(&rb.w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantized and exact paths agree with a plain f64 product on random Q8_0 / Q4_K weights.
    #[test]
    fn paths_agree_with_f64() {
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        for ty in [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q4_1] {
            let (k, m, n) = (512, 7, 3);
            let ts = ty.type_size().unwrap();
            let bs = ty.block_size().unwrap();
            let data: Vec<u8> = (0..m * k / bs * ts)
                .map(|_| (rnd() * 127.0) as i8 as u8)
                .collect();
            // keep f16 scales finite: rewrite each block's leading scale(s) to small values
            let mut data = data;
            for blk in data.chunks_exact_mut(ts) {
                let off = if ty == GgmlType::Q6K { 208 } else { 0 };
                blk[off..off + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
                if matches!(ty, GgmlType::Q4K | GgmlType::Q4_1) {
                    blk[2..4].copy_from_slice(&f16::from_f32(0.02).to_bits().to_le_bytes());
                }
            }
            let w = crate::formats::quant::dequantize_to_vec(ty, &data, m * k).unwrap();
            let x: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let mat = Matrix::Blocks {
                ty,
                data,
                row_bytes: k / bs * ts,
            };
            let exact = mat.matmul(&x, k, m, MatmulMode::Exact);
            let quant = mat.matmul(&x, k, m, MatmulMode::Quantized);
            for t in 0..n {
                for r in 0..m {
                    let want: f64 = (0..k)
                        .map(|i| w[r * k + i] as f64 * x[t * k + i] as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|i| (w[r * k + i] as f64 * x[t * k + i] as f64).abs())
                        .sum();
                    let e = exact[t * m + r] as f64;
                    let q = quant[t * m + r] as f64;
                    assert!(
                        (e - want).abs() <= 1e-5 * scale,
                        "{ty:?} exact {e} vs {want}"
                    );
                    assert!(
                        (q - want).abs() <= 2e-2 * scale,
                        "{ty:?} quant {q} vs {want}"
                    );
                }
            }
        }
    }
}
