"""A synthetic shop in the lake for the orchestration tests: two taste groups over a few hours."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from orchestration.resources import LakeResource, MLflowResource, RedisResource
from pipelines import lake
from pipelines.schemas import new_event
from pipelines.settings import get_settings

N_ITEMS = 60


def hours_ago(n: int) -> datetime:
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=n)


def key_of(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:00")


def taste_events(hours: list[datetime], n_users: int = 80, per_user: int = 12, seed: int = 0) -> list[dict]:
    """Views, carts and purchases of users who stick to their group's half of the items."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n_users):
        pool = [i for i in range(N_ITEMS) if i % 2 == u % 2]
        for i in rng.choice(pool, size=per_user, replace=False):
            hour = hours[int(rng.integers(len(hours)))]
            ts = int(hour.timestamp() * 1000) + int(rng.integers(0, 3_600_000))
            etype = str(rng.choice(["view", "view", "view", "add_to_cart", "purchase"]))
            out.append(new_event(etype, f"u{u}", f"i{i}", f"s{u}", ts=ts,
                                 price=19.9 if etype == "purchase" else None))
    return out


def catalog_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in range(N_ITEMS)], "title": [f"item {i}" for i in range(N_ITEMS)],
        "category": [("even", "odd")[i % 2] for i in range(N_ITEMS)], "brand": ["b"] * N_ITEMS,
        "price": [19.9] * N_ITEMS, "created_at": [1_700_000_000_000] * N_ITEMS, "in_stock": [True] * N_ITEMS,
    })


@pytest.fixture()
def shop(settings, monkeypatch):
    """Settings with a one-hour holdout and a lake of 5 closed hours plus a catalog."""
    monkeypatch.setenv("SHOPREC_HOLDOUT_HOURS", "1")
    get_settings.cache_clear()
    s = get_settings()
    hours = [hours_ago(n) for n in range(5, 0, -1)]
    lake.write_events(s.lake_dir, taste_events(hours))
    s.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    catalog_frame().to_parquet(s.catalog_path, index=False)
    return s, hours


@pytest.fixture()
def resources(settings):
    name = f"shoprec-dagster-{uuid.uuid4().hex[:6]}"
    s = get_settings()
    return {"lake_store": LakeResource(lake_dir=str(s.lake_dir), catalog_file=str(s.catalog_path),
                                       quality_dir=str(s.quality_dir)),
            "mlflow_registry": MLflowResource(tracking_uri=s.mlflow_tracking_uri, model_name=name),
            "redis_state": RedisResource(url=s.redis_url)}
