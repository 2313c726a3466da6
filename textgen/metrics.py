"""Prometheus metrics, exported by BentoML on /metrics.

Created on first use, not at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in a
worker after the service module is imported, and metrics made before that
would live in a private registry that /metrics never reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Metrics:
    requests: Any  # Counter{route, finish_reason}: finished sequences (one per /v1 choice)
    prompt_tokens: Any  # Counter: prompt tokens prefilled
    generated_tokens: Any  # Counter: tokens generated
    time_to_first_token: Any  # Histogram: submission -> first token, seconds
    inter_token_latency: Any  # Histogram: between consecutive tokens of a sequence
    queue_depth: Any  # Gauge: sequences waiting for a batch row
    running_batch_size: Any  # Gauge: sequences in the running batch
    rejections: Any  # Counter{cause}: invalid | unauthorized | body_too_large | overloaded
    step_failures: Any  # Counter: engine steps that failed (each failed its running sequences)
    prefix_cache_queries: Any  # Counter: prompt tokens looked up in the prefix cache
    prefix_cache_hits: Any  # Counter: of those, tokens found (not computed again)


@functools.cache
def get() -> Metrics:
    import prometheus_client as prom  # here: after BentoML set the multiprocess directory

    return Metrics(
        requests=prom.Counter(
            "textgen_requests",
            "Finished generations (one per request; one per choice on /v1), by route and reason",
            ["route", "finish_reason"],
        ),
        prompt_tokens=prom.Counter("textgen_prompt_tokens", "Prompt tokens prefilled"),
        generated_tokens=prom.Counter("textgen_generated_tokens", "Tokens generated"),
        time_to_first_token=prom.Histogram(
            "textgen_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=LATENCY_BUCKETS,
        ),
        inter_token_latency=prom.Histogram(
            "textgen_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence",
            buckets=LATENCY_BUCKETS,
        ),
        queue_depth=prom.Gauge(
            "textgen_queue_depth", "Sequences waiting for a batch row", multiprocess_mode="livesum"
        ),
        running_batch_size=prom.Gauge(
            "textgen_running_batch_size",
            "Sequences in the running batch",
            multiprocess_mode="livesum",
        ),
        rejections=prom.Counter(
            "textgen_rejections",
            "Requests refused, by cause: invalid, unauthorized, body_too_large, overloaded",
            ["cause"],
        ),
        step_failures=prom.Counter(
            "textgen_engine_step_failures",
            "Engine steps that failed; each failed every sequence it was running",
        ),
        prefix_cache_queries=prom.Counter(
            "textgen_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        ),
        prefix_cache_hits=prom.Counter(
            "textgen_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (their keys and values not computed again)",
        ),
    )


def observe_many(histogram: Any, amount: float, count: int) -> None:
    """`count` observations of `amount` in a Histogram, as `count` calls of `observe` would
    make them, at the cost of one: in BentoML's multiprocess mode each update of a value
    is a write to a shared memory map. Uses prometheus_client's Histogram internals
    (`_sum`, `_upper_bounds`, `_buckets`), and falls back to `observe` without them."""
    try:
        total, bounds, buckets = histogram._sum, histogram._upper_bounds, histogram._buckets
    except AttributeError:
        for _ in range(count):
            histogram.observe(amount)
        return
    total.inc(amount * count)
    for bound, bucket in zip(bounds, buckets, strict=True):
        if amount <= bound:
            bucket.inc(count)
            return
