"""Two ``bentoml serve`` replicas behind nginx (deploy/nginx.conf): one dies under load, no request fails."""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines import localstack
from pipelines.schemas import new_event
from pipelines.serve_process import bento_serving, kill_now, nginx_running
from pipelines.settings import get_settings
from tests.bentos.conftest import steady_load, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")),
                                                   reason="nginx is not installed (apt-get install nginx)")]


def _recommend_count(port: int) -> int:
    """``/recommend`` answers with status 200 that the server on ``port`` reports in ``/metrics``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "bentoml_service_request_total" and s.labels.get("endpoint") == "/recommend"
                   and s.labels.get("http_response_code") == "200" and s.labels.get("runner_name") == "shoprec"))


def test_killing_a_replica_under_load_fails_no_request(settings, serve_env, registered_champion, tmp_path):
    registry, _ = registered_champion
    env = {**serve_env, "SHOPREC_MLFLOW_MODEL_NAME": registry.name}
    ports = [localstack.free_port(), localstack.free_port()]
    lb_port = localstack.free_port()
    with ExitStack() as stack:
        replicas = [stack.enter_context(bento_serving(p, env, tmp_path / f"replica{n}.log"))
                    for n, p in enumerate(ports)]
        # each replica's /metrics counts its own answers (BentoML's counter files live in its home, which each
        # `bentoml serve` empties as it starts: a shared one made every port show the newest server's counts)
        headers = get_settings().client_headers()
        for port, n in zip(ports, (7, 3)):
            for i in range(n):
                assert httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": f"m{i}"},
                                  headers=headers, timeout=15).status_code == 200
        wait_for(lambda: [_recommend_count(p) for p in ports] == [7, 3], 15, "each replica's own count in /metrics")
        stack.enter_context(nginx_running(lb_port, ports, tmp_path / "nginx"))
        lb = f"http://127.0.0.1:{lb_port}"
        # at the edge only the API routes: Prometheus and the probes ask each replica on the internal network
        for path in ("/metrics", "/readyz", "/healthz"):
            r = httpx.get(lb + path, timeout=5)
            assert r.status_code == 404 and "internal network" in r.json()["error"], (path, r.text)
        answers = stack.enter_context(steady_load(lb))
        sent = stack.enter_context(steady_load(lb, clients=2, request=lambda n, i: ("/events", {"events": [
            new_event("view", f"lb-{n}", f"item-{j}", f"s-{n}") for j in range(3)]})))
        wait_for(lambda: len(answers) > 40 and len(sent) > 10, 30, "traffic through nginx")
        kill_now(replicas[0])  # no goodbye: connections refused / reset from now on
        before, events_before = len(answers), len(sent)
        wait_for(lambda: len(answers) > before + 80 and len(sent) > events_before + 20, 60, "traffic after the kill")
    statuses = [s for _, s, _ in answers]
    failed = [(t, s, body) for t, s, body in answers if s != 200]
    assert not failed, ({s: statuses.count(s) for s in set(statuses)}, failed[:5])
    # /events too: a batch that reached the dying replica is sent to the other (each event_id is stored once)
    refused = [(status, body) for _, status, body in sent if status != 202]
    assert not refused, refused[:5]


def test_with_no_replica_left_the_edge_answers_json_that_says_send_again(tmp_path):
    """nginx's own 502/504 page was HTML: a client could not tell what happened to its batch, nor when to retry."""
    dead = [localstack.free_port(), localstack.free_port()]  # nothing listens there
    lb_port = localstack.free_port()
    with nginx_running(lb_port, dead, tmp_path / "nginx"):
        for path in ("/recommend", "/events"):
            r = httpx.post(f"http://127.0.0.1:{lb_port}{path}", json={}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert "send the request again" in r.json()["error"], r.text

