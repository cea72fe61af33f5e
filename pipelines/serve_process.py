"""Run ``bentoml serve`` (and nginx in front of replicas) as child processes: tests, benchmarks, ``make up-lb``.

Only subprocesses here, so :mod:`pipelines` stays free of BentoML imports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
# Set in the environment of every process up_lb starts (BentoML's workers inherit it; nginx's master keeps it):
# down_lb finds a replica's workers by it even after their `bentoml serve` parent died.
LB_MARK = "SHOPREC_LB_RUN_DIR"
LB_ROLE = "SHOPREC_LB_ROLE"


class LBError(RuntimeError):
    """``make up-lb`` cannot go on; the message says why and what to do."""


def _lb_state(run_dir: Path) -> dict:
    """``pids.json`` as ``{"lb_port": int | None, "replicas": {port: pid}, "nginx": pid | None}``.

    Reads the older flat format (``{"replica-3101": pid, "nginx": pid}``) too.
    """
    state: dict = {"lb_port": None, "replicas": {}, "nginx": None}
    path = run_dir / "pids.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return state
    except ValueError:
        return state  # a torn or hand-edited file: the port sweep still finds what runs
    if "replicas" in raw:
        state["lb_port"] = raw.get("lb_port")
        state["replicas"] = {int(k): int(v) for k, v in (raw.get("replicas") or {}).items()}
        state["nginx"] = raw.get("nginx")
    else:
        state["lb_port"] = LB_PORT
        state["replicas"] = {int(k.split("-", 1)[1]): int(v) for k, v in raw.items() if k.startswith("replica-")}
        state["nginx"] = raw.get("nginx")
    return state


def _save_lb_state(run_dir: Path, state: dict) -> None:
    path = run_dir / "pids.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"lb_port": state["lb_port"], "nginx": state["nginx"],
                               "replicas": {str(k): v for k, v in sorted(state["replicas"].items())}}))
    os.replace(tmp, path)


def _cmd(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _is_ours_kind(cmd: str) -> bool:
    return "bentoml" in cmd or "nginx" in cmd


def _alive(pid: int | None, kind: str | None = None):
    """The psutil process ``pid`` when it runs (and its command line mentions ``kind``, against reused pids)."""
    import psutil

    if not pid:
        return None
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    cmd = _cmd(p)
    if not (_is_ours_kind(cmd) if kind is None else kind in cmd):
        return None
    return p


def _listeners(ports) -> dict[int, list]:
    """Every process listening on each of ``ports`` (processes sharing one socket, like BentoML's workers, all
    count)."""
    import psutil

    want = set(ports)
    out: dict[int, dict[int, object]] = {port: {} for port in want}
    for p in psutil.process_iter():
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in want:
                out[c.laddr.port][p.pid] = p
    return {port: list(procs.values()) for port, procs in out.items()}


def _marked(run_dir: Path, role: str | None = None) -> list:
    """Processes started by :func:`up_lb` for ``run_dir`` (by the mark in their environment), orphans included."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if not _is_ours_kind(_cmd(p)):
                continue
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get(LB_MARK) == str(run_dir) and (role is None or env.get(LB_ROLE) == role):
            out.append(p)
    return out


def _ours(p, run_dir: Path, recorded: set[int]) -> bool:
    """Whether ``p`` is a process of ``make up-lb`` (also an orphaned worker of one, or one of an older up-lb)."""
    import psutil

    try:
        cmd = _cmd(p)
        if not _is_ours_kind(cmd):
            return False
        if p.pid in recorded or any(a.pid in recorded for a in p.parents()):
            return True
        if p.cwd() in (str(ROOT), str(run_dir)):
            return True
        return p.environ().get(LB_MARK) == str(run_dir)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _with_children(procs) -> list:
    import psutil

    seen: dict[int, object] = {}
    for p in procs:
        try:
            for q in [p, *p.children(recursive=True)]:
                seen.setdefault(q.pid, q)
        except psutil.NoSuchProcess:
            continue
    return list(seen.values())


def _stop(procs, timeout: float = 15.0) -> int:
    """SIGTERM ``procs``, SIGKILL what still runs after ``timeout``; returns how many were running."""
    import psutil

    running = []
    for p in procs:
        try:
            p.terminate()
            running.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(running, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(running)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and nginx bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _describe(procs) -> str:
    return "; ".join(f"pid {p.pid} ({_cmd(p)[:120] or '?'})" for p in procs)


def _busy_error(port: int, what: str, foreign) -> LBError:
    if foreign:
        held = f"held by {_describe(foreign)}"
    else:
        held = "in use (no listening process found: another user's, or a socket still closing)"
    return LBError(f"port {port} (for {what}) is {held}, which is not a shoprec replica started by `make up-lb`. "
                   f"Stop that process, or, if it is a leftover of an earlier up-lb, run `make down-lb` first.")


def _log_tail(*paths: Path, chars: int = 3000) -> str:
    parts = []
    for path in paths:
        try:
            parts.append(f"--- {path} ---\n" + path.read_text(errors="replace")[-chars:])
        except FileNotFoundError:
            pass
    return "\n".join(parts)


def _in_tree(p, pid: int) -> bool:
    """Whether ``p`` is process ``pid`` or one of its descendants."""
    import psutil

    try:
        return p.pid == pid or pid in {a.pid for a in p.parents()}
    except psutil.NoSuchProcess:
        return False


def _holds_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or one of its children) listens on ``port``."""
    return any(_in_tree(p, pid) for p in _listeners([port])[port])


def _confirm_started(proc: subprocess.Popen, port: int, wait, what: str, logs) -> None:
    """Run ``wait()`` (readiness of ``proc``), then check that ``proc`` itself holds ``port`` (not a leftover that
    answered for it); :class:`LBError` with ``logs()`` (its log tail and what to do) when either fails."""
    try:
        wait()
        if not _holds_port(proc.pid, port):
            raise RuntimeError(f"something else answers on port {port}")
    except (RuntimeError, TimeoutError) as err:
        raise LBError(f"{what} (pid {proc.pid}) failed: {err}. {logs()}") from None


def _ready(port: int, tries: int = 3) -> bool:
    """Whether ``/readyz`` answers 200 (a few tries: a busy replica may miss one)."""
    for i in range(tries):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if i < tries - 1:
            time.sleep(1)
    return False


def _serve_parent(procs, port: int):
    """The ``bentoml serve`` parent among the processes listening on ``port`` (not a worker), if any."""
    for p in procs:
        args = _cmd(p).split()
        if "serve" in args and "--port" in args and args[args.index("--port") + 1] == str(port):
            return p
    return None


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
    """Start ``bentoml serve`` replicas and nginx in front of them, in the background (pids in ``var/lb``).

    Idempotent and repairing: a ready replica (or a live nginx) of an earlier call is kept, a free port gets a new
    one, leftovers of ours (a replica whose ``bentoml serve`` died and left its workers serving, one not ready) are
    stopped and replaced; a port held by anything else is an :class:`LBError`. Returns what it did:
    ``{"replicas": {port: ("kept" | "started", pid)}, "nginx": ("kept" | "started", pid)}``.
    """
    run_dir = (var_dir / "lb").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = tuple(int(p) for p in ports)
    with _lb_lock(run_dir):
        return _up_lb(run_dir, int(lb_port), ports, timeout)


def _up_lb(run_dir: Path, lb_port: int, ports: tuple[int, ...], timeout: float) -> dict:
    old = _lb_state(run_dir)
    recorded = {pid for pid in [*old["replicas"].values(), old["nginx"]] if pid}
    # merged state: live entries of earlier calls stay recorded (down-lb stops them), dead ones are dropped
    state = {"lb_port": lb_port, "nginx": old["nginx"] if _alive(old["nginx"], "nginx") else None,
             "replicas": {port: pid for port, pid in old["replicas"].items() if _alive(pid, "bentoml")}}
    if old["lb_port"] and old["lb_port"] != lb_port and state["nginx"]:
        state["lb_port"] = old["lb_port"]  # that nginx still listens there; it is replaced below
    _save_lb_state(run_dir, state)
    held = _listeners([*ports, lb_port])

    # 1. decide for every port first, so a foreign holder stops us before anything starts
    plan: dict[int, str] = {}
    leftovers: dict[int, list] = {}
    for port in ports:
        procs = held[port]
        parent = _serve_parent(procs, port)
        if parent is not None and SERVICE in _cmd(parent) and _ready(port):
            plan[port] = "kept"
            state["replicas"][port] = parent.pid
            continue
        foreign = [p for p in procs if not _ours(p, run_dir, recorded)]
        if foreign or (not procs and not _port_free(port)):
            raise _busy_error(port, f"replica {port}", foreign)
        plan[port] = "start"
        leftovers[port] = procs
    nginx_old = _alive(state["nginx"], "nginx")
    nginx_procs = held[lb_port]
    if nginx_old is not None and any(_in_tree(p, nginx_old.pid) for p in nginx_procs):
        nginx_plan = "kept"
    else:
        foreign = [p for p in nginx_procs if not _ours(p, run_dir, recorded)]
        if foreign or (not nginx_procs and not _port_free(lb_port)):
            raise _busy_error(lb_port, "nginx", foreign)
        nginx_plan = "start"
    _save_lb_state(run_dir, state)

    # 2. clear leftovers of ours: orphaned workers of a killed `bentoml serve`, a replica that is not ready
    for port in ports:
        if plan[port] != "start":
            continue
        stale = _with_children(leftovers[port] + _marked(run_dir, f"replica-{port}"))
        old_pid = state["replicas"].pop(port, None)
        if _alive(old_pid, "bentoml"):
            stale = _with_children(stale + [_alive(old_pid, "bentoml")])
        if stale:
            what = _describe(stale)[:400]
            n = _stop(stale)
            print(f"replica {port}: no ready `bentoml serve` of ours there; stopped {n} leftover processes "
                  f"({what})", flush=True)
        _save_lb_state(run_dir, state)
        if not _port_free(port):
            raise _busy_error(port, f"replica {port}", [p for p in _listeners([port])[port]])

    # 3. start the replicas that are missing (all at once), recording each pid as soon as it runs
    started: dict[int, subprocess.Popen] = {}
    for port in ports:
        if plan[port] == "start":
            env = {**local_env(), LB_MARK: str(run_dir), LB_ROLE: f"replica-{port}"}
            with open(run_dir / f"replica-{port}.log", "ab") as log:
                proc = subprocess.Popen(serve_command(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            started[port] = proc
            state["replicas"][port] = proc.pid
            _save_lb_state(run_dir, state)
        else:
            print(f"replica {port} already running (pid {state['replicas'][port]})", flush=True)
    for port, proc in started.items():
        log_path = run_dir / f"replica-{port}.log"
        _confirm_started(proc, port, lambda: wait_ready(f"http://127.0.0.1:{port}", timeout, proc), f"replica {port}",
                         lambda: f"Its log ({log_path}) ends:\n{_log_tail(log_path)}\nWhat up-lb started is recorded "
                                 f"in {run_dir / 'pids.json'}: `make down-lb` stops it.")
        print(f"replica {port} started (pid {proc.pid})", flush=True)

    # 4. nginx in front of them
    conf_path = run_dir / "nginx.conf"
    before = conf_path.read_text() if conf_path.exists() else None
    conf = render_nginx_conf(lb_port, list(ports), run_dir)
    if nginx_plan == "kept":
        if conf.read_text() != before:
            nginx_old.send_signal(signal.SIGHUP)  # the upstream list changed: nginx re-reads its configuration
        print(f"nginx already running (pid {nginx_old.pid})", flush=True)
        nginx_pid = nginx_old.pid
    else:
        stale = [p for p in nginx_procs if _alive(p.pid)] + _marked(run_dir, "nginx")
        if state["nginx"] and _alive(state["nginx"], "nginx"):
            stale.append(_alive(state["nginx"], "nginx"))  # a recorded nginx on another port
        stale = _with_children(stale)
        if stale:
            what = _describe(stale)[:400]
            n = _stop(stale)
            print(f"nginx: stopped {n} leftover processes ({what})", flush=True)
        state["nginx"] = None
        _save_lb_state(run_dir, state)
        if not _port_free(lb_port):
            raise _busy_error(lb_port, "nginx", _listeners([lb_port])[lb_port])
        with open(run_dir / "nginx.out", "ab") as out:
            nginx = subprocess.Popen(nginx_command(conf, run_dir), cwd=run_dir,
                                     env={**os.environ, LB_MARK: str(run_dir), LB_ROLE: "nginx"},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        state["nginx"], state["lb_port"] = nginx.pid, lb_port
        _save_lb_state(run_dir, state)
        health = f"http://127.0.0.1:{lb_port}/lb-health"
        logs = (run_dir / "error.log", run_dir / "nginx.out")
        _confirm_started(nginx, lb_port, lambda: localstack.wait_http(health, 30, nginx), "nginx",
                         lambda: f"Its logs end:\n{_log_tail(*logs)}\n`make down-lb` stops what up-lb started.")
        print(f"nginx started (pid {nginx.pid})", flush=True)
        nginx_pid = nginx.pid
    state["lb_port"] = lb_port
    _save_lb_state(run_dir, state)

    kept = [str(p) for p in ports if plan[p] == "kept"]
    new = [str(p) for p in ports if plan[p] == "start"]
    done = "; ".join(x for x in (f"kept {', '.join(kept)}" if kept else "", f"started {', '.join(new)}" if new else "")
                     if x)
    print(f"{len(ports)} replicas ({done}) behind nginx ({nginx_plan if nginx_plan == 'kept' else 'started'}): "
          f"http://127.0.0.1:{lb_port}/recommend (logs in {run_dir})")
    return {"replicas": {p: (plan[p] if plan[p] == "kept" else "started", state["replicas"][p]) for p in ports},
            "nginx": (nginx_plan if nginx_plan == "kept" else "started", nginx_pid)}


def down_lb(var_dir: Path, lb_port: int | None = None, ports: tuple[int, ...] | None = None) -> int:
    """Stop everything :func:`up_lb` started; returns how many processes it stopped.

    That is the recorded pids and their children, processes carrying up-lb's mark for this var dir, and any
    bentoml or nginx process listening on the replica ports or the LB port (workers orphaned when their
    ``bentoml serve`` died). The ports are the recorded ones plus ``lb_port``/``ports``; with no ``pids.json``
    and none given, the defaults (8080, 3101, 3102). Other processes on those ports are left alone.
    """
    run_dir = (var_dir / "lb").resolve()
    pid_file = run_dir / "pids.json"
    state = _lb_state(run_dir)
    sweep = set(state["replicas"]) | ({state["lb_port"]} if state["lb_port"] else set())
    sweep |= set(ports or ()) | ({lb_port} if lb_port else set())
    if not pid_file.exists() and ports is None and lb_port is None:
        sweep |= {LB_PORT, *REPLICA_PORTS}
    procs = [p for p in (_alive(pid) for pid in [*state["replicas"].values(), state["nginx"]]) if p]
    procs += _marked(run_dir) if run_dir.exists() else []
    skipped = []
    for holders in _listeners(sweep).values():
        for p in holders:
            (procs if _is_ours_kind(_cmd(p)) else skipped).append(p)
    n = _stop(_with_children(procs))
    pid_file.unlink(missing_ok=True)
    if n:
        print(f"stopped {n} processes (replicas and nginx of up-lb)")
    else:
        print("nothing was running")
    if skipped:
        print(f"left alone (not bentoml or nginx): {_describe(skipped)}")
    return n


if __name__ == "__main__":
    from pipelines.settings import get_settings

    try:
        {"up-lb": up_lb, "down-lb": down_lb}[sys.argv[1]](get_settings().var_dir)
    except LBError as err:
        print(f"{sys.argv[1]}: {err}", file=sys.stderr)
        sys.exit(1)
