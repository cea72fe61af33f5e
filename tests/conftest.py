"""Session-wide real services on free ports: Kafka-protocol broker (tansu), Redis, MLflow (SQLite).

Tests isolate themselves by names (topics are shared; consumer groups, Redis
keys and MLflow model names are per test where it matters).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pipelines import localstack
from pipelines.settings import Settings, get_settings


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
