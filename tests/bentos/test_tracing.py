"""OpenTelemetry tracing: off by default (the middleware passes requests straight through), sampled when asked."""

from __future__ import annotations

import asyncio

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.util.http import ExcludeList

from bentos.service import tracing_config


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


class _CountingSampler(ParentBasedTraceIdRatio):
    calls = 0

    def should_sample(self, *args, **kwargs):
        type(self).calls += 1
        return super().should_sample(*args, **kwargs)


def _one_request(rate: float) -> tuple[int, int, int]:
    """What BentoML builds from our config: ``(spans exported, spans considered, answers)`` for one call."""
    cfg = tracing_config(rate)
    exporter = InMemorySpanExporter()
    _CountingSampler.calls = 0
    provider = TracerProvider(sampler=_CountingSampler(cfg["sample_rate"]))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = OpenTelemetryMiddleware(_ok, excluded_urls=ExcludeList(cfg.get("excluded_urls", [])),
                                  tracer_provider=provider)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/recommend", "scheme": "http", "http_version": "1.1",
             "headers": [(b"host", b"shop")], "server": ("shop", 3001), "client": ("10.0.0.1", 5000),
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return len(exporter.get_finished_spans()), _CountingSampler.calls, sum(m["type"] == "http.response.start" for m in sent)


def test_off_by_default_requests_skip_the_tracing_middleware():
    """Not even an unsampled span is built: that alone was ~45 % of a trivial endpoint's time."""
    assert _one_request(0.0) == (0, 0, 1)


def test_a_sample_rate_traces_requests():
    spans, considered, answers = _one_request(1.0)
    assert spans >= 1 and considered >= 1 and answers == 1
