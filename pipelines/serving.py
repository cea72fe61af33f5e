"""The serving core behind the BentoML services (``bentos/``).

Two halves, one per BentoML service:

* :class:`ModelHolder` (the scoring service): loads the versions behind the MLflow aliases,
  polls the registry and swaps a new version in atomically, scores a *batch* of requests
  with one batched model call per variant (:func:`score_batch`) and applies the business
  rules (:mod:`pipelines.rules`).
* :class:`RecommendationEngine` (the API service): A/B assignment, the Redis cache, the
  deadline on the scoring call, the popular-items fallback, counters and impression logging.

It never fails a request: when Redis is down it scores without the cache; when the scoring
call fails, raises or runs past ``serve_deadline_ms`` it serves popular items from a local
snapshot with ``source: fallback``; when Kafka is down impressions wait in a bounded buffer
(:class:`ImpressionLog`, librdkafka's queue) and are retried.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import confluent_kafka
import orjson
import redis

from pipelines import kafka_io, lake
from pipelines.experiment import Experiment, counter_name
from pipelines.models import Recommender, load_recommender
from pipelines.models.base import Scored
from pipelines.registry import LoadedModel, ModelRegistry
from pipelines.rules import Catalog, apply_rules, explore_seed
from pipelines.schemas import (ALIAS_CHALLENGER, ALIAS_CHAMPION, COL_CATEGORY, COL_ITEM, SOURCE_CACHE,
                               SOURCE_FALLBACK, SOURCE_MODEL, STATS_CACHE, STATS_LATENCY, STATS_MODEL_ERROR, STATS_MODEL_TIMEOUT, STATS_REQUESTS,
                               new_event, new_id)
from pipelines.settings import Settings
from pipelines.state import AsyncServingState, OnlineState, connect, latency_field

log = logging.getLogger(__name__)

ALIASES = (ALIAS_CHAMPION, ALIAS_CHALLENGER)
#: extra candidates asked from the model so that the business rules can drop some
RULES_HEADROOM = 20
#: popular items the business rules may fill in with when a model's list runs out of products that fit
#: (:func:`pipelines.rules.apply_rules`'s ``backfill``; read once per model version)
RULES_BACKFILL = 200
#: known items that stand in for a click on a product the model has never seen (its nearest by content)
STAND_INS = 3
#: seconds Redis is skipped after an error (a dead Redis must not cost every request a timeout)
REDIS_RETRY_S = 2.0
#: most users whose Redis context (recent and bought items) one pipeline reads
CONTEXT_BATCH = 64
#: counters are summed in memory and written to Redis this often (one round trip, not one per request)
STATS_FLUSH_S = 1.0


# --- what the two halves exchange, and what the cache holds -----------------------------
def cached_list_length(settings: Settings, k: int) -> int:
    """How many items serving scores (and caches) for a request of ``k``: ``serve_cache_n`` at least when it caches."""
    return max(k, settings.serve_cache_n) if settings.serve_cache else k


def scoring_request(user_id: str, variant: str, n: int, recent: Sequence[str], bought: Iterable[str]) -> dict:
    """One request of the scoring service's batchable API (:meth:`ModelHolder.score`)."""
    return {"user_id": user_id, "variant": variant, "k": n, "recent": list(recent), "bought": sorted(bought)}


def cache_entry(answer: dict, n: int) -> dict:
    """The Redis cache payload of a scoring answer to a request of ``n`` items.

    ``n`` is kept with the list: a list shorter than ``n`` is all the business rules allow (see
    :func:`pipelines.rules.apply_rules`), so it answers any request of up to ``n`` items.
    """
    return {"items": [{"item_id": i, "score": s} for i, s in answer["items"]], "model_version": answer["model_version"],
            "n": n}


def cache_answers(cached: dict, k: int) -> bool:
    """Whether a cache entry (:func:`cache_entry`) answers a request of ``k`` items."""
    return len(cached["items"]) >= k or k <= cached.get("n", 0)


def fallback_by_rules(items: Scored, settings: Settings) -> Scored:
    """``items`` (the popular fallback list) without out-of-stock products and with the category cap.

    Reads only the catalog rows of these items (three columns, filtered in the Parquet reader), so an
    API process need not hold the catalog. An unreadable catalog leaves the list as it is.
    """
    if not items:
        return items
    try:
        df = lake.read_parquet(settings.catalog_path, columns=[COL_ITEM, "in_stock", COL_CATEGORY],
                             filters=[(COL_ITEM, "in", [i for i, _ in items])])
    except Exception as err:
        log.warning("could not read the catalog %s for the fallback list (%s); serving it unfiltered",
                    settings.catalog_path, err)
        return items
    ids = df[COL_ITEM].astype(str)
    return apply_rules(items, len(items), out_of_stock=frozenset(ids[~df["in_stock"].astype(bool)]),
                       category=dict(zip(ids, df[COL_CATEGORY].astype(str))), max_per_category=settings.max_per_category)


# --- scoring (the scoring service) ----------------------------------------------------
def score_batch(model: Recommender, requests: Sequence[tuple[str, Sequence[str]]], k: int,
                exclude_seen: bool = True) -> tuple[list[Scored], list[bool]]:
    """Top-k for a batch of ``(user_id, recent_items_newest_first)`` in as few model calls as possible.

    A model that overrides :meth:`Recommender.recommend_batch` is trusted to batch itself.
    Otherwise known users go through one ``recommend_scored`` call and, when the model exposes
    ``session_vector`` + ``score_users`` (BPR), cold users' session vectors are stacked into one
    ``score_users`` call; users with no usable session share one popular list.

    Returns:
        ``(lists, cold)``: per request its top-k and whether the user was unknown to the model.
    """
    known = model.known_users
    cold = [u not in known for u, _ in requests]
    if type(model).recommend_batch is not Recommender.recommend_batch:
        return model.recommend_batch(requests, k, exclude_seen), cold
    out: list[Scored] = [[] for _ in requests]
    warm_pos = [n for n, c in enumerate(cold) if not c]
    if warm_pos:
        for n, row in zip(warm_pos, model.recommend_scored([requests[n][0] for n in warm_pos], k, exclude_seen)):
            out[n] = row
    cold_pos = [n for n, c in enumerate(cold) if c]
    if cold_pos and hasattr(model, "session_vector") and hasattr(model, "score_users"):
        import torch

        index = getattr(model, "item_index", None) or {i: n for n, i in enumerate(model.item_ids)}
        vec_pos, vecs, exclude = [], [], []
        popular: Scored | None = None
        for n in cold_pos:
            recent = list(requests[n][1])
            v = model.session_vector(recent)
            if v is None:
                popular = popular if popular is not None else model.recommend_session_scored([], k)
                out[n] = popular
            else:
                vec_pos.append(n)
                vecs.append(v)
                exclude.append(sorted({index[i] for i in recent if i in index}))
        if vecs:
            scores, idx = model.score_users(torch.stack(vecs), k, exclude)
            ids = model.item_ids
            for n, srow, irow in zip(vec_pos, scores.tolist(), idx.tolist()):
                out[n] = [(ids[i], s) for s, i in zip(srow, irow) if s != float("-inf")]
    else:
        for n in cold_pos:
            out[n] = model.recommend_session_scored(list(requests[n][1]), k)
    return out, cold


#: MLflow's HTTP client retries an unreachable server 7 times with a growing backoff (about 4 minutes) and waits up
#: to 120 s for an answer: a scoring process started while MLflow was down served nothing, not even its packaged
#: champion, for those minutes, and every later poll held the refresh as long. It polls the registry every
#: ``model_poll_s`` anyway, so one retry and 10 s per request are its defaults; MLflow's variables, when set, win.
REGISTRY_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_registry_requests(environ=None) -> dict[str, str]:
    """Give this process :data:`REGISTRY_HTTP_DEFAULTS` where the environment does not set them (the scoring
    service calls it first); returns what it set."""
    import os

    environ = os.environ if environ is None else environ
    added = {k: v for k, v in REGISTRY_HTTP_DEFAULTS.items() if k not in environ}
    environ.update(added)
    return added


def set_torch_threads(n: int) -> None:
    """Intra-op threads for scoring in this process (``serve_torch_threads``; 0 keeps torch's default)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


class ModelHolder:
    """The models of one scoring process, by alias, swapped atomically when the registry changes.

    ``models`` is replaced as a whole (never mutated), so a batch that started on the old
    version finishes on it and the next batch uses the new one: no request is dropped.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None, packaged_dir: Path | None = None,
                 models: dict[str, LoadedModel] | None = None):
        """``models`` (by alias): serve these, prepared as a refresh would, instead of the registry's (cache warming
        scores through a holder of the models it warms: :func:`pipelines.training.warm_cache`)."""
        self.settings = settings
        self.packaged_dir = packaged_dir or settings.packaged_model_dir
        self._packaged: LoadedModel | None = None
        self.registry = registry if registry is not None or models is not None else ModelRegistry(
            settings.mlflow_tracking_uri, name=settings.mlflow_model_name)
        self.models: dict[str, LoadedModel] = {}
        self.catalog = Catalog(settings.catalog_path, reload_s=settings.catalog_reload_s,
                               new_item_age_h=settings.new_item_age_h)
        self._backfills: dict[tuple[str, str], Scored] = {}
        #: per (alias, version): product the model never saw -> its stand-ins (see :meth:`sessions`)
        self._stand_ins: dict[tuple[str, str], dict[str, list[str]]] = {}
        self._stop = threading.Event()
        self._refresh_lock = threading.Lock()
        #: per alias, a version that failed to load (broken artifacts): not downloaded again every poll
        self._unloadable: dict[str, str] = {}
        for loaded in (models or {}).values():
            self._prepare(loaded)
        self.models = dict(models or {})

    def refresh(self) -> dict[str, str]:
        """Load the versions behind the aliases that changed; an alias that was removed stops serving.

        A ``challenger`` that names the champion's version (left behind when a person promoted it) is
        not served: with one version there is no experiment, and all traffic goes to the champion.
        """
        with self._refresh_lock:
            models = dict(self.models)
            try:
                current = self.registry.aliases()  # one request for both
            except Exception as err:  # noqa: BLE001 - registry unreachable: not "no aliases", keep what we serve
                log.warning("could not read the aliases from MLflow (%s); keeping the current models", err)
                current = {}
            for alias in ALIASES if current else ():
                try:
                    version = current[alias]
                    if self._unloadable.get(alias, version) != version:  # the alias moved: try anew next time
                        self._unloadable.pop(alias)
                    if alias == ALIAS_CHALLENGER and version is not None and ALIAS_CHAMPION in models \
                            and models[ALIAS_CHAMPION].version == version:
                        # a person promoted the challenger and left its alias: no experiment to run
                        if alias in models:
                            log.info("challenger is the champion's version %s: all traffic to the champion", version)
                        version = None
                    if version is None:
                        if alias in models and models[alias] is not self._packaged:
                            log.info("alias %s removed or the champion's; no longer serving it", alias)
                            models.pop(alias)
                    elif (alias not in models or models[alias].version != version) \
                            and self._unloadable.get(alias) != version:
                        try:
                            loaded = self.registry.load(alias)
                        except Exception as err:  # noqa: BLE001 - a broken version: say which, and stop downloading it
                            if self.registry.version_for(alias) != version:
                                raise  # the alias moved meanwhile: an ordinary refresh failure
                            self._unloadable[alias] = version
                            kept = models[alias].version if alias in models else None
                            log.error("cannot load %s version %s (%s); %s; not tried again until the alias "
                                      "moves", alias, version, err,
                                      f"still serving version {kept}" if kept else "not serving this alias")
                            continue
                        self._unloadable.pop(alias, None)
                        if loaded is not None:
                            self._prepare(loaded)
                            models[alias] = loaded
                            log.info("serving %s = version %s", alias, loaded.version)
                except Exception as err:  # registry down or a broken model: keep what we have
                    log.warning("could not refresh %s from MLflow (%s); keeping the current model", alias, err)
            if ALIAS_CHAMPION not in models:
                if self._packaged is None:
                    self._packaged = load_packaged(self.packaged_dir)
                    if self._packaged is not None:
                        self._prepare(self._packaged)
                if self._packaged is not None:
                    log.info("serving the packaged champion (version %s)", self._packaged.version)
                    models[ALIAS_CHAMPION] = self._packaged
            self.models = models
            return self.versions()

    def _prepare(self, loaded: LoadedModel) -> None:
        """Set a loaded model up for serving: its item product's dtype (``serve_product_dtype``)."""
        set_dtype = getattr(loaded.recommender, "set_product_dtype", None)
        if set_dtype is None:
            return
        import torch

        from pipelines.models.scoring import native_bfloat16

        wanted = self.settings.serve_product_dtype
        device = getattr(loaded.recommender, "_device", "cpu")
        bf16 = wanted == "bfloat16" or (wanted == "auto" and native_bfloat16(device))
        set_dtype(torch.bfloat16 if bf16 else torch.float32)
        log.info("version %s scores its item product in %s", loaded.version, "bfloat16" if bf16 else "float32")

    def versions(self) -> dict[str, str]:
        return {a: m.version for a, m in self.models.items()}

    def lineage(self) -> dict[str, str]:
        """Per alias, the trained version the served one comes from (itself, or the root of its hourly refreshes)."""
        return {a: m.lineage for a, m in self.models.items()}

    def start_polling(self) -> threading.Thread:
        def loop():
            while not self._stop.wait(self.settings.model_poll_s):
                self.refresh()

        t = threading.Thread(target=loop, name="model-poller", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def _backfill(self, model: LoadedModel) -> Scored:
        """The model's popular list: what the business rules fill in with (:data:`RULES_BACKFILL`, per version)."""
        key = (model.alias, model.version)
        items = self._backfills.get(key)
        if items is None:
            try:
                items = [(i, float(s)) for i, s in model.recommender.recommend_session_scored([], RULES_BACKFILL)]
            except Exception as err:  # a nicety: without it a short list stays short
                log.warning("version %s has no popular list to fill in with (%s)", model.version, err)
                items = []
            if len(self._backfills) >= 8:  # versions swapped out long ago
                self._backfills.clear()
            self._backfills[key] = items
        return items

    def popular(self, k: int) -> Scored:
        """The champion's popular list (what a user with no history gets): the fallback snapshot's source."""
        model = self.models.get(ALIAS_CHAMPION)
        if model is None:
            return []
        self.catalog.maybe_reload()
        items = model.recommender.recommend_session_scored([], k + RULES_HEADROOM)
        return [(i, float(s)) for i, s in items if i not in self.catalog.out_of_stock][:k]

    def score(self, requests: Sequence[dict]) -> list[dict]:
        """Score a batch of requests (the scoring service's batchable API).

        Args:
            requests: dicts with ``user_id``, ``variant``, ``k``, and optional ``recent`` (items,
                newest first) and ``bought`` (items the user purchased).

        Returns:
            Per request ``{"items": [[item_id, score], ...], "model_version", "variant", "cold", "versions",
            "lineage"}`` (``versions``: every alias's version in this batch's snapshot; ``lineage``: the trained
            version behind each, see :attr:`LoadedModel.lineage`), or ``{"error": message}`` when that variant
            cannot answer (the caller falls back).
        """
        self.catalog.maybe_reload()
        models = self.models  # one consistent snapshot for the whole batch
        versions = {a: m.version for a, m in models.items()}  # what this batch was scored with, every alias
        lineage = {a: m.lineage for a, m in models.items()}
        out: list[dict] = [{} for _ in requests]
        by_variant: dict[str, list[int]] = collections.defaultdict(list)
        for n, req in enumerate(requests):
            variant = req.get("variant") or ALIAS_CHAMPION
            by_variant[variant if variant in models else ALIAS_CHAMPION].append(n)
        for variant, positions in by_variant.items():
            model = models.get(variant)
            if model is None:
                for n in positions:
                    out[n] = {"error": "no model is registered as champion yet"}
                continue
            rec = model.recommender
            kk = max(int(requests[n].get("k", 10)) for n in positions)
            sessions = self.sessions(model, [list(requests[n].get("recent") or ()) for n in positions])
            batch = [(str(requests[n]["user_id"]), s) for n, s in zip(positions, sessions)]
            try:
                lists, cold = score_batch(rec, batch, kk + RULES_HEADROOM)
            except Exception as err:
                log.exception("model %s v%s raised on a batch of %d", variant, model.version, len(batch))
                for n in positions:
                    out[n] = {"error": f"model raised: {err}"}
                continue
            backfill = self._backfill(model)
            index = getattr(rec, "item_index", None) or {}
            for j, (n, scored, is_cold) in enumerate(zip(positions, lists, cold)):
                req = requests[n]
                items = apply_rules(
                    scored, int(req.get("k", 10)), out_of_stock=self.catalog.out_of_stock,
                    bought=set(req.get("bought") or ()), category=self.catalog.category,
                    max_per_category=self.settings.max_per_category, new_items=self.catalog.new_items,
                    explore_share=self.settings.explore_share, rank_new=self._content_ranker(rec, *batch[j]),
                    explore_seed=explore_seed(batch[j][0], req.get("recent") or (),
                                              period_s=self.settings.explore_reseed_s),
                    explore_temperature=self.settings.explore_temperature, backfill=backfill)
                out[n] = {"items": [[i, round(float(s), 6)] for i, s in items], "model_version": model.version,
                          "variant": variant, "cold": bool(is_cold), "versions": versions, "lineage": lineage}
                if is_cold:  # what a new user's list came from: a click the model can use, or nothing (trending)
                    out[n]["cold_from"] = "session" if any(i in index for i in batch[j][1]) else "trending"
        return out

    def sessions(self, model: LoadedModel, sessions: Sequence[Sequence[str]]) -> list[list[str]]:
        """Each session (newest first) with a click on a product the model has never seen replaced by its stand-ins.

        A product added to the catalog after the model was trained is unknown to every part but the
        content half of the item tower; its :data:`STAND_INS` nearest trained products by content
        (``content_neighbours``) take its place in the session, so that the click still moves the next
        list (a new visitor whose first click is such a product gets related products, not trending).
        The stand-ins count as session items, so they are not recommended back.
        """
        stand_ins = self.stand_ins(model, [i for s in sessions for i in s])
        if not stand_ins:
            return [list(s) for s in sessions]
        return [list(dict.fromkeys(j for i in s for j in stand_ins.get(i, (i,)))) for s in sessions]

    def stand_ins(self, model: LoadedModel, items: Iterable[str]) -> dict[str, list[str]]:
        """Of ``items``, those the model does not know but the catalog has: their nearest known by content.

        Cached per version; a product not in the catalog yet is looked up again next time.
        """
        rec = model.recommender
        if getattr(rec, "content_neighbours", None) is None or getattr(rec, "item_index", None) is None:
            return {}
        unknown = [i for i in dict.fromkeys(items) if i not in rec.item_index]
        if not unknown:
            return {}
        key = (model.alias, model.version)
        cache = self._stand_ins.get(key)
        if cache is None:
            if len(self._stand_ins) >= 8:  # versions swapped out long ago
                self._stand_ins.clear()
            cache = self._stand_ins[key] = {}
        missing = [i for i in unknown if i not in cache]
        if missing:
            cache.update(self.by_content(model, missing, STAND_INS))
        return {i: cache[i] for i in unknown if cache.get(i)}

    def by_content(self, model: LoadedModel, items: Sequence[str], k: int) -> dict[str, list[str]]:
        """For those of ``items`` in the catalog: the ``k`` products with interactions nearest each by content
        (``content_neighbours``; ``{}`` when the model has no content path)."""
        neighbours = getattr(model.recommender, "content_neighbours", None)
        rows = self.catalog.rows(items) if neighbours is not None else None
        if rows is None:
            return {}
        try:
            return dict(zip(rows.index, neighbours(rows, k)))
        except Exception as err:  # a nicety: without it such a click is ignored, as before
            log.warning("version %s could not place %d new products by content (%s)", model.version, len(rows), err)
            return {}


    def _content_ranker(self, rec: Recommender, user_id: str, recent: Sequence[str]):
        """Scores exploration candidates with the model's content path (``rank_new_items``), if it has one.

        :func:`~pipelines.rules.apply_rules` draws the slots' new products from these scores (the
        relevant ones more often, every one now and then); without them, every candidate alike.
        """
        rank_new_items = getattr(rec, "rank_new_items", None)
        frame = self.catalog.new_frame
        if rank_new_items is None or frame is None:
            return None

        def rank(candidates: Sequence[str]) -> list[tuple[str, float]]:
            wanted = set(candidates)
            try:
                ranked = rank_new_items(user_id, list(recent), len(frame), catalog=frame)
            except Exception as err:  # the content path is a nicety: explore without a preference
                log.warning("rank_new_items failed (%s); exploring without a preference", err)
                return [(i, 0.0) for i in candidates]
            return [(i, s) for i, s in ranked if i in wanted]

        return rank


def load_packaged(folder: Path) -> LoadedModel | None:
    """The champion packaged into a Bento (``bentos/package.py``), or None when there is none."""
    meta = Path(folder) / "champion.json"
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        return LoadedModel(load_recommender(Path(folder) / "champion"), str(info["version"]), ALIAS_CHAMPION)
    except Exception as err:
        log.warning("the packaged champion in %s cannot be loaded (%s)", folder, err)
        return None


# --- impressions ------------------------------------------------------------------------
class ImpressionLog:
    """Sends impression events to Kafka without holding up the request path; buffers and retries while Kafka is down.

    :meth:`log` never blocks and never raises: it hands the event to librdkafka's in-memory queue
    (:func:`~pipelines.kafka_io.make_impression_producer`), whose C threads send them in batches at
    most every ``impression_linger_ms`` and retry an unreachable broker until :meth:`close`. At most
    ``capacity`` events wait; beyond that new ones are dropped and counted in ``dropped``.
    kafka-python cost the API process ~0.17 ms of its GIL per answer here (record building and its
    network thread in Python), more than the Redis lookup of a cached answer.
    """

    def __init__(self, settings: Settings, capacity: int | None = None):
        self.settings = settings
        self.topic = settings.kafka_topic_events
        self.produced = 0  # handed to librdkafka's queue
        self.dropped = 0  # not queued: the buffer was full
        self.failed = 0  # refused before queueing, or failed after (see _delivered)
        self._undelivered = 0
        self._producer = kafka_io.make_impression_producer(
            settings, **({"queue.buffering.max.messages": capacity} if capacity else {}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_callbacks, name="impressions", daemon=True)
        self._thread.start()

    def log(self, event: dict) -> None:
        try:
            self._producer.produce(self.topic, orjson.dumps(event), event.get("user_id"), on_delivery=self._delivered)
            self.produced += 1
        except BufferError:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("impression buffer full (%d waiting for Kafka): %d dropped so far", self.pending(),
                            self.dropped)
        except confluent_kafka.KafkaException as e:  # refused before queueing, e.g. larger than message.max.bytes
            self.failed += 1
            log.warning("impression not sent: %s", e)

    def pending(self) -> int:
        """Impressions not yet acknowledged by Kafka."""
        return len(self._producer)

    @property
    def sent(self) -> int:
        """Impressions Kafka acknowledged (librdkafka reports only failures: a report per success cost the API ~5 %)."""
        return self.produced - self.pending() - self._undelivered

    def stats(self) -> dict[str, int]:
        """This process's impressions: acknowledged, waiting for Kafka, dropped (buffer full), failed."""
        return {"sent": self.sent, "pending": self.pending(), "dropped": self.dropped, "failed": self.failed}

    def close(self, timeout: float = 15.0) -> None:
        """Stop; what is buffered gets until ``timeout`` to reach Kafka (best effort)."""
        self._stop.set()
        self._thread.join(timeout)
        left = self._producer.flush(timeout)
        if left:
            log.warning("%d impressions not delivered before shutdown", left)

    def _delivered(self, err, _msg) -> None:
        # only a permanent failure gets here ("delivery.report.only.error", no delivery timeout): an
        # oversized record, a denied topic
        self._undelivered += 1
        self.failed += 1
        log.warning("impression not delivered: %s", err)

    def _serve_callbacks(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.5)  # waits in C (no GIL); runs the delivery callbacks


# --- the API side -------------------------------------------------------------------------
@dataclass
class Recommendation:
    request_id: str
    items: list[dict]
    variant: str
    model_version: str | None
    source: str
    #: the comparison this answer belongs to (:meth:`pipelines.experiment.Experiment.tag`); shop clients may
    #: echo it with the clicks they attribute, like ``request_id``
    experiment: str | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


ScoreFn = Callable[[list[dict]], Awaitable[list[dict]]]
InfoFn = Callable[[], Awaitable[dict]]


class Coalescer:
    """Merges concurrent one-request calls of an API process into list calls (scoring; users' Redis context).

    There is no timer: while fewer than ``max_in_flight`` calls are outstanding a request leaves at
    once (an idle service adds no latency); under load, requests that arrive while the calls are
    out queue and leave together, up to ``max_batch`` per call. The scoring service's adaptive
    batching then merges the lists of every API process, so one HTTP round trip and one model call
    serve many requests instead of one each.

    Args:
        fn: the scoring service's async list call (``requests -> answers``, same order).
        max_batch: most requests per call (``serve_max_batch_size``).
        max_in_flight: calls outstanding at once (``serve_coalesce_in_flight``).
    """

    def __init__(self, fn: ScoreFn, max_batch: int, max_in_flight: int = 2):
        self.fn, self.max_batch, self.max_in_flight = fn, max(1, max_batch), max(1, max_in_flight)
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._in_flight = 0
        self.calls = 0  # scoring calls made (for tests and logs)

    async def __call__(self, requests: list[dict]) -> list[dict]:
        loop = asyncio.get_running_loop()
        futures = []
        for req in requests:
            future = loop.create_future()
            self._queue.append((req, future))
            futures.append(future)
        self._pump()
        return list(await asyncio.gather(*futures))

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._in_flight += 1
            self.calls += 1
            asyncio.ensure_future(self._send(batch))

    async def _send(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            answers = await self.fn([req for req, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{getattr(self.fn, '__qualname__', self.fn)} answered {len(answers)} of "
                                   f"{len(batch)} requests")
            for (_, future), answer in zip(batch, answers):
                if not future.done():  # a caller past its deadline has cancelled its future
                    future.set_result(answer)
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
        finally:
            self._in_flight -= 1
            self._pump()


class RecommendationEngine:
    """Answers ``/recommend`` for one API process; scoring happens behind ``score_fn``.

    Args:
        settings: shoprec settings.
        state: Redis online state (cache, counters, recent items, purchases).
        score_fn: async call of the scoring service's batchable API (a list of requests; wrapped
            in a :class:`Coalescer` unless ``serve_max_batch_size`` is 1).
        info_fn: async call returning ``{"versions": {alias: version}, "lineage": {alias: trained version},
            "popular": [[item, score]]}`` (``lineage`` optional: each version is its own).
        impressions: where impression events go (default: a Kafka :class:`ImpressionLog`).
    """

    def __init__(self, settings: Settings, state: OnlineState, score_fn: ScoreFn, info_fn: InfoFn,
                 impressions: ImpressionLog | None = None):
        self.settings = settings
        self.state = state
        self.astate = AsyncServingState(settings.redis_url, recent_cap=settings.recent_items_cap,
                                        cache_ttl_s=settings.cache_ttl_s,
                                        local_entries=settings.serve_local_cache_entries if settings.serve_cache else 0)
        self._stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._flush_loop, name="stats-flush", daemon=True).start()
        # one-request calls are coalesced under load, unless batching is off (max_batch_size 1)
        self.score_fn = (Coalescer(score_fn, settings.serve_max_batch_size, settings.serve_coalesce_in_flight)
                         if settings.serve_max_batch_size > 1 else score_fn)
        # the recent and bought items of concurrent requests: one Redis pipeline for all of them under load
        self.user_contexts = Coalescer(self.astate.user_contexts, CONTEXT_BATCH, max_in_flight=1)
        self.info_fn = info_fn
        self.experiment = Experiment.from_settings(settings)
        self.impressions = impressions if impressions is not None else ImpressionLog(settings)
        self.versions: dict[str, str] = {}  # alias -> version the scorer serves
        self.lineage: dict[str, str] = {}  # alias -> trained version behind it (refreshes continue a comparison)
        self.comparison = self.experiment.tag({})  # the comparison answers are tagged with (see _set_versions)
        self._warned: dict[str, tuple[float, int]] = {}
        self._info_at = 0.0
        self._info_task: asyncio.Task | None = None
        self._redis_down_until = 0.0
        self._snapshot_path = settings.var_dir / "serving" / "fallback.json"
        self._fallback: list[tuple[str, float]] = self._read_snapshot()
        self._fallback_shown = self._fallback  # the fallback list under the catalog's rules (_rule_fallback)
        self._fallback_ruled_for: tuple | None = None

    @classmethod
    def from_settings(cls, settings: Settings, score_fn: ScoreFn, info_fn: InfoFn) -> RecommendationEngine:
        state = OnlineState(connect(settings.redis_url), recent_cap=settings.recent_items_cap,
                            cache_ttl_s=settings.cache_ttl_s, experiment=counter_name(settings))
        return cls(settings, state, score_fn, info_fn)

    def close(self) -> None:
        self._stop.set()
        self.flush_stats()
        self.impressions.close()
        self.astate.close()

    # --- counters: summed in memory, flushed in one round trip ------------------------------
    def _count(self, counters: dict[str, dict[str, int]]) -> None:
        with self._stats_lock:
            for name, fields in counters.items():
                self._stats[name].update(fields)

    def flush_stats(self) -> None:
        """Write the counters summed since the last flush (kept for the next flush when Redis is down)."""
        with self._stats_lock:
            pending, self._stats = self._stats, collections.defaultdict(collections.Counter)
        if not pending:
            return
        counters = {k: dict(v) for k, v in pending.items()}
        try:
            self.state.record_request(counters)
        except redis.RedisError as err:  # Redis is down: keep them for the next flush
            log.warning("counters not written (%s); keeping them", err)
            self._count(counters)

    def _flush_loop(self) -> None:
        while not self._stop.wait(STATS_FLUSH_S):
            self.flush_stats()

    def _warn_every_minute(self, key: str, msg: str, *args) -> None:
        """A warning at most once a minute per ``key`` (before the first training every request would log one),
        with how many were left out since."""
        now = time.monotonic()
        last, skipped = self._warned.get(key, (-math.inf, 0))
        if now - last < 60:
            self._warned[key] = (last, skipped + 1)
            return
        self._warned[key] = (now, 0)
        log.warning(msg + (f" ({skipped} more like it in the last minute)" if skipped else ""), *args)

    # --- versions and fallback, from the scorer ----------------------------------------
    async def refresh_info(self) -> dict[str, str]:
        """Ask the scoring service which versions it serves and for its popular list; keep the last known on failure."""
        try:
            info = await asyncio.wait_for(self.info_fn(), timeout=2.0)
            self._set_versions(info.get("versions") or {}, info.get("lineage") or {})
            self._report_served()
            popular = [(str(i), float(s)) for i, s in info.get("popular") or []]
        except Exception as err:
            log.warning("scoring service did not answer /info (%s); keeping versions %s", err, self.versions)
            popular = []
        redis_popular = self._redis(self.state.popular_fallback, self.settings.fallback_k)
        self._update_fallback(redis_popular or popular)
        await self._rule_fallback()
        return self.versions

    def _report_served(self) -> None:
        """Write the versions served to Redis (the dashboard's "served" line): on a change, else every 10 s."""
        now = time.monotonic()
        last = getattr(self, "_served_reported", None)
        if last is None or last[0] != (self.versions, self.lineage) or now - last[1] >= 10.0:
            self._served_reported = ((dict(self.versions), dict(self.lineage)), now)
            self._redis(self.state.set_serving_status, self.versions, self.lineage)

    async def _rule_fallback(self) -> None:
        """Apply the rules a list for nobody in particular can have (stock, category cap) to the fallback list,
        again when the list or the catalog file changed (one ``stat`` a poll otherwise)."""
        try:
            mtime = self.settings.catalog_path.stat().st_mtime
        except OSError:
            mtime = None
        key = (mtime, tuple(self._fallback))
        if key == self._fallback_ruled_for:
            return
        self._fallback_ruled_for = key
        self._fallback_shown = self._fallback if mtime is None else \
            await asyncio.to_thread(fallback_by_rules, self._fallback, self.settings)

    def _set_versions(self, versions: dict[str, str], lineage: dict[str, str]) -> None:
        """Adopt the scorer's versions and their lineage, and the comparison tag they make.

        The tag names each variant's *trained* version (:attr:`LoadedModel.lineage`): the hourly refresh
        registers new versions of both arms (new neighbours and trending, same embeddings), and a tag per
        registered version started a new comparison every hour, too short for any verdict.
        """
        self.versions = dict(versions)
        self.lineage = {a: str(lineage.get(a) or v) for a, v in self.versions.items()}
        self.comparison = self.experiment.tag(self.lineage)

    def _maybe_refresh_info(self) -> None:
        now = time.monotonic()
        if now - self._info_at >= self.settings.serve_info_poll_s and (self._info_task is None or self._info_task.done()):
            self._info_at = now
            self._info_task = asyncio.ensure_future(self.refresh_info())

    # --- recommend --------------------------------------------------------------------
    async def recommend(self, user_id: str, k: int) -> Recommendation:
        """The top-k for a user: from the cache, the model (through the scorer) or the fallback. Never raises."""
        t0 = time.perf_counter()
        if not self._info_at:
            self._info_at = time.monotonic()
            await self.refresh_info()
        else:
            self._maybe_refresh_info()
        request_id = new_id()
        variant = self.experiment.assign(user_id, self.versions.keys())
        counters: dict[str, dict[str, int]] = {}
        rec = await self._from_cache(request_id, user_id, variant, k, counters)
        if rec is None:
            rec = await self._from_model(request_id, user_id, variant, k, counters)
        if rec is None:
            rec = Recommendation(request_id, self._fallback_items(k), variant, None, SOURCE_FALLBACK)
        rec.experiment = self.comparison
        counters.setdefault(STATS_REQUESTS, {})[rec.source] = 1
        ms = (time.perf_counter() - t0) * 1000
        counters[f"{STATS_LATENCY}:{rec.source}"] = {latency_field(ms): 1}
        self._count(counters)
        if rec.items:
            self.impressions.log(new_event(
                "impression", user_id, None, request_id, items=[i["item_id"] for i in rec.items],
                request_id=request_id, variant=rec.variant, model_version=rec.model_version,
                experiment=rec.experiment))
        return rec

    async def _from_cache(self, request_id, user_id, variant, k, counters) -> Recommendation | None:
        if not self.settings.serve_cache:
            return None
        cached = await self._aredis(self.astate.get_cached, user_id, variant)
        version = self.versions.get(variant)
        hit = bool(cached and version and cached.get("model_version") == version and cache_answers(cached, k))
        word = "hit" if hit else "miss"
        counters[STATS_CACHE] = {word: 1, f"{word}:{variant}": 1}
        if hit:
            return Recommendation(request_id, cached["items"][:k], variant, version, SOURCE_CACHE)
        return None

    async def _from_model(self, request_id, user_id, variant, k, counters) -> Recommendation | None:
        recent, bought = (await self._aredis(self.user_contexts, [user_id]) or [([], set())])[0]
        kk = cached_list_length(self.settings, k)
        req = scoring_request(user_id, variant, kk, recent, bought)
        try:
            res = (await asyncio.wait_for(self.score_fn([req]), timeout=self.settings.serve_deadline_ms / 1000))[0]
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("scoring took longer than %d ms for %s; serving the fallback", self.settings.serve_deadline_ms,
                        user_id)
            counters.setdefault(STATS_REQUESTS, {})[STATS_MODEL_TIMEOUT] = 1
            return None
        except Exception as err:
            log.warning("scoring service failed for %s (%s); serving the fallback", user_id, err)
            counters.setdefault(STATS_REQUESTS, {})[STATS_MODEL_ERROR] = 1
            return None
        if "error" in res or not res.get("items"):
            if "error" in res:
                self._warn_every_minute(res["error"], "no model answer for %s: %s", user_id, res["error"])
            return None
        entry = cache_entry(res, kk)
        items = entry["items"]
        version, served_variant = res["model_version"], res.get("variant", variant)
        if res.get("versions") is not None and res["versions"] != self.versions:
            # the scorer swapped before we heard of it: take its whole map, so that no impression is tagged
            # with a mix of the new champion and the old challenger
            self._set_versions(res["versions"], res.get("lineage") or {})
        elif self.versions.get(served_variant) != version:
            self._set_versions({**self.versions, served_variant: version},
                               {**self.lineage, served_variant: (res.get("lineage") or {}).get(served_variant, version)})
        if res.get("cold"):
            counters.setdefault(STATS_REQUESTS, {}).update(
                {"cold_user": 1, f"cold_user_{res.get('cold_from', 'trending')}": 1})
        if self.settings.serve_cache:
            await self._aredis(self.astate.set_cached, user_id, served_variant, entry)
        return Recommendation(request_id, items[:k], served_variant, version, SOURCE_MODEL)

    # --- fallback -----------------------------------------------------------------
    def _fallback_items(self, k: int) -> list[dict]:
        return [{"item_id": i, "score": round(float(s), 6)} for i, s in self._fallback_shown[:k]]

    @property
    def fallback_size(self) -> int:
        return len(self._fallback_shown)

    def _update_fallback(self, items: list[tuple[str, float]]) -> None:
        items = [(str(i), float(s)) for i, s in items]
        if items and items != self._fallback:
            self._fallback = items
            try:
                self._snapshot_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._snapshot_path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
                tmp.write_text(json.dumps(items))
                tmp.replace(self._snapshot_path)
            except OSError as err:
                log.warning("could not write the fallback snapshot %s: %s", self._snapshot_path, err)

    def _read_snapshot(self) -> list[tuple[str, float]]:
        try:
            return [(str(i), float(s)) for i, s in json.loads(Path(self._snapshot_path).read_text())]
        except (OSError, ValueError, TypeError):
            return []

    async def _aredis(self, fn, *args):
        """:meth:`_redis` for the ``redis.asyncio`` calls of the request path."""
        if time.monotonic() < self._redis_down_until:
            return None
        try:
            return await fn(*args)
        except (redis.RedisError, OSError) as err:
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S
            log.warning("redis unavailable (%s): serving without it for %.0fs", err, REDIS_RETRY_S)
            return None

    def _redis(self, fn, *args):
        """Call a Redis operation; on an outage return None (and skip Redis for a moment) instead of failing."""
        if time.monotonic() < self._redis_down_until:
            return None
        try:
            return fn(*args)
        except redis.RedisError as err:
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S
            log.warning("redis unavailable (%s): serving without it for %.0fs", err, REDIS_RETRY_S)
            return None
