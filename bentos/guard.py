"""ASGI guard of the API: keys on every route that reads or writes shop data, and everything about an
ingestion request that can be refused before the service parses its body.

The read routes (``/recommend``, ``/similar``, ``/status``) need a key of ``SHOPREC_API_KEYS`` or of
``SHOPREC_READ_API_KEYS`` (401 otherwise), unless ``SHOPREC_SERVE_PUBLIC_READS`` is set. Open, anyone
could read any user's recommendations (which follow their clicks and leave out what they bought) and,
since every answer is logged as an impression, fill one A/B variant with impressions nobody saw.
Nothing else is checked on them: their cost stays a header scan and a constant-time comparison.

A server with no keys at all answers 503 on these routes, saying what to set: the settings have no
default key, so a deployed service can never accept the published local one.

In order, for ``POST /events`` and ``POST /catalog`` (the batch's key is ``events`` or ``products``):

1. API key (``Authorization: Bearer <key>``, one of ``SHOPREC_API_KEYS``; several may be valid at
   once, so a key is rotated by adding the new one, moving clients, then removing the old) → 401;
   a read-only key → 403;
2. a ``Content-Type`` other than ``application/json``, or none → 415 (before anything reads the body,
   so a CSV or text body gets the 415 it would get as JSON, not a 400 about its JSON; the read routes get
   theirs from :class:`bentos.content_type.JsonOnly`, also after the key: the key always comes first);
3. declared body size over ``max_request_bytes`` → 413;
4. per-key rate limit (``events_rate_limit``, sliding window kept in Redis by the ``limits``
   library, so every replica behind the load balancer counts against the same budget) → 429
   with ``Retry-After``; when Redis cannot be reached the request is let through (logged):
   losing events to a rate-limiter outage would be worse than a burst;
5. body read in chunks and cut off past ``max_request_bytes`` (chunked uploads declare no size) → 413;
6. a body that is not JSON, or not an object whose batch field is a list → 400 with what to send
   (BentoML would log it as an unhandled exception with a traceback and answer with pydantic's
   own text, "1 validation error for Input"); a body this parser reads and pydantic's does not (nested
   deeper than its 200 levels; orjson reads 1024) is refused by the route's input model
   (:class:`bentos.service._Strict`), in the same words and ending with the same :func:`what_to_send`;
7. more than ``max_events_per_request`` records in the batch → 413 (the only check of the batch's
   length: the service's input schema declares none, so the limit is the setting's at every request).

Both paths share one rate-limit budget per key.

Per-event validation (400 with a list of errors) is the service's, through :mod:`pipelines.ingest`.

``GET /docs.json`` (the schema behind the Swagger UI at ``/``) is rewritten on its way out: the key
(:func:`_with_key`) and the rest of what BentoML cannot say (:func:`bentos.api_doc.document`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from functools import lru_cache

import anyio
import orjson
from limits import parse_many
from limits.storage import RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.responses import JSONResponse, Response

from bentos.api_doc import document, index_page
from bentos.body import BodyTooLarge, read_capped, replaying
from bentos.content_type import refused_media
from bentos.routes import log_refused

from pipelines.schemas import RedisKeys
from pipelines.settings import get_settings

log = logging.getLogger("shoprec.guard")


@lru_cache(maxsize=4)
def _limiter(redis_url: str) -> SlidingWindowCounterRateLimiter:
    storage = RedisStorage(redis_url, key_prefix=RedisKeys.rate_limit_prefix(), socket_timeout=1,
                           socket_connect_timeout=1)
    return SlidingWindowCounterRateLimiter(storage)


def _over_limit(redis_url: str, spec: str, key_id: str) -> float | None:
    """Seconds until the key may send again when it is over any of the limits in ``spec``, else None."""
    limiter = _limiter(redis_url)
    for item in parse_many(spec):
        if not limiter.hit(item, "events", key_id):
            reset_at = limiter.get_window_stats(item, "events", key_id).reset_time
            return max(1.0, reset_at - time.time())
    return None


def _batch_of(body: bytes, field: str) -> tuple[str | None, list | None]:
    """``(None, batch)`` for a body ``{field: [...]}``, else ``(what is wrong with it, None)``.

    Only the envelope is judged here; each record of the batch is the service's (400 with a list of errors).
    """
    if not body.strip():
        return "the body is empty", None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        try:  # orjson says "str is not valid UTF-8: surrogates not allowed" of any byte that is not UTF-8
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return (f"the body is not UTF-8 JSON (byte 0x{body[bad.start]:02x} at position {bad.start} is not "
                    "UTF-8)"), None
        return f"the body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno} (char {err.pos})", None
    if not isinstance(data, dict):
        return f"the body is a JSON {_json_type(data)}, not an object", None
    if field not in data:
        return f"the body has no {field!r} field", None
    if len(data) > 1:  # a typo such as {"events": [], "event": [...]} must not pass as an empty batch
        return f"the body has field(s) other than {field!r}: {', '.join(sorted(repr(k) for k in data if k != field))}", None
    if not isinstance(data[field], list):
        return f"{field!r} is a JSON {_json_type(data[field])}, not an array", None
    return None, data[field]


def what_to_send(field: str) -> str:
    """What an ingestion route takes (batch field ``field``): the end of each 400 about its body."""
    return f"a JSON object {{\"{field}\": [...]}} (no other field) with 'Content-Type: application/json'"


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


#: the routes that read shop data: a key of either list, and nothing else checked here
READ_PATHS = frozenset({"/recommend", "/similar", "/status"})
_NO_KEYS = ("no API keys are configured on this server: set SHOPREC_API_KEYS (a JSON list; the local stack's "
            "commands use 'shoprec-dev-key')")
_BAD_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>'"


def _bearer(raw: bytes) -> bytes:
    return raw[7:].strip() if raw[:7].lower() == b"bearer " else b""


def _matches(token: bytes, keys) -> bool:
    """Whether ``token`` is one of ``keys``, compared against every key (no early exit), so timing does not
    tell which prefix matched."""
    return bool(token) and any([hmac.compare_digest(token, k.get_secret_value().encode()) for k in keys])


class ApiKeyAndSizeGuard:
    """ASGI middleware: the key of every read and ingestion route; 413 and 429 of an ingestion request before
    the service parses its body."""

    def __init__(self, app, paths: dict[str, str] | None = None, answers: dict | None = None):
        self.app = app
        self.paths = paths or {"/events": "events", "/catalog": "products"}  # path -> the batch's field
        self.answers = answers or {}  # path -> the pydantic model of its 200 answer, for /docs.json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]

        async def refuse(status: int, error: str, headers: dict | None = None):
            log_refused(scope, status, error)
            await JSONResponse({"error": error}, status_code=status, headers=headers)(scope, receive, send)

        settings = get_settings()
        if path == "/" and scope.get("method") == "GET":
            return await Response(index_page(), media_type="text/html")(scope, receive, send)
        if path == "/docs.json":
            return await self.app(scope, receive, _KeyInSchema(send, READ_PATHS, set(self.paths), self.answers))
        if path in READ_PATHS:
            if settings.serve_public_reads:
                return await self.app(scope, receive, send)
            if not settings.api_keys and not settings.read_api_keys:
                return await refuse(503, _NO_KEYS)
            token = _bearer(next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b""))
            if not _matches(token, settings.api_keys + settings.read_api_keys):
                return await refuse(401, _BAD_KEY, {"WWW-Authenticate": "Bearer"})
            return await self.app(scope, receive, send)
        if path not in self.paths:
            return await self.app(scope, receive, send)
        field = self.paths[path]

        if not settings.api_keys:
            return await refuse(503, _NO_KEYS)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = _bearer(headers.get("authorization", "").encode("latin-1"))
        if not _matches(token, settings.api_keys):
            if _matches(token, settings.read_api_keys):
                return await refuse(403, f"this API key may only read (/recommend, /similar, /status); {path} "
                                         "needs a key of SHOPREC_API_KEYS")
            return await refuse(401, _BAD_KEY, {"WWW-Authenticate": "Bearer"})
        if (media := refused_media(headers.get("content-type", ""), required=True)) is not None:
            return await refuse(415, media)

        limit = settings.max_request_bytes
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await refuse(413, f"request body is {declared} bytes; the limit is {limit}: send smaller batches")

        key_id = hashlib.sha256(token).hexdigest()[:16]  # the key itself never reaches Redis
        try:
            wait_s = await anyio.to_thread.run_sync(_over_limit, settings.redis_url, settings.events_rate_limit, key_id)
        except Exception as err:  # noqa: BLE001 - any storage failure: fail open, say so
            log.warning("rate limit not checked (Redis unavailable: %s); request let through", err)
            wait_s = None
        if wait_s is not None:
            return await refuse(429, f"rate limit {settings.events_rate_limit} of this API key exceeded; "
                                     f"retry in {math.ceil(wait_s)} s", {"Retry-After": str(math.ceil(wait_s))})

        try:
            body = await read_capped(receive, limit)
        except BodyTooLarge:
            return await refuse(413, f"request body exceeds {limit} bytes: send smaller batches")
        if body is None:  # the client went away
            return
        problem, batch = _batch_of(body, field)
        if problem is not None:
            return await refuse(400, f"{problem}; send {what_to_send(field)}")
        if len(batch) > settings.max_events_per_request:
            return await refuse(413, f"{len(batch)} {field} in one request; the limit is "
                                     f"{settings.max_events_per_request}: split the batch")

        return await self.app(scope, replaying(body, receive), send)


class _KeyInSchema:
    """The ``send`` of a ``/docs.json`` answer: the OpenAPI schema BentoML writes, plus the API key.

    BentoML's schema has no security scheme, so its Swagger UI (at ``/``) offered no way to send a key
    and every "Try it out" on a keyed route answered 401. With a bearer scheme on those routes the UI
    shows "Authorize" and sends ``Authorization: Bearer <key>``.
    """

    def __init__(self, send, reads: set[str] | frozenset[str], writes: set[str], answers: dict | None = None):
        self.send, self.reads, self.writes, self.answers = send, reads, writes, answers or {}
        self.start: dict | None = None
        self.body = bytearray()

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body" or self.start is None:
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return
        body = bytes(self.body)
        if self.start["status"] == 200:
            try:
                body = orjson.dumps(document(_with_key(orjson.loads(body), self.reads, self.writes),
                                             get_settings(), self.answers))
            except (orjson.JSONDecodeError, TypeError, AttributeError, KeyError) as err:  # BentoML's, unchanged
                log.warning("API key not added to the OpenAPI schema (%s)", err)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})


#: the answers the guard gives before BentoML sees a request (BentoML's schema lists only its own)
_GUARD_ANSWERS = {
    "401": "missing or invalid API key: send 'Authorization: Bearer <key>'",
    "413": "body over the size limit (SHOPREC_MAX_QUERY_BYTES; ingestion: SHOPREC_MAX_REQUEST_BYTES or "
           "SHOPREC_MAX_EVENTS_PER_REQUEST)",
    "415": "a content-type other than application/json",
    "503": "no API keys are configured on this server",
}
_WRITE_ANSWERS = {"403": "a read-only key (SHOPREC_READ_API_KEYS) cannot send",
                  "429": "over the key's rate limit (SHOPREC_EVENTS_RATE_LIMIT); see Retry-After"}


def _with_key(spec: dict, reads: set[str] | frozenset[str], writes: set[str]) -> dict:
    """``spec`` with a bearer security scheme, required on the operations of the keyed paths (``reads`` and
    ``writes``), and the answers the guard gives them."""
    spec.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http", "scheme": "bearer",
        "description": "a key of SHOPREC_API_KEYS (reads: or of SHOPREC_READ_API_KEYS); locally 'shoprec-dev-key'"}
    error = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
    for path, item in spec.get("paths", {}).items():
        if path not in reads and path not in writes:
            continue
        answers = {**_GUARD_ANSWERS, **(_WRITE_ANSWERS if path in writes else {})}
        for operation in item.values():
            if isinstance(operation, dict):
                operation["security"] = [{"apiKey": []}]
                responses = operation.setdefault("responses", {})
                for status, text in answers.items():
                    responses.setdefault(status, {"description": text, "content": error})
    return spec
