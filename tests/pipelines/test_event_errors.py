"""A refused event says what to send, field by field, as a refused product does: each wrong field at once (its ts
window too), the JSON to send instead of a value of another type, and a purchase names its missing price.

``/events`` answers these messages (:func:`pipelines.ingest.validate_batch`) and the stream consumer sends the same
to the DLQ (:func:`pipelines.schemas.parse_events`, its columnar path :func:`pipelines.eventbatch.parse_batch`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import orjson
import pytest

from pipelines import eventbatch
from pipelines.eventbatch import parse_batch
from pipelines.ingest import validate_batch
from pipelines.schemas import EventError, new_event, parse_events, validate_event
from pipelines.settings import Settings

NOW = int(time.time() * 1000)
SECONDS = NOW // 1000


def refused(ev: dict) -> tuple[str, str]:
    """``(reason, message)`` of an event the API refuses, checked to be the consumer's too."""
    with pytest.raises(EventError) as err:
        validate_event(ev, now_ms=NOW)
    [consumer] = parse_events([orjson.dumps(ev)], now_ms=NOW)
    assert isinstance(consumer, EventError) and (consumer.reason, consumer.message) == (err.value.reason,
                                                                                        err.value.message)
    return err.value.reason, err.value.message


def view(**change) -> dict:
    return {**new_event("view", "u1", "i1", "s1", ts=NOW), **change}


def test_an_event_wrong_in_ts_and_another_field_names_both():
    """A price of "12" and a ts in seconds named only the price; the ts problem showed once the price was fixed."""
    reason, message = refused(view(event_type="purchase", price="12", ts=SECONDS))
    assert reason == "schema"  # the first problem's, as before
    assert message.startswith("price: send a JSON number (e.g. 19.9), not the string '12'; also ts "), message
    assert f"it looks like epoch seconds: send {SECONDS * 1000})" in message
    # the rule of the event's type and the ts window, both broken: both named
    reason, message = refused(view(item_id=None, ts=SECONDS))
    assert reason == "missing_field" and message.startswith("'item_id' is required for a 'view' event; also ts ")
    # several wrong fields: each (it named the first only)
    reason, message = refused(view(user_id="a b", session_id=5, quantity="2"))
    assert all(f"{field}: send " in message for field in ("user_id", "session_id", "quantity")), message
    # a field the type needs, missing next to a wrong one
    reason, message = refused(view(event_type="purchase", quantity=0))
    assert "quantity: " in message and "also 'price' is required for a 'purchase' event" in message, message


@pytest.mark.parametrize("field,value,says", [
    ("ts", "2026-12-07T12:00:00Z", "ts: send the time of the event as UTC epoch milliseconds (a JSON integer), not "
                                   "the string '2026-12-07T12:00:00Z'"),
    ("ts", str(NOW), f"ts: send the time of the event as UTC epoch milliseconds (a JSON integer), not the string "
                     f"'{NOW}': send {NOW}"),
    ("ts", str(SECONDS), f"not the string '{SECONDS}': send {SECONDS * 1000}"),
    ("ts", float(NOW), f"not the number {float(NOW)!r}: send {NOW}"),
    ("price", "12", "price: send a JSON number (e.g. 19.9), not the string '12'"),
    ("quantity", "2", "quantity: send a JSON integer, not the string '2'"),
    ("event_id", "abc", "event_id: send a UUID (e.g. '1b4e28ba-2fa1-11d2-883f-0016d3cca427'), not the string 'abc'"),
    ("user_id", "a\nb", "user_id: send a JSON string of 1 to 128 letters, digits or _.:@-, not the string 'a\\nb'"),
    ("items", "i1", "items: send a JSON array, not the string 'i1'"),
    ("session_id", None, "session_id: send a JSON string, not null"),  # said "not a NoneType"
    ("user_id", ["u1"], "user_id: send a JSON string, not an array"),
])
def test_a_value_of_another_json_type_is_refused_with_what_to_send(field, value, says):
    """ts as a string said `Input should be a valid integer` with no hint, a price "12" `Input should be a valid
    number`, an event_id "abc" `String should match pattern '^[0-9a-fA-F-]{32,36}$'`."""
    ev = view(event_type="purchase", price=9.5) if field != "items" else new_event(
        "impression", "u1", None, "s1", ts=NOW, items=["i1"])
    reason, message = refused({**ev, field: value})
    assert reason == "schema" and says in message, message


def test_an_iso_ts_is_answered_with_the_milliseconds_it_means():
    iso = datetime.fromtimestamp(SECONDS, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    _, message = refused(view(ts=iso + "Z"))
    assert message.endswith(f"send {SECONDS * 1000}"), message
    _, message = refused(view(ts=iso))
    assert message.endswith(f"send {SECONDS * 1000} (read as UTC)"), message
    _, message = refused(view(ts="2001-01-01T00:00:00Z"))  # outside the window: no guess
    assert message.endswith("not the string '2001-01-01T00:00:00Z'"), message


def test_a_purchase_needs_its_price():
    """A purchase without price was accepted (202, stored with a null price): revenue per impression counted 0."""
    purchase = new_event("purchase", "u1", "i1", "s1", ts=NOW, price=19.9, quantity=1)
    del purchase["price"]
    assert refused(purchase) == ("missing_field", "'price' is required for a 'purchase' event (the unit price "
                                                  "paid, a JSON number from 0.01 to 100000: revenue counts it)")
    assert refused({**purchase, "price": None})[0] == "missing_field"
    without_both = {k: v for k, v in purchase.items() if k != "item_id"}
    assert refused(without_both)[1].startswith("'item_id' and 'price' are required for a 'purchase' event")
    # what /events answers: a 400 that names it
    _, errors = validate_batch([purchase], Settings())
    assert [(e["index"], e["reason"]) for e in errors] == [(0, "missing_field")] and "'price'" in errors[0]["message"]
    # other events keep price optional (a cart may carry one)
    assert validate_event(new_event("add_to_cart", "u1", "i1", "s1", ts=NOW), now_ms=NOW)


def test_the_consumer_s_columnar_path_refuses_a_purchase_without_price(monkeypatch):
    monkeypatch.setattr(eventbatch, "_COLUMNAR_MIN", 0)
    good = new_event("purchase", "u1", "i1", "s1", ts=NOW, price=19.9, quantity=1)
    bad = {k: v for k, v in good.items() if k != "price"}
    got = parse_batch([orjson.dumps(good), orjson.dumps(bad), orjson.dumps({**bad, "price": None})], now_ms=NOW)
    assert got.index.tolist() == [0] and [(i, e.reason) for i, e in got.rejects] == [(1, "missing_field"),
                                                                                    (2, "missing_field")]
