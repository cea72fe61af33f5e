"""A broker whose log starts over (tansu keeps it in memory: ``make down`` + ``make up``) must not cost the
lake its history: Kafka offsets mean something only within one incarnation of a topic's log.

Each test starts its own brokers (the session's broker is shared by every test), and ``shoprec consume``
as real child processes, as ``make up`` does.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pipelines import kafka_io, lake, localstack
from pipelines.settings import get_settings
from tests.pipelines.conftest import lake_counts, produce, start_consumer, tagged_events

pytestmark = pytest.mark.slow


def _fresh_broker(tmp_path: Path, name: str, monkeypatch):
    """A new broker (an empty log) on a free port; the test's settings (and its child processes) point at it."""
    port = localstack.free_port()
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    get_settings.cache_clear()
    return localstack.running(localstack.broker_command(port), port, tmp_path / f"{name}.log")


def _consume_all(log: Path, **env) -> int:
    """Run a consumer until it has had nothing to do for 4 s; its exit code."""
    proc = start_consumer(log, "--idle-exit-s", "4", **env)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _exactly_once(settings, events) -> tuple[int, dict]:
    counts = lake_counts(settings, [e["event_id"] for e in events])
    return len(events) - len(counts), {e: n for e, n in counts.items() if n > 1}


def _lake_files(settings) -> set[str]:
    return {str(p.relative_to(settings.lake_dir)) for p in settings.lake_dir.glob("date=*/hour=*/*.parquet")}


def test_a_new_broker_log_keeps_the_events_stored_from_the_last_one(settings, redis_client, tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_CONSUMER_MAX_RECORDS", "150")  # several batches per partition
    log = tmp_path / "consumer.log"

    with _fresh_broker(tmp_path, "broker-a", monkeypatch):
        first = tagged_events(900)
        kafka_io.ensure_topics(get_settings())
        produce(get_settings(), first)
        assert _consume_all(log) == 0, f"see {log}"
        assert _exactly_once(settings, first) == (0, {}), f"see {log}"
    from_a = _lake_files(settings)
    assert from_a

    # `make down` + `make up`: a new broker, every partition's offsets start at 0 again
    with _fresh_broker(tmp_path, "broker-b", monkeypatch):
        second = tagged_events(900)
        kafka_io.ensure_topics(get_settings())
        produce(get_settings(), second)
        assert _consume_all(log) == 0, f"see {log}"

        assert _exactly_once(settings, first) == (0, {}), f"the first broker's events changed; see {log}"
        assert _exactly_once(settings, second) == (0, {}), f"see {log}"
        assert from_a <= _lake_files(settings)
        assert "removed" not in log.read_text()

        # within the new broker's log, a crash still leaves every event exactly once: the files of the
        # batch whose offsets were never committed are removed on restart, and only those
        third = tagged_events(900)
        produce(get_settings(), third)
        assert _consume_all(log, SHOPREC_CRASH_AT="after_lake_write:2") == -signal.SIGKILL, f"see {log}"
        assert _consume_all(log) == 0, f"see {log}"

    assert "removed" in log.read_text()
    # each broker's files name its own log (the topic id it gave shop.events)
    logs = {lake._BATCH_FILE.match(Path(f).name)["log"] for f in _lake_files(settings)}
    assert len(logs) == 2 and None not in logs
    for events in (first, second, third):
        assert _exactly_once(settings, events) == (0, {}), f"see {log}"
    assert from_a <= _lake_files(settings)


def test_uncommitted_files_are_removed_only_from_the_log_they_were_written_against(tmp_path):
    """Which files :func:`lake.remove_uncommitted` takes: same topic, partition and log, reaching the offset."""
    hour = 1_790_000_000_000 // 3_600_000 * 3_600_000
    rows = [{"event_id": "e", "event_type": "view", "user_id": "u", "item_id": "i", "session_id": "s", "ts": hour}]
    a, b = "0" * 31 + "a", "0" * 31 + "b"
    names = {
        "old_log": lake.batch_file_name("shop.events", 2, 0, 99, "w1", log=a),
        "uncommitted": lake.batch_file_name("shop.events", 2, 100, 199, "w1", log=b),
        "committed": lake.batch_file_name("shop.events", 2, 0, 99, "w1", log=b),
        "other_partition": lake.batch_file_name("shop.events", 3, 100, 199, "w1", log=b),
        "no_log": lake.batch_file_name("shop.events", 2, 100, 199, "w1"),  # before logs were named
    }
    assert names["no_log"] == "shop.events-2-000000000100-000000000199-w1.parquet"
    assert names["uncommitted"].endswith(f"-{b}-w1.parquet")  # the writer stays last
    lake.write_batches(tmp_path, [(n, rows) for n in names.values()])
    # a tmp file left by a crash mid-write counts too
    folder = lake._hour_dir(tmp_path, hour // 3_600_000)
    tmp = folder / f".{lake.batch_file_name('shop.events', 2, 200, 299, 'w2', log=b)}.tmp"
    tmp.write_bytes(b"partial")

    def remove(offset, log):
        return {p.name for p in lake.remove_uncommitted(tmp_path, "shop.events", 2, offset, log=log,
                                                        since_ms=hour, until_ms=hour)}

    assert remove(100, b) == {names["uncommitted"], tmp.name}
    # a broker that names no log (Kafka before 2.8) removes unnamed files, as before
    assert remove(0, None) == {names["no_log"]}
    assert {p.name for p in folder.iterdir()} == {names["old_log"], names["committed"], names["other_partition"]}


#: how long the broker is down between its two incarnations
OUTAGE_S = 20.0


def test_a_broker_restarted_under_a_running_consumer_keeps_the_events_it_stored(settings, redis_client, tmp_path,
                                                                                monkeypatch):
    """`supervisorctl stop broker`, then `make up`: the consumer keeps running, its commit is refused, and it
    resumes at offset 0 of the new log. The metadata it has cached still names the old log's topic id for a
    while; the files of the old log must not be taken for uncommitted files of the new one."""
    from tests.pipelines.conftest import wait_until

    monkeypatch.setenv("SHOPREC_CONSUMER_MAX_RECORDS", "150")
    port = localstack.free_port()
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    get_settings.cache_clear()
    log = tmp_path / "consumer.log"
    first, second = tagged_events(900), tagged_events(600)

    def stored(events) -> bool:
        return _exactly_once(settings, events) == (0, {})

    with localstack.running(localstack.broker_command(port), port, tmp_path / "broker-a.log"):
        kafka_io.ensure_topics(get_settings())
        produce(get_settings(), first)
        consumer = start_consumer(log)
        try:
            wait_until(lambda: stored(first), timeout=90, what=f"the first broker's events in the lake; see {log}")
        except BaseException:
            consumer.kill()
            raise
    from_a = _lake_files(settings)
    try:
        time.sleep(OUTAGE_S)  # the broker stays down a while (the walk-through's: ~25 s); the consumer retries
        with localstack.running(localstack.broker_command(port), port, tmp_path / "broker-b.log"):
            kafka_io.ensure_topics(get_settings())
            produce(get_settings(), second)
            wait_until(lambda: stored(second), timeout=120, what=f"the new broker's events in the lake; see {log}")
            assert consumer.poll() is None, f"the consumer exited; see {log}"
    finally:
        consumer.terminate()
        consumer.wait(timeout=60)
    assert from_a <= _lake_files(settings), f"files of the first broker's log were removed; see {log}"
    assert stored(first) and stored(second), f"see {log}"
    # the new log's files are named by the new log's topic id, not the old one's
    logs_a = {lake._BATCH_FILE.match(Path(f).name)["log"] for f in from_a}
    logs_b = {lake._BATCH_FILE.match(Path(f).name)["log"] for f in _lake_files(settings) - from_a}
    assert len(logs_a) == 1 and logs_b and not logs_a & logs_b, (logs_a, logs_b)
