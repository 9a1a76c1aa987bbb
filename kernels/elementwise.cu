// Row-wise and element-wise ops: embedding gather, RMSNorm (with fused residual add), residual
// add, scale, row gather, gated activations, RoPE and the paged KV-cache write (fused with RoPE).
#include "quant.cuh"

// out[t] = table[tokens[t]] * scale. grid (n_tokens), block 128. Ids are checked by the host.
template <int TY>
__device__ __forceinline__ void embed_impl(float* __restrict__ out, const u8* __restrict__ table,
                                           const u32* __restrict__ tokens, u32 cols, u32 row_bytes,
                                           float scale) {
    u32 t = blockIdx.x;
    const u8* row = table + (u64)tokens[t] * row_bytes;
    float* o = out + (u64)t * cols;
    for (u32 u = threadIdx.x; u < cols / 32; u += blockDim.x) {
        float v[32];
        dequant_unit<TY>(row, u, v);
        for (int i = 0; i < 32; i++) o[u * 32 + i] = v[i] * scale;
    }
}

#define X(name, ty)                                                                                  \
    extern "C" __global__ void embed_##name(float* out, const u8* table, const u32* tokens, u32 cols, \
                                            u32 row_bytes, float scale) {                            \
        embed_impl<ty>(out, table, tokens, cols, row_bytes, scale);                                  \
    }
KOJO_WEIGHT_TYPES(X)
#undef X

// out[i] = x[rows[i]]. grid (n_out), block 128.
extern "C" __global__ void gather_rows(float* __restrict__ out, const float* __restrict__ x,
                                       const u32* __restrict__ rows, u32 cols) {
    const float* src = x + (u64)rows[blockIdx.x] * cols;
    float* dst = out + (u64)blockIdx.x * cols;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// residual[i] += x[i]. grid (ceil(n / 256)), block 256.
extern "C" __global__ void add_inplace(float* __restrict__ residual, const float* __restrict__ x, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) residual[i] += x[i];
}

// x[i] *= s. grid (ceil(n / 256)), block 256.
extern "C" __global__ void scale_inplace(float* __restrict__ x, u32 n, float s) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// out[r, c] = act(gate[r, c]) * up[r, c] over `cols` columns, gate and up rows `ld` apart (up is
// the upper half of a stacked [gate | up] output when ld = 2 cols); act 0 = SiLU, 1 = GELU (tanh
// form). n = rows * cols. grid (ceil(n / 256)), block 256.
extern "C" __global__ void glu(float* __restrict__ out, const float* __restrict__ gate,
                               const float* __restrict__ up, u32 n, u32 cols, u32 ld, u32 act) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u64 at = (u64)(i / cols) * ld + i % cols;
    out[i] = glu_act(gate[at], act) * up[at];
}

// RMSNorm of each `seg`-wide segment of every row, times w[seg]. When `x` is given,
// `residual += x` first (written back) and the sum is normalized. grid (rows * cols / seg),
// block 128.
extern "C" __global__ void rms_norm(float* __restrict__ out, float* __restrict__ residual,
                                    const float* __restrict__ x, const float* __restrict__ w, u32 seg,
                                    float eps) {
    __shared__ float scratch[32];
    u64 base = (u64)blockIdx.x * seg;
    float* r = residual + base;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < seg; i += blockDim.x) {
        float v = r[i];
        if (x) {
            v += x[base + i];
            r[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float s = rsqrtf(ss / (float)seg + eps);
    for (u32 i = threadIdx.x; i < seg; i += blockDim.x) out[base + i] = r[i] * s * w[i];
}

// The two dimensions of rotation pair i in a head, and their rotation.
__device__ __forceinline__ void rope_pair(u32 i, u32 half, u32 interleaved, u32* a, u32* b) {
    if (interleaved) {
        *a = 2 * i;
        *b = 2 * i + 1;
    } else {
        *a = i;
        *b = i + half;
    }
}

// Rotate every `hd`-wide head of each row in place by its token's angles:
// cs[t * half + i] = (cos, sin) of pair i (computed by the host in f64, as the CPU backend).
// grid (n_tokens), block 128.
extern "C" __global__ void rope(float* __restrict__ x, const float* __restrict__ cs, u32 cols, u32 hd,
                                u32 half, u32 interleaved) {
    u32 t = blockIdx.x;
    float* row = x + (u64)t * cols;
    const float* c = cs + (u64)t * half * 2;
    u32 pairs = (cols / hd) * half;
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        u32 head = p / half, i = p % half, a, b;
        rope_pair(i, half, interleaved, &a, &b);
        float* h = row + head * hd;
        float x0 = h[a], x1 = h[b], cos_ = c[2 * i], sin_ = c[2 * i + 1];
        h[a] = x0 * cos_ - x1 * sin_;
        h[b] = x0 * sin_ + x1 * cos_;
    }
}

// Store token t's K and V rows (`kv_cols` wide) at cache slot slots[t], as f16. When `cs` is
// given, K is rotated first (RoPE fused into the write; `k` itself is left as it was).
// Cache layout per layer: [num_blocks * block_size, kv_cols]. grid (n_tokens), block 128.
extern "C" __global__ void write_kv(u16* __restrict__ kc, u16* __restrict__ vc, const float* __restrict__ k,
                                   const float* __restrict__ v, const u32* __restrict__ slots,
                                   const float* __restrict__ cs, u32 kv_cols, u32 hd, u32 half,
                                   u32 interleaved) {
    u32 t = blockIdx.x;
    const float* kr = k + (u64)t * kv_cols;
    const float* vr = v + (u64)t * kv_cols;
    u64 dst = (u64)slots[t] * kv_cols;
    const float* c = cs ? cs + (u64)t * half * 2 : 0;
    for (u32 e = threadIdx.x; e < kv_cols; e += blockDim.x) {
        float val = kr[e];
        u32 d = e % hd;
        if (c && d < 2 * half) {
            // which pair d belongs to, and its partner
            u32 i, a, b;
            if (interleaved) {
                i = d / 2;
            } else {
                i = d < half ? d : d - half;
            }
            rope_pair(i, half, interleaved, &a, &b);
            const float* h = kr + (e - d);
            float x0 = h[a], x1 = h[b], cos_ = c[2 * i], sin_ = c[2 * i + 1];
            val = d == a ? x0 * cos_ - x1 * sin_ : x0 * sin_ + x1 * cos_;
        }
        kc[dst + e] = kojo_f2h(val);
        vc[dst + e] = kojo_f2h(vr[e]);
    }
}

// The attention input from a stacked QKV projection (row: n_heads q heads, then n_kv k heads,
// then n_kv v heads, hd each): each q head, RMS-normed by `qn` when given, then rotated, goes to
// q_out [n, n_heads * hd]; each k head (normed by `kn`, rotated) and v head go to the f16 cache
// at slots[t]. `cs` as in `rope` (half = 0: no rotation). One block per (token, head), the head
// staged in shared memory. grid (n_tokens, n_heads + n_kv), block 128. hd <= 256.
extern "C" __global__ void qkv_post(float* __restrict__ q_out, u16* __restrict__ kc, u16* __restrict__ vc,
                                    const float* __restrict__ qkv, const u32* __restrict__ slots,
                                    const float* __restrict__ cs, const float* __restrict__ qn,
                                    const float* __restrict__ kn, float eps, u32 n_heads, u32 n_kv, u32 hd,
                                    u32 half, u32 interleaved) {
    __shared__ float head[256];
    __shared__ float scratch[32];
    const u32 t = blockIdx.x, h = blockIdx.y;
    const u32 q_cols = n_heads * hd, kv_cols = n_kv * hd;
    const float* row = qkv + (u64)t * (q_cols + 2 * kv_cols);
    const bool is_q = h < n_heads;
    const u32 kvh = is_q ? 0 : h - n_heads;
    const float* src = is_q ? row + (u64)h * hd : row + q_cols + (u64)kvh * hd;
    const float* nw = is_q ? qn : kn;
    float ss = 0.0f;
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = src[d];
        head[d] = v;
        ss += v * v;
    }
    // every thread takes the same branch: nw is uniform over the block
    if (nw) {
        float s = rsqrtf(block_sum(ss, scratch) / (float)hd + eps);
        for (u32 d = threadIdx.x; d < hd; d += blockDim.x) head[d] = head[d] * s * nw[d];
    }
    __syncthreads();
    const float* c = cs + (u64)t * half * 2;
    const u64 dst = (u64)slots[t] * kv_cols + (u64)kvh * hd;
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float val = head[d];
        if (d < 2 * half) {
            u32 i = interleaved ? d / 2 : (d < half ? d : d - half), a, b;
            rope_pair(i, half, interleaved, &a, &b);
            float x0 = head[a], x1 = head[b], cos_ = c[2 * i], sin_ = c[2 * i + 1];
            val = d == a ? x0 * cos_ - x1 * sin_ : x0 * sin_ + x1 * cos_;
        }
        if (is_q) {
            q_out[(u64)t * q_cols + (u64)h * hd + d] = val;
        } else {
            kc[dst + d] = kojo_f2h(val);
            vc[dst + d] = kojo_f2h(row[q_cols + kv_cols + (u64)kvh * hd + d]);
        }
    }
}

// out[i] = x[i] as bf16 (bf16 != 0) or f16, rounded to nearest even: the activations of a
// matrix-library GEMM against bf16/f16 weights. grid (ceil(n / 256)), block 256.
extern "C" __global__ void to_half(u16* __restrict__ out, const float* __restrict__ x, u32 n, u32 bf16) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (bf16) {
        u32 u = __float_as_uint(x[i]);
        out[i] = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
        out[i] = kojo_f2h(x[i]);
    }
}

// out[i] += bias[i % m] over n elements. grid (ceil(n / 256)), block 256.
extern "C" __global__ void add_bias(float* __restrict__ out, const float* __restrict__ bias, u32 n, u32 m) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] += bias[i % m];
}
