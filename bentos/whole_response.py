"""ASGI wrapper: a response's headers and body leave in one write, so a dying replica never half-answers.

A load balancer retries a request on the next replica only while that replica has sent nothing
back (nginx's ``proxy_next_upstream``): once headers are out, nginx has passed them to the client,
which is then committed to that answer. uvicorn writes an answer's headers to the socket as soon
as the endpoint sends them, and its body in a second write after BentoML's middlewares have seen
it. On a busy machine the first write wakes nginx, which can pre-empt the replica's process right
there; a replica killed before it runs again leaves nginx with headers and no body, and the client
with a broken answer ("peer closed connection without sending complete message body"). A packet
capture of ``tests/bentos/test_nginx.py`` failing that way showed the headers, then 23 ms of
nothing, then the dying process's FIN.

:class:`WholeResponse` wraps the whole app, directly under uvicorn (:func:`install_outermost`). It
holds the ``http.response.start`` message until the first body part, then hands both to uvicorn
while gathering what uvicorn writes, and writes that to the socket in one call. One ``send`` of a
few hundred bytes on a stream socket cannot be split by the sender's death: the kernel has queued
all of it before the process runs another instruction, and it is delivered before the FIN. A
streamed body still streams: only its first part travels with the headers.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class WholeResponse:
    """Pass a response's start message on only with its first body part, written together."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = None

        async def send_whole(message):
            nonlocal held
            if message["type"] == "http.response.start":
                held = message
                return
            if held is None:
                await send(message)
                return
            start, held = held, None
            await _in_one_write(send, start, message)

        await self.app(scope, receive, send_whole)
        if held is not None:  # a response that never sent a body message: its headers still go out
            await send(held)


class _Gather:
    """Stands in for uvicorn's transport during one answer: writes are gathered, then written at once."""

    def __init__(self, transport):
        self._transport = transport
        self._parts: list[bytes] = []
        self._close = False

    def write(self, data) -> None:
        self._parts.append(bytes(data))

    def close(self) -> None:  # uvicorn closes after an answer with ``Connection: close``
        self._close = True

    def __getattr__(self, name):  # everything else (is_closing, get_extra_info, ...) as it is
        return getattr(self._transport, name)

    def flush(self) -> None:
        if self._parts:
            self._transport.write(b"".join(self._parts))
        if self._close:
            self._transport.close()


async def _in_one_write(send, start: dict, body: dict) -> None:
    """``send(start)`` then ``send(body)``, with what the server writes for both going out in one write.

    ``send`` is the bound method of uvicorn's per-request cycle (httptools or h11), which writes
    through its ``transport`` attribute. Anything else (a test client, another server) gets the
    two messages back to back, as before.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or not callable(getattr(transport, "write", None)):
        await send(start)
        await send(body)
        return
    gather = _Gather(transport)
    cycle.transport = gather
    try:
        await send(start)
        await send(body)
    finally:
        cycle.transport = transport
        gather.flush()


def install_outermost() -> bool:
    """Wrap every BentoML service's ASGI app in this process in :class:`WholeResponse`, and inside it
    :class:`bentos.routes.KnownRoutesOnly` (an unknown path never reaches BentoML's metrics).

    BentoML adds a service's own middlewares (``add_asgi_middleware``) inside its metrics, tracing
    and timeout middlewares, and Starlette puts its error middleware outside them all; this wraps
    what the private ``ServiceAppFactory.__call__`` builds instead (BentoML 1.4), so that uvicorn's
    own ``send`` reaches it. Returns False, with a warning, when that is not there: the service then
    works as before, with the gap described above.
    """
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
    except ImportError as err:  # pragma: no cover - a BentoML without the 1.4 layout
        log.warning("responses may be cut by a dying replica: BentoML's app factory not found (%s)", err)
        return False
    base = ServiceAppFactory.__call__
    if getattr(base, "whole_response", False):
        return True

    from bentos.routes import KnownRoutesOnly

    def build(self, *args, **kwargs):
        return WholeResponse(KnownRoutesOnly(base(self, *args, **kwargs)))

    build.whole_response = True  # type: ignore[attr-defined]
    ServiceAppFactory.__call__ = build
    return True
