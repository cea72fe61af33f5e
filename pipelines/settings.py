"""Typed settings for every shoprec process.

One object, environment prefix ``SHOPREC_`` (``MLFLOW_TRACKING_URI`` keeps its
standard name). Every default works on the local stack started by ``make up``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainConfig(BaseModel):
    """Hyperparameters of a training run; logged to MLflow with every run."""

    model: str = "bpr"
    dim: int = Field(64, ge=4, le=1024, description="embedding size")
    epochs: int = Field(15, ge=1, le=500)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    batch_size: int = Field(4096, ge=16)
    seed: int = 2020
    holdout_per_user: int = Field(1, ge=1, description="last N interactions of each user kept for evaluation")
    k: int = Field(10, ge=1, description="cut-off of the offline metrics")
    min_improvement: float = Field(0.0, description="champion is replaced only when NDCG@k improves by more than this")


class Settings(BaseSettings):
    """All configuration of shoprec; read from ``SHOPREC_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SHOPREC_", env_nested_delimiter="__", extra="ignore")

    # where local state lives (lake, logs, pid files, MLflow store, Dagster home)
    var_dir: Path = Path("var")

    # Kafka (the local default is the tansu broker started by `make up`)
    kafka_bootstrap: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_events_partitions: int = 6
    consumer_group: str = "shoprec-consumer"
    consumer_max_records: int = Field(5000, ge=1)
    consumer_poll_ms: int = Field(100, ge=1)

    # Redis
    redis_url: str = "redis://localhost:6379/0"
    recent_items_cap: int = Field(50, ge=1)
    cache_ttl_s: int = Field(300, ge=1)

    # MLflow
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5000",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "SHOPREC_MLFLOW_TRACKING_URI"),
    )

    # serving
    api_keys: list[SecretStr] = Field(default_factory=lambda: [SecretStr("shoprec-dev-key")])
    max_events_per_request: int = Field(1000, ge=1)
    max_event_bytes: int = Field(16_384, ge=256)
    model_poll_s: float = Field(10.0, gt=0)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    bento_url: str = "http://127.0.0.1:3001"
    ab_experiment: str = "default"
    ab_challenger_share: float = Field(0.5, ge=0, le=1, description="traffic share of the challenger when one exists")
    ab_salt: str = "shoprec-ab-1"
    fallback_k: int = 200
    explore_share: float = Field(0.1, ge=0, le=1,
                                 description="share of recommendation slots given to new products (cold-start exploration)")
    new_item_age_h: float = Field(24.0, gt=0, description="a product is 'new' for this many hours after created_at")

    # events older/newer than this are rejected
    max_event_age_days: int = Field(30, ge=1)
    max_event_future_s: int = Field(300, ge=0)

    train: TrainConfig = TrainConfig()

    @property
    def lake_dir(self) -> Path:
        return self.var_dir / "lake" / "events"

    @property
    def quality_dir(self) -> Path:
        """Great Expectations reports, one JSON file per validated partition (written by Dagster, read by the dashboard)."""
        return self.var_dir / "quality"

    @property
    def catalog_path(self) -> Path:
        return self.var_dir / "lake" / "catalog.parquet"

    def kafka_client_kwargs(self) -> dict:
        """Connection settings shared by every Kafka client (producer, consumer, admin)."""
        kw: dict = {"bootstrap_servers": self.kafka_bootstrap.split(","), "security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        if self.kafka_ssl_cafile:
            kw["ssl_cafile"] = self.kafka_ssl_cafile
        return kw


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
