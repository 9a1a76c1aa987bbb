// Test kernels for the executor itself (not part of kojo): each shows one piece of the CUDA
// model the executor must reproduce, or one misuse it must stop.
#include "common.cuh"

// every shuffle form, 2 warps: out[4 * thread + form]
extern "C" __global__ void probe_shuffles(int* out) {
    int v = threadIdx.x;
    int* o = out + 4 * threadIdx.x;
    o[0] = __shfl_xor_sync(FULL_MASK, v, 5);
    o[1] = __shfl_down_sync(FULL_MASK, v, 3);
    o[2] = __shfl_sync(FULL_MASK, v, 7);
    o[3] = __shfl_up_sync(FULL_MASK, v, 2);
}

// block_sum over each block's slice of x
extern "C" __global__ void probe_block_sum(float* out, const float* x) {
    __shared__ float scratch[32];
    float t = block_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = t;
}

// reverse n values through dynamic shared memory
extern "C" __global__ void probe_dyn_smem(float* out, const float* x, u32 n) {
    KOJO_DYN_SMEM(float, buf);
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[n - 1 - threadIdx.x];
}

// 2D blocks and grids: each thread writes its coordinates
extern "C" __global__ void probe_2d(u32* out) {
    u32 block = blockIdx.y * gridDim.x + blockIdx.x;
    u32 t = threadIdx.y * blockDim.x + threadIdx.x;
    out[block * blockDim.x * blockDim.y + t] =
        threadIdx.x + 100 * threadIdx.y + 10000 * blockIdx.x + 1000000 * blockIdx.y;
}

// misuse: half the block skips a barrier
extern "C" __global__ void probe_divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// misuse: half a warp skips a full-mask shuffle
extern "C" __global__ void probe_divergent_shuffle(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// the order blocks ran in: out[block] = how many blocks ran before it (counter starts at 0)
extern "C" __global__ void probe_block_order(u32* out, u32* counter) {
    if (threadIdx.x == 0) out[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] = atomicAdd(counter, 1u);
}
