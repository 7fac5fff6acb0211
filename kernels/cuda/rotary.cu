// Rotary position embedding, Hugging Face pairing ("rotate half"), as NumpyBackend.rotary:
// dimension i of a head is paired with i + head_dim/2, and the pair (a, b) is rotated by the
// token's angle for i: (a cos - b sin, b cos + a sin).
//
// One thread per pair: tokens * heads * head_dim/2 threads in all, in blocks of any size. Thread
// n takes pair i = n % half of head n / half; consecutive threads take consecutive pairs of a
// head, so their reads of x, cos and sin are coalesced.
#include "common.cuh"

template <typename T>
__device__ void rotary(const T* x, const T* cosines, const T* sines, T* out, int tokens, int heads, int half) {
    const size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= (size_t)tokens * heads * half) return;  // the last block may run past the end
    const size_t i = n % half, head = n / half;       // head counts (token, head) pairs
    const size_t token = head / heads;
    const size_t a_at = head * 2 * half + i, b_at = a_at + half;  // x is [tokens, heads, 2 * half]
    const float a = to_float(x[a_at]), b = to_float(x[b_at]);
    const float c = to_float(cosines[token * half + i]), s = to_float(sines[token * half + i]);
    out[a_at] = from_float<T>(a * c - b * s);
    out[b_at] = from_float<T>(b * c + a * s);
}

// x, out: [tokens, heads, 2 * half]; cosines, sines: [tokens, half], the angles' cos and sin.
extern "C" __global__ void rotary_f32(const float* x, const float* cosines, const float* sines, float* out,
                                      int tokens, int heads, int half) {
    rotary(x, cosines, sines, out, tokens, heads, half);
}

extern "C" __global__ void rotary_f16(const f16* x, const f16* cosines, const f16* sines, f16* out,
                                      int tokens, int heads, int half) {
    rotary(x, cosines, sines, out, tokens, heads, half);
}
