"""Run ``bentoml serve`` (and nginx in front of replicas) as child processes: tests, benchmarks, ``make up-lb``.

Only subprocesses here, so :mod:`pipelines` stays free of BentoML imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from pipelines import localstack
from pipelines.settings import local_env

SERVICE = "bentos.service:Shoprec"
ROOT = Path(__file__).resolve().parent.parent


def bentoml_exe() -> str:
    exe = Path(sys.executable).parent / "bentoml"
    return str(exe) if exe.exists() else (shutil.which("bentoml") or "bentoml")


def serve_command(port: int, service: str = SERVICE) -> list[str]:
    return [bentoml_exe(), "serve", service, "--host", "127.0.0.1", "--port", str(port)]


def wait_ready(base_url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``/readyz`` answers 200 (BentoML is ready once every service's ``__init__`` ran)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode} before it was ready")
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout:.0f}s (last: {last})")


@contextmanager
def bento_serving(port: int, env: dict[str, str] | None = None, log_path: Path | None = None,
                  timeout: float = 90.0):
    """Run ``bentoml serve`` on ``port`` with extra environment until the block ends; yields the process."""
    full_env = {**os.environ, **(env or {})}
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(serve_command(port), cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}", timeout, proc)
        except (RuntimeError, TimeoutError) as err:
            tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{err}; end of its log:\n{tail}") from None
        yield proc
    finally:
        stop_group(proc)
        if log_path:
            log.close()


def stop_group(proc: subprocess.Popen, sig_timeout: float = 10.0) -> None:
    """Stop ``bentoml serve`` and its workers (they run in process groups of their own)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=sig_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=sig_timeout)
    for c in alive:
        c.kill()


def kill_now(proc: subprocess.Popen) -> None:
    """SIGKILL ``bentoml serve`` and every worker at once: a replica that dies without a goodbye."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def worker_pids(proc: subprocess.Popen, service_name: str) -> list[int]:
    """Process ids of the workers of one service (``--service-name``) under ``bentoml serve``."""
    import psutil

    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            args = c.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--service-name" in args and args[args.index("--service-name") + 1] == service_name:
            out.append(c.pid)
    return out


# --- nginx in front of replicas ---------------------------------------------------------
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf"


def render_nginx_conf(listen_port: int, upstream_ports: list[int], run_dir: Path) -> Path:
    """Write ``deploy/nginx.conf`` with the ports and a private prefix filled in; returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstream_ports)
    text = NGINX_TEMPLATE.read_text()
    start, end = text.index("    # BEGIN upstreams"), text.index("    # END upstreams")
    text = text[:start] + "    # BEGIN upstreams\n" + servers + "\n" + text[end:]
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};").replace("/tmp/shoprec-nginx", str(run_dir))
    path = run_dir / "nginx.conf"
    path.write_text(text)
    return path


def nginx_command(conf: Path, run_dir: Path) -> list[str]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(exe).exists():
        raise RuntimeError("nginx is not installed: apt-get install nginx (or `make install`)")
    return [exe, "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "error.log"), "-g", "daemon off;"]


@contextmanager
def nginx_running(listen_port: int, upstream_ports: list[int], run_dir: Path):
    conf = render_nginx_conf(listen_port, upstream_ports, run_dir)
    with localstack.running(nginx_command(conf, run_dir), listen_port, run_dir / "nginx.out") as proc:
        yield proc


# --- `make up-lb` / `make down-lb` ---------------------------------------------------------
LB_PORT = 8080
REPLICA_PORTS = (3101, 3102)


def up_lb(var_dir: Path, lb_port: int = LB_PORT, ports: tuple[int, ...] = REPLICA_PORTS) -> None:
    """Start ``bentoml serve`` replicas and nginx in front of them, in the background (pids in ``var/lb``)."""
    run_dir = (var_dir / "lb").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pids = {}
    for port in ports:
        log = open(run_dir / f"replica-{port}.log", "ab")
        proc = subprocess.Popen(serve_command(port), cwd=ROOT, env=local_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        pids[f"replica-{port}"] = proc.pid
    for port in ports:
        wait_ready(f"http://127.0.0.1:{port}", 120)
    conf = render_nginx_conf(lb_port, list(ports), run_dir)
    nginx = subprocess.Popen(nginx_command(conf, run_dir), stdout=open(run_dir / "nginx.out", "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    localstack.wait_port(lb_port, proc=nginx)
    pids["nginx"] = nginx.pid
    (run_dir / "pids.json").write_text(json.dumps(pids))
    print(f"{len(ports)} replicas behind nginx: http://127.0.0.1:{lb_port}/recommend (logs in {run_dir})")


def down_lb(var_dir: Path) -> None:
    """Stop exactly what :func:`up_lb` started (by the pids it wrote)."""
    import psutil

    pid_file = var_dir / "lb" / "pids.json"
    if not pid_file.exists():
        print("nothing to stop (no var/lb/pids.json)")
        return
    procs = []
    for pid in json.loads(pid_file.read_text()).values():
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
    pid_file.unlink()
    print(f"stopped {len(procs)} processes")


if __name__ == "__main__":
    from pipelines.settings import get_settings

    {"up-lb": up_lb, "down-lb": down_lb}[sys.argv[1]](get_settings().var_dir)
