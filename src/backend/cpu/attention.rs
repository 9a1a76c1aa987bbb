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
        if q.rows != n || q.cols != p.n_heads * hd || hd != self.shape.head_dim {
            bail!(
                "attention: q {}x{} for {n} tokens of {} heads x {hd}",
                q.rows,
                q.cols,
                p.n_heads
            );
        }
        if p.n_kv_heads != self.shape.n_kv_heads || p.n_heads % p.n_kv_heads != 0 {
            bail!(
                "attention: {} query heads over {} KV heads",
                p.n_heads,
                p.n_kv_heads
            );
        }
        let num_seqs = layout.seq_starts.len().saturating_sub(1);
        if layout.block_tables.len() != num_seqs || layout.seq_starts.last() != Some(&n) {
            bail!("attention: batch layout does not cover {n} tokens");
        }
        // sequence of each token
        let mut seq_of = vec![0usize; n];
        for s in 0..num_seqs {
            for x in &mut seq_of[layout.seq_starts[s]..layout.seq_starts[s + 1]] {
                *x = s;
            }
        }
        let bs = self.shape.block_size;
        for (t, &pos) in layout.positions.iter().enumerate() {
            let need = pos as usize / bs + 1;
            if layout.block_tables[seq_of[t]].len() < need {
                bail!("attention: position {pos} needs {need} blocks, table has fewer");
            }
            if layout.block_tables[seq_of[t]][..need]
                .iter()
                .any(|&b| b as usize >= self.shape.num_blocks)
            {
                bail!(
                    "attention: block id beyond the cache's {}",
                    self.shape.num_blocks
                );
            }
        }
        let group = p.n_heads / p.n_kv_heads;
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        let w = self.row_len();
        let mut out = vec![0f32; n * p.n_heads * hd];
        let optr = Out(out.as_mut_ptr());
        let simd = has_avx2();
        let items = n * p.n_heads;
        // items interleaved over the threads: causal rows grow with position
        pool::global().run(&|thread, threads| {
            let (mut qh, mut scores) = (vec![0f32; hd], Vec::<f32>::new());
            for i in (thread..items).step_by(threads) {
                let (t, h) = (i / p.n_heads, i % p.n_heads);
                let kvh = h / group;
                for (d, s) in qh.iter_mut().zip(&q.data[t * q.cols + h * hd..][..hd]) {
                    *d = f16::from_f32(*s).to_f32();
                }
                let pos = layout.positions[t] as usize;
                let lo = p.window.map_or(0, |win| (pos + 1).saturating_sub(win));
                let table = layout.block_tables[seq_of[t]];
                let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
                // SAFETY: item i owns out[i * hd..(i + 1) * hd]
                let o = unsafe { std::slice::from_raw_parts_mut(optr.at(i * hd), hd) };
                // exact two-pass softmax over the visible positions, V accumulated in f32
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in lo..=pos {
                    let kr = &kc[slot(j) * w + kvh * hd..][..hd];
                    let s = dot_f16(&qh, kr, simd) * p.scale;
                    max = max.max(s);
                    scores.push(s);
                }
                scores.iter_mut().for_each(|s| *s -= max);
                super::math::exp_in_place(&mut scores, simd);
                let sum: f32 = scores.iter().sum();
                o.fill(0.0);
                for (jj, s) in scores.iter().enumerate() {
                    let vr = &vc[slot(lo + jj) * w + kvh * hd..][..hd];
                    axpy_f16(o, s / sum, vr, simd);
                }
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
fn zeroed(n: usize) -> Vec<f16> {
    let v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: f16 is a transparent u16 (same size and alignment), all bits valid; the
    // allocation moves over whole with its length and capacity.
    unsafe { Vec::from_raw_parts(v.as_ptr() as *mut f16, v.len(), v.capacity()) }
}

/// `sum(q * k)` with `k` in f16.
#[inline]
fn dot_f16(q: &[f32], k: &[f16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd && q.len() % 8 == 0 {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked by the caller)
        return unsafe { dot_f16_avx2(q, k) };
    }
    let _ = simd;
    let mut acc = 0f32;
    for (a, b) in q.iter().zip(k) {
        acc += a * b.to_f32();
    }
    acc
}

/// `o += p * v` with `v` in f16.
#[inline]
fn axpy_f16(o: &mut [f32], p: f32, v: &[f16], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && o.len() % 8 == 0 {
        // SAFETY: as above
        return unsafe { axpy_f16_avx2(o, p, v) };
    }
    let _ = simd;
    for (a, b) in o.iter_mut().zip(v) {
        *a += p * b.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(q: &[f32], k: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(k.len() >= q.len());
    let mut acc = _mm256_setzero_ps();
    for i in (0..q.len()).step_by(8) {
        let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_avx2(o: &mut [f32], p: f32, v: &[f16]) {
    use std::arch::x86_64::*;
    assert!(v.len() >= o.len());
    let pv = _mm256_set1_ps(p);
    for i in (0..o.len()).step_by(8) {
        let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
        let op = o.as_mut_ptr().add(i);
        _mm256_storeu_ps(op, _mm256_fmadd_ps(pv, vv, _mm256_loadu_ps(op)));
    }
}
