"""A closed-loop A/B experiment on the shop simulator, recorded the way the dashboard reads it.

Demo and test data for the dashboard: the A/B validity tests, the browser test (which screenshots
the A/B page of such a run, ``docs/ab_test.png``) and the page-load benchmark use it. Users are split by :class:`pipelines.experiment.Experiment` (salted hash, as serving
does); each variant is a fitted recommender; the simulated users click with a probability from
their hidden taste and the list position, so a model that knows their taste really is better.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

import pandas as pd

from pipelines.experiment import Experiment
from pipelines.lake import write_events
from pipelines.models import Recommender, get_recommender
from pipelines.schemas import RedisKeys
from pipelines.simulator import ShopSimulator, make_catalog
from pipelines.state import AB_METRICS, BUCKET_S, STATS_TTL_S, OnlineState, ab_stats_name
from pipelines.training import build_interactions


def trained_world(seed: int = 3, n_items: int = 1000, n_users: int = 1500, history_events: int = 60_000):
    """A simulator and two models fitted on its history: ``{"popularity": ..., "bpr": ...}`` (~4 s)."""
    sim = ShopSimulator(make_catalog(n_items, seed=seed), n_users=n_users, seed=seed, new_item_rate=0.0,
                        new_user_rate=0.0)
    ev = pd.DataFrame(list(sim.events(history_events)))
    ev["ts"] = pd.to_datetime(ev["ts"], unit="ms", utc=True)
    inter = build_interactions(ev)
    models = {"popularity": get_recommender("popularity").fit(inter),
              "bpr": get_recommender("bpr", dim=32, epochs=10, seed=seed).fit(inter)}
    return sim, models


def recommend_fn(models: Mapping[str, Recommender], experiment: Experiment, k: int = 10):
    """A ``recommend_fn`` that assigns the user a variant and ranks with that variant's model."""

    known = {v: set(m.known_users) for v, m in models.items()}

    def recommend(user_id: str):
        variant = experiment.assign(user_id)
        model = models[variant]
        items = (model.recommend([user_id], k)[0] if user_id in known[variant]
                 else model.recommend_session([], k))
        return uuid.uuid4().hex, items, variant, model.name

    return recommend


def run_sessions(sim: ShopSimulator, recommend, n_sessions: int, *, start_ms: int, end_ms: int) -> list[dict]:
    """``n_sessions`` closed-loop sessions starting evenly between ``start_ms`` and ``end_ms``."""
    out: list[dict] = []
    step = (end_ms - start_ms) / max(n_sessions, 1)
    for i in range(n_sessions):
        out += sim.step_with_recommender(recommend, ts_ms=int(start_ms + i * step))
    return out


def ab_counts(events: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Impressions, clicks, carts and purchases per variant (what the consumer adds to Redis)."""
    out: dict[str, dict[str, int]] = {}
    for e in events:
        if e.get("variant") and e["event_type"] in AB_METRICS:
            c = out.setdefault(e["variant"], {})
            c[AB_METRICS[e["event_type"]]] = c.get(AB_METRICS[e["event_type"]], 0) + 1
    return out


def record(state: OnlineState, events: list[dict], lake_dir) -> None:
    """Write the run like the stream consumer does: A/B totals and per-minute counters in Redis, events
    in the lake. Minutes are those of the events' own ``ts`` (not the wall clock) so a run simulated over
    hours has a history for the cumulative-lift chart."""
    p = state.r.pipeline(transaction=False)
    for e in events:
        v = e.get("variant")
        if v and e["event_type"] in AB_METRICS:
            metric = AB_METRICS[e["event_type"]]
            p.hincrby(RedisKeys.ab(state.experiment, v), metric, 1)
            key = RedisKeys.counter(ab_stats_name(state.experiment, v), e["ts"] // 1000 // BUCKET_S)
            p.hincrby(key, metric, 1)
            p.expire(key, STATS_TTL_S)
    p.execute()
    write_events(lake_dir, events)
