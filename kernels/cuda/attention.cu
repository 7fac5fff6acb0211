// Causal grouped-query attention, as NumpyBackend.attention and NumpyBackend.paged_attention.
//
// Query token t, at position start_pos + t, of query head h sees the keys and values of
// positions 0 .. start_pos + t of kv head h / (num_heads / num_kv_heads):
//     out = sum_p softmax_p(q . k_p / sqrt(head_dim)) * v_p
// Keys and values are read in place through a block table: position p lies in block
// table[p / block_size], row p % block_size, of pools [num_blocks, block_size, num_kv_heads,
// head_dim]. A contiguous cache is the case of one block (table [0], block_size its length).
//
// The softmax is computed "online", as flash attention does: the keys are visited once, keeping
// a running max m of the scores, a running sum l of exp(score - m) and a running sum acc of the
// values weighted by exp(score - m); when a new score raises the max, l and acc are rescaled by
// exp(m_old - m_new). At the end, out = acc / l. No [queries, keys] score matrix is stored.
//
// A head's dimensions are spread over the 32 lanes of a warp, lane taking dimensions lane,
// lane + 32, ...; so each lane keeps MAX_HEAD_DIM / 32 accumulators in registers, and a loop over
// them with `d < head_dim` serves any head_dim up to MAX_HEAD_DIM.
//
// kv_write stores a step's new keys and values into the pools, in the same layout.
#include "common.cuh"

#define MAX_HEAD_DIM 256
#define DIMS_PER_LANE (MAX_HEAD_DIM / 32)

struct KVLayout {
    const long long* table;  // [blocks of this sequence]: where each block lies in the pools
    int block_size, num_kv_heads, head_dim;
};

// Where the key (or value) vector of `position`, kv head `kv_head`, starts in its pool.
__device__ __forceinline__ size_t kv_offset(const KVLayout& kv, int position, int kv_head) {
    const size_t block = (size_t)kv.table[position / kv.block_size];
    const size_t row = block * kv.block_size + position % kv.block_size;
    return (row * kv.num_kv_heads + kv_head) * kv.head_dim;
}

// ---- decode: one query token -------------------------------------------------------------------
// Grid: num_heads blocks, one per query head. Block: W warps (blockDim.x = 32 W).
// One query, but up to thousands of keys: the warps split the keys, warp w taking positions
// w, w + W, w + 2W, ... For each key, every lane multiplies its dimensions of q and k, warp_sum
// adds the 32 partial products into the score, and the warp updates its running softmax. Then
// the W partial results (m, l, acc) are merged through shared memory, each rescaled to the
// common max. Dynamic shared memory: W * (head_dim + 2) floats.
template <typename T>
__device__ void attention_decode(const T* q, const T* key_pool, const T* value_pool, KVLayout kv, T* out,
                                 int num_heads, int start_pos, float scale) {
    extern __shared__ float shared[];
    const int head_dim = kv.head_dim;
    const int h = blockIdx.x, kv_head = h / (num_heads / kv.num_kv_heads);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;

    float q_lane[DIMS_PER_LANE];  // this lane's dimensions of the query, q: [1, num_heads, head_dim]
    for (int j = 0; j < DIMS_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        q_lane[j] = d < head_dim ? to_float(q[(size_t)h * head_dim + d]) : 0.0f;
    }
    float m = negative_infinity(), l = 0.0f, acc[DIMS_PER_LANE] = {};
    for (int p = warp; p <= start_pos; p += warps) {  // the query at start_pos sees 0 .. start_pos
        const size_t at = kv_offset(kv, p, kv_head);
        float dot = 0.0f;
        for (int j = 0; j < DIMS_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) dot += q_lane[j] * to_float(key_pool[at + d]);
        }
        const float score = warp_sum(dot) * scale;  // the same in every lane
        const float m_new = fmaxf(m, score);
        const float correction = expf(m - m_new), weight = expf(score - m_new);  // expf(-inf) = 0
        l = l * correction + weight;
        for (int j = 0; j < DIMS_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d < head_dim) acc[j] = acc[j] * correction + weight * to_float(value_pool[at + d]);
        }
        m = m_new;
    }

    // merge the warps: a warp that had no key (fewer keys than warps) has l = 0, acc = 0, m = -inf
    float* warp_m = shared;              // [W]
    float* warp_l = shared + warps;      // [W]
    float* warp_acc = shared + 2 * warps;  // [W, head_dim]
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
    for (int j = 0; j < DIMS_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) warp_acc[warp * head_dim + d] = acc[j];
    }
    __syncthreads();
    float m_all = negative_infinity();
    for (int w = 0; w < warps; ++w) m_all = fmaxf(m_all, warp_m[w]);  // finite: warp 0 saw position 0
    float l_all = 0.0f;
    for (int w = 0; w < warps; ++w) l_all += warp_l[w] * expf(warp_m[w] - m_all);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; ++w) o += warp_acc[w * head_dim + d] * expf(warp_m[w] - m_all);
        out[(size_t)h * head_dim + d] = from_float<T>(o / l_all);
    }
}

// ---- decode for a batch: one query token per sequence, lengths read on the device ---------------------
// Grid: (num_heads, num_seqs); block as attention_decode's, which does the work: block (h, s) is
// query head h of sequence s, with sequence s's query row, block table row and length. Everything
// that changes from one decode step to the next (the lengths, the tables) is read from device
// memory, and the launch does not depend on it: a CUDA graph captured once replays it every step,
// and one launch serves the whole batch. Both kernels call the same attention_decode, so a
// sequence gets the same numbers from either, bit for bit.
// A length of 0 gives zeros (a row with nothing to attend to). The host cannot check the
// lengths against the tables without waiting for the GPU, so a length past its table's
// max_blocks * block_size positions is cut to them: never a read outside the table.
template <typename T>
__device__ void attention_decode_batch(const T* q, const T* key_pool, const T* value_pool,
                                       const long long* block_tables, const long long* context_lens, T* out,
                                       int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks,
                                       float scale) {
    const int s = blockIdx.y;
    const long long capacity = (long long)max_blocks * block_size, length = context_lens[s];
    const int context = (int)(length < capacity ? length : capacity);
    const size_t at = (size_t)s * num_heads * head_dim;  // sequence s's row of q and out
    if (context <= 0) {  // the whole block: every thread read the same length
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            out[at + (size_t)blockIdx.x * head_dim + d] = from_float<T>(0.0f);
        }
        return;
    }
    const KVLayout kv = {block_tables + (size_t)s * max_blocks, block_size, num_kv_heads, head_dim};
    attention_decode(q + at, key_pool, value_pool, kv, out + at, num_heads, context - 1, scale);
}

// ---- storing the new tokens' keys and values --------------------------------------------------------
// k, v: [tokens, num_kv_heads, head_dim] into the pools [num_blocks, block_size, num_kv_heads,
// head_dim] at flat slot slots[t] = block * block_size + row: the pools as [num_slots, row_size]
// with row_size = num_kv_heads * head_dim. One thread per element of k, writing it and the same
// element of v (one launch for both); consecutive threads take consecutive elements of a token's
// row, so reads and writes are coalesced. A slot < 0 is skipped: the padding rows of a batch
// captured as a CUDA graph for more tokens than it has. A slot >= num_slots is skipped too: the
// host cannot check the slots without waiting for the GPU, and a write outside the pools would
// corrupt other memory.
template <typename T>
__device__ void kv_write(const T* k, const T* v, T* key_pool, T* value_pool, const long long* slots, int tokens,
                         int row_size, long long num_slots) {
    const size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= (size_t)tokens * row_size) return;  // the last block may run past the end
    const long long slot = slots[n / row_size];
    if (slot < 0 || slot >= num_slots) return;
    const size_t at = (size_t)slot * row_size + n % row_size;
    key_pool[at] = k[n];
    value_pool[at] = v[n];
}

// ---- prefill: many query tokens ------------------------------------------------------------------
// Grid: (ceil(new_tokens / W), num_heads). Block: W warps; warp w takes query token
// t = blockIdx.x * W + w of head blockIdx.y (the last block's extra warps only help load).
// The block's W queries read the same keys, so keys pass through shared memory in tiles of 32
// positions, each loaded once for all W warps. Within a tile, lane i scores position tile + i (a
// whole dot product over head_dim, reading q and k from shared memory); the warp takes the
// tile's max and sum of exponentials with one warp reduction each, then adds the tile's values
// weighted by the probabilities, lanes over head_dim again, each lane's probability handed
// round by __shfl_sync. Dynamic shared memory: 32 * (head_dim + 1) + W * head_dim floats; the
// +1 pads the key rows so that 32 lanes reading one dimension of 32 rows hit 32 different banks.
template <typename T>
__device__ void attention_prefill(const T* q, const T* key_pool, const T* value_pool, KVLayout kv, T* out,
                                  int new_tokens, int num_heads, int start_pos, float scale) {
    extern __shared__ float shared[];
    const int head_dim = kv.head_dim, key_stride = head_dim + 1;
    const int h = blockIdx.y, kv_head = h / (num_heads / kv.num_kv_heads);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int first = blockIdx.x * warps;  // the block's first query token
    const int t = first + warp;            // this warp's query token
    const int visible = start_pos + t + 1;  // this query sees positions 0 .. start_pos + t
    const int last = first + warps < new_tokens ? first + warps : new_tokens;
    const int block_visible = start_pos + last;  // positions seen by some query of the block
    float* keys = shared;                        // [32, head_dim + 1]
    float* queries = shared + 32 * key_stride;   // [W, head_dim], q: [new_tokens, num_heads, head_dim]

    for (int i = threadIdx.x; i < warps * head_dim; i += blockDim.x) {
        const int token = first + i / head_dim;
        queries[i] = token < new_tokens ? to_float(q[((size_t)token * num_heads + h) * head_dim + i % head_dim]) : 0.0f;
    }
    float m = negative_infinity(), l = 0.0f, acc[DIMS_PER_LANE] = {};
    for (int tile = 0; tile < block_visible; tile += 32) {
        __syncthreads();  // the queries are written; no warp still reads the previous tile
        for (int i = threadIdx.x; i < 32 * head_dim; i += blockDim.x) {
            const int row = i / head_dim, d = i % head_dim, p = tile + row;
            keys[row * key_stride + d] = p < block_visible ? to_float(key_pool[kv_offset(kv, p, kv_head) + d]) : 0.0f;
        }
        __syncthreads();
        // The whole warp skips a tile its query cannot see (or has no query), but still comes
        // round to the barriers above: every thread of a block must reach each __syncthreads.
        if (t >= new_tokens || tile >= visible) continue;

        const int p = tile + lane;
        float score = negative_infinity();  // a position in this query's future gets weight 0
        if (p < visible) {
            float dot = 0.0f;
            for (int d = 0; d < head_dim; ++d) dot += queries[warp * head_dim + d] * keys[lane * key_stride + d];
            score = dot * scale;
        }
        const float m_new = fmaxf(m, warp_max(score));  // finite: position `tile` is visible
        const float correction = expf(m - m_new), weight = expf(score - m_new);
        l = l * correction + warp_sum(weight);
        for (int j = 0; j < DIMS_PER_LANE; ++j) acc[j] *= correction;
        const int count = visible - tile < 32 ? visible - tile : 32;  // visible positions in the tile
        for (int i = 0; i < count; ++i) {
            const float w = __shfl_sync(0xffffffffu, weight, i);  // lane i's probability, to all lanes
            const size_t at = kv_offset(kv, tile + i, kv_head);
            for (int j = 0; j < DIMS_PER_LANE; ++j) {
                const int d = lane + 32 * j;
                if (d < head_dim) acc[j] += w * to_float(value_pool[at + d]);
            }
        }
        m = m_new;
    }
    if (t >= new_tokens) return;
    for (int j = 0; j < DIMS_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) out[((size_t)t * num_heads + h) * head_dim + d] = from_float<T>(acc[j] / l);
    }
}

// q, out: [new_tokens, num_heads, head_dim]; key_pool, value_pool: [num_blocks, block_size,
// num_kv_heads, head_dim]; block_table: [blocks] int64; scale = 1 / sqrt(head_dim).
extern "C" __global__ void attention_decode_f32(const float* q, const float* key_pool, const float* value_pool,
                                                const long long* block_table, float* out, int num_heads,
                                                int num_kv_heads, int head_dim, int block_size, int start_pos,
                                                float scale) {
    const KVLayout kv = {block_table, block_size, num_kv_heads, head_dim};
    attention_decode(q, key_pool, value_pool, kv, out, num_heads, start_pos, scale);
}

extern "C" __global__ void attention_decode_f16(const f16* q, const f16* key_pool, const f16* value_pool,
                                                const long long* block_table, f16* out, int num_heads,
                                                int num_kv_heads, int head_dim, int block_size, int start_pos,
                                                float scale) {
    const KVLayout kv = {block_table, block_size, num_kv_heads, head_dim};
    attention_decode(q, key_pool, value_pool, kv, out, num_heads, start_pos, scale);
}

extern "C" __global__ void attention_prefill_f32(const float* q, const float* key_pool, const float* value_pool,
                                                 const long long* block_table, float* out, int new_tokens,
                                                 int num_heads, int num_kv_heads, int head_dim, int block_size,
                                                 int start_pos, float scale) {
    const KVLayout kv = {block_table, block_size, num_kv_heads, head_dim};
    attention_prefill(q, key_pool, value_pool, kv, out, new_tokens, num_heads, start_pos, scale);
}

extern "C" __global__ void attention_prefill_f16(const f16* q, const f16* key_pool, const f16* value_pool,
                                                 const long long* block_table, f16* out, int new_tokens,
                                                 int num_heads, int num_kv_heads, int head_dim, int block_size,
                                                 int start_pos, float scale) {
    const KVLayout kv = {block_table, block_size, num_kv_heads, head_dim};
    attention_prefill(q, key_pool, value_pool, kv, out, new_tokens, num_heads, start_pos, scale);
}

// q, out: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int64;
// context_lens: [num_seqs] int64 (as the tables: a captured step keeps all its inputs in one
// int64 buffer), the keys each query attends to (its own included).
extern "C" __global__ void attention_decode_batch_f32(const float* q, const float* key_pool, const float* value_pool,
                                                      const long long* block_tables, const long long* context_lens,
                                                      float* out, int num_heads, int num_kv_heads, int head_dim,
                                                      int block_size, int max_blocks, float scale) {
    attention_decode_batch(q, key_pool, value_pool, block_tables, context_lens, out, num_heads, num_kv_heads, head_dim,
                           block_size, max_blocks, scale);
}

extern "C" __global__ void attention_decode_batch_f16(const f16* q, const f16* key_pool, const f16* value_pool,
                                                      const long long* block_tables, const long long* context_lens,
                                                      f16* out, int num_heads, int num_kv_heads, int head_dim,
                                                      int block_size, int max_blocks, float scale) {
    attention_decode_batch(q, key_pool, value_pool, block_tables, context_lens, out, num_heads, num_kv_heads, head_dim,
                           block_size, max_blocks, scale);
}

// k, v: [tokens, row_size]; key_pool, value_pool: [num_slots, row_size]; slots: [tokens] int64.
extern "C" __global__ void kv_write_f32(const float* k, const float* v, float* key_pool, float* value_pool,
                                        const long long* slots, int tokens, int row_size, long long num_slots) {
    kv_write(k, v, key_pool, value_pool, slots, tokens, row_size, num_slots);
}

extern "C" __global__ void kv_write_f16(const f16* k, const f16* v, f16* key_pool, f16* value_pool,
                                        const long long* slots, int tokens, int row_size, long long num_slots) {
    kv_write(k, v, key_pool, value_pool, slots, tokens, row_size, num_slots);
}
