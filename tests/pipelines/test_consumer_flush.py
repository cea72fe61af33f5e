"""The lake buffer: a trickle of small polls is written as few files, each event exactly once, and offsets
are committed only once the files holding their events are durable; a crash before a flush replays exactly once.

Each test consumes a topic of its own, so the counts are this test's only.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from pipelines import kafka_io, lake
from pipelines.consumer import StreamConsumer
from pipelines.state import OnlineState
from tests.pipelines.conftest import (
    lake_counts,
    produce,
    start_consumer,
    tagged_events,
    wait_until,
)


def _own_topic(settings, monkeypatch, **update):
    """``settings`` on a fresh events topic (also for child processes), with ``update`` applied."""
    topic = f"flush-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", topic)
    s = settings.model_copy(update={"kafka_topic_events": topic, **update})
    kafka_io.ensure_topics(s)
    return s


def _files(s) -> list:
    return sorted(s.lake_dir.glob("date=*/hour=*/*.parquet"))


def test_a_trickle_is_written_in_few_files_each_event_once_committed_after_its_flush(settings, redis_client,
                                                                                       monkeypatch):
    s = _own_topic(settings, monkeypatch, consumer_lake_flush_s=2.5, consumer_lake_idle_flush_rows=100_000)
    state = OnlineState(redis_client)
    sc = StreamConsumer(s, state)
    polls, folds, commits = [0], [0], []
    poll, fold, commit = sc.consumer.poll, state.apply_events, sc.consumer.commit

    def counting_poll(*a, **kw):
        got = poll(*a, **kw)
        polls[0] += bool(got)
        return got

    def counting_fold(events):
        folds[0] += 1
        return fold(events)

    def recording_commit(offsets):
        # what the lake holds when the offsets are committed
        commits.append(({tp.partition: o.offset for tp, o in offsets.items()}, {p.name for p in _files(s)}))
        return commit(offsets)

    sc.consumer.poll, state.apply_events, sc.consumer.commit = counting_poll, counting_fold, recording_commit
    events = tagged_events(60, users=3)  # three users: at most three partitions
    stop = threading.Event()

    def trickle():  # one event every 50 ms for about three seconds: the shop's trickle, one or two per poll
        producer = kafka_io.make_producer(s)
        try:
            for ev in events:
                if stop.is_set():
                    return
                kafka_io.send_events(producer, [ev], s.kafka_topic_events)[0].get(timeout=30)
                time.sleep(0.05)
        finally:
            producer.close()

    try:
        wait_until(lambda: sc.process_batch(timeout_ms=200) is not None and sc.consumer.assignment(), timeout=60,
                   step=0, what="the consumer to join its group")
        shop = threading.Thread(target=trickle, daemon=True)
        shop.start()
        # the online state has each event within a poll, long before the lake (the flush age is 2.5 s)
        first = events[0]["user_id"]
        wait_until(lambda: sc.process_batch(timeout_ms=100) is not None and state.recent_items(first), timeout=30,
                   step=0, what="the first event in the online state")
        assert not lake_counts(s, [events[0]["event_id"]]) and sc.stats.consumed == 0
        ids = [e["event_id"] for e in events]
        wait_until(lambda: sc.process_batch(timeout_ms=100) is not None and not shop.is_alive()
                   and len(lake_counts(s, ids)) == len(ids) and not sc._inflight, timeout=60, step=0,
                   what="every event in the lake and committed")
    finally:
        stop.set()
        sc.close()

    files = _files(s)
    counts = lake_counts(s, ids)
    assert len(counts) == len(ids) and set(counts.values()) == {1}
    # many small polls, each folded into Redis on its own; few lake files and commits
    assert polls[0] >= 12 and folds[0] == polls[0], (polls, folds)
    assert len(files) * 4 <= polls[0] and len(commits) * 4 <= polls[0], (len(files), len(commits), polls)
    assert sc.stats.files == len(files) and sc.stats.consumed == len(ids)
    # every commit ends exactly where files already durable end: no file straddles a committed offset
    ranges = [lake._BATCH_FILE.match(p.name) for p in files]
    ranges = [(int(m["partition"]), int(m["first"]), int(m["last"]), m.string) for m in ranges]
    for offsets, present in commits:
        for partition, offset in offsets.items():
            assert any(p == partition and last == offset - 1 and name in present for p, _, last, name in ranges), \
                (partition, offset, present)
            assert not [r for r in ranges if r[0] == partition and r[1] < offset <= r[2]]


@pytest.mark.slow
def test_a_crash_between_buffering_and_flushing_replays_exactly_once(settings, redis_client, tmp_path, monkeypatch):
    # polls of 20 records of one partition, written in groups of four polls (80 records); never by age or
    # idleness before the crashes
    s = _own_topic(settings, monkeypatch)
    for k, v in {"SHOPREC_CONSUMER_MAX_RECORDS": "20", "SHOPREC_CONSUMER_LAKE_FLUSH_ROWS": "70",
                 "SHOPREC_CONSUMER_LAKE_FLUSH_S": "60", "SHOPREC_CONSUMER_LAKE_IDLE_FLUSH_ROWS": "100000"}.items():
        monkeypatch.setenv(k, v)
    events = tagged_events(600, users=1)
    ids = [e["event_id"] for e in events]
    produce(s, events)
    log = tmp_path / "consumer.log"

    # killed with batches in the buffer (groups committed before them), twice; then with a group written
    # and not committed
    for point in ("after_buffer:10", "after_buffer:6", "after_lake_write:1"):
        proc = start_consumer(log, SHOPREC_CRASH_AT=point)
        assert proc.wait(timeout=90) == -signal.SIGKILL, f"the consumer did not crash at {point}: see {log}"
    assert len(lake_counts(s, ids)) < len(ids)

    monkeypatch.setenv("SHOPREC_CONSUMER_LAKE_FLUSH_S", "1")
    proc = start_consumer(log, "--idle-exit-s", "4")
    assert proc.wait(timeout=120) == 0, f"see {log}"

    counts = lake_counts(s, ids)
    missing = len(ids) - len(counts)
    doubled = {e: n for e, n in counts.items() if n > 1}
    assert missing == 0 and not doubled, f"{missing} events missing, {len(doubled)} doubled; see {log}"
    assert "removed" in log.read_text()  # the restart after the last crash found the uncommitted group's files
    assert not OnlineState(redis_client).dlq_reasons().get("duplicate")  # a replay is never taken for a duplicate
    # each file holds a group of several polls: about 600 / 80 files, where a file per poll made 30
    spans = [lake._BATCH_FILE.match(p.name) for p in _files(s)]
    assert len(spans) <= 12 and max(int(m["last"]) - int(m["first"]) + 1 for m in spans) >= 60, \
        [m.string for m in spans]
