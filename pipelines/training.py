"""Training data, training, offline evaluation and the promotion decision.

Dagster assets call these functions; they know nothing about Dagster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pandas as pd

from pipelines import metrics
from pipelines.models import Recommender, get_recommender
from pipelines.registry import PRIMARY_METRIC, ModelRegistry
from pipelines.schemas import (ALIAS_CHAMPION, COL_EVENT_TYPE, COL_ITEM, COL_TS, COL_USER, COL_WEIGHT,
                               EVENT_WEIGHTS)
from pipelines.settings import TrainConfig

log = logging.getLogger(__name__)


def build_interactions(events: pd.DataFrame) -> pd.DataFrame:
    """Interactions (``user_id, item_id, ts, weight``) from lake events; impressions are dropped.

    ``weight`` says how much an event tells about taste (a purchase more than a view).
    """
    ev = events[events[COL_EVENT_TYPE].isin(list(EVENT_WEIGHTS)) & events[COL_ITEM].notna()]
    out = ev[[COL_USER, COL_ITEM, COL_TS]].copy()
    out[COL_WEIGHT] = ev[COL_EVENT_TYPE].map(EVENT_WEIGHTS).astype("float32")
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


def train(interactions: pd.DataFrame, cfg: TrainConfig, items: pd.DataFrame | None = None) -> TrainResult:
    """Fit ``cfg.model`` on all but each user's last ``holdout_per_user`` interactions and evaluate on those.

    Raises:
        ValueError: when there is nothing to train on.
    """
    if interactions.empty:
        raise ValueError("no interactions to train on: run the simulator (`shoprec simulate`) or wait for traffic")
    train_df, test_df = metrics.time_split(interactions, holdout_per_user=cfg.holdout_per_user)
    params = cfg.model_dump(exclude={"holdout_per_user", "k", "min_improvement", "model"})
    if cfg.model == "popularity":
        params = {}
    model = get_recommender(cfg.model, **params)
    t0 = time.perf_counter()
    model.fit(train_df, items)
    fit_s = time.perf_counter() - t0
    scores = metrics.evaluate(model, train_df, test_df, k=cfg.k)
    ts = pd.to_datetime(interactions[COL_TS], utc=True)
    window = (ts.min().isoformat(), ts.max().isoformat())
    log.info("trained %s on %d interactions in %.1fs: %s", cfg.model, len(train_df), fit_s, scores)
    return TrainResult(model, scores, cfg.model_dump(), len(train_df), len(test_df), window, fit_s)


@dataclass
class Registration:
    run_id: str
    version: str
    promoted: bool
    reason: str
    champion_before: str | None


def register_and_gate(registry: ModelRegistry, result: TrainResult, *, min_improvement: float = 0.0,
                      extra_tags: dict[str, str] | None = None) -> Registration:
    """Register the candidate; it becomes ``champion`` when it is the first or beats the champion.

    The comparison is on the primary offline metric (NDCG@k of each model's own time holdout).
    """
    tags = {"data_window_start": result.window[0], "data_window_end": result.window[1],
            "n_train": str(result.n_train), "n_test": str(result.n_test), "model_family": result.params["model"],
            **(extra_tags or {})}
    run_id, version = registry.log_and_register(result.model, params=result.params, metrics=result.metrics,
                                                tags=tags)
    champion = registry.version_for(ALIAS_CHAMPION)
    new = result.metrics.get(PRIMARY_METRIC.replace("_at_", "@"), 0.0)
    if champion is None:
        promoted, reason = True, "first registered model"
    else:
        old = registry.metric(champion) or 0.0
        promoted = new > old + min_improvement
        reason = (f"NDCG {new:.4f} vs champion v{champion} {old:.4f} "
                  f"({'beats' if promoted else 'does not beat'} it by more than {min_improvement})")
    if promoted:
        registry.set_alias(ALIAS_CHAMPION, version)
    log.info("version %s: %s -> %s", version, reason, "champion" if promoted else "not promoted")
    return Registration(run_id, version, promoted, reason, champion)


def popular_items(interactions: pd.DataFrame, k: int = 200) -> list[tuple[str, float]]:
    """The ``k`` items with the most weighted interactions (the fallback list)."""
    if interactions.empty:
        return []
    w = interactions[COL_WEIGHT] if COL_WEIGHT in interactions else 1.0
    counts = (interactions.assign(_w=w).groupby(COL_ITEM)["_w"].sum().sort_values(ascending=False).head(k))
    return [(str(i), float(s)) for i, s in counts.items()]
