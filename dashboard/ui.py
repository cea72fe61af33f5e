"""Streamlit plumbing shared by the pages: settings, cached clients and queries, "service down" warnings.

Computation lives in :mod:`pipelines.dashboard_data`; this module only caches
and renders. Clients are ``st.cache_resource`` keyed by URL, queries are
``st.cache_data`` with a 5 s TTL.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow
import redis
import streamlit as st

from pipelines import dashboard_agg
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
def _snapshot(redis_url: str, experiment: str, minutes: int, tag: str | None) -> dd.Snapshot:
    return dd.fetch_snapshot(_online_state(redis_url, experiment), minutes, tag)


def ab_config() -> dd.ABConfig:
    """The experiment's shares and the analysis settings; stops the page with a message when they are invalid."""
    try:
        return dd.ABConfig.from_settings(settings())
    except ValueError as err:
        st.error(f"The A/B experiment is misconfigured: {err}", icon=":material/error:")
        st.stop()


def snapshot(minutes: int = dd.WINDOW_MINUTES, tag: str | None = None) -> dd.Snapshot | None:
    """The Redis counters (A/B totals of the comparison ``tag``, default the latest), or None after showing a
    warning when Redis is down."""
    s = settings()
    try:
        return _snapshot(s.redis_url, ab_config().experiment, minutes, tag)
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
                   f"Experiment `{ab_config().experiment}`")


def no_traffic(what: str) -> None:
    st.info(f"No traffic yet: {what}. Counters appear once the shop asks for recommendations "
            "(`make up` starts a simulated shop).", icon=":material/hourglass_empty:")


# --- slower reads: longer TTL ---------------------------------------------------------------
SLOW_TTL_S = 30
#: the lake grows by hourly partitions and its aggregates move slowly: re-read it at most every 5 minutes
LAKE_TTL_S = 300


def _redis_down(err: Exception, what: str) -> None:
    s = settings()
    st.warning(f"**Redis is down**: cannot reach `{dd.redact_url(s.redis_url)}` ({type(err).__name__}: {err}). "
               f"{what} {START_HINT} Elsewhere, point `SHOPREC_REDIS_URL` at a running Redis.",
               icon=":material/cloud_off:")


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def _cumulative_lift(redis_url: str, experiment: str, tag: str, a: str, b: str, minutes: int, alpha: float):
    import time

    state = _online_state(redis_url, experiment)
    now_s = time.time()
    hist = {v: dd.fetch_minute_counts(state, dd.ab_stats_name(tag, v), ("impressions", "clicks"), minutes, now_s)
            for v in (a, b)}
    return dd.cumulative_lift_frame(hist, a, b, minutes=minutes, now_s=now_s, alpha=alpha)


def cumulative_lift(tag: str, a: str, b: str, minutes: int, alpha: float):
    """Cumulative CTR lift of ``b`` over ``a`` in the comparison ``tag`` from the per-minute counters of the last
    ``minutes`` (:func:`pipelines.dashboard_data.cumulative_lift_frame`); None after a warning when Redis is down."""
    s = settings()
    try:
        return _cumulative_lift(s.redis_url, ab_config().experiment, tag, a, b, minutes, alpha)
    except redis.RedisError as err:
        _redis_down(err, "The A/B counters live there.")
        return None


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def _redis_info(redis_url: str, experiment: str) -> dd.RedisInfo:
    return dd.fetch_redis_info(_online_state(redis_url, experiment).r)


def redis_info() -> dd.RedisInfo | None:
    s = settings()
    try:
        return _redis_info(s.redis_url, ab_config().experiment)
    except redis.RedisError as err:
        _redis_down(err, "Memory and key counts come from it.")
        return None


#: what reading Parquet files can raise when they are missing, unreadable or corrupt (bugs still surface)
LAKE_ERRORS = (OSError, pyarrow.ArrowException)


def _lake_error(err: Exception, what: str) -> None:
    st.warning(f"**Cannot read the event lake** at `{settings().lake_dir}` ({type(err).__name__}: {err}). {what} "
               "Check that `SHOPREC_VAR_DIR` points at the stack's `var/` folder and the files are readable.",
               icon=":material/folder_off:")


def lake_cache_dir() -> str:
    """Where the per-partition lake summaries are cached: the only place the dashboard writes."""
    return str(dashboard_agg.cache_dir(settings()))


@st.cache_data(ttl=LAKE_TTL_S, show_spinner=False)
def _lake_ab(lake_dir: str, cache_dir: str, hours: int) -> dd.LakeAB:
    return dashboard_agg.fetch_lake_ab(lake_dir, cache_dir, hours=hours)


def lake_ab() -> dd.LakeAB | None:
    """Revenue of every impression and users per variant from the lake; None (after a warning) when unreadable."""
    s = settings()
    try:
        return _lake_ab(str(s.lake_dir), lake_cache_dir(), s.dashboard_lake_hours)
    except LAKE_ERRORS as err:  # a corrupt or unreadable Parquet file must not take the page down
        _lake_error(err, "Revenue per impression comes from the purchases there.")
        return None


@st.cache_data(ttl=LAKE_TTL_S, show_spinner=False)
def _new_items(catalog_path: str, lake_dir: str, cache_dir: str, age_h: float,
               explore_share: float) -> dd.NewItemReport | None:
    return dashboard_agg.fetch_new_item_report(catalog_path, lake_dir, cache_dir, age_h=age_h,
                                               explore_share=explore_share, hours=int(2 * age_h) + 1)


def new_items() -> dd.NewItemReport | None | bool:
    """The new-product report; None without a catalog; False after a warning when the lake cannot be read."""
    s = settings()
    try:
        return _new_items(str(s.catalog_path), str(s.lake_dir), lake_cache_dir(), s.new_item_age_h, s.explore_share)
    except LAKE_ERRORS as err:
        _lake_error(err, "New products' impressions and clicks come from there.")
        return False


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def _quality_reports(quality_dir: str) -> list[dict]:
    return dd.fetch_quality_reports(quality_dir)


def quality_reports() -> list[dict]:
    return _quality_reports(str(settings().quality_dir))


def altair(chart, time_format: str = "%H:%M") -> None:
    """Render a chart; time axes label on a 24-hour clock (Vega-Lite's default mixes "08:45" with "08 PM")."""
    st.altair_chart(chart.configure_axisTemporal(format=time_format), width="stretch")
