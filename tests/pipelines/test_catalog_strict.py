"""Catalog records are as strict as events: a JSON value of another type is refused with what to send, not
converted (`"price": true` was stored as 1.0, `"in_stock": "no"` as false); CSV cells, all text, are converted by
the field's type first; `catalog publish` names changes to products the catalog does not have, as `POST /catalog`
does. No broker: the producer is a fake."""

from __future__ import annotations

import time

import orjson
import pytest
from typer.testing import CliRunner

from pipelines import catalog_feed, kafka_io, simulator
from pipelines.catalog_feed import parse_update, read_product_file
from pipelines.cli import app
from pipelines.schemas import EventError, validate_catalog_update
from pipelines.settings import get_settings

NOW_MS = int(time.time() * 1000)
LAMP = {"item_id": "00042", "title": "Desk lamp", "category": "home", "brand": "Acme", "price": 25.0,
        "created_at": NOW_MS}


@pytest.mark.parametrize("field,value,says", [
    ("price", True, "price: send a JSON number (e.g. 19.9), not true"),
    ("price", "12", "price: send a JSON number (e.g. 19.9), not the string '12'"),
    ("in_stock", "no", "in_stock: send true or false (a JSON boolean), not the string 'no'"),
    ("in_stock", "yes", "in_stock: send true or false"),
    ("in_stock", 1, "in_stock: send true or false (a JSON boolean), not the number 1"),
    ("created_at", str(NOW_MS), (f"created_at: send the time the product was added as UTC epoch milliseconds (a JSON "
                                 f"integer), not the string '{NOW_MS}': send {NOW_MS}")),
    ("created_at", float(NOW_MS), f"send {NOW_MS}"),
    ("title", 42, "title: send a JSON string, not the number 42"),
    ("brand", ["Acme"], "brand: send a JSON string, not an array"),
])
def test_a_value_of_another_json_type_is_refused_with_what_to_send(field, value, says):
    for record in ({**LAMP, field: value}, {"item_id": "00042", field: value}):  # whole and partial
        with pytest.raises(EventError) as err:
            validate_catalog_update(record)
        assert err.value.reason == "schema" and says in err.value.message, err.value.message
        # the feed reads the same record from Kafka and refuses it for the same reason
        with pytest.raises(EventError) as err:
            parse_update(orjson.dumps(record), b"00042", {"00042": LAMP})
        assert says in err.value.message


def test_a_json_integer_is_still_a_price_and_every_wrong_field_is_named():
    assert validate_catalog_update({**LAMP, "price": 25}).price == 25.0
    with pytest.raises(EventError) as err:
        validate_catalog_update({**LAMP, "price": "1", "in_stock": "no", "title": 1})
    assert all(f in err.value.message for f in ("price:", "in_stock:", "title:")), err.value.message


def test_a_product_wrong_in_several_fields_names_each_created_at_s_bounds_too():
    """price 0, an empty category and created_at in epoch seconds named category and price only: the created_at
    problem showed once they were fixed, because its bounds were checked after pydantic's fields."""
    seconds = NOW_MS // 1000
    record = {**LAMP, "price": 0, "category": "", "created_at": seconds}
    with pytest.raises(EventError) as err:
        validate_catalog_update(record)
    message = err.value.message
    assert err.value.reason == "schema", err.value.reason  # the first problem's, as before
    assert message.startswith("category: ") and "; also price: " in message, message
    assert f"; created_at {seconds} is " in message and f"epoch seconds: send {seconds * 1000})" in message
    with pytest.raises(EventError) as err:  # what the catalog feed sends to the DLQ says the same
        parse_update(orjson.dumps(record), b"00042", {})
    assert err.value.message == message
    # one wrong field and a created_at ahead: both named; created_at alone: its own reason, as before
    with pytest.raises(EventError) as err:
        validate_catalog_update({**LAMP, "title": 1, "created_at": NOW_MS + 10**12})
    assert "title: send a JSON string" in err.value.message and "; also created_at " in err.value.message
    with pytest.raises(EventError) as err:
        validate_catalog_update({**LAMP, "created_at": seconds})
    assert err.value.reason == "created_at_too_old" and "; also" not in err.value.message


def test_an_item_id_that_is_no_id_says_what_an_id_is():
    with pytest.raises(EventError) as err:
        validate_catalog_update({**LAMP, "item_id": "lamp 42"})
    assert err.value.message == ("item_id: send a JSON string of 1 to 128 letters, digits or _.:@-, not the string "
                                 "'lamp 42'"), err.value.message


@pytest.mark.parametrize("sent,converted", [
    ("2026-12-07T12:00:00Z", "send 1796644800000"),
    ("2026-12-07T13:00:00+01:00", "send 1796644800000"),
    ("2026-12-07T12:00:00", "send 1796644800000 (read as UTC)"),
    ("1796644800", "send 1796644800000"),  # epoch seconds, as a string
])
def test_an_iso_or_string_created_at_says_to_send_epoch_ms_and_which(sent, converted):
    """It said `Input should be a valid integer, unable to parse string as an integer` and nothing more."""
    now = 1796644800000 + 3_600_000
    with pytest.raises(EventError) as err:
        validate_catalog_update({**LAMP, "created_at": sent}, now_ms=now)
    assert "UTC epoch milliseconds" in err.value.message and err.value.message.endswith(converted), err.value.message
    with pytest.raises(EventError) as err:  # nothing plausible to convert to: no guess
        validate_catalog_update({**LAMP, "created_at": "yesterday"}, now_ms=now)
    assert err.value.message.endswith("not the string 'yesterday'")
    with pytest.raises(EventError):  # digits beyond int()'s limit: an EventError, not a ValueError (a 500)
        validate_catalog_update({**LAMP, "created_at": "9" * 5000})


def test_csv_cells_are_converted_by_the_field_types_and_a_cell_that_does_not_convert_is_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("item_id,title,category,brand,price,created_at,in_stock\n"
                    f"00043,Pan,home,Acme,19.5,{NOW_MS},FALSE\n00044,,,,,,True\n0045,1984,books,Orwell,12,{NOW_MS},\n")
    rows = read_product_file(path)
    assert rows == [{"item_id": "00043", "title": "Pan", "category": "home", "brand": "Acme", "price": 19.5,
                     "created_at": NOW_MS, "in_stock": False},
                    {"item_id": "00044", "in_stock": True},
                    {"item_id": "0045", "title": "1984", "category": "books", "brand": "Orwell", "price": 12.0,
                     "created_at": NOW_MS}]  # text fields stay text: ids keep their zeros, a title of digits too
    assert all(validate_catalog_update(r) for r in rows)
    path.write_text("item_id,price,in_stock,created_at\nA,cheap,yes,2026-12-07\nB,1,no,1\n")
    with pytest.raises(ValueError) as err:
        read_product_file(path)
    msg = str(err.value)
    for says in ("row 1, column 'price': 'cheap' is not a number",
                 "row 1, column 'in_stock': 'yes' is not true or false",
                 "row 1, column 'created_at': '2026-12-07' is not an integer", "row 2, column 'in_stock'"):
        assert says in msg, msg


def test_the_simulators_products_pass_the_strict_checks(tmp_path):
    catalog = simulator.make_catalog(50, seed=1)
    simulator.validate_catalog(catalog)
    path = tmp_path / "catalog.parquet"
    simulator.save_catalog(catalog, path)
    for rec in read_product_file(path):  # a Parquet file keeps its types
        validate_catalog_update(rec)
    for rec in catalog.to_dict("records"):  # as the live simulator sends them
        parse_update(catalog_feed.item_record(rec), rec["item_id"].encode(), {})


class FakeFuture:
    def get(self, timeout=None):
        return None


class FakeProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, orjson.loads(value)))
        return FakeFuture()

    def close(self):
        pass


@pytest.fixture()
def publish(tmp_path, monkeypatch):
    """``shoprec catalog publish`` with a var dir holding a catalog of ``00042`` and a fake producer."""
    monkeypatch.setenv("SHOPREC_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    catalog_feed.write_catalog({"00042": {**LAMP, "in_stock": True}}, get_settings().catalog_path)
    producer = FakeProducer()
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda s: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda s: producer)

    def run(name: str, lines: list[dict]):
        path = tmp_path / name
        path.write_bytes(b"\n".join(orjson.dumps(r) for r in lines))
        return CliRunner().invoke(app, ["catalog", "publish", str(path)]), producer.sent

    yield run
    get_settings.cache_clear()


def test_publish_names_changes_to_products_the_catalog_does_not_have(publish):
    """It printed `sent 1 products to shop.catalog` and exited 0; the feed then dropped the change."""
    res, sent = publish("p.jsonl", [{"item_id": "zzz-unknown", "in_stock": False}])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "sent 1 product to shop.catalog" in out
    assert "warning: 1 record(s) change a product the catalog does not have yet (zzz-unknown)" in out
    assert "catalog_missing_field" in out and "send the whole product" in out
    assert sent == [("shop.catalog", "zzz-unknown", {"item_id": "zzz-unknown", "in_stock": False,
                                                     "schema_version": 1})]


def test_publish_warns_about_nothing_the_catalog_or_the_file_has_whole(publish):
    res, _ = publish("p.jsonl", [{"item_id": "00042", "in_stock": False}, {**LAMP, "item_id": "n1"}])
    assert res.exit_code == 0, res.output
    assert "sent 2 products" in res.output and "warning" not in res.output
    res, _ = publish("bad.jsonl", [{"item_id": "00042", "in_stock": "no"}])
    assert res.exit_code == 1 and "in_stock: send true or false" in " ".join(res.output.split())


def test_publish_names_the_csv_cell_that_does_not_convert(publish, tmp_path):
    (tmp_path / "p.csv").write_text("item_id,in_stock\n00042,no\n")
    res = CliRunner().invoke(app, ["catalog", "publish", str(tmp_path / "p.csv")])
    text = " ".join(res.output.replace("│", " ").split())  # rich's error box wraps the message
    assert res.exit_code == 2 and "p.csv: row 1, column 'in_stock': 'no' is not true or false" in text, text
