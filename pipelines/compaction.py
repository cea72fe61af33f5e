"""Lake compaction: the stream consumer's many small files of an hour merged into one.

The consumer writes one file per Kafka partition per flush (every ``consumer_lake_flush_s``, 5 s, at a
trickle, or per full poll under load): still ~700 files per partition an hour, and a reader of the hour
(validation, training, refresh, the dashboard) opens each one. (Before the flush interval it was one file
per poll, about one event each at the simulator's 20 events/s, and readers crawled.) :func:`compact_partition` (run by the
``events`` asset before it validates a closed hour) merges them into one ``compacted-<uuid>.parquet``.

Which files may be merged (exactly-once, see :mod:`pipelines.consumer`): on (re)assignment the consumer
deletes the files of the topic's *current* log whose last offset reaches the committed offset it resumes
from (:func:`pipelines.lake.remove_uncommitted`). A file is merged only when that can never happen to it:

* its log (topic id in the name) is named and differs from the topic's current log: committed history; or
* its last offset is below the consumer group's committed offset of its partition (any log).

When the broker names no topic id for the topic (Kafka before 2.8, or a metadata answer without it)
only the second rule applies, to every file: a consumer that once saw a named log keeps it, so an
unknown current log could be any. Files without a log in their name (a broker without topic ids, or
written before logs were named) follow the same rules with "no log" as their log: under a broker that
names its topic's log they are never removed (another log), so they are merged; under one that does not,
only below the committed offset. Without Kafka (unreachable, or an error) nothing is merged. The current
log is read before and after the committed offsets; if it changed meanwhile nothing is merged.
Files younger than ``lake_compact_min_age_s`` are left for later: a member whose commit is refused after
a rebalance deletes its own files of that batch, which by then may lie below the new owner's commit.
Offsets reset backwards by hand (``kafka-consumer-groups --reset-offsets``) while files above the new
offset were compacted would make the replay store those records twice: reset offsets only with the
consumer stopped and the lake files past the new offset removed, as before.

Crash safety: the compacted file is written durably (temp, fsync, rename: :func:`pipelines.lake.write_table`)
and names its sources in its Parquet key-value metadata; only then are the sources deleted. A crash in
between leaves both; the next compaction of the folder deletes the sources first, and
:func:`pipelines.lake.read_files` skips them meanwhile. Readers that list the folder themselves (they
count footers or read files directly) can see a source and the compacted file together for that window,
or, for a read that overlaps a compaction, for the milliseconds between the rename and the deletes.
Late events: a folder can be compacted again; new small files are merged with the compacted file there.
Backfill files (``backfill-*``) and other files not written by the consumer are left as they are, and
files whose columns do not fit :data:`pipelines.lake.LAKE_SCHEMA` (they must reach validation as they
are). Compactions of one folder are serialized by a lock file (``.compact.lock``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import lake
from pipelines.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Positions:
    """What Kafka says about the consumer group: each topic's current log id (None: unnamed or unknown)
    and the committed offset of each ``(topic, partition)`` that has one."""

    logs: dict[str, str | None] = field(default_factory=dict)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass
class CompactionResult:
    folder: Path
    merged: int = 0  # source files merged (a compacted file merged again counts)
    rows: int = 0
    written: Path | None = None
    recovered: int = 0  # sources of an earlier compaction that a crash left, deleted now
    skipped: int = 0  # consumer files left as they are (uncommitted, too young, another schema)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.folder}: merged {self.merged} files ({self.rows} rows) into "
                f"{self.written.name if self.written else 'nothing'}, left {self.skipped}, "
                f"cleaned {self.recovered} left by a crash, {self.seconds:.2f}s")


def kafka_positions(settings: Settings, topics: set[str], partitions: set[tuple[str, int]], *,
                    timeout_ms: int = 10_000) -> Positions | None:
    """Current logs and committed offsets of ``settings.consumer_group``; None when Kafka cannot tell."""
    from kafka import KafkaConsumer, TopicPartition

    try:
        # a group member that never subscribes: it only fetches metadata and committed offsets, joins nothing
        consumer = KafkaConsumer(group_id=settings.consumer_group, enable_auto_commit=False,
                                 client_id="shoprec-compaction", request_timeout_ms=timeout_ms,
                                 bootstrap_timeout_ms=min(timeout_ms, 5000),
                                 **settings.kafka_client_kwargs())
    except Exception as err:  # noqa: BLE001 - any failure means: do not compact
        log.warning("compaction: Kafka unreachable (%s); nothing is compacted", err)
        return None
    try:
        def current_logs() -> dict[str, str | None]:
            consumer._fetch_all_topic_metadata()  # fresh metadata, topic ids included (kafka-python has no public accessor)
            ids = {t: consumer._client.cluster.topic_id(t) for t in topics}
            return {t: (i.hex if i is not None and i.int else None) for t, i in ids.items()}

        before = current_logs()
        parts = set(partitions)
        for t in topics:
            parts |= {(t, p) for p in consumer.partitions_for_topic(t)}
        committed = {}
        for t, p in sorted(parts):
            offset = consumer.committed(TopicPartition(t, p), timeout_ms=timeout_ms)
            if offset is not None and offset >= 0:
                committed[(t, p)] = int(offset)
        after = current_logs()
        if before != after:
            log.warning("compaction: a topic's log changed while reading offsets (%s -> %s); nothing is compacted",
                        before, after)
            return None
        return Positions(after, committed)
    except Exception as err:  # noqa: BLE001
        log.warning("compaction: could not read the consumer group's offsets (%s); nothing is compacted", err)
        return None
    finally:
        consumer.close(autocommit=False)


def mergeable(match, positions: Positions) -> bool:
    """Whether a consumer file (a :data:`pipelines.lake._BATCH_FILE` match) can never be removed as uncommitted."""
    topic, partition, last, file_log = match["topic"], int(match["partition"]), int(match["last"]), match["log"]
    if topic not in positions.logs:
        return False
    current = positions.logs[topic]
    if current is not None and file_log != current:
        return True  # another log than the one being consumed: committed history
    committed = positions.committed.get((topic, partition))
    return committed is not None and last < committed


def _fits(schema: pa.Schema) -> bool:
    """Every column is a lake column of the lake's type (older files may lack newer columns)."""
    return all(name in lake.LAKE_SCHEMA.names and schema.field(name).type == lake.LAKE_SCHEMA.field(name).type
               for name in schema.names)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_sources(names: list[str]) -> bytes:
    return base64.b64encode(zlib.compress(json.dumps(names).encode(), 9))


def compact_folder(folder: Path, positions: Positions, *, min_age_s: float = 0.0, threads: int = 8,
                   now: float | None = None) -> CompactionResult:
    """Merge one hourly folder's mergeable consumer files (and its compacted files) into one compacted file."""
    t0 = time.perf_counter()
    folder = Path(folder)
    result = CompactionResult(folder)
    if not folder.is_dir():
        return result
    with open(folder / ".compact.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _compact_locked(folder, positions, min_age_s, threads, time.time() if now is None else now, result)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    result.seconds = time.perf_counter() - t0
    return result


def _compact_locked(folder: Path, positions: Positions, min_age_s: float, threads: int, now: float,
                    result: CompactionResult) -> None:
    # 1. finish an earlier compaction that crashed before deleting its sources
    for f in sorted(folder.glob(f"{lake.COMPACTED_PREFIX}-*.parquet")):
        if not f.exists():  # a source of a later compacted file, deleted just now
            continue
        for name in lake.compacted_sources(f):
            src = folder / name
            if src.exists() and src != f:
                src.unlink()
                result.recovered += 1
    if result.recovered:
        _fsync_dir(folder)
        log.warning("compaction: %s: removed %d files that a compacted file already holds (a crash mid-compaction)",
                    folder, result.recovered)
    # 2. choose the files
    compacted = sorted(folder.glob(f"{lake.COMPACTED_PREFIX}-*.parquet"))
    small = []
    for f in sorted(folder.glob("*.parquet")):
        m = lake._BATCH_FILE.match(f.name)
        if not m:
            continue  # backfill, compacted and other files
        if mergeable(m, positions) and now - f.stat().st_mtime >= min_age_s:
            small.append(f)
        else:
            result.skipped += 1
    if not small or len(small) + len(compacted) < 2:
        return
    # 3. read them (Parquet decoding releases the GIL), keep only files of the lake's columns and types
    def read(f: Path) -> pa.Table | None:
        pf = pq.ParquetFile(f)
        if not _fits(pf.schema_arrow):
            return None
        return lake.read_lake_table(f, pf)

    sources = compacted + small
    with ThreadPoolExecutor(max(1, min(threads, len(sources))), thread_name_prefix="shoprec-compact") as pool:
        tables = list(pool.map(read, sources))
    unfit = [f for f, t in zip(sources, tables) if t is None]
    if unfit:
        log.warning("compaction: %s: %d files do not fit the lake schema and are left as they are (e.g. %s)",
                    folder, len(unfit), unfit[0].name)
        result.skipped += len(unfit)
    kept = [(f, t) for f, t in zip(sources, tables) if t is not None]
    if not any(lake._BATCH_FILE.match(f.name) for f, _ in kept) or len(kept) < 2:
        return
    table = pa.concat_tables([t for _, t in kept]).combine_chunks()
    names = [f.name for f, _ in kept]
    meta = {**(table.schema.metadata or {}), lake.COMPACTED_SOURCES_KEY: _encode_sources(names)}
    table = table.replace_schema_metadata(meta)
    # 4. the compacted file, durable under its final name; only then the sources go
    result.written = lake.write_table(folder, f"{lake.COMPACTED_PREFIX}-{uuid.uuid4().hex}.parquet", table)
    for f, _ in kept:
        f.unlink(missing_ok=True)
    _fsync_dir(folder)
    result.merged, result.rows = len(kept), table.num_rows


def compact_partition(lake_dir: Path, key: str, settings: Settings, *,
                      positions: Positions | None = None) -> CompactionResult:
    """Compact one hourly partition (``YYYY-MM-DD-HH:00``) of the lake, asking Kafka what may be merged.

    Without Kafka nothing is merged (a warning), but what a crashed compaction left is cleaned up.
    """
    folder = lake.partition_dir(lake_dir, key)
    if positions is None:
        found = [m for f in folder.glob("*.parquet") if (m := lake._BATCH_FILE.match(f.name))]
        if found:
            positions = kafka_positions(settings, {m["topic"] for m in found},
                                        {(m["topic"], int(m["partition"])) for m in found})
    result = compact_folder(folder, positions or Positions(), min_age_s=settings.lake_compact_min_age_s,
                            threads=settings.lake_compact_threads)
    if result.merged or result.recovered:
        log.info("compaction: %s", result.summary())
    return result
