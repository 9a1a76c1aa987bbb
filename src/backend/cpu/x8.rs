//! Weights repacked eight rows at a time ("x8"), for the AVX-512 VNNI kernels.
//!
//! For each group of 8 rows and each 32-weight block, the repacked block holds the 8 rows'
//! f16 scales, the 8 sums of their integer weights (i16), and the weights interleaved in
//! 4-weight chunks: chunk `c` of all 8 rows is 32 consecutive bytes, `[row0 w4c..w4c+3, row1
//! ..., row7 ...]`, so one `vpdpbusd` against the 4 activation bytes `y[4c..4c+4]` broadcast
//! to every lane advances 8 rows at once. After a block's 8 chunks the 8 lanes hold the 8
//! rows' integer dot products: one conversion and one multiply-add per 8 rows, where the
//! row-at-a-time kernels pay them per row.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so activations are stored offset by 128
//! ([`Acts::quantize_offset`]); `sum((y + 128) w) - 128 sum(w)` is exact, and the `128 sum(w)`
//! term comes from the stored sums as the accumulator's starting value.
//!
//! Payloads per block of 8 rows: Q8_0 256 bytes of i8; Q4_0 and Q5_0 128 bytes of nibbles
//! (chunk `2j` in the low nibbles of the 32 bytes `j`, chunk `2j + 1` in the high ones), and
//! for Q5_0 32 more bytes whose bit `c` is the fifth bit of chunk `c`'s byte. Q4_1, Q4_K and
//! Q6_K keep their weights unsigned (no offset needed: `vpdpbusd` takes them as the unsigned
//! operand against plain Q8_1/Q8_K activations): Q4_1 with its f16 mins where the others keep
//! weight sums, Q4_K and Q6_K with their scales unpacked per row ([`Q4K_BYTES`],
//! [`Q6K_BYTES`]). The
//! weights are the same numbers as in the file (repacking is lossless; [`row_f32`] reads them
//! back).

#![cfg(target_arch = "x86_64")]

use super::matmul::{Acts, Out};
use crate::formats::quant::{unpack_block, Unpacked};
use crate::formats::GgmlType;

/// Bytes of one repacked block of 8 rows: 16 scale bytes, 16 sum bytes, the payload; for
/// Q4_K a super-block of 8 rows (see [`Q4K_BYTES`]).
pub fn block_bytes(ty: GgmlType) -> Option<usize> {
    Some(match ty {
        GgmlType::Q8_0 => 32 + 256,
        GgmlType::Q4_0 => 32 + 128,
        GgmlType::Q5_0 => 32 + 160,
        GgmlType::Q4K => Q4K_BYTES,
        GgmlType::Q6K => Q6K_BYTES,
        GgmlType::Q4_1 => 32 + 128,
        _ => return None,
    })
}

/// A Q4_K super-block (256 weights) of 8 rows: `d[8]` and `dmin[8]` (f16), the 6-bit scales
/// as bytes (`[sub-block][row]`, 64), the mins as i16 pairs of sub-blocks `(2p, 2p + 1)` per
/// row (`[p][row][2]`, 128, for `vpdpwssd` against pairs of activation sums), then per
/// sub-block 4 × 32 bytes of nibbles in the chunk layout above (chunk `2i` low, `2i + 1`
/// high).
pub const Q4K_BYTES: usize = 32 + 64 + 128 + 1024;

/// A Q6_K super-block of 8 rows: `d[8]` (f16), the scales (`[sub-block][row]` i8, 128),
/// the scales again as i16 pairs of sub-blocks (`[p][row][2]`, 256, for the `- 32` zero point
/// through `vpdpwssd`), per sub-block of 16 two 32-byte vectors of low nibbles (chunk `2i`
/// low, `2i + 1` high; 1024), then per sub-block 32 bytes whose bits `2c, 2c + 1` are chunk
/// `c`'s top two bits (512).
pub const Q6K_BYTES: usize = 16 + 128 + 256 + 1024 + 512;

/// Weights per repacked block of `ty` (per row).
fn block_len(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
        256
    } else {
        32
    }
}

/// Repacks `rows` rows of `ty` blocks (`row_bytes` each); `None` when the type has no x8 form
/// or the rows are not whole groups of 8.
pub fn repack(ty: GgmlType, data: &[u8], rows: usize, row_bytes: usize) -> Option<Vec<u8>> {
    let bb = block_bytes(ty)?;
    let ts = ty.type_size()?;
    if rows % 8 != 0 || row_bytes % ts != 0 || data.len() != rows * row_bytes {
        return None;
    }
    let nb = row_bytes / ts;
    let mut out = vec![0u8; rows / 8 * nb * bb];
    let mut u = Unpacked::default();
    if ty == GgmlType::Q6K {
        for g in 0..rows / 8 {
            for b in 0..nb {
                let o = &mut out[(g * nb + b) * bb..][..bb];
                for lane in 0..8 {
                    let src = &data[(g * 8 + lane) * row_bytes + b * ts..][..ts];
                    unpack_block(ty, src, &mut u);
                    o[2 * lane..2 * lane + 2].copy_from_slice(&src[208..210]);
                    for j in 0..16 {
                        let sc = src[192 + j] as i8;
                        o[16 + 8 * j + lane] = sc as u8;
                        let at = 144 + 32 * (j / 2) + 4 * lane + 2 * (j % 2);
                        o[at..at + 2].copy_from_slice(&(sc as i16).to_le_bytes());
                    }
                    for i in 0..256 {
                        let v = (u.q[i] as i32 + 32) as u8;
                        let (j, w) = (i / 16, i % 16);
                        let (c, jj) = (w / 4, w % 4);
                        let at = 4 * lane + jj;
                        o[400 + 64 * j + 32 * (c / 2) + at] |= (v & 0x0F) << (4 * (c % 2));
                        o[1424 + 32 * j + at] |= (v >> 4) << (2 * c);
                    }
                }
            }
        }
        return Some(out);
    }
    if ty == GgmlType::Q4K {
        for g in 0..rows / 8 {
            for b in 0..nb {
                let o = &mut out[(g * nb + b) * bb..][..bb];
                for lane in 0..8 {
                    let src = &data[(g * 8 + lane) * row_bytes + b * ts..][..ts];
                    unpack_block(ty, src, &mut u);
                    let (sc, mn) = crate::formats::quant::scale_min_k4(&src[4..16]);
                    o[2 * lane..2 * lane + 2].copy_from_slice(&src[0..2]);
                    o[16 + 2 * lane..18 + 2 * lane].copy_from_slice(&src[2..4]);
                    for j in 0..8 {
                        o[32 + 8 * j + lane] = sc[j];
                        let at = 96 + 32 * (j / 2) + 4 * lane + 2 * (j % 2);
                        o[at..at + 2].copy_from_slice(&(mn[j] as i16).to_le_bytes());
                    }
                    for i in 0..256 {
                        let (j, w) = (i / 32, i % 32);
                        let (c, jj) = (w / 4, w % 4);
                        let at = 224 + 128 * j + 32 * (c / 2) + 4 * lane + jj;
                        o[at] |= ((u.q[i] as u8) & 0x0F) << (4 * (c % 2));
                    }
                }
            }
        }
        return Some(out);
    }
    for g in 0..rows / 8 {
        for b in 0..nb {
            let o = &mut out[(g * nb + b) * bb..][..bb];
            for lane in 0..8 {
                let src = &data[(g * 8 + lane) * row_bytes + b * ts..][..ts];
                unpack_block(ty, src, &mut u);
                o[2 * lane..2 * lane + 2].copy_from_slice(&src[0..2]);
                if ty == GgmlType::Q4_1 {
                    // the min (f16) where the others keep their weight sums
                    o[16 + 2 * lane..18 + 2 * lane].copy_from_slice(&src[2..4]);
                } else {
                    let sum: i32 = u.q[..32].iter().map(|&q| q as i32).sum();
                    o[16 + 2 * lane..18 + 2 * lane].copy_from_slice(&(sum as i16).to_le_bytes());
                }
                for i in 0..32 {
                    let (c, j) = (i / 4, i % 4);
                    let at = 4 * lane + j;
                    let q = u.q[i];
                    match ty {
                        GgmlType::Q8_0 => o[32 + 32 * c + at] = q as u8,
                        _ => {
                            let zero = match ty {
                                GgmlType::Q5_0 => 16,
                                GgmlType::Q4_0 => 8,
                                _ => 0,
                            };
                            let v = (q as i32 + zero) as u8;
                            o[32 + 32 * (c / 2) + at] |= (v & 0x0F) << (4 * (c % 2));
                            if ty == GgmlType::Q5_0 {
                                o[160 + at] |= ((v >> 4) & 1) << c;
                            }
                        }
                    }
                }
            }
        }
    }
    Some(out)
}

/// Row `r` dequantized (the embedding lookup of a tied output matrix).
pub fn row_f32(ty: GgmlType, data: &[u8], cols: usize, r: usize, out: &mut [f32]) {
    let bb = block_bytes(ty).expect("x8 type");
    let nb = cols / block_len(ty);
    let (g, lane) = (r / 8, r % 8);
    let f16 = |o: &[u8], at: usize| half::f16::from_le_bytes([o[at], o[at + 1]]).to_f32();
    if ty == GgmlType::Q6K {
        for b in 0..nb {
            let o = &data[(g * nb + b) * bb..][..bb];
            let d = f16(o, 2 * lane);
            for i in 0..256 {
                let (j, w) = (i / 16, i % 16);
                let (c, jj) = (w / 4, w % 4);
                let at = 4 * lane + jj;
                let lo = (o[400 + 64 * j + 32 * (c / 2) + at] >> (4 * (c % 2))) & 0x0F;
                let hi = (o[1424 + 32 * j + at] >> (2 * c)) & 3;
                let sc = o[16 + 8 * j + lane] as i8 as f32;
                out[b * 256 + i] = d * sc * ((lo | hi << 4) as i32 - 32) as f32;
            }
        }
        return;
    }
    if ty == GgmlType::Q4K {
        for b in 0..nb {
            let o = &data[(g * nb + b) * bb..][..bb];
            let (d, dmin) = (f16(o, 2 * lane), f16(o, 16 + 2 * lane));
            for i in 0..256 {
                let (j, w) = (i / 32, i % 32);
                let (c, jj) = (w / 4, w % 4);
                let q = (o[224 + 128 * j + 32 * (c / 2) + 4 * lane + jj] >> (4 * (c % 2))) & 0x0F;
                let sc = o[32 + 8 * j + lane] as f32;
                let at = 96 + 32 * (j / 2) + 4 * lane + 2 * (j % 2);
                let m = i16::from_le_bytes([o[at], o[at + 1]]) as f32;
                out[b * 256 + i] = d * sc * q as f32 - dmin * m;
            }
        }
        return;
    }
    for b in 0..nb {
        let o = &data[(g * nb + b) * bb..][..bb];
        let d = f16(o, 2 * lane);
        // Q4_1's min; the other types keep weight sums there
        let min = if ty == GgmlType::Q4_1 {
            f16(o, 16 + 2 * lane)
        } else {
            0.0
        };
        for i in 0..32 {
            let (c, j) = (i / 4, i % 4);
            let at = 4 * lane + j;
            let q = match ty {
                GgmlType::Q8_0 => o[32 + 32 * c + at] as i8 as i32,
                _ => {
                    let mut v = (o[32 + 32 * (c / 2) + at] >> (4 * (c % 2))) & 0x0F;
                    match ty {
                        GgmlType::Q5_0 => {
                            v |= ((o[160 + at] >> c) & 1) << 4;
                            v as i32 - 16
                        }
                        GgmlType::Q4_0 => v as i32 - 8,
                        _ => v as i32,
                    }
                }
            };
            out[b * 32 + i] = d * q as f32 + min;
        }
    }
}

/// `out[t, r] = x[t] . w[r]` for the row groups `g0..g1` of a repacked matrix.
///
/// # Safety
/// The CPU has AVX-512 VNNI, VL and BW; `out` holds `acts.n * m` floats; `data` holds at least
/// `g1` groups of blocks; `8 * g1 <= m`; `acts` was quantized as `drive` asserts (offset Q8_0
/// for Q8_0/Q4_0/Q5_0, Q8_1 for Q4_1, Q8_K for Q4_K).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
pub unsafe fn matmul_groups(
    ty: GgmlType,
    data: &[u8],
    g0: usize,
    g1: usize,
    acts: &Acts,
    m: usize,
    out: Out,
) {
    match ty {
        GgmlType::Q8_0 => drive::<0>(data, g0, g1, acts, m, out),
        GgmlType::Q4_0 => drive::<1>(data, g0, g1, acts, m, out),
        GgmlType::Q5_0 => drive::<2>(data, g0, g1, acts, m, out),
        GgmlType::Q4_1 => drive::<4>(data, g0, g1, acts, m, out),
        GgmlType::Q6K => drive::<5>(data, g0, g1, acts, m, out),
        _ => drive::<3>(data, g0, g1, acts, m, out),
    }
}

const NT: usize = 4;
const TB: usize = 64;
const GB: usize = 4;

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
unsafe fn drive<const KIND: u8>(
    data: &[u8],
    g0: usize,
    g1: usize,
    acts: &Acts,
    m: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let n = acts.n;
    let (nb, bb) = match KIND {
        3 => (acts.k / 256, Q4K_BYTES),
        5 => (acts.k / 256, Q6K_BYTES),
        _ => (acts.k / 32, 32 + [256, 128, 160, 0, 128][KIND as usize]),
    };
    // signed legacy types read offset Q8_0 activations, Q4_1 plain Q8_1, Q4_K plain Q8_K
    let want = match KIND {
        3 | 5 => (false, 256),
        4 => (false, 32),
        _ => (true, 32),
    };
    assert!((acts.offset, acts.block) == want && data.len() >= g1 * nb * bb && 8 * g1 <= m);
    let mut gb = g0;
    while gb < g1 {
        let ge = (gb + GB).min(g1);
        let mut tb = 0;
        while tb < n {
            let te = (tb + TB).min(n);
            for g in gb..ge {
                let gp = data.as_ptr().add(g * nb * bb);
                let mut t = tb;
                while t < te {
                    let c = if t + NT <= te { NT } else { 1 };
                    if c == NT {
                        let v = if KIND == 3 {
                            group_dots_q4k::<NT>(gp, nb, acts, t)
                        } else if KIND == 5 {
                            group_dots_q6k::<NT>(gp, nb, acts, t)
                        } else {
                            group_dots::<KIND, NT>(gp, nb, acts, t)
                        };
                        for (i, v) in v.iter().enumerate() {
                            _mm256_storeu_ps(out.at((t + i) * m + 8 * g), *v);
                        }
                    } else {
                        let [v] = if KIND == 3 {
                            group_dots_q4k::<1>(gp, nb, acts, t)
                        } else if KIND == 5 {
                            group_dots_q6k::<1>(gp, nb, acts, t)
                        } else {
                            group_dots::<KIND, 1>(gp, nb, acts, t)
                        };
                        _mm256_storeu_ps(out.at(t * m + 8 * g), v);
                    }
                    t += c;
                }
            }
            tb = te;
        }
        gb = ge;
    }
}

/// `start + sum over chunks c of w[c] . y[4c..4c + 4]` per lane (row): the activation's 4
/// bytes broadcast to every row. `UNSIGNED_W`: the weights are the unsigned operand (Q4_1,
/// K-quants, signed activations); else the activations are (stored `+ 128`, signed weights).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
#[inline]
unsafe fn chunk_dots<const UNSIGNED_W: bool>(
    start: std::arch::x86_64::__m256i,
    w: &[std::arch::x86_64::__m256i],
    y: *const u8,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let mut isum = start;
    for (c, wc) in w.iter().enumerate() {
        let y4 = _mm256_set1_epi32((y.add(4 * c) as *const i32).read_unaligned());
        isum = if UNSIGNED_W {
            _mm256_dpbusd_epi32(isum, *wc, y4)
        } else {
            _mm256_dpbusd_epi32(isum, y4, *wc)
        };
    }
    isum
}

/// Two activation sums as the i16 pair `vpdpwssd` multiplies against per-row scale pairs.
#[inline(always)]
fn i16_pair(s0: i32, s1: i32) -> i32 {
    ((s1 as i16 as u16 as u32) << 16 | s0 as i16 as u16 as u32) as i32
}

/// The 8 rows of one group dotted with `T` tokens from `t0`: one 8-lane vector per token.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
#[inline]
unsafe fn group_dots<const KIND: u8, const T: usize>(
    gp: *const u8,
    nb: usize,
    acts: &Acts,
    t0: usize,
) -> [std::arch::x86_64::__m256; T] {
    use std::arch::x86_64::*;
    let k = acts.k;
    let bb = 32 + [256, 128, 160, 0, 128][KIND as usize];
    let yq = acts.q.as_ptr().add(t0 * k) as *const u8;
    let yd = acts.d.as_ptr().add(t0 * nb);
    let ys = acts.s.as_ptr().add(t0 * nb);
    let mut acc = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let p = gp.add(b * bb);
        let scale = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        // Q4_1: bytes 16..32 are the rows' f16 mins; the others: their weight sums
        let (start, mins) = if KIND == 4 {
            let mins = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            (_mm256_setzero_si256(), mins)
        } else {
            let wsum = _mm256_cvtepi16_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
            let start = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(wsum, 7));
            (start, _mm256_setzero_ps())
        };
        let mut w = [_mm256_setzero_si256(); 8];
        for (c, wc) in w.iter_mut().enumerate() {
            *wc = match KIND {
                0 => _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i),
                _ => {
                    let q = _mm256_loadu_si256(p.add(32 + 32 * (c / 2)) as *const __m256i);
                    let nib = if c % 2 == 0 {
                        _mm256_and_si256(q, m4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(q, 4), m4)
                    };
                    if KIND == 4 {
                        nib
                    } else if KIND == 1 {
                        _mm256_sub_epi8(nib, _mm256_set1_epi8(8))
                    } else {
                        let qh = _mm256_loadu_si256(p.add(160) as *const __m256i);
                        let hb = _mm256_and_si256(
                            _mm256_slli_epi16(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(c as i32)), 4),
                            _mm256_set1_epi8(0x10),
                        );
                        _mm256_sub_epi8(_mm256_or_si256(nib, hb), _mm256_set1_epi8(16))
                    }
                }
            };
        }
        for t in 0..T {
            let y = yq.add(t * k + b * 32);
            let isum = if KIND == 4 {
                chunk_dots::<true>(start, &w, y)
            } else {
                chunk_dots::<false>(start, &w, y)
            };
            let s = _mm256_mul_ps(scale, _mm256_set1_ps(*yd.add(t * nb + b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[t]);
            if KIND == 4 {
                // + min * d * sum(y), the f16 block sum as ggml's Q8_1 keeps it
                acc[t] = _mm256_fmadd_ps(mins, _mm256_set1_ps(*ys.add(t * nb + b)), acc[t]);
            }
        }
    }
    acc
}

/// [`group_dots`] for Q4_K super-blocks: unsigned nibbles against signed Q8_K activations,
/// 6-bit scales applied to each sub-block's integer sums, mins through `vpdpwssd` against
/// pairs of the activations' 32-value sums.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
#[inline]
unsafe fn group_dots_q4k<const T: usize>(
    gp: *const u8,
    nb: usize,
    acts: &Acts,
    t0: usize,
) -> [std::arch::x86_64::__m256; T] {
    use std::arch::x86_64::*;
    let k = acts.k;
    let ngrp = k / 16;
    let yq = acts.q.as_ptr().add(t0 * k) as *const u8;
    let yd = acts.d.as_ptr().add(t0 * nb);
    let ys = acts.sums.as_ptr().add(t0 * ngrp);
    let mut acc = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let p = gp.add(b * Q4K_BYTES);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..8 {
            let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(32 + 8 * j) as *const __m128i));
            let mut w = [_mm256_setzero_si256(); 8];
            for i in 0..4 {
                let q = _mm256_loadu_si256(p.add(224 + 128 * j + 32 * i) as *const __m256i);
                w[2 * i] = _mm256_and_si256(q, m4);
                w[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            }
            for t in 0..T {
                let y = yq.add(t * k + b * 256 + 32 * j);
                let isum = chunk_dots::<true>(_mm256_setzero_si256(), &w, y);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(isum, sc));
            }
        }
        for t in 0..T {
            let g = ys.add(t * ngrp + b * 16);
            let mut msum = _mm256_setzero_si256();
            for pr in 0..4 {
                let mins = _mm256_loadu_si256(p.add(96 + 32 * pr) as *const __m256i);
                // sums of sub-blocks 2pr and 2pr + 1 (each two 16-value groups), as i16
                let s0 = *g.add(4 * pr) + *g.add(4 * pr + 1);
                let s1 = *g.add(4 * pr + 2) + *g.add(4 * pr + 3);
                msum = _mm256_dpwssd_epi32(msum, mins, _mm256_set1_epi32(i16_pair(s0, s1)));
            }
            let dy = _mm256_set1_ps(*yd.add(t * nb + b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(d, dy), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dmin, dy), acc[t]);
        }
    }
    acc
}

/// [`group_dots`] for Q6_K super-blocks: 6-bit unsigned weights against signed Q8_K
/// activations, the i8 scales applied to each 16-weight sub-block's integer sums, and the
/// zero point 32 through `vpdpwssd` of the scales against pairs of 16-value activation sums.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
#[inline]
unsafe fn group_dots_q6k<const T: usize>(
    gp: *const u8,
    nb: usize,
    acts: &Acts,
    t0: usize,
) -> [std::arch::x86_64::__m256; T] {
    use std::arch::x86_64::*;
    let k = acts.k;
    let ngrp = k / 16;
    let yq = acts.q.as_ptr().add(t0 * k) as *const u8;
    let yd = acts.d.as_ptr().add(t0 * nb);
    let ys = acts.sums.as_ptr().add(t0 * ngrp);
    let mut acc = [_mm256_setzero_ps(); T];
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    for b in 0..nb {
        let p = gp.add(b * Q6K_BYTES);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..16 {
            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(16 + 8 * j) as *const __m128i));
            let l0 = _mm256_loadu_si256(p.add(400 + 64 * j) as *const __m256i);
            let l1 = _mm256_loadu_si256(p.add(432 + 64 * j) as *const __m256i);
            let h = _mm256_loadu_si256(p.add(1424 + 32 * j) as *const __m256i);
            let w = [
                _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(h, 4), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                    _mm256_and_si256(_mm256_slli_epi16(h, 2), m2),
                ),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(h, m2)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(h, 2), m2),
                ),
            ];
            for t in 0..T {
                let y = yq.add(t * k + b * 256 + 16 * j);
                let isum = chunk_dots::<true>(_mm256_setzero_si256(), &w, y);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(isum, sc));
            }
        }
        for t in 0..T {
            let g = ys.add(t * ngrp + b * 16);
            let mut zsum = _mm256_setzero_si256();
            for pr in 0..8 {
                let scp = _mm256_loadu_si256(p.add(144 + 32 * pr) as *const __m256i);
                let (s0, s1) = (*g.add(2 * pr), *g.add(2 * pr + 1));
                zsum = _mm256_dpwssd_epi32(zsum, scp, _mm256_set1_epi32(i16_pair(s0, s1)));
            }
            let total = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(zsum, 5));
            let dy = _mm256_set1_ps(*yd.add(t * nb + b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, dy), acc[t]);
        }
    }
    acc
}
