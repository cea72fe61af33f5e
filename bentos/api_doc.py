"""What ``/docs.json`` (and the Swagger UI at ``/``) says beyond what BentoML writes for the API.

BentoML 1.4 builds the OpenAPI schema from the service: every API answers "200: Successful
Response", ``info.version`` is the built Bento's tag or "None" (always "None" when served from
source), and ``info.description`` is ``Service.doc``: the ``description`` of a built Bento's
bentofile, else BentoML's own boilerplate README (badges, "This is a Machine Learning Service created
with BentoML", "customize this README"). The service's docstring is not used. Its schema is
generated per request, so :func:`document` (called by the guard's rewrite of ``/docs.json``,
:class:`bentos.guard._KeyInSchema`) fixes it on every load, at no cost to any other route:

* ``info``: the package's version and a short description of the routes, the key and where the README is;
* ``/events`` and ``/catalog`` answer 202 (with the shape of the answer), and 400 with a list of errors;
  ``/recommend`` and ``/similar`` 400 with ``error`` and ``detail``;
* the 200 answer of ``/recommend``, ``/similar``, ``/status`` and ``/ping``: the pydantic model the service
  declares for it (``answers``), under its own name. BentoML wrote ``/recommend``'s inline, titled
  ``RecommendResponseIODescriptor`` and with ``model_version`` a required string (it drops pydantic's
  ``anyOf`` with null, and the API answers ``null`` before the first training), and the others as any object.
  A nullable field is written the OpenAPI 3.0 way (``nullable: true``), the version BentoML declares;
* the 400 of ``/status`` and ``/ping``, which take no body (or ``{}``), is the query routes' own;
* the batch field of ``/events`` and ``/catalog`` (marked with :func:`batch_field`) gets its length limit
  from the settings (the guard's 413 is the only check of it) and a "Try it out" example that is safe to
  send again and again: a view with a new ``event_id`` and ``ts`` on each load (a fixed id was a duplicate
  from the second try on, dropped by the consumer after its 202), and a new product that is clearly an
  example and out of stock, so never recommended (it used to mark the README's own product sold out).
"""

from __future__ import annotations

import importlib.metadata
import re
import time
import tomllib
import uuid
from functools import lru_cache
from pathlib import Path

#: the key of the JSON-schema property that marks a batch field (removed from the published schema)
MARKER = "x-shoprec-batch"
#: the example product of ``/catalog``'s "Try it out" (an id no shop product has)
EXAMPLE_PRODUCT_ID = "example-product-from-api-docs"
#: its creation time, long past: a product created at each send stayed "new" for ever (the cold-start page
#: counted it among the new products never shown, which an out-of-stock product never is)
EXAMPLE_CREATED_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
#: the ingestion routes and their batch field
INGESTION = {"/events": "events", "/catalog": "products"}


def batch_field(name: str) -> dict:
    """``json_schema_extra`` of an ingestion route's batch field ``name`` (``events`` or ``products``)."""
    return {MARKER: name}


@lru_cache(maxsize=1)
def version() -> str:
    """shoprec's version: the installed package's, else ``pyproject.toml``'s, else "unknown"."""
    try:
        return importlib.metadata.version("shoprec")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a built Bento carries the source, not the package
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def event_example() -> list[dict]:
    """A view the API accepts, new on every call: its ``event_id`` was never sent and its ``ts`` is now."""
    return [{"event_id": str(uuid.uuid4()), "event_type": "view", "user_id": "example-user",
             "session_id": "example-session", "item_id": "i00042", "ts": int(time.time() * 1000)}]


def product_example() -> list[dict]:
    """A whole product that is clearly an example and out of stock (so never recommended)."""
    return [{"item_id": EXAMPLE_PRODUCT_ID, "title": "Example product (sent from the API docs)",
             "category": "example", "brand": "Example", "price": 1.0, "created_at": EXAMPLE_CREATED_MS,
             "in_stock": False}]


_EXAMPLES = {
    "events": (event_example,
               "The events, at most {limit} per request (413 above). Try it out sends one view of i00042 by "
               "'example-user' with a new event_id and the current ts on every load of this page (an event_id "
               "already sent would be accepted, then dropped as a duplicate). Each event: event_id (a UUID, "
               "the idempotency key), event_type (view, add_to_cart, purchase, click or impression), user_id, "
               "session_id, item_id (all but impressions; impressions list 'items'), ts (UTC epoch "
               "milliseconds); purchases also need price (the unit price paid; quantity optional, default 1)."),
    "products": (product_example,
                 "Product records, at most {limit} per request (413 above): a whole product (item_id, title, "
                 "category, brand, price, created_at in UTC epoch milliseconds, optional in_stock) adds or "
                 "replaces it; item_id and some fields change only those. Try it out adds (or replaces) the "
                 f"example product '{EXAMPLE_PRODUCT_ID}', out of stock, so it is never recommended; no real "
                 "product is touched. Send your own products instead of it."),
}

_ERROR = {"type": "object", "properties": {"error": {"type": "string", "description": "what is wrong and what to send"}}}
_ANSWERS = {
    "/events": {
        "202": ("Kafka acknowledged every event of the batch", {
            "type": "object", "required": ["accepted"],
            "properties": {
                "accepted": {"type": "integer", "description": "how many events were accepted: all"},
                "unknown_products": {"type": "array", "items": {"type": "string"},
                                     "description": "products these events name that the catalog does not have "
                                                    "(the first 20); an hour with more than 5% such events fails "
                                                    "its data check and is left out of training"},
                "warning": {"type": "string", "description": "present with unknown_products: what to do"}},
            "example": {"accepted": 1}}),
    },
    "/catalog": {
        "202": ("Kafka acknowledged every record of the batch; the catalog feed applies them", {
            "type": "object", "required": ["accepted"],
            "properties": {
                "accepted": {"type": "integer", "description": "how many records were accepted: all"},
                "unknown_products": {"type": "array", "items": {"type": "string"},
                                     "description": "partial records for products the catalog does not have "
                                                    "(the feed drops them unless the whole product comes first)"},
                "warning": {"type": "string", "description": "present with unknown_products: what to do"}},
            "example": {"accepted": 1}}),
    },
}
_BATCH_400 = ("the body is not a JSON object with the batch field (only 'error'), or records are invalid: "
              "'errors' names each (index, reason: the stream consumer's reason code, message); nothing was "
              "accepted", {
                  "type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"},
                                 "errors": {"type": "array", "items": {
                                     "type": "object", "properties": {"index": {"type": "integer"},
                                                                      "reason": {"type": "string"},
                                                                      "message": {"type": "string"}}}}}})
_BATCH_503 = ("no API keys are configured on this server, or Kafka did not acknowledge the batch in time "
              "(SHOPREC_INGEST_ACK_TIMEOUT_S): nothing was accepted, send it again after Retry-After, with backoff",
              _ERROR)
_QUERY_400 = ("the body is not a JSON object, or a field is missing, of the wrong JSON type (k: an integer; ids: "
              "strings) or out of range, or unknown: 'error' names each and what to send, 'detail' lists them (loc, "
              "msg, type)", {
                  "type": "object", "required": ["error", "detail"],
                  "properties": {"error": {"type": "string"},
                                 "detail": {"type": "array", "items": {
                                     "type": "object", "properties": {"loc": {"type": "array", "items": {}},
                                                                      "msg": {"type": "string"},
                                                                      "type": {"type": "string"}}}}}})


def _description(public_reads: bool) -> str:
    reads = "no key (SHOPREC_SERVE_PUBLIC_READS is set)" if public_reads else "a key"
    return f"""\
Real-time product recommendations for the shop: champion/challenger A/B between model versions,
business rules (stock, purchases, category cap, new products) and a fallback that always answers.

| Route | What it is for | Key |
|---|---|---|
| `POST /recommend` | top-k products for a user: `{{"user_id": "u000001", "k": 10}}` | {reads} |
| `POST /similar` | products similar to one product: `{{"item_id": "i00042", "k": 10}}` | {reads} |
| `POST /status` | the model versions this process serves, its fallback list and impressions | {reads} |
| `POST /events` | the shop's events (views, carts, purchases, clicks, impressions); 202 once in Kafka | a write key |
| `POST /catalog` | new and changed products; 202 once in Kafka | a write key |
| `POST /ping` | a trivial answer, the serving benchmark's floor (not a health check) | none |
| `GET /healthz`, `/readyz`, `/metrics` | BentoML's probes and Prometheus metrics | none |

**Keys.** Keyed routes need `Authorization: Bearer <key>`: press **Authorize** and enter a key of
`SHOPREC_API_KEYS` (reads also take one of `SHOPREC_READ_API_KEYS`); the local stack's is `shoprec-dev-key`.
Bodies are JSON; `/events` and `/catalog` need `Content-Type: application/json` (415 for another type,
after the key's 401), the other routes take JSON whatever the header says, but not another declared type.

**Try it out** on `/events` sends a view (of `i00042`, by `example-user`) with a new `event_id` each time this
page is loaded; on `/catalog` it adds that out-of-stock example product, `{EXAMPLE_PRODUCT_ID}`, which is never
recommended and, created long ago, never counts as a new product.

More in the repository's `README.md` (sections "Using it" and "Security")."""


def document(spec: dict, settings, answers: dict | None = None) -> dict:
    """``spec`` (BentoML's OpenAPI schema of the API, as JSON) as :mod:`this module <bentos.api_doc>` says;
    ``answers``: route -> the pydantic model of its 200 answer."""
    info = spec.setdefault("info", {})
    # a built Bento may carry neither the package nor pyproject.toml: its tag's version then, never "None"
    ours, bentos = version(), str(info.get("version"))
    info.update(version=ours if ours != "unknown" or bentos in ("None", "") else bentos,
                description=_description(settings.serve_public_reads))
    info.pop("contact", None)  # "BentoML Team": not whom to ask about this API
    limit = settings.max_events_per_request
    examples = {field: (make(), text.format(limit=limit)) for field, (make, text) in _EXAMPLES.items()}
    _fill_batches(spec, examples, limit)
    for path, item in spec.get("paths", {}).items():
        operation = item.get("post") if isinstance(item, dict) else None
        if not isinstance(operation, dict):
            continue
        responses = operation.setdefault("responses", {})
        if path in INGESTION:
            responses.pop("200", None)  # never answered: 202 once Kafka acknowledged
            for status, (text, schema) in {**_ANSWERS.get(path, {}), "400": _BATCH_400, "503": _BATCH_503}.items():
                responses[status] = _response(text, schema)
        elif path in ("/recommend", "/similar", "/status", "/ping"):
            responses["400"] = _response(*_QUERY_400)
        if (model := (answers or {}).get(path)) is not None:
            responses["200"] = _response((model.__doc__ or "").strip() or "Successful Response",
                                         {"$ref": _declare(spec, model)})
    return spec


def _declare(spec: dict, model) -> str:
    """The ``$ref`` of ``model``'s schema, added (with the models it uses) to ``spec``'s components."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
        schemas[name] = _openapi30(sub)
    schemas.pop(f"{model.__name__}IODescriptor", None)  # BentoML's name of the same answer, no longer referenced
    return f"#/components/schemas/{model.__name__}"


def _openapi30(node):
    """pydantic's JSON schema the OpenAPI 3.0 way: ``anyOf: [X, {type: null}]`` is ``X`` with ``nullable: true``
    (3.0 has no null type), and a field that is absent rather than null when unset shows no ``default: null``."""
    if isinstance(node, list):
        return [_openapi30(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi30(v) for k, v in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1 and "$ref" not in rest[0]:
            node = {**rest[0], **node, "nullable": True}
        else:  # a $ref has no siblings in 3.0
            node.update(anyOf=rest, nullable=True)
    elif node.get("default", 0) is None and not node.get("nullable"):
        node.pop("default")
    return node


def _response(text: str, schema: dict) -> dict:
    return {"description": text, "content": {"application/json": {"schema": schema}}}


def _fill_batches(node, examples: dict[str, tuple[list, str]], limit: int) -> None:
    """Give every property marked with :data:`MARKER` its example, description and ``maxItems`` (in place)."""
    if isinstance(node, dict):
        field = node.pop(MARKER, None)
        if field in examples:
            example, text = examples[field]
            node.update(example=example, description=text, maxItems=limit)
        for value in node.values():
            _fill_batches(value, examples, limit)
    elif isinstance(node, list):
        for value in node:
            _fill_batches(value, examples, limit)


@lru_cache(maxsize=1)
def index_page() -> bytes:
    """The Swagger UI page at ``/``: BentoML's own, titled for this API and without the Google Tag Manager it
    loads (a third-party tracker on an internal API's documentation page). Same static assets, same schema."""
    import _bentoml_impl.server as bentoml_server

    html = (Path(bentoml_server.__file__).parent / "main-openapi.html").read_text()
    html = re.sub(r"<!-- Google Tag Manager.*?<!-- End Google Tag Manager[^>]*-->", "", html, flags=re.S)
    return re.sub(r"<title>.*?</title>", "<title>shoprec API</title>", html, count=1, flags=re.S).encode()
