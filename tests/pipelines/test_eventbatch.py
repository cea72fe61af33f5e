"""The consumer's columnar validation agrees with the record-by-record path on every record of a batch."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pytest

from pipelines import eventbatch
from pipelines.bench.ingest import _simulated
from pipelines.eventbatch import parse_batch
from pipelines.schemas import EventError, new_event
from tests.pipelines.test_dlq_corpus import corpus
from tests.pipelines.test_schemas_fast_path import DEFAULTS, NOW, mutations, slow


@pytest.fixture(autouse=True)
def columnar_even_for_small_batches(monkeypatch):
    """The corpora here are small; below ``_COLUMNAR_MIN`` records they would skip the Arrow path under test."""
    monkeypatch.setattr(eventbatch, "_COLUMNAR_MIN", 0)


def decisions(values: list[bytes | None]) -> list[dict | tuple[str, str]]:
    """Per value, as :func:`slow` gives it: the accepted event with every field, or ``(reason, message)``."""
    got = parse_batch(values, now_ms=NOW)
    assert len(got.table) + len(got.rejects) == len(values)
    out: list = [None] * len(values)
    table = got.table.set_column(got.table.schema.get_field_index("ts"), "ts", got.table["ts"].cast(pa.int64()))
    for i, row in zip(got.index.tolist(), table.to_pylist()):
        out[i] = {**DEFAULTS, **row}
    for i, err in got.rejects:
        assert isinstance(err, EventError)
        out[i] = (err.reason, err.message)
    return out


def interleaved(bad: list[bytes | None]) -> list[bytes | None]:
    """Each bad record between two good ones (so the good neighbours must survive the bisection)."""
    out = []
    for j, raw in enumerate(bad):
        out += [orjson.dumps(new_event("view", f"g{j}", "i1", "s1", ts=NOW)), raw]
    return out + [orjson.dumps(new_event("click", "last", "i2", "s1", ts=NOW))]


def test_a_clean_batch_is_accepted_whole_in_order():
    evs = _simulated(3000, start_ms=NOW - 60_000, rate_eps=100)
    raws = [orjson.dumps(e) for e in evs]
    got = parse_batch(raws, now_ms=NOW)
    assert got.rejects == [] and got.index.tolist() == list(range(len(raws)))
    assert decisions(raws) == [slow(r) for r in raws]


def test_the_hostile_corpus_gets_the_same_decisions_and_reasons_inside_a_batch():
    records = interleaved([value for _, value, _ in corpus("columnar")])
    assert decisions(records) == [slow(r) for r in records]


def alone(raw: bytes | None) -> dict | tuple[str, str]:
    """The decision for one record read by Arrow between two good ones: a read that fails sends its whole
    chunk record by record, so a hostile record mixed into a big batch would not test the column rules."""
    good = orjson.dumps(new_event("view", "g", "i1", "s1", ts=NOW))
    return decisions([good, raw, good])[1]


def test_every_field_set_to_hostile_values_gets_the_same_decision():
    records = mutations()
    assert len(records) > 1800
    disagree = [(raw[:200], got, want) for raw in records if (got := alone(raw)) != (want := slow(raw))]
    assert not disagree, disagree[:3]
    # and mixed into one batch, for the chunked re-reads
    mixed = interleaved(records[:400])
    assert decisions(mixed) == [slow(r) for r in mixed]


def test_the_hostile_corpus_gets_the_same_decisions_alone():
    for raw in [value for _, value, _ in corpus("alone")]:
        assert alone(raw) == slow(raw), raw[:200] if raw else raw


def test_an_explicit_null_schema_version_is_rejected_as_the_model_does():
    ev = new_event("view", "u1", "i1", "s1", ts=NOW)
    assert isinstance(slow(orjson.dumps({**ev, "schema_version": None})), tuple)
    assert alone(orjson.dumps({**ev, "schema_version": None})) == slow(orjson.dumps({**ev, "schema_version": None}))
    without = {k: v for k, v in ev.items() if k != "schema_version"}
    assert alone(orjson.dumps(without))["schema_version"] == 1  # absent means the default


def test_records_arrow_would_misread_are_decided_one_by_one():
    good = orjson.dumps(new_event("view", "u1", "i1", "s1", ts=NOW))
    tricky = [good + b" " + good, good + b"\n" + good, good + b"\n", good + b"\r\n  ", b"{\n" + good[1:], good.replace(b",", b",\r", 1), b"   ", b"", None, b"null",
              b"{}", good[:-1] + b',"ts":5}', good[:-1] + b',"price":NaN}', b"\xef\xbb\xbf" + good,
              good[:-1] + b',"model_version":"v\xc3\xa9"}', good[:-1] + b',"items":["a",null]}']
    records = interleaved(tricky)
    assert decisions(records) == [slow(r) for r in records]
    assert isinstance(decisions([tricky[-2]])[0], dict)  # a non-ASCII model_version is valid, as for the model


def test_the_arrow_path_decides_a_clean_batch_without_the_record_path(monkeypatch):
    evs = _simulated(1500, start_ms=NOW - 60_000, rate_eps=100)
    raws = [orjson.dumps(e) for e in evs]

    def boom(*a, **kw):
        raise AssertionError("a clean batch went record by record")

    monkeypatch.setattr(eventbatch, "parse_events", boom)
    assert parse_batch(raws, now_ms=NOW).table.num_rows == len(raws)


def test_a_missing_item_and_a_ts_in_seconds_get_the_record_path_s_reason_and_message():
    view = new_event("view", "u1", "i1", "s1", ts=NOW)
    no_item = {k: v for k, v in view.items() if k != "item_id"}
    values = interleaved([orjson.dumps(no_item), orjson.dumps({**view, "item_id": None}),
                          orjson.dumps(new_event("impression", "u1", None, "s1", ts=NOW)),
                          orjson.dumps({**view, "ts": NOW // 1000})])
    got = decisions(values)
    assert got == [slow(v) for v in values]
    rejected = [d for d in got if isinstance(d, tuple)]
    assert [r for r, _ in rejected] == ["missing_field", "missing_field", "missing_field", "ts_too_old"]
    assert rejected[0][1] == "'item_id' is required for a 'view' event"
    assert f"it looks like epoch seconds: send {NOW // 1000 * 1000}" in rejected[3][1]
