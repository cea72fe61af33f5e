"""Helpers for tests that run a real ``bentoml serve`` (and nginx) as subprocesses."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from pipelines.settings import get_settings


def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll ``cond()`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - keep polling; report the last problem
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture()
def serve_env(settings):
    """The environment a ``bentoml serve`` subprocess needs to use this test's services and var dir."""
    keys = ("SHOPREC_VAR_DIR", "SHOPREC_KAFKA_BOOTSTRAP", "SHOPREC_REDIS_URL", "MLFLOW_TRACKING_URI")
    return {k: os.environ[k] for k in keys} | {"SHOPREC_MODEL_POLL_S": "1", "SHOPREC_SERVE_INFO_POLL_S": "0.5",
                                                "BENTOML_DO_NOT_TRACK": "true"}


@contextmanager
def steady_load(base_url: str, clients: int = 4, users: int = 60, request=None):
    """Clients in threads POSTing in a loop until the block ends: ``/recommend`` for one of ``users`` users, or
    what ``request(client, i)`` returns, ``(path, json body)``.

    Yields the list they append to: ``(monotonic_time, status_code, body)`` per request (the body of a 2xx
    answer, else ``{}``; status 0 and ``{"error": ...}`` when the request failed without an answer).
    """
    request = request or (lambda n, i: ("/recommend", {"user_id": f"u{(n * 7 + i) % users}", "k": 5}))
    answers: list[tuple[float, int, dict]] = []
    stop = threading.Event()

    def client(n):
        with httpx.Client(base_url=base_url, timeout=15, headers=get_settings().client_headers()) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    path, body = request(n, i)
                    r = c.post(path, json=body)
                    answers.append((time.monotonic(), r.status_code, r.json() if 200 <= r.status_code < 300 else {}))
                except (httpx.HTTPError, ValueError) as err:
                    answers.append((time.monotonic(), 0, {"error": repr(err)}))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answers
    finally:
        stop.set()
        for t in threads:
            t.join()
