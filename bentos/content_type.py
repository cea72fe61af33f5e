"""ASGI guard of every POST route: JSON only (415), and a small body outside the ingestion routes (413).

A POST whose ``Content-Type`` is set to something other than JSON is refused on every API route (BentoML
would answer 500). The ingestion routes (``/events``, ``/catalog``) also refuse a POST without a
``Content-Type``: BentoML would read its body as JSON anyway (an empty one as an empty batch, answered
202), so a client that forgot the header would only find out when it sent something else.

The other API routes (``/recommend``, ``/similar``, ...) take a few fields, and no key: a body over
``max_query_bytes`` is refused with 413 before it is read (a 16 MB ``/recommend`` body used to be parsed
whole, and four clients sending such bodies stalled every other user's answer for seconds). A body sent
without a declared length (chunked) is read here up to the limit. The ingestion routes have their own
limit (:mod:`bentos.guard`).

A 400 that BentoML answers for an input its validation refused (:class:`bentos.service._Strict`) says
"<n> validation error for <what is wrong; send ...>": :func:`own_words` drops that header of pydantic's
on the way out, so ``error`` is the text alone. Only a 400's body is held and rewritten; every other
answer passes as it came.

Order of the answers: :class:`bentos.guard.ApiKeyAndSizeGuard` runs first (outermost), so a keyed route
answers 401/403 (or 503 without keys) before 415, and 415 before anything about the body (size,
rate limit, JSON). On the ingestion routes the guard itself asks :func:`refused_media` right after the
key, since it reads and judges the body before this middleware would see the request; elsewhere
this middleware answers it. Either way the check is a scan of the headers.
"""

from __future__ import annotations

import re

import orjson
from starlette.responses import JSONResponse

from bentos.body import BodyTooLarge, read_capped, replaying
from bentos.routes import log_refused

from pipelines.settings import get_settings

#: BentoML's own routes that take no JSON body
_OPEN = ("/healthz", "/readyz", "/livez", "/metrics", "/docs", "/docs.json", "/schema.json")
#: routes where a POST must say ``Content-Type: application/json``; their size limit is the ingestion guard's
_DECLARED = ("/events", "/catalog")


#: how BentoML begins the ``error`` of a 400 it answers for a pydantic ``ValidationError``
_PYDANTIC_HEADER = re.compile(r"^\d+ validation errors? for ")


def own_words(send):
    """``send`` for one answer: a 400's ``error`` without pydantic's "<n> validation error for " header."""
    held = None

    async def send_own(message):
        nonlocal held
        if message["type"] == "http.response.start":
            if message["status"] != 400:
                return await send(message)
            held = message
            return
        if held is None:
            return await send(message)
        start, held = held, None
        body = message.get("body", b"")
        if message["type"] == "http.response.body" and not message.get("more_body"):
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                own = _PYDANTIC_HEADER.sub("", data["error"], count=1)
                if own != data["error"]:
                    body = orjson.dumps({**data, "error": own})
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                    message = {**message, "body": body}
        await send(start)
        await send(message)

    return send_own


def unsupported(media: str) -> str:
    """The 415 message for a request whose media type is ``media`` ("" when it sent no Content-Type)."""
    what = f"Content-Type {media!r}" if media else "a request without a Content-Type"
    return f"{what} is not supported: send a JSON body with 'Content-Type: application/json'"


def refused_media(ctype: str, required: bool) -> str | None:
    """The 415 message for a POST whose ``Content-Type`` header is ``ctype`` ("" when absent), or None when
    it is JSON (``application/json``, ``+json``), or absent where the route does not ``require`` one."""
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or not media and not required:
        return None
    return unsupported(media)


class JsonOnly:
    """Reject a POST whose ``Content-Type`` is set and is not ``application/json`` (or ``+json``), on the
    ``required`` paths (the ingestion routes by default) one without a ``Content-Type``, and on the others
    one whose body is over ``max_query_bytes`` (default: the setting)."""

    def __init__(self, app, required: tuple[str, ...] = _DECLARED, max_query_bytes: int | None = None):
        self.app = app
        self.required = frozenset(required)
        self.limit = max_query_bytes or get_settings().max_query_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] in _OPEN:
            return await self.app(scope, receive, send)
        ctype, length, chunked = "", None, False
        for k, v in scope["headers"]:
            k = k.lower()
            if k == b"content-type":
                ctype = v.decode("latin-1")
            elif k == b"content-length":
                length = v
            elif k == b"transfer-encoding":
                chunked = True
        if (problem := refused_media(ctype, scope["path"] in self.required)) is not None:
            log_refused(scope, 415, problem)
            return await JSONResponse({"error": problem}, status_code=415)(scope, receive, send)
        send = own_words(send)
        if scope["path"] in self.required:
            return await self.app(scope, receive, send)
        declared = int(length) if length is not None and length.isdigit() and not chunked else None
        if declared is not None:  # the server reads exactly the declared length, so the declaration is the size
            if declared <= self.limit:
                return await self.app(scope, receive, send)
            return await self._too_large(scope, receive, send, f"request body is {declared} bytes")
        try:
            body = await read_capped(receive, self.limit)
        except BodyTooLarge:
            return await self._too_large(scope, receive, send, "request body is larger")
        if body is not None:
            return await self.app(scope, replaying(body, receive), send)

    async def _too_large(self, scope, receive, send, what: str):
        error = f"{what}; the limit of {scope['path']} is {self.limit} bytes: send only the documented fields"
        log_refused(scope, 413, error)
        return await JSONResponse({"error": error}, status_code=413)(scope, receive, send)
