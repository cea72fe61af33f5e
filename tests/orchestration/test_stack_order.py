"""`make up` starts the stack in order: a program starts only once the programs it needs answer their health check.

Real supervisord, with small stand-in programs on free ports (the stack's own ports are fixed and may be in use).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipelines import localstack
from pipelines.settings import Settings
from pipelines.stack import Program, down, next_steps, render_config, start_in_order, states
from tests.pipelines.conftest import wait_until

SLOW_SERVER = """
import http.server, sys, time
time.sleep(3)  # like MLflow: the process runs well before its port answers
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""
CLIENT = """
import sys, time, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
    outcome = "answered"
except OSError as err:
    outcome = f"refused: {err}"
with open(sys.argv[2], "a") as f:
    f.write(outcome + "\\n")
time.sleep(600)
"""


def test_a_program_starts_only_after_what_it_needs_answers_and_one_that_cannot_start_is_named(tmp_path):
    import subprocess

    port, never = localstack.free_port(), localstack.free_port()
    seen = tmp_path / "client.txt"
    py = sys.executable
    (tmp_path / "client.py").write_text(CLIENT)
    (tmp_path / "server.py").write_text(SLOW_SERVER)
    progs = [
        Program("client", [py, str(tmp_path / "client.py"), f"http://127.0.0.1:{port}/", str(seen)], "(client)",
                "proc", needs=("server",)),
        Program("server", [py, str(tmp_path / "server.py"), str(port)], f"http://127.0.0.1:{port}",
                f"http:http://127.0.0.1:{port}/"),
        Program("side", [py, "-c", "import time; time.sleep(600)"], "(side)", "proc"),
        Program("broken", [py, "-c", "import time; time.sleep(600)"], "(never listens)", f"tcp:127.0.0.1:{never}"),
        Program("orphan", [py, "-c", "import time; time.sleep(600)"], "(orphan)", "proc", needs=("broken",)),
    ]
    settings = Settings(var_dir=str(tmp_path / "var"))
    conf = render_config(settings, tmp_path, progs)
    subprocess.run([str(Path(py).parent / "supervisord"), "-c", str(conf)], check=True)
    said: list[str] = []
    try:
        assert states(conf)["client"] == "STOPPED"  # supervisord itself starts only what needs nothing
        pending = start_in_order(progs, conf, timeout_s=15, echo=said.append)
        assert pending == {"broken", "orphan"}
        # the client writes its outcome once its request ends (supervisord calls it RUNNING after startsecs alone)
        wait_until(lambda: seen.exists() and seen.read_text().endswith("\n"), 15, what="the client's first outcome")
        assert seen.read_text().splitlines() == ["answered"]  # its first and only start found the server up
        state = states(conf)
        assert state["client"] == state["side"] == "RUNNING" and state["orphan"] == "STOPPED"
        assert "  not started: orphan waits for broken" in said
        assert said.index("  ready: server") < said.index("  ready: client")
    finally:
        down(settings, tmp_path)
    assert not (conf.parent / "supervisord.pid").exists()


def test_make_up_ends_with_the_key_a_first_request_and_the_first_training(monkeypatch):
    from pipelines.settings import LOCAL_API_KEY, get_settings

    monkeypatch.delenv("SHOPREC_API_KEYS", raising=False)
    text = next_steps(get_settings(), served={})
    assert f"Authorization: Bearer {LOCAL_API_KEY}" in text and "/recommend" in text and "shoprec train" in text
    assert "No model is registered yet" in text
    # a stack that already serves a model is not told to train its first one (it said so on every `make up`)
    text = next_steps(get_settings(), served={"champion": "2", "challenger": "3"})
    assert "It serves challenger v3 and champion v2" in text and "No model is registered" not in text
    monkeypatch.setenv("SHOPREC_API_KEYS", '["a-real-secret"]')  # a deployment's keys are never printed
    text = next_steps(get_settings(), served={})
    assert "a-real-secret" not in text and LOCAL_API_KEY not in text and "one of SHOPREC_API_KEYS" in text
