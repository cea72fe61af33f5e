"""Great Expectations 1.x validation of event partitions (pipelines/validation.py)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import lake, schemas, validation
from pipelines.schemas import COL_EVENT_ID, COL_EVENT_TYPE, COL_ITEM, COL_TS, COL_USER, EVENT_TYPES

HOUR = datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
HOUR_MS = int(HOUR.timestamp() * 1000)


def partition(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """A clean hourly partition with the lake's column dtypes."""
    rng = np.random.default_rng(seed)
    types = rng.choice(list(EVENT_TYPES), n)
    ms = HOUR_MS + rng.integers(0, 3_600_000, n)
    purchase = types == "purchase"
    impression = types == "impression"
    df = pd.DataFrame({
        "event_id": [str(uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | i)) for i in range(n)],
        "event_type": types,
        "user_id": [f"u{i % 37}" for i in range(n)],
        "item_id": [None if imp else f"item-{i % 91}" for i, imp in enumerate(impression)],
        "session_id": [f"s-{i % 53}" for i in range(n)],
        "ts": pd.to_datetime(ms, unit="ms", utc=True).astype("datetime64[ms, UTC]"),
        "price": np.where(purchase, rng.uniform(1, 500, n).round(2), np.nan),
        "quantity": pd.array([1 if p else None for p in purchase], dtype="Int32"),
        "request_id": [f"r{i}" if imp else None for i, imp in enumerate(impression)],
        "variant": [("a" if i % 2 else "b") if imp else None for i, imp in enumerate(impression)],
        "model_version": [None] * n,
        "experiment": [("x@a.1:b.2" if i % 3 else None) if imp else None for i, imp in enumerate(impression)],
        "items": [["item-1", "item-2"] if imp else None for imp in impression],
        "schema_version": np.full(n, 1, dtype="int16"),
    })
    assert tuple(df.columns) == schemas.LAKE_COLUMNS
    return df


def failing(report: validation.ValidationReport) -> dict[tuple[str, str | None], dict]:
    return {(f["expectation_type"], f["column"]): f for f in report.failed}


# --- the suite file ---------------------------------------------------------------
def test_suite_is_loaded_from_versioned_json():
    raw = json.loads(validation.SUITE_PATH.read_text())
    suite = validation.load_suite()
    assert suite.name == raw["name"] == "shoprec_events"
    assert suite.meta["version"] == raw["meta"]["version"]
    assert len(suite.expectations) == len(raw["expectations"])
    window = validation.load_suite(validation.WINDOW_SUITE_PATH)
    assert window.name == "shoprec_events_window"


def test_suite_agrees_with_the_event_schema():
    raw = json.loads(validation.SUITE_PATH.read_text())
    by_key = {(e["type"], e["kwargs"].get("column")): e["kwargs"] for e in raw["expectations"]}
    # values owned by pipelines.schemas are parameters, not copies
    assert by_key[("expect_column_values_to_be_in_set", COL_EVENT_TYPE)]["value_set"] == {"$PARAMETER": "event_types"}
    assert validation.suite_parameters()["event_types"] == list(EVENT_TYPES)
    assert validation.suite_parameters()["lake_columns"] == list(schemas.LAKE_COLUMNS)
    id_pattern = next(m.pattern for m in schemas.Id.__metadata__ if getattr(m, "pattern", None))
    assert by_key[("expect_column_values_to_match_regex", COL_USER)]["regex"] == id_pattern
    assert by_key[("expect_column_values_to_be_unique", COL_EVENT_ID)]["mostly"] >= 0.95


def test_a_broken_suite_file_is_refused(tmp_path):
    raw = json.loads(validation.SUITE_PATH.read_text())
    bad = dict(raw, expectations=[{"type": "expect_column_values_to_be_frobnicated", "kwargs": {"column": COL_USER}}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="expectation 0"):
        validation.load_suite(tmp_path / "bad.json")
    unknown = dict(raw, expectations=[{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "userid"}}])
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    with pytest.raises(ValueError, match="not a lake column"):
        validation.load_suite(tmp_path / "unknown.json")
    (tmp_path / "unversioned.json").write_text(json.dumps(dict(raw, meta={})))
    with pytest.raises(ValueError, match="meta.version"):
        validation.load_suite(tmp_path / "unversioned.json")


# --- validation --------------------------------------------------------------------
def test_clean_partition_passes():
    df = partition()
    report = validation.validate_events(df, hour_start=HOUR)
    assert report.success, report.summary()
    assert report.failed == []
    assert report.evaluated == 16
    assert report.statistics["rows"] == len(df)
    assert report.statistics["suites"] == {"shoprec_events": 3, "shoprec_events_window": 1}
    assert report.summary().startswith("PASSED")


def test_clean_partition_from_the_lake_passes(tmp_path):
    events = [schemas.new_event(t, f"user{i % 5}", None if t == "impression" else f"sku:{i}", f"sess{i % 7}",
                                ts=HOUR_MS + i * 1000, items=["sku:1"] if t == "impression" else None,
                                price=19.5 if t == "purchase" else None)
              for i, t in enumerate(EVENT_TYPES * 20)]
    lake.write_events(tmp_path, events)
    key = lake.partition_key(HOUR_MS)
    start, end = validation.hour_window(key)
    assert start == HOUR
    report = validation.validate_events(lake.read_partition(tmp_path, key), hour_start=start, hour_end=end)
    assert report.success, report.summary()


def test_planted_faults_fail_and_are_named_with_samples():
    df = partition()
    n = len(df)
    df.loc[df.index[df[COL_ITEM].notna()][:10], COL_EVENT_TYPE] = "signup"
    df.loc[10:14, COL_TS] = pd.Timestamp(HOUR) + pd.Timedelta(hours=3)  # in the future of this hour
    dup = int(n * 0.15)  # 15% of rows copy the id of another 15%: 30% of rows share an id
    df.loc[20:20 + dup - 1, COL_EVENT_ID] = df[COL_EVENT_ID].iloc[n - dup:].to_numpy()
    df.loc[200:207, COL_USER] = None

    report = validation.validate_events(df, hour_start=HOUR)
    assert not report.success
    failed = failing(report)
    assert set(failed) == {
        ("expect_column_values_to_be_in_set", COL_EVENT_TYPE),
        ("expect_column_values_to_be_between", COL_TS),
        ("expect_column_values_to_be_unique", COL_EVENT_ID),
        ("expect_column_values_to_not_be_null", COL_USER),
    }, report.summary()

    assert failed[("expect_column_values_to_be_in_set", COL_EVENT_TYPE)]["sample"] == ["signup"]
    assert failed[("expect_column_values_to_be_in_set", COL_EVENT_TYPE)]["unexpected_count"] == 10
    window = failed[("expect_column_values_to_be_between", COL_TS)]
    assert window["suite"] == "shoprec_events_window"
    assert window["unexpected_count"] == 5 and window["sample"] == ["2024-05-01T13:00:00+00:00"]
    dups = failed[("expect_column_values_to_be_unique", COL_EVENT_ID)]
    assert dups["unexpected_count"] == 2 * dup
    assert set(dups["sample"]) <= set(df[COL_EVENT_ID].iloc[n - dup:]) and dups["sample"]
    nulls = failed[("expect_column_values_to_not_be_null", COL_USER)]
    assert nulls["unexpected_count"] == 8 and nulls["sample"] == [None]

    text = report.summary()
    assert text.startswith("FAILED: 12/16")
    assert "expect_column_values_to_be_in_set(event_type): 10 unexpected" in text and "'signup'" in text
    meta = report.to_metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["failed_count"] == 4 and "expect_column_values_to_be_unique(event_id)" in meta["failed_expectations"]


def test_few_duplicates_and_impressions_without_item_are_tolerated():
    df = partition()
    df.loc[0, COL_EVENT_ID] = df.loc[1, COL_EVENT_ID]  # one redelivery: 2 of 400 rows
    assert df[COL_ITEM].isna().any()  # impressions carry no item_id
    report = validation.validate_events(df)
    assert report.success
    # tolerated, but said: training drops the repeat (pipelines.training.load_window)
    assert report.statistics["duplicate_event_ids"] == 1
    assert "1 row(s) repeat an earlier event_id (redelivered): training counts each event once" in report.summary()
    assert "repeat" not in validation.validate_events(partition()).summary()


def test_item_id_price_and_user_format_faults():
    df = partition()
    views = df.index[df[COL_EVENT_TYPE] == "view"][:3]
    df.loc[views, COL_ITEM] = None
    df.loc[df.index[df[COL_EVENT_TYPE] == "purchase"][:2], "price"] = 0.0
    df.loc[5, COL_USER] = "bad user id!"
    failed = failing(validation.validate_events(df))
    assert failed[("expect_column_values_to_not_be_null", COL_ITEM)]["unexpected_count"] == 3
    assert failed[("expect_column_values_to_be_between", "price")]["sample"] == [0.0]
    assert failed[("expect_column_values_to_match_regex", COL_USER)]["sample"] == ["bad user id!"]
    assert len(failed) == 3


def test_window_is_checked_only_when_given_and_naive_means_utc():
    df = partition()
    df.loc[0, COL_TS] = pd.Timestamp(HOUR) - pd.Timedelta(minutes=1)
    assert validation.validate_events(df).success  # no window: the suite alone
    report = validation.validate_events(df, hour_start=HOUR.replace(tzinfo=None))
    assert set(failing(report)) == {("expect_column_values_to_be_between", COL_TS)}
    assert report.statistics["window"] == ["2024-05-01T10:00:00+00:00", "2024-05-01T11:00:00+00:00"]
    with pytest.raises(ValueError, match="hour_end needs hour_start"):
        validation.validate_events(df, hour_end=HOUR)
    with pytest.raises(ValueError, match="not after"):
        validation.validate_events(df, hour_start=HOUR, hour_end=HOUR)


def test_empty_partition_fails_with_a_clear_message():
    empty = partition().iloc[:0]
    report = validation.validate_events(empty)
    assert not report.success
    assert set(failing(report)) == {("expect_table_row_count_to_be_between", None)}
    assert report.failed[0]["observed_value"] == 0
    assert "the partition is empty (0 rows)" in report.summary()

    bare = validation.validate_events(pd.DataFrame())
    assert not bare.success
    assert bare.failed[0]["expectation_type"] == "expect_table_row_count_to_be_between"
    columns = failing(bare)[("expect_table_columns_to_match_set", None)]
    assert sorted(columns["sample"]) == sorted(schemas.LAKE_COLUMNS)
    assert "missing columns: event_id" in bare.summary()
    assert json.dumps(bare.to_metadata())


def test_runtime_is_cached_and_fast():
    validation.validate_events(partition(50))
    runtime = validation._get_runtime()
    t0 = time.perf_counter()
    report = validation.validate_events(partition(2000, seed=1), hour_start=HOUR)
    assert time.perf_counter() - t0 < 3
    assert report.success
    assert validation._get_runtime() is runtime
    assert runtime.context.validation_results_store.list_keys() == []  # results do not pile up


def test_not_a_dataframe():
    with pytest.raises(TypeError, match="DataFrame"):
        validation.validate_events([{"event_id": "x"}])  # type: ignore[arg-type]


# --- the catalog suite --------------------------------------------------------------
def test_the_catalog_suite_passes_a_clean_catalog_and_names_each_fault(tmp_path):
    from pipelines import simulator

    now = int(time.time() * 1000)
    lake.write_catalog(simulator.make_catalog(300, seed=3), tmp_path / "catalog.parquet")
    clean = lake.read_catalog(tmp_path / "catalog.parquet")  # as the catalog asset reads it
    report = validation.validate_catalog(clean, now_ms=now)
    assert report.success, report.summary()

    bad = clean.copy()
    bad.loc[0, "created_at"] = bad.loc[0, "created_at"] // 1000  # epoch seconds
    bad.loc[1, "created_at"] = now + 86_400_000 * 365  # a year ahead
    bad.loc[2, "item_id"] = bad.loc[3, "item_id"]
    bad.loc[4, "price"] = -1.0
    report = validation.validate_catalog(bad, now_ms=now)
    assert not report.success
    failed = failing(report)
    created = failed[("expect_column_values_to_be_between", "created_at")]
    assert created["unexpected_count"] == 2 and "2000-01-01" in created["description"]
    assert failed[("expect_column_values_to_be_unique", "item_id")]["unexpected_count"] == 2
    assert failed[("expect_column_values_to_be_between", "price")]["unexpected_count"] == 1
    assert len(report.failed) == 3
    # the summary (the check's description in Dagster, `shoprec train`'s output) says what to do about it
    summary = validation.validate_catalog(bad, now_ms=now, path=tmp_path / "catalog.parquet").summary()
    assert f"(products {bad.loc[4, 'item_id']})" in summary  # the product with the bad price, to send again
    created_line = next(line for line in summary.splitlines() if "(created_at)" in line)
    assert f"(products {bad.loc[0, 'item_id']}, {bad.loc[1, 'item_id']})" in created_line
    fix = summary.splitlines()[-1]
    assert fix.startswith("  to fix: send these products again") and "POST /catalog" in fix and "catalog publish" in fix
    assert str(tmp_path / "catalog.parquet") in fix and "shoprec train" in fix
    assert "to fix" not in validation.validate_catalog(clean, now_ms=now).summary()
    # five minutes of clock skew are allowed, as on the ingestion path
    skewed = clean.copy()
    skewed.loc[0, "created_at"] = now + 60_000
    assert validation.validate_catalog(skewed, now_ms=now).success


def test_a_price_ingestion_accepts_never_fails_the_suites():
    """The suites take their price bounds from the schema: one purchase the shop was told was accepted (202)
    would otherwise fail its whole hour, which training then leaves out."""
    now = int(time.time() * 1000)
    for price, accepted in ((schemas.PRICE_MIN, True), (schemas.PRICE_MAX, True), (schemas.PRICE_MAX + 1, False),
                            (schemas.PRICE_MIN / 2, False)):
        raw = json.dumps(schemas.new_event("purchase", "u1", "i1", "s1", ts=now, price=price, quantity=1)).encode()
        fast = schemas.parse_events([raw], now_ms=now)[0]
        assert isinstance(fast, dict) is accepted, (price, fast)
        with (pytest.raises(schemas.EventError) if not accepted else _nothing()):
            schemas.parse_event(raw, now_ms=now)
        df = partition(200)
        df.loc[df.index[df[COL_EVENT_TYPE] == "purchase"][:1], "price"] = price
        assert validation.validate_events(df, hour_start=HOUR).success is accepted, price
        catalog = pd.DataFrame([{"item_id": "i1", "title": "t", "category": "c", "brand": "b", "price": price,
                                 "created_at": now, "in_stock": True}])
        assert validation.validate_catalog(catalog, now_ms=now).success is accepted, price


@contextlib.contextmanager
def _nothing():
    yield


def _hours_in_lake(lake_dir, rows_per_hour: dict[int, int], prefix: str = "batch") -> None:
    """Write ``n`` clean view events into each hour ``h`` after HOUR (``prefix``: the files' name prefix)."""
    for h, n in rows_per_hour.items():
        lake.write_events(lake_dir, [schemas.new_event("view", f"user{i % 5}", f"sku:{i}", f"sess{i % 7}",
                                                       ts=HOUR_MS + h * 3_600_000 + i * 1000) for i in range(n)],
                          prefix=prefix)


def test_the_volume_band_is_learned_from_the_stream_not_from_a_backfill(tmp_path):
    """The local stack backfills thin history, then its live shop sends ~30x that rate: the live hours must
    not fail the volume check against the backfill's density (they were left out of training)."""
    _hours_in_lake(tmp_path, {h: 20 for h in range(6)}, prefix=lake.BACKFILL_PREFIX)
    _hours_in_lake(tmp_path, {6: 600, 7: 620, 8: 580, 9: 610, 10: 15})
    reports = {}
    for h in (6, 9, 10):
        key = lake.partition_key(HOUR_MS + h * 3_600_000)
        reports[h], _ = validation.validate_partition(tmp_path, key, now=validation.hour_window(key)[1]
                                                      + pd.Timedelta(minutes=5))
    assert reports[6].success and "volume_band" not in reports[6].statistics  # no stream history yet
    assert reports[9].success and reports[9].statistics["volume_band"] == [150, 2400]  # three stream hours
    assert not reports[10].success and "volume" in reports[10].summary()  # the stream thinned: that is caught


def test_volume_is_judged_once_the_hour_closed_not_while_it_fills(tmp_path):
    _hours_in_lake(tmp_path, {h: 300 for h in range(4)} | {4: 20})  # four steady hours, then a thin fifth
    key = lake.partition_key(HOUR_MS + 4 * 3_600_000)
    qdir = tmp_path / "quality"
    _, end = validation.hour_window(key)
    closed, _ = validation.validate_partition(tmp_path, key, quality_dir=qdir, now=end + pd.Timedelta(minutes=5))
    assert not closed.success and "volume" in closed.summary()  # 20 rows where ~300 are usual: the stream broke
    filling, _ = validation.validate_partition(tmp_path, key, quality_dir=qdir, now=end - pd.Timedelta(minutes=50))
    assert filling.success, filling.summary()  # ten minutes into the hour, 20 rows say nothing yet
    assert "volume_band" not in filling.statistics


def test_training_revalidates_the_hour_still_being_written(tmp_path, monkeypatch):
    _hours_in_lake(tmp_path, {0: 50})
    key = lake.partition_key(HOUR_MS)
    qdir = tmp_path / "quality"
    validation.write_report(validation.ValidationReport(success=False, evaluated=1), key, qdir)  # an old verdict
    monkeypatch.setattr(validation, "hour_is_open", lambda k, now=None: True)  # as if it were the current hour
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([key], [])  # judged on what it holds now
    monkeypatch.undo()
    assert validation.read_report(qdir, key)["success"] is True
    assert validation.hour_is_open(lake.partition_key(int(time.time() * 1000)))
    assert not validation.hour_is_open(key)


def test_a_closed_hour_whose_files_changed_since_its_report_is_validated_again(tmp_path):
    """Late events or a manual import into an hour that passed: its old report no longer vouches for it."""
    _hours_in_lake(tmp_path, {0: 50})
    key = lake.partition_key(HOUR_MS)
    qdir = tmp_path / "quality"
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([key], [])
    first = validation.read_report(qdir, key)
    assert first["success"] and first["files"]
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([key], [])  # unchanged: the report is trusted
    assert validation.read_report(qdir, key)["validated_at"] == first["validated_at"]
    bad = schemas.new_event("purchase", "user1", "sku:1", "sess1", ts=HOUR_MS + 5000, price=10.0, quantity=1)
    lake.write_events(tmp_path, [{**bad, "price": 250_000.0}], prefix="manual-import")  # written around ingestion
    passed, failed = validation.split_by_quality(tmp_path, [key], qdir)
    assert (passed, failed) == ([], [key])  # the stored "passed" used to let training read the import
    again = validation.read_report(qdir, key)
    assert not again["success"] and any(f["column"] == "price" for f in again["failed"])
    assert again["files"] != first["files"]


# --- the lake schema of each file, checked from the footers before the suites ------------------------------------
def _clean_hour(lake_dir, n: int = 40) -> str:
    _hours_in_lake(lake_dir, {0: n})
    return lake.partition_key(HOUR_MS)


def _lake_table(n: int = 30) -> pa.Table:
    return pa.Table.from_pandas(partition(n, seed=7), schema=lake.LAKE_SCHEMA, preserve_index=False)


@pytest.mark.parametrize("fault, column, expected, found", [
    ("price as text", "price", "double", "string"),
    ("ts as epoch ms", "ts", "timestamp[ms, tz=UTC]", "int64"),
    ("no user_id", "user_id", "string", "missing"),
])
def test_a_wrong_typed_file_fails_its_hour_naming_the_file_column_and_types(tmp_path, fault, column, expected, found):
    """A file imported by hand with other column types: the report names it and says what to do, instead of
    value failures of the suites that do not say which file is at fault (or, for integer timestamps, a pass:
    Arrow casts them silently)."""
    key = _clean_hour(tmp_path)
    table = _lake_table()
    i = table.schema.get_field_index(column)
    if found == "missing":
        table = table.remove_column(i)
    elif column == "price":
        table = table.set_column(i, column, pa.array([None if p is None else f"{p:.2f}" for p in
                                                      table[column].to_pylist()], pa.string()))
    else:
        table = table.set_column(i, column, table[column].cast(pa.int64()))
    folder = lake.partition_dir(tmp_path, key)
    pq.write_table(table, folder / "export.parquet")
    rel = "date=2024-05-01/hour=10/export.parquet"
    qdir = tmp_path / "quality"

    assert validation.split_by_quality(tmp_path, [key], qdir) == ([], [key]), fault  # training leaves the hour out
    stored = validation.read_report(qdir, key)
    [misfit] = [f for f in stored["failed"] if f.get("file")]
    assert misfit["file"] == rel and misfit["suite"] == validation.SCHEMA_CHECK
    assert misfit["mismatches"] == [{"column": column, "expected": expected, "found": found}]
    assert misfit["unexpected_count"] == 30  # the rows left out of the suites
    text = validation.describe_report(stored)
    assert f"{rel} does not fit the lake schema: {column} is {found} ({expected} expected)" in text
    assert "Move the file out of the partition folder" in text and "1 of 2 file(s) do not fit" in text
    # the suites ran on the other file, which is clean: the file is the only failure
    assert [f["expectation_type"] for f in stored["failed"]] == [validation.FILE_FITS]
    assert stored["statistics"]["rows"] == 40 and stored["statistics"]["files"]["misfit"] == [rel]
    # the schema of the files that fit and of the one that does not, the events suite's 15 and the window's 1
    # (no volume band: no history here)
    assert stored["evaluated"] == stored["statistics"]["evaluated_expectations"] == 2 + 15 + 1

    (folder / "export.parquet").rename(tmp_path / "export.parquet")  # what the message says to do
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([key], [])
    assert "do not fit" not in validation.describe_report(validation.read_report(qdir, key))


def test_a_partition_of_only_unfit_files_says_so_not_that_it_is_empty(tmp_path):
    key = lake.partition_key(HOUR_MS)
    folder = lake.partition_dir(tmp_path, key)
    folder.mkdir(parents=True)
    table = _lake_table()
    pq.write_table(table.set_column(5, "ts", table["ts"].cast(pa.int64())), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"not parquet at all")  # e.g. a CSV renamed
    report, df = validation.validate_partition(tmp_path, key)
    assert not report.success and df.empty
    text = report.summary()
    assert text.startswith("FAILED: 0/2 expectations met on 0 rows (lake schema of 2 file(s))"), text
    assert "2 of 2 file(s) do not fit the lake schema" in text and "no file was left to run them on" in text
    assert "empty" not in text
    assert "date=2024-05-01/hour=10/b.parquet does not fit the lake schema: not a readable Parquet file" in text
    meta = report.to_metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["failed_expectations"] == [f"{validation.FILE_FITS}(date=2024-05-01/hour=10/a.parquet)",
                                           f"{validation.FILE_FITS}(date=2024-05-01/hour=10/b.parquet)"]


def test_files_the_lake_reader_reads_as_the_lake_schema_fit(tmp_path):
    """What pandas writes (ns timestamps, int64, all-null columns, large strings) and an older file without the
    newer optional columns are read as the lake schema: no false alarm."""
    key = lake.partition_key(HOUR_MS)
    folder = lake.partition_dir(tmp_path, key)
    folder.mkdir(parents=True)
    df = partition(200)
    df["ts"] = df["ts"].astype("datetime64[ns, UTC]")
    df["schema_version"] = df["schema_version"].astype("int64")
    df["model_version"] = None
    df.to_parquet(folder / "pandas.parquet", index=False)
    pq.write_table(_lake_table().drop_columns(["experiment", "items", "schema_version"]), folder / "old.parquet")
    fitting, failures = validation.check_file_schemas(tmp_path, lake.partition_files(tmp_path, key))
    assert failures == [] and len(fitting) == 2
    report, events = validation.validate_partition(tmp_path, key)
    assert report.success, report.summary()
    assert len(events) == 230 and report.statistics["files"] == {"checked": 2, "misfit": [], "rows_left_out": 0}
    # the files' schema is one expectation however many files the hour has (an open hour has thousands)
    # (the events suite's 15, the window's 1 and the schema's 1; 15 + 1 + 2 before, one per file)
    assert report.evaluated == validation.validate_events(events).evaluated + 1 + 1


def test_a_file_whose_values_the_lake_reader_cannot_cast_is_named_too(tmp_path):
    """Timestamps with microseconds fit by type, but the lake's millisecond column cannot hold them: the hour
    passed validation (read as it was) and then training crashed reading it."""
    key = _clean_hour(tmp_path)
    df = partition(20)
    df["ts"] = df["ts"].astype("datetime64[ns, UTC]") + pd.Timedelta(microseconds=7)
    df.to_parquet(lake.partition_dir(tmp_path, key) / "micro.parquet", index=False)
    qdir = tmp_path / "quality"
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([], [key])
    text = validation.describe_report(validation.read_report(qdir, key))
    assert ("date=2024-05-01/hour=10/micro.parquet does not fit the lake schema: not readable as the lake schema "
            "(Casting from timestamp[ns, tz=UTC] to timestamp[ms, tz=UTC] would lose data") in text, text
    assert "their 20 rows were left out of the suites" in text


def test_a_skipped_volume_suite_is_reported_with_why_in_the_summary_the_file_and_the_dagster_metadata(tmp_path):
    """The volume suite needs three hours of stream history: until then the report says so (a walk-through found
    the hourly reports listing three suites and no word of the fourth)."""
    from orchestration.assets import _check_metadata

    _hours_in_lake(tmp_path, {0: 300, 2: 310, 3: 20})  # two stream hours before hour 3, the one before empty
    key = lake.partition_key(HOUR_MS + 3 * 3_600_000)
    qdir = tmp_path / "quality"
    report, df = validation.validate_partition(tmp_path, key, quality_dir=qdir,
                                               now=validation.hour_window(key)[1] + pd.Timedelta(minutes=5))
    why = "needs 3 hours of stream history, has 2 (of the 24 h before this hour)"
    assert report.success and validation.VOLUME_SUITE not in report.statistics["suites"]
    assert report.statistics["skipped_suites"][validation.VOLUME_SUITE] == why
    assert f"\n  volume: skipped — {why}" in report.summary()
    # no catalog was given: that suite says so too
    assert "\n  catalog: skipped — no product catalog" in report.summary()
    # what the events asset's check reports to Dagster, and the report file the dashboard reads
    meta = _check_metadata(report, df)
    assert f"volume: skipped — {why}" in meta["summary"].value
    assert meta["statistics"].data["skipped_suites"][validation.VOLUME_SUITE] == why
    on_disk = validation.read_report(qdir, key)
    assert on_disk["statistics"]["skipped_suites"][validation.VOLUME_SUITE] == why
    assert f"volume: skipped — {why}" in validation.describe_report(on_disk)

    # with a third stream hour the suite runs, and nothing is said to be skipped
    _hours_in_lake(tmp_path, {1: 290})
    ran, _ = validation.validate_partition(tmp_path, key, known_items=[f"sku:{i}" for i in range(400)],
                                           now=validation.hour_window(key)[1] + pd.Timedelta(minutes=5))
    assert validation.VOLUME_SUITE in ran.statistics["suites"] and ran.statistics["skipped_suites"] == {}
    assert "skipped" not in ran.summary()
    # an hour still open: checked by every suite but volume, which says when it will be
    open_, _ = validation.validate_partition(tmp_path, key, known_items=[f"sku:{i}" for i in range(400)],
                                             now=validation.hour_window(key)[1] - pd.Timedelta(minutes=30))
    assert "volume: skipped — the hour is still open" in open_.summary()


def test_an_hour_failed_for_unknown_products_comes_back_once_the_catalog_has_them(tmp_path):
    """A client sent clicks on products the catalog lacked (20 of 100 events): the hour fails, the report says
    what to do, and once the products reach the catalog the next training checks it again and uses it."""
    _hours_in_lake(tmp_path, {0: 100})  # sku:0 .. sku:99
    key = lake.partition_key(HOUR_MS)
    qdir = tmp_path / "quality"
    lacking = [f"sku:{i}" for i in range(80)]
    assert validation.split_by_quality(tmp_path, [key], qdir, known_items=lacking) == ([], [key])
    stored = validation.read_report(qdir, key)
    assert validation.catalog_failed_only(stored)
    summary = validation.describe_report(stored)
    assert "sku:8" in summary and "to fix: send the missing products to the catalog" in summary, summary
    # without a catalog to compare with, the stored verdict stands (nothing new to judge it by)
    assert validation.split_by_quality(tmp_path, [key], qdir) == ([], [key])
    assert validation.split_by_quality(tmp_path, [key], qdir, known_items=lacking) == ([], [key])  # still lacking
    whole = [f"sku:{i}" for i in range(100)]
    assert validation.split_by_quality(tmp_path, [key], qdir, known_items=whole) == ([key], [])
    assert validation.read_report(qdir, key)["success"] is True  # the dashboard shows it passing too
    # an hour that failed for anything else is not re-checked by a catalog change: it would fail again
    bad = schemas.new_event("purchase", "user1", "sku:1", "sess1", ts=HOUR_MS + 5000, price=10.0, quantity=1)
    lake.write_events(tmp_path, [{**bad, "price": 250_000.0}], prefix="manual-import")
    assert validation.split_by_quality(tmp_path, [key], qdir, known_items=lacking) == ([], [key])
    assert not validation.catalog_failed_only(validation.read_report(qdir, key))


def test_suite_names_match_the_suite_files():
    names = {p.stem: json.loads(p.read_text())["name"] for p in validation.SUITE_PATHS}
    assert names == {"events": validation.EVENTS_SUITE, "events_window": validation.WINDOW_SUITE,
                     "events_catalog": validation.EVENTS_CATALOG_SUITE, "events_volume": validation.VOLUME_SUITE,
                     "catalog": validation.CATALOG_SUITE}
    assert validation.suite_label(validation.VOLUME_SUITE) == "volume"
