"""The contract between shoprec's parts: names, event and catalog schemas.

Topic names, Redis keys, MLflow names and lake columns live here and nowhere
else. ``parse_event`` is the one validation used by the stream consumer and by
the ``/events`` endpoint, so both reject the same records for the same reasons.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1

# --- Kafka -------------------------------------------------------------------
TOPIC_EVENTS = "shop.events"
TOPIC_CATALOG = "shop.catalog"
TOPIC_DLQ = "shop.events.dlq"
DLQ_REASON_HEADER = "reason"

# --- MLflow ------------------------------------------------------------------
MLFLOW_EXPERIMENT = "shoprec"
REGISTERED_MODEL = "shoprec-recommender"
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"

# --- event types ---------------------------------------------------------------
EVENT_TYPES = ("view", "add_to_cart", "purchase", "impression", "click")
#: how much one interaction of each type says about a user's taste (training weight)
EVENT_WEIGHTS = {"view": 1.0, "click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
INTERACTION_TYPES = tuple(EVENT_WEIGHTS)

# --- lake / training columns -------------------------------------------------
from pipelines.columns import (  # noqa: E402  (re-exported: the model core imports them without pydantic)
    COL_EVENT_ID, COL_EVENT_TYPE, COL_ITEM, COL_REQUEST_ID, COL_SESSION, COL_TS, COL_USER, COL_WEIGHT,
)
LAKE_COLUMNS = (
    "event_id", "event_type", "user_id", "item_id", "session_id", "ts", "price", "quantity",
    "request_id", "variant", "model_version", "experiment", "items", "schema_version",
)

# --- serving counters (time-bucketed in Redis, read by the dashboard) ----------
STATS_REQUESTS = "requests"  # fields: cache | model | fallback, cold_user, cold_user_session, cold_user_trending
STATS_CACHE = "cache"  # fields: hit | miss, and per variant hit:<variant> | miss:<variant>
STATS_EVENTS = "events"  # fields: one per event type (written by the stream consumer)
STATS_LATENCY = "latency"  # histogram of /recommend latency: stats:latency:<source>:<bucket>, fields = bucket edges
#: upper edges (ms) of the latency histogram buckets; the last field is "inf"
LATENCY_EDGES_MS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500)
SOURCE_CACHE, SOURCE_MODEL, SOURCE_FALLBACK = "cache", "model", "fallback"

# --- Redis -------------------------------------------------------------------
REDIS_PREFIX = "shoprec:"


class RedisKeys:
    """Every Redis key shoprec uses (all under ``shoprec:``)."""

    trending = REDIS_PREFIX + "trending"
    popular_fallback = REDIS_PREFIX + "popular:fallback"

    @staticmethod
    def recent(user_id: str) -> str:
        return f"{REDIS_PREFIX}recent:{user_id}"

    @staticmethod
    def cache(user_id: str) -> str:
        """Hash of cached top-N lists of one user (field = variant); deleted by the user's next event."""
        return f"{REDIS_PREFIX}cache:{user_id}"

    @staticmethod
    def trending_hour(hour: int) -> str:
        """Item counts of one hour (epoch hours); merged with decay into ``trending``."""
        return f"{REDIS_PREFIX}trending:h:{hour}"

    @staticmethod
    def counter(name: str, bucket: int) -> str:
        """A time-bucketed hash of counters (field = metric, value = count)."""
        return f"{REDIS_PREFIX}stats:{name}:{bucket}"

    @staticmethod
    def ab(experiment: str, variant: str) -> str:
        """A/B totals of one variant (fields: impressions, clicks, carts, purchases) in one comparison
        (an experiment tag, ``default@champion.2:challenger.3``) or, for events without a tag, the experiment name."""
        return f"{REDIS_PREFIX}ab:{experiment}:{variant}"

    @staticmethod
    def ab_seen(experiment: str, edge: str) -> str:
        """Sorted set of an experiment's comparisons (tags) scored by the ts (ms) of their ``first`` or ``last`` event."""
        return f"{REDIS_PREFIX}abseen:{edge}:{experiment}"

    @staticmethod
    def request(request_id: str) -> str:
        return f"{REDIS_PREFIX}req:{request_id}"

    @staticmethod
    def ab_waiting(experiment: str) -> str:
        """Sorted set of the request_ids whose clicks, carts or purchases arrived before their impression, scored
        by when the first one did (ms); their actions wait under :meth:`ab_waiting_actions`."""
        return f"{REDIS_PREFIX}abwait:{experiment}"

    @staticmethod
    def ab_waiting_actions(request_id: str) -> str:
        """Hash of one request's actions waiting for its impression (field ``event_type<TAB>variant<TAB>tag``)."""
        return f"{REDIS_PREFIX}abwait:req:{request_id}"

    @staticmethod
    def ab_unattributed(experiment: str) -> str:
        """Hash of the actions (per event type) whose request's impression never arrived: in no A/B count."""
        return f"{REDIS_PREFIX}abunattributed:{experiment}"

    dlq_reasons = REDIS_PREFIX + "dlq:reasons"
    consumer_status = REDIS_PREFIX + "consumer:status"

    @staticmethod
    def consumer_member(member: str) -> str:
        """One stream consumer's progress (``member``: host and pid); see :meth:`OnlineState.consumer_status`."""
        return f"{REDIS_PREFIX}consumer:status:{member}"
    catalog_status = REDIS_PREFIX + "catalog:status"
    #: the versions the API serves, per alias, and when it last heard them from its scorer (``updated_ts``)
    serving_status = REDIS_PREFIX + "serving:status"

    @staticmethod
    def event_id(event_id: str) -> str:
        """Kafka position (``partition:offset``) of the record that first carried an event_id (duplicate check)."""
        return f"{REDIS_PREFIX}eid:{event_id}"

    @staticmethod
    def rate_limit_prefix() -> str:
        """Prefix of the per-API-key rate-limit windows of ``/events`` (kept by the ``limits`` library)."""
        return f"{REDIS_PREFIX}ratelimit"

    @staticmethod
    def purchased(user_id: str) -> str:
        """Sorted set of the items a user bought (score = epoch ms); serving never recommends them again soon."""
        return f"{REDIS_PREFIX}bought:{user_id}"


# --- schemas -----------------------------------------------------------------
#: the pattern of every id (they become Redis keys and Kafka keys) and of an event_id (a UUID, dashes optional)
ID_PATTERN, EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$", r"^[0-9a-fA-F-]{32,36}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
#: the price range of a purchase and of a product, inclusive (the Great Expectations suites take the same bounds,
#: so a price ingestion accepts never fails an hour's or the catalog's validation afterwards)
PRICE_MIN, PRICE_MAX = 0.01, 100_000.0


class Event(BaseModel):
    """One shop event (``schema_version`` 1). ``ts`` is UTC epoch milliseconds."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1] = 1
    event_id: Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]
    event_type: Literal["view", "add_to_cart", "purchase", "impression", "click"]
    user_id: Id
    item_id: Id | None = None
    session_id: Id
    ts: int = Field(ge=0)
    price: float | None = Field(None, ge=PRICE_MIN, le=PRICE_MAX, allow_inf_nan=False)
    quantity: int | None = Field(None, ge=1, le=1000)
    request_id: Id | None = None
    variant: Id | None = None
    model_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    #: the A/B comparison the list was served in: experiment name and the version of every variant
    #: served then (``default@champion.2:challenger.3``, :meth:`pipelines.experiment.Experiment.tag`)
    experiment: Id | None = None
    items: list[Id] | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> Event:
        # a field required by the event type is missing like one the schema requires (reason missing_field,
        # :func:`describe_validation_error`); an empty list of items is there, and wrong (schema)
        if (lacking := lacking_for_type(self.event_type, self.__dict__)) is not None:
            raise PydanticCustomError(MISSING_FOR_TYPE, lacking)
        if self.event_type == "impression" and not self.items:
            raise ValueError("'items' of an impression must name at least one item_id (the list that was shown)")
        return self


#: the fields an event of each type needs besides those every event needs. A purchase's price: revenue per
#: impression (the dashboard's A/B page) is price x quantity, and a purchase without one counted 0; every producer
#: of purchases (the simulator, the README's example) sends it
REQUIRED_FOR_TYPE = {"view": ("item_id",), "add_to_cart": ("item_id",), "click": ("item_id",),
                     "purchase": ("item_id", "price"), "impression": ("items",)}
_WHY_REQUIRED = {"items": "the ranked list of item_ids that was shown",
                 "price": f"the unit price paid, a JSON number from {PRICE_MIN:g} to {PRICE_MAX:.0f}: revenue counts it"}


def lacking_for_type(event_type: object, fields: dict) -> str | None:
    """What is missing of the fields ``event_type`` needs (:data:`REQUIRED_FOR_TYPE`) from ``fields`` (absent or
    null), as the message of a ``missing_field``; None when nothing is (or the type is unknown)."""
    lacking = [f for f in REQUIRED_FOR_TYPE.get(event_type, ()) if fields.get(f) is None] \
        if isinstance(event_type, str) else []
    if not lacking:
        return None
    what = "an impression" if event_type == "impression" else f"a '{event_type}' event"
    why = "; ".join(_WHY_REQUIRED[f] for f in lacking if f in _WHY_REQUIRED)
    return (f"{' and '.join(repr(f) for f in lacking)} {'is' if len(lacking) == 1 else 'are'} required for {what}"
            + (f" ({why})" if why else ""))


class CatalogItem(BaseModel):
    """One product of the shop catalog.

    Strict like :class:`Event`: a JSON value of another type is refused, not converted (``"price": true`` was
    stored as 1.0, ``"in_stock": "no"`` as false, ``"price": "12"`` as 12.0), so a shop's bug shows at once
    instead of in the catalog. A CSV file's text cells are converted by these types before they get here
    (:func:`pipelines.catalog_feed.read_product_file`).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    item_id: Id
    title: str = Field(max_length=500)
    category: str = Field(min_length=1, max_length=100)
    brand: str = Field(max_length=100)
    price: float = Field(ge=PRICE_MIN, le=PRICE_MAX, allow_inf_nan=False)
    created_at: int = Field(ge=0, description="UTC epoch ms")
    in_stock: bool = True


#: a catalog record as the shop sends it: ``item_id`` plus the fields to set, each with the
#: constraints of :class:`CatalogItem` (a new product needs all of them; the catalog feed checks that)
CatalogUpdate = create_model(
    "CatalogUpdate", __config__=ConfigDict(extra="forbid", strict=True), schema_version=(Literal[1], SCHEMA_VERSION),
    item_id=(Id, ...), **{name: ((Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation) | None, None)
                          for name, f in CatalogItem.model_fields.items() if name != "item_id"})


#: pydantic error type of a field an event's type requires and that it lacks (``item_id``, an impression's ``items``)
MISSING_FOR_TYPE = "missing_for_event_type"


class EventError(ValueError):
    """A record that is not a valid event; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def describe_validation_error(err: ValidationError, *, describe: Callable[[dict], tuple[str, str]] | None = None,
                              also: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
    """``(reason, message)`` of a record pydantic refused, as the DLQ and the API name it: the first error's reason
    and a message that names every error (up to :data:`MAX_NAMED_ERRORS`), then ``also``: the problems of the
    checks that run after pydantic's (a time's bounds), so that a record wrong in several ways is fixed in one go.
    The consumer's paths (:func:`parse_events`, :mod:`pipelines.eventbatch`) send every refused record through
    :func:`validate_event`, so the DLQ's message is the API's.

    A missing field is ``missing_field`` whether the schema or the event's type requires it; messages are
    ours or pydantic's text after the field's name, never pydantic's "Value error, " prefix; ``describe`` (one
    error's ``(reason, message)``) words them otherwise.
    """
    errors = err.errors(include_url=False)
    described = [(describe or _describe_one)(e) for e in errors[:MAX_NAMED_ERRORS]]
    named = [*described, *also][:MAX_NAMED_ERRORS]
    reason, message = named[0]
    if len(named) > 1:
        more = len(errors) + len(also) - len(named)
        message += "; also " + "; ".join(m for _, m in named[1:]) + (f"; and {more} more" if more else "")
    return reason, message


#: how many of one record's errors a message names (messages travel in a DLQ header; a record can be wrong in
#: every field)
MAX_NAMED_ERRORS = 5


def _describe_one(error: dict) -> tuple[str, str]:
    loc = ".".join(str(p) for p in error["loc"]) or "event"
    if loc == "event_type" and error["type"] == "literal_error":
        return "unknown_event_type", f"event_type must be one of {', '.join(EVENT_TYPES)}"
    if error["type"] == "missing":
        return "missing_field", f"'{loc}' is required"
    if error["type"] == MISSING_FOR_TYPE:
        return "missing_field", error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown_field", f"'{loc}' is not a field of schema_version {SCHEMA_VERSION}"
    if error["type"] == "value_error":  # a rule of a validator: its own words
        return "schema", str(error.get("ctx", {}).get("error", error["msg"].removeprefix("Value error, ")))
    return "schema", f"{loc}: {error['msg']}"


#: the earliest ``created_at`` a product may have: 2000-01-01T00:00:00Z in epoch ms. Older values are not
#: products but units: a time in epoch seconds (1.8e9 today) reads as January 1970 in milliseconds
CATALOG_CREATED_AT_MIN_MS = 946_684_800_000
#: how far ``created_at`` may lie ahead of the receiver's clock (clock skew, as ``max_event_future_s`` for events);
#: serving treats a product as new from ``created_at`` on, so a future one would stay "new" until then
CATALOG_MAX_FUTURE_S = 300


def _iso_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "beyond year 9999"


def check_created_at(created_at: int, *, now_ms: int | None = None,
                     max_future_s: int = CATALOG_MAX_FUTURE_S) -> None:
    """Raise :class:`EventError` ``created_at_too_old`` (before 2000, e.g. epoch seconds) or
    ``created_at_in_future`` (more than ``max_future_s`` ahead of ``now_ms``) for an implausible ``created_at``."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if created_at < CATALOG_CREATED_AT_MIN_MS:
        hint = (f" (it looks like epoch seconds: send {created_at * 1000})"
                if CATALOG_CREATED_AT_MIN_MS <= created_at * 1000 <= now_ms + max_future_s * 1000 else "")
        raise EventError("created_at_too_old",
                         f"created_at {created_at} is {_iso_ms(created_at)} read as epoch milliseconds, before "
                         f"2000-01-01{hint}; send the time the product was added as UTC epoch milliseconds")
    if created_at > now_ms + max_future_s * 1000:
        hint = next((f" (it looks like epoch {unit}: send {created_at // div})" for unit, div in
                     (("microseconds", 1000), ("nanoseconds", 1_000_000))
                     if CATALOG_CREATED_AT_MIN_MS <= created_at // div <= now_ms + max_future_s * 1000), "")
        raise EventError("created_at_in_future",
                         f"created_at {created_at} is {_iso_ms(created_at)}, more than {max_future_s}s in the "
                         f"future{hint}; send the time the product was added as UTC epoch milliseconds")


def validate_catalog_update(data: object, *, now_ms: int | None = None,
                            max_future_s: int = CATALOG_MAX_FUTURE_S) -> "CatalogUpdate":
    """A decoded JSON object as a :class:`CatalogUpdate`, or :class:`EventError` saying what to fix.

    Besides the schema, a ``created_at`` it names must be plausible (:func:`check_created_at`): the
    ``/catalog`` endpoint, ``shoprec catalog publish`` and the catalog feed all check records here.
    """
    if not isinstance(data, dict):
        raise EventError("schema", "a product must be a JSON object")
    try:
        update = CatalogUpdate.model_validate(data)
    except ValidationError as err:
        created_at = data.get("created_at")
        # an integer pydantic took: its bounds are named with the fields it refused, not once they are fixed
        also = _problem(check_created_at, created_at, now_ms=now_ms, max_future_s=max_future_s) \
            if type(created_at) is int and created_at >= 0 else []
        epoch = {"created_at": ("the time the product was added", lambda ms: not _problem(
            check_created_at, ms, now_ms=now_ms, max_future_s=max_future_s))}
        raise _record_error(err, epoch, also) from None
    if update.created_at is not None:
        check_created_at(update.created_at, now_ms=now_ms, max_future_s=max_future_s)
    return update


def _problem(check: Callable[..., object], *args, **kwargs) -> list[tuple[str, str]]:
    """``[(reason, message)]`` of the :class:`EventError` ``check(*args, **kwargs)`` raises, else ``[]``."""
    try:
        check(*args, **kwargs)
    except EventError as err:
        return [(err.reason, err.message)]
    return []


#: what to send for a field of each JSON type, by pydantic's error type in strict mode
_TYPE_WANTED = {"float_type": "a JSON number (e.g. 19.9)", "bool_type": "true or false (a JSON boolean)",
                "int_type": "a JSON integer", "string_type": "a JSON string", "list_type": "a JSON array"}
#: what to send for a string that does not match its field's pattern, by the pattern
_PATTERN_WANTED = {ID_PATTERN: "a JSON string of 1 to 128 letters, digits or _.:@-",
                   EVENT_ID_PATTERN: "a UUID (e.g. '1b4e28ba-2fa1-11d2-883f-0016d3cca427')"}
#: a field in UTC epoch milliseconds: what it is the time of, and whether a value (ms) is plausible for it
EpochFields = dict[str, tuple[str, Callable[[int], bool]]]


def _record_error(err: ValidationError, epoch: EpochFields, also: Sequence[tuple[str, str]] = ()) -> EventError:
    """The :class:`EventError` of an event or a product pydantic refused: as :func:`describe_validation_error`,
    with a value of the wrong JSON type, or an id that is none, named with what to send instead (the ``epoch``
    fields with the milliseconds a time sent otherwise most likely means)."""
    return EventError(*describe_validation_error(
        err, describe=lambda e: _describe_type(e, epoch) or _describe_one(e), also=also))


def _json_shown(value: object) -> str:
    """A value as the sender wrote it in JSON (``the string '12'``, ``true``, ``null``, ``an array``)."""
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array"}.get(type(value), f"a {type(value).__name__}")


def _describe_type(error: dict, epoch: EpochFields) -> tuple[str, str] | None:
    """``("schema", message)`` for a field given a value of another JSON type, or a string that is not the id it
    should be, saying what to send; else None."""
    where, value = ".".join(str(p) for p in error["loc"]), error["input"]
    if error["type"] == "string_pattern_mismatch":
        wanted = _PATTERN_WANTED.get(error.get("ctx", {}).get("pattern"))
        return None if wanted is None else ("schema", f"{where}: send {wanted}, not {_json_shown(value)}")
    wanted = _TYPE_WANTED.get(error["type"])
    if wanted is None:
        return None
    if where in epoch:
        what, plausible = epoch[where]
        wanted = f"{what} as UTC epoch milliseconds (a JSON integer)"
        if (ms := _epoch_ms_meant(value, plausible)) is not None:
            naive = isinstance(value, str) and not re.search(r"(Z|[+-]\d\d:?\d\d)$", value.strip(), re.IGNORECASE)
            note = " (read as UTC)" if naive and not value.strip().lstrip("-").isdigit() else ""
            return "schema", f"{where}: send {wanted}, not {_json_shown(value)}: send {ms}{note}"
    return "schema", f"{where}: send {wanted}, not {_json_shown(value)}"


def _epoch_ms_meant(value: object, plausible: Callable[[int], bool]) -> int | None:
    """The epoch milliseconds a wrongly typed time most likely means (an ISO time, read as UTC when it names no
    zone; digits in a string; a whole float; epoch seconds), when that is ``plausible``."""
    candidates: list[int] = []
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d{1,20}", text):  # (int() refuses more than 4,300 digits with a ValueError)
            candidates.append(int(text))
        else:
            try:
                when = datetime.fromisoformat(text.replace("z", "Z"))
            except ValueError:
                return None  # digits beyond 20 as well: not a time
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            ms = int(when.timestamp() * 1000)
            return ms if plausible(ms) else None
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        candidates.append(int(value))
    return next((ms for ms in candidates + [c * 1000 for c in candidates] if plausible(ms)), None)


def validate_event(data: object, *, now_ms: int | None = None, max_age_days: int = 30,
                   max_future_s: int = 300) -> Event:
    """Validate a decoded JSON object as an :class:`Event`.

    Raises:
        EventError: with a reason code and a message that says what to fix.
    """
    if not isinstance(data, dict):
        raise EventError("schema", "an event must be a JSON object")
    try:
        ev = Event.model_validate(data)
    except ValidationError as err:
        raise _event_error(data, err, _ts_window(now_ms, max_age_days, max_future_s), max_age_days,
                           max_future_s) from None
    return _check_ts(ev, now_ms, max_age_days, max_future_s)


def _event_error(data: dict, err: ValidationError, window: tuple[int, int], max_age_days: int,
                 max_future_s: int) -> EventError:
    """The :class:`EventError` of an event pydantic refused, naming with its errors what the checks that had no
    turn would have: the fields its type needs (the model's rule runs only once every field passed) and the ts
    window (checked on a valid event)."""
    errors = err.errors(include_url=False)
    also = []
    # the model's own rule did not run (it raised no error of the whole record); a field pydantic refused is there
    if all(e["loc"] for e in errors) and (lacking := lacking_for_type(data.get("event_type"), data)) is not None:
        also.append(("missing_field", lacking))
    oldest, newest = window
    ts = data.get("ts")
    if type(ts) is int and ts >= 0 and not oldest <= ts <= newest:  # an integer pydantic took, outside the window
        bad = ts_error(ts, oldest, newest, max_age_days, max_future_s)
        also.append((bad.reason, bad.message))
    return _record_error(err, {"ts": ("the time of the event", lambda ms: oldest <= ms <= newest)}, also)


def _ts_window(now_ms: int | None, max_age_days: int, max_future_s: int) -> tuple[int, int]:
    """The oldest and the newest ts (epoch ms) an event may have, received at ``now_ms`` (default: now)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return now_ms - max_age_days * 86_400_000, now_ms + max_future_s * 1000


def _check_ts(ev: Event, now_ms: int | None, max_age_days: int, max_future_s: int) -> Event:
    oldest, newest = _ts_window(now_ms, max_age_days, max_future_s)
    if oldest <= ev.ts <= newest:
        return ev
    raise ts_error(ev.ts, oldest, newest, max_age_days, max_future_s)


def ts_error(ts: int, oldest: int, newest: int, max_age_days: int, max_future_s: int) -> EventError:
    """``ts_in_future`` or ``ts_too_old`` for an event ``ts`` outside ``[oldest, newest]`` (epoch ms), with the
    hint the catalog gives for ``created_at`` (:func:`check_created_at`) when it looks like another unit."""
    if ts > newest:
        hint = next((f" (it looks like epoch {unit}: send {ts // div})" for unit, div in
                     (("microseconds", 1000), ("nanoseconds", 1_000_000)) if oldest <= ts // div <= newest), "")
        return EventError("ts_in_future", f"ts {ts} is {_iso_ms(ts)}, more than {max_future_s}s in the future{hint}; "
                                          "send the time of the event as UTC epoch milliseconds")
    hint = f" (it looks like epoch seconds: send {ts * 1000})" if oldest <= ts * 1000 <= newest else ""
    return EventError("ts_too_old", f"ts {ts} is {_iso_ms(ts)} read as epoch milliseconds, more than {max_age_days} "
                                    f"days ago{hint}; send the time of the event as UTC epoch milliseconds")


#: reasons a record can be rejected for (the DLQ ``reason`` header and the ``dlq:reasons`` hash fields)
REJECT_REASONS = ("empty", "oversized", "undecodable", "invalid_json", "schema", "missing_field", "unknown_field",
                  "unknown_event_type", "ts_in_future", "ts_too_old", "duplicate")
#: reasons a catalog record can be rejected for besides those (the catalog feed counts them prefixed ``catalog_``)
CATALOG_REJECT_REASONS = ("key_mismatch", "unknown_item", "created_at_in_future", "created_at_too_old")


def check_record_size(raw: bytes | None, max_bytes: int, what: str) -> None:
    """Raise :class:`EventError` ``empty`` or ``oversized`` for a record value that is either."""
    if not raw:
        raise EventError("empty", f"record has no value; send one JSON {what} per record")
    if len(raw) > max_bytes:
        raise EventError("oversized", f"record is {len(raw)} bytes; the limit is {max_bytes}")


def decode_json_record(raw: bytes) -> object:
    """A record value's JSON, or :class:`EventError` ``undecodable`` / ``invalid_json`` saying which."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("undecodable", "record is not UTF-8 text") from None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as err:
        raise EventError("invalid_json", f"record is not valid JSON ({str(err)[:120]})") from None


def parse_event(raw: bytes | None, *, max_bytes: int = 16_384, now_ms: int | None = None, max_age_days: int = 30,
                max_future_s: int = 300) -> Event:
    """Decode and validate one Kafka record value.

    The common case (a valid event) takes one pass of pydantic's Rust JSON parser; only a
    record that fails it is decoded again, step by step, to name the reason.

    Raises:
        EventError: reason ``empty``, ``oversized``, ``undecodable``, ``invalid_json`` or a schema reason.
    """
    check_record_size(raw, max_bytes, "event")
    try:
        ev = Event.model_validate_json(raw)
    except ValidationError:
        ev = None
    if ev is None:
        # the fast path failed, so this names the precise reason
        return validate_event(decode_json_record(raw), now_ms=now_ms, max_age_days=max_age_days,
                              max_future_s=max_future_s)
    return _check_ts(ev, now_ms, max_age_days, max_future_s)


_ID_FULL = re.compile(r"[A-Za-z0-9_.:@-]{1,128}").fullmatch  # fullmatch: ``$`` would let a trailing newline pass
_EVENT_ID_FULL = re.compile(r"[0-9a-fA-F-]{32,36}").fullmatch
_EVENT_FIELDS = frozenset(Event.model_fields)
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)


def _common_shape(d: object) -> bool:
    """True when ``d`` is certainly a valid :class:`Event` (ts window aside): a cheap, strict subset of the model.

    Anything unusual (a JSON int as price, ``true`` as schema_version, non-ASCII model_version, ...)
    answers False, and the caller lets pydantic decide, so accept/reject and the reason of every
    record are pydantic's; this only has to never say True for a record pydantic would reject.
    A regex applied to a non-string raises TypeError, and a missing field KeyError: both mean False.
    """
    if type(d) is not dict or not _EVENT_FIELDS.issuperset(d):
        return False
    get = d.get
    try:
        ts, etype = d["ts"], d["event_type"]
        if not (type(ts) is int and ts >= 0 and etype in _EVENT_TYPE_SET and _EVENT_ID_FULL(d["event_id"])
                and _ID_FULL(d["user_id"]) and _ID_FULL(d["session_id"])):
            return False
        item = get("item_id")
        if item is None:
            if etype != "impression":
                return False
        elif not _ID_FULL(item):
            return False
        v = get("request_id")
        if v is not None and not _ID_FULL(v):
            return False
        v = get("variant")
        if v is not None and not _ID_FULL(v):
            return False
        v = get("experiment")
        if v is not None and not _ID_FULL(v):
            return False
        v = get("schema_version", 1)
        if type(v) is not int or v != 1:
            return False
        v = get("price")
        if v is None:
            if etype == "purchase":
                return False
        elif type(v) is not float or not PRICE_MIN <= v <= PRICE_MAX:
            return False
        v = get("quantity")
        if v is not None and (type(v) is not int or not 1 <= v <= 1000):
            return False
        v = get("model_version")
        if v is not None and (len(v) > 64 or not v.isascii()):  # a non-string has no isascii: AttributeError
            return False
        items = get("items")
        if items is not None:
            if type(items) is not list or len(items) > 200 or not all(map(_ID_FULL, items)):
                return False
        elif etype == "impression":
            return False
        return etype != "impression" or bool(items)
    except (KeyError, TypeError, AttributeError):
        return False


def parse_events(values: list[bytes | None], *, max_bytes: int = 16_384, now_ms: int | None = None,
                 max_age_days: int = 30, max_future_s: int = 300) -> list[dict | EventError]:
    """:func:`parse_event` over a batch of record values, for the stream consumer's hot path.

    The common shape is checked on one ``orjson`` parse without building a model (several
    microseconds less per record); every other record goes through :func:`parse_event`, so the
    accept/reject decision and the reason are exactly :func:`parse_event`'s.

    Returns:
        Per value, in order: the valid event as a dict (optional fields may be absent;
        ``schema_version`` defaults to 1) or the :class:`EventError` that rejects it.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    oldest, newest = now_ms - max_age_days * 86_400_000, now_ms + max_future_s * 1000
    loads, common, decode_error = orjson.loads, _common_shape, orjson.JSONDecodeError
    out: list[dict | EventError] = []
    for raw in values:
        d = None
        if raw and len(raw) <= max_bytes:
            try:
                d = loads(raw)
            except decode_error:
                pass
        if common(d) and oldest <= d["ts"] <= newest:
            out.append(d)
            continue
        try:
            out.append(parse_event(raw, max_bytes=max_bytes, now_ms=now_ms, max_age_days=max_age_days,
                                   max_future_s=max_future_s).model_dump())
        except EventError as err:
            out.append(err)
    return out


def parse_event_dict(raw: bytes | None, **limits) -> dict:
    """One record through :func:`parse_events`; raises its :class:`EventError` (``limits`` as there)."""
    got = parse_events([raw], **limits)[0]
    if isinstance(got, EventError):
        raise got
    return got


_ids = random.Random()  # seeded from os.urandom; reseeded in forked children
os.register_at_fork(after_in_child=_ids.seed)


def new_id() -> str:
    """A random 128-bit id as 32 hex digits (event and request ids).

    Unique like ``uuid4`` but without a system call per id (the serving hot path makes two per
    answer); ids are not secrets, so a non-cryptographic generator is enough.
    """
    return f"{_ids.getrandbits(128):032x}"


def new_event(event_type: str, user_id: str, item_id: str | None, session_id: str, *,
              ts: int | None = None, **extra) -> dict:
    """Build a valid event dict (used by the simulator, the service and tests)."""
    ev = {
        "schema_version": SCHEMA_VERSION,
        "event_id": new_id(),
        "event_type": event_type,
        "user_id": user_id,
        "item_id": item_id,
        "session_id": session_id,
        "ts": int(time.time() * 1000) if ts is None else int(ts),
    }
    ev.update({k: v for k, v in extra.items() if v is not None})
    return ev

# --- catalog / model lifecycle (orchestration) ----------------------------------
#: columns of the catalog Parquet file (``Settings.catalog_path``), in :class:`CatalogItem` order
CATALOG_COLUMNS = tuple(CatalogItem.model_fields)
COL_CATEGORY = "category"
#: MLflow run/version tags written by the training gate (read by the dashboard and by people)
TAG_DATA_WINDOW_START, TAG_DATA_WINDOW_END = "data_window_start", "data_window_end"
TAG_GATE_DECISION = "gate_decision"
#: the holdout a version's metrics were measured on, and the champion's NDCG@10 on that same holdout
TAG_HOLDOUT, TAG_CHAMPION_HOLDOUT_NDCG = "holdout", "champion_holdout_ndcg"
#: on a refreshed version: the version ``train_job`` trained that it comes from (through one or more refreshes)
TAG_TRAINED_VERSION = "trained_version"
TAG_GX_SUCCESS = "gx_success"

# --- serving (bentos/) ------------------------------------------------------------
#: fields of the ``requests`` counter besides the sources: requests whose model call failed or ran past the deadline
STATS_MODEL_ERROR, STATS_MODEL_TIMEOUT = "model_error", "model_timeout"
#: a purchase stops an item from being recommended to its buyer for this long
PURCHASE_MEMORY_S = 30 * 86_400
