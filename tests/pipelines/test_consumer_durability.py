"""Crash safety and consumer groups, with ``shoprec consume`` as real child processes."""

from __future__ import annotations

import signal
import time

import pytest

from pipelines import kafka_io
from pipelines.state import OnlineState
from tests.pipelines.conftest import dumps, lake_counts, produce, start_consumer, tagged_events, wait_until

pytestmark = pytest.mark.slow


def _stop(proc, sig=signal.SIGTERM, timeout=30):
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def test_sigkill_at_every_point_leaves_every_event_exactly_once(settings, redis_client, tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_CONSUMER_MAX_RECORDS", "150")  # many small batches, so every crash is mid-stream
    kafka_io.ensure_topics(settings)
    events = tagged_events(1500)
    resent = events[:40]  # a client retry: the same events sent twice must be stored once
    produce(settings, events, raw=[(e["user_id"], dumps(e)) for e in resent])
    log = tmp_path / "consumer.log"

    # the consumer kills itself at each named point of a batch, a few batches in
    for point in ("after_lake_write:2", "before_commit:3", "after_dlq:2", "after_claims:2", "after_redis:1",
                  "after_lake_write:1"):
        proc = start_consumer(log, SHOPREC_CRASH_AT=point)
        assert proc.wait(timeout=90) == -signal.SIGKILL, f"the consumer did not crash at {point}: see {log}"

    # and once from outside, at a moment of the test's choosing, while new events stream in
    more = tagged_events(600)
    proc = start_consumer(log)
    state = OnlineState(redis_client)
    produce(settings, more)
    wait_until(lambda: int(state.consumer_status().get("consumed", 0)) > 0, timeout=60, what="the consumer to commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    proc = start_consumer(log, "--idle-exit-s", "4")
    assert proc.wait(timeout=120) == 0, f"see {log}"

    counts = lake_counts(settings, [e["event_id"] for e in events + more])
    missing = len(events) + len(more) - len(counts)
    doubled = {e: n for e, n in counts.items() if n > 1}
    assert missing == 0 and not doubled, f"{missing} events missing, {len(doubled)} doubled; see {log}"
    assert state.dlq_reasons().get("duplicate", 0) >= len(resent)
    assert "removed" in log.read_text()  # some restart did find uncommitted files to drop


def test_two_consumers_share_partitions_and_one_stopping_loses_nothing(settings, redis_client, tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_CONSUMER_MAX_RECORDS", "200")
    kafka_io.ensure_topics(settings)
    first = tagged_events(1500)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_consumer(log_a)
    b = start_consumer(log_b)
    try:
        # the events go once both members own partitions: produced before, the first member to join could
        # store them all before the second one's join, and the second would never write a file
        state = OnlineState(redis_client)
        wait_until(lambda: (st := state.consumer_status()).get("members") == "2" and st.get("idle_members") == "0",
                   timeout=90, what="both group members to own partitions")
        produce(settings, first)
        # both members get a share: each writes lake files of its own partitions
        def both_working():
            names = {p.name.rsplit("-", 1)[-1] for p in settings.lake_dir.glob("date=*/hour=*/shop.events-*.parquet")}
            return len(names) >= 2
        wait_until(both_working, timeout=60, what="both group members to write lake files")
        assert _stop(a) == 0  # graceful stop mid-stream: b takes over a's partitions
        second = tagged_events(1500)
        produce(settings, second)
        wanted = [e["event_id"] for e in first + second]
        wait_until(lambda: len(lake_counts(settings, wanted)) == len(wanted), timeout=90,
                   what="every event in the lake after one member stopped")
    finally:
        for p in (a, b):
            if p.poll() is None:
                _stop(p)
    counts = lake_counts(settings, wanted)
    assert set(counts.values()) == {1}, f"doubled events: see {log_a} and {log_b}"


def test_a_member_joining_and_leaving_mid_stream_does_not_stall_the_group(settings, redis_client, tmp_path):
    """The README's "start more for more partitions": a second consumer joins a busy one, then leaves.

    The first keeps running throughout (no crash, no restart), takes every partition back, and every
    event sent before, during and after ends up in the lake exactly once.
    """
    import threading

    kafka_io.ensure_topics(settings)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_consumer(log_a)
    sent: list[str] = []
    stop = threading.Event()

    def trickle():  # the shop: a few events every 50 ms, all the time
        while not stop.is_set():
            batch = tagged_events(5)
            produce(settings, batch)
            sent.extend(e["event_id"] for e in batch)
            stop.wait(0.05)

    shop = threading.Thread(target=trickle, daemon=True)
    shop.start()
    b = None
    try:
        wait_until(lambda: len(sent) > 50 and len(lake_counts(settings, sent[:50])) == 50, timeout=60,
                   what="the first consumer to store the first events")
        b = start_consumer(log_b)
        state = OnlineState(redis_client)
        wait_until(lambda: (st := state.consumer_status()).get("members") == "2" and st.get("idle_members") == "0",
                   timeout=90, what=f"the second consumer to join and own partitions (see {log_b})")
        # both members work side by side (traffic keeps flowing): each stores events of its own partitions
        wait_until(lambda: len({p.name.rsplit("-", 1)[-1] for p in
                                settings.lake_dir.glob("date=*/hour=*/shop.events-*.parquet")}) >= 2,
                   timeout=60, what="both group members to write lake files")
        assert b.poll() is None, f"the second consumer exited: see {log_b}"
        assert _stop(b) == 0
        upto = len(sent)
        wait_until(lambda: len(lake_counts(settings, sent[:upto + 100])) == len(sent[:upto + 100])
                   and len(sent) > upto + 100, timeout=90,
                   what=f"events sent after the second consumer left to reach the lake (see {log_a})")
        assert a.poll() is None, f"the first consumer exited: see {log_a}"
    finally:
        stop.set()
        shop.join(timeout=30)
        for p in (a, b):
            if p is not None and p.poll() is None:
                _stop(p)
    counts = lake_counts(settings, sent)
    assert len(counts) == len(sent) and set(counts.values()) == {1}, f"see {log_a} and {log_b}"


def test_a_consumer_closed_while_its_group_rebalances_does_not_stall_the_group(settings, redis_client, tmp_path):
    """Stopping a consumer mid-rebalance (it had just joined) must leave the group usable for the next one."""
    from kafka.structs import MemberState

    from pipelines.consumer import StreamConsumer

    kafka_io.ensure_topics(settings)
    first = StreamConsumer(settings, OnlineState(redis_client))
    def joining():  # the broker knows the member (it has an id) and its join is not complete
        first.consumer.poll(timeout_ms=10)
        meta = first.consumer.group_metadata()
        return meta.state == MemberState.REBALANCING and bool(meta.member_id)
    wait_until(joining, timeout=30, step=0, what="the first consumer to be joining its group")
    first.close()  # stopped (SIGTERM) while the group is rebalancing
    log = tmp_path / "next.log"
    proc = start_consumer(log)
    try:
        events = tagged_events(300)
        produce(settings, events)
        wanted = [e["event_id"] for e in events]
        wait_until(lambda: len(lake_counts(settings, wanted)) == len(wanted), timeout=60,
                   what=f"the next consumer to be given partitions and store the events (see {log})")
    finally:
        _stop(proc)

