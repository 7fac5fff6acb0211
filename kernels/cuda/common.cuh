// What every kernel file shares: a float16 type, conversions to and from float32, and sums and
// maxima across a warp and across a block.
//
// The kernels include no CUDA header. NVRTC (which CuPy uses to compile them at run time) finds
// no header that is not on its include path, and CUDA 12.2+ made cuda_fp16.h depend on several
// others; so float16 here is its 16 raw bits, converted by the same PTX instructions that
// cuda_fp16.h's __half2float / __float2half use. All arithmetic happens in float32.
#pragma once

// A float16 value as it lies in memory (IEEE binary16). A struct, not a bare unsigned short, so
// that it cannot be mistaken for an integer and so that to_float() can overload on it.
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));  // exact: every float16 is a float32
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float x);

template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));  // round to nearest even, as NumPy
    return h;
}

// -infinity, the start of a running maximum (INFINITY would need math.h).
__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// ---- reductions -------------------------------------------------------------------------------
// A warp is 32 threads that run in lockstep. __shfl_xor_sync(mask, v, k) hands each thread the
// v of the thread whose lane number differs in bit k; after the 5 steps (k = 16, 8, 4, 2, 1)
// every lane holds the sum (or max) of all 32 values, with no shared memory and no barrier.
// All 32 lanes must call these.
__device__ __forceinline__ float warp_sum(float v) {
    for (int k = 16; k > 0; k /= 2) v += __shfl_xor_sync(0xffffffffu, v, k);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int k = 16; k > 0; k /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, k));
    return v;
}

// Across a block (blockDim.x a multiple of 32, at most 1024 threads): each warp reduces its own
// values, lane 0 of each puts its result in shared memory, then every warp reduces those
// (at most 32) partial results, so every thread returns the block's total. Every thread of the
// block must call it. The first barrier lets a second call reuse `partial` safely.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? partial[lane] : negative_infinity());
}
