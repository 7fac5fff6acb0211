"""tinyinfer: a teaching inference engine for transformer language models.

    import tinyinfer
    llm = tinyinfer.load("path/to/model")               # a Hugging Face directory or a llama2.c .bin
    out = llm.generate("Once upon a time", tinyinfer.SamplingParams(temperature=0.0, max_tokens=64))
    print(out.text)
"""

from tinyinfer.errors import CheckpointError, ContextLengthError, TokenizerMissingError
from tinyinfer.llm import LLM, load
from tinyinfer.outputs import GenerationOutput
from tinyinfer.sampling import SamplingParams

__all__ = [
    "load",
    "LLM",
    "SamplingParams",
    "GenerationOutput",
    "CheckpointError",
    "ContextLengthError",
    "TokenizerMissingError",
]
