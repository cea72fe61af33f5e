"""ASGI guard: API calls must send JSON; anything else is a 415 with a message (BentoML would answer 500)."""

from __future__ import annotations

from starlette.responses import JSONResponse

#: BentoML's own routes that take no JSON body
_OPEN = ("/healthz", "/readyz", "/livez", "/metrics", "/docs", "/docs.json", "/schema.json")


class JsonOnly:
    """Reject a POST whose ``Content-Type`` is set and is not ``application/json``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] not in _OPEN:
            ctype = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"content-type"), "")
            media = ctype.split(";", 1)[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json"):
                return await JSONResponse({"error": f"Content-Type {media!r} is not supported: send a JSON body "
                                                    "with 'Content-Type: application/json'"},
                                          status_code=415)(scope, receive, send)
        return await self.app(scope, receive, send)
