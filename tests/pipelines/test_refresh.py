"""The hourly incremental refresh against a real MLflow registry: a refreshed version is registered
with its lineage, takes the alias only when it is not worse, and models without an incremental
part are left to the daily retrain."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from pipelines import refresh, training
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION

T0 = datetime(2026, 11, 20, tzinfo=timezone.utc)
N_ITEMS = 40


def taste_window(hours: int, n_users: int = 80, per_hour: float = 1.5, seed: int = 0) -> pd.DataFrame:
    """Interactions over ``hours`` hours from T0 of users who stick to their group's half of the items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        pool = [i for i in range(N_ITEMS) if i % 2 == u % 2]
        n = max(2, int(per_hour * hours))
        for i, t in zip(rng.choice(pool, size=min(n, len(pool)), replace=False),
                        rng.uniform(0, hours * 3600, size=n)):
            rows.append((f"u{u}", f"i{i}", T0 + timedelta(seconds=float(t)), 1.0))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "weight"])
    df["weight"] = df["weight"].astype("float32")
    return df.sort_values("ts", kind="stable").reset_index(drop=True)


def _registry(settings) -> ModelRegistry:
    return ModelRegistry(settings.mlflow_tracking_uri, name=f"shoprec-refresh-{uuid.uuid4().hex[:6]}")


def _champion(registry: ModelRegistry, interactions: pd.DataFrame, settings, model: str = "shoprec") -> str:
    cfg = settings.train.model_copy(update={"model": model, "epochs": 10, "dim": 16})
    result = training.train(interactions, cfg, holdout_hours=1)
    return training.register_and_gate(registry, result).version


def _refresh(registry, interactions, alias=ALIAS_CHAMPION, **kw):
    return refresh.refresh_alias(registry, alias, interactions, holdout_hours=1, tolerance=0.05,
                                 extra_tags={"gx_success": "true"}, **kw)


def test_a_refresh_is_registered_with_its_lineage_and_takes_the_alias_only_when_not_worse(settings):
    registry = _registry(settings)
    full = taste_window(12)
    champion = _champion(registry, full[full.ts < pd.Timestamp(T0 + timedelta(hours=8))], settings)

    # four more hours of the same shop: the refresh is not worse, so serving gets it
    fresh = _refresh(registry, full)
    assert fresh.status == refresh.REFRESHED and fresh.alias_moved, fresh.note
    assert fresh.source_version == champion and fresh.version != champion
    assert registry.version_for(ALIAS_CHAMPION) == fresh.version
    assert fresh.after >= fresh.before * 0.95 and fresh.rows > 0 and fresh.seconds > 0
    tags = registry.tags(fresh.version)
    assert tags[refresh.TAG_REFRESH_OF] == champion and tags["gate_decision"] == ALIAS_CHAMPION
    assert tags["gx_success"] == "true" and tags["holdout"].startswith("last 1h")
    assert pd.Timestamp(tags["refresh_window_end"]) == full.ts.max()
    assert pd.Timestamp(tags["data_window_start"]) == full.ts.min()
    assert float(tags["refresh_holdout_ndcg_after"]) == pytest.approx(fresh.after, abs=1e-6)
    assert 0 < float(tags["metric.ndcg_at_10"]) <= 1  # the metrics every version carries, for the dashboard
    # the gate's reason names both pairs of figures, so the dashboard's metrics can be found in it
    assert f"{float(tags['refresh_holdout_ndcg_after']):.4f} after" in tags["gate_reason"]
    assert f"as logged in the metrics, {float(tags['metric.ndcg_at_10']):.4f} vs" in tags["gate_reason"]
    assert tags["champion_before"] == champion  # the README's rollback moves `champion` back to it
    run = registry.client.get_run(fresh.run_id)
    assert run.info.run_name == f"refresh-shoprec-v{champion}" and run.data.params["refresh_of"] == champion
    # what serving loads behind `champion` now: the refreshed model, still knowing the trained users
    loaded = registry.load(ALIAS_CHAMPION)
    assert loaded.version == fresh.version and len(loaded.recommender.recommend(["u1"], 5)[0]) == 5
    assert loaded.lineage == champion  # its A/B comparison stays the trained version's

    # nothing new since: no version is registered
    again = _refresh(registry, full)
    assert again.status == refresh.SKIPPED and "no new events" in again.note and again.version is None

    # an hour later, but the history it refreshes from is garbage (items shuffled): worse, so the
    # version is registered as rejected and `champion` stays where it was
    later = taste_window(13, seed=0)
    cutoff = later.ts.max() - pd.Timedelta(hours=1)
    old = later.ts <= cutoff
    later.loc[old, "item_id"] = np.random.default_rng(1).permutation(later.loc[old, "item_id"].to_numpy())
    worse = _refresh(registry, later)
    assert worse.status == refresh.REJECTED and not worse.alias_moved, worse.note
    assert worse.after < worse.before * 0.95
    assert registry.version_for(ALIAS_CHAMPION) == fresh.version
    tags = registry.tags(worse.version)
    assert tags["gate_decision"] == "rejected" and tags[refresh.TAG_REFRESH_OF] == fresh.version
    assert tags["trained_version"] == champion  # a refresh of a refresh: still the version train_job trained
    # and the same garbage window is not refreshed a second time
    assert "refreshed on this window already" in _refresh(registry, later).note


def test_a_challenger_left_on_the_champions_version_follows_the_refreshed_champion(settings, tmp_path):
    """After a person promoted the challenger (leaving the `challenger` alias on it, as README allows), the hourly
    refresh moves `champion` to a new version: the old champion must not come back into traffic as a challenger,
    and the same version is not refreshed twice in the round."""
    from pipelines import lake

    registry = _registry(settings)
    full = taste_window(12)
    champion = _champion(registry, full[full.ts < pd.Timestamp(T0 + timedelta(hours=8))], settings, model="itemitem")
    registry.set_alias(ALIAS_CHALLENGER, champion)  # promoted by hand: both aliases on one version
    events = full.assign(event_type="view", session_id="s", ts=[int(t.timestamp() * 1000) for t in full.ts])
    lake.write_events(tmp_path / "lake", [{**e, "event_id": uuid.uuid4().hex} for e in events.drop(columns="weight")
                                          .to_dict("records")])
    report = refresh.refresh_served(registry, tmp_path / "lake", tmp_path / "quality", T0, T0 + timedelta(hours=13),
                                    holdout_hours=1, tolerance=0.05)
    assert report.aliases, report.note
    moved = next(a for a in report.aliases if a.alias == ALIAS_CHAMPION)
    assert moved.alias_moved, report.note
    assert registry.version_for(ALIAS_CHAMPION) == registry.version_for(ALIAS_CHALLENGER) == moved.version
    assert "follows it" in registry.tags(moved.version)["gate_reason"]
    challenger = [a for a in report.aliases if a.alias == ALIAS_CHALLENGER]
    assert challenger and all(a.status == refresh.SKIPPED for a in challenger), report.note
    assert len(registry.client.search_model_versions(f"name = '{registry.name}'")) == 2  # no refresh of the refresh


def test_the_champion_stays_with_a_person_when_refreshes_may_not_move_it(settings):
    registry = _registry(settings)
    full = taste_window(10)
    champion = _champion(registry, full[full.ts < pd.Timestamp(T0 + timedelta(hours=7))], settings, model="itemitem")
    result = _refresh(registry, full, move_champion=False)
    assert result.status == refresh.REFRESHED and not result.alias_moved
    assert registry.version_for(ALIAS_CHAMPION) == champion
    assert registry.tags(result.version)["gate_decision"] == "passed"
    assert "SHOPREC_REFRESH_MOVES_CHAMPION" in result.note


def test_models_without_an_incremental_part_and_missing_aliases_are_skipped(settings, tmp_path):
    registry = _registry(settings)
    empty = refresh.refresh_served(registry, tmp_path, tmp_path, T0, T0 + timedelta(hours=1), holdout_hours=1)
    assert not empty.aliases and "nothing to refresh" in empty.note

    full = taste_window(10)
    champion = _champion(registry, full[full.ts < pd.Timestamp(T0 + timedelta(hours=7))], settings,
                         model="popularity")
    skipped = _refresh(registry, full)
    assert skipped.status == refresh.SKIPPED and "no incremental refresh" in skipped.note
    assert "daily full retrain" in skipped.note and registry.version_for(ALIAS_CHAMPION) == champion
    assert _refresh(registry, full, alias=ALIAS_CHALLENGER).note == "no `challenger` yet: nothing to refresh"
