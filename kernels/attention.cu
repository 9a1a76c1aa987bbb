// Causal attention over the paged f16 KV cache for a ragged batch (decode and chunked prefill
// alike: every token attends to its own sequence's positions lo..=pos).
//
// attn_split: one block per (token, KV head, split of the context, group of up to ATT_MAXG
// query heads sharing that KV head). Its 4 warps take every 4th position of the split; a warp
// reads each K/V row once for all its query heads and keeps an online softmax (running max m,
// sum l, unnormalized output) per head. The warps are merged in shared memory and the split's
// (m, l, o) is written out. attn_reduce merges the splits of each (token, head).
//
// The query is rounded to f16 before q.k, as the CPU backend does (and ggml's flash attention).
// Limits checked by the host: head_dim a multiple of 32 and at most 256.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_MAXG 8
#define ATT_MAXD 8

// grid (n_tokens * n_kv, n_splits, ceil(group / ATT_MAXG)), block 128.
// part_o [n_tokens, n_heads, n_splits, hd]; part_ml [n_tokens, n_heads, n_splits, 2].
// Cache per layer: [num_blocks * block_size, n_kv * hd]; block_tables [num_seqs, max_blocks].
extern "C" __global__ void attn_split(float* __restrict__ part_o, float* __restrict__ part_ml,
                                      const float* __restrict__ q, const u16* __restrict__ kc,
                                      const u16* __restrict__ vc, const u32* __restrict__ positions,
                                      const u32* __restrict__ token_seq, const u32* __restrict__ block_tables,
                                      u32 max_blocks, u32 n_heads, u32 n_kv, u32 hd, u32 block_size,
                                      float scale, u32 window, u32 chunk) {
    __shared__ float s_q[ATT_MAXG * 32 * ATT_MAXD];
    __shared__ float s_m[ATT_WARPS][ATT_MAXG];
    __shared__ float s_l[ATT_WARPS][ATT_MAXG];
    __shared__ float s_o[ATT_WARPS][ATT_MAXG * 32 * ATT_MAXD];

    const u32 t = blockIdx.x / n_kv, g = blockIdx.x % n_kv, split = blockIdx.y, n_splits = gridDim.y;
    const u32 group = n_heads / n_kv;
    const u32 h0 = blockIdx.z * ATT_MAXG;  // first head of this block within the group
    const u32 G = group - h0 < ATT_MAXG ? group - h0 : ATT_MAXG;
    const u32 D = hd / 32;
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const u32 pos = positions[t];
    const u32 lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32 begin = lo + split * chunk;
    const u32 end = begin + chunk < pos + 1 ? begin + chunk : pos + 1;
    const u32* table = block_tables + (u64)token_seq[t] * max_blocks;
    const u32 kv_cols = n_kv * hd;
    const u32 head0 = g * group + h0;  // first query head of this block

    const float* qr = q + (u64)t * n_heads * hd + (u64)head0 * hd;
    for (u32 e = threadIdx.x; e < G * hd; e += blockDim.x) s_q[e] = kojo_h2f(kojo_f2h(qr[e]));
    __syncthreads();

    float m[ATT_MAXG], l[ATT_MAXG], acc[ATT_MAXG][ATT_MAXD];
#pragma unroll
    for (int h = 0; h < ATT_MAXG; h++) {
        m[h] = -KOJO_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) acc[h][i] = 0.0f;
    }
    for (u32 j = begin + warp; j < end; j += ATT_WARPS) {
        u64 slot = (u64)table[j / block_size] * block_size + j % block_size;
        const u16* kr = kc + slot * kv_cols + (u64)g * hd;
        const u16* vr = vc + slot * kv_cols + (u64)g * hd;
        float kv[ATT_MAXD], vv[ATT_MAXD];
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) {
            if (i < (int)D) {
                kv[i] = kojo_h2f(kr[i * 32 + lane]);
                vv[i] = kojo_h2f(vr[i * 32 + lane]);
            }
        }
#pragma unroll
        for (int h = 0; h < ATT_MAXG; h++) {
            if (h >= (int)G) break;
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_MAXD; i++)
                if (i < (int)D) d += s_q[h * hd + i * 32 + lane] * kv[i];
            float sc = warp_sum(d) * scale;
            float mn = fmaxf(m[h], sc);
            float c = expf(m[h] - mn), p = expf(sc - mn);
            l[h] = l[h] * c + p;
#pragma unroll
            for (int i = 0; i < ATT_MAXD; i++)
                if (i < (int)D) acc[h][i] = acc[h][i] * c + p * vv[i];
            m[h] = mn;
        }
    }
    // merge the warps
#pragma unroll
    for (int h = 0; h < ATT_MAXG; h++) {
        if (h >= (int)G) break;
        if (lane == 0) {
            s_m[warp][h] = m[h];
            s_l[warp][h] = l[h];
        }
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++)
            if (i < (int)D) s_o[warp][h * hd + i * 32 + lane] = acc[h][i];
    }
    __syncthreads();
    for (u32 e = threadIdx.x; e < G * hd; e += blockDim.x) {
        u32 h = e / hd, d = e % hd;
        float M = -KOJO_INF;
        for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, s_m[w][h]);
        float L = 0.0f, O = 0.0f;
        if (M != -KOJO_INF) {
            for (int w = 0; w < ATT_WARPS; w++) {
                if (s_m[w][h] == -KOJO_INF) continue;
                float f = expf(s_m[w][h] - M);
                L += s_l[w][h] * f;
                O += s_o[w][e] * f;
            }
        }
        u64 at = ((u64)t * n_heads + head0 + h) * n_splits + split;
        part_o[at * hd + d] = O;
        if (d == 0) {
            part_ml[at * 2] = M;
            part_ml[at * 2 + 1] = L;
        }
    }
}

// out[t, head * hd + d] = the merged splits. grid (n_tokens * n_heads), block 128.
extern "C" __global__ void attn_reduce(float* __restrict__ out, const float* __restrict__ part_o,
                                       const float* __restrict__ part_ml, u32 hd, u32 n_splits) {
    u64 th = blockIdx.x;  // token * n_heads + head
    const float* ml = part_ml + th * n_splits * 2;
    float M = -KOJO_INF;
    for (u32 s = 0; s < n_splits; s++) M = fmaxf(M, ml[2 * s]);
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float L = 0.0f, O = 0.0f;
        for (u32 s = 0; s < n_splits; s++) {
            if (ml[2 * s] == -KOJO_INF) continue;
            float f = expf(ml[2 * s] - M);
            L += ml[2 * s + 1] * f;
            O += part_o[(th * n_splits + s) * hd + d] * f;
        }
        out[th * hd + d] = L > 0.0f ? O / L : 0.0f;
    }
}
