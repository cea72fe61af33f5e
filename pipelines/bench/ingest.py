"""`shoprec bench ingest`: throughput, freshness and exactness of the ingestion path, in one run.

Starts its own Kafka-protocol broker (tansu) and Redis on free ports, with a throw-away lake, or,
with ``--use-configured``, talks to the broker and Redis of the settings (``SHOPREC_KAFKA_*``, SASL/SSL
included, and ``SHOPREC_REDIS_URL``) without touching the shop's data: the run gets topics of its own
(``shoprec-bench-<run>.events`` / ``.dlq``, deleted afterwards), an empty Redis database of its own
(``--redis-db``, emptied afterwards) and a throw-away lake. Then:

1. produces ``--events`` simulator events (views, carts, purchases, and the impressions and clicks
   of closed-loop sessions) to the events topic;
2. ``raw_consume_eps``: a bare kafka-python group consumer with the same fetch settings that only
   decodes each record (``orjson.loads``): the ceiling of this client;
3. ``consumer_eps``: the real :class:`~pipelines.consumer.StreamConsumer` in this process
   (validation, event_id claims, DLQ, Parquet lake, Redis state, commits) over the same records.
   Both rates run from the first fetched batch to the last record handled, for the real consumer
   the last commit (the group join, ~3 s on tansu, is left out of both);
4. ``freshness_ms``: ``shoprec consume`` as a separate process while this process produces a
   steady ``--rate`` events/s for ``--seconds``; one event in ``--sample-every`` is a tagged view
   of a fresh user, and a watcher thread polls Redis for that user's recent items. The figure is
   produce call → visible in the Redis state ``/recommend`` reads;
5. ``lost`` and ``duplicated``: every produced event_id checked against the lake.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import orjson
import pyarrow.dataset as ds
import typer

log = logging.getLogger("shoprec.bench.ingest")


def _produce(settings, payloads: list[tuple[str, bytes]]) -> None:
    from pipelines import kafka_io

    producer = kafka_io.make_producer(settings, linger_ms=20, batch_size=512 * 1024)
    futures = [producer.send(settings.kafka_topic_events, key=k, value=v) for k, v in payloads]
    producer.flush()
    for f in futures[-100:]:
        f.get(timeout=30)
    producer.close()


def _simulated(n: int, seed: int = 7, start_ms: int | None = None, rate_eps: float = 100.0) -> list[dict]:
    """A realistic mix: browsing sessions plus closed-loop ones (impression → click → cart → purchase)."""
    from pipelines import simulator

    rng = np.random.default_rng(seed)
    catalog = simulator.make_catalog(seed=seed)
    top = catalog.item_id.tolist()[:400]
    sim = simulator.ShopSimulator(catalog, n_users=20_000, seed=seed, new_item_rate=0.0)

    def recommend(user_id: str):
        items = [top[i] for i in rng.choice(len(top), size=10, replace=False)]
        variant = "champion" if rng.random() < 0.5 else "challenger"
        return uuid.uuid4().hex, items, variant, "1" if variant == "champion" else "2"

    start_ms = int(time.time() * 1000) - int(n / rate_eps * 1000) - 60_000 if start_ms is None else start_ms
    return list(sim.events(n, start_ms=start_ms, rate_eps=rate_eps, recommend_fn=recommend, loop_share=0.3))


def _raw_consume(settings, n: int) -> float:
    """Records/s of a bare kafka-python loop that only decodes."""
    from pipelines import kafka_io

    consumer = kafka_io.make_consumer(settings, group=f"bench-raw-{uuid.uuid4().hex[:6]}")
    got, t0 = 0, None
    deadline = time.monotonic() + 600
    try:
        while got < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=1000, max_records=settings.consumer_max_records)
            if polled and t0 is None:
                t0 = time.perf_counter()
            for recs in polled.values():
                for rec in recs:
                    orjson.loads(rec.value)
                got += len(recs)
        return got / (time.perf_counter() - t0)
    finally:
        consumer.close()


def _real_consume(settings, n: int) -> float:
    """Records/s of the real stream consumer (validation, lake, Redis, DLQ, commits) in this process."""
    from pipelines.consumer import StreamConsumer
    from pipelines.state import OnlineState, connect

    state = OnlineState(connect(settings.redis_url), recent_cap=settings.recent_items_cap)
    sc = StreamConsumer(settings, state, log_every_s=5.0)
    first: list[float] = []
    poll = sc.consumer.poll

    def timed_poll(*a, **kw):
        got = poll(*a, **kw)
        if got and not first:
            first.append(time.perf_counter())
        return got

    sc.consumer.poll = timed_poll
    deadline = time.monotonic() + 900
    try:
        # the consumer's own poll wait (``consumer_poll_ms``, as ``shoprec consume`` runs): it commits its
        # last batches once a poll comes back empty, so a longer wait here would only add idle time
        while sc.stats.consumed < n and time.monotonic() < deadline:
            sc.process_batch()
        return sc.stats.consumed / (time.perf_counter() - first[0])
    finally:
        sc.close()


def _freshness(settings, env: dict, rate: float, seconds: float, sample_every: int, log_path: Path) -> tuple[list[float], list[str]]:
    """Latencies (ms) from produce to Redis for tagged events while ``rate`` events/s stream in."""
    from pipelines import kafka_io
    from pipelines.schemas import RedisKeys, new_event
    from pipelines.state import OnlineState, connect

    r = connect(settings.redis_url)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "shoprec"), "consume"], env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    producer = kafka_io.make_producer(settings, linger_ms=1)
    produced: list[str] = []
    try:
        # wait until the consumer has joined and handles a probe, so the join is not in the figures
        probe = new_event("view", f"probe-{uuid.uuid4().hex[:8]}", "i00001", "s-probe")
        kafka_io.send_events(producer, [probe], settings.kafka_topic_events)[0].get(timeout=10)
        produced.append(probe["event_id"])
        deadline = time.monotonic() + 90
        while not r.exists(RedisKeys.recent(probe["user_id"])):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the consumer did not start; see {log_path}")
            time.sleep(0.05)

        background = _simulated(int(rate * seconds) + 1000, seed=11, start_ms=int(time.time() * 1000) - 60_000,
                                rate_eps=rate)
        pending: dict[str, float] = {}
        latencies: list[float] = []
        lock = threading.Lock()
        done = threading.Event()

        def watch():
            while not (done.is_set() and not pending):
                with lock:
                    users = list(pending)
                if users:
                    p = r.pipeline(transaction=False)
                    for u in users:
                        p.exists(RedisKeys.recent(u))
                    now = time.time()
                    for u, seen in zip(users, p.execute()):
                        if seen:
                            with lock:
                                latencies.append((now - pending.pop(u)) * 1000)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        tick, t0, sent = 0.01, time.monotonic(), 0
        per_tick = rate * tick
        i = 0
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) / tick * per_tick) + 1
            while sent < due:
                if i % sample_every == 0:
                    ev = new_event("view", f"fresh-{uuid.uuid4().hex[:12]}", "i00002", "s-fresh")
                    with lock:
                        pending[ev["user_id"]] = time.time()
                else:
                    ev = background[i]
                    ev["ts"] = int(time.time() * 1000)
                producer.send(settings.kafka_topic_events, key=ev["user_id"], value=orjson.dumps(ev))
                produced.append(ev["event_id"])
                sent += 1
                i += 1
            time.sleep(max(0.0, t0 + (sent / rate) - time.monotonic()))
        producer.flush()
        done.set()
        watcher.join(timeout=30)
        if pending:
            log.warning("%d tagged events never became visible", len(pending))
        # let the consumer commit every record it was sent (it counts only its own), then stop it gracefully
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = OnlineState(r).consumer_status()
            if st and int(st.get("consumed", 0)) >= len(produced):
                break
            time.sleep(0.5)
        else:
            log.warning("the consumer did not report all %d records in time; see %s", len(produced), log_path)
        return latencies, produced
    finally:
        producer.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _lake_check(lake_dir: Path, produced: list[str]) -> tuple[int, int]:
    """``(lost, duplicated)`` of the produced event_ids in the lake."""
    files = sorted(str(p) for p in Path(lake_dir).glob("date=*/hour=*/*.parquet"))
    ids = ds.dataset(files, format="parquet").to_table(columns=["event_id"]).column("event_id").to_pylist() if files else []
    stored = set(ids)
    wanted = set(produced)
    lost = len(wanted - stored)
    duplicated = len(ids) - len(stored)
    return lost, duplicated


def _settings_from(env: dict[str, str]):
    """Settings as a child process started with ``env`` will read them."""
    from unittest import mock

    from pipelines.settings import Settings

    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


def _with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (``redis://``, ``rediss://`` and ``unix://`` URLs)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"]  # redis-py prefers ?db= to the path
    if parts.scheme == "unix":
        return f"unix://{parts.netloc}{parts.path}?{urlencode([*query, ('db', str(db))])}"  # keep the empty host
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))


@contextmanager
def _own_redis_db(url: str, db: int):
    """Use Redis database ``db`` (the one ``url`` names) only if it is empty, and leave it empty."""
    from pipelines.state import connect

    r = connect(url)
    got = int(r.connection_pool.connection_kwargs.get("db") or 0)
    if got != db:  # never run in (and flush) a database that is not the benchmark's own
        raise typer.BadParameter(f"the benchmark's Redis URL resolves to database {got}, not {db}: "
                                 "pass a plain redis:// URL in SHOPREC_REDIS_URL", param_hint="--redis-db")
    if r.dbsize():
        raise typer.BadParameter(f"Redis database {r.connection_pool.connection_kwargs.get('db')} is not empty; "
                                 "the benchmark needs one of its own: pass --redis-db with an unused database number",
                                 param_hint="--redis-db")
    try:
        yield
    finally:
        r.flushdb()


def _delete_topics(settings) -> None:
    """Remove the run's own topics (best effort: a broker may not allow deletion)."""
    from pipelines import kafka_io

    admin = kafka_io.make_admin(settings)
    try:
        admin.delete_topics([settings.kafka_topic_events, settings.kafka_topic_dlq, settings.kafka_topic_catalog])
    except Exception as err:  # noqa: BLE001 - leftovers are named shoprec-bench-* and harmless
        log.warning("could not delete the benchmark's topics (%s); remove shoprec-bench-* by hand", err)
    finally:
        admin.close()


def run(events: int, rate: float, seconds: float, sample_every: int, work_dir: Path,
        use_configured: bool = False, redis_db: int = 15) -> dict:
    from pipelines import kafka_io, localstack
    from pipelines.settings import Settings

    run_id = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        if use_configured:
            base = Settings()
            env = {**os.environ, "SHOPREC_REDIS_URL": _with_db(base.redis_url, redis_db)}
            log.info("using the configured broker %s and Redis database %d of %s", base.kafka_bootstrap, redis_db,
                     base.redis_url.rsplit("@", 1)[-1])
        else:
            bport, rport = localstack.free_port(), localstack.free_port()
            (work_dir / "redis").mkdir(parents=True, exist_ok=True)
            stack.enter_context(localstack.running(localstack.broker_command(bport), bport, work_dir / "tansu.log"))
            stack.enter_context(localstack.running(localstack.redis_command(rport, work_dir / "redis"), rport,
                                                   work_dir / "redis.log"))
            env = {**os.environ, "SHOPREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{bport}",
                   "SHOPREC_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
        env.update({"SHOPREC_VAR_DIR": str(work_dir / "var"), "SHOPREC_CONSUMER_GROUP": f"bench-consumer-{run_id}",
                    "SHOPREC_KAFKA_TOPIC_EVENTS": f"shoprec-bench-{run_id}.events",
                    "SHOPREC_KAFKA_TOPIC_DLQ": f"shoprec-bench-{run_id}.dlq",
                    "SHOPREC_KAFKA_TOPIC_CATALOG": f"shoprec-bench-{run_id}.catalog"})
        settings = _settings_from(env)
        if use_configured:
            stack.enter_context(_own_redis_db(settings.redis_url, redis_db))
            stack.callback(_delete_topics, settings)
        kafka_io.ensure_topics(settings)

        t = time.perf_counter()
        evs = _simulated(events)
        payloads = [(e["user_id"], orjson.dumps(e)) for e in evs]
        produced = [e["event_id"] for e in evs]
        del evs
        _produce(settings, payloads)
        del payloads
        log.info("produced %d events in %.1f s", events, time.perf_counter() - t)

        raw = _raw_consume(settings, events)
        log.info("raw_consume_eps=%.0f", raw)
        real = _real_consume(settings, events)
        log.info("consumer_eps=%.0f", real)
        latencies, more = _freshness(settings, env, rate, seconds, sample_every, work_dir / "consumer.log")
        lost, duplicated = _lake_check(settings.lake_dir, produced + more)
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {
        "events": events,
        "raw_consume_eps": round(raw, 1),
        "consumer_eps": round(real, 1),
        "freshness_ms": {q: round(float(np.percentile(lat, p)), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
        "lost": lost,
        "duplicated": duplicated,
    }


def command(out: Path = typer.Option(Path("var/bench/ingest.json"), help="where to write the JSON result"),
            events: int = typer.Option(200_000, min=1, help="events produced for the throughput runs"),
            rate: float = typer.Option(2000.0, min=0.01, help="steady produce rate (events/s) during the freshness run"),
            seconds: float = typer.Option(20.0, min=0.1, help="length of the freshness run"),
            sample_every: int = typer.Option(25, min=1, help="one tagged (measured) event in this many"),
            use_configured: bool = typer.Option(False, help="use the broker and Redis of the settings (SASL/SSL "
                                                "included) instead of starting local ones; the run uses topics and a "
                                                "Redis database of its own and removes them afterwards"),
            redis_db: int = typer.Option(15, min=0, help="with --use-configured: an empty Redis database for the run"),
            ) -> None:
    """Ingestion throughput (raw vs real consumer), produce→Redis freshness, lost and duplicated events."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="shoprec-bench-ingest-") as tmp:
        result = run(events, rate, seconds, sample_every, Path(tmp), use_configured, redis_db)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2))
