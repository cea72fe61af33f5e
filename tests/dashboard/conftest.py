"""Fixtures of the dashboard tests.

Redis comes from the session-wide ``redis_url`` / ``redis_client`` fixtures of
``tests/conftest.py`` (a real ``redis-server`` on a free port). Here: an MLflow
registry with a champion, and the environment an ``AppTest`` run reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipelines.schemas import ALIAS_CHAMPION, REGISTERED_MODEL
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
                                     tags={"metric.ndcg_at_10": "0.312500"})
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS_CHAMPION, mv.version)
    return uri


@pytest.fixture()
def dashboard_env(monkeypatch):
    """Returns ``use(redis_url, mlflow_uri)``: points settings at them and empties Streamlit's caches."""
    import streamlit as st

    logging.getLogger("alembic").setLevel(logging.WARNING)

    def use(redis_url: str, mlflow_uri: str) -> None:
        monkeypatch.setenv("SHOPREC_REDIS_URL", redis_url)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        monkeypatch.delenv("SHOPREC_AB_EXPERIMENT", raising=False)
        get_settings.cache_clear()
        st.cache_data.clear()
        st.cache_resource.clear()

    yield use
    get_settings.cache_clear()
    st.cache_data.clear()
    st.cache_resource.clear()
