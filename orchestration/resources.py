"""Dagster resources: one small ConfigurableResource per external system.

Defaults come from the shoprec settings, so the local stack needs no config.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from pipelines import lake
from pipelines.experiment import counter_name
from pipelines.registry import ModelRegistry
from pipelines.settings import Settings, get_settings
from pipelines.state import OnlineState, connect


def _s() -> Settings:
    return get_settings()


class LakeResource(dg.ConfigurableResource):
    """The Parquet event lake, the catalog next to it and the quality reports of its partitions."""

    lake_dir: str = Field(default_factory=lambda: str(_s().lake_dir))
    catalog_file: str = Field(default_factory=lambda: str(_s().catalog_path))
    quality_dir: str = Field(default_factory=lambda: str(_s().quality_dir))

    @property
    def path(self) -> Path:
        return Path(self.lake_dir)

    @property
    def quality_path(self) -> Path:
        return Path(self.quality_dir)

    def catalog(self) -> pd.DataFrame | None:
        """The catalog, or None when there is no catalog file yet."""
        path = Path(self.catalog_file)
        return lake.read_parquet(path) if path.exists() else None


class RedisResource(dg.ConfigurableResource):
    """Online state in Redis (fallback list, cache warm-up)."""

    url: str = Field(default_factory=lambda: _s().redis_url)

    def state(self) -> OnlineState:
        s = _s()
        return OnlineState(connect(self.url), recent_cap=s.recent_items_cap, cache_ttl_s=s.cache_ttl_s,
                           experiment=counter_name(s))


class MLflowResource(dg.ConfigurableResource):
    """The MLflow tracking server and model registry."""

    tracking_uri: str = Field(default_factory=lambda: _s().mlflow_tracking_uri)
    model_name: str = Field(default_factory=lambda: _s().mlflow_model_name,
                            description="registered model (SHOPREC_MLFLOW_MODEL_NAME: the one serving follows)")

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri, name=self.model_name)

    def version_url(self, version: str) -> str | None:
        """Link to a model version in the MLflow UI (None for a file/SQLite store without a UI)."""
        if not self.tracking_uri.startswith("http"):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/models/{self.model_name}/versions/{version}"


class KafkaResource(dg.ConfigurableResource):
    """The Kafka cluster (bootstrap servers; security settings come from SHOPREC_KAFKA_*)."""

    bootstrap: str = Field(default_factory=lambda: _s().kafka_bootstrap)

    def settings(self) -> Settings:
        return _s().model_copy(update={"kafka_bootstrap": self.bootstrap})
