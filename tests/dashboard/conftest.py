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
