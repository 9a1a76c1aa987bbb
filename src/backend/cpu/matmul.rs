//! Matrix products on the CPU: `out[n, m] = x[n, k] @ w[m, k]^T`.
//!
//! Weights stay in their GGUF blocks. The fast path is [`super::simd`]: hand-written x86-64
//! kernels that read the blocks as they are. The portable path, for other CPUs and the types
//! without a kernel, unpacks each weight row once per call into small integers `q[k]` and
//! per-16-weight affine scales (`w = a * q - b`, see [`crate::formats::quant::Unpacked`]),
//! then dots it against every activation row. Both use the same arithmetic:
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
//! Work is split over output rows on the [`super::pool`] threads; the portable inner loops are
//! written so the compiler vectorizes them, and are compiled twice on x86-64 (baseline and
//! AVX2+FMA), chosen at run time.

use super::pool;
#[cfg(target_arch = "x86_64")]
use super::simd;
use crate::formats::quant::{unpack_block, Unpacked, GROUP};
use crate::formats::GgmlType;
use half::f16;
use std::sync::Mutex;

/// Output pointer shared by the threads of one matmul; each writes its own rows' columns.
#[derive(Clone, Copy)]
pub struct Out(pub *mut f32);
// SAFETY: callers give each thread a disjoint set of weight rows (output columns).
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

impl Out {
    /// The pointer `i` floats in.
    ///
    /// # Safety
    /// `i` is inside the buffer.
    pub unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

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
    /// rows repacked eight at a time for the AVX-512 VNNI kernels (see [`super::x8`])
    #[cfg(target_arch = "x86_64")]
    X8 { ty: GgmlType, data: Vec<u8> },
}

/// Activations quantized per block the way ggml's `vec_dot_type` of the weight wants them.
pub struct Acts {
    /// row length
    pub k: usize,
    /// rows (tokens)
    pub n: usize,
    /// 32 (Q8_0/Q8_1) or 256 (Q8_K)
    pub block: usize,
    /// `[n, k]`
    pub q: Vec<i8>,
    /// `[n, k / block]` scale of each block
    pub d: Vec<f32>,
    /// `[n, k / block]` Q8_1's `d * sum(q)`, rounded to f16 as ggml stores it (32-blocks only)
    pub s: Vec<f32>,
    /// `[n, k / 16]` `sum(q)` of each 16-value group
    pub sums: Vec<i32>,
    /// `q` holds `q + 128` as unsigned bytes (for the x8 kernels)
    pub offset: bool,
}

/// ggml's `nearest_int`: round to nearest, ties to even.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// Quantizes token rows `t0..t1` of `x` into `acts` (already sized).
#[inline(always)]
fn quantize_rows(x: &[f32], acts: &mut ActsRows<'_>, t0: usize, t1: usize) {
    let (k, block) = (acts.k, acts.block);
    let (nblk, ngrp) = (k / block, k / GROUP);
    for t in t0..t1 {
        let xr = &x[t * k..(t + 1) * k];
        let lt = t - t0;
        for (bi, xb) in xr.chunks_exact(block).enumerate() {
            let qb = &mut acts.q[lt * k + bi * block..lt * k + (bi + 1) * block];
            let d = if block == 256 {
                // Q8_K: scale from the signed value of largest magnitude (the first of them,
                // as ggml's strict `>` scan picks); the magnitude first, in vector form
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let max = xb.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
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
                d
            };
            let mut total = 0;
            for (g, qg) in qb.chunks_exact(GROUP).enumerate() {
                let s: i32 = qg.iter().map(|&v| v as i32).sum();
                acts.sums[lt * ngrp + bi * block / GROUP + g] = s;
                total += s;
            }
            if acts.offset {
                qb.iter_mut().for_each(|q| *q ^= i8::MIN);
            }
            if block == 256 {
                acts.d[lt * nblk + bi] = d;
            } else {
                acts.d[lt * nblk + bi] = f16::from_f32(d).to_f32();
                acts.s[lt * nblk + bi] = f16::from_f32(d * total as f32).to_f32();
            }
        }
    }
}

/// Mutable views of the rows of [`Acts`] one thread fills.
struct ActsRows<'a> {
    k: usize,
    block: usize,
    offset: bool,
    q: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sums: &'a mut [i32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_rows_avx2(x: &[f32], acts: &mut ActsRows<'_>, t0: usize, t1: usize) {
    quantize_rows(x, acts, t0, t1)
}

impl Acts {
    /// Quantizes `x [n, k]` in blocks of `block`, splitting the tokens over the pool.
    pub fn quantize(x: &[f32], k: usize, block: usize) -> Acts {
        Self::quantize_with(x, k, block, false)
    }

    /// Q8_0 blocks stored as `q + 128` (unsigned), the form the x8 kernels read.
    pub fn quantize_offset(x: &[f32], k: usize) -> Acts {
        Self::quantize_with(x, k, 32, true)
    }

    fn quantize_with(x: &[f32], k: usize, block: usize, offset: bool) -> Acts {
        let n = x.len() / k;
        let (nblk, ngrp) = (k / block, k / GROUP);
        let mut a = Acts {
            k,
            n,
            block,
            q: vec![0; n * k],
            d: vec![0.0; n * nblk],
            s: vec![0.0; n * nblk],
            sums: vec![0; n * ngrp],
            offset,
        };
        let avx2 = has_avx2();
        let one = |t0: usize, t1: usize, rows: &mut ActsRows<'_>| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked)
                return unsafe { quantize_rows_avx2(x, rows, t0, t1) };
            }
            let _ = avx2;
            quantize_rows(x, rows, t0, t1)
        };
        let pool = pool::global();
        let parts = if n >= 8 { pool.threads() } else { 1 };
        // split every buffer at the same token boundaries
        let mut views = Vec::with_capacity(parts);
        let (mut q, mut d, mut s, mut sums) =
            (&mut a.q[..], &mut a.d[..], &mut a.s[..], &mut a.sums[..]);
        let mut t = 0;
        for i in 0..parts {
            let t1 = n * (i + 1) / parts;
            let c = t1 - t;
            let (q0, q1) = q.split_at_mut(c * k);
            let (d0, d1) = d.split_at_mut(c * nblk);
            let (s0, s1) = s.split_at_mut(c * nblk);
            let (g0, g1) = sums.split_at_mut(c * ngrp);
            views.push(Mutex::new((
                t,
                t1,
                ActsRows {
                    k,
                    block,
                    offset,
                    q: q0,
                    d: d0,
                    s: s0,
                    sums: g0,
                },
            )));
            (q, d, s, sums) = (q1, d1, s1, g1);
            t = t1;
        }
        if parts == 1 {
            let (t0, t1, rows) = &mut *views[0].lock().unwrap();
            one(*t0, *t1, rows);
        } else {
            pool.run(&|i, _| {
                let (t0, t1, rows) = &mut *views[i].lock().unwrap();
                one(*t0, *t1, rows);
            });
        }
        drop(views);
        a
    }
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

/// `sum_g a_g d_g sum(q y) - sum_g b_g dsum_g` over whole 16-weight groups of token `t`.
#[inline(always)]
fn dot_q(row: &RowBuf, acts: &Acts, t: usize, has_b: bool) -> f32 {
    let k = acts.k;
    let y = &acts.q[t * k..(t + 1) * k];
    let gpb = acts.block / GROUP;
    let nblk = k / acts.block;
    let d = &acts.d[t * nblk..(t + 1) * nblk];
    let mut acc = [0f32; 16];
    for (g, (qg, yg)) in row
        .q
        .chunks_exact(GROUP)
        .zip(y.chunks_exact(GROUP))
        .enumerate()
    {
        let s = row.a[g] * d[g / gpb];
        for l in 0..16 {
            acc[l] += (qg[l] as i32 * yg[l] as i32) as f32 * s;
        }
    }
    let mut total: f32 = acc.iter().sum();
    if has_b {
        // `d * sum(y)` per group: Q8_K's exact sums; Q8_1's f16 block sum, which ggml applies
        // to the block's one offset (the first group's)
        let ngrp = k / GROUP;
        let sums = &acts.sums[t * ngrp..(t + 1) * ngrp];
        let mut off = 0f32;
        for g in 0..ngrp {
            let dsum = if acts.block == 256 {
                d[g / gpb] * sums[g] as f32
            } else if g % 2 == 0 {
                acts.s[t * nblk + g / 2]
            } else {
                0.0
            };
            off += row.b[g] * dsum;
        }
        total -= off;
    }
    total
}

#[inline(always)]
fn rows_blocks(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    acts: Option<&Acts>,
    k: usize,
    m: usize,
    out: Out,
) {
    let n = x.len() / k;
    let mut row = RowBuf::new(k);
    let exact = acts.is_none();
    let has_b = !matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q3K | GgmlType::Q6K
    );
    for r in r0..r1 {
        row.unpack(ty, &data[r * row_bytes..(r + 1) * row_bytes], exact);
        for t in 0..n {
            let v = match acts {
                None => dot_f32(&row.w, &x[t * k..(t + 1) * k]),
                Some(a) => dot_q(&row, a, t, has_b),
            };
            // SAFETY: t < n, r < m; column r belongs to this task only.
            unsafe { *out.0.add(t * m + r) = v };
        }
    }
}

#[inline(always)]
fn rows_dense(w: &[f32], r0: usize, r1: usize, x: &[f32], k: usize, m: usize, out: Out) {
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_blocks_avx2(
    ty: GgmlType,
    data: &[u8],
    row_bytes: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    acts: Option<&Acts>,
    k: usize,
    m: usize,
    out: Out,
) {
    rows_blocks(ty, data, row_bytes, r0, r1, x, acts, k, m, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_dense_avx2(
    w: &[f32],
    r0: usize,
    r1: usize,
    x: &[f32],
    k: usize,
    m: usize,
    out: Out,
) {
    rows_dense(w, r0, r1, x, k, m, out)
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernels a matmul runs; [`Kernels::detect`] picks the best this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// hand-written SIMD kernels for the types that have them
    #[cfg(target_arch = "x86_64")]
    Simd(simd::Isa),
    /// the portable loops (compiled for AVX2 too where present)
    Portable,
}

impl Kernels {
    pub fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = simd::Isa::detect() {
            return Kernels::Simd(isa);
        }
        Kernels::Portable
    }
}

/// Rows per unit of work: threads take contiguous stripes of whole units.
const ROW_UNIT: usize = 16;

impl Matrix {
    /// `x [n, k]` times this `[m, k]` matrix transposed → `[n, m]`.
    pub fn matmul(&self, x: &[f32], k: usize, m: usize, mode: MatmulMode) -> Vec<f32> {
        self.matmul_with(x, k, m, mode, Kernels::detect())
    }

    /// Whether this matrix holds `m` rows of `k` weights in its layout: what every kernel
    /// below reads through raw pointers relies on it.
    pub fn fits(&self, k: usize, m: usize) -> bool {
        if k == 0 {
            return false;
        }
        match self {
            Matrix::Dense(w) => m.checked_mul(k).is_some_and(|n| w.len() >= n),
            Matrix::Blocks {
                ty,
                data,
                row_bytes,
            } => match (ty.block_size(), ty.type_size()) {
                (Some(bs), Some(ts)) => {
                    k % bs == 0
                        && *row_bytes == k / bs * ts
                        && m.checked_mul(*row_bytes).is_some_and(|n| data.len() >= n)
                }
                _ => false,
            },
            #[cfg(target_arch = "x86_64")]
            Matrix::X8 { ty, data } => {
                let (Some(bb), Some(bs)) = (super::x8::block_bytes(*ty), ty.block_size()) else {
                    return false;
                };
                let per_row = if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
                    256
                } else {
                    bs
                };
                m % 8 == 0
                    && k % per_row == 0
                    && (m / 8)
                        .checked_mul(k / per_row)
                        .and_then(|g| g.checked_mul(bb))
                        .is_some_and(|n| data.len() >= n)
            }
        }
    }

    /// [`Matrix::matmul`] with a chosen kernel set (benchmarks and tests compare them).
    ///
    /// Panics (never reads out of bounds or executes an instruction the CPU lacks) when the
    /// matrix does not hold `m` rows of `k` ([`Matrix::fits`]), `x` is not whole rows of `k`,
    /// or `kernels` names SIMD kernels this CPU cannot run.
    pub fn matmul_with(
        &self,
        x: &[f32],
        k: usize,
        m: usize,
        mode: MatmulMode,
        kernels: Kernels,
    ) -> Vec<f32> {
        assert!(
            self.fits(k, m),
            "matmul: the matrix does not hold {m} rows of {k}"
        );
        assert!(
            x.len() % k == 0,
            "matmul: {} activations are not rows of {k}",
            x.len()
        );
        #[cfg(target_arch = "x86_64")]
        if let Kernels::Simd(isa) = kernels {
            assert!(
                isa.available(),
                "matmul: this CPU cannot run {isa:?} kernels"
            );
        }
        let n = x.len() / k;
        let mut out = vec![0f32; n * m];
        let ptr = Out(out.as_mut_ptr());
        let avx2 = has_avx2();
        let units = m.div_ceil(ROW_UNIT);
        let pool = pool::global();
        match self {
            #[cfg(target_arch = "x86_64")]
            Matrix::X8 { ty, data } => {
                if let (Kernels::Simd(simd::Isa::Vnni), MatmulMode::Quantized) = (kernels, mode) {
                    let acts = match ty {
                        GgmlType::Q4K | GgmlType::Q6K => Acts::quantize(x, k, 256),
                        GgmlType::Q4_1 => Acts::quantize(x, k, 32),
                        _ => Acts::quantize_offset(x, k),
                    };
                    let groups = m / 8;
                    pool.for_ranges(groups.div_ceil(2), |u| {
                        let (g0, g1) = (u.start * 2, (u.end * 2).min(groups));
                        // SAFETY: the CPU has AVX-512 VNNI (checked above), the matrix holds m / 8
                        // groups of k (`fits`), `out` n * m floats.
                        unsafe { super::x8::matmul_groups(*ty, data, g0, g1, &acts, m, ptr) }
                    });
                } else {
                    // other kernels on a repacked matrix: row by row in f32
                    pool.for_ranges(m, |rows| {
                        let mut w = vec![0f32; k];
                        for r in rows {
                            super::x8::row_f32(*ty, data, k, r, &mut w);
                            for t in 0..n {
                                // SAFETY: column r belongs to this range only
                                unsafe { *ptr.at(t * m + r) = dot_f32(&w, &x[t * k..(t + 1) * k]) };
                            }
                        }
                    });
                }
            }
            Matrix::Dense(w) => pool.for_ranges(units, |u| {
                let (r0, r1) = (u.start * ROW_UNIT, (u.end * ROW_UNIT).min(m));
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked above)
                    return unsafe { rows_dense_avx2(w, r0, r1, x, k, m, ptr) };
                }
                rows_dense(w, r0, r1, x, k, m, ptr)
            }),
            Matrix::Blocks {
                ty,
                data,
                row_bytes,
            } => {
                let acts = match mode {
                    MatmulMode::Exact => None,
                    MatmulMode::Quantized => {
                        let block = if ty.block_size() == Some(256) {
                            256
                        } else {
                            32
                        };
                        Some(Acts::quantize(x, k, block))
                    }
                };
                let acts = acts.as_ref();
                pool.for_ranges(units, |u| {
                    let (r0, r1) = (u.start * ROW_UNIT, (u.end * ROW_UNIT).min(m));
                    #[cfg(target_arch = "x86_64")]
                    {
                        if let (Kernels::Simd(isa), Some(a)) = (kernels, acts) {
                            // SAFETY: `out` holds n * m floats, `data` m rows (`fits`), and
                            // this CPU runs `isa` (checked above).
                            if unsafe {
                                simd::matmul_rows(isa, *ty, data, *row_bytes, r0, r1, a, m, ptr)
                            } {
                                return;
                            }
                        }
                        if avx2 {
                            // SAFETY: the CPU has AVX2, FMA and F16C (checked above)
                            return unsafe {
                                rows_blocks_avx2(*ty, data, *row_bytes, r0, r1, x, acts, k, m, ptr)
                            };
                        }
                    }
                    let _ = kernels;
                    rows_blocks(*ty, data, *row_bytes, r0, r1, x, acts, k, m, ptr)
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
            #[cfg(target_arch = "x86_64")]
            Matrix::X8 { ty, data } => super::x8::row_f32(*ty, data, k, r, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix that does not hold the rows asked for, or activations that are not whole
    /// rows, panic before any kernel reads; so do SIMD kernels the CPU lacks.
    #[test]
    fn shapes_and_kernels_are_checked_before_any_kernel_runs() {
        let ty = GgmlType::Q8_0;
        let rb = ty.type_size().unwrap(); // one block of 32 per row
        let blocks = Matrix::Blocks {
            ty,
            data: vec![0u8; 4 * rb],
            row_bytes: rb,
        };
        assert!(blocks.fits(32, 4) && !blocks.fits(32, 5) && !blocks.fits(64, 2));
        assert!(!blocks.fits(0, 4));
        let lying = Matrix::Blocks {
            ty,
            data: vec![0u8; 4 * rb],
            row_bytes: 1,
        };
        assert!(!lying.fits(32, 4));
        let x = vec![1f32; 64];
        let panics = |f: &dyn Fn() -> Vec<f32>| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
        };
        for kernels in [Kernels::detect(), Kernels::Portable] {
            for mode in [MatmulMode::Exact, MatmulMode::Quantized] {
                assert!(!panics(&|| blocks.matmul_with(&x, 32, 4, mode, kernels)));
                assert!(panics(&|| blocks.matmul_with(
                    &x,
                    32,
                    1 << 20,
                    mode,
                    kernels
                )));
                assert!(panics(&|| lying.matmul_with(&x, 32, 4, mode, kernels)));
                assert!(panics(&|| blocks.matmul_with(
                    &x[..40],
                    32,
                    4,
                    mode,
                    kernels
                )));
                let dense = Matrix::Dense(vec![0f32; 32 * 3]);
                assert!(!panics(&|| dense.matmul_with(&x, 32, 3, mode, kernels)));
                assert!(panics(&|| dense.matmul_with(&x, 32, 4, mode, kernels)));
            }
        }
        #[cfg(target_arch = "x86_64")]
        for isa in [simd::Isa::Avx2, simd::Isa::Vnni] {
            let r = std::panic::catch_unwind(|| {
                blocks.matmul_with(&x, 32, 4, MatmulMode::Quantized, Kernels::Simd(isa))
            });
            assert_eq!(r.is_ok(), isa.available(), "{isa:?}");
        }
    }

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
