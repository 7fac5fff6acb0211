"""The Llama-family transformer forward pass, written once against the op interface.

Read it top to bottom like llama2.c's `forward`: embed the tokens, then for each layer
attention and MLP, each behind an RMSNorm and added to the residual stream, then the final
norm and the LM head. `ops` is the backend (NumPy, Numba or CuPy); the model calls nothing else
for arithmetic.

The same class runs one device of a parallel group (tinyinfer/parallel/). Under tensor
parallelism (Megatron-LM) a device holds some of the heads and some of the MLP's columns, so
the output projections o_proj and down_proj give only its partial sum, and `tensor_sum` adds
the partial sums of the group (an all-reduce); the embedding and the LM head hold a slice of
the vocabulary. Under pipeline parallelism a device holds a range of layers: `forward` is
`embed`, `run_layers`, `head`, and a pipeline stage runs only the parts it holds. On one device
`tensor_group` is None and every sum is the device's own.
"""

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.engine.paged_cache import PagedKVPool
from tinyinfer.kv_cache import KVCache
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.rope import rope_tables
from tinyinfer.model.weights import LayerWeights, ModelWeights


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops, dtype=np.float32, tensor_group=None,
                 vocab_start: int = 0):
        """config: the shapes this device computes (on a parallel device its own heads, MLP
        columns and layers: ShardPlan.local_config); tensor_group: the communicator of its
        tensor-parallel group, or None on one device; vocab_start: the first token id of the
        embedding and LM head rows it holds."""
        self.config = config
        self.weights = weights
        self.ops = ops
        self.dtype = np.dtype(dtype)
        self.tensor_group = tensor_group
        self.vocab_start = vocab_start
        rope_cos, rope_sin = rope_tables(config, self.dtype)
        self.rope_cos = ops.to_device(rope_cos)  # [max_context, head_dim // 2]
        self.rope_sin = ops.to_device(rope_sin)

    # ---- the KV caches this device's layers write ------------------------------------------
    def new_kv_cache(self, capacity: int) -> KVCache:
        """A contiguous cache for one sequence of up to `capacity` tokens."""
        return KVCache(self.config, capacity, self.ops, self.dtype)

    def new_paged_pool(self, num_blocks: int, block_size: int) -> PagedKVPool:
        """The engine's block pool."""
        return PagedKVPool(self.config, num_blocks, block_size, self.ops, self.dtype)

    # ---- the forward pass --------------------------------------------------------------------
    steps_in_flight = 1  # forward passes the engine may start before collecting one (a pipeline's stages)

    def submit(self, batch: ForwardBatch) -> np.ndarray:
        """Start a forward pass and return its ticket for `collect`. On one device the pass
        runs at once, so the ticket is its logits; a pipeline (tinyinfer/parallel/driver.py)
        returns before its last stage is done."""
        return self.forward(batch)

    def collect(self, ticket: np.ndarray) -> np.ndarray:
        """The logits of a submitted pass."""
        return ticket

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        """Run the batch's new tokens through the model, extending each sequence's KV cache.

        Returns float32 logits on the host: [num_sequences, vocab] for the last new token of
        each sequence (what generation needs), or [tokens, vocab] for every token when
        all_logits is set (what scoring and perplexity need).
        """
        self.ops.begin_pass()  # the backend sizes its thread team to the cores free now
        x = self.embed(batch)
        x = self.run_layers(x, batch)
        return self.head(x, batch, all_logits)

    def embed(self, batch: ForwardBatch):
        """token ids -> [tokens, hidden]: each token's row of the embedding table. A device that
        holds rows vocab_start .. vocab_start + rows - 1 looks up the tokens it has, gives zeros
        for the others, and the group's sum fills in every row (Megatron's vocab-parallel
        embedding)."""
        ops, table = self.ops, self.weights.embedding
        if self.tensor_group is None:
            return ops.embedding(ops.to_device(batch.token_ids), table)
        local_ids = batch.token_ids - self.vocab_start
        mine = (local_ids >= 0) & (local_ids < table.shape[0])  # [tokens]
        rows = ops.embedding(ops.to_device(np.where(mine, local_ids, 0)), table)
        return self.tensor_sum(rows * ops.to_device(mine[:, None].astype(rows.dtype)))

    def run_layers(self, x, batch: ForwardBatch):
        """x: [tokens, hidden] through every layer this device holds; each sequence's cache then
        counts the new tokens as stored."""
        positions = self.ops.to_device(batch.positions)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [tokens, head_dim // 2]
        for layer_index, layer in enumerate(self.weights.layers):
            x = self.layer(layer_index, layer, x, cos, sin, batch)
        for chunk in batch.chunks:
            chunk.cache.length = chunk.start + chunk.num_new
        return x

    def head(self, x, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        """x: [tokens, hidden] -> float32 host logits of each sequence's last new token (or of
        every token): the final norm and the LM head. A device holding a slice of the
        vocabulary computes its slice of the logits; the group gathers them side by side."""
        ops = self.ops
        if not all_logits:
            x = x[ops.to_device(batch.last_token_rows)]
        logits = ops.to_numpy(self.logits_on_device(x))
        if self.tensor_group is not None:
            logits = self.tensor_group.all_gather(logits, axis=-1)
        return logits.astype(np.float32, copy=False)

    def logits_on_device(self, x):
        """x: [rows, hidden] -> [rows, vocab (this device's slice)], left on the device: the
        final norm and the LM head."""
        x = self.ops.rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)
        return self.ops.matmul(x, self.weights.lm_head)

    def tensor_sum(self, partial):
        """The sum over the tensor-parallel group of each device's partial result (an
        all-reduce); on one device, the result itself."""
        if self.tensor_group is None:
            return partial
        return self.ops.to_device(self.tensor_group.all_reduce(self.ops.to_numpy(partial)))

    def layer(self, layer_index: int, layer: LayerWeights, x, cos, sin, batch: ForwardBatch):
        """One transformer block. x: [tokens, hidden] -> [tokens, hidden]: attention, then the
        MLP, each reading an RMSNorm of the residual stream and adding its output back to it."""
        ops, eps = self.ops, self.config.rms_norm_eps
        h = ops.rms_norm(x, layer.attention_norm, eps)
        x = x + self.tensor_sum(self.attention(layer_index, layer, h, cos, sin, batch))
        h = ops.rms_norm(x, layer.mlp_norm, eps)
        return x + self.tensor_sum(self.mlp(layer, h))

    def attention(self, layer_index: int, layer: LayerWeights, h, cos, sin, batch: ForwardBatch):
        """Multi-head attention with grouped-query heads. h: [tokens, hidden] -> [tokens, hidden].

        The q, k, v projections run on the whole batch at once (one matrix product each); the
        attention itself reads each sequence's own past. The engine's paged cache does that for
        every sequence in one `ops.paged_attention` call; contiguous KVCaches (one sequence,
        teaching, scoring) call `ops.attention` one sequence at a time. Under tensor
        parallelism this device's heads give a partial sum of o_proj's output.
        """
        config, ops = self.config, self.ops
        tokens = h.shape[0]
        q = ops.matmul(h, layer.wq, layer.bq).reshape(tokens, config.num_heads, config.head_dim)
        k = ops.matmul(h, layer.wk, layer.bk).reshape(tokens, config.num_kv_heads, config.head_dim)
        v = ops.matmul(h, layer.wv, layer.bv).reshape(tokens, config.num_kv_heads, config.head_dim)
        if config.qk_norm:  # Qwen3 normalises each head of q and k before the rotation
            q = ops.rms_norm(q, layer.q_norm, config.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, config.rms_norm_eps)
        q = ops.rotary(q, cos, sin)
        k = ops.rotary(k, cos, sin)

        if batch.paged is not None:  # the engine's paged cache: one write and one call for the whole batch
            batch.paged.write(layer_index, k, v)
            out = batch.paged.attention(layer_index, q)
        else:  # contiguous caches, one sequence at a time
            out = ops.zeros(q.shape, q.dtype)  # [tokens, num_heads, head_dim]
            row = 0
            for chunk in batch.chunks:
                rows = slice(row, row + chunk.num_new)
                chunk.cache.write(layer_index, chunk.start, k[rows], v[rows])
                out[rows] = chunk.cache.attention(layer_index, q[rows], chunk.start)
                row += chunk.num_new
        return ops.matmul(out.reshape(tokens, config.num_heads * config.head_dim), layer.wo)

    def mlp(self, layer: LayerWeights, h):
        """SwiGLU MLP: down(silu(gate(h)) * up(h)). h: [tokens, hidden] -> [tokens, hidden]
        (under tensor parallelism, this device's columns' partial sum)."""
        ops = self.ops
        gate = ops.matmul(h, layer.w_gate)  # [tokens, intermediate]
        up = ops.matmul(h, layer.w_up)
        return ops.matmul(ops.silu_mul(gate, up), layer.w_down)
