"""The serving benchmark's load driver credits the model only with answers the model gave, and the cache with its own."""

from __future__ import annotations

import http.server
import itertools
import threading

import pytest

from pipelines.bench import serve as bench_serve


class _Answers(http.server.BaseHTTPRequestHandler):
    """A third of the answers are the fallback (as a service shedding load would give), a third from the cache."""

    protocol_version = "HTTP/1.1"
    counter = itertools.count()

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        source = ("fallback", "model", "cache")[next(self.counter) % 3]
        body = b'{"items":[],"source":"%s"}' % source.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("driver", ["wrk", "asyncio"])
def test_fallback_and_cache_answers_are_counted_apart_from_model_answers(tmp_path, monkeypatch, driver):
    if driver == "asyncio":  # the load generator used where wrk is not installed
        monkeypatch.setattr(bench_serve.shutil, "which", lambda name: None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = bench_serve.drive(f"http://127.0.0.1:{server.server_port}/recommend", [{"user_id": "u1"}], 2, 1, tmp_path)
    finally:
        server.shutdown()
    assert out["errors"] == 0 and out["requests"] > 30
    assert out["fallback"] == pytest.approx(out["requests"] / 3, abs=3)  # one in three, give or take the cut-off
    assert out["cached"] == pytest.approx(out["requests"] / 3, abs=3)


def _pass(rps, p99, errors=0, fallback=0, requests=1000):
    return {"rps": rps, "served_rps": rps * (1 - fallback / requests), "p50_ms": p99 / 3, "p99_ms": p99,
            "errors": errors, "requests": requests, "fallback": fallback, "cached": 0}


def test_one_busy_pass_does_not_decide_a_scenario():
    out = bench_serve.summarize([_pass(1400, 2.1), _pass(1450, 2.2), _pass(900, 4.8)])  # the third met a busy spell
    assert out["p99_ms"] == 2.2 and out["rps"] == 1400
    assert out["requests"] == 3000 and len(out["passes"]) == 3


def test_an_error_in_any_pass_is_reported():
    out = bench_serve.summarize([_pass(1400, 2.1), _pass(1450, 2.2, errors=2) | {"error_kinds": {"timeout": 2}},
                                 _pass(1300, 2.3, fallback=40)])
    assert out["errors"] == 2 and out["error_kinds"] == {"timeout": 2}
    assert out["fallback"] == 40


def test_a_single_round_keeps_the_old_shape():
    assert "passes" not in bench_serve.summarize([_pass(1400, 2.1)])
