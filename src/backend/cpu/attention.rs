//! Paged KV cache and causal attention on the CPU.
//!
//! The cache holds, per layer, K and V pools of `[num_blocks, block_size, n_kv_heads,
//! head_dim]` in f16 (as llama.cpp's default cache type). Each query head reads the K/V head it
//! shares with its group (`kv_head = head / (n_heads / n_kv_heads)`), its sequence's positions
//! `0..=p` (or the last `window` of them) through the block table, and takes an exact two-pass
//! softmax in f32, accumulating V in f32. Like ggml's flash attention on the CPU, the query is
//! rounded to f16 for the `q . k` products. (ggml accumulates V in f16 for batches under 64
//! queries and in f32 above; we always use f32, so a token's result never depends on how many
//! others share its batch.)

use super::matmul::{has_avx2, Out};
use super::pool;
use super::CpuTensor;
use crate::backend::{AttnParams, BatchLayout, KvShape};
use anyhow::{bail, Result};
use half::f16;

pub struct CpuKvCache {
    pub shape: KvShape,
    /// `[n_layers]` of `[num_blocks, block_size, n_kv_heads, head_dim]`
    k: Vec<Vec<f16>>,
    /// `[n_layers]` of `[num_blocks, block_size, n_kv_heads, head_dim]`
    v: Vec<Vec<f16>>,
}

impl CpuKvCache {
    pub fn new(shape: KvShape) -> Result<Self> {
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.block_size)
            .and_then(|x| x.checked_mul(shape.n_kv_heads))
            .and_then(|x| x.checked_mul(shape.head_dim))
            .ok_or_else(|| anyhow::anyhow!("KV cache shape {shape:?} overflows"))?;
        Ok(CpuKvCache {
            shape,
            k: (0..shape.n_layers).map(|_| zeroed(per_layer)).collect(),
            v: (0..shape.n_layers).map(|_| zeroed(per_layer)).collect(),
        })
    }

    fn row_len(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    pub fn write(
        &mut self,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        layout: &BatchLayout,
    ) -> Result<()> {
        let w = self.row_len();
        if k.cols != w || v.cols != w || k.rows != layout.slots.len() || v.rows != k.rows {
            bail!(
                "write_kv: K {}x{} / V {}x{} for {} slots of width {w}",
                k.rows,
                k.cols,
                v.rows,
                v.cols,
                layout.slots.len()
            );
        }
        let capacity = self.shape.num_blocks * self.shape.block_size;
        for (t, &slot) in layout.slots.iter().enumerate() {
            let slot = slot as usize;
            if slot >= capacity {
                bail!("write_kv: slot {slot} beyond the cache's {capacity}");
            }
            let dst = slot * w;
            for (d, s) in self.k[layer][dst..dst + w]
                .iter_mut()
                .zip(&k.data[t * w..(t + 1) * w])
            {
                *d = f16::from_f32(*s);
            }
            for (d, s) in self.v[layer][dst..dst + w]
                .iter_mut()
                .zip(&v.data[t * w..(t + 1) * w])
            {
                *d = f16::from_f32(*s);
            }
        }
        Ok(())
    }

    pub fn attention(
        &self,
        layer: usize,
        q: &CpuTensor,
        layout: &BatchLayout,
        p: &AttnParams,
    ) -> Result<CpuTensor> {
        let hd = p.head_dim;
        let n = layout.positions.len();
        let seq_of = crate::backend::check_attention(layout, p, &self.shape, q.rows, q.cols)?;
        let bs = self.shape.block_size;
        let group = p.n_heads / p.n_kv_heads;
        if group > 64 {
            bail!("attention: {group} query heads per KV head (at most 64)");
        }
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        let w = self.row_len();
        let mut out = vec![0f32; n * p.n_heads * hd];
        let optr = Out(out.as_mut_ptr());
        let simd = has_avx2();
        let nkv = p.n_kv_heads;
        let items = n * nkv;
        // one item is a token's group of query heads sharing a K/V head: each K and V row is
        // widened from f16 once for the whole group. Items are interleaved over the threads
        // (causal rows grow with position).
        pool::global().run(&|thread, threads| {
            let mut qg = vec![0f32; group * hd];
            let mut scores = Vec::<f32>::new();
            let mut row = Vec::<f32>::new();
            for i in (thread..items).step_by(threads) {
                let (t, kvh) = (i / nkv, i % nkv);
                let qrow = &q.data[t * q.cols + kvh * group * hd..][..group * hd];
                for (d, s) in qg.iter_mut().zip(qrow) {
                    *d = f16::from_f32(*s).to_f32();
                }
                let pos = layout.positions[t] as usize;
                let lo = p.window.map_or(0, |win| (pos + 1).saturating_sub(win));
                let table = layout.block_tables[seq_of[t]];
                let at = |j: usize| (table[j / bs] as usize * bs + j % bs) * w + kvh * hd;
                // SAFETY: item i owns the group's heads of token t in `out`
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        optr.at(t * q.cols + kvh * group * hd),
                        group * hd,
                    )
                };
                let g = Group {
                    q: &qg,
                    hd,
                    lo,
                    pos,
                    scale: p.scale,
                };
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked)
                    unsafe { attend_avx2(&g, kc, vc, &at, &mut scores, &mut row, o) };
                    continue;
                }
                attend::<false>(&g, kc, vc, &at, &mut scores, &mut row, o);
            }
        });
        Ok(CpuTensor {
            data: out,
            rows: n,
            cols: p.n_heads * hd,
        })
    }
}

/// `n` zero f16 values from zeroed memory (calloc), so pages cost nothing until written: the
/// cache is sized for the most tokens it may hold, not the tokens it holds.
/// `n` zeros, committed: every page is written now, so the cache's memory is resident from
/// load (as llama.cpp clears its KV buffer) rather than faulted in block by block under load,
/// where an overcommitted machine would OOM-kill a serving process instead of failing at start.
fn zeroed(n: usize) -> Vec<f16> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    const PAGE: usize = 4096 / std::mem::size_of::<u16>();
    for i in (0..v.len()).step_by(PAGE) {
        // SAFETY: i < len; a volatile write is not elided as a store of what calloc gave
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0) };
    }
    // SAFETY: f16 is a transparent u16 (same size and alignment), all bits valid; the
    // allocation moves over whole with its length and capacity.
    unsafe { Vec::from_raw_parts(v.as_ptr() as *mut f16, v.len(), v.capacity()) }
}

/// The query heads of one token that share a K/V head, and the positions they see.
struct Group<'a> {
    /// `[heads, hd]`, rounded to f16
    q: &'a [f32],
    hd: usize,
    lo: usize,
    pos: usize,
    scale: f32,
}

/// Exact two-pass softmax attention of a group over positions `lo..=pos`, V accumulated in
/// f32; `at(j)` is the offset of position `j`'s K/V row in the caches. `F16C` is set only in
/// the AVX2 + FMA + F16C build: hardware f16 widening and fused multiply-adds.
#[inline(always)]
fn attend<const F16C: bool>(
    g: &Group,
    kc: &[f16],
    vc: &[f16],
    at: &dyn Fn(usize) -> usize,
    scores: &mut Vec<f32>,
    row: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, heads) = (g.hd, g.q.len() / g.hd);
    let npos = g.pos + 1 - g.lo;
    scores.clear();
    scores.resize(heads * npos, 0.0);
    row.resize(hd.max(row.len()), 0.0);
    for j in 0..npos {
        widen::<F16C>(&kc[at(g.lo + j)..][..hd], &mut row[..hd]);
        for h in 0..heads {
            scores[h * npos + j] = dot::<F16C>(&g.q[h * hd..(h + 1) * hd], &row[..hd]) * g.scale;
        }
    }
    let mut inv = [0f32; 64];
    for (h, sc) in scores.chunks_exact_mut(npos).enumerate() {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        sc.iter_mut().for_each(|s| *s = super::math::exp(*s - max));
        inv[h % 64] = 1.0 / sc.iter().sum::<f32>();
    }
    // V rows widened once into `row` ([npos, hd]), then each head's output accumulated in
    // registers, 64 dimensions at a time, over all positions
    row.clear();
    row.resize(npos * hd, 0.0);
    for j in 0..npos {
        widen::<F16C>(&vc[at(g.lo + j)..][..hd], &mut row[j * hd..(j + 1) * hd]);
    }
    for h in 0..heads {
        let p = &scores[h * npos..(h + 1) * npos];
        let o = &mut out[h * hd..(h + 1) * hd];
        let mut c = 0;
        #[cfg(target_arch = "x86_64")]
        if F16C {
            while c + 64 <= hd {
                // SAFETY: only instantiated with true inside functions that enable AVX2 and
                // FMA; rows j * hd + c + 64 <= npos * hd = row.len(), c + 64 <= o.len()
                unsafe { pv64_fma(p, row, hd, c, inv[h % 64], &mut o[c..c + 64]) };
                c += 64;
            }
        }
        while c + 64 <= hd {
            let mut acc = [0f32; 64];
            for (j, &pj) in p.iter().enumerate() {
                let v = &row[j * hd + c..j * hd + c + 64];
                for l in 0..64 {
                    acc[l] = madd::<F16C>(pj, v[l], acc[l]);
                }
            }
            for l in 0..64 {
                o[c + l] = acc[l] * inv[h % 64];
            }
            c += 64;
        }
        for d in c..hd {
            let mut acc = 0f32;
            for (j, &pj) in p.iter().enumerate() {
                acc += pj * row[j * hd + d];
            }
            o[d] = acc * inv[h % 64];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(
    g: &Group,
    kc: &[f16],
    vc: &[f16],
    at: &dyn Fn(usize) -> usize,
    scores: &mut Vec<f32>,
    row: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend::<true>(g, kc, vc, at, scores, row, out)
}

/// `a * b + c`: one fused instruction in the FMA build (`FMA`), plain otherwise (where
/// `mul_add` would be a library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `out = scale * sum_j p[j] * rows[j * hd + c..][..64]`, the 64 sums in 8 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pv64_fma(p: &[f32], rows: &[f32], hd: usize, c: usize, scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(out.len() >= 64 && c + 64 <= hd && p.len() * hd <= rows.len());
    let mut acc = [_mm256_setzero_ps(); 8];
    for (j, &pj) in p.iter().enumerate() {
        let w = _mm256_set1_ps(pj);
        let r = rows.as_ptr().add(j * hd + c);
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(8 * i)), *a);
        }
    }
    let sv = _mm256_set1_ps(scale);
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_mul_ps(*a, sv));
    }
}

/// `sum(a * b)`.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: only instantiated with true inside functions that enable AVX2 and FMA
        return unsafe { dot_fma(a, b) };
    }
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let n = a.len() / 8 * 8;
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum(a * b)` on four independent FMA chains (one chain would wait on its own latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (c, v) in acc.iter_mut().enumerate() {
            let o = i + 8 * c;
            *v = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *v);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let mut total = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

/// f16 → f32 over a row (with F16C when `F16C`, which only AVX2 builds set).
#[inline(always)]
fn widen<const F16C: bool>(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if F16C {
        // SAFETY: only instantiated with true inside functions that enable F16C
        return unsafe { widen_f16c(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len());
    let n8 = n / 8 * 8;
    for i in (0..n8).step_by(8) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i) as *const __m128i));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
    }
    for i in n8..n {
        dst[i] = src[i].to_f32();
    }
}
