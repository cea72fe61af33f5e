"""Data quality of lake partitions with Great Expectations 1.x.

The rules live as versioned JSON suites in ``expectations/`` (the source of
truth; this module never builds expectations in code):

* ``events.json`` (suite ``shoprec_events``): columns, keys not null, known
  event types, ``event_id`` unique but for a few redeliveries (at most 1% of rows;
  training keeps one row per ``event_id``, :func:`repeated_events`), id format,
  price range, ``item_id`` for every event but impressions, at least one row.
* ``events_window.json`` (suite ``shoprec_events_window``): every ``ts`` lies in
  the partition's own hour; run only when the hour is given.
* ``events_catalog.json`` (suite ``shoprec_events_catalog``): at most 5% of item
  events name a product missing from the catalog; run when the catalog is known.
* ``events_volume.json`` (suite ``shoprec_events_volume``): the hour's row count
  lies in a band learned from recent hours (:func:`volume_band`); run when there
  is enough history (:data:`VOLUME_MIN_HISTORY` hours the stream wrote), else the
  report says it was skipped and why (``statistics["skipped_suites"]``).
* ``catalog.json`` (suite ``shoprec_catalog``): the product catalog
  (``Settings.catalog_path``), checked by :func:`validate_catalog`.

Before any suite runs on a partition of the lake, :func:`check_file_schemas` compares each
file's Parquet footer with the lake schema (:data:`pipelines.lake.LAKE_SCHEMA`): a file of
the wrong column types (``price`` as text, ``ts`` as integers) or without a required column
fails the partition with its own entry naming the file, the columns and the types, and is
left out of the suites, whose messages about values would not say which file is at fault.

Quality reports on disk (the contract with the dashboard's *Data quality* page):
:func:`write_report` writes one JSON file per validated partition to
``Settings.quality_dir / f"{partition_key}.json"`` (the catalog's key is
``catalog``), an object with exactly these fields::

    partition      str   the hourly partition key "YYYY-MM-DD-HH:00" (or "catalog")
    success        bool  every expectation met
    evaluated      int   number of expectations evaluated
    failed         list  one dict per failed expectation, as ValidationReport.failed (a file that does not fit
                   the lake schema is one entry too, with ``file`` and ``mismatches``)
    statistics     dict  as ValidationReport.statistics (rows, suites and versions, ``duplicate_event_ids``:
                   rows repeating an earlier event_id, which training drops; ``files``: the files
                   checked against the lake schema, those that did not fit and their rows;
                   ``skipped_suites``: suite name -> why that suite did not run on an hourly
                   partition, e.g. the volume suite "needs 3 hours of stream history, has 1 ...";
                   the summary prints it as ``volume: skipped — <why>``)
    dagster_run_id str | null  the Dagster run that validated it
    validated_at   str   ISO 8601 UTC time of the validation
    files          str | null  fingerprint of the partition's files then (names and sizes): training
                   trusts a report only while its partition still has those files

A later validation of the same partition overwrites its file. Training reads these
files to use only partitions that passed (:func:`validate_partition`).

Values owned by :mod:`pipelines.schemas` (``LAKE_COLUMNS``, ``EVENT_TYPES``) are
not copied into the JSON: the suites name them as ``$PARAMETER``s and
:func:`validate_events` supplies them at run time.

The GX run follows the 1.x API: an ephemeral context, a pandas data source, a
dataframe asset, a whole-dataframe batch definition, one ``ValidationDefinition``
per suite and a ``Checkpoint`` run with ``batch_parameters={"dataframe": df}``.
The context and checkpoints are built once per process (importing GX alone takes
seconds) and reused; GX is imported on first use, not when ``pipelines`` is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schemas import (CATALOG_COLUMNS, CATALOG_CREATED_AT_MIN_MS, CATALOG_MAX_FUTURE_S, COL_EVENT_ID,
                              COL_ITEM, EVENT_TYPES, LAKE_COLUMNS, PRICE_MAX, PRICE_MIN, Event)

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

EXPECTATIONS_DIR = Path(__file__).resolve().parent.parent / "expectations"
SUITE_PATH = EXPECTATIONS_DIR / "events.json"
WINDOW_SUITE_PATH = EXPECTATIONS_DIR / "events_window.json"
EVENTS_CATALOG_SUITE_PATH = EXPECTATIONS_DIR / "events_catalog.json"
VOLUME_SUITE_PATH = EXPECTATIONS_DIR / "events_volume.json"
CATALOG_SUITE_PATH = EXPECTATIONS_DIR / "catalog.json"
SUITE_PATHS = (SUITE_PATH, WINDOW_SUITE_PATH, EVENTS_CATALOG_SUITE_PATH, VOLUME_SUITE_PATH, CATALOG_SUITE_PATH)
#: the names of the suites in those files (what reports list under ``statistics["suites"]``)
EVENTS_SUITE, WINDOW_SUITE, EVENTS_CATALOG_SUITE, VOLUME_SUITE, CATALOG_SUITE = (
    "shoprec_events", "shoprec_events_window", "shoprec_events_catalog", "shoprec_events_volume", "shoprec_catalog")
#: the key of the catalog's quality report
CATALOG_KEY = "catalog"

#: how many distinct unexpected values a failure reports
SAMPLE_SIZE = 5

_DATASOURCE = "shoprec_lake"
_ASSET = "events_partition"
_BATCH = "whole_partition"
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}


# --- suites --------------------------------------------------------------------
def load_suite(path: Path | str = SUITE_PATH) -> ExpectationSuite:
    """Build the GX ``ExpectationSuite`` stored as JSON at ``path``.

    Raises:
        ValueError: the file lacks a name or ``meta.version``, names a column that
            is not a lake column, or holds an expectation GX cannot build (GX
            itself would only log and drop it).
    """
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    path = Path(path)
    data = json.loads(path.read_text())
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: the suite needs a 'name'")
    if "version" not in (data.get("meta") or {}):
        raise ValueError(f"{path}: the suite needs 'meta.version'")
    expectations = data.get("expectations") or []
    table = data["meta"].get("table", "events")
    columns = CATALOG_COLUMNS if table == "catalog" else LAKE_COLUMNS
    for i, exp in enumerate(expectations):
        column = (exp.get("kwargs") or {}).get("column")
        if column is not None and column not in columns:
            raise ValueError(f"{path}: expectation {i} ({exp.get('type')}) names column {column!r}, "
                             f"which is not a {'catalog' if table == 'catalog' else 'lake'} column")
        try:
            ExpectationConfiguration(**exp).to_domain_obj()
        except Exception as err:  # GX raises several unrelated types here
            raise ValueError(f"{path}: expectation {i} ({exp.get('type')}) is invalid: {err}") from err
    suite = ExpectationSuite(
        name=name,
        expectations=expectations,
        meta=data.get("meta"),
        notes=data.get("notes"),
    )
    if len(suite.expectations) != len(expectations):  # pragma: no cover - caught above
        raise ValueError(f"{path}: GX built {len(suite.expectations)} of {len(expectations)} expectations")
    return suite


def suite_parameters() -> dict[str, Any]:
    """The ``$PARAMETER`` values that come from :mod:`pipelines.schemas`."""
    return {"lake_columns": list(LAKE_COLUMNS), "event_types": list(EVENT_TYPES),
            "catalog_columns": list(CATALOG_COLUMNS), "price_min": PRICE_MIN, "price_max": PRICE_MAX}


# --- the cached GX runtime -------------------------------------------------------
@dataclass
class _Runtime:
    context: Any
    definitions: dict[Path, Any]  # one ValidationDefinition per suite file
    versions: dict[str, Any]
    checkpoints: dict[tuple[Path, ...], Any] = field(default_factory=dict)

    def checkpoint(self, paths: tuple[Path, ...]) -> Any:
        """The checkpoint running exactly these suites (built once, then reused)."""
        import great_expectations as gx

        if paths not in self.checkpoints:
            name = "shoprec__" + "__".join(p.stem for p in paths)
            self.checkpoints[paths] = self.context.checkpoints.add(gx.Checkpoint(
                name=name, validation_definitions=[self.definitions[p] for p in paths],
                result_format=_RESULT_FORMAT))
        return self.checkpoints[paths]


_runtime: _Runtime | None = None
_lock = threading.RLock()


def _build_runtime() -> _Runtime:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(_DATASOURCE)
        .add_dataframe_asset(_ASSET)
        .add_batch_definition_whole_dataframe(_BATCH)
    )
    definitions = {}
    versions = {}
    for path in SUITE_PATHS:
        suite = context.suites.add(load_suite(path))
        versions[suite.name] = suite.meta["version"]
        definitions[path] = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite))
    return _Runtime(context, definitions, versions)


def _get_runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = _build_runtime()
    return _runtime


def _forget_results(context: Any) -> None:
    """Drop the results GX keeps in its in-memory store after every run (they would pile up)."""
    store = context.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


# --- report ----------------------------------------------------------------------
@dataclass
class ValidationReport:
    """The outcome of validating one partition.

    ``failed`` holds one dict per failed expectation: ``suite``, ``expectation_type``,
    ``column``, ``description``, ``unexpected_count``, ``unexpected_percent``,
    ``observed_value``, ``sample`` (a few offending values, JSON-able) and
    ``exception`` (when GX could not evaluate it, e.g. a missing column). A file that
    does not fit the lake schema (:func:`check_file_schemas`) is one such dict too, of
    suite :data:`SCHEMA_CHECK`, with ``file`` (its path in the lake) and ``mismatches``.
    """

    success: bool
    evaluated: int
    failed: list[dict] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)

    def to_metadata(self) -> dict:
        """Plain JSON-able values, e.g. for Dagster asset-check metadata."""
        return _jsonable({
            "success": self.success,
            "evaluated": self.evaluated,
            "failed_count": len(self.failed),
            "failed_expectations": [_label(f) for f in self.failed],
            "failed": self.failed,
            "statistics": self.statistics,
            "summary": self.summary(),
        })

    def summary(self) -> str:
        stats = self.statistics
        files = stats.get("files") or {}
        suites = [f"{n} v{v}" for n, v in stats.get("suites", {}).items()]
        if files:
            suites.insert(0, f"lake schema of {files.get('checked')} file(s)")
        rows = stats.get("rows")
        head = (f"{'PASSED' if self.success else 'FAILED'}: "
                f"{self.evaluated - len(self.failed)}/{self.evaluated} expectations met "
                f"on {rows} rows ({', '.join(suites) or 'no suite'})")
        lines = [head]
        if files.get("misfit"):
            lines.append(f"  {len(files['misfit'])} of {files.get('checked')} file(s) do not fit the lake schema: "
                         f"their {files.get('rows_left_out')} rows were left out of the suites"
                         + ("" if stats.get("suites") else ", and no file was left to run them on"))
        elif rows == 0:
            lines.append("  the partition is empty (0 rows)")
        if stats.get("duplicate_event_ids"):
            lines.append(f"  {stats['duplicate_event_ids']} row(s) repeat an earlier event_id (redelivered): "
                         "training counts each event once")
        for suite, why in (stats.get("skipped_suites") or {}).items():
            lines.append(f"  {suite_label(suite)}: skipped — {why}")
        for f in self.failed:
            lines.append("  - " + _describe_failure(f))
        if not self.success and stats.get("remedy"):
            lines.append(f"  to fix: {stats['remedy']}")
        return "\n".join(lines)


def suite_label(suite: str) -> str:
    """A suite's short name for people: ``shoprec_events_volume`` -> ``volume``, ``shoprec_events`` -> ``events``."""
    if suite.startswith("shoprec_events_"):
        return suite.removeprefix("shoprec_events_")
    return suite.removeprefix("shoprec_")


def _label(f: dict) -> str:
    if f.get("file"):
        return f"{f['expectation_type']}({f['file']})"
    return f"{f['expectation_type']}({f['column']})" if f.get("column") else f["expectation_type"]


def _describe_failure(f: dict) -> str:
    if f.get("file"):
        return f"{f['file']} does not fit the lake schema: {f['observed_value']}. {SCHEMA_FIX}"
    text = _label(f)
    if f.get("exception"):
        return f"{text}: could not be evaluated: {f['exception']}"
    if f["expectation_type"] == "expect_table_columns_to_match_set":
        return f"{text}: missing columns: " + ", ".join(f.get("sample") or [])
    if f.get("unexpected_count") is not None:
        pct = f.get("unexpected_percent")
        text += f": {f['unexpected_count']} unexpected" + (f" ({pct:.1f}%)" if pct is not None else "")
    elif f.get("observed_value") is not None:
        text += f": observed {f['observed_value']!r}"
    if f.get("sample"):
        text += ", e.g. " + ", ".join(repr(v) for v in f["sample"])
    if f.get("items"):
        text += " (products " + ", ".join(map(str, f["items"])) + ("…" if f.get("unexpected_count", 0) > len(f["items"]) else "") + ")"
    return text


def _jsonable(value: Any) -> Any:
    """Convert numpy/pandas/datetime values (and NaN) into plain JSON values."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, int):
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def _sample(result: dict) -> list:
    counts = result.get("partial_unexpected_counts")
    if counts:
        values = [c.get("value") for c in counts]
    elif result.get("partial_unexpected_list") is not None:
        values = list(dict.fromkeys(_jsonable(v) for v in result["partial_unexpected_list"]))
    else:  # expect_table_columns_to_match_set: all the missing columns
        return _jsonable((result.get("details") or {}).get("mismatched", {}).get("missing") or [])
    return [_jsonable(v) for v in values[:SAMPLE_SIZE]]


def _failure(suite: str, res: Any) -> dict:
    config = res.expectation_config
    result = res.result or {}
    exception = None
    info = res.exception_info or {}
    if info.get("raised_exception"):
        exception = info.get("exception_message")
    else:  # GX 1.x may key the info by metric
        for sub in info.values():
            if isinstance(sub, dict) and sub.get("raised_exception"):
                exception = sub.get("exception_message")
                break
    return _jsonable({
        "suite": suite,
        "expectation_type": config.type,
        "column": config.kwargs.get("column"),
        "description": getattr(config, "description", None),
        "unexpected_count": result.get("unexpected_count"),
        "unexpected_percent": result.get("unexpected_percent"),
        "observed_value": result.get("observed_value"),
        "sample": _sample(result),
        "exception": exception,
    })


# --- public API ------------------------------------------------------------------
def _utc(value: datetime | pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def hour_window(partition_key: str) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of an hourly partition key (``YYYY-MM-DD-HH:00``)."""
    start = datetime.strptime(partition_key, "%Y-%m-%d-%H:%M").replace(tzinfo=timezone.utc)
    return start, start + timedelta(hours=1)


def hour_is_open(partition_key: str, now: datetime | None = None) -> bool:
    """Whether the hour of ``partition_key`` has not ended yet (events may still arrive in it)."""
    return hour_window(partition_key)[1] > (now or datetime.now(timezone.utc))


def validate_events(df: pd.DataFrame, *, hour_start: datetime | None = None,
                    hour_end: datetime | None = None, known_items: Sequence[str] | None = None,
                    volume: tuple[int, int] | None = None) -> ValidationReport:
    """Validate one partition of events against the ``shoprec_events`` suite.

    When ``hour_start`` is given, also check that every ``ts`` lies in
    ``[hour_start, hour_end)`` (``hour_end`` defaults to one hour later; naive
    datetimes are taken as UTC). When ``known_items`` (the catalog's item ids) is
    given, also check the share of events for unknown products; when ``volume``
    (``(min_rows, max_rows)``, see :func:`volume_band`) is given, the row count.

    Raises:
        TypeError: ``df`` is not a DataFrame.
        ValueError: ``hour_end`` without ``hour_start``, or an empty window.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"validate_events needs a pandas DataFrame, not {type(df).__name__}")
    params = suite_parameters()
    window = None
    if hour_start is not None:
        start = _utc(hour_start)
        end = _utc(hour_end) if hour_end is not None else start + pd.Timedelta(hours=1)
        if end <= start:
            raise ValueError(f"hour_end {end} is not after hour_start {start}")
        params.update(hour_start=start, hour_end=end)
        window = [start.isoformat(), end.isoformat()]
    elif hour_end is not None:
        raise ValueError("hour_end needs hour_start")

    paths = [SUITE_PATH] + ([WINDOW_SUITE_PATH] if window else [])
    if known_items is not None:
        paths.append(EVENTS_CATALOG_SUITE_PATH)
        params["known_items"] = sorted(set(map(str, known_items)))
    if volume is not None:
        paths.append(VOLUME_SUITE_PATH)
        params.update(volume_min=int(volume[0]), volume_max=int(volume[1]))
    report = _run(tuple(paths), df, params)
    report.statistics["window"] = window
    if COL_EVENT_ID in df:
        report.statistics["duplicate_event_ids"] = int(repeated_events(df).sum())
    if volume is not None:
        report.statistics["volume_band"] = [int(volume[0]), int(volume[1])]
    if any(f.get("suite") == EVENTS_CATALOG_SUITE for f in report.failed):
        report.statistics["remedy"] = UNKNOWN_PRODUCTS_REMEDY
    return report


#: what a person does about an hour whose events name too many products the catalog does not have
UNKNOWN_PRODUCTS_REMEDY = ("send the missing products to the catalog (POST /catalog or `shoprec catalog publish FILE`); "
                           "the next training checks the hour again and uses it once it passes (or now: Dagster → "
                           "events → this partition → Materialize)")


def catalog_failed_only(report: dict) -> bool:
    """Whether a stored report failed on nothing but events naming products the catalog did not have then:
    such an hour may pass once the products reach the catalog, so it is checked again rather than trusted."""
    failed = report.get("failed") or []
    return not report.get("success") and bool(failed) and all(f.get("suite") == EVENTS_CATALOG_SUITE for f in failed)


def catalog_remedy(path: Path | str | None = None) -> str:
    """What a person does about a catalog that failed its suite (the products come from ``shop.catalog``)."""
    return (f"send these products again with correct values (POST /catalog or `shoprec catalog publish FILE`: the "
            f"catalog feed rewrites {path or 'the catalog file'}), then `shoprec train`; a row without a well-formed "
            f"item_id can only be removed from the file itself, after `make down`")


def validate_catalog(df: pd.DataFrame, *, now_ms: int | None = None, path: Path | str | None = None) -> ValidationReport:
    """Validate the product catalog against the ``shoprec_catalog`` suite (``created_at`` judged
    against ``now_ms``, default the clock). A failed report's summary ends with what to do about it
    (:func:`catalog_remedy`, naming ``path``, the file validated).

    Raises:
        TypeError: ``df`` is not a DataFrame.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"validate_catalog needs a pandas DataFrame, not {type(df).__name__}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    report = _run((CATALOG_SUITE_PATH,), df, suite_parameters() | {
        "created_at_min_ms": CATALOG_CREATED_AT_MIN_MS, "created_at_max_ms": now_ms + CATALOG_MAX_FUTURE_S * 1000})
    for f in report.failed:  # which products hold the offending values, so that they can be sent again
        if f.get("column") not in (None, COL_ITEM):
            f["items"] = [r.get(COL_ITEM) for r in sample_rows(df, [f], n=5) if r.get(COL_ITEM) is not None]
    report.statistics["remedy"] = catalog_remedy(path)
    return report


def _run(paths: tuple[Path, ...], df: pd.DataFrame, params: dict[str, Any]) -> ValidationReport:
    rt = _get_runtime()
    with _lock:
        try:
            result = rt.checkpoint(paths).run(batch_parameters={"dataframe": df}, expectation_parameters=params)
        finally:
            _forget_results(rt.context)

    failed: list[dict] = []
    evaluated = 0
    suites: dict[str, Any] = {}
    for run in result.run_results.values():
        suite = run.suite_name
        suites[suite] = rt.versions.get(suite)
        evaluated += len(run.results)
        failed += [_failure(suite, r) for r in run.results if not r.success]
    failed.sort(key=lambda f: f["column"] is not None)  # table-level failures (empty, columns) first
    return ValidationReport(success=bool(result.success) and not failed, evaluated=evaluated,
                            failed=failed, statistics={"rows": len(df), "suites": suites, **_counts(evaluated, failed)})


def _counts(evaluated: int, failed: list[dict]) -> dict[str, Any]:
    successful = evaluated - len(failed)
    return {"evaluated_expectations": evaluated, "successful_expectations": successful,
            "unsuccessful_expectations": len(failed),
            "success_percent": round(100.0 * successful / evaluated, 2) if evaluated else None}


def repeated_events(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows whose ``event_id`` an earlier row already has (a redelivery; the first stays).

    At-least-once delivery repeats a few events, which the suite tolerates; training drops these rows so
    that each event counts once. Rows without an ``event_id`` are never marked (the suite fails them).
    """
    ids = df[COL_EVENT_ID]
    return ids.duplicated(keep="first") & ids.notna()  # one hash pass: about 1 s for 3 million ids


# --- the lake schema, file by file, before any suite ------------------------------
#: the suite name and expectation type under which a file that does not fit the lake schema is reported
SCHEMA_CHECK = "lake_schema"
FILE_FITS = "file_matches_lake_schema"
#: columns a lake file must have: those the event schema requires, and item_id (every event but an impression
#: names one). A file may lack any other column, which every reader then sees as null (older files lack newer ones).
REQUIRED_COLUMNS = (*(n for n, f in Event.model_fields.items() if f.is_required()), COL_ITEM)
SCHEMA_FIX = ("Move the file out of the partition folder, or export it again with the lake's column types "
              "(pipelines.lake.LAKE_SCHEMA), then validate the hour again; until then the hour fails and "
              "training leaves it out.")


def _kind(t: pa.DataType) -> str:
    """The kind of value a column type holds (text, integer, timestamp, ...).

    Types of one kind are read as the lake type: the reader casts them (another timestamp unit, a
    narrower integer). Across kinds Arrow casts too, silently (integers into timestamps, numeric text
    into prices), which is why the kinds are compared from the footer before anything is read.
    """
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{_kind(t.value_type)}>"
    return str(t)


def _fits(found: pa.DataType, expected: pa.DataType) -> bool:
    fk, ek = _kind(found), _kind(expected)
    # all-null columns fit anything; whole-number prices are prices
    return fk in (ek, "null") or (ek, fk) == ("float", "integer") or (ek.startswith("list<") and fk == "list<null>")


def check_file_schemas(lake_dir: Path, files: Sequence[Path]) -> tuple[list[Path], list[dict]]:
    """Which of ``files`` fit the lake schema (:data:`pipelines.lake.LAKE_SCHEMA`), from their footers only.

    A file fits when it has every :data:`REQUIRED_COLUMNS` and each lake column it has holds the lake
    column's kind of value (:func:`_kind`: a timestamp of another unit or a narrower integer fits; text
    where the lake has a price, or integers where it has a timestamp, do not). Extra columns are allowed.

    Returns:
        ``(fitting files, failures)``: one report entry (as :attr:`ValidationReport.failed`) per file that
        does not fit, naming the file (relative to ``lake_dir``), each wrong column with the type expected
        and the type found, and what to do.

    Raises:
        FileNotFoundError: a file vanished (a compaction replaced it): list the partition again.
    """
    from pipelines import lake

    fitting: list[Path] = []
    failures: list[dict] = []
    for path in files:
        rel = _rel(lake_dir, path)
        try:
            with pq.ParquetFile(path) as pf:  # the footer only
                schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as err:
            failures.append(_misfit(rel, None, [], f"not a readable Parquet file ({err})"))
            continue
        mismatches = []
        for want in lake.LAKE_SCHEMA:
            i = schema.get_field_index(want.name)
            found = schema.field(i).type if i >= 0 else None
            if (found is None and want.name in REQUIRED_COLUMNS) or (found is not None and not _fits(found, want.type)):
                mismatches.append({"column": want.name, "expected": str(want.type),
                                   "found": "missing" if found is None else str(found)})
        if mismatches:
            failures.append(_misfit(rel, rows, mismatches))
        else:
            fitting.append(path)
    return fitting, failures


def _rel(lake_dir: Path, path: Path) -> str:
    """``path`` as a person finds it in the lake (``date=.../hour=.../name.parquet``)."""
    return Path(path).relative_to(lake_dir).as_posix() if Path(path).is_relative_to(lake_dir) else str(path)


def _misfit(rel: str, rows: int | None, mismatches: list[dict], error: str | None = None) -> dict:
    what = error or "; ".join(f"{m['column']} is {m['found']} ({m['expected']} expected)" for m in mismatches)
    return {"suite": SCHEMA_CHECK, "expectation_type": FILE_FITS,
            "column": ", ".join(m["column"] for m in mismatches) or None,
            "description": "Every file of the partition has the lake's columns and types. " + SCHEMA_FIX,
            "unexpected_count": rows, "unexpected_percent": None, "observed_value": what, "sample": [rel],
            "exception": error, "file": rel, "mismatches": mismatches}


# --- partitions of the lake, quality reports on disk ----------------------------
#: hours of stream history (non-empty partitions before the hour) the volume suite needs to learn its band from
VOLUME_MIN_HISTORY = 3


def volume_band(counts: Sequence[int], factor: float = 4.0,
                min_history: int = VOLUME_MIN_HISTORY) -> tuple[int, int] | None:
    """The row-count band ``[median / factor, median * factor]`` learned from recent hours.

    Args:
        counts: row counts of recent partitions (empty hours left out).
        factor: width of the band, > 1.
        min_history: with fewer counts there is no band (None): nothing to learn from yet.
    """
    counts = [int(c) for c in counts if c > 0]
    if len(counts) < min_history:
        return None
    median = float(pd.Series(counts).median())
    return max(1, math.floor(median / factor)), math.ceil(median * factor)


def partition_rows(lake_dir: Path, key: str, *, stream_only: bool = False) -> int:
    """Rows of one hourly partition, from the Parquet footers (no data is read); with ``stream_only``, only
    the rows the stream wrote (not a backfill's files, :data:`pipelines.lake.BACKFILL_PREFIX`)."""
    from pipelines import lake

    return lake.read_relisting(lake.partition_files(lake_dir, key), lambda files: sum(
        pq.ParquetFile(f).metadata.num_rows for f in files
        if not (stream_only and f.name.startswith(lake.BACKFILL_PREFIX + "-"))))


def read_partition_lenient(lake_dir: Path, key: str) -> pd.DataFrame:
    """The partition as the lake schema; files that do not fit the schema are read as they are.

    For looking at an hour whatever its files hold; validation reads through :func:`read_partition_checked`,
    which names a file that does not fit and leaves it out.
    """
    from pipelines import lake

    try:
        return lake.read_partition(lake_dir, key)
    except (pa.ArrowException, ValueError, TypeError):
        return lake.read_relisting(lake.partition_files(lake_dir, key), lambda files: pd.concat(
            [pq.read_table(f).to_pandas() for f in files], ignore_index=True))


def read_partition_checked(lake_dir: Path, key: str) -> tuple[pd.DataFrame, list[dict], dict]:
    """The partition's files that fit the lake schema, read as it (:func:`check_file_schemas`, footers first).

    A file whose footer fits but whose values the lake reader cannot cast (timestamps with microseconds,
    an integer too large for the column) does not fit either: what passes validation, training can read.

    Returns:
        ``(events, failures, files)``: a report entry per file that does not fit, and ``files``, the
        ``statistics["files"]`` of the report (``checked``, ``misfit`` paths, ``rows_left_out``).
    """
    from pipelines import lake

    def read(files: list[Path]) -> tuple[pd.DataFrame, list[dict], dict]:
        fitting, failures = check_file_schemas(lake_dir, files)
        try:
            events = lake.read_files(fitting)
        except (pa.ArrowException, ValueError, TypeError):  # rare: find the file(s) at fault
            for path in list(fitting):
                try:
                    lake.read_lake_table(path)
                except (pa.ArrowException, ValueError, TypeError) as err:
                    failures.append(_misfit(_rel(lake_dir, path), pq.read_metadata(path).num_rows, [],
                                            f"not readable as the lake schema ({err})"))
                    fitting.remove(path)
            events = lake.read_files(fitting)
        stats = {"checked": len(files), "misfit": [f["file"] for f in failures],
                 "rows_left_out": sum(f["unexpected_count"] or 0 for f in failures)}
        return events, failures, stats

    return lake.read_relisting(lake.partition_files(lake_dir, key), read)


def report_path(quality_dir: Path, partition: str) -> Path:
    return Path(quality_dir) / f"{partition}.json"


def files_fingerprint(lake_dir: Path, key: str) -> str:
    """What a partition's files are (names and sizes): a report holds it, and a report whose partition has
    changed since (late events, a manual import, a compaction) is not trusted."""
    from pipelines import lake

    listed = sorted((f.name, f.stat().st_size) for f in lake.partition_files(lake_dir, key) if f.exists())
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:32]


def write_report(report: ValidationReport, partition: str, quality_dir: Path,
                 dagster_run_id: str | None = None, files: str | None = None) -> Path:
    """Write ``report`` as the quality file of ``partition`` (format in the module docstring); atomic.
    ``files``: the :func:`files_fingerprint` of what was validated."""
    path = report_path(quality_dir, partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _jsonable({
        "partition": partition,
        "success": report.success,
        "evaluated": report.evaluated,
        "failed": report.failed,
        "statistics": report.statistics,
        "dagster_run_id": dagster_run_id,
        "validated_at": datetime.now(timezone.utc).isoformat(),
        "files": files,
    })
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    return path


def read_report(quality_dir: Path, partition: str) -> dict | None:
    """The quality file of ``partition``, or None when it was never validated."""
    try:
        return json.loads(report_path(quality_dir, partition).read_text())
    except (OSError, ValueError):
        return None


def validate_partition(lake_dir: Path, key: str, *, quality_dir: Path | None = None,
                       known_items: Sequence[str] | None = None, band_factor: float = 4.0,
                       history_hours: int = 24, dagster_run_id: str | None = None,
                       now: datetime | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    """Validate one hourly partition of the lake with every suite that applies; write its report.

    The volume band is learned from the rows the stream wrote in the ``history_hours`` partitions before
    ``key`` (a backfill's files do not count; with fewer than three such hours there is no band). An hour that
    has not closed yet (:func:`hour_is_open`) is checked by every suite but volume: its row count
    so far says nothing about the stream (the hourly schedule checks it once it closed).

    Each file is first checked against the lake schema (:func:`check_file_schemas`); a file that does not fit
    fails the partition with an entry naming it, and the suites run on the other files (none when no file fits;
    nor the volume suite, whose row count would lack the files left out).

    Returns:
        ``(report, events)``; the report is also written to ``quality_dir`` when given.
    """
    files = files_fingerprint(lake_dir, key)  # before reading: a file added meanwhile makes it stale
    df, misfits, checked = read_partition_checked(lake_dir, key)
    start, end = hour_window(key)
    volume = None
    skipped: dict[str, str] = {}  # suite -> why it did not run (the report says so: a suite missing said nothing)
    if hour_is_open(key, now):
        skipped[VOLUME_SUITE] = "the hour is still open: its row count is checked once it closes"
    elif misfits:
        skipped[VOLUME_SUITE] = (f"{len(misfits)} file(s) do not fit the lake schema, so the row count would lack "
                                 "their rows")
    else:
        # learned from what the stream wrote: imported history (a backfill) has a density of its own, and the
        # local stack's live shop sends ~30x its history's rate, so every live hour failed against it
        history = [partition_rows(lake_dir, (start - timedelta(hours=h)).strftime("%Y-%m-%d-%H:00"),
                                  stream_only=True) for h in range(1, history_hours + 1)]
        volume = volume_band(history, band_factor)
        if volume is None:
            have = sum(1 for c in history if c > 0)
            skipped[VOLUME_SUITE] = (f"needs {VOLUME_MIN_HISTORY} hours of stream history, has {have} "
                                     f"(of the {history_hours} h before this hour)")
    if known_items is None:
        skipped[EVENTS_CATALOG_SUITE] = "no product catalog to check the events' item ids against"
    if misfits and not checked["checked"] - len(misfits):  # nothing to run the suites on
        report = ValidationReport(success=False, evaluated=0, statistics={"rows": 0, "suites": {}})
        skipped = {suite: skipped.get(suite, "no file fits the lake schema")
                   for suite in (EVENTS_SUITE, WINDOW_SUITE, EVENTS_CATALOG_SUITE, VOLUME_SUITE)}
    else:
        report = validate_events(df, hour_start=start, hour_end=end, known_items=known_items, volume=volume)
    report.statistics["skipped_suites"] = skipped
    report.failed = _jsonable(misfits) + report.failed
    # the lake schema is one expectation for the files that fit and one per file that does not (a per-file count
    # made an open hour of 2,400 consumer files show 2,400 "expectations" beside a closed hour's 18)
    report.evaluated += len(misfits) + (checked["checked"] > len(misfits))
    report.success = report.success and not misfits
    report.statistics.update(files=checked, **_counts(report.evaluated, report.failed))
    if quality_dir is not None:
        write_report(report, key, quality_dir, dagster_run_id, files)
    return report, df


def split_by_quality(lake_dir: Path, keys: Sequence[str], quality_dir: Path, **validate_kw
                     ) -> tuple[list[str], list[str]]:
    """Which of ``keys`` (partitions with files) training may use.

    A partition is usable when its latest quality report passed on the files it has now; one never
    validated, one whose files changed since its report (late events, a manual import: a report used to
    vouch for files added after it), or the hour still being written, is validated now (and its report
    written), so training never reads unchecked data. So is one that failed only for naming products the
    catalog did not have (:func:`catalog_failed_only`) when ``known_items`` is given: once the shop sends
    those products, the hour passes and comes back into training without anyone re-running its check.

    Returns:
        ``(passed, failed)`` partition keys.
    """
    passed, failed = [], []
    for key in keys:
        # the hour still being written is validated again each time: its stored report saw part of it
        rep = None if hour_is_open(key) else read_report(quality_dir, key)
        if rep is not None and rep.get("files") != files_fingerprint(lake_dir, key):
            rep = None
        if rep is not None and validate_kw.get("known_items") is not None and catalog_failed_only(rep):
            rep = None
        ok = rep["success"] if rep is not None else validate_partition(
            lake_dir, key, quality_dir=quality_dir, **validate_kw)[0].success
        (passed if ok else failed).append(key)
    return passed, failed


def sample_rows(df: pd.DataFrame, failed: Sequence[dict], n: int = 3) -> list[dict]:
    """Up to ``n`` whole rows of ``df`` per failed column expectation that hold an offending value.

    Returns:
        JSON-able dicts with the expectation label added under ``_expectation``.
    """
    out: list[dict] = []
    for f in failed:
        column, sample = f.get("column"), f.get("sample") or []
        if column is None or column not in df or not sample or f.get("file"):
            continue
        values = df[column].map(lambda v: _jsonable(v))
        rows = df[values.isin([v for v in sample if v is not None])] if any(v is not None for v in sample) \
            else df[df[column].isna()]
        for row in rows.head(n).to_dict("records"):
            out.append(_jsonable({"_expectation": _label(f), **row}))
    return out


def describe_report(data: dict) -> str:
    """The summary text of a quality report file (see :func:`write_report`)."""
    report = ValidationReport(success=bool(data.get("success")), evaluated=int(data.get("evaluated") or 0),
                              failed=list(data.get("failed") or []), statistics=dict(data.get("statistics") or {}))
    key = data.get("partition")
    return f"{'the catalog' if key == CATALOG_KEY else f'partition {key}'}: {report.summary()}"


__all__ = ["CATALOG_KEY", "SUITE_PATH", "WINDOW_SUITE_PATH", "ValidationReport", "hour_window", "load_suite",
           "check_file_schemas", "read_partition_checked", "repeated_events", "REQUIRED_COLUMNS", "SCHEMA_CHECK",
           "describe_report", "read_report", "sample_rows", "split_by_quality", "suite_parameters",
           "validate_catalog", "catalog_remedy", "catalog_failed_only", "UNKNOWN_PRODUCTS_REMEDY", "validate_events",
           "validate_partition", "volume_band", "write_report",
           "hour_is_open", "suite_label", "VOLUME_MIN_HISTORY", "EVENTS_SUITE", "WINDOW_SUITE", "EVENTS_CATALOG_SUITE",
           "VOLUME_SUITE", "CATALOG_SUITE"]
