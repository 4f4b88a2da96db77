"""Prometheus metrics for the server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from albireo.engine.client import CoreStats
from albireo.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter(
            "albireo_request_success", "Finished requests, by finish reason", labels + ["finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("albireo_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("albireo_generation_tokens", "Tokens generated", labels, registry=r)
        self.running = Gauge("albireo_num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("albireo_num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("albireo_kv_cache_usage_perc", "Fraction of KV cache blocks in use", labels, registry=r)
        self.cache_hits = Counter(
            "albireo_prefix_cache_hit_tokens", "Prompt tokens not recomputed, by the KV tier they came from",
            labels + ["tier"], registry=r,
        )
        self.counted_hits = {"device": 0, "host": 0}
        self.ttft = Histogram(
            "albireo_time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "albireo_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            labels, buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "albireo_inter_token_latency_seconds", "Time between consecutive output tokens", labels,
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "albireo_e2e_request_latency_seconds", "End-to-end request latency", labels,
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.model_name = model_name
        # The one label value's children, looked up once instead of per observation.
        self.ttft_m, self.tpot_m, self.itl_m, self.e2e_m = (
            h.labels(model_name) for h in (self.ttft, self.tpot, self.itl, self.e2e)
        )

    def render(self, stats: CoreStats) -> bytes:
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        for tier, total in (("device", stats.prefix_hit_tokens), ("host", stats.host_hit_tokens)):
            self.cache_hits.labels(m, tier).inc(total - self.counted_hits[tier])
            self.counted_hits[tier] = total
        return generate_latest(self.registry)


class RequestTimer:
    """Follows one request's outputs as they stream in and records its latencies once it ends."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False

    def update(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        m = self.metrics
        n = sum(len(o.token_ids) for o in out.outputs)
        new = n - self.num_tokens
        if new > 0:
            if self.first is None:
                self.first = now
                m.ttft_m.observe(now - self.start)
                new -= 1
            if new > 0 and self.last is not None:
                # Tokens that arrive together share the gap since the previous arrival.
                gap = (now - self.last) / new
                for _ in range(new):
                    m.itl_m.observe(gap)
            self.last = now
            self.num_tokens = n

    def finish(self, out: RequestOutput | None, aborted: bool = False) -> None:
        if self.done:
            return
        self.done = True
        m, name = self.metrics, self.metrics.model_name
        now = time.perf_counter()
        m.e2e_m.observe(now - self.start)
        if out is not None:
            m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
            m.generation_tokens.labels(name).inc(sum(len(o.token_ids) for o in out.outputs))
            for o in out.outputs:
                reason = "abort" if aborted or o.finish_reason is None else o.finish_reason
                m.requests.labels(name, reason).inc()
        if self.first is not None and self.num_tokens > 1:
            m.tpot_m.observe((now - self.first) / (self.num_tokens - 1))
