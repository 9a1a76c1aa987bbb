// Causal attention over the paged f16 KV cache for a ragged batch: every token attends to its
// own sequence's positions lo..=pos. Decode tokens (one per sequence) take attn_split; the
// tokens of prefill chunks take attn_prefill (at the end).
//
// attn_split: one block per (token, KV head, split of the context, group of up to ATT_MAXG
// query heads sharing that KV head). Its 4 warps take every 4th position of the split; a warp
// reads each K/V row once for all its query heads and keeps an online softmax (running max m,
// sum l, unnormalized output) per head. The warps are merged in shared memory and the split's
// (m, l, o) is written out; the last split block of a (token, KV head, head group) to finish
// (a counter per group, atomically counted) merges the splits into the output.
//
// The query is rounded to f16 before q.k, as the CPU backend does (and ggml's flash attention).
// Limits checked by the host: head_dim a multiple of 32 and at most 256.
#include "common.cuh"

#define ATT_WARPS 4
#define ATT_MAXG 8
#define ATT_MAXD 8

// `tokens` lists the n_sel batch rows this launch handles (the others go to attn_prefill).
// grid (n_sel * n_kv, n_splits, ceil(group / ATT_MAXG)), block 128.
// part_o [n_sel, n_heads, n_splits, hd]; part_ml [n_sel, n_heads, n_splits, 2]; counters
// [n_sel * n_kv * ceil(group / ATT_MAXG)], zero before the launch and after it.
// Cache per layer: [num_blocks * block_size, n_kv * hd]; block_tables [num_seqs, max_blocks].
extern "C" __global__ void attn_split(float* __restrict__ out, float* part_o, float* part_ml,
                                      u32* __restrict__ counters, const float* __restrict__ q,
                                      const u16* __restrict__ kc,
                                      const u16* __restrict__ vc, const u32* __restrict__ positions,
                                      const u32* __restrict__ token_seq, const u32* __restrict__ block_tables,
                                      const u32* __restrict__ tokens, u32 max_blocks, u32 n_heads, u32 n_kv,
                                      u32 hd, u32 block_size, float scale, u32 window) {
    __shared__ float s_q[ATT_MAXG * 32 * ATT_MAXD];
    __shared__ float s_m[ATT_WARPS][ATT_MAXG];
    __shared__ float s_l[ATT_WARPS][ATT_MAXG];
    __shared__ float s_o[ATT_WARPS][ATT_MAXG * 32 * ATT_MAXD];

    const u32 sel = blockIdx.x / n_kv, t = tokens[sel], g = blockIdx.x % n_kv;
    const u32 split = blockIdx.y, n_splits = gridDim.y;
    const u32 group = n_heads / n_kv;
    const u32 h0 = blockIdx.z * ATT_MAXG;  // first head of this block within the group
    const u32 G = group - h0 < ATT_MAXG ? group - h0 : ATT_MAXG;
    const u32 D = hd / 32;
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const u32 pos = positions[t];
    const u32 lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    // this token's context, split evenly over the launch's splits (a split may be empty)
    const u32 chunk = (pos + 1 - lo + n_splits - 1) / n_splits;
    const u32 begin = lo + split * chunk;
    const u32 end = begin + chunk < pos + 1 ? begin + chunk : pos + 1;  // begin >= end: empty
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
        u64 at = ((u64)sel * n_heads + head0 + h) * n_splits + split;
        part_o[at * hd + d] = O;
        if (d == 0) {
            part_ml[at * 2] = M;
            part_ml[at * 2 + 1] = L;
        }
    }
    // the last split of this (token, KV head, head group) to finish merges them all, in split
    // order (so the result does not depend on which is last), and resets the counter for the
    // next launch
    __shared__ u32 s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* c = counters + ((u64)sel * n_kv + g) * gridDim.z + blockIdx.z;
        u32 done = atomicAdd(c, 1u) + 1;
        s_last = done == n_splits;
        if (done == n_splits) *c = 0;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (u32 e = threadIdx.x; e < G * hd; e += blockDim.x) {
        u32 h = e / hd, d = e % hd;
        u64 base = ((u64)sel * n_heads + head0 + h) * n_splits;
        float M = -KOJO_INF;
        for (u32 s = 0; s < n_splits; s++) M = fmaxf(M, load_cg(part_ml + (base + s) * 2));
        float L = 0.0f, O = 0.0f;
        for (u32 s = 0; s < n_splits; s++) {
            float m_s = load_cg(part_ml + (base + s) * 2);
            if (m_s == -KOJO_INF) continue;
            float f = expf(m_s - M);
            L += load_cg(part_ml + (base + s) * 2 + 1) * f;
            O += load_cg(part_o + (base + s) * hd + d) * f;
        }
        out[((u64)t * n_heads + head0 + h) * hd + d] = L > 0.0f ? O / L : 0.0f;
    }
}

// Tiled attention for prefill chunks (a sequence with several tokens in the batch, prefix
// cached or not): one block per (tile of up to `tile_tokens` consecutive batch tokens of one
// sequence, KV head, group of `tile_heads` query heads). K and V are read through the block
// table PF_KV positions at a time into shared memory, once for every query row of the tile;
// each warp keeps an online softmax for its rows (row r = token r / heads, head r % heads),
// masked per query (causal, sliding window). Rows per block: at most 32 and 4096 / hd.
// grid (n_tiles, n_kv, ceil(group / tile_heads)), block 128.
#define PF_KV 16
#define PF_ROWS 32

extern "C" __global__ void attn_prefill(float* __restrict__ out, const float* __restrict__ q,
                                        const u16* __restrict__ kc, const u16* __restrict__ vc,
                                        const u32* __restrict__ positions, const u32* __restrict__ token_seq,
                                        const u32* __restrict__ block_tables, const u32* __restrict__ tile_start,
                                        const u32* __restrict__ tile_len, u32 max_blocks, u32 n_heads, u32 n_kv,
                                        u32 hd, u32 block_size, float scale, u32 window, u32 tile_heads) {
    __shared__ float s_q[4096];
    __shared__ u16 s_k[PF_KV * 32 * ATT_MAXD];
    __shared__ u16 s_v[PF_KV * 32 * ATT_MAXD];

    const u32 t0 = tile_start[blockIdx.x], nt = tile_len[blockIdx.x], g = blockIdx.y;
    const u32 group = n_heads / n_kv;
    const u32 h0 = blockIdx.z * tile_heads;
    const u32 gb = group - h0 < tile_heads ? group - h0 : tile_heads;  // heads in this block
    const u32 rows = nt * gb;
    const u32 D = hd / 32;
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const u32* table = block_tables + (u64)token_seq[t0] * max_blocks;
    const u32 kv_cols = n_kv * hd;

    for (u32 e = threadIdx.x; e < rows * hd; e += blockDim.x) {
        u32 r = e / hd, d = e % hd;
        u32 head = g * group + h0 + r % gb;
        s_q[e] = kojo_h2f(kojo_f2h(q[((u64)(t0 + r / gb) * n_heads + head) * hd + d]));
    }
    // the positions any query of the tile sees
    u32 first = 0xffffffffu, last = 0;
    for (u32 i = 0; i < nt; i++) {
        u32 pos = positions[t0 + i];
        u32 lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
        first = lo < first ? lo : first;
        last = pos > last ? pos : last;
    }

    float m[ATT_MAXG], l[ATT_MAXG], acc[ATT_MAXG][ATT_MAXD];
#pragma unroll
    for (int k = 0; k < ATT_MAXG; k++) {
        m[k] = -KOJO_INF;
        l[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) acc[k][i] = 0.0f;
    }
    for (u32 j0 = first; j0 <= last; j0 += PF_KV) {
        __syncthreads();  // the previous tile is no longer read
        for (u32 e = threadIdx.x; e < PF_KV * hd; e += blockDim.x) {
            u32 jj = e / hd, d = e % hd, j = j0 + jj;
            if (j <= last) {
                u64 slot = (u64)table[j / block_size] * block_size + j % block_size;
                s_k[e] = kc[slot * kv_cols + (u64)g * hd + d];
                s_v[e] = vc[slot * kv_cols + (u64)g * hd + d];
            }
        }
        __syncthreads();
        // rows warp, warp + 4, ...: at most ATT_MAXG of them (PF_ROWS / ATT_WARPS)
#pragma unroll
        for (int k = 0; k < ATT_MAXG; k++) {
            u32 r = warp + ATT_WARPS * k;
            if (r >= rows) break;
            u32 pos = positions[t0 + r / gb];
            u32 lo = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
            for (u32 jj = 0; jj < PF_KV; jj++) {
                u32 j = j0 + jj;
                if (j < lo || j > pos) continue;
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < ATT_MAXD; i++)
                    if (i < (int)D) d += s_q[r * hd + i * 32 + lane] * kojo_h2f(s_k[jj * hd + i * 32 + lane]);
                float sc = warp_sum(d) * scale;
                float mn = fmaxf(m[k], sc);
                float c = expf(m[k] - mn), p = expf(sc - mn);
                l[k] = l[k] * c + p;
#pragma unroll
                for (int i = 0; i < ATT_MAXD; i++)
                    if (i < (int)D) acc[k][i] = acc[k][i] * c + p * kojo_h2f(s_v[jj * hd + i * 32 + lane]);
                m[k] = mn;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < ATT_MAXG; k++) {
        u32 r = warp + ATT_WARPS * k;
        if (r >= rows) break;
        u32 head = g * group + h0 + r % gb;
        float* o = out + ((u64)(t0 + r / gb) * n_heads + head) * hd;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++)
            if (i < (int)D) o[i * 32 + lane] = l[k] > 0.0f ? acc[k][i] / l[k] : 0.0f;
    }
}
