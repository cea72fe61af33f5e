"""The event lake: Parquet files in hourly partitions.

Layout: ``<lake_dir>/date=YYYY-MM-DD/hour=HH/<name>.parquet``. Every file is
written under a temporary name, flushed and renamed, so a reader never sees a
half-written file and a crash leaves at most an ignored ``.tmp`` behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schemas import LAKE_COLUMNS

LAKE_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("event_type", pa.string()),
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("session_id", pa.string()),
    ("ts", pa.timestamp("ms", tz="UTC")),
    ("price", pa.float64()),
    ("quantity", pa.int32()),
    ("request_id", pa.string()),
    ("variant", pa.string()),
    ("model_version", pa.string()),
    ("items", pa.list_(pa.string())),
    ("schema_version", pa.int16()),
])
assert tuple(LAKE_SCHEMA.names) == LAKE_COLUMNS


def partition_key(ts_ms: int) -> str:
    """The hourly partition key (``YYYY-MM-DD-HH:00``, Dagster's hourly format) of a timestamp."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d-%H:00")


def partition_dir(lake_dir: Path, key: str) -> Path:
    """Folder of one hourly partition; ``key`` is ``YYYY-MM-DD-HH:00``."""
    dt = datetime.strptime(key, "%Y-%m-%d-%H:%M")
    return Path(lake_dir) / f"date={dt:%Y-%m-%d}" / f"hour={dt:%H}"


def write_events(lake_dir: Path, events: Iterable[dict], *, prefix: str = "batch") -> list[Path]:
    """Append events (dicts in the Event schema) to the lake, one file per touched hour.

    Returns:
        The paths written. Files are durable (fsynced and renamed) when this returns.
    """
    by_hour: dict[str, list[dict]] = {}
    for ev in events:
        by_hour.setdefault(partition_key(ev["ts"]), []).append(ev)
    written = []
    for key, rows in sorted(by_hour.items()):
        cols = {name: [r.get(name) for r in rows] for name in LAKE_COLUMNS}
        cols["schema_version"] = [r.get("schema_version", 1) for r in rows]
        table = pa.Table.from_pydict(cols, schema=LAKE_SCHEMA)
        folder = partition_dir(lake_dir, key)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{prefix}-{uuid.uuid4().hex}.parquet"
        tmp = folder / f".{final.name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        written.append(final)
    return written


def read_partition(lake_dir: Path, key: str) -> pd.DataFrame:
    """All events of one hourly partition (empty frame with the lake columns when none)."""
    return read_files(sorted(partition_dir(lake_dir, key).glob("*.parquet")))


def read_window(lake_dir: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """Events of every hourly partition in ``[start, end)`` (UTC)."""
    files: list[Path] = []
    t = start.replace(minute=0, second=0, microsecond=0)
    while t < end:
        files += sorted(partition_dir(lake_dir, t.strftime("%Y-%m-%d-%H:00")).glob("*.parquet"))
        t += timedelta(hours=1)
    return read_files(files)


def read_all(lake_dir: Path) -> pd.DataFrame:
    """Every event in the lake."""
    return read_files(sorted(Path(lake_dir).glob("date=*/hour=*/*.parquet")))


def read_files(files: list[Path]) -> pd.DataFrame:
    if not files:
        return LAKE_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=LAKE_SCHEMA) for f in files]).to_pandas()


def partitions(lake_dir: Path) -> list[str]:
    """Keys of the hourly partitions that hold at least one file, oldest first."""
    keys = []
    for d in sorted(Path(lake_dir).glob("date=*/hour=*")):
        if any(d.glob("*.parquet")):
            keys.append(f"{d.parent.name[5:]}-{d.name[5:]}:00")
    return keys
