"""Fixtures of the dashboard tests.

Redis comes from the session-wide ``redis_url`` / ``redis_client`` fixtures of
``tests/conftest.py`` (a real ``redis-server`` on a free port). Here: an MLflow
registry with a champion, and the environment an ``AppTest`` run reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.schemas import ALIAS_CHAMPION, REGISTERED_MODEL, TAG_DATA_WINDOW_END, TAG_DATA_WINDOW_START
from pipelines.settings import get_settings

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py")


@pytest.fixture(scope="session")
def mlflow_with_champion(tmp_path_factory) -> str:
    """A private SQLite registry where ``shoprec-recommender@champion`` is version 1 (no challenger)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("dash-mlflow")
    uri = f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(REGISTERED_MODEL)
    mv = client.create_model_version(REGISTERED_MODEL, source=str(d / "artifacts"),
                                     tags={"metric.ndcg_at_10": "0.312500",
                                           TAG_DATA_WINDOW_START: "2026-11-17T00:00:00+00:00",
                                           TAG_DATA_WINDOW_END: "2026-11-24T00:00:00+00:00"})
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS_CHAMPION, mv.version)
    return uri


@pytest.fixture()
def dashboard_env(monkeypatch, tmp_path):
    """Returns ``use(redis_url, mlflow_uri)``: points settings at them (and a private, empty ``var/`` dir)
    and empties Streamlit's caches. Returns the settings in effect."""
    import streamlit as st

    logging.getLogger("alembic").setLevel(logging.WARNING)

    def use(redis_url: str, mlflow_uri: str, **env: str):
        monkeypatch.setenv("SHOPREC_REDIS_URL", redis_url)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        monkeypatch.setenv("SHOPREC_VAR_DIR", str(tmp_path / "var"))
        for k in ("SHOPREC_AB_EXPERIMENT", "SHOPREC_AB_EXPERIMENT_FILE", "SHOPREC_AB_CHALLENGER_SHARE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()
        st.cache_data.clear()
        st.cache_resource.clear()
        return get_settings()

    yield use
    get_settings.cache_clear()
    st.cache_data.clear()
    st.cache_resource.clear()


#: the windows of :func:`mlflow_with_refreshes`: v1's training, v5's refresh (of v1), and the span v5's tags give
TRAINED_WINDOW = ("2026-11-17T00:00:00+00:00", "2026-11-24T00:00:00+00:00")
REFRESH_WINDOW = ("2026-11-24T09:10:00+00:00", "2026-11-24T10:10:00+00:00")


@pytest.fixture()
def mlflow_with_refreshes(tmp_path) -> str:
    """A private SQLite registry as a fresh clone has it after a few hours, with the tags training and the hourly
    refresh write (:func:`pipelines.training.register_and_gate`, :func:`pipelines.refresh.refresh_alias`):
    v1 and v4 trained by ``train_job``, v2/v3 earlier refreshes, v5 the hourly refresh of v1 (``champion``),
    v6 that of v4 (``challenger``)."""
    from mlflow import MlflowClient

    from pipelines.dashboard_data import TAG_REFRESH_OF, TAG_REFRESH_WINDOW_END, TAG_REFRESH_WINDOW_START
    from pipelines.schemas import ALIAS_CHALLENGER, TAG_HOLDOUT, TAG_TRAINED_VERSION

    uri = f"sqlite:///{tmp_path}/mlflow-refreshes.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(REGISTERED_MODEL)
    trained = {TAG_DATA_WINDOW_START: TRAINED_WINDOW[0], TAG_DATA_WINDOW_END: TRAINED_WINDOW[1],
               TAG_HOLDOUT: "last 24 h of the window", "metric.ndcg_at_10": "0.300000"}

    def refresh_of(source: str) -> dict[str, str]:
        return {TAG_REFRESH_OF: source, TAG_TRAINED_VERSION: source,
                TAG_REFRESH_WINDOW_START: REFRESH_WINDOW[0], TAG_REFRESH_WINDOW_END: REFRESH_WINDOW[1],
                TAG_DATA_WINDOW_START: TRAINED_WINDOW[0], TAG_DATA_WINDOW_END: REFRESH_WINDOW[1],
                TAG_HOLDOUT: "last 1 h of the window", "metric.ndcg_at_10": "0.320000",
                "metric.recall_at_10": "0.450000", "metric.refresh_seconds": "10.440000",
                "metric.source_ndcg_at_10": "0.290000"}

    for tags in (trained, refresh_of("1"), refresh_of("1"), trained, refresh_of("1"), refresh_of("4")):
        client.create_model_version(REGISTERED_MODEL, source=str(tmp_path / "artifacts"), tags=tags)
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS_CHAMPION, "5")
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS_CHALLENGER, "6")
    return uri
