"""The contiguous KV cache: one sequence's keys and values, kept so decode never recomputes them.

Without a cache, generating token t means re-running the whole prefix of t tokens. With it,
each step computes k and v for the one new token, appends them, and attends over the stored
ones. This is the teaching layout: one contiguous [capacity, num_kv_heads, head_dim] array
per layer, allocated for the sequence's whole length up front. (The paged cache of the
serving engine splits the same thing into fixed-size blocks.)
"""

from tinyinfer.config import ModelConfig


class KVCache:
    """Keys and values of one sequence, for every layer.

    keys[layer], values[layer]: [capacity, num_kv_heads, head_dim]; rows 0 .. length-1 hold
    the tokens seen so far.
    """

    def __init__(self, config: ModelConfig, capacity: int, backend, dtype):
        self.config, self.backend, self.dtype = config, backend, dtype
        self.length = 0
        self.keys = [self._empty(capacity) for _ in range(config.num_layers)]
        self.values = [self._empty(capacity) for _ in range(config.num_layers)]

    def _empty(self, capacity: int):
        return self.backend.zeros((capacity, self.config.num_kv_heads, self.config.head_dim), self.dtype)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, capacity: int):
        """Grow to hold `capacity` tokens, keeping what is stored (a chat grows turn by turn)."""
        if capacity <= self.capacity:
            return
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                store[layer] = self._empty(capacity)
                store[layer][: self.length] = old[: self.length]

    def write(self, layer: int, start: int, k, v):
        """Store k, v: [new_tokens, num_kv_heads, head_dim] at rows start .. start+new_tokens-1."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"KV cache is full: {end} tokens do not fit its {self.capacity} rows")
        self.keys[layer][start:end] = k
        self.values[layer][start:end] = v

    def read(self, layer: int, end: int):
        """Keys and values of rows 0 .. end-1: two [end, num_kv_heads, head_dim] views."""
        return self.keys[layer][:end], self.values[layer][:end]

    def attention(self, layer: int, q, start: int):
        """Attention of q: [new_tokens, num_heads, head_dim] (positions start, ...) over every
        key and value stored so far, including the new ones just written."""
        keys, values = self.read(layer, start + q.shape[0])
        return self.backend.attention(q, keys, values, start)

    def truncate(self, length: int):
        """Forget everything after the first `length` tokens (a chat keeps the shared prefix)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
