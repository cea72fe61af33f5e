"""The training window (pipelines/training.py load_window): validated partitions only, each event counted once."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from pipelines import lake, training, validation
from pipelines.schemas import COL_EVENT_ID, new_event

HOUR = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
HOUR_MS = int(HOUR.timestamp() * 1000)


def _events(n: int, hour: int) -> list[dict]:
    return [new_event("purchase" if i % 10 == 0 else "view", f"user{i % 7}", f"sku:{i % 13}", f"sess{i % 7}",
                      ts=HOUR_MS + hour * 3_600_000 + i * 1000, price=9.5 if i % 10 == 0 else None,
                      quantity=1 if i % 10 == 0 else None) for i in range(n)]


def test_redelivered_events_pass_validation_but_training_counts_each_once(tmp_path):
    """At-least-once delivery wrote a few events twice (a batch replayed into another file): the hour still
    passes (a few redeliveries must not block its training), the report says how many rows repeat, and
    training reads each event once, so a purchase is not weighted twice."""
    first, second = _events(300, 0), _events(200, 1)
    lake.write_events(tmp_path, first + second)
    redelivered = first[:1] + second[:1]  # two purchases (under 1% of each hour: the suite tolerates it)
    lake.write_events(tmp_path, redelivered, prefix="replay")
    qdir = tmp_path / "quality"

    window = training.load_window(tmp_path, qdir, HOUR, HOUR + timedelta(hours=2))

    assert window.failed == [] and len(window.passed) == 2
    assert window.duplicates_dropped == 2
    assert len(window.events) == 500 and window.events[COL_EVENT_ID].is_unique
    reports = [validation.read_report(qdir, k) for k in window.passed]
    assert [r["statistics"]["duplicate_event_ids"] for r in reports] == [1, 1]
    assert "1 row(s) repeat an earlier event_id" in validation.describe_report(reports[0])
    interactions = training.build_interactions(window.events)
    assert len(interactions) == 500
    assert interactions["weight"].sum() == 450 * 1.0 + 50 * 5.0  # each purchase once


def test_a_window_without_repeats_drops_nothing(tmp_path):
    lake.write_events(tmp_path, _events(50, 0))
    window = training.load_window(tmp_path, tmp_path / "quality", HOUR, HOUR + timedelta(hours=1))
    assert window.duplicates_dropped == 0 and len(window.events) == 50
