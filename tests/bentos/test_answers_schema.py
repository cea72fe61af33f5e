"""What the API answers validates against the schema it serves at /docs.json (OpenAPI 3.0, as BentoML declares).

/recommend's schema said ``model_version`` was a string while the API answered null before the first training,
under the internal title ``RecommendResponseIODescriptor``; /similar, /status and /ping were any object.
"""

from __future__ import annotations

import jsonschema
import pytest

from pipelines.state import OnlineState
from tests.bentos.test_service import client_for  # noqa: F401 - the fixture


def _json_schema(node):
    """An OpenAPI 3.0 schema as JSON Schema: ``nullable: true`` admits null."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        else:
            node["anyOf"] = [*node.get("anyOf", []), {"type": "null"}]
    return node


def _check(spec: dict, path: str, answer: dict) -> None:
    """``answer`` is valid against the 200 schema ``spec`` declares for ``path`` (raises otherwise)."""
    schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    root = {**_json_schema(schema), "components": _json_schema(spec["components"])}
    jsonschema.Draft202012Validator(root).validate(answer)


def _answer_schema(spec: dict, path: str) -> dict:
    ref = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_before_any_model_the_answers_with_nulls_match_the_schema(settings, redis_client, client_for):  # noqa: F811
    OnlineState(redis_client).set_popular_fallback([("p1", 9.0), ("p2", 5.0)])
    c = client_for("no-such-model")
    spec = c.get("/docs.json").json()
    recommend = _answer_schema(spec, "/recommend")
    assert recommend["title"] == "RecommendResponse" and "RecommendResponseIODescriptor" not in spec["components"]["schemas"]
    assert recommend["properties"]["model_version"]["nullable"] is True
    similar = _answer_schema(spec, "/similar")
    assert {"item_id", "items", "model_version", "reason", "by_content"} <= set(similar["properties"])
    assert {"models", "impressions", "local_cache"} <= set(_answer_schema(spec, "/status")["properties"])

    answer = c.post("/recommend", json={"user_id": "u0", "k": 2}).json()
    assert answer["model_version"] is None and answer["source"] == "fallback"  # no model trained yet
    _check(spec, "/recommend", answer)
    answer = c.post("/similar", json={"item_id": "p1", "k": 2}).json()
    assert answer["model_version"] is None and answer["reason"]
    _check(spec, "/similar", answer)
    _check(spec, "/status", c.post("/status").json())
    _check(spec, "/ping", c.post("/ping").json())
    # and the schema is no blanket: an answer it does not describe fails
    with pytest.raises(jsonschema.ValidationError):
        _check(spec, "/similar", {**answer, "neighbours": []})
    with pytest.raises(jsonschema.ValidationError):
        _check(spec, "/recommend", {**c.post("/recommend", json={"user_id": "u0"}).json(), "model_version": 3})


def test_with_a_champion_the_answers_match_the_schema(settings, redis_client, registered_champion, client_for):  # noqa: F811
    registry, reg = registered_champion
    c = client_for(registry.name, serve_local_cache_entries=0)  # local_cache: null
    spec = c.get("/docs.json").json()
    for _ in range(2):  # a model's answer, then the cache's
        answer = c.post("/recommend", json={"user_id": "u0", "k": 3}).json()
        assert answer["model_version"] == reg.version
        _check(spec, "/recommend", answer)
    for item in ("i0", "no-such-product"):  # a known item; one the champion was not trained with (a reason)
        answer = c.post("/similar", json={"item_id": item, "k": 3}).json()
        assert answer["model_version"] == reg.version
        _check(spec, "/similar", answer)
    status = c.post("/status").json()
    assert status["local_cache"] is None and status["models"]
    _check(spec, "/status", status)
