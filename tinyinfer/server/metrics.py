"""What the server measures, in Prometheus's text format (GET /metrics).

The names follow vLLM's (`vllm:` becomes `tinyinfer_`), so a dashboard made for one reads the
other. The registry is the server's own, not prometheus_client's global one, so that two apps
in one process (the tests make several) keep separate counts.

Everything is recorded by the engine thread (engine_loop.py), which sees each request arrive,
get its tokens and finish; prometheus_client's metrics are thread-safe, so /metrics reads them
from the event loop whenever it is asked. Latencies are measured on the server from the moment
the request reached its handler, so they include the time it waited for a place in the batch.
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a millisecond (a decode step of a tiny model) to minutes (a long answer on a CPU)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "tinyinfer_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "tinyinfer_time_per_output_token_seconds", "A request's mean time between two of its tokens (decode)",
            buckets=TOKEN_TIME_BUCKETS, registry=registry)
        self.e2e_request_latency = Histogram(
            "tinyinfer_e2e_request_latency_seconds", "From a request's arrival to its last token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "tinyinfer_batch_size", "Sequences in one engine step (one forward pass): continuous batching at work",
            buckets=BATCH_BUCKETS, registry=registry)
        self.requests_waiting = Gauge(
            "tinyinfer_num_requests_waiting", "Requests accepted that have no token yet (queued, or in prefill)",
            registry=registry)
        self.requests_running = Gauge(
            "tinyinfer_num_requests_running", "Requests generating tokens", registry=registry)
        self.kv_blocks_in_use = Gauge(
            "tinyinfer_kv_cache_blocks_in_use", "KV cache blocks held by live requests", registry=registry)
        self.kv_blocks_total = Gauge(
            "tinyinfer_kv_cache_blocks_total", "KV cache blocks in the pool", registry=registry)
        self.prefix_cache_hit_rate = Gauge(
            "tinyinfer_prefix_cache_hit_rate", "Fraction of prompt tokens found in the prefix cache", registry=registry)
        self.prompt_tokens = Counter(
            "tinyinfer_prompt_tokens", "Prompt tokens of the requests accepted", registry=registry)
        self.generation_tokens = Counter(
            "tinyinfer_generation_tokens", "Tokens generated", registry=registry)
        self.requests_finished = Counter(
            "tinyinfer_request_success", "Requests finished, by finish reason (stop, length, abort)",
            ["finished_reason"], registry=registry)
        self.requests_refused = Counter(
            "tinyinfer_requests_refused", "Requests refused by the engine: bad, or the queue full", ["reason"],
            registry=registry)

    def render(self) -> tuple[bytes, str]:
        """The text a Prometheus scrape reads, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
