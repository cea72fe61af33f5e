"""The whole loop on real services: simulator → Kafka → consumer → lake + Redis → Dagster training →
MLflow registry (`champion`) → `bentoml serve` → `/recommend` with `source: model` → closed-loop clicks.

This is the walking skeleton's promise, checked the way a user would: over HTTP, on real processes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest

from orchestration import assets
from orchestration.resources import LakeResource, MLflowResource, RedisResource
from pipelines import kafka_io, lake, localstack, simulator
from pipelines.consumer import StreamConsumer
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION
from pipelines.settings import LOCAL_API_KEY, get_settings
from pipelines.state import OnlineState, connect

pytestmark = pytest.mark.slow


def wait_for(cond, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture()
def own_broker(tmp_path):
    """A broker of this test alone: the lake must hold exactly what this shop sent, no other test's events."""
    port = localstack.free_port()
    with localstack.running(localstack.broker_command(port), port, tmp_path / "tansu.log"):
        yield f"127.0.0.1:{port}"


@pytest.fixture()
def e2e_settings(tmp_path, own_broker, redis_url, monkeypatch):
    """Settings on a private broker and the session Redis, with a private MLflow store (the real model name)."""
    env = {
        "SHOPREC_VAR_DIR": str(tmp_path / "var"),
        "SHOPREC_KAFKA_BOOTSTRAP": own_broker,
        "SHOPREC_REDIS_URL": redis_url,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "SHOPREC_CONSUMER_GROUP": f"e2e-{os.getpid()}-{time.monotonic_ns()}",
        "SHOPREC_MODEL_POLL_S": "1",
        "SHOPREC_AB_EXPERIMENT": f"e2e-{time.monotonic_ns()}",
        "SHOPREC_API_KEYS": json.dumps([LOCAL_API_KEY]),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield get_settings(), env
    get_settings.cache_clear()


def test_simulated_shop_to_trained_model_served_over_http(e2e_settings, tmp_path):
    settings, env = e2e_settings
    kafka_io.ensure_topics(settings)
    catalog = simulator.make_catalog(n_items=800, seed=7)
    simulator.save_catalog(catalog, settings.catalog_path)
    sim = simulator.ShopSimulator(catalog, n_users=150, seed=7)

    # 1. the shop streams events into Kafka while a consumer turns them into lake + Redis state
    state = OnlineState(connect(settings.redis_url), experiment=settings.ab_experiment)
    stop = threading.Event()
    consumer = StreamConsumer(settings, state, log_every_s=1.0)
    consumer_thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    consumer_thread.start()
    producer = kafka_io.make_producer(settings)
    try:
        sent = sim.run_live(lambda evs: kafka_io.send_events(producer, evs, settings.kafka_topic_events), rate_eps=400, duration_s=6)
        producer.flush()
        assert sent["events"] > 1000
        stored = wait_for(lambda: (n := len(lake.read_all(settings.lake_dir))) >= sent["events"] and n,
                          60, f"{sent['events']} events in the lake")
        assert stored == sent["events"]

        # 2. Dagster validates the hour and trains; MLflow gets a registered `champion`
        resources = {"lake_store": LakeResource(lake_dir=str(settings.lake_dir)),
                     "mlflow_registry": MLflowResource(tracking_uri=settings.mlflow_tracking_uri),
                     "redis_state": RedisResource(url=settings.redis_url)}
        hour = lake.partitions(settings.lake_dir)[-1]
        checked = dg.materialize([assets.events], partition_key=hour, resources=resources)
        assert checked.success and all(c.passed for c in checked.get_asset_check_evaluations())
        run = dg.materialize([assets.training_interactions, assets.trained_model, assets.popular_fallback],
                             resources=resources,
                             run_config={"ops": {"trained_model": {"config": {"epochs": 10, "dim": 16}}}})
        assert run.success
        version = ModelRegistry(settings.mlflow_tracking_uri).version_for(ALIAS_CHAMPION)
        assert version is not None

        # 3. a real `bentoml serve` (it inherits the test's SHOPREC_* environment) answers from that version
        port = localstack.free_port()
        cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "bentos.service:Shoprec",
               "--host", "127.0.0.1", "--port", str(port)]
        with localstack.running(cmd, port, tmp_path / "bentoml.log", timeout=90):
            base = f"http://127.0.0.1:{port}"
            client = httpx.Client(base_url=base, timeout=10, headers=settings.client_headers())
            wait_for(lambda: _ok(client, "/readyz"), 90, "bentoml serve to be ready")
            known_user = lake.read_all(settings.lake_dir).user_id.iloc[0]

            def model_answer():
                body = client.post("/recommend", json={"user_id": known_user, "k": 5}).json()
                return body if body["source"] in ("model", "cache") else None

            body = wait_for(model_answer, 60, "a model answer from /recommend")
            assert body["model_version"] == version and body["variant"] == ALIAS_CHAMPION
            assert len(body["items"]) == 5

            # 4. closed loop: simulated users see the lists and click; the clicks are attributed
            http_fn, lists = simulator.http_recommend_fn(base, headers=settings.client_headers()), []

            @functools.wraps(http_fn)  # keeps `logs_impressions`: the service logs the impressions, not the shop
            def rec_fn(user_id):
                got = http_fn(user_id)
                lists.append(got)
                return got

            # ~4 clicks per 100 sessions with this catalog: 200 sessions make "no click at all" a ~1-in-3000 event
            for _ in range(200):
                kafka_io.send_events(producer, sim.step_with_recommender(rec_fn), settings.kafka_topic_events)
            producer.flush()
            shown = sum(1 for got in lists if got and got[1])
            tag = f"{settings.ab_experiment}@{ALIAS_CHAMPION}.{version}"  # the comparison of the version served

            def attributed():
                got = state.ab_counts(tag).get(ALIAS_CHAMPION, {})
                return got if got.get("clicks", 0) > 0 and got.get("impressions", 0) >= shown else None

            counts = wait_for(attributed, 60, f"{shown} impressions and a click counted for {tag} in Redis")
            assert shown >= 150 and counts["clicks"] >= 1  # most of the sessions were shown a list
            # the latest comparison is the version served (the answers before a model was loaded are not in it)
            assert state.ab_comparisons()[0][0] == tag
    finally:
        stop.set()
        consumer_thread.join(timeout=30)
        producer.close()


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False
