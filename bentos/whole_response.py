"""ASGI middleware: a response's headers leave only together with its body, so a dying replica rarely half-answers.

A load balancer retries a request on the next replica only while that replica has sent nothing
back (nginx's ``proxy_next_upstream``): once the headers are out, the client is committed to that
response. Behind BentoML's own middlewares, uvicorn writes the headers as soon as the endpoint
sends them, then the body after BentoML's Prometheus middleware has recorded the request (~10 % of
an API process's time per answer). A replica killed in between leaves nginx with headers and no
body, and the client gets a broken answer ("peer closed connection without sending complete
message body"): in 2 of 10 runs of ``tests/bentos/test_nginx.py`` with the other core kept busy.

:class:`WholeResponse` holds the ``http.response.start`` message until the first body part (or the
end of the request) and then passes both on back to back. It must be the outermost middleware
(:func:`install_outermost`): any middleware outside it that works on the body before passing it
on reopens the gap. It narrows the gap, not closes it: with it the same test failed that way in 4
of 55 runs (uvicorn still writes headers and body in two calls; whether that is the rest is not known).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class WholeResponse:
    """Pass a response's start message on only with its first body part (streamed bodies still stream)."""

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
            if held is not None:
                start, held = held, None
                await send(start)
            await send(message)

        await self.app(scope, receive, send_whole)
        if held is not None:  # a response that never sent a body message: its headers still go out
            await send(held)


def install_outermost() -> bool:
    """Put :class:`WholeResponse` first in every BentoML service's middleware stack in this process.

    BentoML adds a service's own middlewares (``add_asgi_middleware``) inside its metrics, tracing
    and timeout middlewares, too deep for this one; this wraps the private
    ``ServiceAppFactory.middlewares`` list instead (BentoML 1.4). Returns False, with a warning, when
    that is not there: the service then works as before, with the gap described above.
    """
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
        from starlette.middleware import Middleware
    except ImportError as err:  # pragma: no cover - a BentoML without the 1.4 layout
        log.warning("responses may be cut by a dying replica: BentoML's app factory not found (%s)", err)
        return False
    base = ServiceAppFactory.__dict__.get("middlewares")
    if not isinstance(base, property):  # pragma: no cover - as above
        log.warning("responses may be cut by a dying replica: ServiceAppFactory.middlewares is not a property")
        return False
    if getattr(base.fget, "whole_response", False):
        return True

    def middlewares(self) -> list:
        return [Middleware(WholeResponse), *base.fget(self)]

    middlewares.whole_response = True  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)
    return True
