"""A broker outage is a few log lines, not hundreds (pipelines.logs.Repeats)."""

from __future__ import annotations

import logging

from pipelines.logs import Repeats


def _records(n: int, name: str = "kafka.net.connection", msg: str = "<KafkaConnection node_id=%d>: Connection lost"):
    return [logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (100 + i,), None) for i in range(n)]


def test_the_same_complaint_shows_once_per_window_then_says_how_many_were_held_back(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("pipelines.logs.time.monotonic", lambda: clock[0])
    f = Repeats(every_s=30)
    shown = [r for r in _records(200) if f.filter(r)]
    assert len(shown) == 1  # lines that differ only in numbers are one kind
    clock[0] += 31
    later = _records(1)[0]
    assert f.filter(later)
    assert "199 more like this in the last 31 s, not shown" in later.getMessage()
    assert "Connection lost" in later.getMessage()


def test_other_kinds_and_our_own_lines_are_never_held_back():
    f = Repeats()
    assert f.filter(_records(1)[0])
    assert f.filter(_records(1, msg="Metadata refresh: failed %s")[0])  # another kind
    ours = [logging.LogRecord("pipelines.consumer", logging.INFO, __file__, 1, "consumed=%d", (i,), None)
            for i in range(50)]
    assert all(f.filter(r) for r in ours)
