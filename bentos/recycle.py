"""ASGI middleware: close each client connection after a number of answers, so that API workers share the load."""

from __future__ import annotations

#: connections tracked at most; entries of connections the client closed are dropped past this
_MAX_TRACKED = 10_000


class RecycleConnections:
    """Answer the ``max_requests``-th request of a connection with ``Connection: close``.

    BentoML's API workers share one listening socket, and a burst of new connections often lands on
    one worker (bentoml/BentoML#5426). Keep-alive clients (a load balancer, a benchmark, a shop's
    backend) then send everything to that worker while the other idles. A client reopens a closed
    connection at once, and a busy worker is not waiting in ``accept``, so the new connection
    usually lands on an idle one: the split evens out within seconds. The cost is one TCP handshake
    every ``max_requests`` answers; ``0`` turns recycling off.
    """

    def __init__(self, app, max_requests: int):
        self.app = app
        self.max_requests = max_requests
        self._answered: dict[tuple, int] = {}

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] != "http" or self.max_requests <= 0 or not client:
            return await self.app(scope, receive, send)
        key = tuple(client)
        n = self._answered.get(key, 0) + 1
        if n < self.max_requests:
            if len(self._answered) >= _MAX_TRACKED and key not in self._answered:
                self._answered.clear()
            self._answered[key] = n
            return await self.app(scope, receive, send)
        self._answered.pop(key, None)

        async def send_then_close(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_then_close)
