"""The serving engine: continuous batching over a paged KV cache with prefix caching.

engine.py (requests and the step loop), scheduler.py (what runs each step), block_manager.py
(who owns which KV block), paged_cache.py (the block pool and each sequence's block table).
"""

from tinyinfer.engine.engine import EngineConfig, LLMEngine, RequestUpdate

__all__ = ["EngineConfig", "LLMEngine", "RequestUpdate"]
