"""Training data, training, offline evaluation and the promotion decision.

Dagster assets call these functions; they know nothing about Dagster.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import drift, lake, metrics, validation
from pipelines.drift import DriftReport
from pipelines.models import Recommender, get_recommender
from pipelines.registry import PRIMARY_METRIC, ModelRegistry
from pipelines.schemas import (ALIAS_CHALLENGER, ALIAS_CHAMPION, COL_EVENT_TYPE, COL_ITEM, COL_REQUEST_ID,
                               COL_SESSION, COL_TS, COL_USER, COL_WEIGHT, EVENT_WEIGHTS, TAG_DATA_WINDOW_END, TAG_DATA_WINDOW_START,
                               TAG_CHAMPION_HOLDOUT_NDCG, TAG_GATE_DECISION, TAG_GX_SUCCESS, TAG_HOLDOUT)
from pipelines.settings import Settings, TrainConfig, get_settings

log = logging.getLogger(__name__)


#: interactions column: False for what a user did after seeing a recommendation list (see build_interactions)
COL_ORGANIC = "organic"
#: fewest organic holdout interactions the gate decides on (below it, the whole holdout is used)
MIN_ORGANIC_HOLDOUT = 20


def build_interactions(events: pd.DataFrame) -> pd.DataFrame:
    """Interactions (``user_id, item_id, ts, weight, organic``) from lake events; impressions are dropped.

    ``weight`` says how much an event tells about taste (a purchase more than a view). ``organic``
    is False for an event that carries a ``request_id`` or comes at or after an impression in the
    same session: the list that was shown steered it, so it favours the model that served the list
    (:func:`holdout_split` leaves such events out of the holdout; training uses them all).
    """
    ev = events[events[COL_EVENT_TYPE].isin(list(EVENT_WEIGHTS)) & events[COL_ITEM].notna()]
    out = ev[[COL_USER, COL_ITEM, COL_TS]].copy()
    out[COL_WEIGHT] = ev[COL_EVENT_TYPE].map(EVENT_WEIGHTS).astype("float32")
    steered = pd.Series(False, index=ev.index)
    if COL_SESSION in events:
        imp = events.loc[events[COL_EVENT_TYPE] == "impression", [COL_SESSION, COL_TS]]
        first = imp[COL_TS].groupby(imp[COL_SESSION].to_numpy(dtype=object)).min()  # each session's first list
        first = first.reindex(ev[COL_SESSION].to_numpy(dtype=object)).set_axis(ev.index)
        steered |= first.notna() & (first <= ev[COL_TS])
    if COL_REQUEST_ID in events:
        steered |= ev[COL_REQUEST_ID].notna()
    out[COL_ORGANIC] = ~steered
    return out.sort_values(COL_TS, kind="stable").reset_index(drop=True)


@dataclass
class TrainResult:
    model: Recommender
    metrics: dict[str, float]
    params: dict
    n_train: int
    n_test: int
    window: tuple[str, str]
    fit_s: float
    extra_tags: dict[str, str] = field(default_factory=dict)
    #: the split the metrics were computed on; the champion is scored on the same one
    train_df: pd.DataFrame | None = field(default=None, repr=False)
    test_df: pd.DataFrame | None = field(default=None, repr=False)
    holdout: str = ""
    #: per-epoch values (e.g. ``{"loss": [...]}``) when the model reports them as ``history``
    history: dict[str, list[float]] = field(default_factory=dict)


def as_utc(ts: pd.Series) -> pd.Series:
    """Event times as UTC timestamps: the lake's timestamps, or epoch milliseconds (the events' ``ts``)."""
    if pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts):
        return pd.to_datetime(ts, unit="ms", utc=True)
    return pd.to_datetime(ts, utc=True)


def holdout_split(interactions: pd.DataFrame, hours: int | None,
                  holdout_per_user: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Split off the last ``hours`` of the window as the holdout (a time-based split).

    Falls back to each user's last ``holdout_per_user`` interactions when the window is too
    short for an hour-based split (the holdout would be empty, hold everything, or hold no
    user the training part knows).

    Returns:
        ``(train, test, description)``.
    """
    if hours:
        ts = as_utc(interactions[COL_TS])
        cutoff = ts.max() - pd.Timedelta(hours=hours)
        is_test = (ts > cutoff).to_numpy()
        train_df, test_df = interactions[~is_test], interactions[is_test]
        share = is_test.mean() if len(interactions) else 0.0
        if 0.01 <= share <= 0.5 and test_df[COL_USER].isin(set(train_df[COL_USER])).any():
            return _organic_holdout(train_df.reset_index(drop=True), test_df.reset_index(drop=True),
                                    f"last {hours}h (after {cutoff.isoformat()})")
    train_df, test_df = metrics.time_split(interactions, holdout_per_user=holdout_per_user)
    return _organic_holdout(train_df, test_df, f"last {holdout_per_user} interaction(s) per user")


def _organic_holdout(train_df: pd.DataFrame, test_df: pd.DataFrame, what: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Keep only the holdout's organic interactions (see :func:`build_interactions`) and drop the column.

    Whatever a served list steered favours the model that served it (the champion, mostly), so a
    gate scoring on it would keep the incumbent. When fewer than ``MIN_ORGANIC_HOLDOUT`` organic
    interactions of users the training part knows are left (too few to decide on), the whole
    holdout is kept and the description says so.
    """
    if COL_ORGANIC not in test_df:
        return train_df, test_df, f"{what}; {len(test_df)} interactions"
    train_df = train_df.drop(columns=COL_ORGANIC)
    organic = test_df[test_df[COL_ORGANIC].to_numpy(bool)].drop(columns=COL_ORGANIC).reset_index(drop=True)
    test_df = test_df.drop(columns=COL_ORGANIC)
    if len(organic) == len(test_df):
        return train_df, test_df, f"{what}; {len(test_df)} interactions, all organic"
    usable = int(organic[COL_USER].isin(set(train_df[COL_USER])).sum())
    if usable < MIN_ORGANIC_HOLDOUT:
        return train_df, test_df, (f"{what}; {usable} organic interaction(s) of users the training part knows "
                                   f"(under {MIN_ORGANIC_HOLDOUT}), so all {len(test_df)} are kept")
    return train_df, organic, (f"{what}; organic only: {len(organic)} of {len(test_df)} interactions "
                               "(what followed a recommendation list is left out)")


def build_model(cfg: TrainConfig) -> Recommender:
    """An untrained ``cfg.model`` given the hyperparameters of ``cfg`` that it accepts.

    Every model takes ``dim, epochs, lr, weight_decay, batch_size, seed`` or a subset of
    them (the popularity baseline takes none); all of ``cfg`` is logged either way.
    """
    from pipelines.models import REGISTRY

    params = cfg.model_dump(exclude={"holdout_per_user", "k", "min_improvement", "model"})
    try:
        return get_recommender(cfg.model, **params)
    except TypeError:
        accepted = inspect.signature(REGISTRY[cfg.model].__init__).parameters
        return get_recommender(cfg.model, **{k: v for k, v in params.items() if k in accepted})


def train(interactions: pd.DataFrame, cfg: TrainConfig, items: pd.DataFrame | None = None, *,
          holdout_hours: int | None = None) -> TrainResult:
    """Fit ``cfg.model`` on the window minus its holdout and evaluate it on the holdout.

    Args:
        interactions: ``user_id, item_id, ts, weight`` (:func:`build_interactions`).
        cfg: hyperparameters (logged to MLflow as they are).
        items: the catalog, passed to models that use content (``None`` when there is none).
        holdout_hours: hold out the last hours of the window (see :func:`holdout_split`);
            None holds out each user's last ``cfg.holdout_per_user`` interactions.

    Raises:
        ValueError: when there is nothing to train on.
    """
    if interactions.empty:
        raise ValueError("no interactions to train on: run the simulator (`shoprec simulate`) or wait for traffic")
    train_df, test_df, holdout = holdout_split(interactions, holdout_hours, cfg.holdout_per_user)
    model = build_model(cfg)
    t0 = time.perf_counter()
    model.fit(train_df, items)
    fit_s = time.perf_counter() - t0
    scores = metrics.evaluate(model, train_df, test_df, k=cfg.k)
    ts = as_utc(interactions[COL_TS])
    window = (ts.min().isoformat(), ts.max().isoformat())
    history = getattr(model, "history", None)
    history = {str(k): [float(x) for x in v] for k, v in history.items()} if isinstance(history, dict) else {}
    log.info("trained %s on %d interactions in %.1fs, holdout %s: %s", cfg.model, len(train_df), fit_s, holdout, scores)
    return TrainResult(model, scores, cfg.model_dump(), len(train_df), len(test_df), window, fit_s,
                       train_df=train_df, test_df=test_df, holdout=holdout, history=history)


@dataclass
class Registration:
    run_id: str
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    #: ``champion``, ``challenger`` or None (registered, but given no alias)
    alias: str | None = None
    candidate_score: float = 0.0
    champion_score: float | None = None


def decide(candidate: float, champion: float | None, *, tolerance: float, margin: float,
           auto_promote: bool) -> tuple[str | None, str]:
    """The evaluation gate: which alias a candidate gets from its holdout score.

    Args:
        candidate: the candidate's primary metric on the holdout.
        champion: the champion's primary metric on the same holdout (None when there is no champion).
        tolerance: relative loss vs the champion a challenger may have, in ``[0, 1]``.
        margin: relative gain over the champion needed for automatic promotion.
        auto_promote: whether the gate may move ``champion`` at all.

    Returns:
        ``(alias or None, reason)``.
    """
    if champion is None:
        return ALIAS_CHAMPION, "first registered model"
    text = f"holdout {PRIMARY_METRIC} {candidate:.4f} vs champion {champion:.4f}"
    if auto_promote and candidate > champion * (1 + margin) and candidate > champion:
        return ALIAS_CHAMPION, f"{text}: beats it by more than {margin:.0%} (auto-promote on)"
    if candidate >= champion * (1 - tolerance):
        return ALIAS_CHALLENGER, (f"{text}: within {tolerance:.0%} of it" if candidate <= champion * (1 + margin)
                                  else f"{text}: beats it by more than {margin:.0%}; promote it in MLflow "
                                       f"(auto-promote off)")
    return None, f"{text}: worse by more than {tolerance:.0%}, no alias"


def register_and_gate(registry: ModelRegistry, result: TrainResult, *, tolerance: float = 0.05,
                      margin: float = 0.02, auto_promote: bool = False,
                      extra_tags: dict[str, str] | None = None) -> Registration:
    """Score the champion on the candidate's holdout, register the candidate, give it its alias.

    The candidate becomes ``champion`` when it is the first model, or when ``auto_promote``
    is on and it beats the champion by ``margin``; ``challenger`` when it is not worse than
    the champion by more than ``tolerance``; otherwise it is registered with no alias.
    A person promotes a challenger by moving the ``champion`` alias in MLflow.
    """
    k = result.params.get("k", 10)
    candidate = float(result.metrics.get(f"ndcg@{k}", 0.0))
    champion_version = registry.version_for(ALIAS_CHAMPION)
    champion_score = None
    if champion_version is not None:
        champion_score = _champion_score(registry, result, k)
    alias, reason = decide(candidate, champion_score, tolerance=tolerance, margin=margin, auto_promote=auto_promote)
    tags = {TAG_DATA_WINDOW_START: result.window[0], TAG_DATA_WINDOW_END: result.window[1],
            "n_train": str(result.n_train), "n_test": str(result.n_test), "model_family": result.params["model"],
            TAG_HOLDOUT: result.holdout, TAG_GATE_DECISION: alias or "rejected", "gate_reason": reason,
            "champion_before": champion_version or "",
            TAG_CHAMPION_HOLDOUT_NDCG: "" if champion_score is None else f"{champion_score:.6f}",
            **result.extra_tags, **(extra_tags or {})}
    run_id, version = registry.log_and_register(result.model, params=result.params, metrics=result.metrics,
                                                tags=tags, metric_history=result.history or None)
    if alias is not None:
        registry.set_alias(alias, version)
    log.info("version %s: %s -> %s", version, reason, alias or "no alias")
    return Registration(run_id, version, alias == ALIAS_CHAMPION, reason, champion_version, alias,
                        candidate, champion_score)


def gx_tags(partitions_used: int | str, left_out: list[str] | str, ran: dict[str, int] | None = None,
            skipped: dict[str, int] | None = None) -> dict[str, str]:
    """The Great Expectations result of a data window as model-version tags.

    Args:
        partitions_used: hourly partitions whose suites passed and that the window read.
        left_out: the partitions left out because a suite failed (a list or a comma-joined string).
        ran, skipped: per suite, on how many of the partitions used it ran / was skipped (:func:`suite_tally`).
            ``gx_suites`` names the suites that ran, with their count (``events 72/72``); every suite that was
            skipped anywhere is in ``gx_suites_skipped`` (``events_volume 2/72``). Unknown (None): ``gx_suites``
            names the suites there are, as before.
    """
    left_out = ",".join(left_out) if isinstance(left_out, list) else (left_out or "")
    tags = {TAG_GX_SUCCESS: str(not left_out).lower(), "gx_partitions_used": str(partitions_used),
            "gx_partitions_left_out": left_out}

    def counted(per_suite: dict[str, int]) -> str:
        return ",".join(f"{name.removeprefix('shoprec_')} {n}/{partitions_used}" for name, n in per_suite.items())

    if ran is None:
        tags["gx_suites"] = ",".join(p.stem for p in validation.SUITE_PATHS)
    else:
        tags["gx_suites"] = counted(ran)
        tags["gx_suites_skipped"] = counted(skipped or {})
    return tags


def _champion_score(registry: ModelRegistry, result: TrainResult, k: int) -> float:
    """The champion's NDCG@k on the candidate's own holdout (0.0 when it cannot be loaded)."""
    try:
        champion = registry.load(ALIAS_CHAMPION)
    except Exception as err:  # a broken champion must not block a good candidate
        log.warning("could not load the champion to compare (%s); scoring it 0", err)
        return 0.0
    if champion is None or result.test_df is None:
        return 0.0
    return float(metrics.evaluate(champion.recommender, result.train_df, result.test_df, k=k)[f"ndcg@{k}"])


def popular_items(interactions: pd.DataFrame, k: int = 200) -> list[tuple[str, float]]:
    """The ``k`` items with the most weighted interactions (the fallback list)."""
    if interactions.empty:
        return []
    w = interactions[COL_WEIGHT] if COL_WEIGHT in interactions else 1.0
    counts = (interactions.assign(_w=w).groupby(COL_ITEM)["_w"].sum().sort_values(ascending=False).head(k))
    return [(str(i), float(s)) for i, s in counts.items()]


# --- early retraining ------------------------------------------------------------
@dataclass
class RetrainTrigger:
    """Whether to retrain before the schedule, and why."""

    fire: bool
    reason: str
    new_events: int
    drift: DriftReport | None = None


def _hours(start: datetime, end: datetime) -> list[str]:
    t = start.replace(minute=0, second=0, microsecond=0)
    out = []
    while t < end:
        out.append(t.strftime("%Y-%m-%d-%H:00"))
        t += timedelta(hours=1)
    return out


def _read_columns(lake_dir: Path, keys: list[str], columns: list[str]) -> pd.DataFrame:
    files = [f for k in keys for f in lake.partition_files(lake_dir, k)]
    if not files:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    return lake.read_relisting(
        files, lambda fs: pa.concat_tables([pq.read_table(f, columns=columns) for f in fs]).to_pandas())


def retrain_trigger(lake_dir: Path, since: datetime, now: datetime, *, min_new_events: int,
                    psi_threshold: float, catalog: pd.DataFrame | None = None,
                    reference_hours: int = 24) -> RetrainTrigger:
    """Decide whether to retrain early: enough new events since ``since``, or a drifted event mix.

    New events are those of the lake with ``since < ts <= now``; the drift compares their
    mix (event types, and categories when a catalog is given) with the ``reference_hours``
    before ``since`` (what the last model was trained on most recently).
    """
    since = since.astimezone(timezone.utc)
    cols = [COL_EVENT_TYPE, COL_ITEM, COL_TS]
    keys = _hours(since, now)
    first = _read_columns(lake_dir, keys[:1], cols)
    new_first = first[pd.to_datetime(first[COL_TS], utc=True) > pd.Timestamp(since)]
    later = sum(validation.partition_rows(lake_dir, k) for k in keys[1:])
    n_new = len(new_first) + later
    if n_new >= min_new_events:
        return RetrainTrigger(True, f"{n_new} new events since {since.isoformat()} (threshold {min_new_events})",
                              n_new)
    current = pd.concat([new_first, _read_columns(lake_dir, keys[1:], cols)], ignore_index=True)
    reference = _read_columns(lake_dir, _hours(since - timedelta(hours=reference_hours), since), cols)
    reference = reference[pd.to_datetime(reference[COL_TS], utc=True) <= pd.Timestamp(since)]
    report = drift.event_mix_drift(reference, current, threshold=psi_threshold, catalog=catalog)
    if report.drifted:
        return RetrainTrigger(True, f"event mix drifted: {report.summary()}", n_new, report)
    return RetrainTrigger(False, f"{n_new} of {min_new_events} new events; {report.summary()}", n_new, report)


# --- training window and cache warm-up --------------------------------------------
@dataclass
class Window:
    """Lake events of a training window, from the partitions that passed validation, each event once."""

    events: pd.DataFrame
    passed: list[str]
    failed: list[str]
    #: rows dropped because an earlier row had their event_id (redeliveries the suite tolerates)
    duplicates_dropped: int = 0
    #: per suite (``shoprec_events`` ...), how many of the ``passed`` partitions it ran on (their quality reports)
    suites_ran: dict[str, int] = field(default_factory=dict)
    #: per suite, how many of them it skipped (the volume suite before 3 hours of stream history, ...)
    suites_skipped: dict[str, int] = field(default_factory=dict)


def load_window(lake_dir: Path, quality_dir: Path, start: datetime, end: datetime, **validate_kw) -> Window:
    """Events of the hourly partitions in ``[start, end)`` whose quality report passed.

    A partition never validated is validated first (see :func:`validation.split_by_quality`);
    a failed one is left out, so training never consumes data that broke a suite.
    A row whose ``event_id`` an earlier row has (a redelivery: the suite tolerates up to 1% of them)
    is dropped, so each event counts once (:func:`validation.repeated_events`, the first row stays).
    ``validate_kw`` goes to :func:`validation.validate_partition` (``known_items``, ...).
    """
    keys = [k for k in _hours(start, end) if any(lake.partition_dir(lake_dir, k).glob("*.parquet"))]
    passed, failed = validation.split_by_quality(lake_dir, keys, quality_dir, **validate_kw)
    files = [f for k in passed for f in lake.partition_files(lake_dir, k)]
    if failed:
        log.warning("training leaves out %d partition(s) that failed validation: %s", len(failed), failed)
    events = lake.read_files(files)
    repeated = validation.repeated_events(events)
    dropped = int(repeated.sum())
    if dropped:
        events = events[~repeated.to_numpy()].reset_index(drop=True)
        log.info("training counts each event once: dropped %d repeated event_id row(s), %d events left",
                 dropped, len(events))
    ran, skipped = suite_tally(quality_dir, passed)
    return Window(events, passed, failed, dropped, ran, skipped)


def suite_tally(quality_dir: Path, partitions: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Per suite, on how many of ``partitions`` it ran and how many it skipped (from their quality reports)."""
    ran: Counter = Counter()
    skipped: Counter = Counter()
    for key in partitions:
        stats = (validation.read_report(quality_dir, key) or {}).get("statistics") or {}
        ran.update((stats.get("suites") or {}).keys())
        skipped.update((stats.get("skipped_suites") or {}).keys())
    return dict(sorted(ran.items())), dict(sorted(skipped.items()))


def active_users(interactions: pd.DataFrame, n: int) -> list[str]:
    """The ``n`` users with the most interactions, most active first."""
    if interactions.empty or n <= 0:
        return []
    return [str(u) for u in interactions[COL_USER].value_counts().head(n).index]


def warm_cache(state, loaded, users: list[str], k: int, variant: str, settings: Settings | None = None) -> int:
    """Cache for each known user what serving would cache on their next ``/recommend`` of ``k`` items.

    The lists go through serving's own path, not a copy of it: a
    :class:`~pipelines.serving.ModelHolder` of ``loaded`` (a ``registry.LoadedModel``) scores the
    users in batches with their recent items, applies the business rules (stock, category cap and
    new products from the catalog file, their purchases from Redis) with the model's popular list to
    fill in with, and each answer is stored as serving stores it (:func:`~pipelines.serving.cache_entry`,
    under the variant that answered, with its version, :func:`~pipelines.serving.cached_list_length`
    items). So the next ``/recommend`` of these users is a cache hit with this model version and the
    list a freshly scored one would be. Nothing is written when serving does not cache (``serve_cache``).

    Returns:
        How many users were warmed (users the model does not know are skipped).
    """
    from pipelines.serving import ModelHolder, cache_entry, cached_list_length, scoring_request

    settings = settings or get_settings()
    if not settings.serve_cache:
        return 0
    holder = ModelHolder(settings, models={variant: loaded})
    n = cached_list_length(settings, k)
    known = set(map(str, loaded.recommender.known_users))
    users = [u for u in users if u in known]
    done = 0
    for i in range(0, len(users), 256):
        chunk = users[i:i + 256]
        requests = [scoring_request(user, variant, n, *state.user_context(user)) for user in chunk]
        for user, answer in zip(chunk, holder.score(requests)):
            if "error" in answer or not answer.get("items"):  # (serving caches no such answer either)
                continue
            state.set_cached(user, answer["variant"], cache_entry(answer, n))
            done += 1
    return done
