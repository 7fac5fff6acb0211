"""The Llama-family transformer forward pass, written once against the op interface.

Read it top to bottom like llama2.c's `forward`: embed the tokens, then for each layer
attention and MLP, each behind an RMSNorm and added to the residual stream, then the final
norm and the LM head. `ops` is the backend (NumPy, Numba or CuPy); the model calls nothing else
for arithmetic.
"""

import numpy as np

from tinyinfer.config import ModelConfig
from tinyinfer.model.batch import ForwardBatch
from tinyinfer.model.rope import rope_tables
from tinyinfer.model.weights import LayerWeights, ModelWeights


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, ops, dtype=np.float32):
        self.config = config
        self.weights = weights
        self.ops = ops
        self.dtype = np.dtype(dtype)
        rope_cos, rope_sin = rope_tables(config, self.dtype)
        self.rope_cos = ops.to_device(rope_cos)  # [max_context, head_dim // 2]
        self.rope_sin = ops.to_device(rope_sin)

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> np.ndarray:
        """Run the batch's new tokens through the model, extending each sequence's KV cache.

        Returns float32 logits on the host: [num_sequences, vocab] for the last new token of
        each sequence (what generation needs), or [tokens, vocab] for every token when
        all_logits is set (what scoring and perplexity need).
        """
        ops, weights, eps = self.ops, self.weights, self.config.rms_norm_eps
        positions = ops.to_device(batch.positions)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [tokens, head_dim // 2]

        x = ops.embedding(ops.to_device(batch.token_ids), weights.embedding)  # [tokens, hidden]
        for layer_index, layer in enumerate(weights.layers):
            x = self.layer(layer_index, layer, x, cos, sin, batch)
        for chunk in batch.chunks:
            chunk.cache.length = chunk.start + chunk.num_new

        if not all_logits:
            x = x[ops.to_device(batch.last_token_rows)]
        x = ops.rms_norm(x, weights.final_norm, eps)
        logits = ops.matmul(x, weights.lm_head)  # [rows, vocab]
        return ops.to_numpy(logits).astype(np.float32, copy=False)

    def layer(self, layer_index: int, layer: LayerWeights, x, cos, sin, batch: ForwardBatch):
        """One transformer block. x: [tokens, hidden] -> [tokens, hidden]: attention, then the
        MLP, each reading an RMSNorm of the residual stream and adding its output back to it."""
        ops, eps = self.ops, self.config.rms_norm_eps
        h = ops.rms_norm(x, layer.attention_norm, eps)
        x = x + self.attention(layer_index, layer, h, cos, sin, batch)
        h = ops.rms_norm(x, layer.mlp_norm, eps)
        return x + self.mlp(layer, h)

    def attention(self, layer_index: int, layer: LayerWeights, h, cos, sin, batch: ForwardBatch):
        """Multi-head attention with grouped-query heads. h: [tokens, hidden] -> [tokens, hidden].

        The q, k, v projections run on the whole batch at once (one matrix product each); the
        attention itself reads each sequence's own past. The engine's paged cache does that for
        every sequence in one `ops.paged_attention` call; contiguous KVCaches (one sequence,
        teaching, scoring) call `ops.attention` one sequence at a time.
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
        """SwiGLU MLP: down(silu(gate(h)) * up(h)). h: [tokens, hidden] -> [tokens, hidden]."""
        ops = self.ops
        gate = ops.matmul(h, layer.w_gate)  # [tokens, intermediate]
        up = ops.matmul(h, layer.w_up)
        return ops.matmul(ops.silu_mul(gate, up), layer.w_down)
