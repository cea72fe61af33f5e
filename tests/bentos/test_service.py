"""The BentoML service in process (its ASGI app), on real Redis and a real MLflow registry."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from pipelines import schemas
from pipelines.state import OnlineState
from tests.bentos.conftest import wait_for


def _total(redis_client, name: str, field: str) -> int:
    return sum(b.get(field, 0) for b in OnlineState(redis_client).read_stats(name).values())


@pytest.fixture()
def client_for(monkeypatch):
    """Build the service's ASGI app for the current settings (env) and a registered model name."""
    opened = []

    def make(model_name: str | None = None, **env):
        """A client of a fresh app (the previous app is shut down first: its scorer is shared until then)."""
        from pipelines.settings import get_settings

        while opened:
            opened.pop().__exit__(None, None, None)

        monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", model_name or "no-such-model")
        for key, value in env.items():
            monkeypatch.setenv(f"SHOPREC_{key.upper()}", str(value))
        get_settings.cache_clear()
        from bentos import service

        _forget_bentoml_metrics()
        c = TestClient(service.Shoprec.to_asgi(), headers=get_settings().client_headers())  # the API key
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def _forget_bentoml_metrics():
    """BentoML registers its Prometheus metrics once per ASGI app; a second app in one process
    would register them twice, so drop the previous app's before building a new one."""
    import prometheus_client

    reg = prometheus_client.REGISTRY
    for collector, names in list(reg._collector_to_names.items()):
        if any(n.startswith("bentoml_") for n in names):
            reg.unregister(collector)


def test_known_and_new_users_get_model_answers(settings, redis_client, registered_champion, client_for):
    registry, reg = registered_champion
    c = client_for(registry.name)
    r = c.post("/recommend", json={"user_id": "u0", "k": 5})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    # exactly the documented RecommendResponse: nothing missing, nothing extra
    from bentos.service import RecommendResponse

    assert RecommendResponse.model_validate_json(r.content).model_dump(mode="json") == body
    assert body["source"] == "model" and body["model_version"] == reg.version and body["variant"] == "champion"
    assert len(body["items"]) == 5
    # u0 is in the even group: the model recommends even items, none already seen
    assert all(int(i["item_id"][1:]) % 2 == 0 for i in body["items"])
    # same request again: served from the Redis cache
    again = c.post("/recommend", json={"user_id": "u0", "k": 5}).json()
    assert again["source"] == "cache" and again["items"] == body["items"]
    # a brand-new user: still a model answer (session-based / popular), counted as cold start
    new = c.post("/recommend", json={"user_id": "brand-new-user"}).json()
    assert new["source"] == "model" and len(new["items"]) == 10
    wait_for(lambda: _total(redis_client, schemas.STATS_REQUESTS, "cold_user") == 1, 10, "the cold-start counter")
    wait_for(lambda: _total(redis_client, schemas.STATS_REQUESTS, "cold_user_trending") == 1, 10, "no click: trending")
    # what it serves is in Redis for the dashboard's Overview (the registry's alias alone can differ)
    served = OnlineState(redis_client).serving_status()
    assert served[schemas.ALIAS_CHAMPION] == reg.version and float(served["updated_ts"]) > 0
    assert served["trained:champion"] == reg.version  # a trained version continues its own comparison


def test_no_model_serves_fallback(settings, redis_client, client_for):
    OnlineState(redis_client).set_popular_fallback([("p1", 9.0), ("p2", 5.0)])
    c = client_for("no-such-model")
    body = c.post("/recommend", json={"user_id": "u0", "k": 2}).json()
    assert body["source"] == "fallback"
    assert [i["item_id"] for i in body["items"]] == ["p1", "p2"]


def test_bad_recommend_input_is_400_with_message(settings, redis_client, client_for):
    c = client_for("no-such-model")
    r = c.post("/recommend", json={"user_id": "u0", "k": 0})
    assert r.status_code == 400 and "error" in r.json()


def test_a_field_recommend_or_similar_does_not_know_is_named_not_ignored(settings, redis_client, client_for):
    """A typo such as ``kk`` used to be dropped silently: the caller got 10 items and no hint."""
    c = client_for("no-such-model")
    for path, body in (("/recommend", {"user_id": "u0", "kk": 5}), ("/similar", {"item_id": "p1", "limit": 3})):
        r = c.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        [problem] = r.json()["detail"]
        assert problem["loc"] == [next(k for k in body if k not in ("user_id", "item_id"))]
        assert "not permitted" in problem["msg"].lower()
    assert c.post("/recommend", json={"user_id": "u0", "k": 5}).status_code == 200
    schema = c.get("/docs.json").json()["components"]["schemas"]
    assert {n for n in schema if "Input" in n} >= {"RecommendInput", "SimilarInput"}
    assert schema["RecommendInput"]["additionalProperties"] is False


def test_the_swagger_page_is_this_api_s_and_loads_no_tracker(settings, redis_client, client_for):
    """BentoML's page was titled "BentoML Prediction Service" and loaded Google Tag Manager."""
    c = client_for("no-such-model")
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>shoprec API</title>" in page.text and "googletagmanager" not in page.text.lower()
    assert "swagger-ui-bundle.js" in page.text
    assert c.get("/static_content/swagger-ui-bundle.js").status_code == 200  # the page's assets are served


def test_events_need_a_key_and_valid_json(settings, redis_client, client_for):
    c = client_for("no-such-model")
    c.headers.pop("Authorization")  # the fixture's client sends the key
    ev = schemas.new_event("view", "u1", "i1", "s1")
    assert c.post("/events", json={"events": [ev]}).status_code == 401
    assert c.post("/events", json={"events": [ev]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer shoprec-dev-key"}
    bad = c.post("/events", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    invalid = c.post("/events", json={"events": [ev, {**ev, "event_type": "teleport"}]}, headers=auth)
    assert invalid.status_code == 400
    assert invalid.json()["errors"] == [{"index": 1, "reason": "unknown_event_type",
                                         "message": invalid.json()["errors"][0]["message"]}]
    ok = c.post("/events", json={"events": [ev]}, headers=auth)
    assert ok.status_code == 202 and ok.json() == {"accepted": 1}


def test_cached_unknown_and_just_clicked_users(settings, redis_client, registered_champion, client_for):
    registry, reg = registered_champion
    c = client_for(registry.name)
    answer = c.post("/recommend", json={"user_id": "u2", "k": 5})
    assert answer.headers["content-type"].startswith("application/json")  # media type pinned at start-up
    first = answer.json()
    cached = c.post("/recommend", json={"user_id": "u2", "k": 3}).json()
    assert (first["source"], cached["source"]) == ("model", "cache")
    assert cached["items"] == first["items"][:3] and cached["model_version"] == reg.version
    # counters are flushed to Redis once a second
    wait_for(lambda: _total(redis_client, schemas.STATS_CACHE, "hit:champion") == 1, 10, "the cache hit counter")
    assert _total(redis_client, schemas.STATS_CACHE, "miss:champion") == 1
    assert _total(redis_client, schemas.STATS_CACHE, "hit") == 1
    latency = OnlineState(redis_client).read_stats(f"{schemas.STATS_LATENCY}:cache")
    assert sum(sum(b.values()) for b in latency.values()) == 1

    # a shopper the model never saw gets a model answer, then the cached one
    before = c.post("/recommend", json={"user_id": "walk-in", "k": 5}).json()
    assert before["source"] == "model" and len(before["items"]) == 5
    assert c.post("/recommend", json={"user_id": "walk-in", "k": 5}).json()["source"] == "cache"
    # their click arrives (the stream consumer folds it into Redis and drops their cached lists)
    clicked = "i3"  # an odd-group item: their session now points at the odd half of the catalog
    seen = c.post("/status").json()["local_cache"]["invalidations"]
    OnlineState(redis_client).apply_events([schemas.Event(**schemas.new_event("click", "walk-in", clicked, "s1"))])
    # the process's copy of their list goes when Redis tells it (a background thread, within milliseconds)
    wait_for(lambda: c.post("/status").json()["local_cache"]["invalidations"] > seen, 10, "Redis's invalidation")
    after = c.post("/recommend", json={"user_id": "walk-in", "k": 5}).json()
    assert after["source"] == "model"
    assert after["items"] != before["items"] and clicked not in [i["item_id"] for i in after["items"]]
    assert all(int(i["item_id"][1:]) % 2 == 1 for i in after["items"][:4])


@pytest.mark.parametrize("k", [0, 101, "ten"])
def test_k_out_of_range_is_400_with_a_message(settings, redis_client, client_for, k):
    c = client_for()
    r = c.post("/recommend", json={"user_id": "u0", "k": k})
    assert r.status_code == 400
    body = r.json()
    assert body["error"].startswith("k: Input should be ") and "validation error" not in body["error"], body
    assert body["detail"][0]["loc"] == ["k"] and body["detail"][0]["msg"]  # says which field and why


def test_recommend_and_similar_take_json_types_strictly_and_say_what_to_send(settings, redis_client, client_for,
                                                                            caplog):
    """``"k": true`` gave 1 item and ``"k": "5"`` 5; a 400 read "1 validation error for Input" with pydantic's URL."""
    c = client_for()
    cases = [("/recommend", {"user_id": "u0", "k": True}, "k", "boolean, true"),
             ("/recommend", {"user_id": "u0", "k": "5"}, "k", 'string, "5"'),
             ("/recommend", {"user_id": "u0", "k": 5.0}, "k", "number, 5.0"),
             ("/recommend", {"user_id": 42, "k": 5}, "user_id", "number, 42"),
             ("/similar", {"item_id": "i1", "k": "3"}, "k", 'string, "3"'),
             ("/similar", {"item_id": ["i1"]}, "item_id", "array")]
    with caplog.at_level("INFO"):
        for path, body, field, got in cases:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            error = r.json()["error"]
            assert error.startswith(f"{field}: Input should be a valid ") and \
                f"(got a JSON {got})" in error, error
            assert "; send a JSON object such as {" in error and f"{field}: a JSON " in error, error
            assert "pydantic" not in r.text and "http" not in r.text, r.text  # no documentation URL anywhere
            [problem] = r.json()["detail"]
            assert problem["loc"] == [field] and problem["msg"].startswith("Input should be a valid"), problem
    logged = [rec.getMessage() for rec in caplog.records if "answered 400" in rec.getMessage()]
    assert len(logged) == len(cases) and not [m for m in logged if "validation error for" in m], logged
    assert logged[0].startswith("/recommend [POST] answered 400: k: Input should be a valid "
                                "integer (got a JSON boolean, true)"), logged[0]
    # several problems: each named
    r = c.post("/recommend", json={"k": 0, "kk": 1})
    assert r.status_code == 400 and [d["loc"] for d in r.json()["detail"]] == [["user_id"], ["k"], ["kk"]]
    assert r.json()["error"].startswith("'user_id' is required; k: Input should be greater than or equal to 1; "
                                        "unknown field 'kk' (did you mean 'k'?); send ")
    # the JSON types asked for still work, and k may be left out
    assert len(c.post("/recommend", json={"user_id": "u0", "k": 3}).json()["items"]) <= 3
    assert c.post("/recommend", json={"user_id": "u0"}).status_code == 200
    assert c.post("/similar", json={"item_id": "i1", "k": 3}).status_code == 200


def test_business_rules_stock_purchases_category_cap_and_new_products(settings, redis_client, registered_champion,
                                                                     client_for):
    import time

    import pandas as pd

    registry, _ = registered_champion
    now = int(time.time() * 1000)
    rows = [{"item_id": f"i{n}", "title": f"item {n}", "category": "even" if n % 2 == 0 else f"odd-{n % 5}",
             "brand": "b", "price": 9.5, "created_at": now - 90 * 86_400_000, "in_stock": n != 4} for n in range(40)]
    rows.append({"item_id": "fresh-1", "title": "new", "category": "new", "brand": "b", "price": 5.0,
                 "created_at": now - 3_600_000, "in_stock": True})
    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(settings.catalog_path)
    # u0 is in the even group: its model list is all even items (one category)
    plain = client_for(registry.name, max_per_category=10, explore_share=0).post(
        "/recommend", json={"user_id": "u0", "k": 10}).json()
    assert plain["source"] == "model"
    assert "i4" not in [i["item_id"] for i in plain["items"]]  # out of stock
    OnlineState(redis_client).mark_purchased("u0", [plain["items"][0]["item_id"]])
    redis_client.delete(schemas.RedisKeys.cache("u0"))
    c = client_for(registry.name, max_per_category=3, explore_share=0.2)
    body = c.post("/recommend", json={"user_id": "u0", "k": 10}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert plain["items"][0]["item_id"] not in ids  # bought
    assert sum(1 for i in ids if i.startswith("i") and int(i[1:]) % 2 == 0) <= 3  # at most 3 of "even"
    assert ids.index("fresh-1") == 4  # the new product takes an exploration slot (every 5th with a 20% share)
    assert len(ids) == 10


def test_similar_items_for_a_known_and_an_unknown_product(settings, redis_client, registered_champion, client_for):
    registry, reg = registered_champion
    c = client_for(registry.name)
    r = c.post("/similar", json={"item_id": "i2", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == reg.version and len(body["items"]) == 3 and "i2" not in body["items"]
    assert "reason" not in body
    unknown = c.post("/similar", json={"item_id": "launched-today", "k": 3}).json()
    assert unknown["items"] == [] and "becomes champion" in unknown["reason"]  # says why, not a silent empty list

    import pandas as pd

    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"item_id": i, "title": i, "category": "c", "brand": "b", "price": 1.0, "created_at": 0,
                   "in_stock": True} for i in ("i2", "launched-today")]).to_parquet(settings.catalog_path)
    c = client_for(registry.name)
    assert "becomes champion" in c.post("/similar", json={"item_id": "launched-today", "k": 3}).json()["reason"]
    typo = c.post("/similar", json={"item_id": "launched-2day", "k": 3}).json()
    assert typo["items"] == [] and "no product 'launched-2day' in the catalog" in typo["reason"]
    # a product added a moment ago is in the catalog at once (it was "no product" until the next minute's reload)
    pd.DataFrame([{"item_id": i, "title": i, "category": "c", "brand": "b", "price": 1.0, "created_at": 0,
                   "in_stock": True} for i in ("i2", "launched-today", "launched-now")]).to_parquet(settings.catalog_path)
    now = c.post("/similar", json={"item_id": "launched-now", "k": 3}).json()
    assert now["items"] == [] and "becomes champion" in now["reason"] and now["by_content"] is False
    none = client_for("no-such-model").post("/similar", json={"item_id": "i2", "k": 3}).json()
    assert none["items"] == [] and "train_job" in none["reason"]
    # sold-out products are not offered as similar ones either (they were: 20 of 600 on the local stack)
    sold_out = body["items"][:2]
    pd.DataFrame([{"item_id": i, "title": i, "category": "c", "brand": "b", "price": 1.0, "created_at": 0,
                   "in_stock": i not in sold_out} for i in ("i2", *body["items"])]).to_parquet(settings.catalog_path)
    again = client_for(registry.name).post("/similar", json={"item_id": "i2", "k": 3}).json()
    assert len(again["items"]) == 3 and not set(sold_out) & set(again["items"])
    assert again["items"][0] == body["items"][2]  # the rest keep their order
