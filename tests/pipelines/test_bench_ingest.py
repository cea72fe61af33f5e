"""`shoprec bench ingest --use-configured`: measures against the configured broker and Redis without touching the shop's data."""

from __future__ import annotations

import pytest
import redis
import typer
from kafka import KafkaConsumer, TopicPartition

from pipelines import kafka_io
from pipelines.bench import ingest as bench


def _records_in(settings, topic: str) -> int:
    """Records in ``topic``, counted (``end_offsets`` under-reports on tansu)."""
    consumer = KafkaConsumer(**settings.kafka_client_kwargs(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.kafka_events_partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        n, empty_polls = 0, 0
        while empty_polls < 6:  # 3 s without a record: the end (a slow broker answers some polls empty)
            got = sum(len(r) for r in consumer.poll(timeout_ms=500).values())
            n += got
            empty_polls = 0 if got else empty_polls + 1
        return n
    finally:
        consumer.close()


@pytest.mark.slow
def test_use_configured_measures_on_own_topics_and_redis_db(settings, redis_url, tmp_path):
    kafka_io.ensure_topics(settings)
    shop_before = _records_in(settings, settings.kafka_topic_events)

    result = bench.run(3000, rate=400.0, seconds=3.0, sample_every=10, work_dir=tmp_path, use_configured=True,
                       redis_db=14)

    assert set(result) == {"events", "raw_consume_eps", "consumer_eps", "freshness_ms", "lost", "duplicated"}
    assert result["events"] == 3000 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["consumer_eps"] > 0 and result["raw_consume_eps"] > 0
    assert 0 < result["freshness_ms"]["p50"] <= result["freshness_ms"]["p95"] < 10_000
    # the shop's own topic and Redis database saw nothing; the run's database is left empty
    assert _records_in(settings, settings.kafka_topic_events) == shop_before
    shop_redis = redis.Redis.from_url(redis_url)  # the bench's own users (probe-*, fresh-*) never reach it
    assert not shop_redis.keys("shoprec:recent:probe-*") and not shop_redis.keys("shoprec:recent:fresh-*")
    assert redis.Redis.from_url(bench._with_db(redis_url, 14)).dbsize() == 0
    admin = kafka_io.make_admin(settings)
    try:
        assert not [t for t in admin.list_topics() if t.startswith("shoprec-bench-")]
    finally:
        admin.close()


def test_use_configured_refuses_a_redis_db_that_is_in_use(settings, redis_url, tmp_path):
    busy = redis.Redis.from_url(bench._with_db(redis_url, 13))
    busy.set("someone-else", "1")
    try:
        with pytest.raises(typer.BadParameter, match="--redis-db"):
            bench.run(100, rate=100.0, seconds=1.0, sample_every=10, work_dir=tmp_path, use_configured=True,
                      redis_db=13)
        assert busy.get("someone-else") == b"1"
    finally:
        busy.delete("someone-else")


def test_with_db_rewrites_each_url_form():
    assert bench._with_db("redis://h:6379/0", 15) == "redis://h:6379/15"
    assert bench._with_db("rediss://u:p@h:6380", 3) == "rediss://u:p@h:6380/3"
    assert bench._with_db("unix:///run/redis.sock?db=0", 2) == "unix:///run/redis.sock?db=2"
    # redis-py prefers ?db= to the path: it must go, or the run would use (and empty) the shop's database
    assert bench._with_db("redis://h:6379/?db=0", 15) == "redis://h:6379/15"
    assert bench._with_db("redis://h:6379/0?db=0&ssl_cert_reqs=none", 15) == "redis://h:6379/15?ssl_cert_reqs=none"
    import redis as redis_py

    assert redis_py.Redis.from_url(bench._with_db("redis://h:6379/?db=3", 15)).connection_pool.connection_kwargs["db"] == 15
