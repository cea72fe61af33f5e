"""Lake compaction (pipelines.compaction): real files; Kafka through the session's real broker where needed."""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import compaction, dashboard_data, kafka_io, lake, training, validation
from pipelines.compaction import Positions

TOPIC = "shop.events"
X, Y = "0" * 31 + "a", "0" * 31 + "b"  # two broker logs (topic ids)


def _hour() -> datetime:
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)


def _key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:00")


def _rows(tag: str, n: int, hour: datetime) -> list[dict]:
    t = int(hour.timestamp() * 1000)
    return [{"event_id": f"{tag}-{i}", "event_type": "view", "user_id": f"u{i}", "item_id": f"i{i}",
             "session_id": "s", "ts": t + i * 1000, "items": ["a", tag]} for i in range(n)]


def _consumer_files(lake_dir, hour, partition: int, first: int, count: int, *, log: str | None = X, per: int = 2,
                    writer: str = "w1", topic: str = TOPIC) -> list[str]:
    """``count`` consumer batch files of ``per`` records each, offsets from ``first``."""
    batches, ids = [], []
    for b in range(count):
        lo = first + b * per
        name = lake.batch_file_name(topic, partition, lo, lo + per - 1, writer, log=log)
        rows = _rows(f"{topic}:{partition}:{log}:{lo}", per, hour)
        batches.append((name, rows))
        ids += [r["event_id"] for r in rows]
    lake.write_batches(lake_dir, batches)
    return ids


def _ids(lake_dir, key) -> list[str]:
    return sorted(lake.read_partition(lake_dir, key)["event_id"])


def _names(folder) -> set[str]:
    return {f.name for f in folder.glob("*.parquet")}


def test_compaction_keeps_every_row_exactly_once(tmp_path):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    ids = _consumer_files(tmp_path, hour, 0, 0, 40) + _consumer_files(tmp_path, hour, 1, 0, 30)
    before = lake.read_partition(tmp_path, key).sort_values("event_id", ignore_index=True)
    rows = validation.partition_rows(tmp_path, key, stream_only=True)

    result = compaction.compact_folder(folder, Positions({TOPIC: X}, {(TOPIC, 0): 80, (TOPIC, 1): 60}))

    assert result.merged == 70 and result.rows == len(ids) == 140
    files = list(folder.glob("*.parquet"))
    assert len(files) == 1 and files[0].name.startswith("compacted-") and not lake._BATCH_FILE.match(files[0].name)
    assert len(lake.compacted_sources(files[0])) == 70
    after = lake.read_partition(tmp_path, key).sort_values("event_id", ignore_index=True)
    pd.testing.assert_frame_equal(before, after)  # every row and column, exactly once
    assert pq.read_schema(files[0]).remove_metadata().equals(lake.LAKE_SCHEMA)
    assert validation.partition_rows(tmp_path, key, stream_only=True) == rows == 140
    # the consumer resuming anywhere, on any log, never deletes the compacted file
    for log in (X, Y, None):
        for p in (0, 1):
            assert lake.remove_uncommitted(tmp_path, TOPIC, p, 0, log=log, since_ms=0, until_ms=2**42) == []
    assert compaction.compact_folder(folder, Positions({TOPIC: X}, {(TOPIC, 0): 80})).written is None


def test_files_at_or_past_the_committed_offset_stay_and_other_logs_merge(tmp_path):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    _consumer_files(tmp_path, hour, 0, 0, 5)  # offsets 0..9 of log X: committed up to 6 (files 0-1, 2-3, 4-5)
    old_log = _consumer_files(tmp_path, hour, 0, 0, 3, log=Y)  # an earlier log: committed history
    _consumer_files(tmp_path, hour, 1, 0, 2)  # partition 1: nothing committed
    unnamed = _consumer_files(tmp_path, hour, 2, 100, 2, log=None)  # before logs were named
    _consumer_files(tmp_path, hour, 0, 0, 2, topic="other.topic")  # a topic Kafka was not asked about
    expected = _ids(tmp_path, key)

    result = compaction.compact_folder(folder, Positions({TOPIC: X}, {(TOPIC, 0): 6}))

    left = _names(folder)
    kept = {lake.batch_file_name(TOPIC, 0, 6, 7, "w1", log=X), lake.batch_file_name(TOPIC, 0, 8, 9, "w1", log=X),
            lake.batch_file_name(TOPIC, 1, 0, 1, "w1", log=X), lake.batch_file_name(TOPIC, 1, 2, 3, "w1", log=X),
            lake.batch_file_name("other.topic", 0, 0, 1, "w1", log=X), lake.batch_file_name("other.topic", 0, 2, 3, "w1", log=X)}
    assert left - {result.written.name} == kept
    assert result.merged == 3 + 3 + 2 and result.skipped == len(kept)
    merged = set(pq.read_table(result.written)["event_id"].to_pylist())
    assert set(old_log) <= merged and set(unnamed) <= merged
    assert _ids(tmp_path, key) == expected
    # what the consumer removes on resuming at the committed offset is exactly what was left
    removed = lake.remove_uncommitted(tmp_path, TOPIC, 0, 6, log=X, since_ms=0, until_ms=2**42)
    assert {p.name for p in removed} == {n for n in kept if n.startswith(f"{TOPIC}-0-")}


def test_a_broker_without_topic_ids_merges_only_below_the_committed_offset(tmp_path):
    hour = _hour()
    folder = lake.partition_dir(tmp_path, _key(hour))
    _consumer_files(tmp_path, hour, 0, 0, 4, log=None)
    _consumer_files(tmp_path, hour, 0, 0, 2, log=Y)  # named, but the current log is unknown: could be current
    result = compaction.compact_folder(folder, Positions({TOPIC: None}, {(TOPIC, 0): 4}))
    assert result.merged == 2 + 2 and result.skipped == 2
    assert lake.batch_file_name(TOPIC, 0, 4, 5, "w1") in _names(folder)
    # no Kafka at all: nothing is merged
    _consumer_files(tmp_path, hour, 1, 0, 3, log=None)
    assert compaction.compact_folder(folder, Positions()).written is None


def test_a_crash_between_writing_and_deleting_leaves_no_duplicates(tmp_path):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    _consumer_files(tmp_path, hour, 0, 0, 20)
    expected = _ids(tmp_path, key)
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    compaction.compact_folder(folder, Positions({TOPIC: X}, {(TOPIC, 0): 40}))
    for f in saved.glob("*.parquet"):  # the sources back: the state a crash before the deletes leaves
        shutil.copy2(f, folder / f.name)
    assert len(_names(folder)) == 21
    assert _ids(tmp_path, key) == expected  # readers skip the sources a compacted file holds
    # so does every other reader of the lake: the volume band's count, training's trigger, the dashboard
    assert validation.partition_rows(tmp_path, key) == len(expected)
    assert sorted(training._read_columns(tmp_path, [key], ["event_id"])["event_id"]) == expected
    t0 = hour.timestamp()
    dash = dashboard_data.read_lake_columns(tmp_path, t0, t0 + 3600, ["event_id"], ["view"])
    assert sorted(dash["event_id"]) == expected

    result = compaction.compact_folder(folder, Positions())  # even without Kafka the next run cleans up
    assert result.recovered == 20 and len(_names(folder)) == 1
    assert _ids(tmp_path, key) == expected
    assert validation.partition_rows(tmp_path, key) == len(expected)


def test_a_reader_that_listed_files_before_a_compaction_reads_the_compacted_file(tmp_path):
    hour = _hour()
    folder = lake.partition_dir(tmp_path, _key(hour))
    _consumer_files(tmp_path, hour, 0, 0, 10)
    listed = sorted(folder.glob("*.parquet"))
    expected = sorted(lake.read_files(listed)["event_id"])
    compaction.compact_folder(folder, Positions({TOPIC: X}, {(TOPIC, 0): 20}))
    assert sorted(lake.read_files(listed)["event_id"]) == expected
    assert sorted(dashboard_data.read_lake_files(listed, ["event_id"], ["view"])["event_id"]) == expected


def test_late_events_are_merged_with_the_compacted_file(tmp_path):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    positions = Positions({TOPIC: X}, {(TOPIC, 0): 1000})
    _consumer_files(tmp_path, hour, 0, 0, 10)
    first = compaction.compact_folder(folder, positions).written
    _consumer_files(tmp_path, hour, 0, 500, 5)  # late events, written days later into the old hour
    result = compaction.compact_folder(folder, positions)
    assert result.merged == 1 + 5 and _names(folder) == {result.written.name} and not first.exists()
    assert len(_ids(tmp_path, key)) == 30 == len(set(_ids(tmp_path, key)))


def test_backfill_young_and_foreign_files_are_left_and_stream_rows_unchanged(tmp_path):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    lake.write_events(tmp_path, _rows("bf", 7, hour), prefix=lake.BACKFILL_PREFIX)
    _consumer_files(tmp_path, hour, 0, 0, 6)
    # an older consumer file without the newer columns: merged, its missing columns null as every reader sees them
    old = pa.Table.from_pylist(_rows("old", 3, hour), schema=lake.LAKE_SCHEMA).drop_columns(["schema_version", "items"])
    lake.write_table(folder, lake.batch_file_name(TOPIC, 0, 12, 14, "w1", log=X), old)
    # a file of the wrong column types must reach validation as it is
    bad = pa.Table.from_pylist(_rows("bad", 2, hour), schema=lake.LAKE_SCHEMA).set_column(
        6, "price", pa.array(["x", "y"]))
    lake.write_table(folder, lake.batch_file_name(TOPIC, 0, 15, 16, "w1", log=X), bad)
    stream, total = (validation.partition_rows(tmp_path, key, stream_only=s) for s in (True, False))
    backfill = {n for n in _names(folder) if n.startswith("backfill-")}
    before = validation.read_partition_lenient(tmp_path, key).sort_values("event_id", ignore_index=True)

    positions = Positions({TOPIC: X}, {(TOPIC, 0): 100})
    assert compaction.compact_folder(folder, positions, min_age_s=3600).written is None  # all too young
    result = compaction.compact_folder(folder, positions)

    assert result.merged == 7 and result.skipped == 1
    assert backfill <= _names(folder) and lake.batch_file_name(TOPIC, 0, 15, 16, "w1", log=X) in _names(folder)
    assert (validation.partition_rows(tmp_path, key, stream_only=True),
            validation.partition_rows(tmp_path, key)) == (stream, total) == (6 * 2 + 3 + 2, 6 * 2 + 3 + 2 + 7)
    after = validation.read_partition_lenient(tmp_path, key).sort_values("event_id", ignore_index=True)
    # the same values (the lenient read's per-file pandas concat writes a missing column's nulls as NaN or None)
    pd.testing.assert_frame_equal(before.astype(object).where(before.notna(), None),
                                  after.astype(object).where(after.notna(), None))
    merged = pq.read_table(result.written).to_pandas().set_index("event_id")
    assert pd.isna(merged.loc["old-0", "schema_version"]) and merged.loc["old-0", "items"] is None


# --- with the real broker ---------------------------------------------------------------------------
def _topic_with_commits(settings, commits: dict[int, int]) -> tuple[str, str]:
    """A fresh topic of 3 partitions with ``commits`` committed for the settings' consumer group; its log id."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.structs import OffsetAndMetadata

    topic = f"compaction-{uuid.uuid4().hex[:8]}"
    admin = kafka_io.make_admin(settings)
    try:
        admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        admin.close()
    consumer = KafkaConsumer(group_id=settings.consumer_group, enable_auto_commit=False,
                             **settings.kafka_client_kwargs())
    try:
        consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in commits]
        consumer.assign(tps)
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in commits.items()})
        consumer._fetch_all_topic_metadata()
        log = consumer._client.cluster.topic_id(topic)
    finally:
        consumer.close(autocommit=False)
    return topic, (log.hex if log is not None and log.int else None)


def test_kafka_positions_and_compact_partition_against_the_broker(settings, monkeypatch):
    topic, log = _topic_with_commits(settings, {0: 6, 1: 2})
    positions = compaction.kafka_positions(settings, {topic}, {(topic, 0), (topic, 2)})
    assert positions is not None and positions.logs == {topic: log}
    assert positions.committed == {(topic, 0): 6, (topic, 1): 2}

    hour = _hour()
    key = _key(hour)
    for p in range(3):
        _consumer_files(settings.lake_dir, hour, p, 0, 5, log=log, topic=topic)
    _consumer_files(settings.lake_dir, hour, 0, 0, 4, log=Y if log != Y else X, topic=topic)  # an earlier log
    expected = _ids(settings.lake_dir, key)
    monkeypatch.setattr(settings, "lake_compact_min_age_s", 0.0)
    result = compaction.compact_partition(settings.lake_dir, key, settings)
    assert result.merged == 3 + 1 + 4 and result.skipped == 2 + 4 + 5
    assert _ids(settings.lake_dir, key) == expected


def test_without_kafka_nothing_is_compacted(settings, tmp_path, caplog):
    hour = _hour()
    key, folder = _key(hour), lake.partition_dir(tmp_path, _key(hour))
    _consumer_files(tmp_path, hour, 0, 0, 5)
    unreachable = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:9", "lake_compact_min_age_s": 0.0})
    result = compaction.compact_partition(tmp_path, key, unreachable)
    assert result.written is None and len(_names(folder)) == 5
    assert "nothing is compacted" in caplog.text and "Configuration" not in caplog.text


def test_the_consumer_compacts_the_open_hour_as_it_goes(settings, redis_client, monkeypatch):
    """At a trickle the consumer writes about one event per file; it merges the current hour's committed files
    itself, so readers of the open hour do not wait for the hour to close (30,000 files made them take minutes)."""
    import threading

    from pipelines.consumer import StreamConsumer
    from pipelines.settings import get_settings
    from pipelines.state import OnlineState
    from tests.pipelines.conftest import lake_counts, produce, tagged_events, wait_until

    monkeypatch.setenv("SHOPREC_LAKE_COMPACT_OPEN_EVERY_S", "0.5")
    monkeypatch.setenv("SHOPREC_LAKE_COMPACT_MIN_AGE_S", "0")
    get_settings.cache_clear()
    s = get_settings()
    kafka_io.ensure_topics(s)
    waves = [tagged_events(30) for _ in range(4)]
    stop = threading.Event()
    consumer = StreamConsumer(s, OnlineState(redis_client))
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    try:
        for wave in waves:  # separate polls: separate files
            produce(s, wave)
            ids = [e["event_id"] for e in wave]
            wait_until(lambda: len(lake_counts(s, ids)) == len(ids), timeout=60, what="a wave in the lake")
        hour = lake.partition_dir(s.lake_dir, lake.partition_key(waves[-1][-1]["ts"]))
        wait_until(lambda: any(lake.is_compacted(f) for f in hour.glob("*.parquet")), timeout=60,
                   what="a compacted file in the open hour")
    finally:
        stop.set()
        worker.join(timeout=60)
    all_ids = [e["event_id"] for wave in waves for e in wave]
    counts = lake_counts(s, all_ids)
    assert len(counts) == len(all_ids) and set(counts.values()) == {1}  # every event, exactly once
    merged = [f for f in hour.glob("*.parquet") if lake.is_compacted(f)]
    assert len(merged) == 1 and len(lake.compacted_sources(merged[0])) >= 2
