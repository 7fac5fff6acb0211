// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last axis, as NumpyBackend.rms_norm.
//
// One block per row (a token, or one head of a token for Qwen3's q/k norm). The row is read
// twice: once to sum its squares, once to scale it; both passes stride over the row, thread i
// taking elements i, i + blockDim.x, ..., so neighbouring threads read neighbouring elements
// (coalesced). The sum is kept in float32, so float16 activations cannot overflow it.
#include "common.cuh"

template <typename T>
__device__ void rms_norm(const T* x, const T* weight, T* out, int dim, float eps) {
    const size_t row = (size_t)blockIdx.x * dim;
    float sum_squares = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = to_float(x[row + i]);
        sum_squares += v * v;
    }
    const float rms = sqrtf(block_sum(sum_squares) / dim + eps);  // every thread gets the total
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        out[row + i] = from_float<T>(to_float(x[row + i]) / rms * to_float(weight[i]));
    }
}

// x, out: [rows, dim]; weight: [dim]. Grid: rows blocks; block: a multiple of 32 threads.
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int dim, float eps) {
    rms_norm(x, weight, out, dim, eps);
}

extern "C" __global__ void rms_norm_f16(const f16* x, const f16* weight, f16* out, int dim, float eps) {
    rms_norm(x, weight, out, dim, eps);
}
