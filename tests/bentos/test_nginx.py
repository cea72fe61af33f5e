"""Two ``bentoml serve`` replicas behind nginx (deploy/nginx.conf): one dies under load, no request fails."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines import localstack
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
        answers = stack.enter_context(steady_load(f"http://127.0.0.1:{lb_port}"))
        wait_for(lambda: len(answers) > 40, 30, "traffic through nginx")
        kill_now(replicas[0])  # no goodbye: connections refused / reset from now on
        before = len(answers)
        wait_for(lambda: len(answers) > before + 80, 60, "traffic after the kill")
        time.sleep(0.5)
    statuses = [s for _, s, _ in answers]
    failed = [(t, s, body) for t, s, body in answers if s != 200]
    assert not failed, ({s: statuses.count(s) for s in set(statuses)}, failed[:5])
