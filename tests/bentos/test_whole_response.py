"""A response's headers reach the server only with its body, so a replica that dies mid-answer leaves nothing half-sent."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bentos.whole_response import WholeResponse


class _SlowBetween:
    """Stands for BentoML's metrics middleware: work between passing on the headers and the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def slow_send(message):
            if message["type"] == "http.response.body":
                await asyncio.sleep(0.05)
            await send(message)

        await self.app(scope, receive, slow_send)


async def _json(request):
    return JSONResponse({"items": [1, 2, 3]})


async def _stream(request):
    async def parts():
        for n in range(3):
            yield f"{n}\n".encode()

    return StreamingResponse(parts(), media_type="text/plain")


async def _boom(request):
    raise RuntimeError("model exploded")


def _serve(path: str, outermost: bool) -> list[tuple[float, dict]]:
    """What the server (uvicorn's ``send``) receives for one request, with the time of each message."""
    stack = [Middleware(WholeResponse)] if outermost else []
    app = Starlette(routes=[Route("/json", _json), Route("/stream", _stream), Route("/boom", _boom)],
                    middleware=[*stack, Middleware(_SlowBetween)])
    got: list[tuple[float, dict]] = []

    async def send(message):
        got.append((time.perf_counter(), message))

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():  # the request, then a client that stays connected
        if requests:
            return requests.pop()
        await asyncio.Event().wait()

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "scheme": "http",
             "http_version": "1.1", "headers": [], "query_string": b"", "server": ("shop", 3000),
             "client": ("10.0.0.1", 5000), "root_path": ""}
    try:
        asyncio.run(app(scope, receive, send))
    except RuntimeError:
        pass  # Starlette re-raises after answering 500
    return got


def test_headers_wait_for_the_body_however_long_the_work_between():
    bare = _serve("/json", outermost=False)
    assert [m["type"] for _, m in bare] == ["http.response.start", "http.response.body"]
    assert bare[1][0] - bare[0][0] >= 0.04  # the gap a killed replica falls into

    whole = _serve("/json", outermost=True)
    assert [m["type"] for _, m in whole] == ["http.response.start", "http.response.body"]
    assert whole[1][0] - whole[0][0] < 0.01
    assert whole[0][1]["status"] == 200 and whole[1][1]["body"] == b'{"items":[1,2,3]}'


def test_a_streamed_body_still_streams_and_arrives_whole():
    got = _serve("/stream", outermost=True)
    assert [m["type"] for _, m in got][0] == "http.response.start"
    assert b"".join(m.get("body", b"") for _, m in got[1:]) == b"0\n1\n2\n"


def test_an_endpoint_that_raises_still_gets_a_clean_500():
    got = _serve("/boom", outermost=True)
    assert got[0][1]["type"] == "http.response.start" and got[0][1]["status"] == 500
    assert sum(m["type"] == "http.response.start" for _, m in got) == 1


def test_every_bentoml_service_has_it_outermost():
    from bentos.service import Scorer, Shoprec

    for service in (Shoprec, Scorer):
        app = service.to_asgi()  # what BentoML's worker hands to uvicorn
        assert isinstance(app, WholeResponse) and not isinstance(app.app, WholeResponse)
        assert WholeResponse not in [m.cls for m in app.app.user_middleware]


def test_headers_and_body_are_written_with_the_socket_corked():
    """Under uvicorn the two writes go out as one segment: the socket is corked around them, and only them."""
    import socket

    if not hasattr(socket, "TCP_CORK"):
        pytest.skip("no TCP_CORK on this platform: no cork, the same answers")
    server = socket.create_server(("127.0.0.1", 0))
    conn = socket.create_connection(server.getsockname())
    peer, _ = server.accept()

    class Transport:
        def get_extra_info(self, name):
            return conn if name == "socket" else None

    class Cycle:  # uvicorn's RequestResponseCycle: its bound send carries the transport
        transport = Transport()
        corked: list[tuple[str, int]] = []

        async def send(self, message):
            self.corked.append((message["type"], conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    cycle = Cycle()
    try:
        asyncio.run(WholeResponse(app)({"type": "http"}, None, cycle.send))
        assert cycle.corked == [("http.response.start", 1), ("http.response.body", 1)]
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    finally:
        for s in (conn, peer, server):
            s.close()
