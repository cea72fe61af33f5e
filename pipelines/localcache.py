"""An in-process copy of the Redis list cache, kept honest by Redis's own invalidation messages.

A cached ``/recommend`` answer costs a Redis round trip: about a fifth of its time at 4 clients on
two busy cores (p50 1.95 -> 1.52 ms without it, BENCHMARKS.md). :class:`TrackedCache` keeps the
lists an API process has read from Redis in memory and drops one the moment Redis says its key
changed: server-assisted client-side caching (``CLIENT TRACKING ... BCAST PREFIX``, Redis >= 6.2;
on an older server the copy never turns on and every read goes to Redis).

- A background thread holds two connections: one subscribed to ``__redis__:invalidate``, one that
  asked Redis to send it every change to a key under the cache prefix (the consumer deleting a
  user's lists after a new event, another API process storing a new one, a TTL expiring, FLUSHALL).
- Until both are up, and from the moment either fails, the local copy is empty and unused: every
  read goes to Redis (or, with Redis down, to the model), never to a copy nobody invalidates.
- A read from Redis is stored only if no invalidation of its key arrived after the read began,
  so a value read just before a change can never outlive it.
- Bounded: ``max_entries`` keys, least recently used dropped first; entries also expire after the
  Redis TTL.

Consistency: a change reaches the copy when the invalidation message does, typically well under a
millisecond after Redis applied it (the consumer's own batching delays a click by tens of ms more).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "__redis__:invalidate"
_PRUNE_AT = 200_000  # remembered invalidations of keys not held locally, before forgetting old ones


def _check_tracking(tracker: redis.Redis, client_id: int) -> None:
    """Raise unless ``tracker`` still has BCAST tracking on, redirected to ``client_id`` (Redis >= 6.2)."""
    info = tracker.execute_command("CLIENT", "TRACKINGINFO")
    if isinstance(info, list):  # RESP2 map: [key, value, ...]
        info = dict(zip(info[::2], info[1::2]))
    info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
    flags = {f.decode() if isinstance(f, bytes) else f for f in info.get("flags") or []}
    if "on" not in flags or "bcast" not in flags or "broken_redirect" in flags or int(info.get("redirect", -1)) != client_id:
        raise redis.ConnectionError(f"Redis no longer tracks the cache keys for this process ({sorted(flags)})")


class TrackedCache:
    """Local copies of Redis hash fields under ``prefix``, invalidated by Redis (see the module doc).

    Args:
        url: Redis URL (same server as the cache).
        prefix: key prefix to track, e.g. ``"shoprec:cache:"``.
        max_entries: keys kept at most (least recently used dropped).
        ttl_s: a local copy is dropped after this long even without an invalidation.
        health_s: how often the tracking connection is checked (a dead one stops invalidations).
    """

    def __init__(self, url: str, prefix: str, *, max_entries: int = 20_000, ttl_s: float = 300.0,
                 health_s: float = 0.25):
        self.url, self.prefix = url, prefix
        self.max_entries, self.ttl_s, self.health_s = max_entries, ttl_s, health_s
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
        # Each invalidation (and reset) raises _seq; a read from Redis takes the current _seq as its token
        # and is stored only if its key's last invalidation is not newer, and the token not below _floor.
        self._seq = 0
        self._invalidated: dict[str, int] = {}  # key -> seq of its last invalidation
        self._floor = 0  # reads that began before this seq are never stored (reset, flush, pruning)
        self._active = False
        self.invalidations = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-invalidation", daemon=True)
        self._thread.start()

    # --- the request path -------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while Redis invalidations arrive (only then is the copy used)."""
        return self._active

    def wait_active(self, timeout_s: float) -> bool:
        """Block until the invalidation connection is up (tests, start-up); False on timeout."""
        return self._ready.wait(timeout_s)

    def get(self, key: str, field: str) -> str | None:
        if not self._active:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, fields = entry
            if expires < time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return fields.get(field)

    def token(self) -> int:
        """Take before reading Redis; pass to :meth:`put` with what the read returned."""
        return self._seq

    def put(self, key: str, field: str, value: str, token: int) -> bool:
        """Keep ``value`` unless ``key`` was invalidated (or the copy reset) since ``token``."""
        with self._lock:
            if not self._active or token < self._floor or self._invalidated.get(key, -1) > token:
                return False
            entry = self._entries.get(key)
            if entry is None:
                entry = (time.monotonic() + self.ttl_s, {})
                self._entries[key] = entry
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            entry[1][field] = value
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # --- invalidation -----------------------------------------------------------------
    def _invalidate(self, keys) -> None:
        with self._lock:
            self._seq += 1
            self.invalidations += 1
            if keys is None:  # FLUSHALL / FLUSHDB
                self._entries.clear()
                self._floor = self._seq
                return
            for k in keys:
                k = k.decode() if isinstance(k, bytes) else k
                self._entries.pop(k, None)
                self._invalidated[k] = self._seq
            if len(self._invalidated) > _PRUNE_AT:  # forget them; reads begun before now are not stored
                self._invalidated.clear()
                self._floor = self._seq

    def _reset(self, active: bool) -> None:
        with self._lock:
            self._entries.clear()
            self._invalidated.clear()
            self._seq += 1
            self._floor = self._seq
            self._active = active

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            client = tracker = pubsub = None
            try:
                # RESP2: the invalidations then arrive as messages on the channel (RESP3 sends them as
                # pushes). No retries: redis-py would reconnect and resubscribe in place, and a new
                # connection is not the one Redis redirects invalidations to; every error rebuilds both.
                client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2, protocol=2,
                                              retry=Retry(NoBackoff(), 0))
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                name = f"shoprec-invalidate-{uuid.uuid4().hex[:12]}"
                pubsub.execute_command("CLIENT", "SETNAME", name)
                pubsub.subscribe(INVALIDATE_CHANNEL)
                deadline = time.monotonic() + 5
                while not pubsub.subscribed or pubsub.get_message(timeout=0.05) is not None:
                    if time.monotonic() > deadline:
                        raise redis.TimeoutError("no confirmation of the invalidation subscription")
                client_id = int(next(c["id"] for c in client.client_list() if c.get("name") == name))
                tracker = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2,
                                               single_connection_client=True, retry=Retry(NoBackoff(), 0))
                tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX",
                                        self.prefix)
                self._reset(active=True)
                self._ready.set()
                log.info("local list cache on: Redis invalidates keys under %s", self.prefix)
                delay = 0.1
                checked = time.monotonic()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=min(self.health_s, 1.0))
                    if msg is not None and msg.get("type") == "message":
                        self._invalidate(msg["data"])
                    if time.monotonic() - checked >= self.health_s:
                        _check_tracking(tracker, client_id)
                        checked = time.monotonic()
            except (redis.RedisError, OSError, StopIteration) as err:
                if self._active:
                    log.warning("local list cache off until Redis invalidations resume (%s)", err)
                self._reset(active=False)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                for c in (pubsub, tracker, client):
                    try:
                        if c is not None:
                            c.close()
                    except (redis.RedisError, OSError):
                        pass
        self._reset(active=False)
