"""Typed settings for every shoprec process.

One object, environment prefix ``SHOPREC_`` (``MLFLOW_TRACKING_URI`` keeps its
standard name). Every default works on the local stack started by ``make up``, which adds the
local API key (:func:`local_env`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.schemas import REGISTERED_MODEL, TOPIC_CATALOG, TOPIC_DLQ, TOPIC_EVENTS


class TrainConfig(BaseModel):
    """Hyperparameters of a training run; logged to MLflow with every run."""

    model: str = Field("shoprec", description="recommender name (pipelines.models.get_recommender)")
    dim: int = Field(64, ge=4, le=1024, description="embedding size")
    epochs: int = Field(15, ge=1, le=500)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    batch_size: int = Field(4096, ge=16)
    seed: int = 2020
    holdout_per_user: int = Field(1, ge=1, description="last N interactions of each user kept for evaluation")
    k: int = Field(10, ge=1, description="cut-off of the offline metrics")
    min_improvement: float = Field(0.0, description="champion is replaced only when NDCG@k improves by more than this")


class Settings(BaseSettings):
    """All configuration of shoprec; read from ``SHOPREC_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SHOPREC_", env_nested_delimiter="__", extra="ignore")

    # where local state lives (lake, logs, pid files, MLflow store, Dagster home)
    var_dir: Path = Path("var")

    # Kafka (the local default is the tansu broker started by `make up`)
    kafka_bootstrap: str = "localhost:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_events_partitions: int = 6
    # topic names: one shop (or one test, or one benchmark run) per set of names on a shared cluster
    kafka_topic_events: str = Field(TOPIC_EVENTS, min_length=1, description="the shop's events (and impressions)")
    kafka_topic_dlq: str = Field(TOPIC_DLQ, min_length=1, description="quarantined records, with a reason header")
    kafka_topic_catalog: str = Field(TOPIC_CATALOG, min_length=1, description="catalog changes")
    consumer_group: str = "shoprec-consumer"
    consumer_max_records: int = Field(20_000, ge=1, description="records per poll, and by default the records "
                                      "a lake write waits for (consumer_lake_flush_rows): larger batches mean fewer, "
                                      "larger Parquet files and fsyncs (5,000: 36k events/s; 20,000: 52k)")
    consumer_poll_ms: int = Field(100, ge=1)
    consumer_inflight_batches: int = Field(2, ge=1, description="polled batches being validated, deduplicated and "
                                           "folded into Redis before the poll thread waits for the oldest (batches "
                                           "only waiting for their lake write do not count): 1 serialises each "
                                           "batch's stages; 2 lets one batch's lake write overlap the next one's "
                                           "validation")
    consumer_lake_flush_s: float = Field(5.0, ge=0, description="the consumer buffers the valid events of "
                                         "consecutive polls and writes them (one file per Kafka partition and hour) "
                                         "once the oldest was polled this long ago, then commits their offsets: at "
                                         "a trickle a poll holds one or two events, and a file per poll made ~47,000 "
                                         "files an hour. The Redis online state is updated per poll regardless; the "
                                         "lake, the commit and what a crash replays into Redis lag by up to this. "
                                         "0: write every poll")
    consumer_lake_flush_rows: int | None = Field(None, ge=1, description="the buffer is written at once when it "
                                                 "holds this many records (default: consumer_max_records, so a "
                                                 "full poll is written alone); bounds its memory")
    consumer_lake_idle_flush_rows: int = Field(1000, ge=0, description="when a poll comes back empty (the consumer "
                                               "caught up), a buffer of at least this many records is written at "
                                               "once rather than after consumer_lake_flush_s (its files are worth "
                                               "having; a trickle's few events wait)")

    # Redis
    redis_url: str = "redis://localhost:6379/0"
    recent_items_cap: int = Field(50, ge=1)
    cache_ttl_s: int = Field(300, ge=1)

    # MLflow
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5000",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "SHOPREC_MLFLOW_TRACKING_URI"),
    )

    # serving
    # API keys: none by default, so a deployed service never accepts a published one; `make up` and the
    # other local commands pass LOCAL_API_KEY (local_env). Keys of api_keys may call every route; keys of
    # read_api_keys only /recommend, /similar and /status (e.g. a storefront that must not send events).
    api_keys: list[SecretStr] = Field(default_factory=list)
    read_api_keys: list[SecretStr] = Field(default_factory=list)
    serve_public_reads: bool = Field(False, description="serve /recommend, /similar and /status without a key (only "
                                                        "behind a gateway that authenticates its callers)")
    max_events_per_request: int = Field(1000, ge=1)
    max_event_bytes: int = Field(16_384, ge=256)
    model_poll_s: float = Field(10.0, gt=0)
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    bento_url: str = "http://127.0.0.1:3001"
    ab_experiment: str = "default"
    ab_challenger_share: float = Field(0.5, ge=0, le=1, description="traffic share of the challenger when one exists")
    ab_salt: str = "shoprec-ab-1"
    fallback_k: int = 200
    explore_share: float = Field(0.1, ge=0, le=1,
                                 description="share of recommendation slots given to new products (cold-start exploration)")
    explore_temperature: float = Field(1.0, ge=0, description="how strongly the exploration draw favours the new "
                                       "products the content path finds relevant: temperature over their "
                                       "standardised scores (0: always the most relevant; higher: more even)")
    explore_reseed_s: float = Field(600, gt=0, description="seconds a user's exploration draw stays the same while "
                                                           "their session does not change")
    new_item_age_h: float = Field(24.0, gt=0, description="a product is 'new' for this many hours after created_at")

    # dashboard / A/B analysis
    ab_alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the A/B tests (two-sided)")
    ab_power: float = Field(0.8, gt=0.5, lt=1, description="power the A/B test is planned for")
    ab_mde: float = Field(0.10, gt=0, description="minimum detectable effect: relative CTR lift (0.1 = +10 %)")
    ab_srm_alpha: float = Field(0.001, gt=0, lt=0.5, description="p-value below which the split is a sample-ratio mismatch")
    dagster_url: str = Field("http://localhost:3000", description="Dagster UI base URL (links to runs)")
    dashboard_lake_hours: int = Field(168, ge=1, description="hours of the lake the dashboard reads (revenue, new products)")

    # events older/newer than this are rejected
    max_event_age_days: int = Field(30, ge=1)
    max_event_future_s: int = Field(300, ge=0)

    train: TrainConfig = TrainConfig()

    # model lifecycle (orchestration/): cadence, early-retrain triggers, evaluation gate, cache warm-up
    auto_promote: bool = Field(False, description="SHOPREC_AUTO_PROMOTE: a candidate that beats the champion by "
                                                  "promote_margin becomes champion without a person")
    promote_margin: float = Field(0.02, ge=0, description="relative holdout NDCG gain over the champion needed "
                                                          "for automatic promotion (0.02 = 2%)")
    challenger_tolerance: float = Field(0.05, ge=0, le=1, description="relative holdout NDCG loss vs the champion "
                                                                      "a candidate may have and still be challenger")
    holdout_hours: int = Field(6, ge=1, description="the last hours of the training window, held out to compare "
                                                    "candidate and champion on the same data")
    train_window_days: int = Field(7, ge=1, description="days of lake events a retrain reads")
    refresh_cron: str = Field("10 * * * *", description="incremental refresh (trending, fallback, cache warm-up)")
    retrain_cron: str = Field("30 3 * * *", description="full retrain")
    cadence_on: bool = Field(False, description="Dagster's schedules (hourly validation and refresh, daily retrain) "
                                                "start running; `make up` sets it. Off, they start stopped until "
                                                "turned on in the Dagster UI")
    retrain_min_new_events: int = Field(50_000, ge=1, description="the sensor retrains early after this many new events")
    drift_psi_threshold: float = Field(0.2, gt=0, description="the sensor retrains early when the PSI of the event "
                                                              "mix (event types or categories) exceeds this")
    retrain_sensor_interval_s: int = Field(300, ge=30)
    model_max_age_h: float = Field(26.0, gt=0, description="the served model shows as stale (FreshnessPolicy) after this")
    volume_band_factor: float = Field(4.0, gt=1, description="an hour's row count must lie within "
                                                             "[median / f, median * f] of recent hours")
    volume_history_hours: int = Field(24, ge=3, description="recent partitions the volume band is learned from")
    warm_cache_users: int = Field(1000, ge=0, description="most active users whose top-N is precomputed in Redis")
    warm_cache_k: int = Field(20, ge=1)

    # ingestion (stream consumer and /events)
    dedup_window_s: int = Field(86_400, ge=60, description="how long an event_id is remembered to reject duplicates")
    consumer_status_every_s: float = Field(2.0, gt=0, description="how often the consumer writes lag/rate to Redis")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest /events body (413 above)")
    max_query_bytes: int = Field(16 * 1024, ge=256, description="largest body of another POST (/recommend, /similar, "
                                                                "/status ...): 413 above")
    ingest_ack_timeout_s: float | None = Field(None, gt=0, description="how long /events and /catalog wait for "
                                               "the broker to acknowledge a batch (and to connect, or to learn a "
                                               "topic's partitions) before answering 503 \"nothing was accepted, "
                                               "retry\" with Retry-After (default: 60 % of serve_request_timeout_s). "
                                               "It must end before the API's request timeout: past that, BentoML "
                                               "answers its own 504, which says neither what happened nor what to do")
    events_rate_limit: str = Field("100/second", description="per-API-key request limit of /events, in the "
                                   "`limits` notation (e.g. '100/second;3000/minute'); shared through Redis")
    consumer_lake_threads: int = Field(4, ge=1, description="lake files (one per Kafka partition and hour of a "
                                       "flush) the consumer encodes and fsyncs at once")
    lake_compact_min_age_s: float = Field(120.0, ge=0, description="consumer files younger than this are not "
                                          "compacted yet (a member whose commit a rebalance refused deletes "
                                          "its own files within about max_poll_interval, 60 s)")
    lake_compact_threads: int = Field(8, ge=1, description="files a compaction reads at once")
    lake_compact_open_every_s: float = Field(60.0, ge=0, description="the stream consumer compacts the current "
                                             "and the previous hour this often (0: only the hourly events asset "
                                             "does, once an hour has closed)")

    # serving (bentos/): adaptive batching, deadlines, cache, business rules, A/B experiment file
    mlflow_model_name: str = Field(REGISTERED_MODEL, description="registered model the service serves "
                                                                      "(schemas.REGISTERED_MODEL; tests override it)")
    serve_max_batch_size: int = Field(64, ge=1, description="adaptive batching: most requests scored in one call")
    serve_max_latency_ms: int = Field(100, ge=1, description="adaptive batching: a request that would wait longer than this for its batch is shed (the API answers it with the fallback)")
    serve_coalesce_in_flight: int = Field(1, ge=1, description="scoring calls one API process keeps in flight; "
                                                                "requests arriving meanwhile leave together as one call. "
                                                                "The scorer runs one batch at a time, so with 2 API "
                                                                "processes 1 each keeps it busy; more only splits its batches")
    serve_gpu: bool = Field(False, description="request a GPU for the scoring service (resources={'gpu': 1})")
    serve_deadline_ms: int = Field(1000, ge=1, description="a model answer slower than this is replaced by the fallback")
    serve_request_timeout_s: float = Field(5.0, gt=0, description="BentoML's per-request timeout. Keep it short: "
                                           "BentoML holds each request's timer, context and trace span until it "
                                           "expires, and the garbage collector's pauses grow with rps x timeout")
    serve_cache: bool = Field(True, description="serve and store top-N lists in the Redis cache")
    serve_cache_n: int = Field(50, ge=1, description="length of the cached top-N list")
    serve_local_cache_entries: int = Field(20_000, ge=0, description="users whose cached lists each API process also "
                                           "keeps in memory, dropped when Redis reports their key changed (CLIENT "
                                           "TRACKING; saves the Redis round trip of a hit). 0: off")
    serve_api_workers: int = Field(1, ge=1, description="processes of the API service")
    serve_recycle_requests: int = Field(200, ge=0, description="a client connection is closed after this many answers "
                                                               "(the client reconnects, often to a less busy API "
                                                               "process: BentoML's workers share one socket); 0: never")
    serve_torch_threads: int = Field(1, ge=0, description="torch threads of the scoring process (0: torch's default, "
                                     "one per core). One by default: batches are small, and idle intra-op threads "
                                     "spin on the cores the API process needs")
    serve_product_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the hybrid's item product in the scoring process: auto = bfloat16 where the "
        "device multiplies it natively (AVX512-BF16/AMX CPUs, CUDA from Ampere), else float32")
    serve_info_poll_s: float = Field(1.0, gt=0, description="how often the API service asks the scorer which versions it serves")
    max_per_category: int = Field(3, ge=1, description="at most this many products of one category in the top 10")
    catalog_reload_s: float = Field(60.0, gt=0, description="how often serving re-reads the catalog Parquet file")
    ab_experiment_file: Path | None = Field(None, description="YAML experiment (name, salt, variants: alias -> share); "
                                                              "overrides ab_experiment/ab_salt/ab_challenger_share")
    impression_buffer: int = Field(100_000, ge=1, description="impressions kept in memory while Kafka is unreachable")
    impression_linger_ms: int = Field(100, ge=0, le=10_000, description="impressions are sent in batches at most this "
                                      "often (fewer produce requests; the delay only postpones A/B attribution)")
    packaged_model_dir: Path = Field(Path("bentos/packaged"), description="champion packaged into the Bento "
                                                                          "(served when MLflow is unreachable)")
    serve_access_log: bool = Field(False, description="BentoML access log (one line per request; costs throughput)")
    serve_trace_sample_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of requests traced with "
                                           "OpenTelemetry (exporter from BentoML's configuration); 0 bypasses "
                                           "the tracing middleware entirely")

    # hourly incremental refresh (orchestration: `itemitem_refresh` in refresh_job, SHOPREC_REFRESH_CRON)
    refresh_window_hours: int = Field(168, ge=2, description="hours of validated lake events the hourly refresh "
                                                             "recomputes item-to-item neighbours and trending from")
    refresh_moves_champion: bool = Field(True, description="a refresh of the champion that is not worse than it "
                                                           "(challenger_tolerance) takes the `champion` alias "
                                                           "without SHOPREC_AUTO_PROMOTE; off: a person promotes it")

    @model_validator(mode="after")
    def _ack_wait_within_the_request_timeout(self) -> Settings:
        if self.ingest_ack_timeout_s is not None and self.ingest_ack_timeout_s >= self.serve_request_timeout_s:
            raise ValueError(f"SHOPREC_INGEST_ACK_TIMEOUT_S ({self.ingest_ack_timeout_s}) must be under "
                             f"SHOPREC_SERVE_REQUEST_TIMEOUT_S ({self.serve_request_timeout_s}): an ingestion request "
                             "still waiting for Kafka then gets BentoML's 504 instead of shoprec's 503 (unset it to "
                             "use 60 % of the request timeout)")
        return self

    @property
    def ingest_ack_wait_s(self) -> float:
        """How long an ingestion request waits for Kafka: ``ingest_ack_timeout_s``, else 60 % of the request timeout
        (the rest is left to validate the batch and answer)."""
        return self.ingest_ack_timeout_s or 0.6 * self.serve_request_timeout_s

    @property
    def lake_dir(self) -> Path:
        return self.var_dir / "lake" / "events"

    @property
    def quality_dir(self) -> Path:
        """Great Expectations reports, one JSON file per validated partition (written by Dagster, read by the dashboard)."""
        return self.var_dir / "quality"

    @property
    def catalog_path(self) -> Path:
        return self.var_dir / "lake" / "catalog.parquet"

    def client_headers(self) -> dict[str, str]:
        """The ``Authorization`` header of this process as a client of the API: its first key, else the local
        stack's (a client may default to it: only a server must never accept it unasked)."""
        keys = self.api_keys or self.read_api_keys
        return {"Authorization": f"Bearer {keys[0].get_secret_value() if keys else LOCAL_API_KEY}"}

    def kafka_client_kwargs(self) -> dict:
        """Connection settings shared by every Kafka client (producer, consumer, admin)."""
        kw: dict = {"bootstrap_servers": self.kafka_bootstrap.split(","), "security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        if self.kafka_ssl_cafile:
            kw["ssl_cafile"] = self.kafka_ssl_cafile
        return kw


#: the API key of the local stack (`make up`, `make up-lb`, the benchmarks, the tests): never a default of Settings
LOCAL_API_KEY = "shoprec-dev-key"


def local_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with the local stack's API key when it sets none."""
    env = dict(os.environ if env is None else env)
    if not env.get("SHOPREC_API_KEYS"):
        env["SHOPREC_API_KEYS"] = json.dumps([LOCAL_API_KEY])
    return env


#: ``SHOPREC_*`` variables that are not settings (test hooks)
OTHER_VARIABLES = frozenset({"SHOPREC_CRASH_AT", "SHOPREC_FUZZ_SEED"})

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A ``SHOPREC_*`` variable whose value is not valid; the message names each one, what it takes and its default."""


def _variable(loc: tuple) -> str:
    """The environment variable of a setting's error location (``("train", "epochs")`` -> ``SHOPREC_TRAIN__EPOCHS``)."""
    field = Settings.model_fields.get(str(loc[0])) if loc else None
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return "SHOPREC_" + "__".join(str(part) for part in loc).upper()


def _default(loc: tuple) -> str:
    fields: dict = Settings.model_fields
    default = None
    for part in loc:
        field = fields.get(str(part))
        if field is None:
            return ""
        default = field.get_default(call_default_factory=True)
        fields = getattr(field.annotation, "model_fields", {})
    return f" (unset, it is {default!r})" if default is not None and not isinstance(default, BaseModel) else ""


def describe_settings_error(err: ValidationError) -> str:
    """One line per invalid variable: its name, the value given, what it takes and its default."""
    lines = []
    for e in err.errors(include_url=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        if not e["loc"]:  # a rule across settings: its message names them
            lines.append(msg)
            continue
        lines.append(f"{_variable(e['loc'])}={e['input']!r}: {msg[:1].lower() + msg[1:]}{_default(e['loc'])}")
    return "\n".join(lines)


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """``SHOPREC_*`` variables that are no setting (a misspelt name is otherwise ignored), with the likely one."""
    known = {_variable((name,)) for name in Settings.model_fields}
    known |= {_variable(("train", name)) for name in TrainConfig.model_fields}
    out = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()
        if upper.startswith("SHOPREC_") and upper not in known and upper not in OTHER_VARIABLES:
            close = difflib.get_close_matches(upper.removeprefix("SHOPREC_"), [k.removeprefix("SHOPREC_") for k in known],
                                              n=1, cutoff=0.8)
            out.append(f"{name} is not a shoprec setting, so it changes nothing"
                       + (f" (did you mean SHOPREC_{close[0]}?)" if close else " (README, Configuration, lists them)"))
    return out


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment).

    Raises:
        SettingsError: a variable's value is not valid (the message says which and what it takes).
    """
    try:
        settings = Settings()
    except ValidationError as err:
        raise SettingsError(describe_settings_error(err)) from None
    for line in unknown_variables():
        log.warning(line)
    return settings
