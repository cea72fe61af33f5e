"""ASGI middleware: a response's headers leave only together with its body, so a dying replica rarely half-answers.

A load balancer retries a request on the next replica only while that replica has sent nothing
back (nginx's ``proxy_next_upstream``): once the headers are out, the client is committed to that
response. Behind BentoML's own middlewares, uvicorn writes the headers as soon as the endpoint
sends them, then the body after BentoML's Prometheus middleware has recorded the request (~10 % of
an API process's time per answer). A replica killed in between leaves nginx with headers and no
body, and the client gets a broken answer ("peer closed connection without sending complete
message body"): in 2 of 10 runs of ``tests/bentos/test_nginx.py`` with the other core kept busy.

:class:`WholeResponse` holds the ``http.response.start`` message until the first body part (or the
end of the request) and then passes both on back to back, with the connection's socket corked
(``TCP_CORK``) so that the kernel sends them as one segment. It must wrap the whole app, directly
under uvicorn (:func:`install_outermost`): any middleware outside it that works on the body before
passing it on reopens the gap, and only there is uvicorn's socket within reach. Holding alone (as
a service middleware) left 4 failures in 55 runs of that test; holding and corking, 0 in 14.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


class WholeResponse:
    """Pass a response's start message on only with its first body part (streamed bodies still stream).

    Outermost (directly under the server), it also corks the connection's socket around the two
    writes where the platform has ``TCP_CORK``: the kernel then sends headers and body as one
    segment, and the first write does not wake the load balancer (whose wake-up can pre-empt this
    process between the two writes on a busy machine).
    """

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
            sock = _corkable_socket(send)
            if sock is not None:
                _cork(sock, True)
            try:
                await send(start)
                await send(message)
            finally:
                if sock is not None:
                    _cork(sock, False)

        await self.app(scope, receive, send_whole)
        if held is not None:  # a response that never sent a body message: its headers still go out
            await send(held)


def _corkable_socket(send):
    """The socket of uvicorn's connection behind ``send`` (its bound method), where it can be corked."""
    if _TCP_CORK is None:
        return None
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    try:
        return transport.get_extra_info("socket") if transport is not None else None
    except Exception:  # noqa: BLE001 - a transport without sockets: no cork, same answers
        return None


def _cork(sock, on: bool) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1 if on else 0)
    except OSError:  # the client went away: uvicorn reports it on the write
        pass


_TCP_CORK = getattr(socket, "TCP_CORK", None)


def install_outermost() -> bool:
    """Wrap every BentoML service's ASGI app in this process in :class:`WholeResponse`.

    BentoML adds a service's own middlewares (``add_asgi_middleware``) inside its metrics, tracing
    and timeout middlewares, too deep for this one; this wraps what the private
    ``ServiceAppFactory.__call__`` builds instead (BentoML 1.4), so uvicorn's own ``send`` reaches
    it. Returns False, with a warning, when that is not there: the service then works as before,
    with the gap described above.
    """
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
    except ImportError as err:  # pragma: no cover - a BentoML without the 1.4 layout
        log.warning("responses may be cut by a dying replica: BentoML's app factory not found (%s)", err)
        return False
    base = ServiceAppFactory.__call__
    if getattr(base, "whole_response", False):
        return True

    def build(self, *args, **kwargs):
        return WholeResponse(base(self, *args, **kwargs))

    build.whole_response = True  # type: ignore[attr-defined]
    ServiceAppFactory.__call__ = build
    return True
