"""Online state in Redis: what the stream consumer writes and serving reads.

Per user: recent items (capped list) and cached top-N lists per variant.
Per item: time-decayed trending counts. Plus A/B counters, cache and
cold-start counters in one-minute buckets, DLQ reasons and consumer status.
All keys come from :class:`pipelines.schemas.RedisKeys`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import redis

from pipelines.lake import rows_table
from pipelines.schemas import (EVENT_WEIGHTS, LATENCY_EDGES_MS, PURCHASE_MEMORY_S, STATS_EVENTS, STATS_LATENCY, Event,
                               RedisKeys)

log = logging.getLogger(__name__)

BUCKET_S = 60
STATS_TTL_S = 7 * 86_400
TRENDING_HALF_LIFE_H = 6.0
TRENDING_WINDOW_H = 48
REQUEST_TTL_S = 86_400
#: a user's recent items are forgotten this long after their last event (every visitor and bot id used to
#: stay in Redis for good); the lists of an active user live on
RECENT_TTL_S = 30 * 86_400
#: the serving status's field prefix of the trained version behind each alias served (``trained:champion``)
TRAINED_FIELD = "trained:"
#: an A/B comparison's running totals are forgotten this long after its last event
AB_TTL_S = 90 * 86_400
#: how long a click, cart or purchase waits for its request's impression (see OnlineState._waiting) before it is
#: counted as unattributed: the impression producer lingers 100 ms, Kafka outages buffer impressions for longer
AB_WAIT_S = 3_600
_AB_WAIT_EXPIRE_BATCH = 500  # waits given up per batch at most
_AB_WAIT_SCAN_ALL = 2_000  # up to this many waiting requests, read them all; beyond, look up the batch's own

# SET NX GET per id. ARGV: ttl, key prefix, the event_ids and their positions each joined by "\n" (ids
# are hex and dashes, positions "partition:offset": neither can hold a newline). Two big arguments instead
# of two per event keep the client's packing cheap; the reply lists only the duplicates (1-based index,
# earlier position). Keys are built in the script, so on Redis Cluster a batch would need splitting by slot.
_CLAIM_LUA = """
local ttl, prefix = ARGV[1], ARGV[2]
local positions = string.gmatch(ARGV[4], '[^\\n]+')
local out = {}
local i = 0
for id in string.gmatch(ARGV[3], '[^\\n]+') do
  i = i + 1
  local pos = positions()
  local held = redis.call('SET', prefix .. id, pos, 'NX', 'GET', 'EX', ttl)
  if held and held ~= pos then
    out[#out + 1] = i
    out[#out + 1] = held
  end
end
return out
"""

# ARGV: cap, key prefixes (recent, cache, request, trending hour), the recent lists' ttl, the request ttl,
# then three newline-separated blobs built column-wise in Arrow (ids never hold whitespace):
# users "user<TAB>item item ..." (items in push order), trending "hour<TAB>weight<TAB>item" and requests
# "request_id<TAB>variant". LPUSH answers the list's length, so LTRIM runs only for lists past the cap;
# cache invalidation goes as variadic commands. Keys are built in the script, so on
# Redis Cluster a batch would need splitting by slot.
_FOLD_LUA = """
local cap, recent, cache, request, trend = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local recent_ttl, request_ttl = ARGV[6], ARGV[7]
local users = {}
for user, list in string.gmatch(ARGV[8], '([^\\t\\n]+)\\t([^\\n]+)') do
  local items = {}
  for item in string.gmatch(list, '%S+') do items[#items + 1] = item end
  local key, n = recent .. user, 0
  for j = 1, #items, 1000 do
    n = redis.call('LPUSH', key, unpack(items, j, math.min(j + 999, #items)))
  end
  if n > cap then redis.call('LTRIM', key, 0, cap - 1) end
  redis.call('EXPIRE', key, recent_ttl)
  users[#users + 1] = user
end
for j = 1, #users, 1000 do
  local chunk, keys = {unpack(users, j, math.min(j + 999, #users))}, {}
  for i, u in ipairs(chunk) do keys[i] = cache .. u end
  redis.call('UNLINK', unpack(keys))
end
for hour, w, item in string.gmatch(ARGV[9], '([^\\t\\n]+)\\t([^\\t\\n]+)\\t([^\\n]+)') do
  redis.call('ZINCRBY', trend .. hour, w, item)
end
for rid, variant in string.gmatch(ARGV[10], '([^\\t\\n]+)\\t([^\\n]+)') do
  redis.call('SET', request .. rid, variant, 'EX', request_ttl)
end
return 1
"""

AB_METRICS = {"impression": "impressions", "click": "clicks", "purchase": "purchases", "add_to_cart": "carts"}
_AB_TYPES = pa.array(list(AB_METRICS))
_INTERACTIONS = pa.array(list(EVENT_WEIGHTS))
_WEIGHTS = pa.array(list(EVENT_WEIGHTS.values()), pa.float64())


def connect(url: str) -> redis.Redis:
    """A Redis client with short timeouts so that a dead Redis fails fast instead of hanging."""
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)


class _Waits:
    """What one batch changes in the actions waiting for their impression (see ``OnlineState._waiting``)."""

    def __init__(self) -> None:
        self.new: Counter = Counter()  # (request_id, "event_type<TAB>variant<TAB>tag") -> n
        self.settled: list[str] = []  # request_ids counted or given up
        self.unattributed: Counter = Counter()  # event_type -> n given up with no impression

    def add(self, rid: str, event_type: str, variant: str | None, tag: str | None) -> None:
        self.new[(rid, f"{event_type}\t{variant or ''}\t{tag or ''}")] += 1

    def write(self, p, experiment: str, now_ms: int) -> None:
        """Queue the writes on pipeline ``p``."""
        key = RedisKeys.ab_waiting(experiment)
        for (rid, field), n in self.new.items():
            p.hincrby(RedisKeys.ab_waiting_actions(rid), field, n)
            p.expire(RedisKeys.ab_waiting_actions(rid), 2 * AB_WAIT_S + 600)  # outlives the wait: given up, not lost
        if self.new:
            p.zadd(key, {rid: now_ms for rid, _ in self.new}, nx=True)
        if self.settled:
            p.zrem(key, *self.settled)
            p.delete(*(RedisKeys.ab_waiting_actions(r) for r in self.settled))
        for et, n in self.unattributed.items():
            p.hincrby(RedisKeys.ab_unattributed(experiment), et, n)
        if self.unattributed:
            log.warning("%d click(s), cart(s) or purchase(s) named a request_id whose impression did not arrive "
                        "within %d s: left out of the A/B counts (%s)", sum(self.unattributed.values()), AB_WAIT_S,
                        dict(self.unattributed))


class OnlineState:
    """Reads and writes shoprec's online state in one Redis."""

    def __init__(self, client: redis.Redis, *, recent_cap: int = 50, cache_ttl_s: int = 300,
                 experiment: str = "default"):
        self.r = client
        self.recent_cap = recent_cap
        self.cache_ttl_s = cache_ttl_s
        self.experiment = experiment
        self._claim = None
        self._fold = None

    # --- writes from the stream consumer ------------------------------------
    def apply_events(self, events: pa.Table | Sequence[Event | Mapping]) -> None:
        """Fold one batch of valid events into the online state (one or two pipelined round trips).

        Commands are aggregated per key (one LPUSH per user, one ZINCRBY per hour and item, one
        HINCRBY per variant and metric), so a 5,000-event batch costs a few thousand commands, not
        tens of thousands; the aggregation runs column-wise in Arrow. Events must come in offset
        order: a user's newest item ends up first.

        Args:
            events: validated events as a lake table (:data:`pipelines.lake.LAKE_SCHEMA`, what the
                stream consumer holds), or as :class:`Event`\\ s or the dicts of
                :func:`pipelines.schemas.parse_event_dict` (optional fields may be absent).
        """
        if not isinstance(events, pa.Table):
            events = rows_table([e if isinstance(e, Mapping) else e.model_dump() for e in events])
        if not events.num_rows:
            return
        etype = events["event_type"]
        by_type = {d["values"]: d["counts"] for d in pc.value_counts(etype).to_pylist()}
        # views, clicks, carts, purchases: recent items, trending, purchases
        weight = pc.take(_WEIGHTS, pc.index_in(etype, value_set=_INTERACTIONS))
        inter = pa.table({"user": events["user_id"], "item": events["item_id"], "event_type": etype, "w": weight,
                          "ts": events["ts"].cast(pa.int64())}).filter(pc.is_valid(weight))
        recent = inter.select(["user", "item"]).group_by("user", use_threads=False).aggregate([("item", "list")])
        hour = pc.cast(pc.divide(inter["ts"], 3_600_000), pa.string())  # ts >= 0: integer division floors
        trending = (inter.select(["item", "w"]).append_column("hour", hour)
                    .group_by(["hour", "item"], use_threads=False).aggregate([("w", "sum")]))
        purchases: dict[str, dict[str, int]] = {}
        for d in inter.filter(pc.equal(inter["event_type"], "purchase")).select(["user", "item", "ts"]).to_pylist():
            purchases.setdefault(d["user"], {})[d["item"]] = d["ts"]
        shown, ab, seen, waits = self._ab_counts(events)
        # the per-user, per-item and per-request writes (most of the commands) go as one script call,
        # their arguments built in Arrow (no Python object per event)
        if self._fold is None:
            self._fold = self.r.register_script(_FOLD_LUA)
        p = self.r.pipeline(transaction=False)
        self._fold(args=[self.recent_cap, RedisKeys.recent(""), RedisKeys.cache(""), RedisKeys.request(""),
                         RedisKeys.trending_hour(""), RECENT_TTL_S, REQUEST_TTL_S,  # type: ignore[arg-type]
                         lines(recent["user"], pc.binary_join(recent["item_list"], " ")),
                         lines(trending["hour"], pc.cast(trending["w_sum"], pa.string()), trending["item"]),
                         lines(shown["rid"], shown["memo"])], client=p)
        bucket = int(time.time()) // BUCKET_S
        for hour_key in pc.unique(hour).to_pylist():
            p.expire(RedisKeys.trending_hour(hour_key), TRENDING_WINDOW_H * 3600)
        for (tag, variant, metric), n in ab.items():
            p.hincrby(RedisKeys.ab(tag, variant), metric, n)
            p.expire(RedisKeys.ab(tag, variant), AB_TTL_S)
            p.hincrby(RedisKeys.counter(ab_stats_name(tag, variant), bucket), metric, n)
            p.expire(RedisKeys.counter(ab_stats_name(tag, variant), bucket), STATS_TTL_S)
        now_ms = int(time.time() * 1000)
        waits.write(p, self.experiment, now_ms)
        for tag, (first, last) in seen.items():  # when each comparison was first and last seen
            # never later than now: an event may be stamped up to max_event_future_s ahead, and a tag so stamped
            # stayed "the latest comparison" (the one the dashboard opens on) for that long
            p.zadd(RedisKeys.ab_seen(self.experiment, "first"), {tag: min(first, now_ms)}, lt=True)
            p.zadd(RedisKeys.ab_seen(self.experiment, "last"), {tag: min(last, now_ms)}, gt=True)
        for user, bought in purchases.items():  # serving never recommends what the user just bought
            key = RedisKeys.purchased(user)
            p.zadd(key, bought)
            p.zremrangebyscore(key, 0, max(bought.values()) - PURCHASE_MEMORY_S * 1000)
            p.expire(key, PURCHASE_MEMORY_S)
        ev_key = RedisKeys.counter(STATS_EVENTS, bucket)
        for et, n in by_type.items():
            p.hincrby(ev_key, et, n)
        p.expire(ev_key, STATS_TTL_S)
        p.execute()

    def _ab_counts(self, events: pa.Table) -> tuple[pa.Table, Counter, dict[str, tuple[int, int]], _Waits]:
        """What the batch adds to the A/B counters.

        Returns:
            the impressions to remember (``rid``, ``memo`` = "variant tag"), the counts
            ``{(tag, variant, metric): n}``, per tag the first and last impression ts (ms), and the changes
            to the actions waiting for their impression (:class:`_Waits`).

        A count goes to the comparison (``tag``) its list was served in: an impression names it in its
        ``experiment`` field (an event without one counts under the experiment's name). A click, cart or
        purchase takes the variant and tag it names, and what it does not name from the impression of its
        ``request_id``: in this batch, else the one Redis remembers. When neither has it yet (the click was
        sent within the API's impression linger, so Kafka got it first), it waits in Redis for that impression
        (:meth:`_waiting`), for up to :data:`AB_WAIT_S` (it used to be counted under the bare experiment name,
        or dropped when it named no variant).
        """
        etype = events["event_type"]
        tag = pc.fill_null(events["experiment"], self.experiment)
        t = pa.table({"event_type": etype, "variant": events["variant"], "rid": events["request_id"], "tag": tag,
                      "named": pc.is_valid(events["experiment"]), "ts": events["ts"].cast(pa.int64())}).filter(
            pc.is_in(etype, value_set=_AB_TYPES))
        impression = pc.equal(t["event_type"], "impression")
        imps = t.filter(pc.and_(impression, pc.is_valid(t["variant"])))
        shown = imps.filter(pc.is_valid(imps["rid"]))
        shown = pa.table({"rid": shown["rid"], "memo": pc.binary_join_element_wise(shown["variant"], shown["tag"], " ")})
        ab: Counter = Counter()
        seen: dict[str, tuple[int, int]] = {}
        if imps.num_rows:
            g = imps.group_by(["tag", "variant"], use_threads=False).aggregate(
                [("ts", "count"), ("ts", "min"), ("ts", "max")])
            for tg, variant, n, lo, hi in zip(*(g[c].to_pylist() for c in ("tag", "variant", "ts_count", "ts_min",
                                                                            "ts_max"))):
                ab[(tg, variant, "impressions")] += n
                first, last = seen.get(tg, (lo, hi))
                seen[tg] = (min(first, lo), max(last, hi))
        # clicks, carts, purchases: complete what they do not name from their request's impression
        acts = t.filter(pc.invert(impression))
        complete = pc.and_(pc.is_valid(acts["variant"]), acts["named"])
        for tg, variant, et in zip(*(acts.filter(complete)[c].to_pylist() for c in ("tag", "variant", "event_type"))):
            ab[(tg, variant, AB_METRICS[et])] += 1
        rest = acts.filter(pc.invert(complete))
        requests: dict[str, str] | None = None  # this batch's impressions: request_id -> memo

        def shown_requests() -> dict[str, str]:
            nonlocal requests
            if requests is None:
                requests = dict(zip(shown["rid"].to_pylist(), shown["memo"].to_pylist()))
            return requests

        waits = _Waits()
        if rest.num_rows:
            requests = shown_requests()
            rows = list(zip(*(rest[c].to_pylist() for c in ("event_type", "variant", "rid", "tag", "named"))))
            missing = list({rid for *_, rid, _, _ in rows if rid is not None and rid not in requests})
            remembered = dict(zip(missing, self.r.mget([RedisKeys.request(r) for r in missing]))) if missing else {}
            for et, variant, rid, tg, named in rows:
                memo = requests.get(rid) or remembered.get(rid)
                if memo is None and rid is not None:  # its impression has not come yet: wait for it
                    waits.add(rid, et, variant, tg if named else None)
                    continue
                self._count_action(ab, et, variant, tg, named, memo)
        self._waiting(shown["rid"], shown_requests, ab, waits)
        return shown, ab, seen, waits

    @staticmethod
    def _count_action(ab: Counter, et: str, variant: str | None, tg: str, named: bool, memo: str | None,
                      n: int = 1) -> None:
        """Count ``n`` of a click, cart or purchase: its own variant and tag, else its impression's (``memo``)."""
        memo_parts = (memo or "").split(" ")  # "variant tag"; before tags, "variant"
        variant = variant or memo_parts[0]
        if not variant:
            return
        if not named and len(memo_parts) == 2:
            tg = memo_parts[1]
        ab[(tg, variant, AB_METRICS[et])] += n

    def _waiting(self, shown_rids: pa.ChunkedArray, shown_requests, ab: Counter, waits: _Waits) -> None:
        """Count the waiting actions whose impression is in this batch; give up on those waiting past
        :data:`AB_WAIT_S` (counted then with an impression Redis remembers, else as unattributed)."""
        key = RedisKeys.ab_waiting(self.experiment)
        cutoff = int(time.time() * 1000) - AB_WAIT_S * 1000
        n_waiting, expired = self._pipe(lambda p: (p.zcard(key),
                                                   p.zrangebyscore(key, "-inf", cutoff, 0, _AB_WAIT_EXPIRE_BATCH)))
        if not n_waiting:
            return
        due: list[str] = []
        if len(shown_rids):
            if n_waiting <= _AB_WAIT_SCAN_ALL:
                requests = shown_requests()
                due = [rid for rid in self.r.zrange(key, 0, -1) if rid in requests]
            else:  # many waiting (e.g. a shop sending made-up request_ids): look up only this batch's
                rids = [r for r in pc.unique(shown_rids).to_pylist() if r is not None]
                due = [rid for rid, score in zip(rids, self.r.zmscore(key, rids)) if score is not None]
        due_set = set(due)
        expired = [rid for rid in expired if rid not in due_set]
        if not due and not expired:
            return
        # an expired wait is read and deleted at once: another consumer giving up on it too then finds nothing
        got = self._pipe(lambda p: ([p.hgetall(RedisKeys.ab_waiting_actions(r)) for r in due + expired],
                                    [p.get(RedisKeys.request(r)) for r in expired],
                                    p.delete(*(RedisKeys.ab_waiting_actions(r) for r in expired)) if expired else None),
                         transaction=bool(expired))
        actions, late = got[:len(due) + len(expired)], got[len(due) + len(expired):len(due) + 2 * len(expired)]
        memos = {**{r: shown_requests()[r] for r in due}, **{r: m for r, m in zip(expired, late) if m}}
        for rid, fields in zip(due + expired, actions):
            for field, n in fields.items():
                et, variant, tg = field.split("\t")
                if rid in memos:
                    self._count_action(ab, et, variant or None, tg or self.experiment, bool(tg), memos[rid], int(n))
                else:
                    waits.unattributed[et] += int(n)
        waits.settled += due + expired

    def _pipe(self, build, transaction: bool = False) -> list:
        """Run the commands ``build(pipeline)`` queues in one round trip (with ``transaction``, as one MULTI/EXEC);
        their answers, flattened in order."""
        p = self.r.pipeline(transaction=transaction)
        build(p)
        return p.execute()

    def claim_event_ids(self, event_ids: Sequence[str] | str, positions: Sequence[str] | str,
                        ttl_s: int) -> dict[int, str]:
        """Remember each event_id with the Kafka position (``partition:offset``) that carried it.

        One server-side script call per batch. An id seen for the first time, or seen again at the
        same position (the same record consumed again after a crash), is not a duplicate; an id
        already held by another position is. Ids are forgotten after ``ttl_s``.

        Args:
            event_ids, positions: as sequences, or each already joined by newlines (see :func:`lines`).

        Returns:
            ``{index in event_ids: position of the record that carried it first}`` of the duplicates.
        """
        if not event_ids:
            return {}
        if self._claim is None:
            self._claim = self.r.register_script(_CLAIM_LUA)
        ids = event_ids if isinstance(event_ids, str) else "\n".join(event_ids)
        pos = positions if isinstance(positions, str) else "\n".join(positions)
        got = self._claim(args=[ttl_s, RedisKeys.event_id(""), ids, pos])
        return {int(got[i]) - 1: got[i + 1] for i in range(0, len(got), 2)}

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

    def set_consumer_status(self, member: str | None = None, **fields) -> None:
        """A stream consumer's progress for the dashboard (lag, rate_eps, consumed, partitions, timestamps).

        With ``member`` (one per consumer process) each member keeps its own hash, so several consumers
        add up in :meth:`consumer_status` instead of overwriting each other; a hash expires a day after
        its member's last report.
        """
        key = RedisKeys.consumer_status if member is None else RedisKeys.consumer_member(member)
        p = self.r.pipeline(transaction=False)
        p.hset(key, mapping={k: str(v) for k, v in fields.items()})
        if member is not None:
            p.expire(key, 86_400)
        p.execute()

    def set_catalog_status(self, **fields) -> None:
        self.r.hset(RedisKeys.catalog_status, mapping={k: str(v) for k, v in fields.items()})

    def set_serving_status(self, versions: dict[str, str], lineage: dict[str, str] | None = None) -> None:
        """The versions being served, per alias (an alias not served is removed), with the time now; and under
        ``trained:<alias>`` the version ``train_job`` trained that each comes from (``lineage``: a refresh's
        ``trained_version`` tag), so that the dashboard can tell a refresh from a new model without MLflow."""
        p = self.r.pipeline(transaction=True)
        p.delete(RedisKeys.serving_status)
        p.hset(RedisKeys.serving_status, mapping={**{a: str(v) for a, v in versions.items()},
                                                  **{f"{TRAINED_FIELD}{a}": str(v) for a, v in (lineage or {}).items()
                                                     if a in versions},
                                                  "updated_ts": f"{time.time():.3f}"})
        p.expire(RedisKeys.serving_status, 86_400)
        p.execute()

    def serving_status(self) -> dict[str, str]:
        return self.r.hgetall(RedisKeys.serving_status)

    # --- reads for serving ---------------------------------------------------
    def recent_items(self, user_id: str, n: int | None = None) -> list[str]:
        """The user's most recent items, newest first."""
        return self.r.lrange(RedisKeys.recent(user_id), 0, (n or self.recent_cap) - 1)


    def trending(self, k: int) -> list[tuple[str, float]]:
        return [(i, float(s)) for i, s in self.r.zrevrange(RedisKeys.trending, 0, k - 1, withscores=True)]

    def get_cached(self, user_id: str, variant: str) -> dict | None:
        raw = self.r.hget(RedisKeys.cache(user_id), variant)
        return orjson.loads(raw) if raw else None

    def set_cached(self, user_id: str, variant: str, payload: dict) -> None:
        key = RedisKeys.cache(user_id)
        p = self.r.pipeline(transaction=False)
        p.hset(key, variant, orjson.dumps(payload))
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

    def ab_comparisons(self) -> list[tuple[str, int, int]]:
        """The experiment's comparisons (tags) as ``(tag, first_ts_ms, last_ts_ms)`` of their impressions, the
        most recently seen first."""
        p = self.r.pipeline(transaction=False)
        p.zrange(RedisKeys.ab_seen(self.experiment, "last"), 0, -1, desc=True, withscores=True)
        p.zrange(RedisKeys.ab_seen(self.experiment, "first"), 0, -1, withscores=True)
        last, first = p.execute()
        first = dict(first)
        return [(tag, int(first.get(tag, ts)), int(ts)) for tag, ts in last]

    def ab_counts(self, tag: str | None = None) -> dict[str, dict[str, int]]:
        """Totals per variant of one comparison (default: the most recently seen): impressions, clicks, carts,
        purchases."""
        if tag is None:
            seen = self.r.zrange(RedisKeys.ab_seen(self.experiment, "last"), 0, 0, desc=True)
            tag = seen[0] if seen else self.experiment
        return {ab_variant(key, tag): {f: int(v) for f, v in self.r.hgetall(key).items()}
                for key in ab_keys(self.r, tag)}

    def ab_attribution_gaps(self) -> dict[str, int]:
        """Clicks, carts and purchases (per event type, under ``waiting`` the requests still waiting) that named
        a request whose impression had not arrived: ``unattributed`` ones gave up after :data:`AB_WAIT_S`."""
        p = self.r.pipeline(transaction=False)
        p.hgetall(RedisKeys.ab_unattributed(self.experiment))
        p.zcard(RedisKeys.ab_waiting(self.experiment))
        gone, waiting = p.execute()
        return {**{et: int(n) for et, n in gone.items()}, "waiting": int(waiting)}

    def dlq_reasons(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(RedisKeys.dlq_reasons).items()}

    def consumer_status(self, fresh_s: float = 60.0) -> dict[str, str]:
        """The stream consumers' progress, as one hash.

        Members that reported in the last ``fresh_s`` seconds add up: ``lag``, ``rate_eps`` and
        ``consumed`` are summed, ``members`` counts them and ``idle_members`` those that own no
        partition; ``last_commit_ts`` and ``updated_ts`` are the latest of any member (so when all
        of them stopped, the dashboard sees how long ago the last one reported). Without member
        hashes, the single hash written without a member.
        """
        keys = sorted(self.r.scan_iter(RedisKeys.consumer_member("*"), count=1000))
        if not keys:
            return self.r.hgetall(RedisKeys.consumer_status)
        p = self.r.pipeline(transaction=False)
        for key in keys:
            p.hgetall(key)
        rows = [r for r in p.execute() if r]

        def num(row, key):
            try:
                return float(row[key])
            except (KeyError, TypeError, ValueError):
                return 0.0

        latest = max((num(r, "updated_ts") for r in rows), default=0.0)
        live = [r for r in rows if num(r, "updated_ts") >= latest - fresh_s] if rows else []
        out = {"lag": sum(int(num(r, "lag")) for r in live), "rate_eps": round(sum(num(r, "rate_eps") for r in live), 1),
               "consumed": sum(int(num(r, "consumed")) for r in live), "members": len(live),
               "idle_members": sum(1 for r in live if "partitions" in r and num(r, "partitions") == 0),
               "last_commit_ts": max((num(r, "last_commit_ts") for r in rows), default=0.0), "updated_ts": latest}
        return {k: str(v) for k, v in out.items()}

    def catalog_status(self) -> dict[str, str]:
        return self.r.hgetall(RedisKeys.catalog_status)

    # --- serving: one round trip per request phase ------------------------------------
    def user_context(self, user_id: str, n_recent: int | None = None) -> tuple[list[str], set[str]]:
        """The user's recent items (newest first) and the items they bought, in one round trip."""
        p = self.r.pipeline(transaction=False)
        p.lrange(RedisKeys.recent(user_id), 0, (n_recent or self.recent_cap) - 1)
        p.zrange(RedisKeys.purchased(user_id), 0, -1)
        recent, bought = p.execute()
        return recent, set(bought)

    def mark_purchased(self, user_id: str, item_ids: Sequence[str], ts_ms: int | None = None) -> None:
        """Remember purchases (serving filters them out); entries older than ``PURCHASE_MEMORY_S`` are dropped."""
        if not item_ids:
            return
        now_ms = int(time.time() * 1000) if ts_ms is None else ts_ms
        key = RedisKeys.purchased(user_id)
        p = self.r.pipeline(transaction=False)
        p.zadd(key, {i: now_ms for i in item_ids})
        p.zremrangebyscore(key, 0, now_ms - PURCHASE_MEMORY_S * 1000)
        p.expire(key, PURCHASE_MEMORY_S)
        p.execute()

    def record_request(self, counters: dict[str, dict[str, int]], latency: tuple[str, float] | None = None) -> None:
        """Add several one-minute counters (``{name: {field: n}}``) and one latency sample in one round trip."""
        key_of = lambda name: RedisKeys.counter(name, int(time.time()) // BUCKET_S)  # noqa: E731
        if latency is not None:
            source, ms = latency
            edge = next((str(e) for e in LATENCY_EDGES_MS if ms <= e), "inf")
            counters = {**counters, f"{STATS_LATENCY}:{source}": {edge: 1}}
        p = self.r.pipeline(transaction=False)
        for name, fields in counters.items():
            key = key_of(name)
            for f, n in fields.items():
                p.hincrby(key, f, n)
            p.expire(key, STATS_TTL_S)
        p.execute()


class AsyncServingState:
    """The per-request reads and writes of serving on ``redis.asyncio``: a round trip never blocks the event loop.

    Same keys and formats as :class:`OnlineState` (``get_cached``/``set_cached``; ``user_contexts`` reads
    ``user_context`` for many users at once).
    """

    def __init__(self, url: str, *, recent_cap: int = 50, cache_ttl_s: int = 300, timeout_s: float = 2.0,
                 local_entries: int = 0):
        import redis.asyncio as aioredis

        from pipelines.localcache import TrackedCache

        self.r = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                         decode_responses=True, max_connections=256)
        self.recent_cap = recent_cap
        self.cache_ttl_s = cache_ttl_s
        # lists read from Redis, kept in this process until Redis says they changed (0: off)
        self.local = (TrackedCache(url, RedisKeys.cache(""), max_entries=local_entries, ttl_s=cache_ttl_s)
                      if local_entries > 0 else None)

    async def get_cached(self, user_id: str, variant: str) -> dict | None:
        key, local = RedisKeys.cache(user_id), self.local
        if local is not None and local.active:
            raw = local.get(key, variant)
            if raw is not None:
                return orjson.loads(raw)
            token = local.token()
            raw = await self.r.hget(key, variant)
            if raw:
                local.put(key, variant, raw, token)
        else:
            raw = await self.r.hget(key, variant)
        return orjson.loads(raw) if raw else None

    def close(self) -> None:
        if self.local is not None:
            self.local.close()

    async def set_cached(self, user_id: str, variant: str, payload: dict) -> None:
        key = RedisKeys.cache(user_id)
        async with self.r.pipeline(transaction=False) as p:
            p.hset(key, variant, orjson.dumps(payload))
            p.expire(key, self.cache_ttl_s)
            await p.execute()

    async def user_contexts(self, user_ids: Sequence[str]) -> list[tuple[list[str], set[str]]]:
        """Each user's recent items (newest first) and bought items, for many users in one round trip."""
        async with self.r.pipeline(transaction=False) as p:
            for user_id in user_ids:
                p.lrange(RedisKeys.recent(user_id), 0, self.recent_cap - 1)
                p.zrange(RedisKeys.purchased(user_id), 0, -1)
            replies = await p.execute()
        return [(replies[n], set(replies[n + 1])) for n in range(0, len(replies), 2)]


def lines(*columns: pa.Array | pa.ChunkedArray) -> str:
    """Rows of string columns as one text: fields joined by a tab, rows by a newline (for a Lua script)."""
    if not len(columns[0]):
        return ""
    rows = pc.binary_join_element_wise(*columns, "\t") if len(columns) > 1 else columns[0]
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    return pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(rows)], pa.int32()), rows), "\n")[0].as_py()


def ab_keys(r: redis.Redis, tag: str, scan_count: int = 10_000) -> list[str]:
    """The A/B totals keys of one comparison (one per variant), sorted."""
    prefix = RedisKeys.ab(tag, "")
    # a variant holds no ':', so this leaves out the keys of a longer tag that starts with this one
    return sorted({k for k in r.scan_iter(match=prefix + "*", count=scan_count) if ":" not in k[len(prefix):]})


def ab_variant(key: str, tag: str) -> str:
    """The variant of an :func:`ab_keys` key."""
    return key[len(RedisKeys.ab(tag, "")):]


def ab_stats_name(tag: str, variant: str) -> str:
    """Name of the per-minute A/B counters of ``variant`` in the comparison ``tag`` (:meth:`OnlineState.incr_stats`)."""
    return f"ab:{tag}:{variant}"


def latency_field(ms: float) -> str:
    """The histogram field (bucket upper edge, or ``"inf"``) a latency of ``ms`` counts in."""
    return next((str(e) for e in LATENCY_EDGES_MS if ms <= e), "inf")
