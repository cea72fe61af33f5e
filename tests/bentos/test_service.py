"""The BentoML service in process (its ASGI app), on real Redis and a real MLflow registry."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from pipelines import schemas
from pipelines.state import OnlineState


@pytest.fixture()
def client_for(monkeypatch):
    """Build the service's ASGI app for the current settings (env) and a registered model name."""
    opened = []

    def make(model_name: str | None = None):
        from bentos import service

        if model_name:
            monkeypatch.setattr(service, "RecommendationEngine", _engine_for(model_name))
        _forget_bentoml_metrics()
        c = TestClient(service.Shoprec.to_asgi())
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


def _engine_for(model_name):
    from pipelines.registry import ModelRegistry
    from pipelines.serving import RecommendationEngine

    class Engine(RecommendationEngine):
        @classmethod
        def from_settings(cls, settings):
            eng = super().from_settings(settings)
            eng.registry = ModelRegistry(settings.mlflow_tracking_uri, name=model_name)
            return eng

    return Engine


def test_known_and_new_users_get_model_answers(settings, redis_client, registered_champion, client_for):
    registry, reg = registered_champion
    c = client_for(registry.name)
    r = c.post("/recommend", json={"user_id": "u0", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
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
    stats = OnlineState(redis_client).read_stats(schemas.STATS_REQUESTS)
    assert sum(b.get("cold_user", 0) for b in stats.values()) == 1


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


def test_events_need_a_key_and_valid_json(settings, redis_client, client_for):
    c = client_for("no-such-model")
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
