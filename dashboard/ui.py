"""Streamlit plumbing shared by the pages: settings, cached clients and queries, "service down" warnings.

Computation lives in :mod:`pipelines.dashboard_data`; this module only caches
and renders. Clients are ``st.cache_resource`` keyed by URL, queries are
``st.cache_data`` with a 5 s TTL.
"""

from __future__ import annotations

from collections.abc import Callable

import redis
import streamlit as st

from pipelines import dashboard_data as dd
from pipelines.settings import Settings, get_settings
from pipelines.state import OnlineState, connect

TTL_S = 5
START_HINT = "Start the local stack with `make up` (`make status` shows what runs), then reload this page."


def settings() -> Settings:
    try:
        return get_settings()
    except Exception as err:  # invalid SHOPREC_* variables: say so instead of a stack trace
        st.error(f"shoprec settings are invalid, check the `SHOPREC_*` environment variables: {err}")
        st.stop()


@st.cache_resource(show_spinner=False)
def _online_state(redis_url: str, experiment: str) -> OnlineState:
    return OnlineState(connect(redis_url), experiment=experiment)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def _snapshot(redis_url: str, experiment: str, minutes: int) -> dd.Snapshot:
    return dd.fetch_snapshot(_online_state(redis_url, experiment), minutes)


def snapshot(minutes: int = dd.WINDOW_MINUTES) -> dd.Snapshot | None:
    """The Redis counters, or None after showing a warning when Redis is down."""
    s = settings()
    try:
        return _snapshot(s.redis_url, s.ab_experiment, minutes)
    except redis.RedisError as err:
        st.warning(f"**Redis is down**: cannot reach `{dd.redact_url(s.redis_url)}` ({type(err).__name__}: {err}). "
                   f"The traffic, cache and cold-start counters live there. {START_HINT} "
                   "Elsewhere, point `SHOPREC_REDIS_URL` at a running Redis.", icon=":material/cloud_off:")
        return None


@st.cache_resource(show_spinner=False)
def _mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def _model_aliases(tracking_uri: str) -> dict[str, dd.ModelVersionInfo | None]:
    return dd.fetch_model_aliases(tracking_uri, client_factory=_mlflow_client)


def model_aliases() -> dict[str, dd.ModelVersionInfo | None] | None:
    """Champion/challenger versions, or None after showing a warning when MLflow is down."""
    s = settings()
    try:
        return _model_aliases(s.mlflow_tracking_uri)
    except dd.MlflowUnavailable as err:
        st.warning(f"**MLflow is down**: {err}. The model versions come from its registry. {START_HINT} "
                   "Elsewhere, point `MLFLOW_TRACKING_URI` at a running tracking server.",
                   icon=":material/cloud_off:")
        return None


def live(render: Callable[[], None]) -> None:
    """Run ``render`` as a fragment that reruns every few seconds while auto-refresh is on (sidebar)."""
    every = f"{TTL_S}s" if st.session_state.get("auto_refresh", True) else None
    st.fragment(render, run_every=every)()


def sidebar() -> None:
    with st.sidebar:
        st.toggle(f"Auto-refresh every {TTL_S} s", value=True, key="auto_refresh")
        s = settings()
        st.caption(f"Redis `{dd.redact_url(s.redis_url)}`  \nMLflow `{dd.redact_url(s.mlflow_tracking_uri)}`  \n"
                   f"Experiment `{s.ab_experiment}`")


def no_traffic(what: str) -> None:
    st.info(f"No traffic yet: {what}. Counters appear once the shop asks for recommendations "
            "(`make up` starts a simulated shop).", icon=":material/hourglass_empty:")
