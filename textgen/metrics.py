"""Prometheus metrics, exported by BentoML on /metrics (names get `_total` etc. there)."""

from __future__ import annotations

import bentoml

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

requests = bentoml.metrics.Counter(
    name="textgen_requests",
    documentation="Generation requests answered, by route and finish reason",
    labelnames=["route", "finish_reason"],
)
prompt_tokens = bentoml.metrics.Counter(
    name="textgen_prompt_tokens", documentation="Prompt tokens prefilled"
)
generated_tokens = bentoml.metrics.Counter(
    name="textgen_generated_tokens", documentation="Tokens generated"
)
time_to_first_token = bentoml.metrics.Histogram(
    name="textgen_time_to_first_token_seconds",
    documentation="From submission to the first generated token",
    buckets=LATENCY_BUCKETS,
)
inter_token_latency = bentoml.metrics.Histogram(
    name="textgen_inter_token_latency_seconds",
    documentation="Between consecutive tokens of one sequence",
    buckets=LATENCY_BUCKETS,
)
queue_depth = bentoml.metrics.Gauge(
    name="textgen_queue_depth",
    documentation="Sequences waiting for a batch row",
    multiprocess_mode="livesum",
)
running_batch_size = bentoml.metrics.Gauge(
    name="textgen_running_batch_size",
    documentation="Sequences in the running batch",
    multiprocess_mode="livesum",
)
rejections = bentoml.metrics.Counter(
    name="textgen_rejections",
    documentation="Requests refused, by cause: invalid, unauthorized, body_too_large, overloaded",
    labelnames=["cause"],
)
