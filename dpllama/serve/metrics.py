"""The server's Prometheus metrics, in a registry of their own (so that two servers in one process, as in
Ray Serve's replicas or the tests, never collide in prometheus_client's global one)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a few milliseconds (a tiny model's token) to a long prompt behind a full queue
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("dpllama_requests_running", "requests in a slot", registry=r)
        self.waiting = Gauge("dpllama_requests_waiting", "requests in the wait queue", registry=r)
        self.finished = Counter("dpllama_requests_finished", "requests ended, by how: stop, length, cancelled, "
                                "error", ["reason"], registry=r)
        self.rejected = Counter("dpllama_requests_rejected", "requests refused before they waited: the queue was "
                                "full (429) or the server not accepting (503)", ["status"], registry=r)
        self.prompt_tokens = Counter("dpllama_prompt_tokens", "prompt tokens processed", registry=r)
        self.prompt_tokens_cached = Counter("dpllama_prompt_tokens_cached", "prompt tokens whose KV cache a slot "
                                            "kept from its previous request (not processed again)", registry=r)
        self.generation_tokens = Counter("dpllama_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram("dpllama_time_to_first_token_seconds", "from a request's arrival to "
                                             "its first new token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("dpllama_time_per_output_token_seconds", "between a request's "
                                               "consecutive new tokens", buckets=LATENCY_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
