"""`make up-lb` / `make down-lb` / status-lb (pipelines/serve_process.py: up_lb, down_lb, status_lb) with real
replicas, nginx and supervisord.

up-lb is idempotent: a second call keeps what runs and applies a changed port list; supervisord replaces a replica
whose `bentoml serve` was SIGKILLed (and the workers it left serving go); down-lb stops everything, also when the
supervisord itself was killed, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import httpx
import psutil
import pytest

from pipelines import localstack
from pipelines.serve_process import LBError, down_lb, status_lb, unreachable_services, up_lb
from pipelines.settings import get_settings
from tests.bentos.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")),
                                                   reason="nginx is not installed (apt-get install nginx)")]


def listeners(ports) -> dict[int, set[int]]:
    """Pids listening on each port (every process sharing a socket, like BentoML's workers)."""
    out = {p: set() for p in ports}
    for proc in psutil.process_iter():
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in out:
                    out[c.laddr.port].add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def recommend(lb_port: int, settings) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{lb_port}/recommend", json={"user_id": "u1", "k": 5},
                      headers=settings.client_headers(), timeout=15)


def test_up_lb_keeps_what_runs_supervisord_replaces_a_killed_replica_and_down_lb_stops_all(
        settings, serve_env, registered_champion, tmp_path, monkeypatch, capsys):
    registry, _ = registered_champion
    for k, v in {**serve_env, "SHOPREC_MLFLOW_MODEL_NAME": registry.name}.items():
        monkeypatch.setenv(k, v)  # up_lb passes this process's environment to the replicas
    var_dir = tmp_path / "var"
    ports = (localstack.free_port(), localstack.free_port())
    lb_port, new_port = localstack.free_port(), localstack.free_port()
    everything = [*ports, lb_port, new_port]
    seen: set[int] = set()  # every pid that ever listened on our ports: none may survive down_lb
    try:
        # 1. a fresh start: both replicas, then nginx; it says what it did, where the logs are, and what runs
        first = up_lb(var_dir, lb_port, ports)
        out = capsys.readouterr().out
        assert {p: how for p, (how, _) in first["replicas"].items()} == {ports[0]: "started", ports[1]: "started"}
        assert first["nginx"][0] == "started"
        assert f"started {ports[0]}, {ports[1]}" in out and f"http://127.0.0.1:{lb_port}/recommend" in out, out
        assert str(var_dir / "lb" / "log") in out, out
        assert recommend(lb_port, settings).status_code == 200
        status = status_lb(var_dir)
        for name in (f"replica-{ports[0]}", f"replica-{ports[1]}", "nginx"):
            assert any(line.split()[:2] == [name, "RUNNING"] for line in status.splitlines()), status
        seen |= set().union(*listeners(everything).values())

        # 2. again while it runs: everything kept (same pids), and it says so
        second = up_lb(var_dir, lb_port, ports)
        out = capsys.readouterr().out
        assert second == {"replicas": {p: ("kept", pid) for p, (_, pid) in first["replicas"].items()},
                          "nginx": ("kept", first["nginx"][1])}
        for p in ports:
            assert f"replica {p} already running" in out, out
        assert "nginx already running" in out and f"kept {ports[0]}, {ports[1]}" in out, out

        # 3. SIGKILL one replica's `bentoml serve`: its workers are orphaned on the port; supervisord starts a new
        #    replica, which first stops them
        victim_port, victim = ports[0], first["replicas"][ports[0]][1]
        orphans = {c.pid for c in psutil.Process(victim).children(recursive=True)}
        assert orphans
        os.kill(victim, signal.SIGKILL)

        def replaced():
            held = listeners([victim_port])[victim_port]
            return held if held and not held & orphans and ready(victim_port) else None

        holders = wait_for(replaced, 120, "a new replica, and not the orphans, serving on the killed one's port")
        assert victim not in holders
        assert not [pid for pid in orphans if alive(pid)], "workers of the killed replica were left running"
        assert recommend(lb_port, settings).status_code == 200
        third = up_lb(var_dir, lb_port, ports)  # what supervisord repaired is kept
        capsys.readouterr()
        assert third["replicas"][victim_port][0] == "kept" and third["replicas"][victim_port][1] in holders
        assert third["replicas"][ports[1]] == second["replicas"][ports[1]] and third["nginx"] == second["nginx"]
        seen |= set().union(*listeners(everything).values())

        # 4. a changed port list: the dropped replica stops, the new one starts, and the same nginx sends requests to
        #    it (stopping the other one leaves nginx only the new one)
        fourth = up_lb(var_dir, lb_port, (ports[1], new_port))
        out = capsys.readouterr().out
        assert fourth == {"replicas": {ports[1]: second["replicas"][ports[1]], new_port: ("started", ANY)},
                          "nginx": second["nginx"]}, out
        assert f"kept {ports[1]}; started {new_port}" in out, out
        wait_for(lambda: not listeners([victim_port])[victim_port], 30, "the dropped replica to stop")
        seen |= set().union(*listeners(everything).values())
        ctl = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(var_dir / "lb" / "supervisord.conf")]
        subprocess.run([*ctl, "stop", f"replica-{ports[1]}"], check=True, capture_output=True)
        assert not listeners([ports[1]])[ports[1]]
        assert [recommend(lb_port, settings).status_code for _ in range(4)] == [200] * 4
    finally:
        stopped = down_lb(var_dir)
    out = capsys.readouterr().out
    assert stopped > 0 and f"stopped {stopped} processes" in out, out
    assert listeners(everything) == {p: set() for p in everything}
    assert not [pid for pid in seen if alive(pid)], "processes of up-lb survived down-lb"
    assert "not running" in status_lb(var_dir)
    assert down_lb(var_dir) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_down_lb_stops_everything_when_supervisord_was_killed(settings, serve_env, tmp_path, monkeypatch, capsys):
    for k, v in serve_env.items():
        monkeypatch.setenv(k, v)
    var_dir = tmp_path / "var"
    port, lb_port = localstack.free_port(), localstack.free_port()
    try:
        started = up_lb(var_dir, lb_port, (port,))
        said = capsys.readouterr().out
        assert "`make status-lb` shows what runs" in said and "cannot reach" not in said, said  # services are up
        supervisord = int((var_dir / "lb" / "supervisord.pid").read_text())
        replica = started["replicas"][port][1]
        ours = {supervisord, *(p.pid for p in psutil.Process(supervisord).children(recursive=True))}
        ours |= {p.pid for p in psutil.Process(replica).children(recursive=True)}  # workers in sessions of their own
        os.kill(supervisord, signal.SIGKILL)  # its programs run on, orphaned
        os.kill(replica, signal.SIGKILL)  # and this one's workers too
        wait_for(lambda: not alive(supervisord) and not alive(replica), 10, "the killed processes to go")
        assert listeners([port])[port] and listeners([lb_port])[lb_port]
    finally:
        stopped = down_lb(var_dir)
    assert stopped > 0 and f"stopped {stopped} processes" in capsys.readouterr().out
    assert listeners([port, lb_port]) == {port: set(), lb_port: set()}
    assert not [pid for pid in ours if alive(pid)], "processes of up-lb survived down-lb"


def test_a_replica_that_cannot_start_is_an_error_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPREC_TRAIN__EPOCHS", "abc")  # the service refuses to import with an invalid setting
    var_dir = tmp_path / "var"
    port, lb_port = localstack.free_port(), localstack.free_port()
    try:
        with pytest.raises(LBError) as err:
            up_lb(var_dir, lb_port, (port,), timeout=20)
        msg = str(err.value)
        assert f"replica-{port}" in msg and "SHOPREC_TRAIN__EPOCHS" in msg and "make down-lb" in msg, msg
        assert listeners([lb_port])[lb_port] == set()  # nginx waits for the replicas
    finally:
        assert down_lb(var_dir) > 0
    assert "not running" in status_lb(var_dir)


def test_up_lb_refuses_a_port_held_by_something_else_and_down_lb_leaves_it_alone(tmp_path, capsys):
    port, lb_port = localstack.free_port(), localstack.free_port()
    code = f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        localstack.wait_port(port, proc=holder)
        t0 = time.monotonic()
        with pytest.raises(LBError) as err:
            up_lb(tmp_path / "var", lb_port, (port,))
        assert time.monotonic() - t0 < 10  # refused up front, no replica started and waited for
        msg = str(err.value)
        assert f"port {port}" in msg and f"pid {holder.pid}" in msg and "make down-lb" in msg, msg
        assert listeners([lb_port])[lb_port] == set()
        assert "not running" in status_lb(tmp_path / "var")
        capsys.readouterr()
        assert down_lb(tmp_path / "var") == 0
        assert holder.poll() is None, "down_lb stopped a process that up-lb did not start"
        assert "nothing was running" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


def test_up_lb_names_the_services_its_replicas_cannot_reach(settings, monkeypatch):
    """Without `make up`, up-lb printed RUNNING for everything: the replicas then served only the fallback and
    answered /events with 503, and nothing said why."""
    assert unreachable_services() == []  # the session's Redis and Kafka; MLflow here is a database file, no server
    dead = localstack.free_port()
    monkeypatch.setenv("SHOPREC_REDIS_URL", f"redis://127.0.0.1:{dead}/0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")
    get_settings.cache_clear()
    assert unreachable_services() == [f"Redis at redis://127.0.0.1:{dead}/0", f"MLflow at http://127.0.0.1:{dead}"]
