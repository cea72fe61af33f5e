"""Helpers for the ingestion tests: waiting on conditions, consumer subprocesses, producing tagged events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from pipelines import kafka_io, lake
from pipelines.schemas import new_event


def wait_until(cond, timeout=30.0, step=0.1, what="condition"):
    """Poll ``cond`` until it returns something other than None/False; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got is not None and got is not False:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tagged_events(n: int, tag: str | None = None, users: int = 24) -> list[dict]:
    """``n`` valid view/cart events of ``users`` users named after ``tag`` (so they spread over partitions)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [new_event("view" if i % 5 else "add_to_cart", f"u-{tag}-{i % users}", f"item-{i % 97}", f"s-{tag}-{i % users}")
            for i in range(n)]


def produce(settings, events: list[dict] | None = None, raw: list[tuple[str | None, bytes | None]] = ()) -> None:
    """Send event dicts and raw ``(key, value)`` records to ``shop.events`` and wait for every ack."""
    producer = kafka_io.make_producer(settings)
    try:
        futures = kafka_io.send_events(producer, events or [], settings.kafka_topic_events)
        futures += [producer.send(settings.kafka_topic_events, key=k, value=v) for k, v in raw]
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()


def start_consumer(log_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """``shoprec consume`` as a real child process with the test's environment (plus ``env``)."""
    cmd = [str(Path(sys.executable).parent / "shoprec"), "consume", *args]
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def lake_counts(settings, event_ids) -> Counter:
    """How many lake rows each of ``event_ids`` has (ids not in the lake are missing from the counter)."""
    wanted = set(event_ids)
    for _ in range(50):
        try:
            df = lake.read_all(settings.lake_dir)
            break
        except FileNotFoundError:  # a running consumer removed an uncommitted file between listing and reading
            time.sleep(0.05)
    return Counter(e for e in df.event_id if e in wanted)


def dumps(ev: dict) -> bytes:
    return json.dumps(ev, separators=(",", ":")).encode()
