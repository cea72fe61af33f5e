"""Dagster resources: one small ConfigurableResource per external system.

Defaults come from the shoprec settings, so the local stack needs no config.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from pipelines.registry import ModelRegistry
from pipelines.settings import Settings, get_settings
from pipelines.state import OnlineState, connect


def _s() -> Settings:
    return get_settings()


class LakeResource(dg.ConfigurableResource):
    """The Parquet event lake."""

    lake_dir: str = Field(default_factory=lambda: str(_s().lake_dir))

    @property
    def path(self) -> Path:
        return Path(self.lake_dir)


class RedisResource(dg.ConfigurableResource):
    """Online state in Redis (fallback list, cache warm-up)."""

    url: str = Field(default_factory=lambda: _s().redis_url)

    def state(self) -> OnlineState:
        s = _s()
        return OnlineState(connect(self.url), recent_cap=s.recent_items_cap, cache_ttl_s=s.cache_ttl_s,
                           experiment=s.ab_experiment)


class MLflowResource(dg.ConfigurableResource):
    """The MLflow tracking server and model registry."""

    tracking_uri: str = Field(default_factory=lambda: _s().mlflow_tracking_uri)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri)


class KafkaResource(dg.ConfigurableResource):
    """The Kafka cluster (bootstrap servers; security settings come from SHOPREC_KAFKA_*)."""

    bootstrap: str = Field(default_factory=lambda: _s().kafka_bootstrap)

    def settings(self) -> Settings:
        return _s().model_copy(update={"kafka_bootstrap": self.bootstrap})
