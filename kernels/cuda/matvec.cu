// y = x @ w.T for decode, as NumpyBackend.matmul with float weights: x [tokens, in] activations
// (float32 or float16), w [out, in] weights stored in float32 (matvec_wf32) or in float16
// (matvec_wf16: read as they lie, 2 bytes a weight, never widened into a copy), y [tokens, out].
// The backend sends 1 .. DECODE_MAX_ROWS token rows here (decode) and more to cuBLAS (prefill).
//
// A decode step reads every weight once and does 2 flops with it per token: it is bound by
// reading memory, not by arithmetic. So these kernels are built to stream w once, at the
// bandwidth of HBM:
// - One warp per output row o. Its 32 lanes read the row in chunks of 16 bytes (4 float32 or 8
//   float16 weights, one 128-bit load), lane taking chunks lane, lane + 32, lane + 64, ...: the
//   warp reads 512 consecutive bytes per step, coalesced. Each lane issues MATVEC_UNROLL loads
//   before it uses the first, so that enough bytes are in flight to cover the latency of HBM.
// - Each weight, once in registers, serves a group of up to MATVEC_ROWS = 8 token rows: the
//   lane keeps one float32 accumulator per row. x is small (64 rows of 4096 float32 are 1 MB)
//   and every warp reads it from cache.
// - At the end warp_sum adds up the 32 lanes' partial sums of each row.
// A row whose `in` is not a multiple of the chunk (4 float32, 8 float16 weights) does not start
// at a multiple of 16 bytes; then the lanes read one weight at a time (lane, lane + 32, ...),
// slower but any shape works.
//
// Row t's result must not depend on how many rows the call has: a decode step captured as a
// CUDA graph for 4 sequences is replayed for 3 and a padding row, and must give the logits
// of the step run op by op, bit for bit. So each lane adds its products in one fixed order
// (its chunks in turn, each chunk's weights in turn, as explicit fmaf so that no choice of the
// compiler to fuse or not can differ between row counts), the lanes are summed in one fixed
// order, and both depend only on `in`: not on the number of rows, nor on the row's place in
// its group.
#include "common.cuh"

#define DECODE_MAX_ROWS 64  // the most token rows the backend sends here (the kernels take any number)

// The ROWS token rows of x starting at x (rows `in` apart) times weight row w_row (in weights),
// into y[r * out] for r < ROWS; V weights per chunk (16 bytes' worth, or 1). ROWS is a template
// argument so that acc[] lives in registers (an array indexed by a run-time value would go to
// local memory, which is as slow as HBM).
template <int ROWS, int V, typename T, typename W>
__device__ __forceinline__ void matvec_rows(const T* __restrict__ x, const W* __restrict__ w_row, T* __restrict__ y,
                                            int in, int out) {
    const int lane = threadIdx.x % 32, chunks = in / V;
    float acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    for (int c = lane; c < chunks; c += 32 * MATVEC_UNROLL) {
        float w[MATVEC_UNROLL][V];  // chunks c, c + 32, c + 64, ... of the weight row
#pragma unroll
        for (int u = 0; u < MATVEC_UNROLL; ++u) {
            if (c + 32 * u < chunks) load_floats<V>(w_row + (size_t)(c + 32 * u) * V, w[u]);
        }
#pragma unroll
        for (int u = 0; u < MATVEC_UNROLL; ++u) {
            if (c + 32 * u >= chunks) break;
            for (int r = 0; r < ROWS; ++r) {
                float xs[V];
                load_floats<V>(x + (size_t)r * in + (size_t)(c + 32 * u) * V, xs);
                for (int k = 0; k < V; ++k) acc[r] = fmaf(xs[k], w[u][k], acc[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        const float sum = warp_sum(acc[r]);  // every lane gets it; lane r writes it
        if (lane == r) y[(size_t)r * out] = from_float<T>(sum);
    }
}

// A group's `rows` (1 .. MATVEC_ROWS) as a template argument. The same row gets the same
// arithmetic from each case: only how many rows share the weight loads differs.
template <int V, typename T, typename W>
__device__ __forceinline__ void matvec_group(int rows, const T* x, const W* w_row, T* y, int in, int out) {
    switch (rows) {
        case 1: matvec_rows<1, V>(x, w_row, y, in, out); break;
        case 2: matvec_rows<2, V>(x, w_row, y, in, out); break;
        case 3: matvec_rows<3, V>(x, w_row, y, in, out); break;
        case 4: matvec_rows<4, V>(x, w_row, y, in, out); break;
        case 5: matvec_rows<5, V>(x, w_row, y, in, out); break;
        case 6: matvec_rows<6, V>(x, w_row, y, in, out); break;
        case 7: matvec_rows<7, V>(x, w_row, y, in, out); break;
        default: matvec_rows<MATVEC_ROWS, V>(x, w_row, y, in, out); break;
    }
}

// Grid and block as matvec_work (common.cuh) says: W warps a block, one output row each.
template <typename T, typename W>
__device__ void matvec(const T* x, const W* w, T* y, int tokens, int in, int out) {
    const MatvecWork work = matvec_work(tokens);
    if (work.o >= out) return;  // the whole warp
    const T* x_rows = x + (size_t)work.first * in;
    const W* w_row = w + (size_t)work.o * in;
    T* y_at = y + (size_t)work.first * out + work.o;
    constexpr int V = 16 / sizeof(W);  // weights per 16-byte chunk
    if (in % V == 0) {
        matvec_group<V>(work.rows, x_rows, w_row, y_at, in, out);
    } else {
        matvec_group<1>(work.rows, x_rows, w_row, y_at, in, out);
    }
}

// x: [tokens, in]; w: [out, in]; y: [tokens, out]; x and w start at multiples of 16 bytes.
extern "C" __global__ void matvec_wf32_f32(const float* x, const float* w, float* y, int tokens, int in, int out) {
    matvec(x, w, y, tokens, in, out);
}

extern "C" __global__ void matvec_wf32_f16(const f16* x, const float* w, f16* y, int tokens, int in, int out) {
    matvec(x, w, y, tokens, in, out);
}

extern "C" __global__ void matvec_wf16_f32(const float* x, const f16* w, float* y, int tokens, int in, int out) {
    matvec(x, w, y, tokens, in, out);
}

extern "C" __global__ void matvec_wf16_f16(const f16* x, const f16* w, f16* y, int tokens, int in, int out) {
    matvec(x, w, y, tokens, in, out);
}
