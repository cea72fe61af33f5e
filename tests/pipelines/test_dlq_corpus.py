"""Hostile and malformed records are quarantined with the right reason; the good ones around them are stored."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter


from pipelines import kafka_io
from pipelines.consumer import StreamConsumer
from pipelines.schemas import new_event
from pipelines.state import OnlineState
from tests.pipelines.conftest import dumps, lake_counts, wait_until
from tests.topics import topic_records

DAY_MS = 86_400_000


def corpus(tag: str) -> list[tuple[str, bytes | None, str]]:
    """``(kind, record value, expected reason)`` for more than 30 kinds of bad records."""
    def ev(**change):
        base = new_event("view", f"u-{tag}", "item-1", f"s-{tag}")
        base.update(change)
        return base

    def without(field):
        base = ev()
        del base[field]
        return dumps(base)

    now = int(time.time() * 1000)
    deep = b"[" * 5000 + b"]" * 5000
    nested_extra = json.dumps({**ev(), "extra": json.loads("[" * 500 + "]" * 500)}).encode()
    resent = ev()
    return [
        ("not utf-8", b"\xff\xfe\xfd\x00garbage", "undecodable"),
        ("latin-1 inside json", dumps(ev()).replace(b"item-1", b"caf\xe9"), "undecodable"),
        ("utf-16 with bom", json.dumps(ev()).encode("utf-16"), "undecodable"),
        ("empty value", b"", "empty"),
        ("tombstone (null value)", None, "empty"),
        ("10 MB payload", b'{"pad":"' + b"x" * (10 * 1024 * 1024) + b'"}', "oversized"),
        ("padded valid-looking event", dumps(ev(model_version="v" * 20_000)), "oversized"),
        ("truncated json", dumps(ev())[:40], "invalid_json"),
        ("nesting 5000 deep", deep, "invalid_json"),
        ("NaN literal", dumps(ev())[:-1] + b',"price":NaN}', "invalid_json"),
        ("two objects", dumps(ev()) + dumps(ev()), "invalid_json"),
        ("json array", b"[1,2,3]", "schema"),
        ("json string", b'"view"', "schema"),
        ("json null", b"null", "schema"),
        ("empty object", b"{}", "missing_field"),
        ("missing event_id", without("event_id"), "missing_field"),
        ("missing user_id", without("user_id"), "missing_field"),
        ("missing ts", without("ts"), "missing_field"),
        ("ts as string", dumps(ev(ts=str(now))), "schema"),
        ("ts as float", dumps(ev(ts=now + 0.5)), "schema"),
        ("ts negative", dumps(ev(ts=-5)), "schema"),
        ("ts one day ahead", dumps(ev(ts=now + DAY_MS)), "ts_in_future"),
        ("ts in seconds, not ms", dumps(ev(ts=now // 1000)), "ts_too_old"),
        ("ts a year ago", dumps(ev(ts=now - 365 * DAY_MS)), "ts_too_old"),
        ("unknown event type", dumps(ev(event_type="teleport")), "unknown_event_type"),
        ("event type in caps", dumps(ev(event_type="VIEW")), "unknown_event_type"),
        ("event type as number", dumps(ev(event_type=3)), "unknown_event_type"),
        ("newline injected in user_id", dumps(ev(user_id=f"u-{tag}\nadmin")), "schema"),
        ("newline injected in event_id", dumps(ev(event_id=str(uuid.uuid4())[:30] + "\n1234")), "schema"),
        ("CRLF injected in item_id", dumps(ev(item_id="item-1\r\nX-Admin: 1")), "schema"),
        ("NUL byte in session_id", dumps(ev(session_id="s\u0000x")), "schema"),
        ("SQL in user_id", dumps(ev(user_id="u'; DROP TABLE users;--")), "schema"),
        ("operator object as user_id", dumps(ev(user_id={"$ne": None})), "schema"),
        ("user_id 200 chars", dumps(ev(user_id="u" * 200)), "schema"),
        ("event_id not a uuid", dumps(ev(event_id="1234")), "schema"),
        ("unknown field", dumps(ev(is_admin=True)), "unknown_field"),
        ("nesting 500 deep in an extra field", nested_extra, "unknown_field"),
        ("schema_version 2", dumps(ev(schema_version=2)), "schema"),
        ("negative price", dumps(ev(event_type="purchase", price=-10.0)), "schema"),
        ("quantity of a million", dumps(ev(event_type="purchase", quantity=1_000_000)), "schema"),
        # a field the event's type requires is missing like one every event requires
        ("view without item", dumps(ev(item_id=None)), "missing_field"),
        ("impression without items", dumps(ev(event_type="impression", item_id=None)), "missing_field"),
        ("impression with an empty list", dumps(ev(event_type="impression", item_id=None, items=[])), "schema"),
        ("impression of 500 items", dumps(ev(event_type="impression", item_id=None, items=["i"] * 500)), "schema"),
        ("first copy", dumps(resent), None),  # stored: its second copy below is the duplicate
        ("same event_id again", dumps(resent), "duplicate"),
    ]


def test_each_hostile_record_lands_in_the_dlq_with_its_reason_and_good_ones_are_stored(settings, redis_client, caplog):
    kafka_io.ensure_topics(settings)
    tag = uuid.uuid4().hex[:8]
    bad = corpus(tag)
    assert len({kind for kind, _, reason in bad if reason}) >= 30
    good, records = [], []
    for i, (kind, value, _) in enumerate(bad):
        g = new_event("click", f"u-{tag}", f"good-{i}", f"s-{tag}")
        good.append(g)
        # every bad record next to a good one of the same user (same partition, same batch)
        records += [(f"u-{tag}", value, [("corpus", f"{tag}-{i}".encode())]), (f"u-{tag}", dumps(g), [])]
    producer = kafka_io.make_producer(settings)
    for f in [producer.send(settings.kafka_topic_events, key=k, value=v, headers=h) for k, v, h in records]:
        f.get(timeout=30)
    producer.close()

    state = OnlineState(redis_client)
    consumer = StreamConsumer(settings, state)
    wanted = [g["event_id"] for g in good] + [json.loads(bad[-2][1])["event_id"]]
    caplog.set_level(logging.WARNING, logger="pipelines.consumer")
    n_bad = sum(1 for *_, reason in bad if reason)
    try:
        wait_until(lambda: consumer.process_batch(timeout_ms=500) is not None
                   and len(lake_counts(settings, wanted)) == len(wanted)
                   and sum(state.dlq_reasons().values()) >= n_bad, timeout=60, what="every record handled")
    finally:
        consumer.close()
    assert set(lake_counts(settings, wanted).values()) == {1}
    assert state.recent_items(f"u-{tag}")[0] == f"good-{len(bad) - 1}"  # good events reached the online state

    found = {}
    expected = {f"{tag}-{i}".encode(): (kind, value, reason) for i, (kind, value, reason) in enumerate(bad) if reason}
    for rec in topic_records(settings, settings.kafka_topic_dlq):
        corpus_id = dict(rec.headers).get("corpus")
        if corpus_id in expected:
            found[corpus_id] = rec
        if len(found) == len(expected):
            break
    wrong = {}
    for key, (kind, value, reason) in expected.items():
        rec = found.get(key)
        got = dict(rec.headers).get("reason", b"").decode() if rec else "not in the DLQ"
        if got != reason or (rec.value or b"") != (value or b""):
            wrong[kind] = got
    assert not wrong, f"records with a wrong DLQ reason or altered bytes: {wrong}"

    counted = state.dlq_reasons()
    for reason, n in Counter(r for _, _, r in bad if r).items():
        assert counted.get(reason, 0) >= n, f"{reason}: counted {counted.get(reason)} of {n}"
    assert "rejected" in caplog.text
