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

// ---- wide loads ---------------------------------------------------------------------------------
// A warp streams memory fastest when each lane reads 16 bytes with one instruction (a 128-bit
// load: 512 consecutive bytes per warp). load_floats<N>(p, out) reads the N consecutive values
// at p with as few such loads as N allows (16 bytes, or 8 for 4 float16) and widens them to
// float32; N = 1, or any N that is not a whole number of 8- or 16-byte loads, reads one value
// at a time. p must be aligned to the bytes of one load (the backend allocates with CuPy, whose
// arrays start at multiples of 256 bytes, and copies an array that does not start at 16).
struct alignas(16) Bytes16 {
    unsigned int word[4];
};

struct alignas(8) Bytes8 {
    unsigned int word[2];
};

// The two float16 values in a 32-bit word: the lower address is the low half (little-endian).
__device__ __forceinline__ float low_half(unsigned int word) { return to_float(f16{(unsigned short)(word & 0xffffu)}); }

__device__ __forceinline__ float high_half(unsigned int word) { return to_float(f16{(unsigned short)(word >> 16)}); }

template <int N> __device__ __forceinline__ void load_floats(const float* p, float* out) {
    if (N % 4 == 0) {
        for (int i = 0; i < N; i += 4) {
            const Bytes16 v = *reinterpret_cast<const Bytes16*>(p + i);
            for (int k = 0; k < 4; ++k) out[i + k] = __uint_as_float(v.word[k]);
        }
    } else {
        for (int i = 0; i < N; ++i) out[i] = p[i];
    }
}

template <int N> __device__ __forceinline__ void load_floats(const f16* p, float* out) {
    if (N % 8 == 0) {
        for (int i = 0; i < N; i += 8) {
            const Bytes16 v = *reinterpret_cast<const Bytes16*>(p + i);
            for (int k = 0; k < 4; ++k) {
                out[i + 2 * k] = low_half(v.word[k]);
                out[i + 2 * k + 1] = high_half(v.word[k]);
            }
        }
    } else if (N == 4) {
        const Bytes8 v = *reinterpret_cast<const Bytes8*>(p);
        for (int k = 0; k < 2; ++k) {
            out[2 * k] = low_half(v.word[k]);
            out[2 * k + 1] = high_half(v.word[k]);
        }
    } else {
        for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
    }
}

// ---- decode matrix products --------------------------------------------------------------------
// matvec.cu and quantized.cu's q8_matvec: one warp per output row, each weight it loads used for
// MATVEC_ROWS token rows at once (one float32 accumulator per row in each lane's registers); a
// call of more rows runs ceil(tokens / MATVEC_ROWS) groups, each loading the weights again
// (mostly from L2: see matvec_work). Each lane loads MATVEC_UNROLL chunks of its row before it
// uses the first, so that enough bytes are in flight to keep HBM busy (a load from HBM takes
// several hundred nanoseconds to come back).
#define MATVEC_ROWS 8
#define MATVEC_UNROLL 4

// Which output row and which group of token rows warp `threadIdx.x / 32` of this block takes.
// Grid: ceil(out / W) * groups blocks in one dimension, the groups of one set of W output rows
// side by side (blockIdx.x = output block * groups + group): blocks run roughly in the order of
// their index, so the groups that read the same weight rows run at about the same time and all
// but the first find the rows in L2 instead of HBM.
struct MatvecWork {
    int o;      // the output row (o >= out: none; the last block may run past the last row)
    int first;  // the group's first token row
    int rows;   // its rows: MATVEC_ROWS, or fewer in the last group
};

__device__ __forceinline__ MatvecWork matvec_work(int tokens) {
    const int groups = (tokens + MATVEC_ROWS - 1) / MATVEC_ROWS, warps = blockDim.x / 32;
    const int group = blockIdx.x % groups, first = group * MATVEC_ROWS;
    const MatvecWork work = {(int)(blockIdx.x / groups) * warps + (int)threadIdx.x / 32, first,
                             tokens - first < MATVEC_ROWS ? tokens - first : MATVEC_ROWS};
    return work;
}
