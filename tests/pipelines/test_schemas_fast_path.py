"""The consumer's fast validation path agrees with pydantic on every record: accept/reject, reason, message, fields."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from pipelines import schemas
from pipelines.bench.ingest import _simulated
from pipelines.schemas import Event, EventError, new_event, parse_event, parse_events
from tests.pipelines.test_dlq_corpus import corpus

NOW = int(time.time() * 1000)
DEFAULTS = Event.model_construct(event_id="", event_type="view", user_id="", session_id="", ts=0).model_dump()
HOSTILE_VALUES = [None, "", " ", "x", "x\n", "a" * 129, "é", "\u0000", 0, -1, 1, 2, 1.5, 0.0, -0.0, 1e300,
                  2**63, True, False, [], ["x"], ["x"] * 201, [1], {}, {"$ne": None}, NOW, NOW + 10**9,
                  "view", "impression", str(uuid.uuid4()), str(uuid.uuid4()) + "\n", "1" * 999_999]


def slow(raw: bytes | None) -> dict | tuple[str, str]:
    try:
        return parse_event(raw, now_ms=NOW).model_dump()
    except EventError as err:
        return err.reason, err.message


def fast(raw: bytes | None) -> dict | tuple[str, str]:
    got = parse_events([raw], now_ms=NOW)[0]
    return (got.reason, got.message) if isinstance(got, EventError) else {**DEFAULTS, **got}


def base_events() -> list[dict]:
    rid = uuid.uuid4().hex
    return [
        new_event("view", "u1", "i1", "s1", ts=NOW - 1000),
        new_event("purchase", "u1", "i1", "s1", ts=NOW, price=12.5, quantity=2),
        new_event("impression", "u1", None, "s1", ts=NOW, items=["i1", "i2"], request_id=rid, variant="champion",
                  model_version="3", experiment="default@champion.3:challenger.4"),
        new_event("click", "u1", "i2", "s1", ts=NOW, request_id=rid, variant="challenger", model_version="3"),
    ]


def mutations() -> list[bytes | None]:
    out = []
    for ev in base_events():
        out.append(orjson.dumps(ev))
        for field in [*schemas.Event.model_fields, "extra"]:
            without = {k: v for k, v in ev.items() if k != field}
            out.append(orjson.dumps(without))
            for value in HOSTILE_VALUES:
                out.append(orjson.dumps({**ev, field: value}))
    return out


def test_fast_and_slow_paths_agree_on_the_hostile_corpus():
    records = [value for _, value, _ in corpus("fastpath")]
    assert len(records) > 40
    for raw in records:
        assert fast(raw) == slow(raw), raw[:200] if raw else raw


def test_fast_and_slow_paths_agree_on_every_field_set_to_hostile_values():
    records = mutations()
    assert len(records) > 1000
    disagree = [raw[:200] for raw in records if fast(raw) != slow(raw)]
    assert not disagree, disagree[:5]


def test_fast_and_slow_paths_agree_on_the_ts_window_edges():
    day = 86_400_000
    for ts in (NOW - 30 * day - 1, NOW - 30 * day, NOW + 300_000, NOW + 300_001):
        raw = orjson.dumps(new_event("view", "u1", "i1", "s1", ts=ts))
        assert fast(raw) == slow(raw)


def test_simulated_events_are_accepted_without_pydantic(monkeypatch):
    evs = _simulated(2000, start_ms=NOW - 60_000, rate_eps=100)
    raws = [orjson.dumps(e) for e in evs]
    expected = [slow(r) for r in raws]
    assert all(isinstance(e, dict) for e in expected)

    def boom(*a, **kw):
        raise AssertionError("the common shape went through pydantic")

    monkeypatch.setattr(schemas, "parse_event", boom)
    assert [{**DEFAULTS, **d} for d in parse_events(raws, now_ms=NOW)] == expected


def test_parse_event_dict_raises_the_reason():
    with pytest.raises(EventError) as err:
        schemas.parse_event_dict(b'{"event_type":"teleport"}', now_ms=NOW)
    assert err.value.reason == "missing_field"
    assert schemas.parse_event_dict(orjson.dumps(base_events()[0]), now_ms=NOW)["user_id"] == "u1"


@pytest.mark.parametrize("path", [slow, fast])
def test_an_event_ts_in_another_unit_gets_the_catalog_s_hint(path):
    """An event's ts in seconds said only "older than 30 days"; the catalog's created_at already named the fix."""
    seconds, micros = NOW // 1000, NOW * 1000
    reason, message = path(orjson.dumps(new_event("view", "u1", "i1", "s1", ts=seconds)))
    assert reason == "ts_too_old"
    assert f"it looks like epoch seconds: send {seconds * 1000}" in message and "UTC epoch milliseconds" in message
    reason, message = path(orjson.dumps(new_event("view", "u1", "i1", "s1", ts=micros)))
    assert reason == "ts_in_future" and f"it looks like epoch microseconds: send {NOW}" in message
    # a plain old ts gets no guess
    reason, message = path(orjson.dumps(new_event("view", "u1", "i1", "s1", ts=NOW - 40 * 86_400_000)))
    assert reason == "ts_too_old" and "looks like" not in message and "more than 30 days ago" in message


@pytest.mark.parametrize("path", [slow, fast])
def test_a_field_the_event_type_requires_is_a_missing_field_with_a_clean_message(path):
    view = new_event("view", "u1", "i1", "s1", ts=NOW)
    del view["item_id"]
    assert path(orjson.dumps(view)) == ("missing_field", "'item_id' is required for a 'view' event")
    assert path(orjson.dumps({**view, "item_id": None})) == ("missing_field", "'item_id' is required for a 'view' event")
    impression = new_event("impression", "u1", None, "s1", ts=NOW)
    reason, message = path(orjson.dumps(impression))
    assert reason == "missing_field" and message.startswith("'items' is required for an impression")
    # an empty list is there, and wrong; no message carries pydantic's "Value error, " prefix
    reason, message = path(orjson.dumps({**impression, "items": []}))
    assert reason == "schema" and message.startswith("'items' of an impression") and "Value error" not in message
    # as a field every event needs, named with the one its type needs (it named the first only)
    del view["event_id"]
    assert path(orjson.dumps(view)) == ("missing_field",
                                        "'event_id' is required; also 'item_id' is required for a 'view' event")
