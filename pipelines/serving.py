"""The serving core behind the BentoML service: models by alias, cache, A/B split, fallback.

It never fails a request: when the cache is down it scores without it; when no
model can answer it serves popular items from a local snapshot with
``source: fallback``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from pipelines import kafka_io
from pipelines.registry import LoadedModel, ModelRegistry
from pipelines.schemas import (ALIAS_CHALLENGER, ALIAS_CHAMPION, SOURCE_CACHE, SOURCE_FALLBACK, SOURCE_MODEL,
                               STATS_CACHE, STATS_REQUESTS, new_event)
from pipelines.settings import Settings
from pipelines.state import OnlineState, connect

log = logging.getLogger(__name__)


@dataclass
class Recommendation:
    request_id: str
    items: list[dict]
    variant: str
    model_version: str | None
    source: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class RecommendationEngine:
    """Answers ``/recommend`` and ``/similar`` for one serving process."""

    def __init__(self, settings: Settings, registry: ModelRegistry, state: OnlineState):
        self.settings = settings
        self.registry = registry
        self.state = state
        self.models: dict[str, LoadedModel] = {}
        self._producer = None
        self._producer_lock = threading.Lock()
        self._stop = threading.Event()
        self._snapshot_path = settings.var_dir / "serving" / "fallback.json"
        self._fallback: list[tuple[str, float]] = self._read_snapshot()

    @classmethod
    def from_settings(cls, settings: Settings) -> RecommendationEngine:
        state = OnlineState(connect(settings.redis_url), recent_cap=settings.recent_items_cap,
                            cache_ttl_s=settings.cache_ttl_s, experiment=settings.ab_experiment)
        return cls(settings, ModelRegistry(settings.mlflow_tracking_uri), state)

    # --- model lifecycle -------------------------------------------------------------
    def refresh(self) -> dict[str, str | None]:
        """Load the versions behind ``champion``/``challenger`` when they changed; swap atomically."""
        models = dict(self.models)
        for alias in (ALIAS_CHAMPION, ALIAS_CHALLENGER):
            try:
                version = self.registry.version_for(alias)
                if version is None:
                    models.pop(alias, None)
                elif alias not in models or models[alias].version != version:
                    models[alias] = self.registry.load(alias)
                    log.info("serving %s = version %s", alias, version)
            except Exception as err:  # registry down or a broken model: keep what we have
                log.warning("could not refresh %s from MLflow (%s); keeping the current model", alias, err)
        self.models = models
        self._refresh_fallback()
        return {a: m.version for a, m in models.items()}

    def start_polling(self) -> threading.Thread:
        def loop():
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(self.settings.model_poll_s)

        t = threading.Thread(target=loop, name="model-poller", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        if self._producer is not None:
            self._producer.close(timeout=2)

    # --- A/B ----------------------------------------------------------------------
    def assign_variant(self, user_id: str) -> str:
        """Sticky assignment by a salted hash of the user id."""
        if ALIAS_CHALLENGER not in self.models or ALIAS_CHAMPION not in self.models:
            return ALIAS_CHAMPION
        h = int.from_bytes(hashlib.sha256(f"{self.settings.ab_salt}:{user_id}".encode()).digest()[:8], "big")
        return ALIAS_CHALLENGER if (h % 10_000) < self.settings.ab_challenger_share * 10_000 else ALIAS_CHAMPION

    # --- recommend -----------------------------------------------------------------
    def recommend(self, user_id: str, k: int) -> Recommendation:
        request_id = uuid.uuid4().hex
        variant = self.assign_variant(user_id)
        stats: dict[str, int] = {}
        rec = None
        try:
            rec = self._from_cache(request_id, user_id, variant, k, stats)
            if rec is None:
                rec = self._from_model(request_id, user_id, variant, k, stats)
        except Exception as err:
            log.warning("model could not answer for %s (%s); serving the fallback list", user_id, err)
        if rec is None:
            rec = Recommendation(request_id, self._fallback_items(k), variant, None, SOURCE_FALLBACK)
        stats[rec.source] = 1
        self._safe(self.state.incr_stats, STATS_REQUESTS, stats)
        self._log_impression(user_id, rec)
        return rec

    def _from_cache(self, request_id, user_id, variant, k, stats) -> Recommendation | None:
        cached = self._safe(self.state.get_cached, user_id, variant)
        model = self.models.get(variant)
        if cached and model and cached.get("model_version") == model.version and len(cached["items"]) >= k:
            self._safe(self.state.incr_stats, STATS_CACHE, {"hit": 1})
            return Recommendation(request_id, cached["items"][:k], variant, cached["model_version"], SOURCE_CACHE)
        self._safe(self.state.incr_stats, STATS_CACHE, {"miss": 1})
        return None

    def _from_model(self, request_id, user_id, variant, k, stats) -> Recommendation | None:
        model = self.models.get(variant)
        if model is None:
            return None
        rec = model.recommender
        if user_id in rec.known_users:
            scored = rec.recommend_scored([user_id], k, exclude_seen=True)[0]
        else:
            recent = self._safe(self.state.recent_items, user_id) or []
            stats["cold_user"] = 1
            stats["cold_user_session" if recent else "cold_user_trending"] = 1
            scored = rec.recommend_session_scored(recent, k)
        items = [{"item_id": i, "score": round(float(s), 6)} for i, s in scored]
        self._safe(self.state.set_cached, user_id, variant, {"items": items, "model_version": model.version})
        return Recommendation(request_id, items, variant, model.version, SOURCE_MODEL)

    def similar(self, item_id: str, k: int) -> dict:
        model = self.models.get(ALIAS_CHAMPION)
        items = model.recommender.similar_items(item_id, k) if model else []
        return {"item_id": item_id, "items": items, "model_version": model.version if model else None}

    # --- fallback -----------------------------------------------------------------
    def _fallback_items(self, k: int) -> list[dict]:
        return [{"item_id": i, "score": round(float(s), 6)} for i, s in self._fallback[:k]]

    def _refresh_fallback(self) -> None:
        items = self._safe(self.state.popular_fallback, self.settings.fallback_k)
        if items and items != self._fallback:
            self._fallback = items
            self._snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._snapshot_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(items))
            tmp.replace(self._snapshot_path)

    def _read_snapshot(self) -> list[tuple[str, float]]:
        try:
            return [tuple(x) for x in json.loads(Path(self._snapshot_path).read_text())]
        except (OSError, ValueError):
            return []

    # --- impressions -------------------------------------------------------------
    def producer(self):
        with self._producer_lock:
            if self._producer is None:
                self._producer = kafka_io.make_producer(self.settings)
            return self._producer

    def _log_impression(self, user_id: str, rec: Recommendation) -> None:
        if not rec.items:
            return
        ev = new_event("impression", user_id, None, rec.request_id, items=[i["item_id"] for i in rec.items],
                       request_id=rec.request_id, variant=rec.variant, model_version=rec.model_version)
        try:
            kafka_io.send_events(self.producer(), [ev])
        except Exception as err:  # Kafka down must not fail a recommendation
            log.warning("impression not logged: %s", err)

    @staticmethod
    def _safe(fn, *args):
        """Call a Redis operation; on a Redis outage return None instead of failing the request."""
        try:
            return fn(*args)
        except redis.RedisError as err:
            log.warning("redis unavailable (%s): serving without it", err)
            return None
