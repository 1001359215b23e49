"""Prometheus metrics of the server (GET /metrics), on a registry of its own per app.

Measured by the HTTP layer:

    lmforge_http_requests_total{route, status}       every answer, by route and status code
    lmforge_time_to_first_token_seconds              arrival -> first token of a choice
    lmforge_time_per_output_token_seconds            (last - first token time) / (tokens - 1), per choice
    lmforge_request_latency_seconds                  arrival -> last byte of a generation request
    lmforge_prompt_tokens_total, lmforge_generation_tokens_total

Read from the engine at scrape time (the driver's copy of `LLMEngine.counters`):

    lmforge_num_requests_running / _waiting, lmforge_kv_cache_usage_ratio, lmforge_kv_cache_blocks_used /
    _total, lmforge_preemptions_total, lmforge_engine_steps_total, lmforge_requests_aborted_total,
    lmforge_requests_refused_total{reason}
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lmforge.infer.engine import EngineCounters

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10, 20, 40, 80)


class _EngineCollector:
    def __init__(self, counters: Callable[[], EngineCounters | None]):
        self.counters = counters

    def collect(self):
        c = self.counters()
        if c is None:  # the model is still loading
            return
        gauges = (("num_requests_running", "requests holding KV blocks", c.running),
                  ("num_requests_waiting", "requests queued for admission", c.waiting),
                  ("kv_cache_usage_ratio", "fraction of KV blocks in use", c.kv_usage),
                  ("kv_cache_blocks_used", "KV blocks in use", c.kv_blocks_used),
                  ("kv_cache_blocks_total", "KV blocks in the pool", c.kv_blocks_total))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"lmforge_{name}", doc, value=value)
        counters = (("preemptions", "sequences preempted (recomputed later)", c.preemptions),
                    ("engine_steps", "engine steps run", c.steps),
                    ("requests_aborted", "engine requests aborted (client gone, stop string, shutdown)", c.aborted),
                    ("requests_finished", "engine requests finished", c.finished))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"lmforge_{name}", doc, value=value)
        refused = CounterMetricFamily("lmforge_requests_refused", "engine requests refused at admission",
                                      labels=["reason"])
        for reason, n in sorted(c.refused.items()):
            refused.add_metric([reason], n)
        yield refused


class ServerMetrics:
    def __init__(self, counters: Callable[[], EngineCounters | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_http_requests", "HTTP answers", ["route", "status"], registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "arrival to the first token of a choice",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "arrival to the end of a generation request",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        r.register(_EngineCollector(counters))

    def observe_choice(self, arrival: float, first: float | None, last: float | None, tokens: int) -> None:
        """One choice's timings (time.monotonic() values) and its number of generated tokens."""
        self.generation_tokens.inc(tokens)
        if first is None:
            return
        self.ttft.observe(first - arrival)
        if tokens > 1 and last is not None:
            self.tpot.observe((last - first) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
