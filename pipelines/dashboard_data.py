"""What the Streamlit dashboard shows, computed from the counters in Redis, the event lake, the
catalog, the Great Expectations reports and the MLflow registry.

Two kinds of functions:

* ``fetch_*`` read raw data (an :class:`~pipelines.state.OnlineState`, an MLflow
  tracking URI, the lake and catalog Parquet files, the GX report folder) and raise
  when a service cannot be reached;
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
* ``ab:{tag}:{variant}`` (see :func:`ab_stats_name`): impressions, clicks, carts,
  purchases per minute of one comparison (``tag``: the experiment and the versions served,
  :meth:`pipelines.experiment.Experiment.tag`); totals per variant come from :func:`fetch_ab_counts`.
* ``events`` (one field per event type, written by the stream consumer) and
  ``latency:{source}`` (histogram, field = upper bucket edge in ms or ``inf``).

The A/B statistics themselves live in :mod:`pipelines.abstats`.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from pipelines.schemas import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    EVENT_TYPES,
    LATENCY_EDGES_MS,
    REDIS_PREFIX,
    REGISTERED_MODEL,
    SOURCE_CACHE,
    SOURCE_FALLBACK,
    SOURCE_MODEL,
    STATS_CACHE,
    STATS_EVENTS,
    STATS_LATENCY,
    STATS_REQUESTS,
    TAG_CHAMPION_HOLDOUT_NDCG,
    TAG_DATA_WINDOW_END,
    TAG_DATA_WINDOW_START,
    TAG_HOLDOUT,
    TAG_TRAINED_VERSION,
)
from pipelines.state import (
    BUCKET_S,
    TRAINED_FIELD,
    OnlineState,
    ab_keys,
    ab_stats_name,
    ab_variant,
)

__all__ = [
    "STATS_REQUESTS", "STATS_CACHE", "REQUEST_SOURCES", "COLD_USER", "COLD_USER_SESSION", "COLD_USER_TRENDING",
    "COLD_FIELDS", "CACHE_HIT", "CACHE_MISS", "AB_FIELDS", "WINDOW_MINUTES", "ALPHA", "MIN_IMPRESSIONS",
    "ab_stats_name", "rate", "pct", "totals", "buckets_to_frame", "ab_table", "ab_timeseries", "ZTestResult",
    "ctr_ztest", "pick_ab_pair", "CacheSummary", "cache_summary", "cache_timeseries", "cache_in_progress",
    "minute_in_progress", "complete_minutes", "requests_by_source",
    "source_timeseries", "ColdStartSummary", "cold_start_summary", "cold_start_timeseries", "dlq_table",
    "ConsumerSummary", "consumer_summary", "redact_url", "Snapshot", "fetch_ab_counts", "fetch_snapshot",
    "ModelVersionInfo",
    "MlflowUnavailable", "mlflow_reachable", "fetch_model_aliases", "fetch_trained_versions", "is_quality_metric",
    "metric_label", "model_lines", "other_figures", "comparison_arms", "served_lineage", "served_arms_note", "catalog_line", "CATALOG_DLQ_PREFIX",
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


def latency_stats_name(source: str) -> str:
    """Name of the per-minute latency histogram of one request source (``latency:cache`` ...)."""
    return f"{STATS_LATENCY}:{source}"


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
    fields = list(fields)
    if not buckets:
        return pd.DataFrame(0, index=index, columns=fields, dtype="int64")
    starts = list(buckets)
    values = [[int(buckets[b].get(f, 0)) for f in fields] for b in starts]
    raw = pd.DataFrame(values, columns=fields, dtype="int64",
                       index=pd.to_datetime([int(b) for b in starts], unit="s", utc=True))
    raw = raw.groupby(level=0).sum()
    return raw.reindex(index, fill_value=0).astype("int64").rename_axis("minute")


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


def minute_in_progress(now_s: float) -> int:
    """Start (epoch s) of the minute that is still running at ``now_s``: its counters are still growing."""
    return int(now_s) // BUCKET_S * BUCKET_S


def complete_minutes(per_minute: pd.DataFrame, now_s: float) -> pd.DataFrame:
    """``per_minute`` (indexed by minute, UTC) without the minute in progress at ``now_s``: what a line of a rate
    per minute draws, since that minute's rate rests on its first few counts and swings at every refresh."""
    return per_minute[per_minute.index < pd.Timestamp(minute_in_progress(now_s), unit="s", tz="UTC")].copy()


def cache_timeseries(cache_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                     now_s: float | None = None) -> pd.DataFrame:
    """Per complete minute of the last ``minutes``: hit, miss and hit_rate (NaN in minutes without lookups).

    The minute in progress is left out (``minutes - 1`` rows): a few seconds into a minute its rate rests on a
    handful of lookups, so the line's last point would swing at every refresh. :func:`cache_summary` of the same
    buckets still counts it; :func:`cache_in_progress` gives it alone.
    """
    now_s = time.time() if now_s is None else now_s
    df = complete_minutes(buckets_to_frame(cache_buckets, (CACHE_HIT, CACHE_MISS), minutes=minutes, now_s=now_s),
                          now_s)
    df["hit_rate"] = _ratio_series(df[CACHE_HIT], df[CACHE_HIT] + df[CACHE_MISS])
    return df


def cache_in_progress(cache_buckets: Buckets, *, now_s: float | None = None) -> CacheSummary:
    """The lookups of the minute in progress alone (what :func:`cache_timeseries` leaves off its line)."""
    current = minute_in_progress(time.time() if now_s is None else now_s)
    return cache_summary({b: c for b, c in cache_buckets.items() if int(b) == current})


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
    scored: int = 0  # requests the model answered: the only ones whose user is known to be new or not

    @property
    def cold_share(self) -> float | None:
        """Of the requests the model answered, the share from users with no history (a cache hit or the fallback
        is not looked at)."""
        return rate(self.cold, self.scored)

    @property
    def session_share(self) -> float | None:
        """Of the cold requests, the share served from the user's session (a click the model could use)."""
        return rate(self.from_session, self.cold)

    @property
    def trending_share(self) -> float | None:
        """Of the cold requests, the share served trending items (no clicks yet)."""
        return rate(self.from_trending, self.cold)


def cold_start_summary(request_buckets: Buckets) -> ColdStartSummary:
    t = totals(request_buckets, (*REQUEST_SOURCES, *COLD_FIELDS))
    return ColdStartSummary(sum(t[s] for s in REQUEST_SOURCES), t[COLD_USER], t[COLD_USER_SESSION],
                            t[COLD_USER_TRENDING], t[SOURCE_MODEL])


def cold_start_timeseries(request_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                          now_s: float | None = None) -> pd.DataFrame:
    """Per minute: requests, cold_user, cold_user_session, cold_user_trending and cold_share (of the requests the
    model answered; NaN without any)."""
    df = buckets_to_frame(request_buckets, (*REQUEST_SOURCES, *COLD_FIELDS), minutes=minutes, now_s=now_s)
    out = pd.DataFrame({"requests": df[list(REQUEST_SOURCES)].sum(axis=1)}, index=df.index)
    for f in COLD_FIELDS:
        out[f] = df[f]
    out["cold_share"] = _ratio_series(out[COLD_USER], df[SOURCE_MODEL])
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
    last_commit_ago_s: float | None = None
    members: int | None = None  # consumers reporting (None: a status written without members)
    idle_members: int | None = None  # of those, how many own no partition


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
    commit = num("last_commit_ts", float)
    commit_ago = max(0.0, now_s - commit) if commit else None
    return ConsumerSummary(num("lag", int), num("rate_eps", float), num("consumed", int), ago,
                           stale=ago is None or ago > stale_after_s, last_commit_ago_s=commit_ago,
                           members=num("members", int), idle_members=num("idle_members", int))


#: prefix of the catalog feed's reasons in the dead-letter counts (:meth:`pipelines.catalog_feed.CatalogSync._report`)
CATALOG_DLQ_PREFIX = "catalog_"


def catalog_line(status: Mapping[str, str], *, now_s: float | None = None,
                 dlq_reasons: Mapping[str, int] | None = None) -> str | None:
    """One line on what the catalog feed last reported; None when it never applied a record.

    The rejects counted are the ``catalog_*`` reasons of the dead-letter counts (``dlq_reasons``): a total that
    Redis keeps across restarts of the stack (its data lives in ``var/redis``). The status hash's own
    ``rejected`` is the count of the feed process that last reported, and it stays in Redis after that process
    stopped, so a restarted stack showed the last run's rejects as "since the feed started" until the new feed
    received a record; it is used only when ``dlq_reasons`` is not given, and said to be the last run's.
    """
    try:
        products, out = (int(status[k]) for k in ("products", "out_of_stock"))
    except (KeyError, TypeError, ValueError):
        return None
    try:
        ago = max(0.0, (time.time() if now_s is None else now_s) - int(status["updated_ms"]) / 1000)
        last = f"last change from `shop.catalog` {fmt_age(ago)} ago"
    except (KeyError, TypeError, ValueError):
        last = "no change applied yet"
    head = f"Catalog: {products:,} products ({out:,} out of stock), {last}; "
    if dlq_reasons is not None:
        rejected = sum(int(n) for r, n in dlq_reasons.items() if str(r).startswith(CATALOG_DLQ_PREFIX))
        return (head + f"{rejected:,} catalog record(s) rejected in total (a count kept in Redis across restarts; "
                f"the reasons are the `{CATALOG_DLQ_PREFIX}*` rows of the dead-letter table).")
    try:
        rejected = int(status["rejected"])
    except (KeyError, TypeError, ValueError):
        return head.rstrip("; ") + "."
    return head + f"{rejected:,} catalog record(s) rejected by the feed's last run that reported."


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
    ab_counts: dict[str, dict[str, int]]  # of the comparison ``ab_tag``
    requests: dict[int, dict[str, int]]
    cache: dict[int, dict[str, int]]
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    consumer_status: dict[str, str] = field(default_factory=dict)
    catalog_status: dict[str, str] = field(default_factory=dict)
    #: the versions the API serves per alias, and ``updated_ts`` (:meth:`OnlineState.set_serving_status`)
    serving_status: dict[str, str] = field(default_factory=dict)
    events: dict[int, dict[str, int]] = field(default_factory=dict)
    latency: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)
    #: the experiment's comparisons, ``(tag, first_ts_ms, last_ts_ms)``, most recent first (OnlineState.ab_comparisons)
    ab_comparisons: list[tuple[str, int, int]] = field(default_factory=list)
    ab_tag: str = ""
    #: clicks, carts and purchases left out of every comparison, per event type (their request's impression never
    #: arrived), and under ``waiting`` the requests whose actions still wait for it (OnlineState.ab_attribution_gaps)
    ab_gaps: dict[str, int] = field(default_factory=dict)


def fetch_ab_counts(state: OnlineState, tag: str, scan_count: int = 10_000) -> dict[str, dict[str, int]]:
    """Totals per variant of the comparison ``tag``, like ``OnlineState.ab_counts(tag)`` but in a few round trips.

    A week of per-minute counters is ~70 k keys; a SCAN with Redis' default page of 10 keys takes thousands
    of round trips to find the two A/B hashes, so this asks for ``scan_count`` keys per page and reads the
    hashes in one pipeline.

    Raises:
        redis.RedisError: when Redis cannot be reached.
    """
    keys = ab_keys(state.r, tag, scan_count)
    p = state.r.pipeline(transaction=False)
    for key in keys:
        p.hgetall(key)
    return {ab_variant(key, tag): {f: int(v) for f, v in got.items()} for key, got in zip(keys, p.execute())}


def comparison_label(tag: str, first_ms: int | None = None, last_ms: int | None = None) -> str:
    """A comparison as people read it: ``champion v2 vs challenger v3 (12-06 22:10 – 22:45 UTC)``."""
    from datetime import datetime, timezone

    _, at, arms = tag.partition("@")
    what = " vs ".join(f"{v} v{n}" for v, _, n in (a.rpartition(".") for a in arms.split(":"))) if at else \
        "untagged (logged before impressions named their versions, or with no model served)"
    if first_ms is None:
        return what

    def fmt(ms: int, f: str) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime(f)

    same_day = last_ms is None or fmt(first_ms, "%m-%d") == fmt(last_ms, "%m-%d")
    end = "" if last_ms is None else f" – {fmt(last_ms, '%H:%M' if same_day else '%m-%d %H:%M')}"
    return f"{what} ({fmt(first_ms, '%m-%d %H:%M')}{end} UTC)"


def comparison_arms(tag: str) -> list[tuple[str, str]]:
    """The arms of a comparison tag as ``(variant, trained version)``, in the experiment's order
    (``exp@champion.1:challenger.4`` -> ``[("champion", "1"), ("challenger", "4")]``); empty when untagged."""
    _, at, arms = tag.partition("@")
    if not at:
        return []
    return [(v, n) for v, _, n in (a.rpartition(".") for a in arms.split(":")) if v and n]


def served_lineage(serving: Mapping[str, str]) -> dict[str, str]:
    """``{served version: the trained version it comes from}`` as the API reports them in the serving status
    (:meth:`OnlineState.set_serving_status`; an API older than that reports none, and MLflow is asked instead)."""
    return {serving[alias]: trained for field, trained in serving.items() if field.startswith(TRAINED_FIELD)
            and serving.get(alias := field[len(TRAINED_FIELD):])}


def served_arms_note(tag: str, serving: Mapping[str, str], trained: Mapping[str, str] | None) -> str | None:
    """What the API serves now for each arm of the comparison ``tag``, as people read it; None when untagged.

    A comparison names each arm's *trained* version (:meth:`pipelines.experiment.Experiment.tag`): the hourly
    refresh registers a new version (fresher neighbours and trending, the same embeddings) that carries a
    ``trained_version`` tag and continues the comparison, so the A/B page's "champion v1" is served as v5 while
    the Overview (the registry's aliases) says v5. ``serving`` is :meth:`OnlineState.serving_status` (alias ->
    served version); ``trained`` maps a served version to the version it was trained as
    (:func:`fetch_trained_versions`; None when MLflow cannot be asked).

    e.g. ``champion v1 (served as v5, its hourly refresh) vs challenger v4 (served as v4)``.
    """
    arms = comparison_arms(tag)
    if not arms:
        return None
    if not any(serving.get(v) for v, _ in arms) and not serving.get(ALIAS_CHAMPION):
        return "not known: the API has not reported what it serves (it does while it answers requests)"
    parts = []
    for variant, version in arms:
        served = serving.get(variant) or None
        if served is None:
            now = "not served now"
        elif served == version:
            now = f"served as v{served}"
        else:
            origin = (trained or {}).get(served)
            if origin == version:
                now = f"served as v{served}, its hourly refresh"
            elif origin is None:
                now = (f"the API serves v{served} now; MLflow did not say which trained version that is, "
                       "so whether it continues this comparison is unknown")
            elif origin == served:
                now = f"no longer served: the API serves v{served} now"
            else:
                now = f"no longer served: the API serves v{served} now, a refresh of v{origin}"
        parts.append(f"{variant} v{version} ({now})")
    return " vs ".join(parts)


def attribution_gap_note(gaps: dict[str, int]) -> str | None:
    """A line for the A/B page about the clicks, carts and purchases no comparison counts (yet), from
    :attr:`Snapshot.ab_gaps`; None when there are none."""
    from pipelines import state

    minutes = state.AB_WAIT_S // 60
    gone = {et: n for et, n in gaps.items() if et != "waiting" and n}
    parts = []
    if gone:
        listed = ", ".join(f"{n:,} {et.replace('_', ' ')}{'' if n == 1 else 's'}" for et, n in sorted(gone.items()))
        parts.append(f"Left out of every comparison: {listed} that named a request_id whose impression did not "
                     f"reach Kafka within {minutes} minutes (the API's impression buffer was full, or the shop sent "
                     f"a request_id it did not get from /recommend).")
    if gaps.get("waiting"):
        n = gaps["waiting"]
        parts.append(f"Waiting for their impression: the clicks, carts or purchases of {n:,} request{'' if n == 1 else 's'}"
                     f" (sent before the API's impression reached Kafka); they count once it does, for up to "
                     f"{minutes} minutes.")
    return " ".join(parts) or None


def fetch_snapshot(state: OnlineState, minutes: int = WINDOW_MINUTES, tag: str | None = None) -> Snapshot:
    """Read all dashboard counters of the last ``minutes``; the A/B totals of the comparison ``tag`` (default: the
    most recently seen one).

    Raises:
        redis.RedisError: when Redis cannot be reached.
    """
    now_s = time.time()
    comparisons = state.ab_comparisons()
    if tag is None:
        tag = comparisons[0][0] if comparisons else state.experiment
    return Snapshot(
        now_s=now_s,
        minutes=minutes,
        ab_counts=fetch_ab_counts(state, tag),
        ab_comparisons=comparisons,
        ab_tag=tag,
        ab_gaps=state.ab_attribution_gaps(),
        requests=state.read_stats(STATS_REQUESTS, minutes),
        cache=state.read_stats(STATS_CACHE, minutes),
        dlq_reasons=state.dlq_reasons(),
        consumer_status=state.consumer_status(),
        catalog_status=state.catalog_status(),
        serving_status=state.serving_status(),
        events=state.read_stats(STATS_EVENTS, minutes),
        latency={src: state.read_stats(latency_stats_name(src), minutes) for src in REQUEST_SOURCES},
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
    window_start: str | None = None
    window_end: str | None = None
    #: what the metrics were measured on: each version on the holdout of its own training window
    holdout: str | None = None
    #: the champion's NDCG on this version's holdout (when it was registered), the one number comparable with its own
    champion_on_holdout: float | None = None
    #: figures logged with the metrics that are no quality on the holdout (a refresh's ``refresh_seconds``, the
    #: refreshed version's score ``source_ndcg_at_10``): ``metrics`` holds the quality metrics only
    other_metrics: dict[str, float] = field(default_factory=dict)
    #: a refreshed version (:mod:`pipelines.refresh`): the version it refreshed, the version ``train_job`` trained
    #: that its embeddings come from, the refresh's own window, and that trained version's window (None: unknown)
    refresh_of: str | None = None
    trained_version: str | None = None
    refresh_window_start: str | None = None
    refresh_window_end: str | None = None
    trained_window_start: str | None = None
    trained_window_end: str | None = None

    @property
    def refreshed(self) -> bool:
        """Whether this version is an hourly refresh of a trained one (not trained by ``train_job`` itself)."""
        return self.trained_version is not None and self.trained_version != self.version


#: tags of a refreshed version (the values of :data:`pipelines.refresh.TAG_REFRESH_OF` ...; not imported from
#: there, which would import the training code into the dashboard)
TAG_REFRESH_OF, TAG_REFRESH_WINDOW_START, TAG_REFRESH_WINDOW_END = ("refresh_of", "refresh_window_start",
                                                                    "refresh_window_end")
#: the offline quality metrics :func:`pipelines.metrics.evaluate` logs, as MLflow names them (``ndcg_at_10``)
_QUALITY_METRIC = re.compile(r"(ndcg|recall|mrr|hit|precision|map)_at_(\d+)").fullmatch


def is_quality_metric(name: str) -> bool:
    """Whether ``name`` (an MLflow metric name) is a quality metric at k (``ndcg_at_10``), not a timing, a size or
    a score of another version."""
    return _QUALITY_METRIC(name) is not None


def metric_label(name: str) -> str:
    """A metric name as people write it: ``ndcg_at_10`` -> ``ndcg@10``."""
    return name.replace("_at_", "@")


def _window(start: str | None, end: str | None) -> str:
    return f"{(start or '?')[:16]} → {(end or '?')[:16]}"


def model_lines(info: ModelVersionInfo) -> list[str]:
    """What the Overview says of one registered version below its number: the data it saw and its quality
    metrics on its own holdout (the other figures logged with them: :func:`other_figures`).

    A refreshed version's embeddings come from the version ``train_job`` trained (``trained_version``) and its
    neighbours and trending from the refresh window, so both windows are named when they differ; its own
    ``data_window_*`` tags span both, which read as if the embeddings had seen the refresh's hours.
    """
    lines = []
    if info.refreshed:
        trained = (_window(info.trained_window_start, info.trained_window_end)
                   if info.trained_window_start or info.trained_window_end else None)
        refresh = (_window(info.refresh_window_start, info.refresh_window_end)
                   if info.refresh_window_start or info.refresh_window_end
                   else _window(info.window_start, info.window_end))
        if trained == refresh:
            lines.append(f"trained on {trained} (v{info.trained_version}), refreshed on the same window")
        else:
            lines.append(f"embeddings trained on {trained} (v{info.trained_version})" if trained else
                         f"embeddings from v{info.trained_version} (its training window is not recorded)")
            lines.append(f"neighbours and trending refreshed on {refresh}")
    elif info.window_start or info.window_end:
        lines.append(f"trained on {_window(info.window_start, info.window_end)}")
    if info.metrics:
        lines.append(f"on its own holdout ({info.holdout or 'not recorded'}): "
                     + ", ".join(f"{metric_label(k)} {v:.4f}" for k, v in sorted(info.metrics.items())))
    if info.champion_on_holdout is not None and info.alias != ALIAS_CHAMPION:
        lines.append(f"the champion on this holdout: ndcg {info.champion_on_holdout:.4f}")
    return lines


def other_figures(info: ModelVersionInfo) -> list[str]:
    """The figures logged with a version's metrics that are not its quality (``other_metrics``), each labelled:
    the score of the version a refresh came from on the same holdout (``source_*``), the refresh's duration, and
    any other figure by its MLflow name."""
    other = dict(info.other_metrics)
    source = {k[len("source_"):]: other.pop(k) for k in sorted(other)
              if k.startswith("source_") and is_quality_metric(k[len("source_"):])}
    lines = []
    if source:
        before = f"v{info.refresh_of}" if info.refresh_of else "the version it refreshed"
        lines.append(f"{before} before this refresh, on the same holdout: "
                     + ", ".join(f"{metric_label(k)} {v:.4f}" for k, v in source.items()))
    if "refresh_seconds" in other:
        lines.append(f"the refresh took {other.pop('refresh_seconds'):.1f} s")
    lines += [f"{k} {v:g}" for k, v in sorted(other.items())]
    return lines


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
    come from the ``metric.*`` tags that training sets on each version: the quality
    metrics at k in ``metrics``, the rest (a refresh's timing, the refreshed version's
    score) in ``other_metrics``. For a refreshed version the trained version's tags are
    read too, for the window its embeddings were trained on.

    Raises:
        MlflowUnavailable: when the tracking server cannot be reached.
    """
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(tracking_uri, client_factory)

    def one(alias: str) -> ModelVersionInfo | None:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                                  "NOT_FOUND"):
                return None
            raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err.message}") from err
        except Exception as err:
            raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err}") from err
        metrics, other = {}, {}
        for k, v in (mv.tags or {}).items():
            if k.startswith("metric."):
                try:
                    name_ = k[len("metric."):]
                    (metrics if is_quality_metric(name_) else other)[name_] = float(v)
                except ValueError:
                    pass
        tags = mv.tags or {}
        try:
            champion_ndcg = float(tags[TAG_CHAMPION_HOLDOUT_NDCG])
        except (KeyError, ValueError):  # absent, or "" when there was no champion to score
            champion_ndcg = None
        trained = tags.get(TAG_TRAINED_VERSION) or None
        trained_tags = {}
        if trained is not None and trained != str(mv.version):  # a refresh: the window its embeddings saw
            trained_tags = _version_tags(client, name, trained, tracking_uri) or {}
        return ModelVersionInfo(alias, str(mv.version), mv.run_id, mv.creation_timestamp, metrics,
                                tags.get(TAG_DATA_WINDOW_START), tags.get(TAG_DATA_WINDOW_END),
                                tags.get(TAG_HOLDOUT) or None, champion_ndcg, other,
                                tags.get(TAG_REFRESH_OF) or None, trained,
                                tags.get(TAG_REFRESH_WINDOW_START), tags.get(TAG_REFRESH_WINDOW_END),
                                trained_tags.get(TAG_DATA_WINDOW_START), trained_tags.get(TAG_DATA_WINDOW_END))

    # the aliases side by side: each is one or two round trips to a server that may sit on a busy machine
    with ThreadPoolExecutor(max_workers=max(1, len(aliases)), thread_name_prefix="mlflow-alias") as pool:
        out = dict(zip(aliases, pool.map(one, aliases)))
    return out


def _mlflow_client(tracking_uri: str, client_factory: Callable[[str], Any] | None):
    """An ``MlflowClient`` of a server that answers (``client_factory``: the dashboard's cached one).

    Raises:
        MlflowUnavailable: no server answers, or the client cannot be made (a bad URI, an unreadable store).
    """
    if not mlflow_reachable(tracking_uri):
        raise MlflowUnavailable(f"no MLflow tracking server answers at {redact_url(tracking_uri)}")
    from mlflow import MlflowClient

    try:
        return (client_factory(tracking_uri) if client_factory
                else MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except Exception as err:  # a bad URI or an unreadable store
        raise MlflowUnavailable(f"cannot open MLflow at {redact_url(tracking_uri)}: {err}") from err


def _version_tags(client, name: str, version: str, tracking_uri: str) -> dict[str, str] | None:
    """The tags of one model version; None when the version does not exist (deleted).

    Raises:
        MlflowUnavailable: when MLflow fails otherwise.
    """
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_model_version(name, str(version)).tags or {})
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err.message}") from err
    except Exception as err:
        raise MlflowUnavailable(f"MLflow at {redact_url(tracking_uri)} failed: {err}") from err


def fetch_trained_versions(tracking_uri: str, versions: Iterable[str], name: str = REGISTERED_MODEL, *,
                           client_factory: Callable[[str], Any] | None = None) -> dict[str, str]:
    """For each of ``versions``, the version ``train_job`` trained that it comes from: its ``trained_version``
    tag (set by the hourly refresh), else itself. Versions that do not exist are left out.

    Raises:
        MlflowUnavailable: when the tracking server cannot be reached.
    """
    client = _mlflow_client(tracking_uri, client_factory)
    out = {}
    for v in dict.fromkeys(map(str, versions)):
        tags = _version_tags(client, name, v, tracking_uri)
        if tags is not None:
            out[v] = tags.get(TAG_TRAINED_VERSION) or v
    return out


# --- overview: events, serving rate and latency -----------------------------------------------------
def events_timeseries(event_buckets: Buckets, *, minutes: int = WINDOW_MINUTES,
                      now_s: float | None = None) -> pd.DataFrame:
    """Per minute: events consumed by type (one column per type in ``EVENT_TYPES``)."""
    return buckets_to_frame(event_buckets, EVENT_TYPES, minutes=minutes, now_s=now_s)


def requests_per_second(request_buckets: Buckets, *, last_minutes: int = 5, now_s: float | None = None) -> float:
    """Mean ``/recommend`` requests per second over the last ``last_minutes`` complete minutes."""
    now_s = time.time() if now_s is None else now_s
    current = int(now_s) // BUCKET_S * BUCKET_S
    lo = current - last_minutes * BUCKET_S
    n = sum(int(c.get(s, 0)) for start, c in request_buckets.items() if lo <= int(start) < current
            for s in REQUEST_SOURCES)
    return n / (last_minutes * BUCKET_S)


LATENCY_FIELDS = tuple(str(e) for e in LATENCY_EDGES_MS) + ("inf",)


def latency_histogram(hist_buckets: Buckets) -> pd.Series:
    """Total count per histogram bucket (index = upper edge in ms, ``inf`` last)."""
    t = totals(hist_buckets, LATENCY_FIELDS)
    return pd.Series([t[f] for f in LATENCY_FIELDS], index=pd.Index(LATENCY_FIELDS, name="le_ms"), dtype="int64")


def latency_quantile(hist: pd.Series, q: float) -> float | None:
    """The ``q`` quantile (0-1) of a latency histogram as the upper edge (ms) of the bucket that holds it.

    An upper bound: the true quantile lies in that bucket. ``inf`` when it falls past the last edge,
    None without observations.
    """
    total = int(hist.sum())
    if total == 0:
        return None
    rank = q * total
    for edge, cum in zip(hist.index, hist.cumsum()):
        if cum >= rank:
            return math.inf if edge == "inf" else float(edge)
    return math.inf


@dataclass(frozen=True)
class LatencySummary:
    source: str
    requests: int
    p50_ms: float | None
    p99_ms: float | None


def latency_summary(latency: Mapping[str, Buckets], sources: Sequence[str] = REQUEST_SOURCES) -> pd.DataFrame:
    """One row per source (and ``all``): requests, p50_ms, p99_ms (bucket upper edges, NaN without data)."""
    rows = []
    hists = {src: latency_histogram(latency.get(src, {})) for src in sources}
    hists["all"] = sum(hists.values(), latency_histogram({}))
    for src, h in hists.items():
        p50, p99 = latency_quantile(h, 0.5), latency_quantile(h, 0.99)
        rows.append({"source": src, "requests": int(h.sum()),
                     "p50_ms": math.nan if p50 is None else p50, "p99_ms": math.nan if p99 is None else p99})
    return pd.DataFrame(rows).set_index("source")


def fmt_ms(x: float | None) -> str:
    """``"≤ 15 ms"`` (histogram quantiles are bucket upper edges), ``"> 2500 ms"`` past the last edge."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return f"> {LATENCY_EDGES_MS[-1]} ms"
    return f"≤ {x:g} ms"


def served_note(alias: str, registered: str | None, serving: Mapping[str, str], *,
                now_s: float | None = None) -> tuple[str, bool]:
    """What the API serves under ``alias`` against the registry's ``registered`` version: ``(text, alarming)``.

    ``serving`` is :meth:`OnlineState.serving_status` (written by each API process while it answers requests,
    at most every 10 s). A mismatch for a few seconds is a swap in progress (the poll interval plus load time);
    one that lasts means the version does not load (the scorer's log names it).
    """
    if not serving:
        return "serving has not reported yet (the API writes what it serves while it answers requests)", False
    try:
        ago = fmt_age(max(0.0, (time.time() if now_s is None else now_s) - float(serving.get("updated_ts", ""))))
    except ValueError:
        ago = "?"
    served = serving.get(alias) or None
    if served is None and registered is not None and registered == serving.get(ALIAS_CHAMPION):
        return "the champion's version: served as the champion, with no A/B split", False
    if served == registered:
        return (f"served by the API (reported {ago} ago)" if served else f"not served (reported {ago} ago)"), False
    if served is None:
        return (f"registered but not served by the API (reported {ago} ago): it loads a new version within the "
                "poll interval; if this lasts, the scorer's log says why it cannot load it"), True
    if registered is None:
        return f"the API still serves v{served} (reported {ago} ago): the alias was removed from the registry", True
    return (f"the API serves v{served}, not v{registered} (reported {ago} ago): a swap takes the poll interval "
            "plus the load time; if this lasts, the scorer's log says why the new version does not load"), True


def fmt_age(seconds: float | None) -> str:
    """A duration for people: ``"42 s"``, ``"5 min"``, ``"3.2 h"``, ``"2.0 d"``."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def fmt_bytes(n: float | None) -> str:
    """A size for people, in binary units: ``"512 B"``, ``"3.40 KiB"``, ``"12.3 MiB"``, ``"1.02 GiB"``."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.0f} B" if i == 0 else f"{n:,.{2 if abs(n) < 10 else 1}f} {units[i]}"


# --- chart axes: ticks that never print alike --------------------------------------------------------
def value_ticks(lo: float, hi: float, *, min_step: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 × 10^n, at least ``min_step`` apart, at most ``max_ticks`` steps)
    from ``min(lo, 0)`` to at least ``max(hi, 0)``.

    Vega's own ticks follow the data's range: on a tiny or constant range they are fractions apart (a count axis
    reads 0.0, 0.1, ... or a rate axis prints noise digits), and with a coarse format two of them print alike.
    With ``min_step`` the precision of the format, every tick prints differently.
    """
    lo = 0.0 if pd.isna(lo) else min(float(lo), 0.0)
    hi = 0.0 if pd.isna(hi) else max(float(hi), 0.0)
    span = hi - lo
    mag = 10.0 ** math.floor(math.log10(max(span / max_ticks, min_step)))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= min_step and span / (m * mag) <= max_ticks)
    start, stop = math.floor(lo / step), max(math.ceil(hi / step), math.floor(lo / step) + 1)
    return [round(i * step, 12) for i in range(start, stop + 1)]


def percent_format(step: float) -> str:
    """The d3 format that prints rates ``step`` apart as distinct percentages (``".0%"``, ``".1%"``, ...)."""
    return f".{max(0, -math.floor(math.log10(step * 100) + 1e-9))}%"


#: tick intervals of a time axis (ms): minutes to weeks, each printable without repeats by the format chosen
_TIME_STEPS_MS = tuple(m * 60_000 for m in (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10_080))


def time_ticks(start_ms: float, end_ms: float, *, min_step_ms: int = 60_000,
               max_ticks: int = 8) -> tuple[list[int], str, list[int]]:
    """Tick instants (epoch ms, whole minutes or more apart), their d3 time format, and the axis domain, for data
    from ``start_ms`` to ``end_ms``.

    Vega picks seconds-apart ticks for a short span (one hour's point, a lift line a minute long), which a
    ``%H:%M`` format prints as the same label again and again. Here ticks are a whole interval apart (at least
    ``min_step_ms``) and the format shows that interval's unit (``%d %b`` from a day, the date as well when the
    span crosses midnight), so no two labels print alike. A single instant gets half an interval either side.
    """
    step = next((s for s in _TIME_STEPS_MS if s >= min_step_ms and (end_ms - start_ms) / s <= max_ticks),
                _TIME_STEPS_MS[-1])
    first = math.ceil(start_ms / step) * step
    ticks = list(range(int(first), int(end_ms) + 1, step)) or [int(start_ms // step * step)]
    domain = [int(start_ms), int(end_ms)] if end_ms > start_ms else [int(start_ms - step / 2), int(end_ms + step / 2)]
    day = 86_400_000
    fmt = "%d %b" if step >= day else ("%d %b %H:%M" if start_ms // day != end_ms // day else "%H:%M")
    return ticks, fmt, domain


# --- cache by variant --------------------------------------------------------------------------------
def cache_by_variant(cache_buckets: Buckets) -> pd.DataFrame:
    """Hits, misses and hit_rate per variant from the ``hit:<variant>`` / ``miss:<variant>`` fields."""
    acc: dict[str, dict[str, int]] = {}
    for counts in cache_buckets.values():
        for f, n in counts.items():
            kind, _, variant = f.partition(":")
            if variant and kind in (CACHE_HIT, CACHE_MISS):
                acc.setdefault(variant, {CACHE_HIT: 0, CACHE_MISS: 0})[kind] += int(n)
    rows = [{"variant": v, "hits": c[CACHE_HIT], "misses": c[CACHE_MISS],
             "hit_rate": c[CACHE_HIT] / (c[CACHE_HIT] + c[CACHE_MISS]) if c[CACHE_HIT] + c[CACHE_MISS] else math.nan}
            for v, c in sorted(acc.items(), key=lambda kv: _variant_order(kv[0]))]
    return pd.DataFrame(rows, columns=["variant", "hits", "misses", "hit_rate"]).set_index("variant")


@dataclass(frozen=True)
class RedisInfo:
    used_memory: int
    used_memory_human: str
    maxmemory: int
    keys: int
    keys_by_family: dict[str, int]
    scanned_all: bool


def key_family(key: str) -> str:
    """The family of a shoprec key: ``shoprec:stats:cache:29000000`` -> ``stats:cache``, ``shoprec:cache:u1`` -> ``cache``."""
    parts = key.split(":")
    if parts and parts[0] + ":" == REDIS_PREFIX:
        parts = parts[1:]
    if not parts:
        return key
    if parts[0] in ("stats", "ab", "trending", "dlq", "consumer", "popular", "users") and len(parts) > 2:
        return ":".join(parts[:2]) if parts[0] != "stats" else ":".join(parts[:-1])
    return parts[0]


def fetch_redis_info(client, *, max_scan: int = 200_000) -> RedisInfo:
    """Memory used and key counts by family (a SCAN of at most ``max_scan`` keys).

    Raises:
        redis.RedisError: when Redis cannot be reached.
    """
    mem = client.info("memory")
    total = int(client.dbsize())
    fams: dict[str, int] = {}
    seen = 0
    for key in client.scan_iter(match=REDIS_PREFIX + "*", count=2000):
        fam = key_family(key)
        fams[fam] = fams.get(fam, 0) + 1
        seen += 1
        if seen >= max_scan:
            break
    return RedisInfo(int(mem.get("used_memory", 0)), str(mem.get("used_memory_human", "")),
                     int(mem.get("maxmemory", 0)), total, dict(sorted(fams.items(), key=lambda kv: -kv[1])),
                     scanned_all=seen < max_scan)


# --- A/B report ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ABConfig:
    """What the A/B analysis is planned for (from settings and the experiment definition)."""

    shares: Mapping[str, float] = field(default_factory=lambda: {ALIAS_CHAMPION: 0.5, ALIAS_CHALLENGER: 0.5})
    alpha: float = 0.05
    power: float = 0.8
    mde: float = 0.1
    srm_alpha: float = 0.001
    experiment: str = "default"

    @classmethod
    def from_settings(cls, s) -> ABConfig:
        """Shares and experiment name from :class:`pipelines.experiment.Experiment` (settings or its YAML file).

        Raises:
            ValueError: when the experiment file is unreadable or its shares are invalid.
        """
        from pipelines.experiment import Experiment

        exp = Experiment.from_settings(s)
        return cls(dict(exp.variants), s.ab_alpha, s.ab_power, s.ab_mde, s.ab_srm_alpha, exp.name)

    def expected_shares(self, a: str, b: str) -> dict[str, float]:
        """Configured shares of ``a`` and ``b`` (50/50 when either is not part of the experiment)."""
        if self.shares.get(a, 0) > 0 and self.shares.get(b, 0) > 0:
            return {a: float(self.shares[a]), b: float(self.shares[b])}
        return {a: 0.5, b: 0.5}


@dataclass
class ABReport:
    """Everything the A/B page shows. ``variants``: one row per variant with rates and interval bounds;
    ``lifts``: one row per metric (lift, low, high, p_value) of ``b`` over ``a``."""

    a: str | None
    b: str | None
    variants: pd.DataFrame
    lifts: pd.DataFrame
    srm: Any  # abstats.SrmResult | None
    verdict: Any  # abstats.Verdict | None
    config: ABConfig
    srm_unit: str = "impressions"


def ab_report(counts: Mapping[str, Mapping[str, int]], revenue: Mapping[str, Any] | None = None,
              config: ABConfig = ABConfig(), users: Mapping[str, int] | None = None) -> ABReport:
    """Per-variant rates with intervals, lifts of challenger over champion, SRM check and verdict.

    Args:
        counts: totals per variant (``OnlineState.ab_counts()``): impressions, clicks, carts, purchases.
        revenue: per variant, revenue of each impression from the lake (array, one value per impression,
            mostly 0); revenue per impression is its mean. Missing variants show no revenue numbers.
        users: distinct users per variant (from the lake). The split check counts these when both
            variants have some: users are what is randomised, and a heavy user's many impressions
            would make a fair split look skewed. Otherwise it counts impressions.
    """
    from pipelines import abstats

    revenue = revenue or {}
    alpha = config.alpha
    rows = []
    for variant in sorted(counts, key=_variant_order):
        c = {f: int(counts[variant].get(f, 0)) for f in AB_FIELDS}
        n = c["impressions"]
        ctr = abstats.rate_interval(c["clicks"], n, alpha)
        conv = abstats.rate_interval(c["purchases"], n, alpha)
        rev = revenue.get(variant)
        rpi = abstats.mean_interval(rev if rev is not None else [], alpha)
        rows.append({"variant": variant, **c, "ctr": ctr.value, "ctr_low": ctr.low, "ctr_high": ctr.high,
                     "conversion": conv.value, "conversion_low": conv.low, "conversion_high": conv.high,
                     "revenue_impressions": 0 if rev is None else len(rev),
                     "revenue": math.nan if rev is None else float(sum(rev)),
                     "rpi": rpi.value, "rpi_low": rpi.low, "rpi_high": rpi.high})
    variants = pd.DataFrame(rows).set_index("variant") if rows else pd.DataFrame()
    lift_cols = ["lift", "low", "high", "p_value"]
    pair = pick_ab_pair(counts)
    if pair is None:
        return ABReport(None, None, variants, pd.DataFrame(columns=lift_cols), None, None, config, "impressions")
    a, b = pair
    ca, cb = variants.loc[a], variants.loc[b]
    lifts = {}
    for metric, field_ in (("CTR", "clicks"), ("conversion", "purchases")):
        r = abstats.rate_lift(int(ca[field_]), int(ca.impressions), int(cb[field_]), int(cb.impressions), alpha)
        lifts[metric] = [math.nan] * 4 if r is None else [r.lift, r.low, r.high, r.p_value]
    ml = abstats.mean_lift(revenue[a], revenue[b], alpha) if a in revenue and b in revenue else None
    lifts["revenue per impression"] = [math.nan] * 4 if ml is None else [ml.lift, ml.low, ml.high, ml.p_value]
    lifts_df = pd.DataFrame.from_dict(lifts, orient="index", columns=lift_cols)
    lifts_df.index.name = "metric"
    shares = config.expected_shares(a, b)
    if users and users.get(a, 0) > 0 and users.get(b, 0) > 0:
        srm_unit, observed = "users", {v: int(users[v]) for v in (a, b)}
    else:
        srm_unit, observed = "impressions", {v: int(variants.loc[v, "impressions"]) for v in (a, b)}
    srm = abstats.srm_check(observed, shares, config.srm_alpha)
    ratio = shares[b] / shares[a] if shares[a] > 0 else 1.0
    v = abstats.verdict(a, b, int(ca.clicks), int(ca.impressions), int(cb.clicks), int(cb.impressions),
                        alpha=alpha, power=config.power, mde=config.mde, ratio=ratio)
    return ABReport(a, b, variants, lifts_df, srm, v, config, srm_unit)


_MINUTE_COUNTS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(ARGV))
  for j = 1, #ARGV do out[#out + 1] = tonumber(values[j]) or 0 end
end
return out
"""


def fetch_minute_counts(state: OnlineState, name: str, fields: Sequence[str], minutes: int,
                        now_s: float | None = None) -> pd.DataFrame:
    """The per-minute counters ``name`` of the last ``minutes`` as a frame, like
    ``buckets_to_frame(state.read_stats(name, minutes), fields, ...)`` but in one round trip.

    A week is 10 080 hashes per counter; a pipeline of that many ``HGETALL`` costs Redis little but the
    client most of a second, so a read-only Lua script fetches the ``fields`` of every minute and returns
    one flat list of integers (missing hash or field = 0).

    Raises:
        redis.RedisError: when Redis cannot be reached.
    """
    import numpy as np

    from pipelines.schemas import RedisKeys

    now_s = time.time() if now_s is None else now_s
    index = _minute_index(minutes, now_s)
    fields = list(fields)
    last = int(now_s) // BUCKET_S
    keys = [RedisKeys.counter(name, b) for b in range(last - minutes + 1, last + 1)]
    values = state.r.register_script(_MINUTE_COUNTS_LUA)(keys=keys, args=fields) if keys and fields else []
    data = np.asarray(values, dtype="int64").reshape(len(index), len(fields))
    return pd.DataFrame(data, index=index, columns=fields)


def cumulative_lift_frame(per_variant: Mapping[str, Buckets | pd.DataFrame], a: str, b: str, *, minutes: int,
                          now_s: float | None = None, alpha: float = 0.05, max_points: int = 240) -> pd.DataFrame:
    """Cumulative CTR lift of ``b`` over ``a`` over time (columns lift, low, high; index = time, UTC).

    ``per_variant`` holds each variant's per-minute counters, as buckets or as the frame of
    :func:`fetch_minute_counts` (columns impressions, clicks). They are summed into at most
    ``max_points`` steps; leading steps without a defined lift are dropped.
    """
    from pipelines import abstats

    now_s = time.time() if now_s is None else now_s

    def frame(v: str) -> pd.DataFrame:
        got = per_variant.get(v, {})
        if isinstance(got, pd.DataFrame):
            return got[["impressions", "clicks"]]
        return buckets_to_frame(got, ("impressions", "clicks"), minutes=minutes, now_s=now_s)

    fa, fb = frame(a), frame(b)
    first = (fa["impressions"] + fb["impressions"]).to_numpy().nonzero()[0]
    if not len(first):
        return pd.DataFrame(columns=["lift", "low", "high"])
    fa, fb = fa.iloc[first[0]:], fb.iloc[first[0]:]
    step = max(1, math.ceil(len(fa) / max_points))
    if step > 1:
        groups = [i // step for i in range(len(fa))]
        idx = fa.index[[min(len(fa) - 1, (g + 1) * step - 1) for g in sorted(set(groups))]]
        fa, fb = fa.groupby(groups).sum(), fb.groupby(groups).sum()
        fa.index = fb.index = idx
    arr = abstats.cumulative_lift(fa.to_numpy(), fb.to_numpy(), alpha)
    out = pd.DataFrame(arr, index=fa.index, columns=["lift", "low", "high"])
    return out.dropna()


# --- lake reads (revenue, new products) --------------------------------------------------------------
def window_keys(start_s: float, end_s: float) -> list[str]:
    """Keys of the hourly partitions of ``[start_s, end_s)``, oldest first."""
    from datetime import datetime, timedelta, timezone

    out = []
    t = datetime.fromtimestamp(start_s, tz=timezone.utc).replace(minute=0, second=0, microsecond=0)
    end = datetime.fromtimestamp(end_s, tz=timezone.utc)
    while t < end:
        out.append(t.strftime("%Y-%m-%d-%H:00"))
        t += timedelta(hours=1)
    return out


def window_partitions(lake_dir, start_s: float, end_s: float) -> list[tuple[str, list]]:
    """``(partition key, its Parquet files)`` for every hourly partition of ``[start_s, end_s)`` that has
    files, oldest first."""
    from pathlib import Path

    from pipelines.lake import partition_files

    parts = [(key, partition_files(Path(lake_dir), key)) for key in window_keys(start_s, end_s)]
    return [(key, files) for key, files in parts if files]


@dataclass(frozen=True)
class SkippedFile:
    """A lake file the dashboard leaves out of its numbers because it does not fit the lake schema."""

    path: str  # relative to the lake: date=YYYY-MM-DD/hour=HH/<name>.parquet
    column: str | None  # the column(s) at fault, comma-separated; None when the file is not readable Parquet
    problem: str  # e.g. "price is string (double expected)"


def lake_file_problem(path) -> SkippedFile | None:
    """Why the lake file ``path`` does not fit the lake schema, None when it fits
    (:func:`pipelines.validation.check_file_schemas`, the data checks' own test, from the footer only).

    The answer is remembered per path, modification time and size, so a page that reruns every few seconds
    opens a known file (good or bad) once, and a replaced file is checked again.

    Raises:
        FileNotFoundError: the file vanished (a compaction replaced it): list the partition again.
    """
    import os

    st = os.stat(path)
    return _file_problem(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=65_536)
def _file_problem(path: str, mtime_ns: int, size: int) -> SkippedFile | None:
    from pathlib import Path

    from pipelines.validation import check_file_schemas

    lake_dir = Path(path).parents[2]  # <lake>/date=.../hour=.../<file>
    _, failures = check_file_schemas(lake_dir, [Path(path)])
    if not failures:
        return None
    f = failures[0]
    return SkippedFile(f["file"], f["column"], str(f["observed_value"]))


def skipped_lake_files(files: Sequence) -> list[SkippedFile]:
    """The problems of those ``files`` that do not fit the lake schema (:func:`lake_file_problem`)."""
    from pipelines.lake import read_relisting

    return read_relisting(list(files), lambda fs: [p for p in map(lake_file_problem, fs) if p is not None])


def read_lake_files(files: Sequence, columns: Sequence[str], event_types: Sequence[str]) -> pd.DataFrame:
    """Only ``columns`` of the events of ``event_types`` in the lake's Parquet ``files`` (a column projection
    and a filter). ``ts`` comes back as UTC epoch milliseconds (int64).

    Files that do not fit the lake schema (:func:`lake_file_problem`) are left out, so one wrong-typed file
    cannot blank a page; :func:`skipped_lake_files` names them.
    """
    import pyarrow.dataset as ds

    from pipelines.lake import LAKE_SCHEMA, read_relisting

    cols = list(dict.fromkeys(["event_type", *columns]))
    empty = pd.DataFrame({c: pd.Series(dtype="object") for c in cols})

    def read(fs: list) -> pd.DataFrame:
        fitting = [str(f) for f in fs if lake_file_problem(f) is None]
        if not fitting:
            return empty
        return (ds.dataset(fitting, schema=LAKE_SCHEMA, format="parquet")
                .to_table(columns=cols, filter=ds.field("event_type").isin(list(event_types))).to_pandas())

    df = read_relisting(list(files), read) if files else empty
    if "ts" in df and df is not empty:
        df["ts"] = df["ts"].astype("datetime64[ms, UTC]").astype("int64")
    return df


def read_lake_columns(lake_dir, start_s: float, end_s: float, columns: Sequence[str],
                      event_types: Sequence[str]) -> pd.DataFrame:
    """Only ``columns`` of the events of ``event_types`` in the hourly partitions of ``[start_s, end_s)``
    (:func:`read_lake_files`)."""
    files = [f for _, part in window_partitions(lake_dir, start_s, end_s) for f in part]
    return read_lake_files(files, columns, event_types)


def revenue_per_impression(impressions: pd.DataFrame, purchases: pd.DataFrame) -> dict[str, Any]:
    """Revenue of every impression, per variant.

    Args:
        impressions: columns request_id, variant (one row per impression).
        purchases: columns request_id, variant, price, quantity (quantity missing = 1).

    Returns:
        ``{variant: numpy array}`` with one value per impression: the ``price * quantity`` of the
        purchases that carry its ``request_id`` (0 for most). Purchases without a matching impression
        are not counted (their list was not shown in the window).
    """

    imp = impressions.dropna(subset=["request_id", "variant"]).drop_duplicates("request_id")
    if imp.empty:
        return {}
    pur = purchases.dropna(subset=["request_id"]) if not purchases.empty else purchases
    if pur.empty:
        rev = pd.Series(0.0, index=imp["request_id"])
    else:
        amount = pur["price"].fillna(0).astype("float64") * pur["quantity"].fillna(1).astype("float64")
        by_req = amount.groupby(pur["request_id"].to_numpy()).sum()
        rev = by_req.reindex(imp["request_id"]).fillna(0.0)
    values = rev.to_numpy()
    return {v: values[(imp["variant"] == v).to_numpy()] for v in imp["variant"].unique()}


@dataclass
class LakeAB:
    """What the A/B page reads from the lake: revenue of every impression and distinct users, per comparison and
    variant (keys :func:`lake_ab_key`); :meth:`of` picks one comparison."""

    revenue: dict[str, Any] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)  # lake files left out: they do not fit the schema
    read_at_s: float | None = field(default=None, compare=False)  # when the lake was read (epoch s)

    def of(self, tag: str, experiment: str) -> LakeAB:
        """The comparison ``tag`` alone, keyed by variant. Impressions without a tag (logged before impressions
        carried one) belong to the comparison named like the ``experiment`` itself, as their counters do."""
        import numpy as np

        revenue: dict[str, Any] = {}
        users: dict[str, int] = {}
        for key in dict.fromkeys([*self.revenue, *self.users]):
            t, _, variant = key.rpartition("\t")
            if t == tag or (not t and tag == experiment):  # both kinds may be there: merged, not overwritten
                if key in self.revenue:
                    revenue[variant] = (np.concatenate([revenue[variant], self.revenue[key]]) if variant in revenue
                                        else self.revenue[key])
                # a user in both (an untagged and a name-tagged impression) counts twice: a rare overlap
                users[variant] = users.get(variant, 0) + self.users.get(key, 0)
        return LakeAB(revenue, {v: n for v, n in users.items() if n}, self.skipped, self.read_at_s)


def lake_ab_key(events: pd.DataFrame) -> pd.Series:
    """Per impression, its comparison and variant as one key (``"<tag>\t<variant>"``; the tag empty when absent)."""
    return events["experiment"].fillna("").astype(str) + "\t" + events["variant"].astype(str)


def fetch_lake_ab(lake_dir, *, hours: int, now_s: float | None = None) -> LakeAB:
    """Revenue per impression (see :func:`revenue_per_impression`) and distinct users per comparison and variant
    over the last ``hours`` of the lake, from the raw events (the dashboard reads the same numbers from cached
    per-partition summaries: :func:`pipelines.dashboard_agg.fetch_lake_ab`)."""
    now_s = time.time() if now_s is None else now_s
    df = read_lake_columns(lake_dir, now_s - hours * 3600, now_s + 3600,
                           ["user_id", "request_id", "variant", "experiment", "price", "quantity"],
                           ["impression", "purchase"])
    if df.empty:
        return LakeAB()
    imp = df[(df["event_type"] == "impression") & df["variant"].notna()]
    imp = imp.assign(variant=lake_ab_key(imp))
    users = imp.groupby("variant")["user_id"].nunique()
    return LakeAB(revenue_per_impression(imp, df[df["event_type"] == "purchase"]),
                  {str(k): int(v) for k, v in users.items()})


@dataclass
class NewItemReport:
    """Cold start of products launched in the last ``age_h`` hours.

    The times from launch to a first impression and a first click count only the products launched in the
    observed window (:func:`observed_launches`), whose number is ``launched_in_window``.
    """

    new_items: int
    with_impression: int  # new products shown since their launch (launched in the window or not)
    median_first_impression_s: float | None  # over the ``shown_in_window`` products; None without one
    median_first_click_s: float | None  # over the ``clicked`` products; None without one
    clicked: int  # products launched in the window and clicked since
    new_slots: int
    all_slots: int
    explore_share: float
    hourly: pd.DataFrame  # index hour (UTC); columns slots, new_slots, new_share
    skipped: list[SkippedFile] = field(default_factory=list)  # lake files left out: they do not fit the schema
    read_at_s: float | None = field(default=None, compare=False)  # when the lake was read (epoch s)
    launched_in_window: int = 0  # new products launched at or after ``window_start_ms``
    shown_in_window: int = 0  # of those, the ones shown since their launch
    window_start_ms: int | None = None  # the first impression the report read (epoch ms); None: no impression

    @property
    def impressed_share(self) -> float | None:
        return rate(self.with_impression, self.new_items)

    @property
    def launched_before_window(self) -> int:
        """New products launched before the lake's first impression: left out of the times to a first impression."""
        return self.new_items - self.launched_in_window

    @property
    def slot_share(self) -> float | None:
        """Share of all impression slots (items shown) in the last ``age_h`` that went to new products."""
        return rate(self.new_slots, self.all_slots)


def launch_times(catalog: pd.DataFrame) -> pd.Series:
    """``created_at`` (epoch ms) per item id of a catalog (columns item_id, created_at; the last row of an id wins)."""
    created = pd.Series(catalog["created_at"].astype("int64").to_numpy(), index=catalog["item_id"].astype(str))
    return created[~created.index.duplicated(keep="last")]


def observed_launches(new: pd.Series, window_start_ms: int | None) -> pd.Series:
    """The launches the event stream saw: those of ``new`` (launch epoch ms per item id) at or after
    ``window_start_ms``, the first impression the report reads (none when it reads no impression).

    Only for those is "time from launch to a first impression" a measure of exploration. The others are
    backfilled: the simulator's backfill (:meth:`pipelines.simulator.ShopSimulator.backfill`, which
    ``shoprec stack up`` runs on an empty lake) writes history without impressions (it asks no recommender) and
    adds the products that appeared meanwhile to the catalog with their simulated ``created_at``; a catalog made
    by :func:`pipelines.simulator.make_catalog` or published with ``shoprec catalog publish`` can hold launches
    from before the stream began too. Such a product is first shown when impressions begin, so its wait would
    measure when the stream started.
    """
    if window_start_ms is None:
        return new.iloc[:0]
    return new[new >= window_start_ms]


def new_item_timing_note(rep: NewItemReport) -> str:
    """For people: which products the times to a first impression and click count (``Products launched in the
    window: N``), where the window starts and why the products launched before it are left out."""
    from datetime import datetime, timezone

    if rep.window_start_ms is None:
        return ("Products launched in the window: 0 — the lake holds no impression yet. The times to a first "
                "impression and click count only products launched after the lake's first impression.")
    start = f"{datetime.fromtimestamp(rep.window_start_ms / 1000, tz=timezone.utc):%m-%d %H:%M} UTC"
    why = "first shown when impressions began, so their wait would measure that, not exploration"
    if rep.new_items == 0:
        return f"Products launched in the window: 0 (it starts at the lake's first impression, {start})."
    if rep.launched_in_window == 0:
        return (f"Products launched in the window: 0, so the times to a first impression and click are blank: all "
                f"{rep.new_items:,} new products were launched before the lake's first impression ({start}), in a "
                f"backfill's history or already in the catalog when the stream started. They were {why}.")
    shown = f"{rep.shown_in_window:,} shown so far" if rep.shown_in_window else "none shown yet"
    note = (f"Products launched in the window: {rep.launched_in_window:,} of the {rep.new_items:,} new products "
            f"({shown}); the times to a first impression and click count only these. The window starts at the "
            f"lake's first impression ({start})")
    if not rep.launched_before_window:
        return note + "."
    return (note + f"; the {rep.launched_before_window:,} launched before it (a backfill's history, or already in "
            f"the catalog when the stream started) are left out: they were {why}.")


def new_item_report(catalog: pd.DataFrame, impressions: pd.DataFrame, clicks: pd.DataFrame, *, now_ms: int,
                    age_h: float = 24.0, explore_share: float = 0.1) -> NewItemReport:
    """How products launched in the last ``age_h`` hours were shown and clicked.

    Args:
        catalog: columns item_id, created_at (UTC epoch ms).
        impressions: columns ts (epoch ms), items (list of item ids shown).
        clicks: columns ts (epoch ms), item_id.
        now_ms: the present (epoch ms).

    ``hourly`` counts, per hour, the impression slots and those taken by a product that was new
    (younger than ``age_h``) at the time it was shown. The times to a first impression and click count only the
    products launched at or after the first impression in ``impressions`` (:func:`observed_launches`).
    """
    age_ms = int(age_h * 3_600_000)
    created = launch_times(catalog)
    new = created[(created > now_ms - age_ms) & (created <= now_ms)]
    if impressions.empty:
        slots = pd.DataFrame({"ts": pd.Series(dtype="int64"), "item_id": pd.Series(dtype="object")})
    else:
        slots = impressions[["ts", "items"]].explode("items").dropna().rename(columns={"items": "item_id"})
        slots["ts"] = slots["ts"].astype("int64")
    # .astype: mapping an empty string column gives a string column, not numbers
    slot_created = slots["item_id"].map(created).astype("float64")
    age = slots["ts"] - slot_created
    slots = slots.assign(is_new=((age >= 0) & (age < age_ms)).fillna(False).astype(bool))
    recent = slots[slots["ts"] > now_ms - age_ms]
    launched = slots["item_id"].map(new).astype("float64")
    new_slots_now = slots[slots["item_id"].isin(new.index) & (slots["ts"] >= launched)]
    first_imp = new_slots_now.groupby("item_id")["ts"].min()
    window_start = int(slots["ts"].min()) if len(slots) else None
    seen = observed_launches(new, window_start)
    timed = first_imp[first_imp.index.isin(seen.index)]
    t_imp = (timed - seen.reindex(timed.index)) / 1000.0
    if clicks.empty:
        t_click = pd.Series(dtype="float64")
    else:
        c = clicks[clicks["item_id"].isin(seen.index)]
        c = c[c["ts"].astype("int64") >= c["item_id"].map(seen).astype("float64")]
        first_click = c.groupby("item_id")["ts"].min().astype("int64")
        t_click = (first_click - seen.reindex(first_click.index)) / 1000.0
    if slots.empty:
        hourly = pd.DataFrame(columns=["slots", "new_slots", "new_share"])
    else:
        hour = pd.to_datetime(slots["ts"] // 3_600_000 * 3_600_000, unit="ms", utc=True)
        hourly = slots.groupby(hour.rename("hour")).agg(slots=("item_id", "size"), new_slots=("is_new", "sum"))
        hourly["new_share"] = hourly["new_slots"] / hourly["slots"]
    return NewItemReport(
        new_items=len(new), with_impression=len(first_imp),
        median_first_impression_s=float(t_imp.median()) if len(t_imp) else None,
        median_first_click_s=float(t_click.median()) if len(t_click) else None, clicked=len(t_click),
        new_slots=int(recent["is_new"].sum()), all_slots=len(recent), explore_share=explore_share, hourly=hourly,
        launched_in_window=len(seen), shown_in_window=len(t_imp), window_start_ms=window_start)


def fetch_new_item_report(catalog_path, lake_dir, *, age_h: float, explore_share: float, hours: int,
                          now_s: float | None = None) -> NewItemReport | None:
    """:func:`new_item_report` from the catalog Parquet and the last ``hours`` of the raw lake; None without a
    catalog (the dashboard uses the cached equivalent :func:`pipelines.dashboard_agg.fetch_new_item_report`)."""
    from pathlib import Path

    if not Path(catalog_path).exists():
        return None
    now_s = time.time() if now_s is None else now_s
    from pipelines.lake import read_parquet

    catalog = read_parquet(catalog_path, columns=["item_id", "created_at"])  # opened once: the feed renames it
    df = read_lake_columns(lake_dir, now_s - hours * 3600, now_s + 3600, ["ts", "items", "item_id"],
                           ["impression", "click"])
    return new_item_report(catalog, df[df["event_type"] == "impression"], df[df["event_type"] == "click"],
                           now_ms=int(now_s * 1000), age_h=age_h, explore_share=explore_share)


# --- data quality (Great Expectations reports written by Dagster) -------------------------------------
def fetch_quality_reports(quality_dir) -> list[dict]:
    """Every report ``<quality_dir>/<partition>.json`` (unreadable files come back with an ``error``)."""
    import json
    from pathlib import Path

    out = []
    for f in sorted(Path(quality_dir).glob("*.json")):
        try:
            rep = json.loads(f.read_text())
            if not isinstance(rep, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            rep = {"partition": f.stem, "success": None, "error": f"cannot read {f.name}: {err}"}
        rep.setdefault("partition", f.stem)
        out.append(rep)
    return out


def dagster_run_url(base_url: str, run_id: str | None) -> str | None:
    return f"{base_url.rstrip('/')}/runs/{run_id}" if run_id else None


#: statuses of an hour's report that is not the closed hour's validation (not counted as validated or failing)
QUALITY_OPEN = "open — validated when the hour closes"
QUALITY_PENDING = "closed — awaiting its validation"
NOT_VALIDATED = (QUALITY_OPEN, QUALITY_PENDING)


def split_quality_reports(reports: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]],
                                                                          Mapping[str, Any] | None]:
    """``(the lake partitions' reports, the catalog's report or None)``: the catalog is no hour of events."""
    from pipelines.validation import CATALOG_KEY

    catalog = [r for r in reports if str(r.get("partition")) == CATALOG_KEY]
    return [r for r in reports if str(r.get("partition")) != CATALOG_KEY], (catalog[0] if catalog else None)


def quality_status(report: Mapping[str, Any], now=None) -> str:
    """``passed`` | ``failed`` | ``error`` (unreadable report), or for an hourly partition whose report is not the
    closed hour's validation: :data:`QUALITY_OPEN` (the hour has not ended, :func:`pipelines.validation.hour_is_open`:
    training re-checks it on every run, the schedule validates it once closed) or :data:`QUALITY_PENDING` (closed,
    but its report was written while it was open)."""
    from pipelines.validation import hour_is_open, hour_window

    if report.get("error"):
        return "error"
    key = str(report.get("partition"))
    try:
        end = hour_window(key)[1]
    except ValueError:  # not an hourly key
        end = None
    if end is not None and hour_is_open(key, now):
        return QUALITY_OPEN
    at = pd.to_datetime(report.get("validated_at"), utc=True, errors="coerce")
    if end is not None and pd.notna(at) and at < end:
        return QUALITY_PENDING
    return "passed" if report.get("success") else "failed"


def skipped_suites(report: Mapping[str, Any]) -> str | None:
    """The suites a report's validation did not run and why, as people read them
    (``volume: skipped — needs 3 hours of stream history, has 1 ...``; :func:`pipelines.validation.validate_partition`
    records them); None when every suite ran or the report predates the record."""
    from pipelines.validation import suite_label

    stats = report.get("statistics")
    skipped = stats.get("skipped_suites") if isinstance(stats, Mapping) else None
    if not isinstance(skipped, Mapping) or not skipped:
        return None
    return "; ".join(f"{suite_label(str(suite))}: skipped — {why}" for suite, why in skipped.items())


def quality_table(reports: Sequence[Mapping[str, Any]], dagster_url: str, now=None) -> pd.DataFrame:
    """One row per report, newest partition first: status (:func:`quality_status`), evaluated, failed,
    skipped (:func:`skipped_suites`), validated_at, run link."""
    rows = []
    for r in reports:
        rows.append({"partition": str(r.get("partition")), "status": quality_status(r, now),
                     "evaluated": r.get("evaluated"), "failed": len(r.get("failed") or []),
                     "skipped": skipped_suites(r), "validated_at": r.get("validated_at"),
                     "dagster_run": dagster_run_url(dagster_url, r.get("dagster_run_id"))})
    df = pd.DataFrame(rows, columns=["partition", "status", "evaluated", "failed", "skipped", "validated_at",
                                     "dagster_run"])
    return df.sort_values("partition", ascending=False).set_index("partition")


def failing_expectations(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Every failing expectation of every report with its examples (``sample``) as text."""
    import json

    rows = []
    for r in reports:
        for f in r.get("failed") or []:
            sample = f.get("sample")
            rows.append({"partition": str(r.get("partition")), "suite": f.get("suite"),
                         "expectation": f.get("expectation_type"), "column": f.get("column"),
                         "description": f.get("description"), "unexpected": f.get("unexpected_count"),
                         "unexpected %": f.get("unexpected_percent"),
                         "observed": None if f.get("observed_value") is None else str(f.get("observed_value")),
                         "examples": None if sample is None else json.dumps(sample, default=str)[:300],
                         "exception": f.get("exception")})
    cols = ["partition", "suite", "expectation", "column", "description", "unexpected", "unexpected %",
            "observed", "examples", "exception"]
    return pd.DataFrame(rows, columns=cols).sort_values("partition", ascending=False, kind="stable")


__all__ += [
    "latency_stats_name", "events_timeseries", "requests_per_second",
    "LATENCY_FIELDS", "latency_histogram", "latency_quantile", "LatencySummary", "latency_summary", "fmt_ms",
    "fmt_age", "cache_by_variant", "RedisInfo", "key_family", "fetch_redis_info", "ABConfig", "ABReport",
    "ab_report", "fetch_minute_counts", "cumulative_lift_frame", "window_keys", "window_partitions", "read_lake_files",
    "read_lake_columns", "revenue_per_impression", "LakeAB", "fetch_lake_ab", "NewItemReport", "launch_times",
    "observed_launches", "new_item_timing_note",
    "new_item_report", "fetch_new_item_report", "fetch_quality_reports", "dagster_run_url", "quality_table",
    "failing_expectations", "SkippedFile", "lake_file_problem", "skipped_lake_files", "QUALITY_OPEN",
    "QUALITY_PENDING", "NOT_VALIDATED", "split_quality_reports", "quality_status", "skipped_suites", "fmt_bytes", "value_ticks",
    "time_ticks",
]
