"""Streamlit plumbing shared by the pages: settings, cached clients and queries, "service down" warnings.

Computation lives in :mod:`pipelines.dashboard_data`; this module only caches
and renders. Clients are ``st.cache_resource`` keyed by URL, queries are
``st.cache_data`` with a 5 s TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import altair as alt
import pandas as pd
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


def snapshot(minutes: int = dd.WINDOW_MINUTES, tag: str | None = None, *,
             quiet: bool = False) -> dd.Snapshot | None:
    """The Redis counters (A/B totals of the comparison ``tag``, default the latest), or None after showing a
    warning when Redis is down (``quiet``: no warning, for a second use on a page that shows it elsewhere)."""
    s = settings()
    try:
        return _snapshot(s.redis_url, ab_config().experiment, minutes, tag)
    except redis.RedisError as err:
        if quiet:
            return None
        st.warning(f"**Redis is down**: cannot reach `{dd.redact_url(s.redis_url)}` ({type(err).__name__}: {err}). "
                   f"The traffic, cache and cold-start counters live there. {START_HINT} "
                   "Elsewhere, point `SHOPREC_REDIS_URL` at a running Redis.", icon=":material/cloud_off:")
        return None


@st.cache_resource(show_spinner=False)
def _mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def _model_aliases(tracking_uri: str, name: str) -> dict[str, dd.ModelVersionInfo | None]:
    return dd.fetch_model_aliases(tracking_uri, name, client_factory=_mlflow_client)


def model_aliases() -> dict[str, dd.ModelVersionInfo | None] | None:
    """Champion/challenger versions, or None after showing a warning when MLflow is down."""
    s = settings()
    try:
        return _model_aliases(s.mlflow_tracking_uri, s.mlflow_model_name)
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
#: lake reads are cached under the window's files (:func:`pipelines.dashboard_agg.lake_version`), so a new file
#: shows at the next refresh; this bounds only how long an unchanged lake's numbers follow a clock that moved on
#: (the new-product window), and an entry for a window that no longer exists
LAKE_TTL_S = 60


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


def redis_info(*, quiet: bool = False) -> dd.RedisInfo | None:
    """Redis's memory and key counts, or None (after a warning, unless ``quiet``) when Redis is down."""
    s = settings()
    try:
        return _redis_info(s.redis_url, ab_config().experiment)
    except redis.RedisError as err:
        if not quiet:
            _redis_down(err, "Memory and key counts come from it.")
        return None


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def _trained_versions(tracking_uri: str, versions: tuple[str, ...], name: str) -> dict[str, str]:
    return dd.fetch_trained_versions(tracking_uri, versions, name, client_factory=_mlflow_client)


def trained_versions(versions) -> dict[str, str] | None:
    """The trained version behind each of ``versions`` (a refresh's ``trained_version`` tag, else itself), or None
    when MLflow cannot be asked (no warning: the caller says what it cannot tell)."""
    versions = tuple(sorted(set(map(str, versions))))
    if not versions:
        return {}
    try:
        return _trained_versions(settings().mlflow_tracking_uri, versions, settings().mlflow_model_name)
    except dd.MlflowUnavailable:
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


def skipped_files(skipped: list[dd.SkippedFile], what: str) -> None:
    """Name the lake files left out of the numbers below because they do not fit the lake schema."""
    if not skipped:
        return
    files = "\n".join(f"- `{f.path}`: {f.problem}" for f in skipped[:10])
    more = f"\n- and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    st.warning(f"**{len(skipped)} lake file(s) skipped**: they do not fit the lake schema "
               f"(`pipelines.lake.LAKE_SCHEMA`), so {what} leave them out. Export them again with the lake's column "
               f"types or move them out of `{settings().lake_dir}`; the Data quality page fails their hours too.\n"
               f"{files}{more}", icon=":material/rule:")


def lake_read_at(read: dd.LakeAB | dd.NewItemReport) -> None:
    """How fresh the lake numbers are: when the lake was read (it is read again as soon as a file is added)."""
    if read.read_at_s is not None:
        at = datetime.fromtimestamp(read.read_at_s, tz=timezone.utc)
        st.caption(f"Lake read at {at:%H:%M:%S} UTC; read again at the next refresh after a file arrives.")


def _lake_read(fetch: Callable[[str], object], hours: int, what: str):
    """``fetch(version)`` with the :func:`~pipelines.dashboard_agg.lake_version` of the last ``hours`` (the key its
    cache entry lives under), or False after a warning when the lake cannot be read."""
    s = settings()
    try:
        return fetch(dashboard_agg.lake_version(s.lake_dir, hours=hours))
    except LAKE_ERRORS as err:  # an unreadable folder must not take the page down
        _lake_error(err, what)
        return False


@st.cache_data(ttl=LAKE_TTL_S, show_spinner=False, max_entries=16)
def _lake_ab(lake_dir: str, cache_dir: str, hours: int, version: str) -> dd.LakeAB:
    return dashboard_agg.fetch_lake_ab(lake_dir, cache_dir, hours=hours)


def lake_ab() -> dd.LakeAB | None:
    """Revenue of every impression and users per variant from the lake; None (after a warning) when unreadable."""
    s = settings()
    got = _lake_read(lambda version: _lake_ab(str(s.lake_dir), lake_cache_dir(), s.dashboard_lake_hours, version),
                     s.dashboard_lake_hours, "Revenue per impression comes from the purchases there.")
    return None if got is False else got


@st.cache_data(ttl=LAKE_TTL_S, show_spinner=False, max_entries=16)
def _new_items(catalog_path: str, lake_dir: str, cache_dir: str, age_h: float, explore_share: float,
               version: str) -> dd.NewItemReport | None:
    return dashboard_agg.fetch_new_item_report(catalog_path, lake_dir, cache_dir, age_h=age_h,
                                               explore_share=explore_share, hours=new_item_hours(age_h))


def new_item_hours(age_h: float) -> int:
    """Hours of the lake the new-product report reads: twice the age that makes a product new, and the hour now."""
    return int(2 * age_h) + 1


def new_items() -> dd.NewItemReport | None | bool:
    """The new-product report; None without a catalog; False after a warning when the lake cannot be read."""
    s = settings()
    return _lake_read(lambda version: _new_items(str(s.catalog_path), str(s.lake_dir), lake_cache_dir(),
                                                 s.new_item_age_h, s.explore_share, version),
                      new_item_hours(s.new_item_age_h), "New products' impressions and clicks come from there.")


@st.cache_data(ttl=SLOW_TTL_S, show_spinner=False)
def _quality_reports(quality_dir: str) -> list[dict]:
    return dd.fetch_quality_reports(quality_dir)


def quality_reports() -> list[dict]:
    return _quality_reports(str(settings().quality_dir))


def time_x(field: str, times, *, min_step_ms: int = 60_000, title: str | None = None) -> alt.X:
    """A time x axis over ``times`` whose labels never repeat (:func:`pipelines.dashboard_data.time_ticks`)."""
    ms = pd.to_datetime(pd.Series(times), utc=True).dropna().dt.as_unit("ms").astype("int64")
    lo, hi = (int(ms.min()), int(ms.max())) if len(ms) else (0, 0)
    ticks, fmt, domain = dd.time_ticks(lo, hi, min_step_ms=min_step_ms)

    def iso(ms: list[int]) -> list[str]:  # the browser's Vega-Lite reads epoch numbers here as no time at all
        return [t.isoformat() for t in pd.to_datetime(ms, unit="ms", utc=True)]

    return alt.X(f"{field}:T", title=title, axis=alt.Axis(values=iso(ticks), format=fmt),
                 scale=alt.Scale(domain=iso(domain)))


def _value_y(field: str, values, min_step: float, fmt, title: str | None, **kw) -> alt.Y:
    v = pd.to_numeric(pd.Series(values, dtype="float64"), errors="coerce")
    ticks = dd.value_ticks(v.min(), v.max(), min_step=min_step)
    return alt.Y(f"{field}:Q", title=title, axis=alt.Axis(values=ticks, format=fmt(ticks[1] - ticks[0])),
                 scale=alt.Scale(domain=[ticks[0], ticks[-1]]), **kw)


def count_y(field: str, values, title: str | None = None, **kw) -> alt.Y:
    """A y axis of counts over ``values`` (stacked totals where bars stack): whole numbers only."""
    return _value_y(field, values, 1, lambda step: ",d", title, **kw)


def share_y(field: str, values, title: str | None = None, **kw) -> alt.Y:
    """A y axis of rates over ``values``, as percentages with the decimals their tick step needs (0.1 pp at least)."""
    return _value_y(field, values, 0.001, dd.percent_format, title, **kw)


def altair(chart, time_format: str = "%H:%M") -> None:
    """Render a chart; time axes label on a 24-hour clock (Vega-Lite's default mixes "08:45" with "08 PM")."""
    st.altair_chart(chart.configure_axisTemporal(format=time_format), width="stretch")
