"""shoprec's BentoML services.

* ``Shoprec`` (the API): ``/recommend``, ``/similar``, ``/events``, ``/status``, ``/ping`` plus
  BentoML's ``/healthz``, ``/readyz`` and Prometheus ``/metrics``. Cache, A/B and fallback live in
  :class:`pipelines.serving.RecommendationEngine`.
* ``Scorer``: the models behind the MLflow aliases; its ``score`` API is batchable, so concurrent
  ``/recommend`` calls are scored together (adaptive batching, one model call per variant per
  batch), on CUDA when the machine has it (``SHOPREC_SERVE_GPU=true`` requests a GPU).

Thin by design: every decision is made in :mod:`pipelines.serving`.
"""

from __future__ import annotations

import difflib
import gc
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import aiohttp
import bentoml
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.responses import Response

from bentos.api_doc import batch_field
from bentos.content_type import JsonOnly
from bentos.guard import ApiKeyAndSizeGuard, _json_type, what_to_send
from bentos.recycle import RecycleConnections
from bentos.routes import log_refused, quiet_client_errors
from bentos.whole_response import install_outermost

with bentoml.importing():
    from pipelines.catalog_feed import REQUIRED_FIELDS
    from pipelines.ingest import EventIngestor, IngestRejected
    from pipelines.rules import Catalog
    from pipelines.schemas import Id
    from pipelines.serving import ModelHolder, RecommendationEngine, bound_registry_requests, set_torch_threads
    from pipelines.settings import get_settings

log = logging.getLogger("shoprec.service")
# headers and body leave in one write, so that a replica killed mid-answer lets the load balancer retry
install_outermost()
# a request BentoML's validation refuses (400) is one INFO line, not an ERROR with a traceback
quiet_client_errors()

# batching and resources are decided when the service is defined, from the environment
_S = get_settings()
_SCORER_RESOURCES = {"resources": {"gpu": 1}} if _S.serve_gpu else {}
# BentoML needs max_batch_size > 1 for a batchable API; 1 means "no adaptive batching" (each call scored alone)
_BATCHING = ({"batchable": True, "max_batch_size": _S.serve_max_batch_size, "max_latency_ms": _S.serve_max_latency_ms}
             if _S.serve_max_batch_size > 1 else {})


# The answers of the read routes, as /docs.json declares them (bentos.api_doc.document): the routes return dicts
# (or, /recommend, bytes) built without these models, and tests/bentos/test_answers_schema.py checks that what
# the running API answers validates against what it serves. Unknown fields are refused, so a field added to an
# answer and not here fails that test.
class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    """Top-k items for the user."""

    model_config = ConfigDict(extra="forbid")
    request_id: str
    items: list[Item]
    variant: str
    model_version: str | None = Field(description="the model version that ranked the items; null when none did "
                                                  "(no model trained yet: the fallback's popular items)")
    source: str = Field(description="cache | model | fallback")
    experiment: str | None = Field(None, description="the A/B comparison: experiment name and the versions served "
                                                     "(default@champion.2:challenger.3); echo it with clicks")


class SimilarResponse(BaseModel):
    """Items similar to the item, from the champion."""

    model_config = ConfigDict(extra="forbid")
    item_id: str
    items: list[str] = Field(description="the most similar products first, sold-out products left out")
    model_version: str | None = Field(description="the champion version that answered; null when no champion is "
                                                  "served or the scoring service did not answer")
    by_content: bool = Field(None, description="only for a product the champion was not trained with: whether "
                                               "items are its neighbours by content (category, brand, price)")
    reason: str = Field(None, description="only when items is empty: why, and what would give it items")


class ImpressionStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sent: int = Field(description="acknowledged by Kafka")
    pending: int = Field(description="waiting for Kafka")
    dropped: int = Field(description="dropped: the buffer (SHOPREC_IMPRESSION_BUFFER) was full")
    failed: int = Field(description="refused by Kafka")


class LocalCacheStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: bool = Field(description="whether Redis invalidations arrive (only then are the copies used)")
    users: int
    invalidations: int


class StatusResponse(BaseModel):
    """What this API process serves: model versions, fallback list, impressions and list copies."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(description="alias (champion, challenger) -> the version served; {} before the "
                                               "first training")
    fallback_items: int = Field(description="length of the popular list served when no model answers")
    experiment: str
    comparison: str = Field(description="the A/B comparison impressions are tagged with")
    impressions: ImpressionStats = Field(description="this process's impressions")
    local_cache: LocalCacheStats | None = Field(description="this process's copies of cached lists; null when "
                                                            "SHOPREC_SERVE_LOCAL_CACHE_ENTRIES is 0")


class PingResponse(BaseModel):
    """Always {"ok": true}."""

    model_config = ConfigDict(extra="forbid")
    ok: bool


def _freeze_startup_objects() -> None:
    """Move what start-up allocated (torch, mlflow, pandas modules; the loaded models) out of the GC's reach.

    A full collection otherwise walks those objects every few thousand requests and stalls the
    worker: the p99 of even a trivial endpoint (see ``serve_request_timeout_s`` for the rest).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # fewer, not longer, collections: most request garbage dies young


_LOGGING = {"access": {"enabled": _S.serve_access_log}}
# BentoML's server processes log WARNING and up, except its own loggers: shoprec's INFO lines (which version is
# served after a swap, a model that cannot be loaded, the scorer's settings) would be dropped
for _name in ("pipelines", "shoprec", "bentos"):
    logging.getLogger(_name).setLevel(logging.INFO)
# BentoML wraps every request in OpenTelemetry's ASGI middleware, which builds spans even when none is
# sampled (~10 % of an API process's CPU per answer under load). Off (the default): every route is on
# its exclude list, so the middleware passes requests straight through. On: spans sampled at this rate,
# exported as BentoML's configuration says (tracing.exporter_type).


def tracing_config(sample_rate: float) -> dict:
    """BentoML's ``tracing`` service config for ``SHOPREC_SERVE_TRACE_SAMPLE_RATE``."""
    return {"sample_rate": sample_rate} if sample_rate > 0 else {"sample_rate": 0.0, "excluded_urls": [".*"]}


_TRACING = tracing_config(_S.serve_trace_sample_rate)


def _keep_client_sessions(proxy: Any) -> None:
    """Stop BentoML's client of a dependency from replacing its HTTP session every 100 calls.

    BentoML 1.4.30-1.4.40 (``_bentoml_impl.client.proxy2.SessionManager``) closes the session after
    100 requests or 5 minutes, and with it every call still in flight on it: under load, 1-3 % of
    scoring calls failed with "Server disconnected" and their requests got the fallback (measured
    with ``shoprec bench serve``; bentoml/BentoML#5698). One long-lived session is what aiohttp expects.
    """
    for client in (getattr(proxy, "to_async", None), getattr(proxy, "to_sync", None)):
        manager = getattr(client, "_session_manager", None)
        if manager is None or not hasattr(manager, "max_requests"):
            log.info("BentoML's client has no session manager to configure (%s); nothing to work around",
                     type(client).__name__)
            continue
        manager.max_requests = math.inf
        manager.max_age = math.inf


@bentoml.service(name="shoprec-scorer", workers=1, traffic={"timeout": _S.serve_request_timeout_s}, logging=_LOGGING,
                 tracing=_TRACING, **_SCORER_RESOURCES)
class Scorer:
    """Scores batches of recommendation requests with the champion / challenger models."""

    def __init__(self) -> None:
        self.settings = get_settings()
        bound_registry_requests()  # MLflow down at start: the packaged champion in seconds, not after minutes of retries
        set_torch_threads(self.settings.serve_torch_threads)
        packaged = self.settings.packaged_model_dir
        if not packaged.is_absolute():  # relative to the source root, also inside a built Bento
            packaged = Path(__file__).resolve().parent.parent / packaged
        self.holder = ModelHolder(self.settings, packaged_dir=packaged)
        self.holder.refresh()
        self.holder.start_polling()
        _freeze_startup_objects()

    @bentoml.on_shutdown
    def _stop_polling(self) -> None:
        self.holder.stop()

    @bentoml.api(**_BATCHING)
    async def score(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per request (see :meth:`pipelines.serving.ModelHolder.score`).

        Scored on the event loop, one batch after another in arrival order: the model is CPU-bound
        under the GIL anyway, and a thread pool would let some calls starve behind others for
        seconds when the service is saturated.
        """
        return self.holder.score(requests)

    @bentoml.api
    def info(self) -> dict:
        """Versions served per alias and the champion's popular list (the API's fallback snapshot)."""
        return {"versions": self.holder.versions(), "lineage": self.holder.lineage(),
                "popular": self.holder.popular(self.settings.fallback_k)}

    @bentoml.api
    def similar(self, item_id: str, k: int = 10) -> dict:
        model = self.holder.models.get("champion")
        if model is None:
            return {"item_id": item_id, "items": [], "model_version": None,
                    "reason": "no champion is served: run train_job in Dagster, or, when versions are registered "
                              "but none has the champion alias, give one it (`shoprec model promote VERSION`)"}
        catalog = self.holder.catalog
        catalog.maybe_reload()
        # sold-out products are left out, as on /recommend: asked for more, so that k remain where they can
        sold_out = catalog.out_of_stock
        want = k + min(len(sold_out), 4 * k) if sold_out else k
        items = model.recommender.similar_items(item_id, want)
        index = getattr(model.recommender, "item_index", None)  # (popularity has no item index and no neighbours)
        unknown = index is not None and item_id not in index
        if unknown:  # a product added after training: its neighbours by content, if the catalog has it
            if item_id not in catalog.category:
                catalog.maybe_reload(force=True)  # added since the last reload?
            items = self.holder.by_content(model, [item_id], want).get(item_id, [])
        items = [i for i in items if i not in sold_out][:k]
        out = {"item_id": item_id, "items": items, "model_version": model.version}
        if unknown:
            out["by_content"] = bool(items)
            if not items:
                out["reason"] = self._unknown_item_reason(item_id, model.version)
        return out

    def _unknown_item_reason(self, item_id: str, version: str) -> str:
        """Why the champion has no neighbours for ``item_id``, and what would give it some."""
        catalog = self.holder.catalog
        catalog.maybe_reload()
        if catalog.category and item_id not in catalog.category:
            return f"no product {item_id!r} in the catalog: check the item_id"
        newer = [f"version {m.version} ({alias})" for alias, m in self.holder.models.items()
                 if alias != "champion" and item_id in (getattr(m.recommender, "item_index", None) or ())]
        if newer:
            return (f"{item_id!r} is newer than champion version {version}; {', '.join(newer)} knows it: "
                    "/similar answers from the champion, so it gets similar items once such a version is promoted")
        return (f"{item_id!r} is not in the catalog champion version {version} was trained with: it gets "
                "similar items once a version trained since it was added becomes champion (train_job, then the gate "
                "or a person promotes it)")


#: the Retry-After of a batch Kafka did not take (503): the client's first wait, before its own backoff
_RETRY_AFTER_S = 5
_K = Annotated[int, Field(ge=1, le=_S.max_k, description=f"how many items, 1 to {_S.max_k}")]


class _Strict(bentoml.IODescriptor):
    """An input taken as its JSON says, and refused (400) with what to send otherwise.

    A field it does not know (``{"user": ...}``, ``{"kk": 5}``) is named instead of ignored, and types
    are strict (pydantic's strict mode): ``"k": true`` used to mean 1 and ``"k": "5"`` 5. The 400 names
    each field and what to send (BentoML's own text was "1 validation error for Input", its ``detail``
    entries carried pydantic's documentation URL); BentoML builds it from the ``ValidationError`` raised
    here, as "<n> validation error for <our text>", and :class:`bentos.content_type.JsonOnly` drops that
    header on the way out, so ``error`` is shoprec's text alone. BentoML's JSON serde calls
    :meth:`model_validate_json`, which calls the validator directly as pydantic's does: an accepted request
    costs no more than before (one Python call, a ``try``).

    BentoML reads an empty body as ``{}``: :meth:`from_http_request` names it where a field is required
    ("user_id is required" did not say that nothing was sent), and lets it through where none is (``/status``).
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    #: what to send, the end of every 400 of the route
    send: ClassVar[str] = "a JSON object"

    @classmethod
    async def from_http_request(cls, request, serde):
        if not await request.body() and any(f.is_required() for f in cls.model_fields.values()):
            raise ValidationError.from_exception_data(f"the body is empty; send {cls.send}", [InitErrorDetails(
                type=PydanticCustomError("empty_body", "the body is empty"), loc=(), input="")])
        return await serde.parse_request(request, cls)

    @classmethod
    def model_validate_json(cls, json_data, *, strict=None, extra=None, context=None, by_alias=None, by_name=None):
        try:
            return cls.__pydantic_validator__.validate_json(json_data, strict=strict, extra=extra, context=context,
                                                            by_alias=by_alias, by_name=by_name)
        except ValidationError as err:
            raise explained(err, cls.send, json_data, tuple(cls.model_fields)) from None


def explained(err: ValidationError, send: str, body: str | bytes = b"", fields: tuple[str, ...] = ()) -> ValidationError:
    """``err`` with a title that says what is wrong, field by field, and what to send, and no documentation URLs.

    In shoprec's words where pydantic's would mislead or say too little: a body that is not JSON (or not UTF-8,
    which pydantic called "expected value at line 1 column 1"), not an object, a missing or an unknown field (with
    the field it may have meant, out of ``fields``); pydantic's message for the rest ("k: Input should be less than
    or equal to 100"). BentoML answers it with ``{"error": "<n> validation error for <title>", "detail": [{type,
    loc, msg}]}`` (the header is dropped on the way out) and :func:`bentos.routes.quiet_client_errors` logs that
    first line.
    """
    problems, lines = [], []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "the body"
        if e["type"] == "json_invalid":
            problem = _not_json(body, e["msg"])
        elif e["type"] in ("model_type", "dict_type") and not e["loc"]:
            problem = f"the body is a JSON {_json_type(e['input'])}, not an object"
        elif e["type"] == "missing":
            problem = f"{where!r} is required"
        elif e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(where, fields, n=1)
            problem = f"unknown field {where!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
        else:
            # the JSON type and, for a scalar, the value itself: "(got a JSON number, 5.0)" says why 5.0 is no integer
            shown = (f", {orjson.dumps(e['input']).decode()[:40]}" if isinstance(e["input"], (bool, int, float, str))
                     else "")
            got = f" (got a JSON {_json_type(e['input'])}{shown})" if e["type"].endswith("_type") else ""
            problem = f"{where}: {e['msg']}{got}"
        problems.append(problem)
        # a custom error type has no URL; its message is taken as it is (no context to format)
        lines.append(InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=e["loc"], input=e["input"]))
    return ValidationError.from_exception_data(f"{'; '.join(problems)}; send {send}", lines)


def _not_json(body: str | bytes, msg: str) -> str:
    """What is wrong with a body pydantic could not parse (its message was ``msg``)."""
    if isinstance(body, (bytes, bytearray)):
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            return f"the body is not UTF-8 JSON (byte 0x{body[err.start]:02x} at position {err.start} is not UTF-8)"
    return f"the body is not valid JSON ({msg.removeprefix('Invalid JSON: ')})"


_ID_TEXT = "a JSON string of 1 to 128 letters, digits or _.:@-"
_K_TEXT = f"a JSON integer from 1 to {_S.max_k}, default {_S.default_k}"


class RecommendInput(_Strict):
    send: ClassVar[str] = (f'a JSON object such as {{"user_id": "u000001", "k": {_S.default_k}}} (user_id: {_ID_TEXT}; '
                           f"k: {_K_TEXT}; no other field)")
    user_id: Id
    k: _K = _S.default_k


class SimilarInput(_Strict):
    send: ClassVar[str] = (f'a JSON object such as {{"item_id": "i00042", "k": {_S.default_k}}} (item_id: {_ID_TEXT}; '
                           f"k: {_K_TEXT}; no other field)")
    item_id: Id
    k: _K = _S.default_k


# the input of a route that takes none (/status, /ping): anything but no body or {} is a 400 that says so (a body
# such as {"x": 1} was answered 200, the field ignored, and garbage with pydantic's "1 validation error for Input")
class NoInput(_Strict):
    """No body, or an empty JSON object {}: this route takes no input."""

    send: ClassVar[str] = "no body, or an empty JSON object {}: this route takes no input"


# The body of an ingestion route, its envelope already judged by the guard (bentos.guard): what the guard's parser
# (orjson, 1024 levels) reads and pydantic's (200 levels) does not, a batch nested deeper, is refused here in the
# guard's words (it got BentoML's {"error": "Input", "detail": [... pydantic's URL]}). No max_length: the batch's
# length limit is the guard's (413 over SHOPREC_MAX_EVENTS_PER_REQUEST, read at every request; /docs.json declares
# it as maxItems): one here would be fixed when this module is imported, and a raised setting would turn the
# guard's 413 into pydantic's 400.
class EventsInput(_Strict):
    send: ClassVar[str] = what_to_send("events")
    events: Annotated[list[Any], Field(json_schema_extra=batch_field("events"))]


class CatalogInput(_Strict):
    send: ClassVar[str] = what_to_send("products")
    products: Annotated[list[Any], Field(json_schema_extra=batch_field("products"))]


@bentoml.service(name="shoprec", http={"port": 3001}, traffic={"timeout": _S.serve_request_timeout_s}, workers=_S.serve_api_workers,
                 logging=_LOGGING, tracing=_TRACING)
class Shoprec:
    """Real-time product recommendations with champion/challenger A/B and a never-failing fallback."""

    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        self.settings = get_settings()
        _keep_client_sessions(self.scorer)
        self.engine = RecommendationEngine.from_settings(
            self.settings, score_fn=self._score, info_fn=lambda: self.scorer.to_async.info())
        self.ingestor = EventIngestor(self.settings)
        self.catalog_file = Catalog(self.settings.catalog_path, reload_s=self.settings.catalog_reload_s)
        _freeze_startup_objects()

    async def _score(self, requests: list[dict]) -> list[dict]:
        try:
            return await self.scorer.to_async.score(requests)
        except aiohttp.ClientConnectionError:  # a pooled connection the scorer had closed: once more, on a new one
            return await self.scorer.to_async.score(requests)

    @bentoml.on_shutdown
    def _flush_impressions(self) -> None:
        self.engine.close()

    @bentoml.api(route="/recommend", input_spec=RecommendInput)
    async def recommend(self, user_id: Id, k: _K = _S.default_k) -> RecommendResponse:
        """Top-k items for a user; ``source`` says whether the list came from the cache, a model or the fallback."""
        # the RecommendResponse of the schema, serialised once: BentoML's validate-then-serialise of the
        # model and its streamed response cost ~18 us per answer against ~2 us (a cached answer's CPU is ~0.3 ms)
        return Response(orjson.dumps((await self.engine.recommend(user_id, k)).to_dict()), media_type="application/json")

    @bentoml.api(route="/similar", input_spec=SimilarInput)
    async def similar(self, item_id: Id, k: _K = _S.default_k) -> dict:
        """Items similar to one item (from the champion); empty, with a ``reason``, when there are none to give."""
        try:
            return await self.scorer.to_async.similar(item_id=item_id, k=k)
        except Exception as err:
            log.warning("similar items unavailable: %s", err)
            return {"item_id": item_id, "items": [], "model_version": None,
                    "reason": "the scoring service did not answer: retry shortly"}

    @bentoml.api(route="/events", input_spec=EventsInput)
    def events(self, events: list[Any], ctx: bentoml.Context) -> dict:
        """Ingest shop events (API key required); 202 once Kafka acknowledged the whole batch. Events that name a
        product the catalog does not have are accepted and named in the answer: an hour with more than 5 % of them
        fails its data check, and training leaves that hour out until the products reach the catalog."""
        out = self._ingest(self.ingestor.ingest, events, ctx)
        if "accepted" in out and (unknown := self._not_in_catalog((e.get("item_id") for e in events),
                                                                  without_catalog=False)):
            out["unknown_products"] = unknown[:20]
            out["warning"] = (f"{len(unknown)} product(s) named by these events are not in the catalog; an hour in "
                              "which more than 5% of the events that name a product name an unknown one fails its "
                              "data check and is left out of training: send the products first (POST /catalog or "
                              "`shoprec catalog publish FILE`); the hour is checked again at the next training")
        return out

    @bentoml.api(route="/catalog", input_spec=CatalogInput)
    def catalog(self, products: list[Any], ctx: bentoml.Context) -> dict:
        """Send product changes to the catalog (API key required): a whole product adds or replaces it, a record
        with ``item_id`` and some fields changes only those (e.g. ``in_stock``); 202 once Kafka acknowledged them.
        A change to a product the catalog does not have yet is named in the answer: the feed drops it unless the
        whole product reaches it first."""
        out = self._ingest(self.ingestor.ingest_products, products, ctx)
        if "accepted" in out and (unknown := self._unknown_changed(products)):
            out["unknown_products"] = unknown[:20]
            out["warning"] = (f"{len(unknown)} record(s) change a product the catalog does not have yet; the catalog "
                              "feed drops such a change (DLQ reason missing_field, counted on the dashboard as "
                              "catalog_missing_field) unless the whole product "
                              f"({', '.join(REQUIRED_FIELDS)}) reaches it first: send the whole product")
        return out

    def _unknown_changed(self, products: list) -> list[str]:
        """Item ids of the batch's partial records for products neither in the catalog file nor whole in the batch."""
        whole = {p["item_id"] for p in products if all(f in p for f in REQUIRED_FIELDS)}
        return self._not_in_catalog((p["item_id"] for p in products if p["item_id"] not in whole), without_catalog=True)

    def _not_in_catalog(self, ids: Iterable[str | None], without_catalog: bool) -> list[str]:
        """Those of ``ids`` (in order, once each) the catalog file does not have; with no catalog file at all,
        every one when ``without_catalog`` else none (nothing to compare with: the data check skips that suite too)."""
        ids = [i for i in dict.fromkeys(ids) if i is not None]
        if not ids:
            return []
        self.catalog_file.maybe_reload()
        if any(i not in self.catalog_file.category for i in ids):
            self.catalog_file.maybe_reload(force=True)  # added since the last look?
        if not self.catalog_file.category and not without_catalog:
            return []
        return [i for i in ids if i not in self.catalog_file.category]

    def _ingest(self, ingest, batch: list, ctx: bentoml.Context) -> dict:
        try:
            n = ingest(batch)
        except IngestRejected as err:
            log_refused(ctx.request.scope, 400, str(err))
            ctx.response.status_code = 400
            return {"error": str(err), "errors": err.errors}
        except Exception as err:
            log.warning("records not delivered to Kafka: %s", err)
            ctx.response.status_code = 503
            ctx.response.headers["Retry-After"] = str(_RETRY_AFTER_S)
            return {"error": f"the event bus is unavailable (Kafka did not acknowledge the batch within "
                             f"{self.settings.ingest_ack_wait_s:g} s); nothing was accepted, retry with backoff: send "
                             f"the same batch again after Retry-After ({_RETRY_AFTER_S} s)"}
        ctx.response.status_code = 202
        return {"accepted": n}

    @bentoml.api(route="/status", input_spec=NoInput)
    async def status(self) -> dict:
        """Versions being served, the fallback list size, this process's impressions and list copies."""
        await self.engine.refresh_info()
        local = self.engine.astate.local
        return {"models": self.engine.versions, "fallback_items": self.engine.fallback_size,
                "experiment": self.engine.experiment.name,
                "comparison": self.engine.comparison,  # what impressions are tagged with
                "impressions": self.engine.impressions.stats(),
                "local_cache": {"active": local.active, "users": len(local), "invalidations": local.invalidations}
                if local is not None else None}

    @bentoml.api(route="/ping", input_spec=NoInput)
    async def ping(self) -> dict:
        """A trivial endpoint, without a key: the framework's own cost (the serving benchmark's floor); not a
        health check (BentoML's ``/readyz`` and ``/healthz`` are)."""
        return {"ok": True}


def _pin_media_types(*services: Any) -> None:
    """Fix each API's response media type once, at definition time.

    BentoML 1.4 otherwise derives it from the API's JSON schema on every response (a pydantic
    schema generation per answer: about 6 % of the scorer's time per call, measured with py-spy).
    """
    for svc in services:
        for api in svc.apis.values():
            if api.output_spec.media_type is None:
                api.output_spec.media_type = api.output_spec.mime_type()


_pin_media_types(Scorer, Shoprec)
Shoprec.add_asgi_middleware(ApiKeyAndSizeGuard, answers={"/recommend": RecommendResponse, "/similar": SimilarResponse,
                                                        "/status": StatusResponse, "/ping": PingResponse})
Shoprec.add_asgi_middleware(JsonOnly)
Shoprec.add_asgi_middleware(RecycleConnections, max_requests=_S.serve_recycle_requests)
