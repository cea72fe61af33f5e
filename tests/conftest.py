"""Session-wide real services on free ports: Kafka-protocol broker (tansu), Redis, MLflow (SQLite).

Tests isolate themselves by names (topics are shared; consumer groups, Redis
keys and MLflow model names are per test where it matters).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from pipelines import localstack
from pipelines.settings import LOCAL_API_KEY, Settings, get_settings


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> str:
    port = localstack.free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with localstack.running(localstack.broker_command(port), port, log):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    port = localstack.free_port()
    d = tmp_path_factory.mktemp("redis")
    with localstack.running(localstack.redis_command(port, d), port, d / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


@pytest.fixture()
def settings(tmp_path, broker, redis_url, mlflow_uri, monkeypatch) -> Settings:
    """Settings pointing at the session's services, with a private var dir and consumer group."""
    env = {
        "SHOPREC_VAR_DIR": str(tmp_path / "var"),
        "SHOPREC_KAFKA_BOOTSTRAP": broker,
        "SHOPREC_REDIS_URL": redis_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "SHOPREC_CONSUMER_GROUP": f"test-{uuid.uuid4().hex[:8]}",
        "SHOPREC_API_KEYS": json.dumps([LOCAL_API_KEY]),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture()
def redis_client(redis_url):
    from pipelines.state import connect

    r = connect(redis_url)
    r.flushdb()
    yield r
    r.close()


def pytest_configure(config):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    Path("var").mkdir(exist_ok=True)


def synthetic_interactions(n_users: int = 60, n_items: int = 40, per_user: int = 8, seed: int = 0):
    """Two taste groups (even/odd users) that each stick to their own half of the items."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    t0 = 1_790_000_000_000
    for u in range(n_users):
        group = u % 2
        pool = [i for i in range(n_items) if i % 2 == group]
        for j, i in enumerate(rng.choice(pool, size=per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", t0 + (u * per_user + j) * 1000, 1.0))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "weight"])
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
    return df


@pytest.fixture()
def registered_champion(settings):
    """A small BPR model registered in MLflow as `champion` (fresh registry per test)."""
    from pipelines import training
    from pipelines.registry import ModelRegistry

    registry = ModelRegistry(settings.mlflow_tracking_uri, name=f"shoprec-test-{uuid.uuid4().hex[:6]}")
    result = training.train(synthetic_interactions(), settings.train.model_copy(update={"epochs": 30, "dim": 16}))
    reg = training.register_and_gate(registry, result)
    return registry, reg
