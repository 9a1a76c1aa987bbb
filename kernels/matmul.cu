// out = x[n, k] @ w^T against weights in their GGUF blocks, dequantized in registers. One warp
// owns one output row and MM_TOKENS tokens: lane L dequantizes the 8-column chunks L, L + 32,
// ... of its weight row (a warp reads 256 consecutive values at a time, with 8- or 16-byte
// loads where the type allows) and dots each with those tokens' activations; the warp then
// sums. Two chunks are in flight per lane to keep the memory system busy.
// grid (ceil(m / 4), ceil(n / MM_TOKENS)), block 128 (4 warps = 4 rows).
//
// Fusions around the projection:
// - `norm_w` given: x is the residual stream and the projection takes RMSNorm(x) * norm_w
//   (eps): each warp of the block first takes one token's sum of squares, the weights are
//   dotted with x * norm_w, and the sum is scaled by the token's 1 / rms;
// - `accumulate`: out += the result (an output projection into the residual stream).
//
// matmul_<type>: out[n, m] (+)= x @ w[m, k]^T (+ bias[m]).
// matmul_glu_<type>: w stacks gate [m, k] over up [m, k]; out[n, m] = act(x @ gate^T) * (x @ up^T)
// (the FFN's gate and up projections and its activation in one pass).
#include "quant.cuh"

#define MM_TOKENS 4

template <int TY, bool GLU>
__device__ __forceinline__ void matmul_impl(float* __restrict__ out, const float* __restrict__ x,
                                            const u8* __restrict__ w, const float* __restrict__ bias,
                                            const float* __restrict__ norm_w, u32 n, u32 k, u32 m,
                                            u32 row_bytes, u32 act, float eps, u32 accumulate) {
    __shared__ float s_scale[MM_TOKENS];
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const u32 r = blockIdx.x * (blockDim.x / 32) + warp;
    const u32 t0 = blockIdx.y * MM_TOKENS;
    const u32 nt = n - t0 < MM_TOKENS ? n - t0 : MM_TOKENS;
    if (norm_w) {
        // warp w: token t0 + w's 1 / rms (every warp of the block takes part: a barrier follows)
        if (warp < nt) {
            const float* xr = x + (u64)(t0 + warp) * k;
            float ss = 0.0f;
            for (u32 i = lane; i < k; i += 32) ss += xr[i] * xr[i];
            ss = warp_sum(ss);
            if (lane == 0) s_scale[warp] = rsqrtf(ss / (float)k + eps);
        }
        __syncthreads();
    }
    if (r >= m) return;  // whole warps leave together; no block barrier follows
    const u8* row = w + (u64)r * row_bytes;
    const u8* row_up = GLU ? w + ((u64)m + r) * row_bytes : row;
    float acc[MM_TOKENS], acc_up[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = acc_up[t] = 0.0f;
    const u32 chunks = k / 8;
    for (u32 c0 = lane; c0 < chunks; c0 += 64) {
        // two chunks per lane: both rows' loads issue before the arithmetic
        const bool two = c0 + 32 < chunks;
        float v[2][8], vu[2][8];
#pragma unroll
        for (int s = 0; s < 2; s++) {
            if (s == 1 && !two) break;
            dequant8<TY>(row, c0 + 32 * s, v[s]);
            if (GLU) dequant8<TY>(row_up, c0 + 32 * s, vu[s]);
            if (norm_w) {
                // fold the norm's weights into the dequantized values: w * nw, dotted with x
                float nw[8];
                load_f32x8(norm_w + (u64)(c0 + 32 * s) * 8, nw);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    v[s][i] *= nw[i];
                    if (GLU) vu[s][i] *= nw[i];
                }
            }
        }
#pragma unroll
        for (int s = 0; s < 2; s++) {
            if (s == 1 && !two) break;
#pragma unroll
            for (int t = 0; t < MM_TOKENS; t++) {
                if (t >= (int)nt) break;
                float xv[8];
                load_f32x8(x + (u64)(t0 + t) * k + (u64)(c0 + 32 * s) * 8, xv);
                float d = 0.0f, du = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    d += v[s][i] * xv[i];
                    if (GLU) du += vu[s][i] * xv[i];
                }
                acc[t] += d;
                if (GLU) acc_up[t] += du;
            }
        }
    }
    const float b = (!GLU && bias) ? bias[r] : 0.0f;
#pragma unroll
    for (int t = 0; t < MM_TOKENS; t++) {
        float s = warp_sum(acc[t]);
        float su = GLU ? warp_sum(acc_up[t]) : 0.0f;
        if (lane == 0 && t < (int)nt) {
            if (norm_w) {
                s *= s_scale[t];
                su *= s_scale[t];
            }
            float* o = out + (u64)(t0 + t) * m + r;
            float v = GLU ? glu_act(s, act) * su : s + b;
            *o = accumulate ? *o + v : v;
        }
    }
}

#define X(name, ty)                                                                                \
    extern "C" __global__ void matmul_##name(float* out, const float* x, const u8* w, const float* bias, \
                                             const float* norm_w, u32 n, u32 k, u32 m, u32 row_bytes, \
                                             float eps, u32 accumulate) {                          \
        matmul_impl<ty, false>(out, x, w, bias, norm_w, n, k, m, row_bytes, 0, eps, accumulate);   \
    }                                                                                              \
    extern "C" __global__ void matmul_glu_##name(float* out, const float* x, const u8* w,          \
                                                 const float* norm_w, u32 n, u32 k, u32 m,         \
                                                 u32 row_bytes, u32 act, float eps) {              \
        matmul_impl<ty, true>(out, x, w, 0, norm_w, n, k, m, row_bytes, act, eps, 0);              \
    }
KOJO_WEIGHT_TYPES(X)
#undef X
