"""The catalog feed: product upserts on the catalog topic → the catalog Parquet file.

The shop (or ``shoprec catalog publish``, or the simulator when a product appears) sends one
record per change to ``settings.kafka_topic_catalog`` (``shop.catalog``), keyed by ``item_id``:

* a whole product (every required field of :class:`~pipelines.schemas.CatalogItem`) adds or
  replaces it (``in_stock`` defaults to true);
* a partial record for a known product changes only the fields it names, e.g.
  ``{"item_id": "i00042", "in_stock": false}`` when it sells out;
* a tombstone (a record with no value, keyed by the item id) marks the product out of stock: it
  stays in the catalog, so the models keep its content and history, but it is never shown.

``shoprec catalog sync`` (:class:`CatalogSync`, a service of ``make up``) applies them to
``settings.catalog_path``, the file that training reads for item content, Great Expectations
checks events against (unknown products) and serving re-reads for its rules (stock, categories)
and the new-product exploration slots. Per poll, in offset order: validate, merge, write the
whole file durably (temporary name, fsync, rename) under the file's writer lock, then commit the
offsets. A crash replays the uncommitted records onto the file they were already applied to,
which applies the same changes again. Invalid records go to the DLQ topic with the original bytes and a
``reason`` header, like rejected events, and never stop the feed. With an
:class:`~pipelines.state.OnlineState` the feed counts its rejects with the events' (reasons
prefixed ``catalog_``) and reports what the catalog holds (the dashboard's *Overview* shows both).

The topic has one partition, so one sync process writes the file at a time; a second one
waits in the consumer group as a stand-by.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson
import pandas as pd

from pipelines import kafka_io, lake
from pipelines.columns import COL_ITEM
from pipelines.schemas import (SCHEMA_VERSION, CatalogItem, EventError, check_record_size, decode_json_record,
                               validate_catalog_update)
from pipelines.settings import Settings

log = logging.getLogger("shoprec.catalog")

#: largest catalog record accepted (a product is a few hundred bytes)
MAX_ITEM_BYTES = 16_384


def item_record(item: dict) -> bytes:
    """One catalog record's value: the item (whole or partial) as JSON with ``schema_version``."""
    return orjson.dumps({**item, "schema_version": SCHEMA_VERSION}, option=orjson.OPT_SERIALIZE_NUMPY)


def publish_items(producer, items: Iterable[dict], topic: str) -> list:
    """Send catalog upserts (dicts with at least ``item_id``) keyed by item id; returns the send futures."""
    return [producer.send(topic, key=str(it[COL_ITEM]), value=item_record(it)) for it in items]


#: what a new (or wholly replaced) product must name
REQUIRED_FIELDS = tuple(name for name, f in CatalogItem.model_fields.items() if f.is_required())


def parse_update(raw: bytes | None, key: bytes | None, rows: Mapping[str, dict], *,
                 max_bytes: int = MAX_ITEM_BYTES) -> dict:
    """The catalog row that a record makes, given the catalog's ``rows`` now (``{item_id: row}``).

    The record alone is checked first (:class:`~pipelines.schemas.CatalogUpdate`: the catalog's
    types and limits, no unknown field; a null means "not given"). With every required field it is
    a whole product and replaces the row (``in_stock`` defaults to true); otherwise it changes only
    the fields it names of a product the catalog has.

    Raises:
        EventError: with a reason (``empty``, ``oversized``, ``undecodable``, ``invalid_json``,
            ``schema``, ``missing_field``, ``unknown_field``, ``key_mismatch``, ``unknown_item``) and a message.
    """
    if raw is None:  # a tombstone: the product is withdrawn
        current = rows.get(key.decode("utf-8", "replace")) if key else None
        if current is None:
            name = key.decode("utf-8", "replace")[:128] if key else "(no key)"
            raise EventError("unknown_item", f"tombstone for {name!r}, which is not in the catalog")
        return {**current, "in_stock": False}
    check_record_size(raw, max_bytes, "product")
    update = validate_catalog_update(decode_json_record(raw))
    if key is not None and key != update.item_id.encode():
        raise EventError("key_mismatch", "the record's key must be its item_id")
    given = update.model_dump(exclude_none=True, exclude={"schema_version"})
    current = rows.get(update.item_id)
    if all(f in given for f in REQUIRED_FIELDS):
        return {**(current or {}), **CatalogItem.model_validate(given).model_dump()}
    if current is None:
        lacking = ", ".join(f"'{f}'" for f in REQUIRED_FIELDS if f not in given)
        raise EventError("missing_field", f"{lacking} required for a new product (a partial update needs a "
                                          "product already in the catalog)")
    return {**current, **given}


def read_catalog(path: Path) -> dict[str, dict]:
    """The catalog file as ``{item_id: row}`` (every column; empty when there is none)."""
    df = lake.read_catalog(path)
    return {} if df is None else {str(r[COL_ITEM]): r for r in df.to_dict("records")}


def write_catalog(rows: dict[str, dict], path: Path) -> None:
    """Write ``{item_id: row}`` as the catalog file (:func:`pipelines.lake.write_catalog`)."""
    lake.write_catalog(pd.DataFrame(list(rows.values())), path)


def read_product_file(path: Path) -> list:
    """Product records from a ``.jsonl`` (one JSON object a line), ``.csv`` (a header; an empty cell is
    "not given"; cells are converted by the field's type, :func:`_typed_csv_rows`, and text fields stay text,
    so ids keep their leading zeros) or ``.parquet`` file (timestamps become epoch ms).

    Raises:
        ValueError: for another suffix, a line that is not JSON or a CSV cell that is not of its field's type.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError as err:
                    raise ValueError(f"{path.name} line {n} is not JSON ({err})") from None
        return out
    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return _typed_csv_rows(path.name, df.to_dict("records"))
    if path.suffix == ".parquet":
        try:
            df = lake.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's message names a "<Buffer>", not the file
            raise ValueError(f"{path.name} is not a readable Parquet file ({err})") from None
        if "created_at" in df:
            df["created_at"] = lake.epoch_ms(df["created_at"]).astype("Int64")
        return [{k: v for k, v in row.items() if v is not None and v is not pd.NA and v == v}
                for row in df.astype(object).to_dict("records")]
    raise ValueError(f"{path.name}: use a .jsonl, .csv or .parquet file")


#: how CSV cells become the JSON types the catalog's records are checked with (strictly: ``"price": "12"`` is
#: refused over HTTP); a column that is no field stays text and is refused as ``unknown_field`` afterwards
_CSV_TYPES = {**{name: f.annotation for name, f in CatalogItem.model_fields.items()}, "schema_version": int}


def _csv_cell(cell: str, kind: type) -> object:
    """One CSV cell as ``kind``; ValueError when it is not one. Booleans are only ``true``/``false`` (any case):
    "yes", "no", 1 or 0 are not guessed."""
    if kind is bool:
        if cell.strip().lower() not in ("true", "false"):
            raise ValueError("true or false")
        return cell.strip().lower() == "true"
    if kind is int:
        return int(cell.strip())
    if kind is float:
        return float(cell.strip())
    return cell


def _typed_csv_rows(name: str, rows: list[dict]) -> list[dict]:
    """CSV rows (text cells) with each non-empty cell converted to its field's type (:data:`_CSV_TYPES`).

    Raises:
        ValueError: naming the row (counted from 1, the header not counted) and column of every cell that does not
            convert (up to five), so the whole file can be fixed at once.
    """
    wanted = {float: "a number (e.g. 19.9)", int: "an integer (UTC epoch milliseconds)", bool: "true or false"}
    out, bad = [], []
    for n, row in enumerate(rows, 1):
        typed = {}
        for col, cell in row.items():
            if cell == "":
                continue
            kind = _CSV_TYPES.get(col, str)
            try:
                typed[col] = _csv_cell(cell, kind)
            except ValueError:
                bad.append(f"row {n}, column {col!r}: {cell[:40]!r} is not {wanted[kind]}")
        out.append(typed)
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{name}: " + "; ".join(bad[:5]) + more)
    return out


def unknown_products(records: list[dict], path: Path) -> list[str]:
    """Item ids of ``records`` that change a product neither in the catalog file at ``path`` nor whole among the
    records (what ``POST /catalog`` names as ``unknown_products``): the feed rejects such a change
    (``missing_field``) unless the whole product reaches it first."""
    whole = {r[COL_ITEM] for r in records if all(f in r for f in REQUIRED_FIELDS)}
    partial = [r[COL_ITEM] for r in records if r[COL_ITEM] not in whole]
    if not partial:
        return []
    known = set(lake.read_parquet(path, columns=[COL_ITEM])[COL_ITEM].astype(str)) if Path(path).exists() else set()
    return [i for i in dict.fromkeys(partial) if i not in known]


class CatalogSync:
    """Applies ``shop.catalog`` to the catalog file (see the module docstring)."""

    def __init__(self, settings: Settings, *, path: Path | None = None, group: str | None = None,
                 consumer=None, producer=None, state=None):
        self.settings = settings
        self.state = state
        self.path = Path(path or settings.catalog_path)
        self.topic = settings.kafka_topic_catalog
        self.consumer = consumer or kafka_io.make_consumer(
            settings, [self.topic], group=group or f"{settings.consumer_group}-catalog", max_poll_records=5_000)
        self.producer = producer or kafka_io.make_producer(settings)
        self.rows: dict[str, dict] = {}
        self._stamp: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file as last read or written
        self.counts: Counter = Counter()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        """Re-read the file when something else wrote it (a backfill, the simulator making the catalog)."""
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self.rows = read_catalog(self.path)
            self._stamp = stamp

    def apply(self, records: list) -> tuple[int, Counter]:
        """Merge ``records`` (Kafka records: ``.key``, ``.value``) into ``self.rows`` in order; rejects go
        to the DLQ. Returns ``(rows changed, rejects per reason)``; the file is not written here."""
        changed, rejected, dlq = 0, Counter(), []
        for rec in records:
            try:
                row = parse_update(rec.value, rec.key, self.rows)
            except EventError as err:
                rejected[err.reason] += 1
                dlq.append(kafka_io.send_dlq(self.producer, rec.value, err.reason, err.message, key=rec.key,
                                             headers=list(rec.headers or ()), topic=self.settings.kafka_topic_dlq,
                                             source_topic=self.topic))
                log.warning("catalog record rejected (%s): %s", err.reason, err.message)
                continue
            if self.rows.get(row[COL_ITEM]) != row:
                self.rows[row[COL_ITEM]] = row
                changed += 1
        for f in dlq:  # quarantined before the offsets move past them
            f.get(timeout=30)
        return changed, rejected

    def step(self, timeout_ms: int = 1000) -> int:
        """One poll: apply, write the file when anything changed, commit. Returns the records handled."""
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        records = [r for part in sorted(polled, key=lambda tp: tp.partition) for r in polled[part]]
        if not records:
            return 0
        with lake.catalog_lock(self.path):  # no other writer between reading the file and replacing it
            self._refresh()
            changed, rejected = self.apply(records)
            if changed:
                write_catalog(self.rows, self.path)
                self._stamp = self._file_stamp()
        self.consumer.commit()
        self.counts.update(records=len(records), changed=changed, rejected=sum(rejected.values()))
        self._report(changed, rejected)
        log.info("catalog: %d records, %d products changed, %d rejected%s; %d products in %s", len(records), changed,
                 sum(rejected.values()), f" {dict(rejected)}" if rejected else "", len(self.rows), self.path)
        return len(records)

    def _report(self, changed: int, rejected: Counter) -> None:
        """Rejects and what the catalog holds, to Redis for the dashboard (never fails the feed)."""
        if self.state is None:
            return
        try:
            self.state.count_dlq({f"catalog_{reason}": n for reason, n in rejected.items()})
            status = {"products": len(self.rows), "out_of_stock": sum(not r["in_stock"] for r in self.rows.values()),
                      "records": self.counts["records"], "rejected": self.counts["rejected"]}
            if changed:
                status["updated_ms"] = int(time.time() * 1000)
            self.state.set_catalog_status(**status)
        except Exception as err:  # noqa: BLE001 - Redis down: the file is what matters
            log.warning("could not report the catalog status to Redis (%s)", err)

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> Counter:
        """Apply the topic until ``stop`` is set (or nothing arrived for ``idle_exit_s``)."""
        last = time.monotonic()
        try:
            while not stop.is_set():
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            self.close()
        return self.counts

    def close(self) -> None:
        self.consumer.close()
        self.producer.close()
