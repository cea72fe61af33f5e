"""shoprec's BentoML service: ``/recommend``, ``/similar``, ``/events`` (+ BentoML's /healthz, /readyz, /metrics).

Thin by design: every decision is made in :mod:`pipelines.serving`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field

from bentos.guard import ApiKeyAndSizeGuard

with bentoml.importing():
    from pipelines.schemas import Id
    from pipelines.ingest import EventIngestor, IngestRejected
    from pipelines.serving import RecommendationEngine
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


@bentoml.service(name="shoprec", http={"port": 3001}, traffic={"timeout": 10}, workers=1)
class Shoprec:
    """Real-time product recommendations with champion/challenger A/B and a never-failing fallback."""

    def __init__(self) -> None:
        self.settings = get_settings()
        self.engine = RecommendationEngine.from_settings(self.settings)
        self.engine.refresh()
        self.engine.start_polling()
        self.ingestor = EventIngestor(self.settings)

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
            n = self.ingestor.ingest(events)
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
