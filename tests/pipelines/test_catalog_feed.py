"""The catalog feed: product upserts on `shop.catalog` reach the catalog file that training, the data checks and
serving read; bad records go to the DLQ; new products from the simulator (live and backfilled) reach the catalog."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

import orjson
import pandas as pd
import pytest
from kafka import KafkaConsumer
from typer.testing import CliRunner

from pipelines import catalog_feed, kafka_io, lake, simulator
from pipelines import dashboard_data as dd
from pipelines.catalog_feed import CatalogSync, parse_update
from pipelines.rules import Catalog
from pipelines.schemas import EventError
from pipelines.settings import get_settings
from pipelines.state import OnlineState
from tests.pipelines.conftest import wait_until
from tests.topics import topic_records

NOW_MS = int(time.time() * 1000)
SHIRT = {"item_id": "p-shirt", "title": "Linen shirt white", "category": "fashion", "brand": "Acme",
         "price": 39.9, "created_at": NOW_MS, "in_stock": True}


def test_a_whole_product_is_added_and_a_partial_record_changes_only_what_it_names():
    row = parse_update(orjson.dumps(SHIRT), b"p-shirt", {})
    assert row == SHIRT
    changed = parse_update(orjson.dumps({"item_id": "p-shirt", "in_stock": False, "schema_version": 1}), b"p-shirt",
                           {"p-shirt": row})
    assert changed == {**SHIRT, "in_stock": False}
    assert parse_update(None, b"p-shirt", {"p-shirt": row}) == {**SHIRT, "in_stock": False}  # tombstone: withdrawn
    # a whole product replaces the row: re-listed without in_stock, it is on sale again; other columns are kept
    withdrawn = {**SHIRT, "in_stock": False, "description": "linen"}
    relisted = parse_update(orjson.dumps({k: v for k, v in SHIRT.items() if k != "in_stock"}), b"p-shirt",
                            {"p-shirt": withdrawn})
    assert relisted == {**SHIRT, "in_stock": True, "description": "linen"}
    # a null means "not given", as over HTTP
    assert parse_update(orjson.dumps({"item_id": "p-shirt", "brand": None, "price": 9.5}), None,
                        {"p-shirt": row}) == {**SHIRT, "price": 9.5}


@pytest.mark.parametrize("raw,key,reason,says", [
    (orjson.dumps({"item_id": "p-new", "in_stock": False}), b"p-new", "missing_field", "partial update needs a product"),
    (None, b"p-gone", "unknown_item", "not in the catalog"),
    (orjson.dumps(SHIRT), b"p-other", "key_mismatch", "key must be its item_id"),
    (orjson.dumps({**SHIRT, "schema_version": 2}), b"p-shirt", "schema", "schema_version"),
    (orjson.dumps({"item_id": "p-shirt", "in_stok": False}), b"p-shirt", "unknown_field", "in_stok"),
    (orjson.dumps({**SHIRT, "price": -1}), b"p-shirt", "schema", "price"),
    (orjson.dumps({**SHIRT, "item_id": "bad id\n"}), None, "schema", "item_id"),
    (orjson.dumps([SHIRT]), b"p-shirt", "schema", "JSON object"),
    (b'{"item_id": "p-shirt",', b"p-shirt", "invalid_json", "not valid JSON"),
    (b"\xff\xfe\x00", b"p-shirt", "undecodable", "UTF-8"),
    (b"", b"p-shirt", "empty", "no value"),
    (b'{"item_id": "p-shirt", "title": "' + b"x" * 20_000 + b'"}', b"p-shirt", "oversized", "limit"),
    # created_at in seconds reads as January 1970 in ms; 3 years ahead made a product "new" until then
    (orjson.dumps({**SHIRT, "created_at": NOW_MS // 1000}), b"p-shirt", "created_at_too_old",
     f"it looks like epoch seconds: send {NOW_MS // 1000 * 1000}"),
    (orjson.dumps({**SHIRT, "created_at": 0}), b"p-shirt", "created_at_too_old", "before 2000-01-01"),
    (orjson.dumps({**SHIRT, "created_at": NOW_MS + 3 * 365 * 86_400_000}), b"p-shirt", "created_at_in_future",
     "in the future"),
    (orjson.dumps({**SHIRT, "created_at": NOW_MS * 1000}), b"p-shirt", "created_at_in_future",
     f"looks like epoch microseconds: send {NOW_MS}"),
    (orjson.dumps({"item_id": "p-shirt", "created_at": 1_796_607_026}), b"p-shirt", "created_at_too_old",
     "as UTC epoch milliseconds"),  # a partial record is checked too
    # what the catalog's Great Expectations suite would refuse (and so stop every train_job) is refused here
    (orjson.dumps({**SHIRT, "price": 250_000.0}), b"p-shirt", "schema", "price"),
    (orjson.dumps({**SHIRT, "price": 0.001}), b"p-shirt", "schema", "price"),
    (orjson.dumps({**SHIRT, "price": "inf"}), b"p-shirt", "schema", "price"),  # read as infinity, then written as null
    (orjson.dumps({"item_id": "p-shirt", "price": "NaN"}), b"p-shirt", "schema", "price"),
    (orjson.dumps({**SHIRT, "category": ""}), b"p-shirt", "schema", "category"),
])
def test_a_bad_catalog_record_is_refused_with_a_reason_that_says_what_to_fix(raw, key, reason, says):
    with pytest.raises(EventError) as err:
        parse_update(raw, key, {})
    assert err.value.reason == reason
    assert says in err.value.message


def test_a_product_wrong_in_several_fields_is_refused_naming_each_of_them():
    """Whoever fixes a product file sees every problem of a record at once, not one per attempt."""
    bad = {**SHIRT, "price": -3, "category": 5, "colour": "red"}
    with pytest.raises(EventError) as err:
        parse_update(orjson.dumps(bad), b"p-shirt", {})
    assert err.value.reason == "schema"
    for says in ("price", "category", "'colour' is not a field"):
        assert says in err.value.message
    many = {**SHIRT, **{f"x{i}": 1 for i in range(9)}}
    with pytest.raises(EventError) as err:
        parse_update(orjson.dumps(many), b"p-shirt", {})
    assert err.value.message.count("is not a field") == 5 and err.value.message.endswith("and 4 more")


def test_a_created_at_within_the_clock_skew_or_long_ago_is_accepted():
    for created_at in (NOW_MS + 60_000, 946_684_800_000, NOW_MS - 20 * 365 * 86_400_000):
        row = parse_update(orjson.dumps({**SHIRT, "created_at": created_at}), b"p-shirt", {})
        assert row["created_at"] == created_at


def _publish(settings, records: list[tuple[str | None, bytes | None]]) -> None:
    producer = kafka_io.make_producer(settings)
    try:
        for f in [producer.send(settings.kafka_topic_catalog, key=k, value=v) for k, v in records]:
            f.get(timeout=30)
    finally:
        producer.close()


def _dlq_reasons(settings, keys: set[bytes]) -> dict[bytes, str]:
    found = {}
    for rec in topic_records(settings, settings.kafka_topic_dlq):
        if rec.key in keys:
            headers = dict(rec.headers)
            assert headers["source_topic"] == settings.kafka_topic_catalog.encode()  # told apart from events
            found[rec.key] = headers["reason"].decode()
        if len(found) == len(keys):
            break
    return found


@pytest.fixture()
def feed_settings(settings):
    """The test's settings with a catalog topic of its own (the session's broker is shared)."""
    own = settings.model_copy(update={"kafka_topic_catalog": f"shop.catalog.{uuid.uuid4().hex[:8]}"})
    kafka_io.ensure_topics(own)
    return own


@contextmanager
def running(sync: CatalogSync):
    """``sync.run`` in a thread (polling without pauses, as in production) until the block ends."""
    stop = threading.Event()
    worker = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    worker.start()
    try:
        yield sync
    finally:
        stop.set()
        worker.join(30)


def test_the_sync_applies_upserts_to_the_catalog_file_quarantines_bad_ones_and_resumes_after_a_restart(
        feed_settings, redis_client):
    settings = feed_settings
    state = OnlineState(redis_client)
    tag = uuid.uuid4().hex[:8]
    base = simulator.make_catalog(50, seed=3)
    base["item_id"] = [f"{tag}-{i}" for i in range(len(base))]
    simulator.save_catalog(base, settings.catalog_path)
    new = {**SHIRT, "item_id": f"{tag}-new"}
    sold_out, withdrawn = f"{tag}-1", f"{tag}-2"
    bad = {f"{tag}-bad-json".encode(): b"{nope",
           f"{tag}-bad-price".encode(): orjson.dumps({**new, "item_id": f"{tag}-bad-price", "price": 0}),
           f"{tag}-unknown".encode(): orjson.dumps({"item_id": f"{tag}-unknown", "in_stock": False}),
           f"{tag}-seconds".encode(): orjson.dumps({**new, "item_id": f"{tag}-seconds", "created_at": NOW_MS // 1000}),
           f"{tag}-future".encode(): orjson.dumps({**new, "item_id": f"{tag}-future",
                                                   "created_at": NOW_MS + 3 * 365 * 86_400_000}),
           # a partial update may not move a known product's created_at out of range either
           f"{tag}-3".encode(): orjson.dumps({"item_id": f"{tag}-3", "created_at": NOW_MS // 1000})}
    _publish(settings, [(new["item_id"], catalog_feed.item_record(new)), *bad.items(),
                        (sold_out, catalog_feed.item_record({"item_id": sold_out, "in_stock": False})),
                        (withdrawn, None)])

    with running(CatalogSync(settings, state=state)) as sync:
        wait_until(lambda: sync.counts["records"] >= 9, timeout=60, what="the sync to handle every record")
    cat = pd.read_parquet(settings.catalog_path).set_index("item_id")
    assert len(cat) == 51 and cat.loc[new["item_id"], "title"] == SHIRT["title"]
    assert cat.loc[f"{tag}-3", "created_at"] == base.set_index("item_id").loc[f"{tag}-3", "created_at"]
    assert not cat.loc[sold_out, "in_stock"] and not cat.loc[withdrawn, "in_stock"]
    assert cat.loc[sold_out, "title"] == base.set_index("item_id").loc[sold_out, "title"]  # the rest kept
    was = base.set_index("item_id")["in_stock"]
    assert cat["in_stock"].sum() == was.sum() + 1 - was[[sold_out, withdrawn]].sum()  # nothing else changed
    assert _dlq_reasons(settings, set(bad)) == {f"{tag}-bad-json".encode(): "invalid_json",
                                                f"{tag}-bad-price".encode(): "schema",
                                                f"{tag}-unknown".encode(): "missing_field",
                                                f"{tag}-seconds".encode(): "created_at_too_old",
                                                f"{tag}-future".encode(): "created_at_in_future",
                                                f"{tag}-3".encode(): "created_at_too_old"}

    # the dashboard's Overview: rejects counted with the events', and what the catalog holds
    assert state.dlq_reasons() == {"catalog_invalid_json": 1, "catalog_schema": 1, "catalog_missing_field": 1,
                                   "catalog_created_at_too_old": 2, "catalog_created_at_in_future": 1}
    line = dd.catalog_line(state.catalog_status())
    assert line.startswith(f"Catalog: 51 products ({51 - cat['in_stock'].sum()} out of stock)") and "6 catalog" in line

    # serving's rules see the new product (an exploration candidate) and the two that left the shelf
    rules = Catalog(settings.catalog_path, reload_s=0.01)
    rules.maybe_reload()
    assert rules.new_items == [new["item_id"]] and {sold_out, withdrawn} <= rules.out_of_stock

    # offsets were committed: a restarted sync gets only what came after, and it is applied to the file as it is
    _publish(settings, [(new["item_id"], catalog_feed.item_record({"item_id": new["item_id"], "price": 29.9}))])
    with running(CatalogSync(settings)) as again:
        wait_until(lambda: again.counts["records"] >= 1, timeout=60, what="the restarted sync to handle the new record")
    assert again.counts["records"] == 1
    cat = pd.read_parquet(settings.catalog_path).set_index("item_id")
    assert cat.loc[new["item_id"], "price"] == 29.9 and len(cat) == 51 and not cat.loc[sold_out, "in_stock"]


def test_products_that_appear_in_the_live_simulator_reach_the_catalog_through_the_feed(feed_settings):
    settings = feed_settings
    sim = simulator.ShopSimulator(simulator.make_catalog(200, seed=5), n_users=50, seed=5, new_item_rate=3600.0)
    simulator.save_catalog(sim.catalog, settings.catalog_path)
    producer = kafka_io.make_producer(settings)
    try:
        sim.run_live(lambda evs: None, rate_eps=50, duration_s=3.0,
                     catalog_fn=lambda items: catalog_feed.publish_items(producer, items, settings.kafka_topic_catalog))
        producer.flush()
    finally:
        producer.close()
    appeared = {it["item_id"] for it in sim.new_items}
    assert appeared, "the simulator made no new product in 3 s at 1 per second"
    with running(CatalogSync(settings)):
        wait_until(lambda: appeared <= set(lake.read_parquet(settings.catalog_path).item_id), timeout=60,
                   what="the new products in the catalog file")
    assert len(pd.read_parquet(settings.catalog_path)) == 200 + len(appeared)


def test_a_backfill_writes_the_products_that_appeared_during_it_into_the_catalog(settings):
    from pipelines.cli import app

    res = CliRunner().invoke(app, ["simulate", "--backfill", "1", "--events-per-day", "3000"])
    assert res.exit_code == 0, res.output
    catalog = set(pd.read_parquet(settings.catalog_path).item_id)
    named = set(lake.read_all(settings.lake_dir).item_id.dropna())
    assert len(catalog) > 5000  # the products that appeared during the simulated day
    assert named <= catalog, f"events name products missing from the catalog: {sorted(named - catalog)[:5]}"


def test_a_catalog_file_from_elsewhere_keeps_its_columns_and_gets_epoch_ms(tmp_path):
    """A shop's own file: timestamps for created_at, a missing brand, an extra content column."""
    path = tmp_path / "catalog.parquet"
    pd.DataFrame({"item_id": ["a", "b"], "title": ["Mug", "Pan"], "category": ["home", "home"],
                  "brand": ["Acme", None], "price": [5.0, 20.0],
                  "created_at": pd.to_datetime([NOW_MS, NOW_MS - 1000], unit="ms", utc=True),
                  "in_stock": [True, True], "description": ["blue mug", "iron pan"]}).to_parquet(path)
    rows = catalog_feed.read_catalog(path)
    assert rows["a"]["created_at"] == NOW_MS
    rows["b"] = parse_update(orjson.dumps({"item_id": "b", "in_stock": False}), b"b", rows)  # null brand kept
    rows["c"] = parse_update(catalog_feed.item_record({**SHIRT, "item_id": "c"}), b"c", rows)
    catalog_feed.write_catalog(rows, path)
    back = pd.read_parquet(path).set_index("item_id")
    assert list(back.columns)[-1] == "description" and back.loc["a", "description"] == "blue mug"
    assert back["created_at"].tolist() == [NOW_MS, NOW_MS - 1000, NOW_MS] and str(back["created_at"].dtype) == "int64"
    assert not back.loc["b", "in_stock"] and pd.isna(back.loc["b", "brand"]) and pd.isna(back.loc["c", "description"])


def test_a_backfill_adds_its_new_products_without_undoing_the_feed(tmp_path):
    path = tmp_path / "catalog.parquet"
    base = simulator.make_catalog(20, seed=2)
    simulator.save_catalog(base, path)
    rows = catalog_feed.read_catalog(path)  # the feed withdraws a product meanwhile
    first = str(base.item_id[0])
    rows[first] = parse_update(None, first.encode(), rows)
    catalog_feed.write_catalog(rows, path)
    grown = pd.concat([base, simulator.make_catalog(22, seed=2).tail(2).assign(item_id=["n1", "n2"])])
    assert simulator.add_to_catalog(grown, path) == 2
    back = pd.read_parquet(path).set_index("item_id")
    assert len(back) == 22 and not back.loc[first, "in_stock"]


def test_catalog_publish_reads_each_file_kind_checks_every_record_first_and_sends_them(feed_settings, tmp_path,
                                                                                       monkeypatch):
    from pipelines.cli import app

    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_CATALOG", feed_settings.kafka_topic_catalog)
    get_settings.cache_clear()
    lamp = {"item_id": "00042", "title": "Desk lamp", "category": "home", "brand": "Acme", "price": 25.0,
            "created_at": NOW_MS}
    (tmp_path / "p.jsonl").write_bytes(orjson.dumps(lamp) + b"\n\n" + orjson.dumps({"item_id": "7", "in_stock": False}))
    (tmp_path / "p.csv").write_text("item_id,title,category,brand,price,created_at,in_stock\n"
                                    f"00043,Pan,home,Acme,19.5,{NOW_MS},false\n00044,,,,,,true\n")
    pd.DataFrame([{**lamp, "item_id": "00045", "created_at": pd.Timestamp(NOW_MS, unit="ms", tz="UTC")}]
                 ).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "bad.jsonl").write_bytes(orjson.dumps({**lamp, "price": -1}) + b"\n" + orjson.dumps({"item_id": 42}))
    runner = CliRunner()
    bad = runner.invoke(app, ["catalog", "publish", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 1 and "record 1: schema: price" in bad.output and "nothing was sent" in bad.output
    (tmp_path / "empty.csv").write_text("item_id,title\n")  # said "sent 0 products" and succeeded
    (tmp_path / "fake.parquet").write_text("not parquet")  # named a "<Buffer>", not the file
    for name, says in (("empty.csv", "empty.csv holds no product records"), ("fake.parquet", "fake.parquet is not a")):
        res = runner.invoke(app, ["catalog", "publish", str(tmp_path / name)])
        assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output
    for name in ("p.jsonl", "p.csv", "p.parquet"):
        res = runner.invoke(app, ["catalog", "publish", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    consumer = KafkaConsumer(feed_settings.kafka_topic_catalog, auto_offset_reset="earliest", consumer_timeout_ms=5000,
                             **feed_settings.kafka_client_kwargs())
    got = [orjson.loads(r.value) for r in consumer]
    consumer.close()
    assert [g["item_id"] for g in got] == ["00042", "7", "00043", "00044", "00045"]  # ids keep their zeros
    assert got[2]["in_stock"] is False and got[2]["price"] == 19.5 and got[2]["created_at"] == NOW_MS
    assert got[3] == {"item_id": "00044", "in_stock": True, "schema_version": 1}  # empty cells are not given
    assert got[4]["created_at"] == NOW_MS
