"""Which weights a loader reads: the whole model, or one device's part of it.

A single device reads every tensor. A device of a parallel group reads only its part
(tinyinfer/parallel/sharding.py subclasses this): the layers of its pipeline stage, the
embedding only if it embeds, the final norm and LM head only if it projects, and of each
matrix only the rows or columns its tensor-parallel rank computes. `pick` is applied to the
memory-mapped tensor as the file stores it, before any conversion, so a device never reads
(or widens from bfloat16) more than its own slice.
"""


class WeightSelection:
    """The whole model: every layer, the embedding, the head, every matrix whole."""

    def __init__(self, num_layers: int):
        self.layers = range(num_layers)  # indices of the layers to read, in the checkpoint's numbering
        self.embedding = True  # read the token embedding
        self.head = True  # read the final norm and the LM head

    def pick(self, field: str, array):
        """The part of one stored tensor to keep. field: a LayerWeights field name ("wq",
        "bk", "w_down", ...) or "embedding" / "lm_head" / "final_norm"; array: the tensor as
        stored, [out, in] for a matrix."""
        return array
