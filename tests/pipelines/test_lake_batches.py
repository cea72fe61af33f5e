"""The consumer's lake writes: validated dict events, one durable file per batch and hour."""

from __future__ import annotations

import time

from pipelines import lake
from pipelines.schemas import LAKE_COLUMNS, new_event

HOUR_MS = 3_600_000


def test_batches_are_split_by_hour_and_read_back_unchanged(tmp_path):
    hour = int(time.time() * 1000) // HOUR_MS * HOUR_MS
    a = [new_event("view", "u1", f"i{i}", "s1", ts=hour - 1 + i) for i in range(2)]  # straddles the hour
    b = [new_event("purchase", "u2", "i9", "s2", ts=hour + 5, price=2.5, quantity=3)]
    b[0].pop("schema_version")  # absent means version 1
    imp = new_event("impression", "u3", None, "s3", ts=hour + 6, items=["x", "y"], request_id="r", variant="v")
    written = lake.write_batches(tmp_path, [("p0.parquet", a), ("p1.parquet", b + [imp])], threads=2)
    assert sorted(p.parent.name for p in written) == sorted([
        lake._hour_dir(tmp_path, hour // HOUR_MS - 1).name, lake._hour_dir(tmp_path, hour // HOUR_MS).name,
        lake._hour_dir(tmp_path, hour // HOUR_MS).name])
    assert not list(tmp_path.rglob("*.tmp"))
    df = lake.read_all(tmp_path).sort_values("ts")
    assert list(df.columns) == list(LAKE_COLUMNS)
    assert df.event_id.tolist() == [e["event_id"] for e in a + b + [imp]]
    assert df.schema_version.tolist() == [1, 1, 1, 1]
    bought = df[df.event_type == "purchase"].iloc[0]
    assert (bought.price, bought.quantity) == (2.5, 3)
    assert list(df[df.event_type == "impression"].iloc[0]["items"]) == ["x", "y"]
    assert lake.partitions(tmp_path) == [lake.partition_key(hour - 1), lake.partition_key(hour)]
