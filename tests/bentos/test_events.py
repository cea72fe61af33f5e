"""``POST /events`` through the BentoML service's ASGI app: keys, limits, validation, Kafka acks."""

from __future__ import annotations

import json
import time
import uuid

import pandas as pd
import pytest
from starlette.testclient import TestClient

from pipelines import kafka_io
from pipelines.schemas import new_event
from pipelines.settings import get_settings
from tests.bentos.test_service import _forget_bentoml_metrics
from tests.topics import topic_records


@pytest.fixture()
def events_client(settings, redis_client, monkeypatch):
    """The service's ASGI app with two valid keys, small limits and a fresh rate-limit budget per test."""
    keys = [f"key-a-{uuid.uuid4().hex[:6]}", f"key-b-{uuid.uuid4().hex[:6]}"]
    monkeypatch.setenv("SHOPREC_API_KEYS", json.dumps(keys))
    monkeypatch.setenv("SHOPREC_MAX_REQUEST_BYTES", "20000")
    monkeypatch.setenv("SHOPREC_MAX_EVENTS_PER_REQUEST", "20")
    monkeypatch.setenv("SHOPREC_EVENTS_RATE_LIMIT", "5/minute")
    get_settings.cache_clear()
    kafka_io.ensure_topics(get_settings())
    from bentos import service

    _forget_bentoml_metrics()
    with TestClient(service.Shoprec.to_asgi()) as c:
        yield c, [{"Authorization": f"Bearer {k}"} for k in keys]
    get_settings.cache_clear()


def _event(tag: str, **change) -> dict:
    return {**new_event("view", f"u-{tag}", "item-1", f"s-{tag}"), **change}


def test_401_without_a_valid_key_and_every_configured_key_works(events_client):
    c, (key_a, key_b) = events_client
    body = {"events": [_event("k")]}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5"}):
        r = c.post("/events", json=body, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    # two keys valid at once: the old one keeps working while clients move to the new one
    assert c.post("/events", json=body, headers=key_a).status_code == 202
    assert c.post("/events", json={"events": [_event("k")]}, headers=key_b).status_code == 202


def test_413_over_the_body_size_or_the_batch_length(events_client):
    c, (key, _) = events_client
    big = {"events": [_event("big", model_version="x" * 60) for _ in range(100)]}  # > 20,000 bytes
    r = c.post("/events", json=big, headers=key)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the guard must count what it reads
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]
    assert c.post("/events", content=chunks(), headers={**key, "Content-Type": "application/json"}).status_code == 413

    long = {"events": [_event("long") for _ in range(21)]}  # small in bytes, over 20 events
    r = c.post("/events", json=long, headers=key)
    assert r.status_code == 413 and "split the batch" in r.json()["error"]


def test_415_without_a_content_type_or_with_another_one(events_client):
    """README: anything but application/json is a 415; a POST without the header was read as JSON and answered
    202 (``{"accepted": 0}`` for an empty batch), so a client that forgot it never found out."""
    c, (key, _) = events_client
    for path, body in (("/events", b'{"events": []}'), ("/catalog", b'{"products": []}')):
        r = c.post(path, content=body, headers=key)  # httpx sets no Content-Type for raw content
        assert r.status_code == 415, (path, r.text)
        assert r.json()["error"] == ("a request without a Content-Type is not supported: send a JSON body with "
                                     "'Content-Type: application/json'")
    r = c.post("/events", content=b'{"events": []}', headers={**key, "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"] == (
        "Content-Type 'text/plain' is not supported: send a JSON body with 'Content-Type: application/json'")
    ok = c.post("/events", content=b'{"events": []}',
                headers={**key, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 202 and ok.json() == {"accepted": 0}


def test_a_wrong_content_type_is_415_before_the_body_is_read_and_the_key_comes_first(events_client):
    """A CSV or text body got the guard's 400 about its JSON (the guard read it before JsonOnly saw the header);
    the same header with a JSON body got 415. The key is judged first everywhere, then the Content-Type."""
    c, (key_a, key_b) = events_client
    text_plain = "Content-Type 'text/plain' is not supported: send a JSON body with 'Content-Type: application/json'"
    r = c.post("/catalog", content=b"a,b", headers={**key_a, "Content-Type": "text/csv"})
    assert r.status_code == 415 and r.json()["error"].startswith("Content-Type 'text/csv' is not supported"), r.text
    for body in (b'{"products": []}', b'{"events": []}', b"not json at all", b""):
        r = c.post("/events", content=body, headers={**key_a, "Content-Type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"] == text_plain, (body, r.text)
    # without a valid key: 401 whatever the Content-Type, on the ingestion and the read routes alike
    for path in ("/events", "/catalog", "/recommend"):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            r = c.post(path, content=b"a,b", headers={**headers, "Content-Type": "text/csv"})
            assert r.status_code == 401 and "API key" in r.json()["error"], (path, r.text)
    r = c.post("/recommend", content=b"a,b", headers={**key_a, "Content-Type": "text/csv"})
    assert r.status_code == 415, r.text
    # refused on its header, a request costs the key none of its rate limit (5/minute here)
    for _ in range(6):
        assert c.post("/events", content=b"a,b", headers={**key_b, "Content-Type": "text/csv"}).status_code == 415
    assert c.post("/events", json={"events": [_event("ct")]}, headers=key_b).status_code == 202


def test_a_body_that_is_not_a_json_batch_is_a_400_that_says_what_to_send_and_logs_no_traceback(events_client, caplog):
    c, (key_a, key_b) = events_client
    cases = [(key_a, "/events", b'{"events": [{"event_id": "x",', "the body is not valid JSON: unexpected end of data "
              "at line 1 column 30 (char 29); send a JSON object {\"events\": [...]}"),
             (key_a, "/events", b"[]", "the body is a JSON array, not an object"),
             (key_a, "/catalog", b"", "the body is empty; send a JSON object {\"products\": [...]}"),
             (key_b, "/catalog", b'{"products": {"item_id": "a"}}', "'products' is a JSON object, not an array"),
             (key_b, "/catalog", b'{"events": []}', "the body has no 'products' field"),
             (key_a, "/events", b'{"events": [], "event": [{}]}', "the body has field(s) other than 'events': 'event'")]
    with caplog.at_level("INFO"):
        for key, path, body, says in cases:
            r = c.post(path, content=body, headers={**key, "Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert says in r.json()["error"] and "pydantic" not in r.text and "validation error" not in r.text
            assert "'Content-Type: application/json'" in r.json()["error"]
        assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info], \
            [rec.getMessage() for rec in caplog.records]
        # a request BentoML's own validation refuses is one INFO line with the reason, not an ERROR traceback
        caplog.clear()
        assert c.post("/recommend", json={"user_id": "u0", "k": 0}, headers=key_a).status_code == 400
        assert not [rec for rec in caplog.records if rec.levelname == "ERROR" or rec.exc_info]
        refused = [rec.getMessage() for rec in caplog.records if "answered 400" in rec.getMessage()]
        assert len(refused) == 1 and refused[0].startswith("/recommend [POST] answered 400: k: Input should be "
                                                           "greater than or equal to 1"), refused  # the field, not "Input"


def test_each_refused_ingestion_request_is_one_info_line_without_the_key(events_client, caplog):
    """README: "a refused request is one INFO line". The 401, 413, 415 and 400 answers of /events logged nothing."""
    import logging

    c, (key, _) = events_client
    caplog.set_level(logging.INFO)
    body = {"events": [_event("r")]}
    sent = [
        (401, c.post("/events", json=body, headers={"Authorization": "Bearer not-a-key-x1"})),
        (415, c.post("/events", content=b"{}", headers={**key, "content-type": "text/csv"})),
        (413, c.post("/events", json={"events": [_event("r") for _ in range(21)]}, headers=key)),
        (400, c.post("/events", json={"events": [_event("r", price="12\nforged line")]}, headers=key)),
    ]
    assert [r.status_code for _, r in sent] == [s for s, _ in sent]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert [int(line.split(": ", 1)[1][:3]) for line in lines] == [401, 415, 413, 400], lines
    assert all("/events" in line and "\n" not in line for line in lines), lines  # one line each, newlines escaped
    assert not any("not-a-key" in r.getMessage() or key["Authorization"][7:] in r.getMessage()
                   for r in caplog.records)


def test_an_unknown_path_is_a_404_here_and_known_routes_still_work(events_client):
    c, (key, _) = events_client
    for path in (f"/{uuid.uuid4().hex}{'a' * 2000}", "/no-such-route", "/events/x"):
        r = c.post(path, json={})
        assert r.status_code == 404 and "/docs.json" in r.json()["error"], (path, r.text)
    assert c.post("/ping", json={}).status_code == 200
    for path in ("/ping", "/recommend", "/status"):  # a GET where the API takes a POST: JSON, like every error
        r = c.get(path, headers=key)
        assert r.status_code == 405 and "use POST" in r.json()["error"] and r.headers["allow"] == "POST", r.text
    assert c.get("/healthz").status_code == 200 and c.get("/docs.json").status_code == 200
    assert c.post("/events", json={"events": []}, headers=key).status_code == 202


def test_the_swagger_ui_can_send_the_api_key(events_client):
    """The schema behind the Swagger UI declares the key on the keyed routes, so "Authorize" sends it."""
    c, (key, _) = events_client
    r = c.get("/docs.json")
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    spec = r.json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {**spec["components"]["securitySchemes"]["apiKey"],
                                                              "type": "http", "scheme": "bearer"}
    keyed = {path for path, item in spec["paths"].items() for op in item.values() if op.get("security")}
    assert keyed == {"/recommend", "/similar", "/status", "/events", "/catalog"}
    # and the answers the guard gives before BentoML sees the request
    assert {"401", "413", "415"} <= set(spec["paths"]["/recommend"]["post"]["responses"])
    assert {"401", "403", "413", "429"} <= set(spec["paths"]["/events"]["post"]["responses"])
    assert "429" not in spec["paths"]["/recommend"]["post"]["responses"]
    assert spec["components"]["schemas"] and "/ping" in spec["paths"]  # BentoML's schema is otherwise whole
    # "Try it out" fills in a batch the API accepts (it sent ["string"], a 400)
    examples = _examples(spec)
    assert c.post("/events", json={"events": examples["events"]}, headers=key).status_code == 202
    assert c.post("/catalog", json={"products": examples["products"]}, headers=key).status_code == 202


def _examples(spec: dict) -> dict[str, list]:
    """The "Try it out" batch of each ingestion route, as the request body of its operation declares it."""
    out = {}
    for path, field in (("/events", "events"), ("/catalog", "products")):
        prop = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][field]
        out[field] = prop["example"]
    return out


def test_the_schema_describes_this_api_and_its_answers(events_client):
    """/docs.json showed BentoML's boilerplate README with broken badges, version "None", and "200: Successful
    Response" on /events and /catalog, which answer 202."""
    import importlib.metadata

    c, (key, _) = events_client
    spec = c.get("/docs.json").json()
    info = spec["info"]
    assert info["version"] == importlib.metadata.version("shoprec") != "None"
    text = info["description"]
    assert "Machine Learning Service created with BentoML" not in text and "img.shields.io" not in text
    assert "customize this README" not in text and "BentoML Team" not in str(info)
    for route in ("/recommend", "/similar", "/events", "/catalog", "/status", "/ping"):
        assert f"`POST {route}`" in text, route
    assert "Authorization: Bearer <key>" in text and "README.md" in text
    for path in ("/events", "/catalog"):
        answers = spec["paths"][path]["post"]["responses"]
        assert "200" not in answers and "accepted" in answers["202"]["content"]["application/json"]["schema"]["properties"]
        assert "errors" in answers["400"]["content"]["application/json"]["schema"]["properties"]
    assert "unknown_products" in spec["paths"]["/catalog"]["post"]["responses"]["202"]["content"]["application/json"][
        "schema"]["properties"]
    assert "detail" in spec["paths"]["/recommend"]["post"]["responses"]["400"]["content"]["application/json"][
        "schema"]["properties"]
    # what the schema says is what a client gets
    r = c.post("/events", json={"events": [_event("doc")]}, headers=key)
    assert r.status_code == 202 and set(r.json()) <= set(
        spec["paths"]["/events"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]["properties"])


def test_try_it_out_can_be_sent_again_and_touches_no_real_product(events_client):
    """The /events example had one event_id for the server's life: from the second try on, the consumer dropped it
    as a duplicate after its 202. The /catalog example marked the README's own product i00042 sold out."""
    c, (key, _) = events_client
    first, second = _examples(c.get("/docs.json").json()), _examples(c.get("/docs.json").json())
    [ev1], [ev2] = first["events"], second["events"]
    assert ev1["event_id"] != ev2["event_id"] and ev2["ts"] >= ev1["ts"]
    for batch in (first["events"], second["events"]):
        assert c.post("/events", json={"events": batch}, headers=key).status_code == 202
    # both are in Kafka under their own ids: neither is the other's duplicate
    assert _in_kafka({ev1["event_id"], ev2["event_id"]}) == {ev1["event_id"], ev2["event_id"]}

    [product] = second["products"]
    assert product["item_id"].startswith("example-") and product["in_stock"] is False  # never recommended
    assert {"title", "category", "brand", "price", "created_at"} <= set(product)  # a whole product, not a change
    spec = c.get("/docs.json").json()
    said = spec["paths"]["/catalog"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "products"]["description"]
    assert product["item_id"] in said and "never recommended" in said and "no real product" in said
    for _ in range(2):
        r = c.post("/catalog", json={"products": second["products"]}, headers=key)
        assert r.status_code == 202 and r.json() == {"accepted": 1}  # a whole product: no "unknown_products" warning


def test_the_batch_limit_is_the_setting_s_not_a_fixed_1000(events_client, monkeypatch):
    """The schema said at most 1000 records whatever SHOPREC_MAX_EVENTS_PER_REQUEST said: raised above 1000, the
    guard let a batch through and pydantic refused it with a 400."""
    c, (key, _) = events_client
    monkeypatch.setenv("SHOPREC_MAX_EVENTS_PER_REQUEST", "1100")
    monkeypatch.setenv("SHOPREC_MAX_REQUEST_BYTES", str(1024 * 1024))
    get_settings.cache_clear()
    tag = uuid.uuid4().hex[:8]
    batch = [_event(tag) for _ in range(1001)]
    r = c.post("/events", json={"events": batch}, headers=key)
    assert r.status_code == 202 and r.json() == {"accepted": 1001}, r.text[:300]
    r = c.post("/events", json={"events": [_event(tag) for _ in range(1101)]}, headers=key)
    assert r.status_code == 413 and "the limit is 1100" in r.json()["error"]
    spec = c.get("/docs.json").json()
    for path, field in (("/events", "events"), ("/catalog", "products")):
        prop = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][field]
        assert prop["maxItems"] == 1100 and "at most 1100" in prop["description"]


def test_a_query_body_over_the_limit_is_a_413_before_it_is_read(events_client, monkeypatch):
    c, (key, _) = events_client
    c.headers.update(key)
    limit = get_settings().max_query_bytes
    big = {"user_id": "u0", "k": 3, "padding": "x" * limit}
    for path in ("/recommend", "/similar", "/ping"):
        r = c.post(path, json=big)
        assert r.status_code == 413 and str(limit) in r.json()["error"] and path in r.json()["error"], (path, r.text)

    def chunked():  # no declared length: read here, up to the limit
        yield b'{"user_id": "u0", "pad": "'
        for _ in range(limit // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    r = c.post("/recommend", content=chunked(), headers={**key, "Content-Type": "application/json"})
    assert r.status_code == 413
    # a small chunked query is replayed to the service whole
    r = c.post("/recommend", content=iter([b'{"user_id": ', b'"u0", "k": 2}']),
               headers={**key, "Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["items"]) <= 2 and r.json()["source"] in ("model", "fallback", "cache")


def test_reading_needs_a_key_and_a_read_only_key_cannot_send(events_client, monkeypatch):
    c, (key_a, _) = events_client
    read_key = f"read-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("SHOPREC_READ_API_KEYS", json.dumps([read_key]))
    get_settings.cache_clear()
    reads = [("/recommend", {"user_id": "u0", "k": 3}), ("/similar", {"item_id": "i1", "k": 3}), ("/status", {})]
    for path, body in reads:
        # anyone could read any user's lists (their clicks, minus what they bought) and log impressions
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {read_key}"}):
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"], (path, headers, r.text)
        for key in (key_a, {"Authorization": f"Bearer {read_key}"}):
            assert c.post(path, json=body, headers=key).status_code == 200, path
    r = c.post("/events", json={"events": [_event("ro")]}, headers={"Authorization": f"Bearer {read_key}"})
    assert r.status_code == 403 and "may only read" in r.json()["error"]
    # what a probe or a load balancer calls stays open (/metrics too: read without a key in test_fuzz)
    for path in ("/healthz", "/readyz"):
        assert c.get(path).status_code == 200, path
    assert c.post("/ping", json={}).status_code == 200


def test_without_keys_nothing_is_served_unless_reads_are_declared_public(events_client, monkeypatch):
    c, (key_a, _) = events_client
    monkeypatch.setenv("SHOPREC_API_KEYS", "[]")  # no key: never the published local one by default
    get_settings.cache_clear()
    for path, body in (("/recommend", {"user_id": "u0"}), ("/events", {"events": [_event("nk")]})):
        r = c.post(path, json=body, headers=key_a)
        assert r.status_code == 503 and "set SHOPREC_API_KEYS" in r.json()["error"], (path, r.text)
    monkeypatch.setenv("SHOPREC_SERVE_PUBLIC_READS", "true")  # behind a gateway that authenticates its callers
    get_settings.cache_clear()
    assert c.post("/recommend", json={"user_id": "u0"}).status_code == 200
    assert c.post("/events", json={"events": [_event("nk")]}, headers=key_a).status_code == 503


def test_429_over_the_rate_limit_of_one_key_only(events_client):
    c, (key_a, key_b) = events_client
    codes = [c.post("/events", json={"events": [_event("rl")]}, headers=key_a).status_code for _ in range(7)]
    assert codes[:5] == [202] * 5 and codes[5:] == [429, 429]
    r = c.post("/events", json={"events": [_event("rl")]}, headers=key_a)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["error"]
    # another key has its own budget
    assert c.post("/events", json={"events": [_event("rl")]}, headers=key_b).status_code == 202


def test_400_lists_every_bad_event_and_sends_nothing(events_client):
    c, (key, _) = events_client
    tag = uuid.uuid4().hex[:8]
    good = _event(tag)
    seconds = int(time.time())
    batch = [good, _event(tag, event_type="teleport"), {"user_id": f"u-{tag}"}, _event(tag, ts=1),
             _event(tag, user_id="a\nb"), good, _event(tag, items=["i"] * 300), _event(tag, ts=seconds),
             _event(tag, item_id=None)]
    r = c.post("/events", json={"events": batch}, headers=key)
    assert r.status_code == 400
    errors = {e["index"]: e["reason"] for e in r.json()["errors"]}
    assert errors == {1: "unknown_event_type", 2: "missing_field", 3: "ts_too_old", 4: "schema", 5: "duplicate",
                      6: "schema", 7: "ts_too_old", 8: "missing_field"}
    assert all(e["message"] for e in r.json()["errors"])
    messages = {e["index"]: e["message"] for e in r.json()["errors"]}
    # the hint the catalog gives for created_at, and a missing item named like any missing field
    assert f"it looks like epoch seconds: send {seconds * 1000}" in messages[7]
    assert messages[8] == "'item_id' is required for a 'view' event"
    # all or nothing: a later accepted event of the same user (same partition) arrives, the good one never did
    marker = _event(tag)
    assert c.post("/events", json={"events": [marker]}, headers=key).status_code == 202
    assert _in_kafka({good["event_id"], marker["event_id"]}, until=marker["event_id"]) == {marker["event_id"]}


def test_202_means_the_events_are_in_kafka(events_client):
    c, (key, _) = events_client
    tag = uuid.uuid4().hex[:8]
    batch = [_event(tag) for _ in range(10)]
    r = c.post("/events", json={"events": batch}, headers=key)
    assert r.status_code == 202 and r.json() == {"accepted": 10}
    assert _in_kafka({e["event_id"] for e in batch}) == {e["event_id"] for e in batch}


def _in_kafka(event_ids: set[str], until: str | None = None, timeout: float = 30.0) -> set[str]:
    """Which of ``event_ids`` are in ``shop.events`` (reading stops once all, or ``until``, were seen)."""
    s = get_settings()
    found = set()
    for rec in topic_records(s, s.kafka_topic_events, timeout=timeout):
        if rec.value and b'"event_id"' in rec.value:
            try:
                eid = json.loads(rec.value).get("event_id")
            except (ValueError, AttributeError):
                continue
            if eid in event_ids:
                found.add(eid)
                if found == event_ids or eid == until:
                    break
    return found


def test_the_warning_about_an_unknown_product_names_the_dlq_reason_it_will_get(events_client):
    """It named "DLQ reason catalog_missing_field": the DLQ record's reason header is missing_field; only the
    dashboard's counter is prefixed catalog_."""
    c, (key, _) = events_client
    ghost = f"{uuid.uuid4().hex[:8]}-ghost"
    r = c.post("/catalog", headers=key, json={"products": [{"item_id": ghost, "in_stock": False}]})
    assert r.status_code == 202 and r.json()["unknown_products"] == [ghost], r.text
    warning = r.json()["warning"]
    assert "(DLQ reason missing_field, counted on the dashboard as catalog_missing_field)" in warning, warning
    assert "reason catalog_missing_field" not in warning and "send the whole product" in warning


def test_events_on_products_the_catalog_lacks_are_accepted_and_named(events_client):
    """A shop sending clicks on products it never sent to the catalog got a bare 202, then lost the whole hour from
    training when its data check failed (more than 5% unknown products): the answer now says so, and what to do."""
    from pipelines import simulator

    c, (key, _) = events_client
    s = get_settings()
    tag = uuid.uuid4().hex[:8]
    base = simulator.make_catalog(2, seed=1)
    base["item_id"] = [f"{tag}-0", f"{tag}-1"]
    simulator.save_catalog(base, s.catalog_path)
    known = [_event(tag, item_id=f"{tag}-{i % 2}") for i in range(3)]
    r = c.post("/events", headers=key, json={"events": known})
    assert r.status_code == 202 and r.json() == {"accepted": 3}, r.text
    ghosts = [_event(tag, item_id=f"{tag}-ghost-{i % 2}") for i in range(4)]
    r = c.post("/events", headers=key, json={"events": known + ghosts})
    assert r.status_code == 202 and r.json()["accepted"] == 7, r.text
    assert r.json()["unknown_products"] == [f"{tag}-ghost-0", f"{tag}-ghost-1"]
    warning = r.json()["warning"]
    assert "2 product(s)" in warning and "left out of training" in warning and "POST /catalog" in warning, warning
    # they were accepted all the same: the catalog may simply be behind
    assert _in_kafka({e["event_id"] for e in ghosts}) == {e["event_id"] for e in ghosts}


def test_catalog_takes_whole_and_partial_products_with_a_key_and_the_feed_applies_them(events_client, tmp_path):
    from pipelines import simulator
    from pipelines.catalog_feed import CatalogSync
    from tests.pipelines.conftest import wait_until
    from tests.pipelines.test_catalog_feed import running

    c, (key, _) = events_client
    s = get_settings()
    tag = uuid.uuid4().hex[:8]
    base = simulator.make_catalog(3, seed=1)
    base["item_id"] = [f"{tag}-{i}" for i in range(3)]
    simulator.save_catalog(base, s.catalog_path)
    lamp = {"item_id": f"{tag}-lamp", "title": "Desk lamp", "category": "home", "brand": "Acme", "price": 25.0,
            "created_at": 1_795_000_000_000, "in_stock": True}
    assert c.post("/catalog", json={"products": [lamp]}).status_code == 401

    bad = c.post("/catalog", headers=key, json={"products": [
        {**lamp, "price": -3}, {"title": "no id"}, {**lamp, "colour": "red"}, "text", lamp, lamp,
        {**lamp, "created_at": 1_796_607_026}, {**lamp, "created_at": int(time.time() * 1000) + 3 * 365 * 86_400_000}]})
    assert bad.status_code == 400
    assert [(e["index"], e["reason"]) for e in bad.json()["errors"]] == [
        (0, "schema"), (1, "missing_field"), (2, "unknown_field"), (3, "schema"), (5, "duplicate"),
        (6, "created_at_too_old"), (7, "created_at_in_future")]
    assert "price" in bad.json()["errors"][0]["message"]
    assert "epoch seconds: send 1796607026000" in bad.json()["errors"][5]["message"]

    ok = c.post("/catalog", headers=key, json={"products": [lamp, {"item_id": f"{tag}-0", "in_stock": False}]})
    assert ok.status_code == 202 and ok.json() == {"accepted": 2}
    # a change to a product the catalog does not have is accepted (its whole record may be on the way) but named:
    # the feed drops it unless the whole product arrives first
    ghost = c.post("/catalog", headers=key, json={"products": [{"item_id": f"{tag}-ghost", "in_stock": False},
                                                               {**lamp, "item_id": f"{tag}-new"},
                                                               {"item_id": f"{tag}-1", "price": 9.5}]})
    assert ghost.status_code == 202 and ghost.json()["unknown_products"] == [f"{tag}-ghost"]
    assert "send the whole product" in ghost.json()["warning"]

    def applied():
        cat = pd.read_parquet(s.catalog_path).set_index("item_id")
        return lamp["item_id"] in cat.index and not cat.loc[f"{tag}-0", "in_stock"] and cat

    with running(CatalogSync(s, group=f"catalog-{tag}")):
        cat = wait_until(applied, timeout=60, what="the products from /catalog in the catalog file")
    assert cat.loc[lamp["item_id"], "title"] == "Desk lamp" and set(base.item_id) <= set(cat.index)
    assert cat.loc[f"{tag}-0", "title"] == base.loc[0, "title"]  # a partial record changes only what it names
