// y = x @ w.T with w stored as Q8_0 blocks, as NumpyBackend.quantized_matmul: values int8
// [out, in], scales float32 [out, in / 32], w[o, i] = values[o, i] * scales[o, i / 32]. The
// matrix is never rebuilt in memory: the kernels read its int8 values and scales, 1.125 bytes per
// weight (the point of int8 storage), and accumulate in float32.
#include "common.cuh"

#define Q8_BLOCK 32  // weights per scale
#define Q8_TILE 16   // q8_matmul's tile: 16 tokens x 16 outputs per block of 16 x 16 threads

// Byte k (k = 0 at the lowest address) of a 32-bit word, as the signed int8 stored there.
__device__ __forceinline__ float int8_at(int word, int k) { return (float)(signed char)(word >> (8 * k)); }

// ---- few tokens (decode): one warp per output ---------------------------------------------------
// Grid: (ceil(out / W), tokens); block: W warps. Warp w of block (bx, t) computes y[t, o] for
// o = bx * W + w: the dot product of weight row o with x row t. Each lane loads 4 int8 weights
// with one 32-bit read, so a warp reads 128 consecutive bytes (4 Q8 blocks) per step, coalesced;
// the 4 lie in one Q8 block (in is a multiple of 32) and share its scale. Decode is bound by
// these weight reads; x is small and stays in cache.
template <typename T>
__device__ void q8_matvec(const T* x, const signed char* values, const float* scales, T* y, int in, int out) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int o = blockIdx.x * warps + threadIdx.x / 32, t = blockIdx.y;
    if (o >= out) return;  // the whole warp: the last block may run past the last row
    const T* x_row = x + (size_t)t * in;
    const signed char* w_row = values + (size_t)o * in;  // 4-byte aligned: in is a multiple of 32
    const float* s_row = scales + (size_t)o * (in / Q8_BLOCK);
    float sum = 0.0f;
    for (int i = 4 * lane; i < in; i += 4 * 32) {
        const int word = *reinterpret_cast<const int*>(w_row + i);  // weights i .. i + 3
        const float dot = to_float(x_row[i]) * int8_at(word, 0) + to_float(x_row[i + 1]) * int8_at(word, 1) +
                          to_float(x_row[i + 2]) * int8_at(word, 2) + to_float(x_row[i + 3]) * int8_at(word, 3);
        sum += dot * s_row[i / Q8_BLOCK];
    }
    sum = warp_sum(sum);
    if (lane == 0) y[(size_t)t * out + o] = from_float<T>(sum);
}

// ---- many tokens (prefill): shared-memory tiles --------------------------------------------------
// Grid: (ceil(out / 16), ceil(tokens / 16)); block: 16 x 16 threads, thread (tx, ty) computing
// y[t, o] for t = blockIdx.y * 16 + ty, o = blockIdx.x * 16 + tx. The `in` axis is walked one
// Q8 block (32 weights) at a time: the 256 threads load a 16 x 32 tile of x and a 16 x 32 tile of
// weights, dequantized with their row's scale for this block, into shared memory; after a barrier
// each thread does 32 multiply-adds from there. So each weight is read from global memory once
// per 16 tokens instead of once per token. (Rows are padded to 33 floats: the 16 threads of a
// half-warp read 16 different rows of w_tile at one column, in 16 different banks.)
template <typename T>
__device__ void q8_matmul(const T* x, const signed char* values, const float* scales, T* y, int tokens, int in,
                          int out) {
    __shared__ float x_tile[Q8_TILE][Q8_BLOCK + 1];
    __shared__ float w_tile[Q8_TILE][Q8_BLOCK + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, thread = ty * Q8_TILE + tx;
    const int t = blockIdx.y * Q8_TILE + ty, o = blockIdx.x * Q8_TILE + tx;
    float sum = 0.0f;
    for (int k = 0; k < in; k += Q8_BLOCK) {
        for (int i = thread; i < Q8_TILE * Q8_BLOCK; i += Q8_TILE * Q8_TILE) {  // 2 elements per thread
            const int row = i / Q8_BLOCK, col = i % Q8_BLOCK;
            const int x_token = blockIdx.y * Q8_TILE + row, w_out = blockIdx.x * Q8_TILE + row;
            x_tile[row][col] = x_token < tokens ? to_float(x[(size_t)x_token * in + k + col]) : 0.0f;
            w_tile[row][col] = w_out < out ? values[(size_t)w_out * in + k + col] *
                                                 scales[(size_t)w_out * (in / Q8_BLOCK) + k / Q8_BLOCK]
                                           : 0.0f;
        }
        __syncthreads();
        for (int col = 0; col < Q8_BLOCK; ++col) sum += x_tile[ty][col] * w_tile[tx][col];
        __syncthreads();  // before the next step overwrites the tiles
    }
    if (t < tokens && o < out) y[(size_t)t * out + o] = from_float<T>(sum);
}

// x: [tokens, in]; values: [out, in] int8; scales: [out, in / 32]; y: [tokens, out]; in % 32 == 0.
extern "C" __global__ void q8_matvec_f32(const float* x, const signed char* values, const float* scales, float* y,
                                         int in, int out) {
    q8_matvec(x, values, scales, y, in, out);
}

extern "C" __global__ void q8_matvec_f16(const f16* x, const signed char* values, const float* scales, f16* y,
                                         int in, int out) {
    q8_matvec(x, values, scales, y, in, out);
}

extern "C" __global__ void q8_matmul_f32(const float* x, const signed char* values, const float* scales, float* y,
                                         int tokens, int in, int out) {
    q8_matmul(x, values, scales, y, tokens, in, out);
}

extern "C" __global__ void q8_matmul_f16(const f16* x, const signed char* values, const float* scales, f16* y,
                                         int tokens, int in, int out) {
    q8_matmul(x, values, scales, y, tokens, in, out);
}
