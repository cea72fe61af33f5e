"""ASGI guard of the ingestion path: API key and request size are checked before any parsing."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from pipelines.settings import get_settings


class ApiKeyAndSizeGuard:
    """ASGI middleware for ``/events``: API key first (401), then body size (413), before any parsing."""

    def __init__(self, app, path: str = "/events"):
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        settings = get_settings()
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not token or not any(hmac.compare_digest(token, k.get_secret_value()) for k in settings.api_keys):
            return await JSONResponse({"error": "missing or invalid API key: send 'Authorization: Bearer <key>'"},
                                      status_code=401)(scope, receive, send)
        limit = settings.max_event_bytes * settings.max_events_per_request
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = 0
        if length > limit:
            return await JSONResponse({"error": f"request body is {length} bytes; the limit is {limit}"},
                                      status_code=413)(scope, receive, send)
        return await self.app(scope, receive, send)
