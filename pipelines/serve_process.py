"""Run ``bentoml serve`` (and nginx in front of replicas) as child processes: tests, benchmarks, ``make up-lb``
(under a supervisord of its own, :mod:`pipelines.stack`'s pieces).

Only subprocesses here, so :mod:`pipelines` stays free of BentoML imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx

from pipelines import localstack, stack
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
    home = tempfile.TemporaryDirectory(prefix="shoprec-serve-")
    full_env = {**os.environ, **stack.own_home(port, Path(home.name)), **(env or {})}
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
        home.cleanup()
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


# --- `make up-lb` / `make down-lb`: replicas and nginx under a supervisord of their own in var/lb/ -------------
LB_PORT = 8080
REPLICA_PORTS = (3101, 3102)
#: set in the environment of up-lb's supervisord, so of every replica and its workers: marks them as ours, also once
#: orphaned (nginx overwrites its environment with its title: it runs in var/lb/ instead, see :func:`_is_ours`).
#: Not SHOPREC_*: the settings warn about such variables that are not settings (the earlier up-lb's mark was one).
LB_MARK, OLD_MARK = "UP_LB_RUN_DIR", "SHOPREC_LB_RUN_DIR"
LB_FIX = "stop it (or, if it is left over from an earlier up-lb, run `make down-lb`) and run `make up-lb` again"


class LBError(RuntimeError):
    """``make up-lb`` cannot go on; the message says why and what to do."""


def lb_programs(run_dir: Path, lb_port: int, ports: tuple[int, ...]) -> list[stack.Program]:
    """A ``bentoml serve`` replica on each of ``ports`` and nginx on ``lb_port`` (started once they are ready)."""
    replicas = [stack.Program(f"replica-{port}", _launched(serve_command(port)), f"http://127.0.0.1:{port}",
                              f"http:http://127.0.0.1:{port}/readyz", env=stack.own_home(port, run_dir)) for port in ports]
    nginx = stack.Program("nginx", _launched(nginx_command(run_dir / "nginx.conf", run_dir)),
                          f"http://127.0.0.1:{lb_port}/recommend", f"http:http://127.0.0.1:{lb_port}/lb-health",
                          200, needs=tuple(r.name for r in replicas), directory=run_dir)
    return [*replicas, nginx]


def _launched(cmd: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipelines.serve_process", "lb-exec", *cmd]


def lb_exec(cmd: list[str]):
    """What supervisord runs for each program of up-lb: stop the orphans of ours, then become ``cmd`` (the same pid,
    so supervisord signals ``cmd`` itself).

    A SIGKILLed ``bentoml serve`` leaves its workers running and serving on its port (they run in sessions of their
    own, out of reach of supervisord's stopasgroup; a SIGKILLed nginx master leaves its workers too): the replacement
    supervisord starts could not bind the port while the orphans served on. An orphan is a process of this up-lb
    (:func:`_is_ours`) whose parent is not one, other than the supervisord; nothing else is touched.
    """
    import psutil

    ours = _ours(Path(os.environ[LB_MARK]))
    pids = {p.pid for p in ours}
    orphans = []
    for p in ours:
        try:
            if p.pid != os.getppid() and p.ppid() not in pids:
                orphans.append(p)
        except psutil.NoSuchProcess:
            pass
    if orphans:
        print(f"stopping what a killed process of up-lb left running: {_describe(orphans)[:600]}", flush=True)
        _stop(orphans)
    os.execv(cmd[0], cmd)


def _is_ours(p, run_dir: Path) -> bool:
    """Whether ``p`` belongs to the up-lb of ``run_dir``: it carries :data:`LB_MARK` (supervisord, the replicas and
    their workers, orphaned or not), or it is nginx working in ``run_dir``."""
    import psutil

    try:
        if p.name() == "nginx":
            return p.cwd() == str(run_dir)
        env = p.environ()
        return str(run_dir) in (env.get(LB_MARK), env.get(OLD_MARK))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _ours(run_dir: Path) -> list:
    import psutil

    return [p for p in psutil.process_iter() if _is_ours(p, run_dir)]


def _describe(procs) -> str:
    import psutil

    def cmd(p) -> str:
        try:
            return " ".join(p.cmdline())[:120] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return "?"

    return "; ".join(f"pid {p.pid} ({cmd(p)})" for p in procs)


def _stop(procs, timeout: float = 15.0) -> None:
    """SIGTERM ``procs``, SIGKILL what still runs after ``timeout``."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _log_tail(*paths: Path, chars: int = 3000) -> str:
    parts = []
    for path in paths:
        try:
            parts.append(f"--- {path} ---\n" + path.read_text(errors="replace")[-chars:])
        except FileNotFoundError:
            pass
    return "\n".join(parts)


@contextmanager
def _lb_lock(run_dir: Path):
    """One ``make up-lb`` at a time per var dir: a second one waits, then finds the first one's replicas."""
    import fcntl

    with open(run_dir / "up-lb.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another `make up-lb` is running: waiting for it to finish", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def up_lb(var_dir: Path, lb_port: int = LB_PORT, ports: tuple[int, ...] = REPLICA_PORTS,
          timeout: float = 120.0) -> dict:
    """Start ``bentoml serve`` replicas and nginx in front of them under a supervisord in ``var/lb`` (which restarts
    any that dies) and wait until nginx answers.

    Idempotent and repairing: what runs is kept (nginx re-reads its config when the port list changed), what is
    stopped or missing is started, replicas no longer listed are stopped; when the supervisord itself is gone, what
    it left running is stopped first. A port held by anything else is an :class:`LBError` before anything starts.
    Returns ``{"replicas": {port: ("kept" | "started", pid)}, "nginx": ("kept" | "started", pid)}``.
    """
    run_dir = (var_dir / "lb").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    conf, lb_port, ports = run_dir / "supervisord.conf", int(lb_port), tuple(int(p) for p in ports)
    progs = lb_programs(run_dir, lb_port, ports)
    echo = partial(print, flush=True)
    with _lb_lock(run_dir):
        up = stack.running(conf)
        if not up and (left := _ours(run_dir)):  # a killed supervisord leaves its programs running
            echo(f"up-lb's supervisord is gone: stopping what it left running ({_describe(left)[:400]})")
            _stop(left)
        if busy := stack.port_conflicts(progs, {p.pid for p in _ours(run_dir)}, LB_FIX):
            raise LBError("\n".join(busy))
        infos = stack.rpc(conf).getAllProcessInfo() if up else []
        before = {i["name"]: i["pid"] for i in infos if i["statename"] == "RUNNING"}
        old_nginx = (run_dir / "nginx.conf").read_text() if (run_dir / "nginx.conf").exists() else None
        nginx_changed = render_nginx_conf(lb_port, list(ports), run_dir).read_text() != old_nginx
        stack.write_config(conf, progs, ROOT)
        if up:
            stack.ctl(conf, "update")  # starts added replicas, stops removed ones, restarts changed programs
            if nginx_changed and stack.rpc(conf).getProcessInfo("nginx")["pid"] == before.get("nginx"):
                stack.rpc(conf).signalProcess("nginx", "HUP")  # the same nginx re-reads its upstreams
        else:
            stack.start_supervisord(conf, {**local_env(), LB_MARK: str(run_dir)})
        pending = stack.start_in_order(progs, conf, timeout, echo)
    if pending:
        logs = [run_dir / "log" / f"{name}.log" for name in sorted(pending)]
        raise LBError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}. Logs end:\n"
                      f"{_log_tail(*logs, *([run_dir / 'error.log'] if 'nginx' in pending else []))}\n"
                      "`make down-lb` stops what up-lb started.")
    pids = {i["name"]: i["pid"] for i in stack.rpc(conf).getAllProcessInfo()}
    how = {p.name: "kept" if before.get(p.name) == pids[p.name] else "started" for p in progs}
    for p in progs:
        echo(f"{p.name.replace('-', ' ')} {'already running' if how[p.name] == 'kept' else 'started'} "
             f"(pid {pids[p.name]})")
    done = "; ".join(f"{h} {', '.join(str(p) for p in ports if how[f'replica-{p}'] == h)}"
                     for h in ("kept", "started") if h in [how[f"replica-{p}"] for p in ports])
    echo(f"{len(ports)} replicas ({done}) behind nginx ({how['nginx']}): http://127.0.0.1:{lb_port}/recommend "
         f"(logs in {run_dir / 'log'}; `make status-lb` shows what runs)")
    echo(stack.table(progs, conf))
    if missing := unreachable_services():
        echo(f"warning: the replicas cannot reach {'; '.join(missing)}. Until they can, /recommend answers with the "
             "fallback (popular items, no model) and /events answers 503: start them with `make up`, or point "
             "SHOPREC_REDIS_URL, SHOPREC_KAFKA_BOOTSTRAP and MLFLOW_TRACKING_URI at yours")
    return {"replicas": {p: (how[f"replica-{p}"], pids[f"replica-{p}"]) for p in ports},
            "nginx": (how["nginx"], pids["nginx"])}


def unreachable_services() -> list[str]:
    """The services a replica needs (Redis, Kafka, an MLflow server) that do not answer, each with its address."""
    from urllib.parse import urlparse

    from pipelines.settings import get_settings

    s = get_settings()
    redis, mlflow = urlparse(s.redis_url), urlparse(s.mlflow_tracking_uri)
    kafka = s.kafka_bootstrap.split(",")[0].strip().rsplit(":", 1)
    checks = [("Redis", s.redis_url, f"tcp:{redis.hostname or 'localhost'}:{redis.port or 6379}"),
              ("Kafka", s.kafka_bootstrap, f"tcp:{kafka[0] or 'localhost'}:{kafka[1] if len(kafka) > 1 else 9092}")]
    if mlflow.scheme in ("http", "https"):  # a file or database store needs no server
        checks.append(("MLflow", s.mlflow_tracking_uri, f"http:{s.mlflow_tracking_uri.rstrip('/')}/health"))
    return [f"{name} at {address}" for name, address, health in checks
            if not stack.probe(stack.Program(name, [], address, health))]


def down_lb(var_dir: Path) -> int:
    """Stop everything :func:`up_lb` started, also when its supervisord is gone; returns how many processes ran.

    supervisord stops its programs (SIGTERM, SIGKILL after 15 s, to each one's process group) and exits; whatever of
    ours is left (workers orphaned by a SIGKILLed ``bentoml serve``, everything when supervisord was killed) is
    found by :func:`_is_ours` and stopped. Nothing else is touched, whatever port it holds.
    """
    run_dir = (var_dir / "lb").resolve()
    procs = _ours(run_dir)
    stack.shutdown(run_dir / "supervisord.conf")
    left = _ours(run_dir)
    _stop(left)
    n = len({p.pid for p in procs + left})
    print(f"stopped {n} processes (supervisord, replicas and nginx of up-lb)" if n else "nothing was running")
    return n


def status_lb(var_dir: Path) -> str:
    conf = (var_dir / "lb").resolve() / "supervisord.conf"
    if not stack.running(conf):
        return "up-lb is not running (start it with `make up-lb`)"
    return stack.ctl(conf, "status").stdout.rstrip()


if __name__ == "__main__":
    if sys.argv[1] == "lb-exec":
        lb_exec(sys.argv[2:])
    from pipelines.settings import get_settings

    try:
        var = get_settings().var_dir
        if sys.argv[1] == "status-lb":
            print(status_lb(var))
            sys.exit(0 if stack.running((var / "lb").resolve() / "supervisord.conf") else 1)  # as `make status`
        else:
            {"up-lb": up_lb, "down-lb": down_lb}[sys.argv[1]](var)
    except LBError as err:
        print(f"{sys.argv[1]}: {err}", file=sys.stderr)
        sys.exit(1)
