"""Dagster definitions load, and the training assets register a champion in MLflow."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import dagster as dg
import pandas as pd

from orchestration import assets
from orchestration.definitions import defs
from orchestration.resources import LakeResource, MLflowResource, RedisResource
from pipelines import lake
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION, new_event
from tests.conftest import synthetic_interactions


def test_definitions_load_and_every_job_resolves():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert {"train_job", "validate_events_job"} <= jobs
    assert {s.name for s in repo.schedule_defs} >= {"validate_events_job_schedule", "train_job_schedule"}


def _events_from(interactions: pd.DataFrame, hour_ms: int) -> list[dict]:
    return [new_event("view", r.user_id, r.item_id, f"s-{r.user_id}", ts=hour_ms + i)
            for i, r in enumerate(interactions.itertuples())]


def test_materializing_training_assets_registers_a_champion(settings, redis_client, tmp_path, monkeypatch):
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    hour_ms = int(hour.timestamp() * 1000)
    lake.write_events(settings.lake_dir, _events_from(synthetic_interactions(), hour_ms))
    name = f"shoprec-dagster-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(MLflowResource, "registry", lambda self: ModelRegistry(self.tracking_uri, name=name))
    resources = {"lake_store": LakeResource(lake_dir=str(settings.lake_dir)),
                 "mlflow_registry": MLflowResource(tracking_uri=settings.mlflow_tracking_uri),
                 "redis_state": RedisResource(url=settings.redis_url)}

    checked = dg.materialize([assets.events], partition_key=hour.strftime("%Y-%m-%d-%H:00"), resources=resources)
    assert checked.success
    [check] = checked.get_asset_check_evaluations()
    assert check.passed

    run = dg.materialize([assets.training_interactions, assets.trained_model, assets.popular_fallback],
                         resources=resources,
                         run_config={"ops": {"trained_model": {"config": {"epochs": 20, "dim": 16}}}})
    assert run.success
    meta = run.asset_materializations_for_node("trained_model")[0].metadata
    version = meta["model_version"].value
    registry = ModelRegistry(settings.mlflow_tracking_uri, name=name)
    assert registry.version_for(ALIAS_CHAMPION) == version
    assert meta["promoted_to_champion"].value is True
    assert meta["ndcg@10"].value > 0
    # the fallback list is in Redis for serving
    from pipelines.state import OnlineState

    assert len(OnlineState(redis_client).popular_fallback(10)) == 10
