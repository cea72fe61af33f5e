"""A real ``bentoml serve`` keeps answering 200 while Redis, the scoring worker and the broker fail."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from pipelines import localstack
from pipelines.serve_process import bento_serving, worker_pids
from tests.bentos.conftest import wait_for

pytestmark = pytest.mark.slow


def test_redis_scorer_and_broker_outages_never_fail_a_request(settings, serve_env, registered_champion, tmp_path):
    registry, reg = registered_champion
    rport, kport, port = localstack.free_port(), localstack.free_port(), localstack.free_port()
    env = {**serve_env, "SHOPREC_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
           "SHOPREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}", "SHOPREC_MLFLOW_MODEL_NAME": registry.name}
    redis = localstack.running(localstack.redis_command(rport, tmp_path), rport, tmp_path / "redis.log")
    broker = localstack.running(localstack.broker_command(kport), kport, tmp_path / "broker.log")
    with redis as redis_proc, broker as broker_proc, \
            bento_serving(port, env, tmp_path / "bentoml.log") as serve, \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15, headers=settings.client_headers()) as c:

        def rec(user):
            r = c.post("/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200, r.text
            return r.json()

        assert rec("u0")["source"] == "model" and rec("u0")["source"] == "cache"
        wait_for(lambda: c.post("/status").json()["local_cache"]["active"], 10, "the local list copies to be on")
        wait_for(lambda: c.post("/status").json()["impressions"]["pending"] == 0, 30, "impressions to reach Kafka")

        # 1. the broker goes away: answers as usual, impressions wait in the buffer
        broker_proc.terminate()
        broker_proc.wait()
        assert rec("u0")["source"] == "cache"
        assert rec("u2")["source"] == "model"
        assert c.post("/status").json()["impressions"]["pending"] >= 1

        # 2. Redis goes away too: the model answers without the cache (each API process's in-memory
        # copy of the lists is dropped as soon as it sees the connection close)
        redis_proc.terminate()
        redis_proc.wait()
        wait_for(lambda: rec("u0")["source"] == "model", 5, "answers without the cache")
        copies = c.post("/status").json()["local_cache"]
        assert not copies["active"] and copies["users"] == 0
        for _ in range(3):
            body = rec("u0")
            assert body["source"] == "model" and body["model_version"] == reg.version

        # 3. the scoring worker dies: popular items from the local snapshot
        for pid in worker_pids(serve, "shoprec-scorer"):
            os.kill(pid, signal.SIGKILL)
        body = rec("u4")
        assert body["source"] == "fallback" and len(body["items"]) == 5
        # ...until BentoML has restarted the worker
        wait_for(lambda: rec("u4")["source"] == "model", 60, "the restarted scorer to answer")

        # 4. the broker is back: the buffered impressions are delivered
        with localstack.running(localstack.broker_command(kport), kport, tmp_path / "broker2.log"):
            wait_for(lambda: c.post("/status").json()["impressions"]["pending"] == 0, 60, "buffered impressions sent")
            impressions = c.post("/status").json()["impressions"]
            assert impressions["sent"] >= 1 and impressions["dropped"] == impressions["failed"] == 0, impressions
