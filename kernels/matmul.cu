// out[n, m] = x[n, k] @ w[m, k]^T (+ bias[m]) against weights in their GGUF blocks, dequantized
// in registers. One warp owns one weight row and MM_TOKENS tokens: each lane dequantizes every
// 32nd unit of the row once and dots it with those tokens' activations; the warp then sums.
// grid (ceil(m / 4), ceil(n / MM_TOKENS)), block 128 (4 warps = 4 rows).
#include "quant.cuh"

#define MM_TOKENS 4

template <int TY>
__device__ __forceinline__ void matmul_impl(float* __restrict__ out, const float* __restrict__ x,
                                            const u8* __restrict__ w, const float* __restrict__ bias,
                                            u32 n, u32 k, u32 m, u32 row_bytes) {
    u32 lane = threadIdx.x % 32;
    u32 r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    u32 t0 = blockIdx.y * MM_TOKENS;
    if (r >= m) return;  // whole warps leave together; no block barrier follows
    const u8* row = w + (u64)r * row_bytes;
    float acc[MM_TOKENS];
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;
    for (u32 u = lane; u < k / 32; u += 32) {
        float v[32];
        dequant_unit<TY>(row, u, v);
        for (int t = 0; t < MM_TOKENS; t++) {
            if (t0 + t >= n) break;
            const float* xr = x + (u64)(t0 + t) * k + u * 32;
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += v[i] * xr[i];
            acc[t] += s;
        }
    }
    float b = bias ? bias[r] : 0.0f;
    for (int t = 0; t < MM_TOKENS; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0 && t0 + t < n) out[(u64)(t0 + t) * m + r] = s + b;
    }
}

#define X(name, ty)                                                                               \
    extern "C" __global__ void matmul_##name(float* out, const float* x, const u8* w, const float* bias, \
                                             u32 n, u32 k, u32 m, u32 row_bytes) {                \
        matmul_impl<ty>(out, x, w, bias, n, k, m, row_bytes);                                     \
    }
KOJO_WEIGHT_TYPES(X)
#undef X
