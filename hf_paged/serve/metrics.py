"""The server's Prometheus metrics, named as vLLM names them with the prefix ``hf_paged:`` instead of ``vllm:``, so
vLLM's Grafana dashboards work once the prefix is changed.

Engine-wide figures (running / waiting requests, KV-cache usage, prefix-cache queries and hits, preemptions, prompt
and generation tokens) are read from ``engine.stats()`` at scrape time by a collector; per-request figures (finished
requests by reason, time to first token, time per output token, end-to-end latency, queue time, token counts) are
recorded by the server as each engine request ends. Everything lives in one ``CollectorRegistry`` per app: two apps
in one process do not share or clash.

Speculative decoding (where the engine speculates): vLLM's ``spec_decode_num_drafts``,
``spec_decode_num_draft_tokens``, ``spec_decode_num_accepted_tokens`` and
``spec_decode_num_accepted_tokens_per_pos`` (label ``position``) counters.

Besides vLLM's names: ``hf_paged:kv_cache_total_blocks`` and ``hf_paged:kv_cache_free_blocks`` (gauges).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "hf_paged:"
LABELS = ("model_name", "engine")

# vLLM's default buckets (vllm/v1/metrics/buckets.py).
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort", "error")

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]


def _token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 series up to the context length."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(float(m * scale))
        scale *= 10


class _EngineCollector:
    """Engine-wide gauges and counters, read from the engine's stats at each scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]], labels: list[str]) -> None:
        self.stats = stats
        self.labels = labels

    def describe(self) -> Iterable[Metric]:
        return []  # no describe at registration: the engine is not asked for stats before the first scrape

    def collect(self) -> Iterable[Metric]:
        s = self.stats()

        def gauge(name: str, doc: str, value: float) -> Metric:
            m = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            m.add_metric(self.labels, value)
            return m

        def counter(name: str, doc: str, value: float) -> Metric:
            m = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            m.add_metric(self.labels, value)
            return m

        yield gauge("num_requests_running", "Number of requests in model execution batches.", s["running"])
        yield gauge("num_requests_waiting", "Number of requests waiting to be processed.", s["waiting"])
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s["kv_cache_usage"])
        yield gauge("kv_cache_total_blocks", "KV-cache blocks in the pool.", s["num_blocks"])
        yield gauge("kv_cache_free_blocks", "KV-cache blocks held by no request (cached prefixes included).",
                    s["num_free_blocks"])
        yield counter("prefix_cache_queries", "Prefix cache queries, as the engine counts them.",
                      s["prefix_cache_queries"])
        yield counter("prefix_cache_hits", "Prefix cache hits, as the engine counts them.", s["prefix_cache_hits"])
        yield counter("num_preemptions", "Cumulative number of preemptions from the engine.", s["preemptions"])
        yield counter("prompt_tokens", "Number of prefill tokens processed.", s["prompt_tokens"])
        yield counter("generation_tokens", "Number of generation tokens processed.", s["generation_tokens"])
        if "spec_decode_num_drafts" in s:
            yield counter("spec_decode_num_drafts", "Number of spec decoding drafts.", s["spec_decode_num_drafts"])
            yield counter("spec_decode_num_draft_tokens", "Number of draft tokens.", s["spec_decode_num_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                          s["spec_decode_num_accepted_tokens"])
            per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted tokens per draft position.", labels=LABELS + ("position",))
            pos = 0
            while f"spec_decode_num_accepted_tokens_per_pos_{pos}" in s:
                per_pos.add_metric(self.labels + [str(pos)], s[f"spec_decode_num_accepted_tokens_per_pos_{pos}"])
                pos += 1
            yield per_pos


class ServerMetrics:
    """One app's metrics: its own registry, the engine collector and the per-request histograms."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels = [model_name, "0"]
        self.registry.register(_EngineCollector(stats, labels))

        def histogram(name: str, doc: str, buckets) -> Any:
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=self.registry).labels(*labels)

        success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                          LABELS + ("finished_reason",), registry=self.registry)
        self.request_success = {r: success.labels(*labels, r) for r in FINISH_REASONS}
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot_old = histogram("time_per_output_token_seconds",
                                  "Histogram of time per output token in seconds (older name of the inter-token "
                                  "latency, kept for older dashboards).", INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        token_buckets = _token_buckets(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                           token_buckets)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_tokens(self, count: int, since: float | None) -> float:
        """``count`` tokens of one request arrived together, ``since`` its previous token (None: these are its first
        tokens, whose first one has no inter-token latency); returns now."""
        now = time.perf_counter()
        if since is None:
            since, count = now, 0  # tokens arriving together with the first one: no gap measured
        if count > 0:
            gap = (now - since) / count
            for _ in range(count):
                self.itl.observe(gap)
                self.tpot_old.observe(gap)
        return now

    def record_finished(self, reason: str, num_prompt_tokens: int, num_output_tokens: int,
                        timing: dict[str, float]) -> None:
        """One engine request ended (with the engine's ``RequestOutput.metrics``)."""
        self.request_success.get(reason, self.request_success["error"]).inc()
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_output_tokens)
        if "ttft_s" in timing:
            self.ttft.observe(timing["ttft_s"])
        if "tpot_s" in timing:
            self.tpot.observe(timing["tpot_s"])
        if "e2e_s" in timing:
            self.e2e.observe(timing["e2e_s"])
        if "queue_s" in timing:
            self.queue.observe(timing["queue_s"])
