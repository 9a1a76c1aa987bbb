// Token choice on the GPU, one block of 256 threads per row of logits, with the CPU sampler's
// rules (src/sampling): greedy takes the lowest index among equal maxima; sampling keeps the
// top_k candidates (best first, ties by lower id), scales by 1/temperature, takes the softmax,
// cuts to top_p then min_p, and picks with the caller's uniform number in [0, 1).
#include "common.cuh"

#define SAMPLE_THREADS 256
#define SAMPLE_MAX_K 64

// (value, index) order: larger value first, then smaller index
__device__ __forceinline__ bool before(float v, u32 i, float bv, u32 bi) {
    return v > bv || (v == bv && i < bi);
}

// The best (value, index) of the block among elements strictly after (after_v, after_i) in
// that order; every thread gets it. `sv`, `si`: 32 floats and 32 u32 of shared scratch.
__device__ __forceinline__ void block_best(const float* __restrict__ x, u32 n, float after_v, u32 after_i,
                                           float* sv, u32* si, float* out_v, u32* out_i) {
    float bv = -KOJO_INF;
    u32 bi = 0xffffffffu;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        float v = x[i];
        if (before(after_v, after_i, v, i) && before(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        u32 oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (before(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    bv = -KOJO_INF;
    bi = 0xffffffffu;
    for (u32 w = 0; w < blockDim.x / 32; w++) {
        if (before(sv[w], si[w], bv, bi)) {
            bv = sv[w];
            bi = si[w];
        }
    }
    __syncthreads();
    *out_v = bv;
    *out_i = bi;
}

// ids[r] = argmax of row r. grid (rows), block 256.
extern "C" __global__ void argmax_rows(u32* __restrict__ ids, const float* __restrict__ logits, u32 vocab) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    float v;
    u32 i;
    block_best(logits + (u64)blockIdx.x * vocab, vocab, KOJO_INF, 0, sv, si, &v, &i);
    if (threadIdx.x == 0) ids[blockIdx.x] = i;
}

// ids[r] = a token drawn from row r's top_k[r] (1..=64) candidates with its temperature,
// top_p and min_p; uniform[r] in [0, 1). grid (rows), block 256.
extern "C" __global__ void sample_top_k(u32* __restrict__ ids, const float* __restrict__ logits, u32 vocab,
                                        const u32* __restrict__ top_ks, const float* __restrict__ temperatures,
                                        const float* __restrict__ top_ps, const float* __restrict__ min_ps,
                                        const float* __restrict__ uniform) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    __shared__ float cand_v[SAMPLE_MAX_K];
    __shared__ u32 cand_i[SAMPLE_MAX_K];
    const float* row = logits + (u64)blockIdx.x * vocab;
    const u32 top_k = top_ks[blockIdx.x];
    const float temperature = temperatures[blockIdx.x], top_p = top_ps[blockIdx.x];
    const float min_p = min_ps[blockIdx.x];
    u32 k = top_k < vocab ? top_k : vocab;
    float pv = KOJO_INF;
    u32 pi = 0;
    for (u32 c = 0; c < k; c++) {
        block_best(row, vocab, pv, pi, sv, si, &pv, &pi);
        if (threadIdx.x == 0) {
            cand_v[c] = pv;
            cand_i[c] = pi;
        }
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    float probs[SAMPLE_MAX_K];
    float max = cand_v[0] / temperature, total = 0.0f;
    for (u32 c = 0; c < k; c++) {
        probs[c] = expf(cand_v[c] / temperature - max);
        total += probs[c];
    }
    u32 keep = k;
    if (top_p < 1.0f) {
        float cum = 0.0f;
        for (u32 c = 0; c < k; c++) {
            cum += probs[c] / total;
            if (cum >= top_p) {
                keep = c + 1;
                break;
            }
        }
    }
    if (min_p > 0.0f) {
        float floor = probs[0] * min_p;
        u32 n = 1;
        while (n < keep && probs[n] >= floor) n++;
        keep = n;
    }
    float kept = 0.0f;
    for (u32 c = 0; c < keep; c++) kept += probs[c];
    float r = uniform[blockIdx.x] * kept;
    u32 pick = keep - 1;
    for (u32 c = 0; c < keep; c++) {
        if (r < probs[c]) {
            pick = c;
            break;
        }
        r -= probs[c];
    }
    ids[blockIdx.x] = cand_i[pick];
}

// A grammar's token mask: logits[r][t] = -inf where bit t % 32 of masks[r * words + t / 32] is
// clear (tokens past the mask's words too). Rows without a constraint carry all-ones masks.
// The CPU twin is sampling::apply_mask. grid (ceil(vocab / 256), rows), block 256.
extern "C" __global__ void apply_token_mask(float* __restrict__ logits, const u32* __restrict__ masks,
                                            u32 vocab, u32 words) {
    u32 t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= vocab) return;
    u32 w = t / 32;
    bool allowed = w < words && ((masks[(u64)blockIdx.y * words + w] >> (t % 32)) & 1u);
    if (!allowed) logits[(u64)blockIdx.y * vocab + t] = -KOJO_INF;
}
