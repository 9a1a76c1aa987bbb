// kexec: runs kojo's CUDA kernels (kernels/*.cu) on the CPU, for tests.
//
// The same source is compiled as C++. Each block runs on the calling thread, its threads as
// cooperative fibers, one block after another in a shuffled order (new at every launch):
// - threadIdx/blockIdx/blockDim/gridDim read the current fiber and block;
// - __syncthreads() is a real barrier over the block's threads; a block whose threads do not all
//   reach it (some exited, or wait at a warp collective instead) aborts with a message;
// - warps are 32 lanes; a shuffle stores each lane's value in per-warp scratch, waits at a warp
//   barrier, reads its source lane, and waits again; masks must be full (0xffffffff);
// - `__shared__` variables are per-OS-thread statics, which is per block since blocks run one at
//   a time; dynamic shared memory (KOJO_DYN_SMEM) is poisoned with 0xff bytes before each block.
// Not modeled: races between threads (a fiber runs until it blocks), tensor-core instructions,
// cp.async and inline PTX (kernels keep a portable path behind `#ifdef __CUDA_ARCH__`).
#pragma once

#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

namespace kexec {

struct Block;
// state of the block running on this OS thread
extern thread_local Block* g_block;
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned lane_linear();
void syncthreads();
void warp_barrier();
uint64_t* warp_scratch();
char* dyn_smem();
[[noreturn]] void fail(const char* what);

template <class T>
inline T shfl_from(T v, unsigned mask, int src, bool keep_own) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu) fail("warp collective with a partial mask (only full masks are supported)");
    unsigned lane = lane_linear() % 32;
    uint64_t* s = warp_scratch();
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s[lane] = bits;
    warp_barrier();
    T r = v;
    if (!keep_own) std::memcpy(&r, &s[src], sizeof(T));
    warp_barrier();
    return r;
}

}  // namespace kexec

#define threadIdx (kexec::thread_idx())
#define blockIdx (kexec::block_idx())
#define blockDim (kexec::block_dim())
#define gridDim (kexec::grid_dim())
#define warpSize 32

// every kernel is found by the build script through this spelling in the preprocessed source
#define __global__ __attribute__((used))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define KOJO_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(kexec::dyn_smem())

inline void __syncthreads() { kexec::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) kexec::fail("__syncwarp with a partial mask");
    kexec::warp_barrier();
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    unsigned lane = kexec::lane_linear() % 32;
    unsigned src = lane ^ (unsigned)lane_mask;
    bool out = (src / width) != (lane / width);
    return kexec::shfl_from(v, mask, (int)src, out);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    unsigned lane = kexec::lane_linear() % 32;
    unsigned src = (lane / width) * width + ((unsigned)src_lane % width);
    return kexec::shfl_from(v, mask, (int)src, false);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = kexec::lane_linear() % 32;
    bool out = (lane % width) + delta >= (unsigned)width;
    return kexec::shfl_from(v, mask, (int)(lane + delta) % 32, out);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = kexec::lane_linear() % 32;
    bool out = (lane % width) < delta;
    return kexec::shfl_from(v, mask, (int)(lane + 32 - delta) % 32, out);
}

// atomics and fences: blocks run one after another on one OS thread, so plain memory
// operations are atomic and ordered
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}
// the device math the kernels use
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }

// f16 through the compiler's _Float16 (IEEE binary16, round to nearest even), as the GPU's
// __float2half_rn / __half2float
inline float kojo_h2f(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short kojo_f2h(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
#define KOJO_INF (__builtin_huge_valf())
