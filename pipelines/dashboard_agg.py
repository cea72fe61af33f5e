"""Per-partition summaries of the event lake for the dashboard, cached on disk so a page never rescans a week
of raw events.

The A/B and cold-start pages need numbers over the last 7 days / 49 hours of the lake (~16 M events, 169
hourly partitions on the local stack after a week). Reading and joining the raw events takes seconds, so
each hourly partition is reduced once to a few small Arrow tables (a few thousand rows instead of ~100 k
events) and those are merged on every load:

* ``ab``: the partition's impressions (``request_id``, ``variant``; first one per request), its attributed
  purchases (``request_id``, ``amount`` = price × quantity) and its distinct (``variant``, ``user_id``)
  pairs, where ``variant`` is the comparison and the variant (:func:`pipelines.dashboard_data.lake_ab_key`),
  ids stored as 64-bit hashes (:func:`id_hash`). Merged, they give what
  :func:`pipelines.dashboard_data.fetch_lake_ab` computes from the raw events (revenue of every impression,
  distinct users per variant; purchases whose impression lies in an earlier partition included), exactly
  unless two of a week's ids share a hash (probability ~10^-8).
* ``new_items``: impression slots per timestamp (how many, how many went to a product younger than
  ``age_h`` at that moment) and each product's first impression and first click after its launch. Merged,
  they give exactly :func:`pipelines.dashboard_data.fetch_new_item_report`.

A summary is a pure function of the partition's files, so it is stored under ``cache_dir`` with a key made
of the files' names, sizes and modification times (plus the summary's parameters): a partition that
receives a new file (the current hour) is summarized again, closed hours never are. Only the cache folder
is written, never the lake. A ``new_items`` summary that meets a product the catalog does not know yet is
not stored (the catalog may still be catching up). Several dashboard processes may fill the cache at the
same time: files are written to a temporary name and renamed. A lake file that does not fit the lake schema is
left out of its partition's summary and reported with the merged numbers (``skipped``,
:func:`pipelines.dashboard_data.lake_file_problem`), so one wrong-typed import cannot blank a page.

``build_summaries`` fills the cache ahead of time (what an hourly Dagster asset would call after each
partition closes); the dashboard otherwise fills it itself on its first load.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather

from pipelines.dashboard_data import (LakeAB, NewItemReport, SkippedFile, lake_ab_key, launch_times, observed_launches,
                                      read_lake_files, skipped_lake_files, window_keys, window_partitions)
from pipelines.lake import partition_dir, read_parquet

__all__ = ["SUMMARY_VERSION", "cache_dir", "window_partitions", "lake_version", "id_hash", "summarize_ab",
           "summarize_new_items", "fetch_lake_ab", "fetch_new_item_report", "build_summaries", "summarize_partition"]

log = logging.getLogger(__name__)

#: bump when a summary's tables change meaning: older cache files are then ignored (and replaced)
SUMMARY_VERSION = 2
AB_TABLES = ("impressions", "purchases", "users")
NEW_ITEM_TABLES = ("slots", "first_impression", "first_click")


def cache_dir(settings) -> Path:
    """Where the dashboard caches the summaries: ``<var_dir>/dashboard-cache`` (safe to delete at any time)."""
    return Path(settings.var_dir) / "dashboard-cache"


# --- which partitions, and their cache keys ---------------------------------------------------------------
def _signature(files: Sequence[Path], kind: str, params: str) -> str:
    # pandas' version: id_hash comes from it
    h = hashlib.sha1(f"{SUMMARY_VERSION}|{pd.__version__}|{kind}|{params}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def lake_version(lake_dir, *, hours: int, now_s: float | None = None) -> str:
    """A key that changes whenever a file of the last ``hours`` of the lake (and the hour ahead, like the pages'
    windows) is added, replaced or removed: what a reader caches its results under, so new events show at its
    next read while an unchanged lake is not merged again.

    A listing and a ``stat`` per file, no file opened (a week's folders in ~15 ms; :func:`window_partitions`
    reads every compacted file's footer, ~8x that), cheap enough for every refresh of a page.
    """
    now_s = time.time() if now_s is None else now_s
    h = hashlib.sha1()
    for key in window_keys(now_s - hours * 3600, now_s + 3600):
        try:
            entries = sorted(os.scandir(partition_dir(lake_dir, key)), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                if e.name.endswith(".parquet"):
                    st = e.stat()
                    h.update(f"{key}/{e.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            except FileNotFoundError:  # compacted away since the listing: the next listing differs anyway
                continue
    return h.hexdigest()[:20]


def _folder(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key.replace(":00", "").replace("-", "")  # 2026-11-24-13:00 -> 2026112413


def _cache_paths(cache_dir: Path, kind: str, key: str, sig: str, names: Sequence[str]) -> dict[str, Path]:
    folder = _folder(cache_dir, kind, key)
    return {n: folder / f"{sig}-{n}.arrow" for n in names}


def _prune(cache_dir: Path, kind: str, oldest_key: str) -> None:
    """Drop the summaries of partitions older than the window (folder names sort like the hours they hold)."""
    import shutil

    oldest = _folder(cache_dir, kind, oldest_key).name
    try:
        for folder in (Path(cache_dir) / kind).iterdir():
            if folder.name < oldest:
                shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass


def _load(paths: dict[str, Path]) -> dict[str, pa.Table] | None:
    try:
        return {n: _read_summary(str(p), p.stat().st_mtime_ns) for n, p in paths.items()}
    except (OSError, pa.ArrowException):  # missing (not summarized yet) or unreadable: summarize again
        return None


@functools.lru_cache(maxsize=4096)
def _read_summary(path: str, mtime_ns: int) -> pa.Table:
    """One summary file, kept in memory once read: a page that refreshes every few seconds while the current hour
    grows merges the closed hours' summaries again, but reads none of them from disk twice (a week is ~20 MB)."""
    return feather.read_table(path, memory_map=False)


def _store(paths: dict[str, Path], tables: dict[str, pa.Table]) -> None:
    folder = next(iter(paths.values())).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        keep = {p.name for p in paths.values()}
        for old in folder.glob("*.arrow"):  # summaries of an earlier state of this partition
            if old.name not in keep:
                old.unlink(missing_ok=True)
        for n, p in paths.items():
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            try:
                feather.write_feather(tables[n], tmp, compression="uncompressed")
                os.replace(tmp, p)
            finally:
                Path(tmp).unlink(missing_ok=True)
    except OSError as err:  # a read-only var/ dir: the dashboard still works, only slower
        log.warning("cannot cache the dashboard's lake summary in %s (%s); it is recomputed on every load",
                    folder, err)


def _summaries(lake_dir, cache_dir, kind: str, names: Sequence[str], params: str, start_s: float, end_s: float,
               summarize: Callable[[list[Path]], tuple[dict[str, pa.Table], bool]],
               prune: bool = True) -> tuple[list[dict[str, pa.Table]], list[SkippedFile]]:
    """The cached summary of every partition in the window, summarizing (and storing) the missing ones, and the
    files left out of them because they do not fit the lake schema; with ``prune``, summaries of older
    partitions are deleted.

    Missing partitions are summarized by a few threads (Parquet decoding releases the GIL), which matters
    only the first time a dashboard meets a lake that already holds days of data.
    """
    from concurrent.futures import ThreadPoolExecutor

    parts = window_partitions(lake_dir, start_s, end_s)
    paths = [_cache_paths(Path(cache_dir), kind, key, _signature(files, kind, params), names)
             if cache_dir is not None else None for key, files in parts]
    out = [_load(p) if p else None for p in paths]
    missing = [i for i, tables in enumerate(out) if tables is None]

    def one(i: int) -> dict[str, pa.Table]:
        tables, cacheable = summarize(parts[i][1])
        if paths[i] and cacheable:
            _store(paths[i], tables)
        return tables

    if len(missing) > 1:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for i, tables in zip(missing, pool.map(one, missing)):
                out[i] = tables
    else:
        for i in missing:
            out[i] = one(i)
    if prune and cache_dir is not None and parts:
        _prune(Path(cache_dir), kind, parts[0][0])
    return out, [bad for _, files in parts for bad in skipped_lake_files(files)]


def _table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df, schema=schema, preserve_index=False)


# --- A/B: revenue per impression and users per variant ----------------------------------------------------
_VARIANT = pa.dictionary(pa.int32(), pa.string())
_AB_SCHEMAS = {
    "impressions": pa.schema([("request", pa.int64()), ("variant", _VARIANT)]),
    "purchases": pa.schema([("request", pa.int64()), ("amount", pa.float64())]),
    "users": pa.schema([("variant", _VARIANT), ("user", pa.int64())]),
}


def id_hash(ids: pd.Series) -> np.ndarray:
    """64-bit hashes of string ids (pandas' SipHash with its fixed key), so merging a week of impressions
    compares integers instead of strings. Two of the ~10^6 ids of a week share a hash with probability ~10^-8."""
    return pd.util.hash_array(ids.astype(str).to_numpy(dtype=object)).view("int64")


def summarize_ab(files: Sequence[Path]) -> tuple[dict[str, pa.Table], bool]:
    """The ``ab`` summary of one partition's files (see the module docstring); always cacheable.

    Request and user ids are stored as :func:`id_hash` values.
    """
    df = read_lake_files(files, ["user_id", "request_id", "variant", "experiment", "price", "quantity"],
                         ["impression", "purchase"])
    imp = df[(df["event_type"] == "impression") & df["variant"].notna()]
    imp = imp.assign(variant=lake_ab_key(imp))  # comparison and variant
    pur = df[(df["event_type"] == "purchase") & df["request_id"].notna()]
    first = imp.dropna(subset=["request_id"]).drop_duplicates("request_id")
    amount = pur["price"].fillna(0).astype("float64") * pur["quantity"].fillna(1).astype("float64")
    users = imp.dropna(subset=["user_id"])
    users = pd.DataFrame({"variant": users["variant"].astype(str), "user": id_hash(users["user_id"])}).drop_duplicates()
    return {"impressions": _table(pd.DataFrame({"request": id_hash(first["request_id"]),
                                                "variant": first["variant"].astype(str)}), _AB_SCHEMAS["impressions"]),
            "purchases": _table(pd.DataFrame({"request": id_hash(pur["request_id"]), "amount": amount.to_numpy()}),
                                _AB_SCHEMAS["purchases"]),
            "users": _table(users, _AB_SCHEMAS["users"])}, True


def _codes(tables: Sequence[pa.Table], column: str) -> tuple[np.ndarray, list[str]]:
    """The dictionary column of all ``tables`` as integer codes into one shared list of values."""
    chunked = pa.chunked_array([c for t in tables for c in t[column].chunks], type=_VARIANT).unify_dictionaries()
    if not chunked.num_chunks:
        return np.zeros(0, dtype="int32"), []
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunked.chunks])
    return codes, chunked.chunk(0).dictionary.to_pylist()


def merge_ab(summaries: Sequence[dict[str, pa.Table]]) -> LakeAB:
    """:class:`LakeAB` of the partitions whose ``ab`` summaries are given (oldest first)."""
    if not summaries:
        return LakeAB()
    imps = [s["impressions"] for s in summaries]
    request = np.concatenate([t["request"].to_numpy() for t in imps])
    variant, names = _codes(imps, "variant")
    if not pd.Index(request).is_unique:  # the same request in two partitions: keep its first impression
        keep = ~pd.Series(request).duplicated(keep="first").to_numpy()
        request, variant = request[keep], variant[keep]
    users = [s["users"] for s in summaries]
    user_variant, user_names = _codes(users, "variant")
    user = np.concatenate([t["user"].to_numpy() for t in users])
    users_out = {user_names[v]: len(pd.unique(user[user_variant == v])) for v in np.sort(pd.unique(user_variant))}
    if not len(request):
        return LakeAB({}, users_out)
    pur = pa.concat_tables([s["purchases"] for s in summaries])
    rev = np.zeros(len(request))
    if len(pur):
        by_req = pd.Series(pur["amount"].to_numpy()).groupby(pur["request"].to_numpy()).sum()
        pos = by_req.index.get_indexer(request)
        hit = pos >= 0
        rev[hit] = by_req.to_numpy()[pos[hit]]
    order = pd.unique(variant)  # variants in order of their first impression, like the raw computation
    return LakeAB({names[v]: rev[variant == v] for v in order}, users_out)


def fetch_lake_ab(lake_dir, cache_dir, *, hours: int, now_s: float | None = None) -> LakeAB:
    """Same result as :func:`pipelines.dashboard_data.fetch_lake_ab` (last ``hours`` of the lake), from the
    per-partition summaries cached in ``cache_dir`` (None: no cache, summarize every partition)."""
    now_s = time.time() if now_s is None else now_s
    summaries, skipped = _summaries(lake_dir, cache_dir, "ab", AB_TABLES, "", now_s - hours * 3600, now_s + 3600,
                                    summarize_ab)
    out = merge_ab(summaries)
    out.skipped, out.read_at_s = skipped, now_s
    return out


# --- cold start: new products ------------------------------------------------------------------------------
_NEW_SCHEMAS = {
    "slots": pa.schema([("ts", pa.int64()), ("slots", pa.int64()), ("new_slots", pa.int64())]),
    "first_impression": pa.schema([("item_id", pa.string()), ("ts", pa.int64())]),
    "first_click": pa.schema([("item_id", pa.string()), ("ts", pa.int64())]),
}


def summarize_new_items(files: Sequence[Path], created: pd.Series, age_ms: int) -> tuple[dict[str, pa.Table], bool]:
    """The ``new_items`` summary of one partition's files.

    Args:
        created: launch time (epoch ms) per item id, from the catalog.
        age_ms: a product is new for this long after its launch.

    Returns:
        The tables, and whether every product shown or clicked is in ``created`` (only then is the
        summary stored: a product the catalog does not know yet would be counted as old).
    """
    df = read_lake_files(files, ["ts", "items", "item_id"], ["impression", "click"])
    imp = df[df["event_type"] == "impression"]
    slots = imp[["ts", "items"]].explode("items").dropna().rename(columns={"items": "item_id"})
    slots["ts"] = slots["ts"].astype("int64")
    slots["item_id"] = slots["item_id"].astype(str)
    launched = slots["item_id"].map(created).astype("float64")
    age = slots["ts"] - launched
    slots["new"] = ((age >= 0) & (age < age_ms)).astype("int64")
    by_ts = slots.groupby("ts", sort=True).agg(slots=("item_id", "size"), new_slots=("new", "sum")).reset_index()
    first_imp = slots[slots["ts"] >= launched].groupby("item_id")["ts"].min().reset_index()
    clicks = df[(df["event_type"] == "click") & df["item_id"].notna()]
    clicks = pd.DataFrame({"item_id": clicks["item_id"].astype(str), "ts": clicks["ts"].astype("int64")})
    click_launched = clicks["item_id"].map(created).astype("float64")
    first_click = clicks[clicks["ts"] >= click_launched].groupby("item_id")["ts"].min().reset_index()
    complete = bool(launched.notna().all() and click_launched.notna().all())
    return {"slots": _table(by_ts, _NEW_SCHEMAS["slots"]),
            "first_impression": _table(first_imp, _NEW_SCHEMAS["first_impression"]),
            "first_click": _table(first_click, _NEW_SCHEMAS["first_click"])}, complete


def merge_new_items(summaries: Sequence[dict[str, pa.Table]], created: pd.Series, *, now_ms: int, age_h: float,
                    explore_share: float) -> NewItemReport:
    """:class:`NewItemReport` of the partitions whose ``new_items`` summaries are given."""
    age_ms = int(age_h * 3_600_000)
    new = created[(created > now_ms - age_ms) & (created <= now_ms)]

    def cat(name: str) -> pd.DataFrame:
        tables = [s[name] for s in summaries]
        return (pa.concat_tables(tables) if tables else _NEW_SCHEMAS[name].empty_table()).to_pandas()

    slots = cat("slots")
    recent = slots[slots["ts"] > now_ms - age_ms]
    if slots.empty:
        hourly = pd.DataFrame(columns=["slots", "new_slots", "new_share"])
    else:
        hour = pd.to_datetime(slots["ts"] // 3_600_000 * 3_600_000, unit="ms", utc=True).rename("hour")
        hourly = slots.groupby(hour)[["slots", "new_slots"]].sum()
        hourly["new_share"] = hourly["new_slots"] / hourly["slots"]

    def first_after_launch(name: str) -> pd.Series:
        f = cat(name)
        f = f[f["item_id"].isin(new.index)].groupby("item_id")["ts"].min()
        return (f - new.reindex(f.index)) / 1000.0

    first_imp, first_click = first_after_launch("first_impression"), first_after_launch("first_click")
    # the first slot read is the first impression read (with a product): where the raw computation starts the window
    window_start = int(slots["ts"].min()) if len(slots) else None
    seen = observed_launches(new, window_start)
    t_imp, t_click = first_imp[first_imp.index.isin(seen.index)], first_click[first_click.index.isin(seen.index)]
    return NewItemReport(
        new_items=len(new), with_impression=len(first_imp),
        median_first_impression_s=float(t_imp.median()) if len(t_imp) else None,
        median_first_click_s=float(t_click.median()) if len(t_click) else None, clicked=len(t_click),
        new_slots=int(recent["new_slots"].sum()), all_slots=int(recent["slots"].sum()), explore_share=explore_share,
        hourly=hourly, launched_in_window=len(seen), shown_in_window=len(t_imp), window_start_ms=window_start)


def fetch_new_item_report(catalog_path, lake_dir, cache_dir, *, age_h: float, explore_share: float, hours: int,
                          now_s: float | None = None) -> NewItemReport | None:
    """Same result as :func:`pipelines.dashboard_data.fetch_new_item_report`, from per-partition summaries
    cached in ``cache_dir`` (None: no cache); None without a catalog."""
    if not Path(catalog_path).exists():
        return None
    now_s = time.time() if now_s is None else now_s
    created = launch_times(read_parquet(catalog_path, columns=["item_id", "created_at"]))
    age_ms = int(age_h * 3_600_000)
    summaries, skipped = _summaries(lake_dir, cache_dir, "new_items", NEW_ITEM_TABLES, f"age_ms={age_ms}",
                                    now_s - hours * 3600, now_s + 3600,
                                    lambda files: summarize_new_items(files, created, age_ms))
    out = merge_new_items(summaries, created, now_ms=int(now_s * 1000), age_h=age_h, explore_share=explore_share)
    out.skipped, out.read_at_s = skipped, now_s
    return out


def build_summaries(lake_dir, cache_dir, catalog_path, *, hours: int, age_h: float,
                    now_s: float | None = None) -> int:
    """Summarize (and cache) every partition of the last ``hours`` that is not cached yet; returns how many
    partitions the window holds. What an hourly Dagster asset would run after each partition closes."""
    now_s = time.time() if now_s is None else now_s
    fetch_lake_ab(lake_dir, cache_dir, hours=hours, now_s=now_s)
    fetch_new_item_report(catalog_path, lake_dir, cache_dir, age_h=age_h, explore_share=0.0,
                          hours=int(2 * age_h) + 1, now_s=now_s)
    return len(window_partitions(lake_dir, now_s - hours * 3600, now_s + 3600))


def summarize_partition(lake_dir, cache_dir, catalog_path, key: str, *, age_h: float) -> dict[str, int]:
    """Summarize (and cache) one hourly partition ``key`` (``YYYY-MM-DD-HH:00``) for both pages: what an hourly
    partitioned Dagster asset would run once the partition is written. Returns row counts for its metadata."""
    from datetime import datetime, timezone

    start_s = datetime.strptime(key, "%Y-%m-%d-%H:%M").replace(tzinfo=timezone.utc).timestamp()
    ab, skipped = _summaries(lake_dir, cache_dir, "ab", AB_TABLES, "", start_s, start_s + 3600, summarize_ab,
                             prune=False)
    out = {f"ab_{n}": sum(len(s[n]) for s in ab) for n in AB_TABLES} | {"skipped_files": len(skipped)}
    if Path(catalog_path).exists():
        created = launch_times(read_parquet(catalog_path, columns=["item_id", "created_at"]))
        age_ms = int(age_h * 3_600_000)
        new, _ = _summaries(lake_dir, cache_dir, "new_items", NEW_ITEM_TABLES, f"age_ms={age_ms}", start_s,
                            start_s + 3600, lambda files: summarize_new_items(files, created, age_ms), prune=False)
        out |= {f"new_items_{n}": sum(len(s[n]) for s in new) for n in NEW_ITEM_TABLES}
    return out
