"""What the Streamlit dashboard shows, computed from the counters in Redis and the MLflow registry.

Two kinds of functions:

* ``fetch_*`` read raw data (an :class:`~pipelines.state.OnlineState`, an MLflow
  tracking URI) and raise when a service cannot be reached;
* everything else is a pure function of those raw dicts (rates, the CTR z-test,
  per-minute DataFrames), so it is unit-tested without any service.

The pages in ``dashboard/app_pages`` only call these and render the results.

Counter names (written by serving, read here; the values live in
:mod:`pipelines.schemas`):

* ``STATS_REQUESTS`` (``requests``): how each ``/recommend`` was served
  (``cache`` | ``model`` | ``fallback``) plus ``cold_user`` (users with no
  history at all), ``cold_user_session`` (of those, served from their session)
  and ``cold_user_trending`` (no clicks yet, served trending).
* ``STATS_CACHE`` (``cache``): ``hit`` | ``miss``.
* ``ab:{variant}`` (see :func:`ab_stats_name`): impressions, clicks, carts,
  purchases per minute; totals per variant come from ``OnlineState.ab_counts()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from pipelines.schemas import (ALIAS_CHALLENGER, ALIAS_CHAMPION, REGISTERED_MODEL, SOURCE_CACHE, SOURCE_FALLBACK,
                               SOURCE_MODEL, STATS_CACHE, STATS_REQUESTS)
from pipelines.state import BUCKET_S, OnlineState

__all__ = [
    "STATS_REQUESTS", "STATS_CACHE", "REQUEST_SOURCES", "COLD_USER", "COLD_USER_SESSION", "COLD_USER_TRENDING",
    "COLD_FIELDS", "CACHE_HIT", "CACHE_MISS", "AB_FIELDS", "WINDOW_MINUTES", "ALPHA", "MIN_IMPRESSIONS",
    "ab_stats_name", "rate", "pct", "totals", "buckets_to_frame", "ab_table", "ab_timeseries", "ZTestResult",
    "ctr_ztest", "pick_ab_pair", "CacheSummary", "cache_summary", "cache_timeseries", "requests_by_source",
    "source_timeseries", "ColdStartSummary", "cold_start_summary", "cold_start_timeseries", "dlq_table",
    "ConsumerSummary", "consumer_summary", "redact_url", "Snapshot", "fetch_snapshot", "ModelVersionInfo",
    "MlflowUnavailable", "mlflow_reachable", "fetch_model_aliases",
]

# --- counter names (the contract with serving) ---------------------------------------
REQUEST_SOURCES = (SOURCE_CACHE, SOURCE_MODEL, SOURCE_FALLBACK)
COLD_USER = "cold_user"
COLD_USER_SESSION = "cold_user_session"
COLD_USER_TRENDING = "cold_user_trending"
COLD_FIELDS = (COLD_USER, COLD_USER_SESSION, COLD_USER_TRENDING)
CACHE_HIT = "hit"
CACHE_MISS = "miss"
AB_FIELDS = ("impressions", "clicks", "carts", "purchases")

WINDOW_MINUTES = 60
#: significance level of the CTR test
ALPHA = 0.05
#: below this many impressions in a variant the dashboard says "not enough data" instead of a verdict
MIN_IMPRESSIONS = 100


def ab_stats_name(variant: str) -> str:
    """Name of the per-minute A/B counters of one variant (for ``read_stats``/``incr_stats``)."""
    return f"ab:{variant}"


# --- generic helpers --------------------------------------------------------------------
Buckets = Mapping[int, Mapping[str, int]]


def rate(num: float, den: float) -> float | None:
    """``num / den``, or None when there is nothing to divide by."""
    return num / den if den else None


def pct(x: float | None, digits: int = 1) -> str:
    """A rate as ``"12.3 %"``; ``"–"`` when there is none (no denominator, NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.{digits}f} %"


def totals(buckets: Buckets, fields: Iterable[str]) -> dict[str, int]:
    """Sum of each field over all buckets (missing fields count 0)."""
    fields = list(fields)
    out = dict.fromkeys(fields, 0)
    for counts in buckets.values():
        for f in fields:
            out[f] += int(counts.get(f, 0))
    return out


def _minute_index(minutes: int, now_s: float) -> pd.DatetimeIndex:
    last = int(now_s) // BUCKET_S * BUCKET_S
    starts = [last - (minutes - 1 - i) * BUCKET_S for i in range(minutes)]
    return pd.DatetimeIndex(pd.to_datetime(starts, unit="s", utc=True), name="minute")


def buckets_to_frame(buckets: Buckets, fields: Sequence[str], *, minutes: int = WINDOW_MINUTES,
                     now_s: float | None = None) -> pd.DataFrame:
    """One row per minute of the last ``minutes`` (oldest first, UTC index ``minute``), one int column per field.

    Minutes without a bucket are 0; buckets outside the window are dropped.
    """
    index = _minute_index(minutes, time.time() if now_s is None else now_s)
    df = pd.DataFrame(0, index=index, columns=list(fields), dtype="int64")
    for start, counts in buckets.items():
        ts = pd.Timestamp(int(start), unit="s", tz="UTC")
        if ts in df.index:
            for f in fields:
                df.loc[ts, f] = int(counts.get(f, 0))
    return df


def _ratio_series(num: pd.Series, den: pd.Series) -> pd.Series:
    """Elementwise ``num / den`` as float, NaN where ``den`` is 0 (a gap in a line chart)."""
    return num.astype("float64") / den.where(den > 0).astype("float64")


# --- A/B ----------------------------------------------------------------------------------
def ab_table(counts: Mapping[str, Mapping[str, int]]) -> pd.DataFrame:
    """One row per variant (champion first, then challenger, then others by name).

    Columns: impressions, clicks, ctr (clicks / impressions), carts, purchases,
    conversion (purchases / impressions); rates are NaN without impressions.
    """
    cols = ["impressions", "clicks", "ctr", "carts", "purchases", "conversion"]
    rows = []
    for variant in sorted(counts, key=_variant_order):
        c = {f: int(counts[variant].get(f, 0)) for f in AB_FIELDS}
        imp = c["impressions"]
        rows.append({"variant": variant, **c,
                     "ctr": c["clicks"] / imp if imp else math.nan,
                     "conversion": c["purchases"] / imp if imp else math.nan})
    return pd.DataFrame(rows, columns=["variant", *cols]).set_index("variant")


def _variant_order(v: str) -> tuple[int, str]:
    return ({ALIAS_CHAMPION: 0, ALIAS_CHALLENGER: 1}.get(v, 2), v)


def ab_timeseries(per_variant: Mapping[str, Buckets], *, metrics: Sequence[str] = ("impressions", "clicks"),
                  minutes: int = WINDOW_MINUTES, now_s: float | None = None) -> pd.DataFrame:
    """Per-minute counts with one column per ``"{variant} {metric}"`` (e.g. ``"champion clicks"``)."""
    now_s = time.time() if now_s is None else now_s
    parts = []
    for variant in sorted(per_variant, key=_variant_order):
        df = buckets_to_frame(per_variant[variant], metrics, minutes=minutes, now_s=now_s)
        parts.append(df.rename(columns=lambda m, v=variant: f"{v} {m}"))
    if not parts:
        return pd.DataFrame(index=_minute_index(minutes, now_s))
    return pd.concat(parts, axis=1)


def pick_ab_pair(counts: Mapping[str, Mapping[str, int]]) -> tuple[str, str] | None:
    """The two variants to compare: champion vs challenger when both have impressions, else the two busiest."""
    live = {v: int(c.get("impressions", 0)) for v, c in counts.items() if int(c.get("impressions", 0)) > 0}
    if ALIAS_CHAMPION in live and ALIAS_CHALLENGER in live:
        return ALIAS_CHAMPION, ALIAS_CHALLENGER
    if len(live) < 2:
        return None
    a, b = sorted(live, key=lambda v: (-live[v], v))[:2]
    return tuple(sorted((a, b), key=_variant_order))


@dataclass(frozen=True)
class ZTestResult:
    """Two-proportion z-test of CTR, variant ``b`` against baseline ``a``."""

    a: str
    b: str
    impressions_a: int
    clicks_a: int
    impressions_b: int
    clicks_b: int
    ctr_a: float
    ctr_b: float
    z: float
    p_value: float
    alpha: float = ALPHA
    min_impressions: int = MIN_IMPRESSIONS

    @property
    def enough_data(self) -> bool:
        """Whether both variants have at least ``min_impressions`` (before that, no verdict)."""
        return min(self.impressions_a, self.impressions_b) >= self.min_impressions

    @property
    def significant(self) -> bool:
        return self.enough_data and self.p_value < self.alpha

    @property
    def lift(self) -> float | None:
        """Relative change of CTR from ``a`` to ``b`` (0.1 = +10 %)."""
        return (self.ctr_b - self.ctr_a) / self.ctr_a if self.ctr_a else None

    @property
    def verdict(self) -> str:
        """One plain-language sentence for people who do not read p-values."""
        a, b = f"{self.a} ({self.ctr_a:.2%})", f"{self.b} ({self.ctr_b:.2%})"
        if not self.enough_data:
            return (f"Not enough data yet: each variant needs at least {self.min_impressions} impressions "
                    f"(now {self.impressions_a} and {self.impressions_b}). Keep the experiment running.")
        if self.significant:
            (better, ctr_hi), (worse, ctr_lo) = sorted(((self.a, self.ctr_a), (self.b, self.ctr_b)),
                                                       key=lambda t: -t[1])
            return (f"{better} gets clicked more: CTR {ctr_hi:.2%} vs {ctr_lo:.2%} for {worse}. The difference is "
                    f"statistically significant (p = {self.p_value:.3g} < {self.alpha}), so it is unlikely to be chance.")
        return (f"No significant difference in CTR between {a} and {b} (p = {self.p_value:.3g} ≥ {self.alpha}): "
                f"the gap could be chance. Keep collecting traffic before deciding.")


def ctr_ztest(counts: Mapping[str, Mapping[str, int]], a: str | None = None, b: str | None = None, *,
              alpha: float = ALPHA, min_impressions: int = MIN_IMPRESSIONS) -> ZTestResult | None:
    """Pooled two-proportion z-test on clicks / impressions of two variants (two-sided).

    ``a`` and ``b`` default to :func:`pick_ab_pair`. Returns None when fewer
    than two variants have impressions. Clicks above impressions (events that
    arrived out of order) are capped at the impressions.
    """
    from scipy.stats import norm

    if a is None or b is None:
        pair = pick_ab_pair(counts)
        if pair is None:
            return None
        a, b = pair
    n_a, n_b = int(counts.get(a, {}).get("impressions", 0)), int(counts.get(b, {}).get("impressions", 0))
    if n_a <= 0 or n_b <= 0:
        return None
    x_a = min(int(counts[a].get("clicks", 0)), n_a)
    x_b = min(int(counts[b].get("clicks", 0)), n_b)
    p_a, p_b = x_a / n_a, x_b / n_b
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:  # nobody clicked anywhere, or everybody clicked everything: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = (p_b - p_a) / se
        p = float(2 * norm.sf(abs(z)))
    return ZTestResult(a, b, n_a, x_a, n_b, x_b, p_a, p_b, float(z), p, alpha, min_impressions)


# --- cache and request sources ----------------------------------------------------------
@dataclass(frozen=True)
class CacheSummary:
    hits: int
    misses: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return rate(self.hits, self.lookups)


def cache_summary(cache_buckets: Buckets) -> CacheSummary:
    t = totals(cache_buckets, (CACHE_HIT, CACHE_MISS))
    return CacheSummary(t[CACHE_HIT], t[CACHE_MISS])


def cache_timeseries(cache_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                     now_s: float | None = None) -> pd.DataFrame:
    """Per minute: hit, miss and hit_rate (NaN in minutes without lookups)."""
    df = buckets_to_frame(cache_buckets, (CACHE_HIT, CACHE_MISS), minutes=minutes, now_s=now_s)
    df["hit_rate"] = _ratio_series(df[CACHE_HIT], df[CACHE_HIT] + df[CACHE_MISS])
    return df


def requests_by_source(request_buckets: Buckets) -> pd.DataFrame:
    """Totals per source (cache, model, fallback) with their share of all requests."""
    t = totals(request_buckets, REQUEST_SOURCES)
    n = sum(t.values())
    return pd.DataFrame({"requests": [t[s] for s in REQUEST_SOURCES],
                         "share": [t[s] / n if n else math.nan for s in REQUEST_SOURCES]},
                        index=pd.Index(REQUEST_SOURCES, name="source"))


def source_timeseries(request_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                      now_s: float | None = None) -> pd.DataFrame:
    """Per minute: requests served from cache, model and fallback."""
    return buckets_to_frame(request_buckets, REQUEST_SOURCES, minutes=minutes, now_s=now_s)


# --- cold start ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColdStartSummary:
    requests: int
    cold: int
    from_session: int
    from_trending: int

    @property
    def cold_share(self) -> float | None:
        """Share of all requests that came from users with no history."""
        return rate(self.cold, self.requests)

    @property
    def session_share(self) -> float | None:
        """Of the cold requests, the share served from the user's session."""
        return rate(self.from_session, self.cold)

    @property
    def trending_share(self) -> float | None:
        """Of the cold requests, the share served trending items (no clicks yet)."""
        return rate(self.from_trending, self.cold)


def cold_start_summary(request_buckets: Buckets) -> ColdStartSummary:
    t = totals(request_buckets, (*REQUEST_SOURCES, *COLD_FIELDS))
    return ColdStartSummary(sum(t[s] for s in REQUEST_SOURCES), t[COLD_USER], t[COLD_USER_SESSION],
                            t[COLD_USER_TRENDING])


def cold_start_timeseries(request_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                          now_s: float | None = None) -> pd.DataFrame:
    """Per minute: requests, cold_user, cold_user_session, cold_user_trending and cold_share (NaN without requests)."""
    df = buckets_to_frame(request_buckets, (*REQUEST_SOURCES, *COLD_FIELDS), minutes=minutes, now_s=now_s)
    out = pd.DataFrame({"requests": df[list(REQUEST_SOURCES)].sum(axis=1)}, index=df.index)
    for f in COLD_FIELDS:
        out[f] = df[f]
    out["cold_share"] = _ratio_series(out[COLD_USER], out["requests"])
    return out


# --- ingestion ----------------------------------------------------------------------------------
def dlq_table(reasons: Mapping[str, int]) -> pd.DataFrame:
    """Rejected records per reason, most frequent first."""
    items = sorted(reasons.items(), key=lambda kv: (-int(kv[1]), kv[0]))
    return pd.DataFrame({"records": [int(n) for _, n in items]},
                        index=pd.Index([r for r, _ in items], name="reason"))


@dataclass(frozen=True)
class ConsumerSummary:
    lag: int | None
    rate_eps: float | None
    consumed: int | None
    updated_ago_s: float | None
    stale: bool


def consumer_summary(status: Mapping[str, str], *, now_s: float | None = None,
                     stale_after_s: float = 60.0) -> ConsumerSummary | None:
    """Parse the consumer's status hash; None when the consumer never wrote one.

    ``stale`` is true when the last update is older than ``stale_after_s`` (the consumer is probably down).
    """
    if not status:
        return None

    def num(key, cast):
        try:
            return cast(float(status[key]))
        except (KeyError, TypeError, ValueError):
            return None

    updated = num("updated_ts", float)
    now_s = time.time() if now_s is None else now_s
    ago = max(0.0, now_s - updated) if updated is not None else None
    return ConsumerSummary(num("lag", int), num("rate_eps", float), num("consumed", int), ago,
                           stale=ago is None or ago > stale_after_s)


# --- fetching -----------------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """The URL without its password, for messages shown to people."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


@dataclass
class Snapshot:
    """Everything the dashboard reads from Redis, taken at ``now_s``."""

    now_s: float
    minutes: int
    ab_counts: dict[str, dict[str, int]]
    ab_minutes: dict[str, dict[int, dict[str, int]]]
    requests: dict[int, dict[str, int]]
    cache: dict[int, dict[str, int]]
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    consumer_status: dict[str, str] = field(default_factory=dict)


def fetch_snapshot(state: OnlineState, minutes: int = WINDOW_MINUTES) -> Snapshot:
    """Read all dashboard counters of the last ``minutes``.

    Raises:
        redis.RedisError: when Redis cannot be reached.
    """
    now_s = time.time()
    counts = state.ab_counts()
    return Snapshot(
        now_s=now_s,
        minutes=minutes,
        ab_counts=counts,
        ab_minutes={v: state.read_stats(ab_stats_name(v), minutes) for v in counts},
        requests=state.read_stats(STATS_REQUESTS, minutes),
        cache=state.read_stats(STATS_CACHE, minutes),
        dlq_reasons=state.dlq_reasons(),
        consumer_status=state.consumer_status(),
    )


class MlflowUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached."""


@dataclass(frozen=True)
class ModelVersionInfo:
    alias: str
    version: str
    run_id: str | None
    created_ms: int | None
    metrics: dict[str, float]


def mlflow_reachable(tracking_uri: str, timeout_s: float = 1.5) -> bool:
    """Whether an HTTP tracking server answers ``/health``; other URIs (sqlite, file) count as reachable.

    Checked first because the MLflow client retries a dead server for a long time.
    """
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return True
    import httpx

    try:
        return httpx.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).status_code < 500
    except httpx.HTTPError:
        return False


def fetch_model_aliases(tracking_uri: str, name: str = REGISTERED_MODEL, *,
                        client_factory: Callable[[str], Any] | None = None,
                        aliases: Sequence[str] = (ALIAS_CHAMPION, ALIAS_CHALLENGER)) -> dict[str, ModelVersionInfo | None]:
    """The model version behind each alias; None for an alias (or a model) that does not exist.

    ``client_factory(tracking_uri)`` makes the ``MlflowClient`` (the dashboard
    passes a cached one); it is called only once the server answers. Metrics
    come from the ``metric.*`` tags that training sets on each version.

    Raises:
        MlflowUnavailable: when the tracking server cannot be reached.
    """
    if not mlflow_reachable(tracking_uri):
        raise MlflowUnavailable(f"no MLflow tracking server answers at {redact_url(tracking_uri)}")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = (client_factory(tracking_uri) if client_factory
                  else MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except Exception as err:  # a bad URI or an unreadable store
        raise MlflowUnavailable(f"cannot open MLflow at {redact_url(tracking_uri)}: {err}") from err
    out: dict[str, ModelVersionInfo | None] = {}
    for alias in aliases:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                                  "NOT_FOUND"):
                out[alias] = None
                continue
            raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err.message}") from err
        except Exception as err:
            raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err}") from err
        metrics = {}
        for k, v in (mv.tags or {}).items():
            if k.startswith("metric."):
                try:
                    metrics[k[len("metric."):]] = float(v)
                except ValueError:
                    pass
        out[alias] = ModelVersionInfo(alias, str(mv.version), mv.run_id, mv.creation_timestamp, metrics)
    return out
