"""A response's headers and body leave in one write, so a replica that dies mid-answer leaves nothing half-sent."""

from __future__ import annotations

import asyncio
import threading
from asyncio.selector_events import _SelectorSocketTransport

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bentos.routes import KnownRoutesOnly
from bentos.whole_response import WholeResponse
from pipelines.localstack import free_port
from tests.bentos.conftest import wait_for


class _SlowBetween:
    """Stands for BentoML's metrics middleware: work between passing on the headers and the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def slow_send(message):
            if message["type"] == "http.response.body":
                await asyncio.sleep(0.02)
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


_APP = Starlette(routes=[Route("/json", _json), Route("/stream", _stream), Route("/boom", _boom)],
                 middleware=[Middleware(_SlowBetween)])


@pytest.fixture
def socket_writes(monkeypatch):
    """Every write uvicorn makes to a real socket, as it makes it."""
    writes: list[bytes] = []
    real_write = _SelectorSocketTransport.write

    def spy(self, data):
        if data:  # h11 ends a message with an empty write
            writes.append(bytes(data))
        return real_write(self, data)

    monkeypatch.setattr(_SelectorSocketTransport, "write", spy)
    return writes


@pytest.fixture(params=["httptools", "h11"])
def serve(request):
    """Run an ASGI app under a real uvicorn (both of its HTTP implementations) on a free port."""
    servers = []

    def start(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, loop="asyncio",
                                               lifespan="off", log_config=None, access_log=False))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        wait_for(lambda: server.started, 10, "uvicorn to start")
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.should_exit = True


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_headers_and_body_go_out_in_one_write(serve, socket_writes, connection):
    base = serve(WholeResponse(_APP))
    r = httpx.get(f"{base}/json", headers={"Connection": connection})
    assert r.status_code == 200 and r.json() == {"items": [1, 2, 3]}
    answer = [w for w in socket_writes if w.startswith(b"HTTP/1.1")]
    assert len(socket_writes) == 1 and len(answer) == 1, socket_writes
    assert answer[0].endswith(b'{"items":[1,2,3]}')


def test_without_it_uvicorn_writes_headers_first_and_the_body_later(serve, socket_writes):
    base = serve(_APP)
    assert httpx.get(f"{base}/json").status_code == 200
    assert len(socket_writes) == 2 and socket_writes[0].startswith(b"HTTP/1.1 200")  # the gap a killed replica falls into
    assert socket_writes[1] == b'{"items":[1,2,3]}'


def test_a_streamed_body_still_streams_and_arrives_whole(serve, socket_writes):
    base = serve(WholeResponse(_APP))
    r = httpx.get(f"{base}/stream")
    assert r.status_code == 200 and r.text == "0\n1\n2\n"
    assert len(socket_writes) > 1  # the later parts are written as they come


def test_an_endpoint_that_raises_still_gets_a_clean_500(serve):
    base = serve(WholeResponse(_APP))
    r = httpx.get(f"{base}/boom")
    assert r.status_code == 500 and r.text == "Internal Server Error"
    # uvicorn closes a connection whose app raised (with or without this wrapper); the server goes on
    assert httpx.get(f"{base}/json").json() == {"items": [1, 2, 3]}


def test_every_bentoml_service_has_it_outermost():
    from bentos.service import Scorer, Shoprec

    for service in (Shoprec, Scorer):
        app = service.to_asgi()  # what BentoML's worker hands to uvicorn
        # inside it, unknown paths are answered before BentoML's metrics see them
        assert isinstance(app, WholeResponse) and isinstance(app.app, KnownRoutesOnly)
        assert WholeResponse not in [m.cls for m in app.app.app.user_middleware]
