"""Columnar validation of one poll batch: Kafka record values → an Arrow table of the valid events.

The stream consumer's hot path. :func:`pipelines.schemas.parse_events` decides record by record in
Python (about 3 µs each, holding the interpreter lock the Kafka client needs for its own decoding);
:func:`parse_batch` makes the same decisions for a whole batch in Arrow's C++ code:

1. the values that start with ``{`` and fit the size limit are joined into one newline-delimited
   buffer (anything else is decided by :func:`~pipelines.schemas.parse_events`, record by record);
2. Arrow's JSON reader parses it against the lake schema (in C++, without the interpreter lock); an
   unknown field, a duplicate key, a type that does not convert, a syntax error, or a count of rows
   that differs from the count of values (a value holding two objects) makes the read fail, and the
   batch is read again in chunks, split until the records to blame are isolated in chunks of 64,
   which go to the record-by-record path;
3. the rules of :class:`pipelines.schemas.Event` are checked on whole columns (the id patterns with
   RE2, the event types, the ts window, ranges, lengths, impressions need items, other events an
   item, purchases a price). A row that fails any of them is handed to the record-by-record path,
   which names the reason (or, where a column check is stricter than the model, such as a non-ASCII
   model_version, accepts it).

So the accept/reject decision and the reason of every record are exactly those of
:func:`~pipelines.schemas.parse_events` (the tests compare both on a corpus of hostile records), and
the valid rows arrive as a lake table without a Python object per event.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.json as pj

from pipelines.lake import LAKE_SCHEMA, rows_table
from pipelines.schemas import EVENT_TYPES, PRICE_MAX, PRICE_MIN, EventError, parse_events

#: the lake schema as JSON is read: ts as epoch milliseconds, cast to the lake's timestamp afterwards
_JSON_SCHEMA = LAKE_SCHEMA.set(LAKE_SCHEMA.get_field_index("ts"), pa.field("ts", pa.int64()))
_PARSE = pj.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="error")
#: RE2 patterns of :class:`~pipelines.schemas.Event` (RE2's ``$`` is the end of the text, as in pydantic's regex)
_ID_RE = r"^[A-Za-z0-9_.:@-]{1,128}$"
_EVENT_ID_RE = r"^[0-9a-fA-F-]{32,36}$"
_ITEMS_RE = r"^[A-Za-z0-9_.:@-]{1,128}(\n[A-Za-z0-9_.:@-]{1,128})*$"
_EVENT_TYPES = pa.array(EVENT_TYPES)
#: a batch is read whole; if that fails, in reads of ``_CHUNK`` records, and a read that fails is split
#: in ``_FANOUT`` until it is at most ``_MIN_CHUNK`` records, which are then decided record by record (a
#: rare bad record costs about three reads of its chunk and ``_MIN_CHUNK`` records of the slow path)
_CHUNK, _FANOUT, _MIN_CHUNK = 4096, 8, 64
#: smaller batches are decided record by record: Arrow's fixed cost per batch (a few milliseconds) is
#: more than it saves below about a thousand records, and a trickle of events must stay fresh
_COLUMNAR_MIN = 1000


@dataclass
class ParsedBatch:
    """The outcome of :func:`parse_batch`.

    Attributes:
        table: the valid events in input order, in :data:`pipelines.lake.LAKE_SCHEMA`.
        index: for each row of ``table``, the position of its record in the input.
        rejects: ``(position, error)`` of every rejected record, in input order.
    """

    table: pa.Table
    index: np.ndarray
    rejects: list[tuple[int, EventError]] = field(default_factory=list)


def parse_batch(values: Sequence[bytes | None] | pa.BinaryArray, *, max_bytes: int = 16_384, now_ms: int | None = None,
                max_age_days: int = 30, max_future_s: int = 300) -> ParsedBatch:
    """Validate a batch of record values the way :func:`~pipelines.schemas.parse_events` does, column-wise.

    Args:
        values: the Kafka record values, in offset order (a list, or an Arrow binary array).
        max_bytes, now_ms, max_age_days, max_future_s: as for :func:`~pipelines.schemas.parse_event`.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    limits = dict(max_bytes=max_bytes, now_ms=now_ms, max_age_days=max_age_days, max_future_s=max_future_s)
    array = values if isinstance(values, pa.Array) else pa.array(values, pa.binary())
    if len(array) < _COLUMNAR_MIN:
        columnar, by_record = np.empty(0, dtype=np.int64), list(range(len(array)))
    else:
        columnar, by_record = _split_by_shape(array, max_bytes)
    tables: list[tuple[np.ndarray, pa.Table]] = []
    _read(array, columnar, tables, by_record, max_bytes)
    parts: list[pa.Table] = []
    index: list[np.ndarray] = []
    if tables:  # checked as one table: each column check has a fixed cost per call
        # one chunk per column: RE2 compiles each pattern once per chunk
        read = (pa.concat_tables([t for _, t in tables]) if len(tables) > 1 else tables[0][1]).combine_chunks()
        idx = np.concatenate([i for i, _ in tables])
        ok = _valid_rows(read, now_ms - max_age_days * 86_400_000, now_ms + max_future_s * 1000)
        if not ok.all():
            read, by_record = read.filter(pa.array(ok)), by_record + idx[~ok].tolist()
            idx = idx[ok]
        parts.append(_to_lake(read))
        index.append(idx)
    rejects: list[tuple[int, EventError]] = []
    if by_record:
        by_record.sort()
        rows, kept = [], []
        for i, got in zip(by_record, parse_events(array.take(pa.array(by_record)).to_pylist(), **limits)):
            if isinstance(got, EventError):
                rejects.append((i, got))
            else:
                rows.append(got)
                kept.append(i)
        if rows:
            parts.append(rows_table(rows))
            index.append(np.asarray(kept, dtype=np.int64))
    if not parts:
        return ParsedBatch(LAKE_SCHEMA.empty_table(), np.empty(0, dtype=np.int64), rejects)
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    order = np.concatenate(index) if len(index) > 1 else np.asarray(index[0], dtype=np.int64)
    if len(parts) > 1:
        sort = np.argsort(order, kind="stable")
        table, order = table.take(pa.array(sort)), order[sort]
    return ParsedBatch(table, order, rejects)


def _split_by_shape(values: pa.BinaryArray, max_bytes: int) -> tuple[np.ndarray, list[int]]:
    """Positions Arrow may read (within the size limit, starting with ``{``) and the others.

    A value that starts with ``{`` yields at least one row (or a read error): its first line is not
    blank. Lines a value adds after an embedded newline yield rows too, or none when blank; so a count
    of rows equal to the count of values proves each value gave exactly one row, in order.
    """
    fits = pc.and_kleene(pc.starts_with(values, "{"), pc.less_equal(pc.binary_length(values), max_bytes))
    ok = pc.fill_null(fits, False).to_numpy(zero_copy_only=False)
    return np.flatnonzero(ok), np.flatnonzero(~ok).tolist()


def _joined(values: pa.BinaryArray) -> pa.Buffer:
    """The values as one newline-delimited buffer (joined in Arrow)."""
    rows = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
    return pc.binary_join(rows, b"\n")[0].as_buffer()


def _read(values: pa.BinaryArray, positions: np.ndarray, out: list[tuple[np.ndarray, pa.Table]],
          by_record: list[int], max_bytes: int) -> None:
    """Parse ``values[positions]`` with Arrow; on failure split until small chunks go record by record."""
    if not len(positions):
        return
    block = max(1 << 20, max_bytes + 2)  # a line must fit in one block
    stack = [positions]  # the whole batch in one read first: each read is a trip through the interpreter lock
    while stack:
        chunk = stack.pop()
        part = values if len(chunk) == len(values) else values.take(pa.array(chunk))
        try:
            t = pj.read_json(pa.BufferReader(_joined(part)), parse_options=_PARSE,
                             read_options=pj.ReadOptions(use_threads=False, block_size=block))
            if t.num_rows == len(chunk):  # one row per line: no line held two objects
                out.append((chunk, t))
                continue
        except Exception:  # noqa: BLE001 - Arrow raises ArrowInvalid, and UnicodeDecodeError for bad bytes
            pass
        if len(chunk) <= _MIN_CHUNK:
            by_record.extend(chunk.tolist())
        else:
            step = _CHUNK if len(chunk) > _CHUNK else -(-len(chunk) // _FANOUT)
            stack += [chunk[i:i + step] for i in range(0, len(chunk), step)][::-1]


def _valid_rows(t: pa.Table, oldest_ms: int, newest_ms: int) -> np.ndarray:
    """Per row: certainly a valid :class:`~pipelines.schemas.Event` (a strict subset of the model's rules).

    The rules are one Arrow expression, evaluated in one call: few trips through the interpreter lock,
    which the poll thread holds most of the time.
    """
    ok = pc.Expression._call("coalesce", [_valid_expression(oldest_ms, newest_ms), pc.scalar(False)])
    return ds.dataset(t).to_table(columns={"ok": ok}, use_threads=False)["ok"].to_numpy()


def _valid_expression(oldest_ms: int, newest_ms: int) -> pc.Expression:
    f = pc.field
    etype, ts, item, items = f("event_type"), f("ts"), f("item_id"), f("items")
    impression = etype == "impression"
    n_items = pc.list_value_length(items)

    def matches(col, pattern=_ID_RE):
        return pc.match_substring_regex(col, pattern=pattern)

    def null_or(col, check):
        return col.is_null() | check

    # every listed item an id: joined by newlines (which no id holds), the text is ids and newlines,
    # and there is one newline fewer than items (an item holding a newline would add one)
    listed = pc.binary_join(items, "\n")
    items_ok = ((n_items == 0) | (matches(listed, _ITEMS_RE)
                                  & (pc.count_substring(listed, pattern="\n") == pc.subtract(n_items, 1))))
    return (matches(f("event_id"), _EVENT_ID_RE)
            & pc.is_in(etype, value_set=_EVENT_TYPES)
            & matches(f("user_id")) & matches(f("session_id"))
            & (ts >= max(oldest_ms, 0)) & (ts <= newest_ms)
            # an item for every event but impressions, which need their non-empty list of items
            & pc.if_else(item.is_null(), impression, matches(item))
            & null_or(f("request_id"), matches(f("request_id")))
            & null_or(f("variant"), matches(f("variant")))
            & null_or(f("experiment"), matches(f("experiment")))
            # Arrow reads an explicit null as an absent field, but the model takes only absence for 1:
            # rows without schema_version go record by record (producers that use new_event send it)
            & (f("schema_version") == 1)
            & null_or(f("price"), (f("price") >= PRICE_MIN) & (f("price") <= PRICE_MAX))
            & ((etype != "purchase") | f("price").is_valid())  # a purchase needs its price
            & null_or(f("quantity"), (f("quantity") >= 1) & (f("quantity") <= 1000))
            & null_or(f("model_version"), pc.string_is_ascii(f("model_version"))
                      & (pc.utf8_length(f("model_version")) <= 64))
            & null_or(items, (n_items <= 200) & items_ok)
            & (~impression | (n_items > 0)))


def _to_lake(t: pa.Table) -> pa.Table:
    """The parsed columns as the lake's: ts as a timestamp, an absent schema_version as 1."""
    version = t["schema_version"]
    if version.null_count:
        t = t.set_column(t.schema.get_field_index("schema_version"), "schema_version", pc.fill_null(version, 1))
    return t.cast(LAKE_SCHEMA)
