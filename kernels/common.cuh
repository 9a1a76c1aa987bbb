// Shared by every kojo kernel. Compiled two ways:
// - by NVRTC for the GPU (__CUDACC__ set; headers from CUDA_HOME/include or the
//   nvidia-cuda-runtime wheel; no libc headers);
// - as C++ on the CPU by the test executor (crates/kexec/kexec.h defines the CUDA names).
// Conventions: every kernel is `extern "C"` (found by name); activations are f32 `[rows, cols]`;
// the KV cache is f16 stored as u16; a pointer argument that may be absent is null.
#pragma once

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <math_constants.h>
#define KOJO_INF CUDART_INF_F
#define KOJO_DYN_SMEM(T, name) extern __shared__ T name[]
__device__ __forceinline__ float kojo_h2f(u16 h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ u16 kojo_f2h(float f) { return __half_as_ushort(__float2half_rn(f)); }
#endif

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is 32 floats of shared memory, free for reuse after the call.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

// Little-endian loads from byte pointers with any alignment (GGUF blocks are 2-byte aligned
// at best).
__device__ __forceinline__ u16 load_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }
__device__ __forceinline__ u32 load_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
__device__ __forceinline__ float load_f16(const u8* p) { return kojo_h2f(load_u16(p)); }

// Loads from addresses aligned to their width: `n` bytes as n / 4 little-endian words (n = 8 or
// 16, one vector load on the GPU), and single aligned u16 / u32. The executor checks the
// alignment, which a GPU would fault on.
template <int N>
__device__ __forceinline__ void load_words(const u8* p, u32* w) {
    static_assert(N == 8 || N == 16, "vector loads are 8 or 16 bytes");
#ifdef __CUDACC__
    if (N == 16) {
        uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
        w[0] = v.x;
        w[1] = v.y;
        w[2] = v.z;
        w[3] = v.w;
    } else {
        uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        w[0] = v.x;
        w[1] = v.y;
    }
#else
    if (reinterpret_cast<uintptr_t>(p) % N) kexec::fail("a vector load from a misaligned address");
    std::memcpy(w, p, N);
#endif
}
__device__ __forceinline__ u32 load_u16a(const u8* p) {
#ifdef __CUDACC__
    return *reinterpret_cast<const u16*>(p);
#else
    if (reinterpret_cast<uintptr_t>(p) % 2) kexec::fail("a u16 load from an odd address");
    return load_u16(p);
#endif
}
__device__ __forceinline__ u32 load_u32a(const u8* p) {
#ifdef __CUDACC__
    return *reinterpret_cast<const u32*>(p);
#else
    if (reinterpret_cast<uintptr_t>(p) % 4) kexec::fail("a u32 load from a misaligned address");
    return load_u32(p);
#endif
}
// 8 consecutive f32 from a 32-byte aligned address
__device__ __forceinline__ void load_f32x8(const float* p, float* v) {
    u32 w[8];
    load_words<16>(reinterpret_cast<const u8*>(p), w);
    load_words<16>(reinterpret_cast<const u8*>(p) + 16, w + 4);
    for (int i = 0; i < 8; i++) v[i] = __uint_as_float(w[i]);
}

// A load that bypasses L1: data other blocks wrote during this kernel (after their
// __threadfence), which this SM must not serve from a stale cache line.
__device__ __forceinline__ float load_cg(const float* p) {
#ifdef __CUDACC__
    return __ldcg(p);
#else
    return *p;
#endif
}

// The gate activations: 0 = SiLU, 1 = GELU (tanh form).
__device__ __forceinline__ float glu_act(float g, u32 act) {
    if (act == 0) return g / (1.0f + expf(-g));
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}
