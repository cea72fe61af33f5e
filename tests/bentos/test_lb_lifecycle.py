"""`make up-lb` / `make down-lb` (pipelines/serve_process.py: up_lb, down_lb) with real replicas and nginx.

up-lb is idempotent and repairs: a second call keeps the ready replicas and nginx, a replica whose
`bentoml serve` was SIGKILLed (its workers left serving as orphans) is replaced; down-lb stops
everything, orphans included, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from pipelines import localstack
from pipelines.serve_process import LBError, down_lb, up_lb
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


def recorded(var_dir) -> dict:
    return json.loads((var_dir / "lb" / "pids.json").read_text())


def test_up_lb_twice_keeps_replicas_repairs_an_orphaned_one_and_down_lb_stops_all(
        settings, serve_env, registered_champion, tmp_path, monkeypatch, capsys):
    registry, _ = registered_champion
    for k, v in {**serve_env, "SHOPREC_MLFLOW_MODEL_NAME": registry.name}.items():
        monkeypatch.setenv(k, v)  # up_lb passes this process's environment to the replicas
    var_dir = tmp_path / "var"
    ports = (localstack.free_port(), localstack.free_port())
    lb_port = localstack.free_port()
    everything = [*ports, lb_port]
    seen: set[int] = set()  # every pid that ever listened on our ports: none may survive down_lb
    try:
        # 1. a fresh start
        first = up_lb(var_dir, lb_port, ports)
        out = capsys.readouterr().out
        assert {p: how for p, (how, _) in first["replicas"].items()} == {ports[0]: "started", ports[1]: "started"}
        assert f"started {ports[0]}, {ports[1]}" in out, out
        pids = recorded(var_dir)
        assert pids["lb_port"] == lb_port and pids["nginx"] == first["nginx"][1]
        assert {int(k): v for k, v in pids["replicas"].items()} == {p: pid for p, (_, pid) in first["replicas"].items()}
        headers = settings.client_headers()
        r = httpx.post(f"http://127.0.0.1:{lb_port}/recommend", json={"user_id": "u1", "k": 5}, headers=headers,
                       timeout=15)
        assert r.status_code == 200, r.text
        seen |= set().union(*listeners(everything).values())

        # 2. again while it runs: everything kept (same pids), and it says so
        second = up_lb(var_dir, lb_port, ports)
        out = capsys.readouterr().out
        assert second == {"replicas": {p: ("kept", pid) for p, (_, pid) in first["replicas"].items()},
                          "nginx": ("kept", first["nginx"][1])}
        for p in ports:
            assert f"replica {p} already running" in out, out
        assert "nginx already running" in out and f"kept {ports[0]}, {ports[1]}" in out, out
        assert recorded(var_dir) == pids
        assert all(alive(pid) for pid in [*pids["replicas"].values(), pids["nginx"]])

        # 3. SIGKILL one replica's `bentoml serve`: its workers stay behind, orphaned, still listening
        victim_port, victim = ports[0], pids["replicas"][str(ports[0])]
        orphans = {c.pid for c in psutil.Process(victim).children(recursive=True)}
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim), 10, "the killed bentoml serve to go")
        assert orphans and listeners([victim_port])[victim_port] & orphans, "expected orphaned workers on the port"

        third = up_lb(var_dir, lb_port, ports)
        out = capsys.readouterr().out
        how, fresh = third["replicas"][victim_port]
        assert how == "started" and fresh != victim, out
        assert third["replicas"][ports[1]] == ("kept", pids["replicas"][str(ports[1])])
        assert third["nginx"] == ("kept", pids["nginx"])
        assert f"replica {ports[1]} already running" in out and f"started {victim_port}" in out, out
        assert not any(alive(pid) for pid in orphans), "the orphaned workers were not stopped"
        holders = listeners([victim_port])[victim_port]
        assert fresh in holders and not holders & orphans
        assert httpx.get(f"http://127.0.0.1:{victim_port}/readyz", timeout=5).status_code == 200
        assert recorded(var_dir)["replicas"][str(victim_port)] == fresh
        seen |= set().union(*listeners(everything).values())

        # 4. kill the other replica's parent too, so down_lb has orphans to find, then stop everything
        other = pids["replicas"][str(ports[1])]
        os.kill(other, signal.SIGKILL)
        wait_for(lambda: not alive(other), 10, "the killed bentoml serve to go")
    finally:
        stopped = down_lb(var_dir, lb_port, ports)
    out = capsys.readouterr().out
    assert stopped > 0 and f"stopped {stopped} processes" in out, out
    assert listeners(everything) == {p: set() for p in everything}
    assert not [pid for pid in seen if alive(pid)], "processes of up-lb survived down-lb"
    assert not (var_dir / "lb" / "pids.json").exists()
    assert down_lb(var_dir, lb_port, ports) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_up_lb_refuses_a_port_held_by_something_else_and_down_lb_leaves_it_alone(settings, tmp_path, capsys):
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
        capsys.readouterr()
        assert down_lb(tmp_path / "var", lb_port, (port,)) == 0
        assert holder.poll() is None, "down_lb stopped a process that is not bentoml or nginx"
        assert "nothing was running" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
