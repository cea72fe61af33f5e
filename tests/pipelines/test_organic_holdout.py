"""The gate's holdout leaves out what a served list steered: clicks on it and the rest of that session favour
the model that served it, so a gate scoring on them would keep the incumbent champion."""

from __future__ import annotations

import pandas as pd

from pipelines import training
from pipelines.schemas import new_event

T0 = 1_795_000_000_000  # ms
H = 3_600_000


def _events(rows: list[tuple]) -> pd.DataFrame:
    """Lake-like events from ``(type, user, item, session, ts_ms, request_id)`` rows."""
    evs = []
    for etype, user, item, session, ts, request_id in rows:
        extra = {"request_id": request_id, "variant": "champion"} if request_id else {}
        if etype == "impression":
            extra["items"] = ["i1", "i2"]
        evs.append(new_event(etype, user, item, session, ts=ts, **extra))
    df = pd.DataFrame(evs)
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
    return df


def test_what_followed_a_recommendation_list_is_marked_as_steered():
    ev = _events([
        ("view", "u1", "i9", "s1", T0, None),                # before the list: organic
        ("impression", "u1", None, "s1", T0 + 1_000, "r1"),
        ("click", "u1", "i1", "s1", T0 + 2_000, "r1"),       # on the list
        ("view", "u1", "i7", "s1", T0 + 3_000, None),        # later in the same session
        ("add_to_cart", "u1", "i1", "s2", T0 + 4_000, "r1"),  # credited to the list in another session
        ("view", "u2", "i3", "s3", T0 + 5_000, None),        # nobody showed u2 anything
    ])
    inter = training.build_interactions(ev)
    assert len(inter) == 5  # the impression is not an interaction
    assert dict(zip(inter.item_id + "/" + inter.user_id, inter.organic)) == {
        "i9/u1": True, "i1/u1": False, "i7/u1": False, "i3/u2": True}
    assert inter.organic.tolist() == [True, False, False, False, True]


def test_the_holdout_keeps_only_organic_interactions_and_training_keeps_everything():
    users = range(24)
    rows = [("view", f"u{u}", f"i{u + d}", f"s{u}-{d}", T0 + d * H, None) for u in users for d in range(4)]
    rows += [("impression", f"u{u}", None, f"s{u}-{d}", T0 + d * H + 60_000, f"r{u}-{d}") for u in users for d in (0, 3)]
    rows += [("click", f"u{u}", "i1", f"s{u}-{d}", T0 + d * H + 120_000, f"r{u}-{d}") for u in users for d in (0, 3)]
    inter = training.build_interactions(_events(rows))
    train, test, what = training.holdout_split(inter, hours=1)
    assert "organic" not in train and "organic" not in test
    assert len(train) == 24 * 3 + 24  # the steered clicks of the first hour are trained on

    assert len(test) == 24 and set(test.item_id) == {f"i{u + 3}" for u in users}
    assert "organic only: 24 of 48 interactions" in what

    # with too few organic interactions left to decide on, all of the holdout is kept and the description says so
    few = inter[(inter.ts < pd.Timestamp(T0 + 3 * H, unit="ms", tz="UTC")) | ~inter.organic | (inter.user_id == "u0")]
    train, test, what = training.holdout_split(few, hours=1)
    assert len(test) == 25 and "1 organic interaction(s)" in what and "all 25 are kept" in what


def test_the_hour_based_holdout_reads_epoch_milliseconds_too():
    rows = [("view", f"u{u}", f"i{u + d}", f"s{u}-{d}", T0 + d * H, None) for u in range(24) for d in range(4)]
    inter = training.build_interactions(_events(rows))
    as_ms = inter.assign(ts=(inter.ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1))
    for frame in (inter, as_ms):
        train, test, what = training.holdout_split(frame, hours=1)
        assert what.startswith("last 1h") and len(test) == 24 and len(train) == 72
        assert what.endswith("; 24 interactions, all organic")  # the tag says how many, before any list was served
