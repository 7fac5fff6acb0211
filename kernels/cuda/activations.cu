// SwiGLU's gating and the softmax, as NumpyBackend.silu_mul and NumpyBackend.softmax.
#include "common.cuh"

// silu(gate) * up, elementwise: one thread per element, n elements in all. For very negative
// gate, expf(-g) is inf and g / inf is -0: the right limit, as in NumPy.
template <typename T>
__device__ void silu_mul(const T* gate, const T* up, T* out, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;  // the last block may run past the end
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.0f + expf(-g)) * to_float(up[i]));
}

// Softmax over the last axis: one block per row of `width` elements. Three passes over the row,
// each thread striding by blockDim.x: the row's max (subtracted so expf cannot overflow), the
// sum of the exponentials, and the normalised output. Everything in float32.
template <typename T>
__device__ void softmax(const T* x, T* out, int width) {
    const size_t row = (size_t)blockIdx.x * width;
    float m = negative_infinity();
    for (int i = threadIdx.x; i < width; i += blockDim.x) m = fmaxf(m, to_float(x[row + i]));
    m = block_max(m);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += expf(to_float(x[row + i]) - m);
    sum = block_sum(sum);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        out[row + i] = from_float<T>(expf(to_float(x[row + i]) - m) / sum);
    }
}

// gate, up, out: n elements (any shape). Grid: enough blocks of any size to cover n.
extern "C" __global__ void silu_mul_f32(const float* gate, const float* up, float* out, size_t n) {
    silu_mul(gate, up, out, n);
}

extern "C" __global__ void silu_mul_f16(const f16* gate, const f16* up, f16* out, size_t n) {
    silu_mul(gate, up, out, n);
}

// x, out: [rows, width]. Grid: rows blocks; block: a multiple of 32 threads.
extern "C" __global__ void softmax_f32(const float* x, float* out, int width) { softmax(x, out, width); }

extern "C" __global__ void softmax_f16(const f16* x, f16* out, int width) { softmax(x, out, width); }
