"""Online state in Redis: what the stream consumer writes and serving reads.

Per user: recent items (capped list) and cached top-N lists per variant.
Per item: time-decayed trending counts. Plus A/B counters, cache and
cold-start counters in one-minute buckets, DLQ reasons and consumer status.
All keys come from :class:`pipelines.schemas.RedisKeys`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence

import redis

from pipelines.schemas import EVENT_WEIGHTS, LATENCY_EDGES_MS, STATS_EVENTS, STATS_LATENCY, Event, RedisKeys

BUCKET_S = 60
STATS_TTL_S = 7 * 86_400
TRENDING_HALF_LIFE_H = 6.0
TRENDING_WINDOW_H = 48
REQUEST_TTL_S = 86_400

AB_METRICS = {"impression": "impressions", "click": "clicks", "purchase": "purchases", "add_to_cart": "carts"}


def connect(url: str) -> redis.Redis:
    """A Redis client with short timeouts so that a dead Redis fails fast instead of hanging."""
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)


class OnlineState:
    """Reads and writes shoprec's online state in one Redis."""

    def __init__(self, client: redis.Redis, *, recent_cap: int = 50, cache_ttl_s: int = 300,
                 experiment: str = "default"):
        self.r = client
        self.recent_cap = recent_cap
        self.cache_ttl_s = cache_ttl_s
        self.experiment = experiment

    # --- writes from the stream consumer ------------------------------------
    def apply_events(self, events: Sequence[Event]) -> None:
        """Fold one batch of valid events into the online state (two pipelined round trips)."""
        if not events:
            return
        unattributed = [e.request_id for e in events if e.event_type in AB_METRICS and e.event_type != "impression"
                        and e.request_id and not e.variant]
        variants: dict[str, str] = {}
        if unattributed:
            got = self.r.mget([RedisKeys.request(r) for r in unattributed])
            variants = {rid: v for rid, v in zip(unattributed, got) if v}
        p = self.r.pipeline(transaction=False)
        touched_hours = set()
        bucket = int(time.time()) // BUCKET_S
        users = set()
        for e in events:
            if e.event_type in EVENT_WEIGHTS:
                users.add(e.user_id)
                p.lpush(RedisKeys.recent(e.user_id), e.item_id)
                hour = e.ts // 3_600_000
                touched_hours.add(hour)
                p.zincrby(RedisKeys.trending_hour(hour), EVENT_WEIGHTS[e.event_type], e.item_id)
            if e.event_type == "impression" and e.request_id and e.variant:
                p.set(RedisKeys.request(e.request_id), e.variant, ex=REQUEST_TTL_S)
            variant = e.variant or (variants.get(e.request_id) if e.request_id else None)
            if variant and e.event_type in AB_METRICS:
                p.hincrby(RedisKeys.ab(self.experiment, variant), AB_METRICS[e.event_type], 1)
                p.hincrby(RedisKeys.counter(f"ab:{variant}", bucket), AB_METRICS[e.event_type], 1)
        by_type: dict[str, int] = {}
        for e in events:
            by_type[e.event_type] = by_type.get(e.event_type, 0) + 1
        ev_key = RedisKeys.counter(STATS_EVENTS, bucket)
        for etype, n in by_type.items():
            p.hincrby(ev_key, etype, n)
        p.expire(ev_key, STATS_TTL_S)
        for u in users:
            p.ltrim(RedisKeys.recent(u), 0, self.recent_cap - 1)
            p.delete(RedisKeys.cache(u))
        if users:
            p.sadd(RedisKeys.known_users, *users)
        for h in touched_hours:
            p.expire(RedisKeys.trending_hour(h), TRENDING_WINDOW_H * 3600)
        p.execute()

    def refresh_trending(self, now_s: float | None = None) -> None:
        """Merge the hourly item counts of the last two days into ``trending`` with exponential decay."""
        now_h = (time.time() if now_s is None else now_s) / 3600
        weights = {RedisKeys.trending_hour(h): 0.5 ** ((now_h - h) / TRENDING_HALF_LIFE_H)
                   for h in range(int(now_h) - TRENDING_WINDOW_H, int(now_h) + 1)}
        existing = [k for k, n in zip(weights, self._exists_many(weights)) if n]
        if existing:
            self.r.zunionstore(RedisKeys.trending, {k: weights[k] for k in existing})

    def _exists_many(self, keys: Iterable[str]) -> list[int]:
        p = self.r.pipeline(transaction=False)
        for k in keys:
            p.exists(k)
        return p.execute()

    def count_dlq(self, reasons: dict[str, int]) -> None:
        if reasons:
            p = self.r.pipeline(transaction=False)
            for reason, n in reasons.items():
                p.hincrby(RedisKeys.dlq_reasons, reason, n)
            p.execute()

    def set_consumer_status(self, **fields) -> None:
        self.r.hset(RedisKeys.consumer_status, mapping={k: str(v) for k, v in fields.items()})

    # --- reads for serving ---------------------------------------------------
    def recent_items(self, user_id: str, n: int | None = None) -> list[str]:
        """The user's most recent items, newest first."""
        return self.r.lrange(RedisKeys.recent(user_id), 0, (n or self.recent_cap) - 1)

    def is_known(self, user_id: str) -> bool:
        return bool(self.r.sismember(RedisKeys.known_users, user_id))

    def trending(self, k: int) -> list[tuple[str, float]]:
        return [(i, float(s)) for i, s in self.r.zrevrange(RedisKeys.trending, 0, k - 1, withscores=True)]

    def get_cached(self, user_id: str, variant: str) -> dict | None:
        raw = self.r.hget(RedisKeys.cache(user_id), variant)
        return json.loads(raw) if raw else None

    def set_cached(self, user_id: str, variant: str, payload: dict) -> None:
        key = RedisKeys.cache(user_id)
        p = self.r.pipeline(transaction=False)
        p.hset(key, variant, json.dumps(payload))
        p.expire(key, self.cache_ttl_s)
        p.execute()

    def set_popular_fallback(self, items: Sequence[tuple[str, float]]) -> None:
        """Replace the list served when no model can answer."""
        p = self.r.pipeline(transaction=True)
        p.delete(RedisKeys.popular_fallback)
        if items:
            p.zadd(RedisKeys.popular_fallback, {i: float(s) for i, s in items})
        p.execute()

    def popular_fallback(self, k: int) -> list[tuple[str, float]]:
        return [(i, float(s)) for i, s in self.r.zrevrange(RedisKeys.popular_fallback, 0, k - 1, withscores=True)]

    # --- counters for the dashboard ----------------------------------------------
    def incr_stats(self, name: str, fields: dict[str, int]) -> None:
        """Add to a one-minute bucket of counters, e.g. ``incr_stats("cache", {"hit": 1})``."""
        key = RedisKeys.counter(name, int(time.time()) // BUCKET_S)
        p = self.r.pipeline(transaction=False)
        for f, n in fields.items():
            p.hincrby(key, f, n)
        p.expire(key, STATS_TTL_S)
        p.execute()

    def record_latency(self, source: str, ms: float) -> None:
        """Count one request's latency in the per-minute histogram of ``source`` (cache | model | fallback)."""
        edge = next((str(e) for e in LATENCY_EDGES_MS if ms <= e), "inf")
        self.incr_stats(f"{STATS_LATENCY}:{source}", {edge: 1})

    def read_stats(self, name: str, minutes: int = 60) -> dict[int, dict[str, int]]:
        """Counters of the last ``minutes`` buckets: ``{bucket_start_epoch_s: {field: count}}``."""
        now = int(time.time()) // BUCKET_S
        buckets = list(range(now - minutes + 1, now + 1))
        p = self.r.pipeline(transaction=False)
        for b in buckets:
            p.hgetall(RedisKeys.counter(name, b))
        return {b * BUCKET_S: {f: int(v) for f, v in got.items()} for b, got in zip(buckets, p.execute()) if got}

    def ab_counts(self) -> dict[str, dict[str, int]]:
        """Totals per variant of the running experiment: impressions, clicks, carts, purchases."""
        out = {}
        for key in self.r.scan_iter(RedisKeys.ab(self.experiment, "*")):
            out[key.rsplit(":", 1)[1]] = {f: int(v) for f, v in self.r.hgetall(key).items()}
        return out

    def dlq_reasons(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(RedisKeys.dlq_reasons).items()}

    def consumer_status(self) -> dict[str, str]:
        return self.r.hgetall(RedisKeys.consumer_status)
