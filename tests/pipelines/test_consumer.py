"""The stream consumer against a real broker and a real Redis."""

from __future__ import annotations

import json
import uuid


from pipelines import kafka_io, lake
from pipelines.consumer import StreamConsumer
from pipelines.schemas import new_event
from pipelines.state import OnlineState
from tests.pipelines.conftest import wait_until
from tests.topics import topic_records


def test_valid_events_reach_lake_and_redis_invalid_go_to_dlq(settings, redis_client, caplog):
    kafka_io.ensure_topics(settings)
    kafka_io.ensure_topics(settings)  # a second call is harmless
    tag = uuid.uuid4().hex[:8]
    user = f"u-{tag}"
    good = [new_event("view", user, f"item-{i}", f"s-{tag}") for i in range(5)]
    bad = {**new_event("view", user, "item-x", f"s-{tag}"), "event_type": "teleport"}
    producer = kafka_io.make_producer(settings)
    futures = kafka_io.send_events(producer, good[:2], settings.kafka_topic_events)
    futures.append(producer.send(settings.kafka_topic_events, key=user, value=json.dumps(bad).encode()))
    futures.append(producer.send(settings.kafka_topic_events, key=user, value=b"\xff\xfe not json"))
    futures += kafka_io.send_events(producer, good[2:], settings.kafka_topic_events)
    for f in futures:
        f.get(timeout=10)
    producer.close()

    state = OnlineState(redis_client)
    consumer = StreamConsumer(settings, state)
    try:
        def mine():
            consumer.process_batch(timeout_ms=500)
            df = lake.read_all(settings.lake_dir)
            df = df[df.user_id == user]
            return df if len(df) >= 5 else None

        stored = wait_until(mine, what="the 5 valid events in the lake")
    finally:
        with caplog.at_level("INFO", logger="pipelines.consumer"):
            consumer.close()
    # an operator sees the consumer leave, with what it did
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("consumer stopped")]
    assert len(stopped) == 1 and f"{consumer.stats.stored} stored" in stopped[0] and consumer.stats.stored >= 5

    assert sorted(stored.event_id) == sorted(e["event_id"] for e in good)
    # newest first, capped list of the user's items
    assert state.recent_items(user)[:5] == [f"item-{i}" for i in reversed(range(5))]
    reasons = state.dlq_reasons()
    assert reasons.get("unknown_event_type", 0) >= 1 and reasons.get("undecodable", 0) >= 1

    found = {}
    for rec in topic_records(settings, settings.kafka_topic_dlq):
        if rec.key == user.encode():
            found[dict(rec.headers)["reason"].decode()] = rec.value
        if len(found) >= 2:
            break
    assert found["unknown_event_type"] == json.dumps(bad).encode()  # original bytes kept
    assert found["undecodable"] == b"\xff\xfe not json"


def test_redis_counts_ab_clicks_through_request_id(redis_client):
    state = OnlineState(redis_client, experiment="exp1")
    from pipelines.schemas import validate_event

    imp = new_event("impression", "u1", None, "s1", items=["a", "b"], request_id="r1", variant="challenger",
                    model_version="3")
    click = new_event("click", "u1", "a", "s1", request_id="r1")
    state.apply_events([validate_event(imp)])
    state.apply_events([validate_event(click)])
    assert state.ab_counts() == {"challenger": {"impressions": 1, "clicks": 1}}


def test_a_purchase_is_remembered_so_serving_can_leave_it_out(redis_client):
    from pipelines.schemas import validate_event

    state = OnlineState(redis_client)
    state.apply_events([validate_event(new_event("view", "u9", "a", "s9")),
                        validate_event(new_event("purchase", "u9", "b", "s9", price=12.5, quantity=1))])
    recent, bought = state.user_context("u9")
    assert bought == {"b"} and recent[:2] == ["b", "a"]
