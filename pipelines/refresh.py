"""The hourly incremental refresh of the served models: fresher item-to-item neighbours and trending.

Between daily full retrains, the model behind ``champion`` (and ``challenger`` when there is
one) is loaded from MLflow and its item-to-item part and trending scores are recomputed from
the recent validated events (:meth:`ShopRec.refresh <pipelines.models.hybrid.ShopRec.refresh>`,
:meth:`ItemItem.refit <pipelines.models.itemitem.ItemItem.refit>`); embeddings, known users and
the item index stay as trained, so the refreshed model is a drop-in replacement. The refreshed
model is scored on the same time-based holdout the evaluation gate uses (the last
``holdout_hours`` of the window; it is refreshed on the hours before them, so the score is
honest) next to the version it came from, logged and registered as a new version tagged
``refresh_of=<version>``, and given the alias it came from only when it is not worse than that
version by more than the gate's tolerance. Serving polls the aliases, so a refreshed champion is
served within ``SHOPREC_MODEL_POLL_S``.

Dagster calls :func:`refresh_served`; it knows nothing about Dagster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from pipelines import metrics, training
from pipelines.models import Recommender
from pipelines.registry import ModelRegistry
from pipelines.schemas import (ALIAS_CHALLENGER, ALIAS_CHAMPION, COL_ITEM, COL_TS, COL_USER, TAG_DATA_WINDOW_END,
                               TAG_DATA_WINDOW_START, TAG_GATE_DECISION, TAG_HOLDOUT, TAG_TRAINED_VERSION)

log = logging.getLogger(__name__)

#: model-version tags of a refresh (next to the gate's tags that every version carries)
TAG_REFRESH_OF = "refresh_of"
TAG_REFRESH_WINDOW_START, TAG_REFRESH_WINDOW_END = "refresh_window_start", "refresh_window_end"

REFRESHED, REJECTED, SKIPPED = "refreshed", "rejected", "skipped"


@dataclass
class AliasRefresh:
    """What the refresh did for one alias."""

    alias: str
    #: ``refreshed`` (registered, not worse), ``rejected`` (registered, worse: alias left) or ``skipped``
    status: str
    note: str
    source_version: str | None = None
    version: str | None = None
    run_id: str | None = None
    alias_moved: bool = False
    rows: int = 0
    dropped_rows: int = 0
    seconds: float = 0.0
    #: primary metric (NDCG@k) on the holdout before / after the refresh
    before: float | None = None
    after: float | None = None

    def metadata(self) -> dict[str, object]:
        """Flat ``<alias>_<field>`` entries (no None values, so any metadata store takes them)."""
        values = {"status": self.status, "note": self.note, "refreshed_version": self.source_version or "none",
                  "new_version": self.version or "none", "mlflow_run_id": self.run_id or "none",
                  "alias_moved": self.alias_moved, "rows": self.rows, "dropped_rows": self.dropped_rows,
                  "seconds": round(self.seconds, 3),
                  "holdout_ndcg_before": float("nan") if self.before is None else self.before,
                  "holdout_ndcg_after": float("nan") if self.after is None else self.after}
        return {f"{self.alias}_{k}": v for k, v in values.items()}


@dataclass
class RefreshReport:
    """The refresh window and what happened to each alias."""

    note: str
    window_rows: int = 0
    window: tuple[str, str] | None = None
    partitions_used: int = 0
    partitions_left_out: list[str] = field(default_factory=list)
    holdout: str = ""
    aliases: list[AliasRefresh] = field(default_factory=list)

    def summary(self) -> str:
        """A Markdown table a person reads in the Dagster UI."""
        lines = ["| alias | from | new version | status | NDCG before → after | rows (dropped) | seconds | note |",
                 "|---|---|---|---|---|---|---|---|"]
        for a in self.aliases:
            scores = "—" if a.before is None or a.after is None else f"{a.before:.4f} → {a.after:.4f}"
            lines.append(f"| {a.alias} | {a.source_version or '—'} | {a.version or '—'} | {a.status}"
                         f"{' (alias moved)' if a.alias_moved else ''} | {scores} | {a.rows} ({a.dropped_rows}) "
                         f"| {a.seconds:.2f} | {a.note} |")
        return "\n".join([self.note, "", *lines]) if self.aliases else self.note


class _WithoutWindowItems:
    """``model`` with each user's items of the refresh window removed from their lists.

    The holdout's relevant items exclude what a user had before it (:func:`metrics.evaluate`),
    assuming the model excludes those too; a refreshed model still excludes only what it saw in
    its full training, so without this a refresh would be charged for recommending a user's own
    later items, which no version can ever get credit for. Both sides of the comparison are
    scored through this view.
    """

    def __init__(self, model: Recommender, window: pd.DataFrame):
        self.model = model
        self.seen = window.groupby(COL_USER)[COL_ITEM].agg(lambda s: set(map(str, s))).to_dict() if len(window) else {}

    @property
    def known_users(self):
        return self.model.known_users

    def recommend(self, user_ids: Sequence[str], k: int, exclude_seen: bool = True) -> list[list[str]]:
        extra = max((len(self.seen.get(u, ())) for u in user_ids), default=0)
        lists = self.model.recommend(user_ids, k + extra, exclude_seen=exclude_seen)
        return [[i for i in items if i not in self.seen.get(u, ())][:k] for u, items in zip(user_ids, lists)]


def _holdout_score(model: Recommender, train_df: pd.DataFrame, test_df: pd.DataFrame, k: int) -> float:
    """NDCG@k on the holdout with the window's earlier items out of every list (see :class:`_WithoutWindowItems`)."""
    return float(metrics.evaluate(_WithoutWindowItems(model, train_df), train_df, test_df, k=k)[f"ndcg@{k}"])


def refresh_model(model: Recommender, interactions: pd.DataFrame) -> dict[str, float] | None:
    """Refresh the incremental parts of ``model`` in place from recent ``interactions``.

    Returns:
        ``{"rows", "dropped_rows", "seconds"}``, or None when the model has no incremental part
        (it waits for the next full retrain).

    Raises:
        ValueError: when no interaction names an item the model knows (the model is unchanged).
    """
    if callable(getattr(model, "refresh", None)):  # the hybrid: item-to-item and trending
        return model.refresh(interactions)
    if callable(getattr(model, "refit", None)):  # item-to-item alone
        t0 = time.perf_counter()
        rows = model.refit(interactions)
        return {"rows": rows, "dropped_rows": len(interactions) - rows, "seconds": time.perf_counter() - t0}
    return None


def _reaches(window_end: str | None, last_event: pd.Timestamp) -> bool:
    """Whether a data window ending at ``window_end`` (ISO time) already holds the newest event."""
    try:
        return bool(window_end) and pd.Timestamp(window_end) >= last_event
    except ValueError:
        return False


def _nothing_new(registry: ModelRegistry, source: str, src_tags: dict[str, str], last: pd.Timestamp) -> str | None:
    """Why refreshing ``source`` on a window ending at ``last`` would repeat earlier work (None: it would not)."""
    if _reaches(src_tags.get(TAG_DATA_WINDOW_END), last):
        return f"version {source} already saw every event of the window (up to {last.isoformat()}): no new events"
    earlier = {v: t for v, t in registry.versions_tagged(TAG_REFRESH_OF, source).items()
               if _reaches(t.get(TAG_REFRESH_WINDOW_END), last)}
    if earlier:  # a rejected refresh leaves the alias where it was: do not register the same one every hour
        v = max(earlier, key=int)
        return (f"version {source} was refreshed on this window already (version {v}, "
                f"{earlier[v].get(TAG_GATE_DECISION)}): no new events")
    return None


def refresh_alias(registry: ModelRegistry, alias: str, interactions: pd.DataFrame, *, holdout_hours: int | None,
                  holdout_per_user: int = 1, k: int = 10, tolerance: float = 0.05, move_champion: bool = True,
                  extra_tags: dict[str, str] | None = None, skip_versions: frozenset[str] = frozenset()
                  ) -> AliasRefresh:
    """Refresh the model behind ``alias``, register the result and move ``alias`` onto it when not worse.

    Args:
        registry: the MLflow registry.
        alias: ``champion`` or ``challenger``.
        interactions: the refresh window, ``user_id, item_id, ts, weight``
            (:func:`pipelines.training.build_interactions` of validated partitions).
        holdout_hours: the gate's time-based holdout (see :func:`pipelines.training.holdout_split`).
        holdout_per_user: the holdout's fallback when the window is too short for hours.
        k: cut-off of the metrics.
        tolerance: relative NDCG@k loss vs the source version the refreshed one may have and
            still take its alias, in ``[0, 1]`` (the gate's ``SHOPREC_CHALLENGER_TOLERANCE``).
        move_champion: whether a refresh may move ``champion`` (``SHOPREC_REFRESH_MOVES_CHAMPION``);
            when not, a passing refresh of the champion is registered without an alias.
        extra_tags: more model-version tags (Dagster run id, Great Expectations result).
        skip_versions: versions refreshed already in this round (an alias sharing one is skipped).
    """
    source = registry.version_for(alias)
    if source is None:
        return AliasRefresh(alias, SKIPPED, f"no `{alias}` yet: nothing to refresh")
    if source in skip_versions:
        return AliasRefresh(alias, SKIPPED, f"version {source} was refreshed for another alias", source)
    src_tags = registry.tags(source)
    why = _nothing_new(registry, source, src_tags, training.as_utc(interactions[COL_TS]).max())
    if why:
        return AliasRefresh(alias, SKIPPED, why, source)
    loaded = registry.load(alias)
    if loaded is None or loaded.version != source:  # moved between the two calls: refresh next time
        return AliasRefresh(alias, SKIPPED, f"`{alias}` moved during the refresh; left for the next one", source)
    model = loaded.recommender
    if not callable(getattr(model, "refresh", None)) and not callable(getattr(model, "refit", None)):
        return AliasRefresh(alias, SKIPPED, f"model family `{model.name}` has no incremental refresh; it is "
                                            f"updated by the daily full retrain", source)

    train_df, test_df, holdout = training.holdout_split(interactions, holdout_hours, holdout_per_user)
    key = f"ndcg@{k}"
    before = _holdout_score(model, train_df, test_df, k)
    source_metrics = metrics.evaluate(model, train_df, test_df, k=k)
    try:
        stats = refresh_model(model, train_df)
    except ValueError as err:
        return AliasRefresh(alias, SKIPPED, f"{err}", source, before=before)
    after = _holdout_score(model, train_df, test_df, k)
    # logged like every trained version's metrics, so MLflow and the dashboard compare like with like
    after_metrics = metrics.evaluate(model, train_df, test_df, k=k)

    passed = after >= before * (1 - tolerance)
    # the gate's protocol leaves the window's items out of the lists (see _WithoutWindowItems); the metrics
    # logged below use the usual one, like every trained version's, so both pairs are named here
    text = (f"holdout {key} {after:.4f} after vs {before:.4f} before (version {source}), with each user's window "
            f"items left out of their lists; as logged in the metrics, {after_metrics[key]:.4f} vs "
            f"{source_metrics[key]:.4f}")
    if not passed:
        decision, reason = REJECTED, f"{text}: worse by more than {tolerance:.0%}, `{alias}` stays on {source}"
    elif alias == ALIAS_CHAMPION and not move_champion:
        decision, reason = "passed", (f"{text}: within {tolerance:.0%}; SHOPREC_REFRESH_MOVES_CHAMPION is off, "
                                      f"promote it in MLflow")
    else:
        decision, reason = alias, f"{text}: within {tolerance:.0%}, `{alias}` moves to the refresh"

    ts = training.as_utc(interactions[COL_TS])
    window = (ts.min().isoformat(), ts.max().isoformat())
    start = min(filter(None, [src_tags.get(TAG_DATA_WINDOW_START), window[0]]), key=pd.Timestamp)
    tags = {
        TAG_REFRESH_OF: source, "refresh_alias": alias, TAG_TRAINED_VERSION: src_tags.get(TAG_TRAINED_VERSION) or source,
        TAG_REFRESH_WINDOW_START: window[0], TAG_REFRESH_WINDOW_END: window[1],
        # embeddings saw the source's window, neighbours and trending the refresh window
        TAG_DATA_WINDOW_START: start, TAG_DATA_WINDOW_END: window[1],
        "refresh_rows": str(int(stats["rows"])), "refresh_dropped_rows": str(int(stats["dropped_rows"])),
        "refresh_seconds": f"{stats['seconds']:.3f}",
        "n_train": str(len(train_df)), "n_test": str(len(test_df)), TAG_HOLDOUT: holdout,
        "model_family": src_tags.get("model_family", model.name),
        TAG_GATE_DECISION: decision, "gate_reason": reason,
        "champion_before": registry.version_for(ALIAS_CHAMPION) or "",
        "refresh_holdout_ndcg_before": f"{before:.6f}", "refresh_holdout_ndcg_after": f"{after:.6f}",
        **(extra_tags or {}),
    }
    params = {"model": model.name, **model.params(), "refresh_of": source, "refresh_alias": alias,
              "holdout_hours": holdout_hours, "k": k}
    run_id, version = registry.log_and_register(
        model, params=params, tags=tags, run_name=f"refresh-{model.name}-v{source}",
        metrics={**after_metrics, f"source_{key}": source_metrics[key], "refresh_seconds": stats["seconds"]})
    moved = False
    if decision == alias:
        if registry.version_for(alias) == source:  # a person may have moved it meanwhile: theirs wins
            registry.set_alias(alias, version)
            moved = True
            if alias == ALIAS_CHAMPION and registry.version_for(ALIAS_CHALLENGER) == source:
                # a challenger left on the champion's version is no contender (serving ignores it); left behind,
                # it would name the old champion and bring it back into traffic, so it follows the champion
                registry.set_alias(ALIAS_CHALLENGER, version)
                reason += f"; `{ALIAS_CHALLENGER}` named the champion's version and follows it"
                registry.client.set_model_version_tag(registry.name, version, "gate_reason", reason)
        else:
            reason += f"; `{alias}` was moved meanwhile, left alone"
            registry.client.set_model_version_tag(registry.name, version, "gate_reason", reason)
    log.info("refresh of %s (version %s) -> version %s: %s", alias, source, version, reason)
    return AliasRefresh(alias, REFRESHED if passed else REJECTED, reason, source, version, run_id, moved,
                        int(stats["rows"]), int(stats["dropped_rows"]), float(stats["seconds"]), before, after)


def refresh_served(registry: ModelRegistry, lake_dir: Path, quality_dir: Path, start: datetime, end: datetime, *,
                   holdout_hours: int | None, holdout_per_user: int = 1, k: int = 10, tolerance: float = 0.05,
                   move_champion: bool = True, extra_tags: dict[str, str] | None = None,
                   aliases: tuple[str, ...] = (ALIAS_CHAMPION, ALIAS_CHALLENGER), **validate_kw) -> RefreshReport:
    """The hourly refresh of every served alias from the validated lake partitions in ``[start, end)``.

    Nothing is read when there is no ``champion`` yet (the first full retrain makes one). The
    window is built like the training window (:func:`pipelines.training.load_window`, so a
    partition that failed its Great Expectations suites is left out, then
    :func:`pipelines.training.build_interactions`); see :func:`refresh_alias` for the rest.
    ``validate_kw`` goes to :func:`pipelines.validation.validate_partition`.
    """
    if registry.version_for(ALIAS_CHAMPION) is None:
        return RefreshReport(f"no `{ALIAS_CHAMPION}` yet: nothing to refresh (run train_job first)")
    win = training.load_window(lake_dir, quality_dir, start, end, **validate_kw)
    interactions = training.build_interactions(win.events)
    report = RefreshReport("", len(interactions), partitions_used=len(win.passed), partitions_left_out=win.failed)
    if interactions.empty:
        report.note = f"no validated interactions between {start.isoformat()} and {end.isoformat()}: nothing to refresh"
        return report
    ts = training.as_utc(interactions[COL_TS])
    report.window = (ts.min().isoformat(), ts.max().isoformat())
    report.holdout = training.holdout_split(interactions, holdout_hours, holdout_per_user)[2]
    tags = {**training.gx_tags(len(win.passed), win.failed, win.suites_ran, win.suites_skipped), **(extra_tags or {})}
    done: set[str] = set()
    for alias in aliases:
        result = refresh_alias(registry, alias, interactions, holdout_hours=holdout_hours,
                               holdout_per_user=holdout_per_user, k=k, tolerance=tolerance,
                               move_champion=move_champion, extra_tags=tags, skip_versions=frozenset(done))
        if result.status != SKIPPED:
            done.add(result.source_version)
            if result.alias_moved:
                done.add(result.version)  # an alias that followed it is not refreshed again
        report.aliases.append(result)
    moved = [a.alias for a in report.aliases if a.alias_moved]
    report.note = (f"refreshed from {len(interactions)} interactions ({report.window[0]} .. {report.window[1]}); "
                   f"alias moved: {', '.join(moved) or 'none'}")
    return report
