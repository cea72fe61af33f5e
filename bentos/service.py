"""shoprec's BentoML service: ``/recommend``, ``/similar``, ``/events`` (+ BentoML's /healthz, /readyz, /metrics).

Thin by design: every decision is made in :mod:`pipelines.serving`.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

with bentoml.importing():
    from pipelines.schemas import Id
    from pipelines.serving import IngestRejected, RecommendationEngine
    from pipelines.settings import get_settings

log = logging.getLogger("shoprec.service")


class Item(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    request_id: str
    items: list[Item]
    variant: str
    model_version: str | None
    source: str = Field(description="cache | model | fallback")


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


@bentoml.service(name="shoprec", http={"port": 3001}, traffic={"timeout": 10}, workers=1)
class Shoprec:
    """Real-time product recommendations with champion/challenger A/B and a never-failing fallback."""

    def __init__(self) -> None:
        self.settings = get_settings()
        self.engine = RecommendationEngine.from_settings(self.settings)
        self.engine.refresh()
        self.engine.start_polling()

    @bentoml.api(route="/recommend")
    def recommend(self, user_id: Id, k: Annotated[int, Field(ge=1, le=100)] = 10,
                  context: dict[str, Any] | None = None) -> RecommendResponse:
        """Top-k items for a user; ``source`` says whether the list came from the cache, a model or the fallback."""
        return RecommendResponse(**self.engine.recommend(user_id, k).to_dict())

    @bentoml.api(route="/similar")
    def similar(self, item_id: Id, k: Annotated[int, Field(ge=1, le=100)] = 10) -> dict:
        """Items similar to one item (from the champion's item embeddings)."""
        return self.engine.similar(item_id, k)

    @bentoml.api(route="/events")
    def events(self, events: Annotated[list[Any], Field(max_length=1000)], ctx: bentoml.Context) -> dict:
        """Ingest shop events (API key required); 202 once Kafka acknowledged the whole batch."""
        try:
            n = self.engine.ingest(events)
        except IngestRejected as err:
            ctx.response.status_code = 400
            return {"error": str(err), "errors": err.errors}
        except Exception as err:
            log.warning("events not delivered to Kafka: %s", err)
            ctx.response.status_code = 503
            return {"error": "the event bus is unavailable; nothing was accepted, retry with backoff"}
        ctx.response.status_code = 202
        return {"accepted": n}

    @bentoml.api(route="/status")
    def status(self) -> dict:
        """Versions being served and the fallback list size."""
        return {"models": {a: m.version for a, m in self.engine.models.items()},
                "fallback_items": len(self.engine._fallback)}


Shoprec.add_asgi_middleware(ApiKeyAndSizeGuard)
