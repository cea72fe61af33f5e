"""ASGI guard: API calls must send JSON; anything else is a 415 with a message (BentoML would answer 500).

A POST whose ``Content-Type`` is set to something other than JSON is refused on every API route. The
ingestion routes (``/events``, ``/catalog``) also refuse a POST without a ``Content-Type``: BentoML
would read its body as JSON anyway (an empty one as an empty batch, answered 202), so a client that
forgot the header would only find out when it sent something else.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

#: BentoML's own routes that take no JSON body
_OPEN = ("/healthz", "/readyz", "/livez", "/metrics", "/docs", "/docs.json", "/schema.json")
#: routes where a POST must say ``Content-Type: application/json``
_DECLARED = ("/events", "/catalog")


def unsupported(media: str) -> str:
    """The 415 message for a request whose media type is ``media`` ("" when it sent no Content-Type)."""
    what = f"Content-Type {media!r}" if media else "a request without a Content-Type"
    return f"{what} is not supported: send a JSON body with 'Content-Type: application/json'"


class JsonOnly:
    """Reject a POST whose ``Content-Type`` is set and is not ``application/json`` (or ``+json``), and on the
    ``required`` paths (the ingestion routes by default) one without a ``Content-Type``."""

    def __init__(self, app, required: tuple[str, ...] = _DECLARED):
        self.app = app
        self.required = frozenset(required)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] not in _OPEN:
            ctype = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"), "")
            media = ctype.split(";", 1)[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json") \
                    or not media and scope["path"] in self.required:
                return await JSONResponse({"error": unsupported(media)}, status_code=415)(scope, receive, send)
        return await self.app(scope, receive, send)
