"""Every 400 of the API in shoprec's words: what is wrong and what to send, said once, no pydantic boilerplate.

Through the service's ASGI app (as in test_service.py): BentoML's validation, the guard and JsonOnly together.
"""

from __future__ import annotations

import pytest

from tests.bentos.test_service import client_for  # noqa: F401 - the fixture

#: what pydantic's own text looked like: none of it may reach a client
_PYDANTIC = ("validation error", "errors.pydantic.dev", "Input should be a valid dictionary", "Field required",
             "Extra inputs are not permitted", "Invalid JSON", "str is not valid UTF-8", "surrogates")


def _refused(c, path: str, body: bytes, content_type: str = "application/json") -> str:
    r = c.post(path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == 400, (path, body, r.status_code, r.text)
    error = r.json()["error"]
    assert not any(text in error for text in _PYDANTIC), (path, body, error)
    assert "pydantic" not in r.text, (path, body, r.text)  # nor in 'detail'
    assert error.count("send ") == 1, (path, body, error)  # what to send, once
    return error


@pytest.fixture()
def c(settings, redis_client, client_for):  # noqa: F811
    return client_for("no-such-model", events_rate_limit="1000/second")


def test_status_and_ping_take_no_body_and_say_so(c):
    """A garbage body got pydantic's "1 validation error for Input" with an errors.pydantic.dev URL; {"x": 1}
    was answered 200, the field ignored."""
    for path in ("/status", "/ping"):
        for body, says in ((b"garbage", "the body is not valid JSON"), (b'{"x": 1}', "unknown field 'x'"),
                           (b"[]", "the body is a JSON array, not an object"), (b"null", "the body is a JSON null, not an object")):
            error = _refused(c, path, body)
            assert error.startswith(says), (path, body, error)
            assert error.endswith("send no body, or an empty JSON object {}: this route takes no input"), error
        # what they take: nothing, or an empty object (with or without a Content-Type)
        for body in (b"", b"{}", b" { } "):
            assert c.post(path, content=body, headers={"Content-Type": "application/json"}).status_code == 200
        assert c.post(path).status_code == 200 and c.post(path, json={}).status_code == 200


def test_recommend_and_similar_say_what_is_wrong_in_their_own_words(c):
    send_user = 'send a JSON object such as {"user_id": "u000001", "k": 10}'
    cases = [
        ("/recommend", b'{"user":"u000001","k":5}',
         "'user_id' is required; unknown field 'user' (did you mean 'user_id'?); " + send_user),
        ("/recommend", b"", "the body is empty; " + send_user),
        ("/recommend", b"{}", "'user_id' is required; " + send_user),
        ("/recommend", b"garbage", "the body is not valid JSON (expected value at line 1 column 1); " + send_user),
        ("/recommend", b'\xff\xfe{"user_id": "u1"}',
         "the body is not UTF-8 JSON (byte 0xff at position 0 is not UTF-8); " + send_user),
        ("/recommend", b'[{"user_id": "u1"}]', "the body is a JSON array, not an object; " + send_user),
        ("/recommend", b'{"user_id": "u1", "k": 0}', "k: Input should be greater than or equal to 1; " + send_user),
        ("/recommend", b'{"user_id": "u1", "k": "5"}', 'k: Input should be a valid integer (got a JSON string, "5")'),
        ("/similar", b"", 'the body is empty; send a JSON object such as {"item_id": "i00042", "k": 10}'),
        ("/similar", b'{"item": "i1"}', "'item_id' is required; unknown field 'item' (did you mean 'item_id'?)"),
        ("/similar", b'{"item_id": "i1", "kk": 3}', "unknown field 'kk' (did you mean 'k'?); send"),
        ("/similar", b"\xc3\x28", "the body is not UTF-8 JSON (byte 0xc3 at position 0 is not UTF-8)"),
    ]
    for path, body, says in cases:
        error = _refused(c, path, body)
        assert error.startswith(says), (path, body, error)
    # a Content-Type with a charset, and none at all, are still JSON
    r = c.post("/recommend", content=b"", headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 400 and r.json()["error"].startswith("the body is empty; send")
    # 'detail' still lists each problem, for programs (loc, msg, type), without documentation URLs
    r = c.post("/recommend", json={"user": "u000001", "k": 5})
    assert [(d["loc"], d["type"]) for d in r.json()["detail"]] == [(["user_id"], "missing"), (["user"], "extra_forbidden")]
    assert c.post("/recommend", json={"user_id": "u1", "k": 2}).status_code == 200


def test_events_and_catalog_say_what_to_send_once(c):
    """{"events": [], "extra": 1} said "send ..." twice; bytes that are not UTF-8 got orjson's "str is not valid
    UTF-8: surrogates not allowed"."""
    for path, field in (("/events", "events"), ("/catalog", "products")):
        send = f'send a JSON object {{"{field}": [...]}} (no other field) with \'Content-Type: application/json\''
        for body, says in ((f'{{"{field}": [], "extra": 1}}'.encode(), f"the body has field(s) other than '{field}': 'extra'"),
                           (b'\xff\xfe{"' + field.encode() + b'": []}',
                            "the body is not UTF-8 JSON (byte 0xff at position 0 is not UTF-8)"),
                           (b"", "the body is empty"), (b"garbage", "the body is not valid JSON: ")):
            error = _refused(c, path, body)
            assert error.startswith(says) and error.endswith(send), (path, body, error)


def test_events_and_catalog_name_a_body_nested_deeper_than_the_parser_takes(c, caplog):
    """{"events": [[[...254 levels...]]]} (valid JSON, half a KB) passed the guard, whose parser takes 1024 levels,
    and BentoML's (pydantic's, 200 levels) answered {"error": "Input", "detail": [{"type": "json_invalid", ...,
    "url": "https://errors.pydantic.dev/..."}]}, logged as "1 validation error for Input"."""
    for path, field in (("/events", "events"), ("/catalog", "products")):
        body = f'{{"{field}": {"[" * 254}{"]" * 254}}}'.encode()
        with caplog.at_level("INFO"):
            caplog.clear()
            error = _refused(c, path, body)
        assert error.startswith("the body is not valid JSON (recursion limit exceeded at line 1 column "), error
        assert error.endswith(f'send a JSON object {{"{field}": [...]}} (no other field) with '
                              "'Content-Type: application/json'"), error
        logged = [r.getMessage() for r in caplog.records if "answered 400" in r.getMessage()]
        assert len(logged) == 1 and "for Input" not in logged[0] and "recursion limit" in logged[0], logged
    # a batch nested less deeply is the service's to judge, record by record
    r = c.post("/events", content=b'{"events": [' + b"[" * 150 + b"]" * 150 + b"]}",
               headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["errors"][0]["message"] == "an event must be a JSON object", r.text
