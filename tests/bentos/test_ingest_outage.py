"""With the broker down, /events and /catalog answer shoprec's 503 (nothing accepted, retry) before the request timeout.

They waited up to 10 s for Kafka's acks, longer than BentoML's request timeout (5 s): the client got BentoML's
generic 504 "Not able to process the request in 5.0 seconds", which said neither that nothing was accepted nor
what to do.
"""

from __future__ import annotations

import time

import httpx
import pytest
from kafka.errors import KafkaError
from pydantic import ValidationError

from pipelines import kafka_io, localstack
from pipelines.ingest import EventIngestor
from pipelines.schemas import new_event
from pipelines.serve_process import bento_serving
from pipelines.settings import Settings, get_settings


def test_the_ack_wait_is_a_setting_under_the_request_timeout(monkeypatch):
    for name in ("SHOPREC_SERVE_REQUEST_TIMEOUT_S", "SHOPREC_INGEST_ACK_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().ingest_ack_wait_s == pytest.approx(3.0)  # 60 % of the default 5 s request timeout
    monkeypatch.setenv("SHOPREC_SERVE_REQUEST_TIMEOUT_S", "2")
    assert Settings().ingest_ack_wait_s == pytest.approx(1.2)  # follows a shorter request timeout
    monkeypatch.setenv("SHOPREC_INGEST_ACK_TIMEOUT_S", "1.5")
    assert Settings().ingest_ack_wait_s == 1.5
    monkeypatch.setenv("SHOPREC_INGEST_ACK_TIMEOUT_S", "2")
    with pytest.raises(ValidationError, match="must be under SHOPREC_SERVE_REQUEST_TIMEOUT_S"):
        Settings()


def test_a_broker_that_never_answers_costs_the_ack_wait_not_more(monkeypatch):
    """The first batch of a process whose broker is down: the producer's first connection is bounded too (kafka-python
    waits 30 s for it by default, and 60 s for a topic's partitions)."""
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{localstack.free_port()}")  # nothing listens there
    monkeypatch.setenv("SHOPREC_INGEST_ACK_TIMEOUT_S", "1")
    ingestor = EventIngestor(Settings())
    started = time.monotonic()
    with pytest.raises(KafkaError):
        ingestor.ingest([new_event("view", "u-down", "item-1", "s-down")])
    assert time.monotonic() - started < 2.5


@pytest.mark.slow
def test_with_the_broker_down_ingestion_answers_503_nothing_accepted_within_the_request_timeout(
        settings, serve_env, tmp_path, monkeypatch):
    kport, port = localstack.free_port(), localstack.free_port()
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{kport}")
    get_settings.cache_clear()
    env = {**serve_env, "SHOPREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}", "SHOPREC_MLFLOW_MODEL_NAME": "no-such-model"}
    timeout_s = get_settings().serve_request_timeout_s
    broker = localstack.running(localstack.broker_command(kport), kport, tmp_path / "broker.log")
    with broker as broker_proc:
        kafka_io.ensure_topics(get_settings())
        with bento_serving(port, env, tmp_path / "bentoml.log"), \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=settings.client_headers()) as c:
            event = new_event("view", "u-outage", "item-1", "s-outage")
            assert c.post("/events", json={"events": [event]}).status_code == 202  # the producer is connected

            broker_proc.terminate()
            broker_proc.wait()
            # /events: its topic's partitions are known, the acks never come; /catalog: its topic's are not yet known
            for path, body in (("/events", {"events": [new_event("view", "u-outage", "item-1", "s-outage")]}),
                               ("/catalog", {"products": [{"item_id": "i-outage", "in_stock": False}]})):
                started = time.monotonic()
                r = c.post(path, json=body)
                took = time.monotonic() - started
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert took < timeout_s, (path, took)
                error = r.json()["error"]
                assert "the event bus is unavailable" in error and "nothing was accepted" in error, error
                assert "retry with backoff" in error and int(r.headers["retry-after"]) >= 1, (error, r.headers)
