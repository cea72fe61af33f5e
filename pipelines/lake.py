"""The event lake: Parquet files in hourly partitions.

Layout: ``<lake_dir>/date=YYYY-MM-DD/hour=HH/<name>.parquet``. Every file is
written under a temporary name, fsynced, renamed and its folder fsynced, so a
reader never sees a half-written file and a crash leaves at most an ignored
``.tmp`` behind.

Files written by the stream consumer carry the Kafka position they hold in
their name: ``<topic>-<partition>-<first offset>-<last offset>-<log>-<writer>.parquet``
(see :func:`batch_file_name`). That is what makes the lake exactly-once after a
crash: offsets are committed only after a batch's files are durable, so any file
whose offset range reaches the committed offset or beyond is a batch whose commit
never happened; :func:`remove_uncommitted` deletes those before the batch is
consumed again (see :mod:`pipelines.consumer`).

Offsets mean something only within one log: ``<log>`` is the broker's id of the topic
(its topic id), which a new log gets, whether the topic was deleted and created again or
the broker kept it in memory and restarted (tansu under ``make up``). Files of another log
are never removed: nothing can replay their records, they are committed history.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import zlib
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schemas import CATALOG_COLUMNS, LAKE_COLUMNS

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
    ("experiment", pa.string()),
    ("items", pa.list_(pa.string())),
    ("schema_version", pa.int16()),
])
assert tuple(LAKE_SCHEMA.names) == LAKE_COLUMNS

T = TypeVar("T")


def partition_key(ts_ms: int) -> str:
    """The hourly partition key (``YYYY-MM-DD-HH:00``, Dagster's hourly format) of a timestamp."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d-%H:00")


def partition_dir(lake_dir: Path, key: str) -> Path:
    """Folder of one hourly partition; ``key`` is ``YYYY-MM-DD-HH:00``."""
    dt = datetime.strptime(key, "%Y-%m-%d-%H:%M")
    return Path(lake_dir) / f"date={dt:%Y-%m-%d}" / f"hour={dt:%H}"


#: file name prefix of history imported in bulk (the simulator's backfill), not written by the stream consumer
BACKFILL_PREFIX = "backfill"


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
        written.append(write_table(folder, f"{prefix}-{uuid.uuid4().hex}.parquet", table))
    return written


def write_table(folder: Path, name: str, table: pa.Table) -> Path:
    """Write one Parquet file durably: temp name, fsync, rename, fsync of the folder.

    A file of the same name is replaced atomically.
    """
    return write_tables([(folder, name, table)])[0]


def write_tables(files: list[tuple[Path, str, pa.Table]], *, threads: int = 1) -> list[Path]:
    """Write several Parquet files durably; each is complete and durable under its final name on return.

    Every file is written under a temporary name and fsynced (in ``threads`` threads: Parquet
    encoding and fsync release the GIL, and the file system can group concurrent fsyncs), then
    renamed; each folder is fsynced once at the end so that the renames survive a power cut.
    Files of the same name are replaced atomically.
    """
    def to_tmp(f: tuple[Path, str, pa.Table]) -> Path:
        folder, name, table = f
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    folders = {folder for folder, _, _ in files}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    if threads > 1 and len(files) > 1:
        with ThreadPoolExecutor(min(threads, len(files)), thread_name_prefix="shoprec-lake") as pool:
            tmps = list(pool.map(to_tmp, files))
    else:
        tmps = [to_tmp(f) for f in files]
    finals = []
    for tmp, (folder, name, _) in zip(tmps, files):
        os.replace(tmp, folder / name)
        finals.append(folder / name)
    for folder in folders:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames themselves must survive a power cut, not just the bytes
        finally:
            os.close(dir_fd)
    return finals


@contextmanager
def catalog_lock(path: Path):
    """Hold the catalog file's writer lock (``.<name>.lock`` beside it) for a read-merge-write.

    Every writer of the file (the catalog feed, a backfill, ``load_or_make_catalog``) takes it, so
    none overwrites another's change; the kernel drops it if the holder dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def epoch_ms(values: pd.Series) -> pd.Series:
    """``created_at`` as UTC epoch ms, from epoch ms or timestamps (either may hold nulls)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        ts = pd.to_datetime(values, utc=True)
        return (ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return pd.to_numeric(values)


def read_parquet(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pd.DataFrame:
    """One Parquet file as a frame, opened once: a file replaced meanwhile (the catalog, rewritten by the catalog
    feed under a rename) is read whole, old or new. ``pd.read_parquet(path)`` opens the path more than once, and
    a reader racing the feed read the footer of one file and pages of the next ("Page was smaller than expected":
    73 of 2,994 reads beside a writer replacing it in a loop; 0 of 3,311 opened once)."""
    with open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns, filters=filters).to_pandas()


def read_catalog(path: Path) -> pd.DataFrame | None:
    """The catalog file (every column kept, ``created_at`` as UTC epoch ms); None when there is none."""
    if not Path(path).exists():
        return None
    df = read_parquet(path)
    if "created_at" in df:
        df["created_at"] = epoch_ms(df["created_at"])
    return df


def write_catalog(catalog: pd.DataFrame, path: Path) -> Path:
    """Write the product catalog durably, replacing the file atomically (take :func:`catalog_lock` around a
    read-merge-write).

    ``schemas.CATALOG_COLUMNS`` come first, typed (``created_at`` as UTC epoch ms; nullable types
    where a value is missing), then any other column as it is (content features read them).

    Raises:
        ValueError: when a catalog column is missing.
    """
    missing = [c for c in CATALOG_COLUMNS if c not in catalog]
    if missing:
        raise ValueError(f"the catalog lacks columns {missing}")
    path = Path(path)
    df = catalog[[*CATALOG_COLUMNS, *(c for c in catalog if c not in CATALOG_COLUMNS)]].copy()
    df["price"] = pd.to_numeric(df["price"]).astype("float64")
    created = epoch_ms(df["created_at"])
    df["created_at"] = created.astype("int64" if created.notna().all() else "Int64")
    stock = df["in_stock"]
    df["in_stock"] = stock.astype(bool) if stock.notna().all() else stock.astype("boolean")
    return write_table(path.parent, path.name, pa.Table.from_pandas(df, preserve_index=False))


# --- files of the stream consumer, named by their Kafka position ---------------------------------
# ``log`` is absent from the files of a broker that names no topic ids, and from those written before logs
# were named (both read as "log None"); the writer is always last
_BATCH_FILE = re.compile(r"^(?P<topic>.+)-(?P<partition>\d+)-(?P<first>\d{12})-(?P<last>\d{12})"
                         r"(?:-(?P<log>[0-9a-f]{32}))?-(?P<writer>\w+)\.parquet$")


def batch_file_name(topic: str, partition: int, first_offset: int, last_offset: int, writer: str, *,
                    log: str | None = None) -> str:
    """Name of a consumer batch file holding the valid records of ``[first_offset, last_offset]``.

    ``log`` (32 hex digits) names the incarnation of the topic's log the offsets belong to: the
    broker's topic id; None where the broker names none (Kafka before 2.8). ``writer`` (the
    consumer instance) keeps two members of a group that briefly both think they own a partition
    (a rebalance) from replacing each other's files.
    """
    if log is not None and not re.fullmatch(r"[0-9a-f]{32}", log):
        raise ValueError(f"a log id is 32 lowercase hex digits, not {log!r}")
    named = "" if log is None else f"-{log}"
    return f"{topic}-{partition}-{first_offset:012d}-{last_offset:012d}{named}-{writer}.parquet"


_LAKE_STRUCT = pa.struct(list(LAKE_SCHEMA))
_HOUR_MS = 3_600_000


def rows_table(rows: list[dict]) -> pa.Table:
    """Validated events (dicts; optional fields may be absent) as a lake table, converted column-wise in Arrow."""
    table = pa.Table.from_struct_array(pa.array(rows, type=_LAKE_STRUCT))
    version = table.column("schema_version")
    if version.null_count:  # absent means the default, schema_version 1
        table = table.set_column(len(LAKE_COLUMNS) - 1, "schema_version", pc.fill_null(version, 1))
    return table


def write_batches(lake_dir: Path, batches: list[tuple[str, pa.Table | list[dict]]], *, threads: int = 4) -> list[Path]:
    """Write validated events durably, each batch as one file named ``name`` per hourly partition it touches.

    Args:
        lake_dir: root of the lake.
        batches: ``(file name, events)``; events are a table in :data:`LAKE_SCHEMA` or dicts (optional
            fields may be absent).
        threads: files encoded and fsynced at once.

    Returns:
        The paths written (fsynced, renamed, folders fsynced when this returns).
    """
    files = []
    for name, rows in batches:
        table = rows if isinstance(rows, pa.Table) else rows_table(rows)
        hours = pc.divide(table.column("ts").cast(pa.int64()), _HOUR_MS)  # ts >= 0: integer division floors
        lo, hi = pc.min_max(hours).values()
        if lo == hi:  # the usual case: the whole batch lies in one hour
            files.append((_hour_dir(lake_dir, lo.as_py()), name, table))
        else:
            files += [(_hour_dir(lake_dir, hour), name, table.filter(pc.equal(hours, hour)))
                      for hour in pc.unique(hours).to_pylist()]
    return write_tables(files, threads=threads)


def _hour_dir(lake_dir: Path, hour: int) -> Path:
    dt = datetime.fromtimestamp(hour * 3600, tz=timezone.utc)
    return Path(lake_dir) / f"date={dt:%Y-%m-%d}" / f"hour={dt:%H}"


def remove_uncommitted(lake_dir: Path, topic: str, partition: int, from_offset: int, *, log: str | None,
                       since_ms: int, until_ms: int) -> list[Path]:
    """Delete the consumer batch files of one Kafka partition of log ``log`` that reach ``from_offset`` or later.

    Called with the committed offset a consumer resumes from: such files were written but their
    offsets never committed, so the records are about to be consumed (and written) again.
    Files of another log (another topic id; for ``log`` None, any named log; for a named ``log``,
    files without one) are kept: their offsets are not this log's, nothing replays them.
    Only hourly folders whose hour lies in ``[since_ms, until_ms]`` are searched (events outside
    the accepted ts window never reach the lake).

    Returns:
        The files deleted.
    """
    removed = []
    first = str(_hour_dir(lake_dir, since_ms // 3_600_000).relative_to(lake_dir))
    last = str(_hour_dir(lake_dir, until_ms // 3_600_000).relative_to(lake_dir))
    for folder in Path(lake_dir).glob("date=*/hour=*"):
        if not first <= str(folder.relative_to(lake_dir)) <= last:
            continue
        for f in folder.iterdir():
            name = f.name[1:-4] if f.name.endswith(".tmp") else f.name
            m = _BATCH_FILE.match(name)
            if (m and m["topic"] == topic and int(m["partition"]) == partition and m["log"] == log
                    and int(m["last"]) >= from_offset):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def read_partition(lake_dir: Path, key: str) -> pd.DataFrame:
    """All events of one hourly partition (empty frame with the lake columns when none)."""
    return read_files(partition_files(lake_dir, key))


def read_window(lake_dir: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """Events of every hourly partition in ``[start, end)`` (UTC)."""
    files: list[Path] = []
    t = start.replace(minute=0, second=0, microsecond=0)
    while t < end:
        files += partition_files(lake_dir, t.strftime("%Y-%m-%d-%H:00"))
        t += timedelta(hours=1)
    return read_files(files)


def read_all(lake_dir: Path) -> pd.DataFrame:
    """Every event in the lake."""
    return read_files(sorted(Path(lake_dir).glob("date=*/hour=*/*.parquet")))


def read_files(files: list[Path]) -> pd.DataFrame:
    """The events of ``files`` (whole hourly folders, as listed), as the lake schema.

    Compaction-aware (:mod:`pipelines.compaction`): a consumer file that a listed compacted file
    already holds is skipped (a crash between writing the compacted file and deleting its sources
    leaves both), and a file deleted by a compaction after it was listed is replaced by the
    compacted file that holds it.
    """
    return read_relisting(files, lambda fs: pa.concat_tables([read_lake_table(f) for f in fs]).to_pandas()
                          if fs else LAKE_SCHEMA.empty_table().to_pandas())


def read_relisting(files: list[Path], read: Callable[[list[Path]], T]) -> T:
    """``read(files)`` with :func:`live_files` applied, and again on the folders listed anew when a
    compaction removed a listed file in the meantime (a compacted file then holds its rows)."""
    files = live_files(files)
    for _ in range(3):
        try:
            return read(files)
        except FileNotFoundError:  # compacted under us: list the affected folders again
            files = _relist(files)
    return read(files)


def partition_files(lake_dir: Path, key: str) -> list[Path]:
    """The Parquet files of one hourly partition, sorted, less consumer files a compacted file replaces."""
    return live_files(sorted(partition_dir(lake_dir, key).glob("*.parquet")))


def read_lake_table(path: Path, pf: pq.ParquetFile | None = None) -> pa.Table:
    """One lake file (``pf``: the file already open) as the lake schema (columns an older file lacks are null)."""
    pf = pf or pq.ParquetFile(path)
    if pf.schema_arrow.equals(LAKE_SCHEMA, check_metadata=False):
        return pf.read()  # the usual case, one open: read_table(schema=) goes through the slower dataset path
    return pq.read_table(path, schema=LAKE_SCHEMA)


# --- compaction (pipelines.compaction): many small consumer files of an hour merged into one ------
#: file name prefix of a compacted file: never a :data:`_BATCH_FILE`, so :func:`remove_uncommitted` keeps it,
#: and never :data:`BACKFILL_PREFIX`, so its rows count as stream rows
COMPACTED_PREFIX = "compacted"
#: Parquet key-value metadata of a compacted file: the names of the files it replaces (zlib-compressed JSON)
COMPACTED_SOURCES_KEY = b"shoprec.compacted_from"


def is_compacted(path: Path) -> bool:
    return Path(path).name.startswith(COMPACTED_PREFIX + "-") and Path(path).name.endswith(".parquet")


def compacted_sources(path: Path) -> list[str]:
    """Names (in the same folder) of the files a compacted file replaces, from its footer; [] when unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return []
    raw = meta.get(COMPACTED_SOURCES_KEY)
    return json.loads(zlib.decompress(base64.b64decode(raw))) if raw else []


def live_files(files: list[Path]) -> list[Path]:
    """``files`` less the ones a compacted file among them replaces (left by a crash mid-compaction)."""
    files = [Path(f) for f in files]
    superseded = {f.parent / n for f in files if is_compacted(f) for n in compacted_sources(f)}
    return [f for f in files if f not in superseded] if superseded else files


def _relist(files: list[Path]) -> list[Path]:
    """``files`` with the folders where one has vanished listed again (a compaction replaced it)."""
    gone = {f.parent for f in files if not f.exists()}
    kept = [f for f in files if f.parent not in gone]
    return live_files(kept + [f for d in sorted(gone) for f in sorted(d.glob("*.parquet"))])


def partitions(lake_dir: Path) -> list[str]:
    """Keys of the hourly partitions that hold at least one file, oldest first."""
    keys = []
    for d in sorted(Path(lake_dir).glob("date=*/hour=*")):
        if any(d.glob("*.parquet")):
            keys.append(f"{d.parent.name[5:]}-{d.name[5:]}:00")
    return keys
