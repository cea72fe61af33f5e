"""Connections are closed after a number of answers, so that keep-alive clients spread over the API workers."""

from __future__ import annotations

import asyncio

from bentos.recycle import RecycleConnections


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _answer(app, client: tuple[str, int]) -> dict:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": [], "client": client}
    asyncio.run(app(scope, receive, send))
    return dict(sent[0]["headers"])


def test_every_nth_answer_of_a_connection_closes_it_and_connections_count_apart():
    app = RecycleConnections(_ok, max_requests=3)
    a, b = ("10.0.0.1", 40001), ("10.0.0.1", 40002)
    closed_a = [_answer(app, a).get(b"connection") == b"close" for _ in range(7)]
    assert closed_a == [False, False, True, False, False, True, False]
    assert _answer(app, b).get(b"connection") is None  # another connection has its own count
    assert _answer(app, a)[b"content-type"] == b"application/json"  # the answer itself is untouched


def test_zero_never_closes():
    app = RecycleConnections(_ok, max_requests=0)
    assert all(_answer(app, ("10.0.0.1", 40001)).get(b"connection") is None for _ in range(50))
