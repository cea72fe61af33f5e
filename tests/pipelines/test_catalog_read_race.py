"""A reader of the catalog racing the catalog feed, which replaces the file (temp, fsync, rename), reads it whole."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from pipelines import lake
from pipelines.rules import Catalog


def test_the_catalog_read_while_the_feed_replaces_it_is_always_one_whole_file(tmp_path):
    """``pd.read_parquet(path)`` opens the path more than once: beside a writer it read the footer of one file and
    the pages of the next ("Page was smaller than expected"), and a serving process kept a stale catalog."""
    stop = threading.Event()
    sizes = [1500 + 400 * n for n in range(5)]

    def table(n: int) -> pa.Table:
        return pa.table({"item_id": [f"i{j}" for j in range(n)], "in_stock": np.arange(n) % 3 > 0,
                         "category": ["shoes"] * n, "price": np.linspace(1, 99, n),
                         "created_at": np.full(n, 1_700_000_000_000)})

    lake.write_table(tmp_path, "catalog.parquet", table(sizes[0]))

    def feed() -> None:
        n = 0
        while not stop.is_set():
            lake.write_table(tmp_path, "catalog.parquet", table(sizes[n % len(sizes)]))
            n += 1

    writer = threading.Thread(target=feed)
    writer.start()
    seen = set()
    try:
        for _ in range(400):
            df = lake.read_parquet(tmp_path / "catalog.parquet", columns=["item_id", "in_stock"])
            assert len(df) in sizes and df.item_id.iloc[-1] == f"i{len(df) - 1}"
            seen.add(len(df))
            catalog = Catalog(tmp_path / "catalog.parquet", reload_s=0)
            catalog.maybe_reload(force=True)
            assert len(catalog.out_of_stock) in {len(range(0, n, 3)) for n in sizes}
    finally:
        stop.set()
        writer.join()
    assert len(seen) > 1  # the reads did race the writer


def test_a_server_without_its_catalog_says_so_once_each_time_it_goes_missing(tmp_path, caplog):
    """A pod or process whose var/ has no catalog served with no stock, cap or exploration rules and said nothing."""
    import logging

    caplog.set_level(logging.WARNING, logger="pipelines.rules")
    cat = Catalog(tmp_path / "catalog.parquet", reload_s=0)
    for _ in range(3):
        cat.maybe_reload(force=True)
    missing = [r for r in caplog.records if "no catalog at" in r.getMessage()]
    assert len(missing) == 1 and "catalog sync" in missing[0].getMessage()
    lake.write_table(tmp_path, "catalog.parquet", pa.table({
        "item_id": ["i1", "i2"], "in_stock": [True, False], "category": ["shoes", "hats"], "price": [5.0, 6.0],
        "created_at": [1_700_000_000_000] * 2}))
    cat.maybe_reload(force=True)
    assert cat.out_of_stock == {"i2"}  # read once it exists
    (tmp_path / "catalog.parquet").unlink()
    cat.maybe_reload(force=True)
    cat.maybe_reload(force=True)
    assert len([r for r in caplog.records if "no catalog at" in r.getMessage()]) == 2  # gone again: said again
    assert cat.out_of_stock == {"i2"}  # the last catalog read keeps serving meanwhile
