"""`shoprec bench ingest --use-configured`: measures against the configured broker and Redis without touching the shop's data."""

from __future__ import annotations

import pytest
import redis
import typer
from kafka import KafkaConsumer, TopicPartition

from pipelines import kafka_io
from pipelines.bench import ingest as bench


def _end_offsets(settings) -> dict:
    consumer = KafkaConsumer(**settings.kafka_client_kwargs())
    try:
        parts = [TopicPartition(settings.kafka_topic_events, p) for p in range(settings.kafka_events_partitions)]
        return consumer.end_offsets(parts)
    finally:
        consumer.close()


@pytest.mark.slow
def test_use_configured_measures_on_own_topics_and_redis_db(settings, redis_url, tmp_path):
    kafka_io.ensure_topics(settings)
    shop_before = _end_offsets(settings)
    shop_redis = redis.Redis.from_url(redis_url)
    keys_before = shop_redis.dbsize()

    result = bench.run(3000, rate=400.0, seconds=3.0, sample_every=10, work_dir=tmp_path, use_configured=True,
                       redis_db=14)

    assert set(result) == {"events", "raw_consume_eps", "consumer_eps", "freshness_ms", "lost", "duplicated"}
    assert result["events"] == 3000 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["consumer_eps"] > 0 and result["raw_consume_eps"] > 0
    assert 0 < result["freshness_ms"]["p50"] <= result["freshness_ms"]["p95"] < 10_000
    # the shop's own topic and Redis database saw nothing; the run's database is left empty
    assert _end_offsets(settings) == shop_before
    assert shop_redis.dbsize() == keys_before
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
