// y = x @ w.T with w stored as Q8_0 blocks, as NumpyBackend.quantized_matmul: values int8
// [out, in], scales float32 [out, in / 32], w[o, i] = values[o, i] * scales[o, i / 32]. The
// matrix is never rebuilt in memory: the kernels read its int8 values and scales, 1.125 bytes per
// weight (the point of int8 storage), and accumulate in float32.
#include "common.cuh"

#define Q8_BLOCK 32  // weights per scale
#define Q8_TILE 16   // q8_matmul's tile: 16 tokens x 16 outputs per block of 16 x 16 threads

// Byte k (k = 0 at the lowest address) of a 32-bit word, as the signed int8 stored there.
__device__ __forceinline__ float int8_at(unsigned int word, int k) { return (float)(signed char)(word >> (8 * k)); }

// ---- few tokens (decode, 1 .. DECODE_MAX_ROWS): one warp per output -----------------------------
// As matvec.cu's kernels, whose comments say why (and common.cuh's matvec_work, the grid): warp
// per output row o, each weight it loads serving a group of up to MATVEC_ROWS token rows, row t's
// arithmetic the same whatever the number of rows. Each lane loads 16 int8 weights with one
// 128-bit read, so a warp reads 512 consecutive bytes (16 Q8 blocks) per step, coalesced; the 16
// lie in one Q8 block (in is a multiple of 32, and a chunk starts at a multiple of 16) and share
// its scale: the lane sums the chunk's 16 products, then multiplies the sum by the scale once.
// Decode is bound by these weight reads (1.125 bytes a weight); x is small and stays in cache.
template <int ROWS, typename T>
__device__ __forceinline__ void q8_matvec_rows(const T* __restrict__ x, const signed char* __restrict__ w_row,
                                               const float* __restrict__ s_row, T* __restrict__ y, int in, int out) {
    const int lane = threadIdx.x % 32, chunks = in / 16;
    float acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    for (int c = lane; c < chunks; c += 32 * MATVEC_UNROLL) {
        Bytes16 w[MATVEC_UNROLL];  // chunks c, c + 32, c + 64, ...: weights 16c .. 16c + 15, and so on
        float scale[MATVEC_UNROLL];
#pragma unroll
        for (int u = 0; u < MATVEC_UNROLL; ++u) {
            if (c + 32 * u < chunks) {
                w[u] = *reinterpret_cast<const Bytes16*>(w_row + (size_t)(c + 32 * u) * 16);
                scale[u] = s_row[(c + 32 * u) / 2];  // 2 chunks per Q8 block
            }
        }
#pragma unroll
        for (int u = 0; u < MATVEC_UNROLL; ++u) {
            if (c + 32 * u >= chunks) break;
            float ws[16];
            for (int k = 0; k < 16; ++k) ws[k] = int8_at(w[u].word[k / 4], k % 4);
            for (int r = 0; r < ROWS; ++r) {
                float xs[16];
                load_floats<16>(x + (size_t)r * in + (size_t)(c + 32 * u) * 16, xs);
                float dot = 0.0f;
                for (int k = 0; k < 16; ++k) dot = fmaf(xs[k], ws[k], dot);
                acc[r] = fmaf(dot, scale[u], acc[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        const float sum = warp_sum(acc[r]);  // every lane gets it; lane r writes it
        if (lane == r) y[(size_t)r * out] = from_float<T>(sum);
    }
}

template <typename T>
__device__ void q8_matvec(const T* x, const signed char* values, const float* scales, T* y, int tokens, int in,
                          int out) {
    const MatvecWork work = matvec_work(tokens);
    if (work.o >= out) return;  // the whole warp: the last block may run past the last row
    const T* x_rows = x + (size_t)work.first * in;
    const signed char* w_row = values + (size_t)work.o * in;  // 16-byte aligned: in is a multiple of 32
    const float* s_row = scales + (size_t)work.o * (in / Q8_BLOCK);
    T* y_at = y + (size_t)work.first * out + work.o;
    switch (work.rows) {  // as a template argument, so that acc[] lives in registers
        case 1: q8_matvec_rows<1>(x_rows, w_row, s_row, y_at, in, out); break;
        case 2: q8_matvec_rows<2>(x_rows, w_row, s_row, y_at, in, out); break;
        case 3: q8_matvec_rows<3>(x_rows, w_row, s_row, y_at, in, out); break;
        case 4: q8_matvec_rows<4>(x_rows, w_row, s_row, y_at, in, out); break;
        case 5: q8_matvec_rows<5>(x_rows, w_row, s_row, y_at, in, out); break;
        case 6: q8_matvec_rows<6>(x_rows, w_row, s_row, y_at, in, out); break;
        case 7: q8_matvec_rows<7>(x_rows, w_row, s_row, y_at, in, out); break;
        default: q8_matvec_rows<MATVEC_ROWS>(x_rows, w_row, s_row, y_at, in, out); break;
    }
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

// x: [tokens, in]; values: [out, in] int8; scales: [out, in / 32]; y: [tokens, out]; in % 32 == 0;
// x and values start at multiples of 16 bytes.
extern "C" __global__ void q8_matvec_f32(const float* x, const signed char* values, const float* scales, float* y,
                                         int tokens, int in, int out) {
    q8_matvec(x, values, scales, y, tokens, in, out);
}

extern "C" __global__ void q8_matvec_f16(const f16* x, const signed char* values, const float* scales, f16* y,
                                         int tokens, int in, int out) {
    q8_matvec(x, values, scales, y, tokens, in, out);
}

extern "C" __global__ void q8_matmul_f32(const float* x, const signed char* values, const float* scales, float* y,
                                         int tokens, int in, int out) {
    q8_matmul(x, values, scales, y, tokens, in, out);
}

extern "C" __global__ void q8_matmul_f16(const f16* x, const signed char* values, const float* scales, f16* y,
                                         int tokens, int in, int out) {
    q8_matmul(x, values, scales, y, tokens, in, out);
}
