"""The local stack under supervisord: render its config, start, wait for health, stop, show status.

``make up`` / ``make down`` / ``make status`` call ``shoprec stack up|down|status``.
Everything lives under ``var/``: config, logs, pid files, data. Kafka and Redis
are started only when their addresses are the local defaults; point
``SHOPREC_KAFKA_BOOTSTRAP`` / ``SHOPREC_REDIS_URL`` elsewhere to use real ones. ``make up-lb`` runs its
replicas and nginx under a supervisord of its own with these pieces (:mod:`pipelines.serve_process`).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from pipelines.localstack import broker_command, mlflow_command, redis_command
from pipelines.settings import LOCAL_API_KEY, Settings, local_env

DEFAULT_KAFKA = "localhost:9092"
DEFAULT_REDIS = "redis://localhost:6379/0"
DAGSTER_YAML = """\
# The Dagster instance of `make up` (DAGSTER_HOME is this folder): runs, event logs and schedules in SQLite
# here, the defaults. Written once; edit it freely (https://docs.dagster.io/deployment/dagster-instance).
telemetry:
  enabled: false
"""
#: every program of the stack: logs as they happen, and no progress bars of MLflow's artifact downloads in them
PROGRAM_ENV = {"PYTHONUNBUFFERED": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@dataclass
class Program:
    name: str
    command: list[str]
    url: str  # what a person opens, or the address
    health: str  # "tcp:HOST:PORT", "http:URL" or "proc"
    priority: int = 100
    env: dict[str, str] | None = None
    #: programs of the stack that must pass their health check before this one starts (those run elsewhere,
    #: such as a Kafka or MLflow the settings point at, are not waited for)
    needs: tuple[str, ...] = ()
    directory: Path | None = None  # its working directory (default: supervisord's, the repository root)


def own_home(port: int, under: Path) -> dict[str, str]:
    """The environment that gives the server on ``port`` a BentoML home of its own, ``under/bentoml-<port>``.

    BentoML keeps each server's Prometheus counters in files under ``$BENTOML_HOME/prometheus_multiproc_dir``, and
    every ``bentoml serve`` empties that folder as it starts: two servers sharing a home (the stack's and up-lb's
    replicas, or a test's beside the stack) would delete each other's files, and ``/metrics`` would then show the
    newest server's counts on every port, or counts that no longer move. Serving from source needs nothing else
    from the home (no BentoML model store: models come from MLflow or a packaged champion).
    """
    return {"BENTOML_HOME": str(Path(under) / f"bentoml-{port}")}


def programs(settings: Settings, root: Path) -> list[Program]:
    var = (root / settings.var_dir).resolve()
    bin_dir = Path(sys.executable).parent
    progs: list[Program] = []
    if settings.kafka_bootstrap == DEFAULT_KAFKA:
        progs.append(Program("broker", broker_command(9092), "kafka://localhost:9092", "tcp:127.0.0.1:9092", 10))
    if settings.redis_url == DEFAULT_REDIS:
        (var / "redis").mkdir(parents=True, exist_ok=True)
        progs.append(Program("redis", redis_command(6379, var / "redis", persist=True), "redis://localhost:6379",
                             "tcp:127.0.0.1:6379", 10))
    mlflow_port = urlparse(settings.mlflow_tracking_uri).port or 5000
    if urlparse(settings.mlflow_tracking_uri).hostname in ("127.0.0.1", "localhost"):
        (var / "mlflow").mkdir(parents=True, exist_ok=True)
        progs.append(Program("mlflow", mlflow_command(mlflow_port, var / "mlflow"),
                             f"http://localhost:{mlflow_port}", f"http:http://127.0.0.1:{mlflow_port}/health", 20))
    (var / "dagster").mkdir(parents=True, exist_ok=True)
    instance = var / "dagster" / "dagster.yaml"
    if not instance.exists():  # the instance's defaults (storage under DAGSTER_HOME), said, not warned about
        instance.write_text(DAGSTER_YAML)
    progs += [
        Program("dagster", [str(bin_dir / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", "3000"],
                "http://localhost:3000", "http:http://127.0.0.1:3000/server_info", 30, needs=("mlflow",),
                env={"DAGSTER_HOME": str(var / "dagster"),  # `make up` runs the cadence unless told otherwise
                     "SHOPREC_CADENCE_ON": os.environ.get("SHOPREC_CADENCE_ON", "true")}),
        Program("bentoml", [str(bin_dir / "bentoml"), "serve", "bentos.service:Shoprec", "--host", "127.0.0.1",
                            "--port", "3001"],
                "http://localhost:3001", "http:http://127.0.0.1:3001/readyz", 30, needs=("broker", "redis", "mlflow"),
                env=own_home(3001, var)),
        Program("dashboard", [str(bin_dir / "streamlit"), "run", "dashboard/streamlit_app.py", "--server.port",
                              "8501", "--server.headless", "true", "--server.address", "127.0.0.1",
                              "--browser.gatherUsageStats", "false"],
                "http://localhost:8501", "http:http://127.0.0.1:8501/_stcore/health", 30, needs=("redis", "mlflow")),
        Program("consumer", [str(bin_dir / "shoprec"), "consume"], "(stream consumer)", "proc", 40, needs=("broker", "redis")),
        Program("catalog", [str(bin_dir / "shoprec"), "catalog", "sync"], "(catalog feed → catalog file)", "proc", 45,
                needs=("broker",)),
        Program("simulator", [str(bin_dir / "shoprec"), "simulate", "--rate", "20", "--closed-loop"],
                "(shop simulator, 20 events/s)", "proc", 50, needs=("broker", "bentoml")),
    ]
    here = {p.name for p in progs}
    for p in progs:
        p.needs = tuple(n for n in p.needs if n in here)
    return progs


def render_config(settings: Settings, root: Path, progs: list[Program] | None = None) -> Path:
    """Write ``var/supervisord.conf`` for ``progs`` (default: :func:`programs`)."""
    var = (root / settings.var_dir).resolve()
    return write_config(var / "supervisord.conf", programs(settings, root) if progs is None else progs, root)


def write_config(conf: Path, progs: list[Program], root: Path) -> Path:
    """Write a supervisord config at ``conf``: its socket and pid file beside it, logs in ``log/`` beside it.

    A program that needs others is not started by supervisord itself (``autostart=false``): :func:`start_in_order`
    starts it once they are healthy.
    """
    var = conf.parent
    (var / "log").mkdir(parents=True, exist_ok=True)
    lines = [
        "[supervisord]", f"logfile={var}/log/supervisord.log", f"pidfile={var}/supervisord.pid",
        f"directory={root.resolve()}", "nodaemon=false", "",
        "[unix_http_server]", f"file={var}/supervisor.sock", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{var}/supervisor.sock", "",
    ]
    for p in progs:
        env = {**PROGRAM_ENV, **(p.env or {})}
        lines += [
            f"[program:{p.name}]", f"command={shlex.join(p.command)}", f"priority={p.priority}",
            *([f"directory={p.directory}"] if p.directory else []),
            f"autostart={'false' if p.needs else 'true'}", "autorestart=true", "startsecs=2", "startretries=20", "stopasgroup=true", "killasgroup=true",
            "stopwaitsecs=15", f"stdout_logfile={var}/log/{p.name}.log", "redirect_stderr=true",
            "environment=" + ",".join(f'{k}="{v}"' for k, v in env.items()), "",
        ]
    conf.write_text("\n".join(lines))
    return conf


def start_supervisord(conf: Path, env: dict[str, str]) -> None:
    """Start the supervisord of ``conf`` in the background; its programs inherit ``env``."""
    exe = Path(sys.executable).parent / "supervisord"
    subprocess.run([str(exe), "-c", str(conf)], check=True, env=env)


def ctl(conf: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "supervisorctl"
    return subprocess.run([str(exe), "-c", str(conf), *args], capture_output=True, text=True, check=check)


def running(conf: Path) -> bool:
    return conf.exists() and ctl(conf, "pid").returncode == 0 and ctl(conf, "pid").stdout.strip().isdigit()


def rpc(conf: Path):
    """supervisord's XML-RPC interface on the stack's socket (what supervisorctl talks to, without a process per call)."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{conf.parent / 'supervisor.sock'}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def states(conf: Path) -> dict[str, str]:
    """Each program's supervisor state (``RUNNING``, ``STARTING``, ``STOPPED``, ``BACKOFF``, ``FATAL`` ...)."""
    return {info["name"]: info["statename"] for info in rpc(conf).getAllProcessInfo()}


def probe(p: Program) -> bool:
    """Whether ``p.health`` answers: a TCP connection, or an HTTP status below 400 (``proc``: always)."""
    kind, _, target = p.health.partition(":")
    if kind == "tcp":
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False
    if kind == "http":
        try:
            return httpx.get(target, timeout=2).status_code < 400  # another server on the port answers 404
        except httpx.HTTPError:
            return False
    return True


def port_of(p: Program) -> int | None:
    """The TCP port ``p`` listens on (from its health check), or None for a process without one."""
    kind, _, target = p.health.partition(":")
    if kind == "tcp":
        return int(target.rsplit(":", 1)[1])
    return urlparse(target).port if kind == "http" else None


def listeners(port: int) -> list[int]:
    """Pids of the processes listening on TCP ``port`` (several when they share a socket, like BentoML's workers;
    only those this user may see)."""
    import psutil

    return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid})


def port_conflicts(progs: list[Program], ours: Collection[int] = (),
                   fix: str = "stop it (or the shoprec stack of another checkout, `make down` there) and run "
                              "`make up` again") -> list[str]:
    """For each program whose port something else (not a pid in ``ours``) listens on: what holds it and ``fix``."""
    import psutil

    busy = []
    for p in progs:
        port = port_of(p)
        if port is None:
            continue
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            continue
        owner = "another program"
        try:
            holders = listeners(port)
            if holders and set(holders) <= set(ours):
                continue
            pid = next((pid for pid in holders if pid not in ours), None)
            if pid is not None:
                owner = f"pid {pid} ({' '.join(psutil.Process(pid).cmdline())[:120]})"
        except (psutil.Error, OSError):  # no permission to see other users' sockets: the port alone
            pass
        busy.append(f"port {port} ({p.name}) is in use by {owner}: {fix}")
    return busy


def up(settings: Settings, root: Path, timeout_s: float = 240, echo=print) -> bool:
    """Start (or update) the stack in order and wait until every program is healthy; True when all are."""
    progs = programs(settings, root)
    conf = render_config(settings, root, progs)
    if not running(conf) and (busy := port_conflicts(progs)):
        for line in busy:  # a server that cannot bind its port would retry forever behind a "RUNNING" line
            echo(line)
        return False
    if running(conf):
        echo("stack already running: applying config changes and starting anything stopped")
        ctl(conf, "update")
    else:  # the programs inherit this environment: the local API key unless SHOPREC_API_KEYS is set
        start_supervisord(conf, local_env())
    pending = start_in_order(progs, conf, timeout_s, echo)
    echo(table(progs, conf))
    if pending:
        echo(f"not healthy after {timeout_s:.0f}s: {', '.join(sorted(pending))}; see {settings.var_dir}/log/<name>.log")
    else:
        echo(next_steps(settings))
    return not pending


def next_steps(settings: Settings, served: dict[str, str] | None = None) -> str:
    """What to do once the stack is up: the key the API takes, a first request, and the first training when no
    model is served yet (``served``: alias -> version, default: what the API's /status says)."""
    key = LOCAL_API_KEY if not os.environ.get("SHOPREC_API_KEYS") else "<one of SHOPREC_API_KEYS>"
    api = next((p.url for p in programs(settings, Path.cwd()) if p.name == "bentoml"), "http://localhost:3001")
    if served is None:
        served = served_models(api, settings)
    text = (f"\nThe API takes `Authorization: Bearer {key}`, e.g.\n"
            f"  curl -s {api}/recommend -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            "-d '{\"user_id\": \"u000001\"}'\n")
    if served:
        return text + "It serves " + " and ".join(f"{alias} v{v}" for alias, v in sorted(served.items())) + \
            " (`shoprec model show`); `shoprec train` trains a new candidate now, the schedule does daily."
    return text + ("No model is registered yet, so it answers from the fallback (`source: fallback`): run "
                   "`shoprec train` once (or Dagster → Jobs → train_job → Materialize all; README, Using it).")


def served_models(api: str, settings: Settings) -> dict[str, str]:
    """The versions the API serves (its /status), {} when none or when it does not answer."""
    try:
        r = httpx.post(f"{api}/status", headers=settings.client_headers(), timeout=5)
        return dict(r.json().get("models") or {}) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}


def start_in_order(progs: list[Program], conf: Path, timeout_s: float, echo=print) -> set[str]:
    """Start each program once the programs it needs are healthy, and wait for all to be healthy.

    BentoML started beside MLflow answered its first ~13 s of requests from the fallback (the registry did
    not answer yet) and logged a warning per attempt; on two cores, starting the servers that use MLflow
    after it is up is also no slower overall. Returns the programs still not healthy at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    ready: set[str] = set()
    started: set[str] = set()
    server = rpc(conf)
    while len(ready) < len(progs) and time.monotonic() < deadline:
        state = states(conf)
        for p in progs:  # supervisor runs it and, for a server, its health check answers with a success
            if p.name not in ready and state.get(p.name) == "RUNNING" and probe(p):
                ready.add(p.name)
                echo(f"  ready: {p.name}")
        for p in progs:
            if p.name not in ready | started and set(p.needs) <= ready:
                if state.get(p.name) not in ("RUNNING", "STARTING", "BACKOFF"):
                    try:
                        server.startProcess(p.name, False)  # not waiting for it: the loop checks its health
                    except xmlrpc.client.Fault as err:  # started meanwhile (ALREADY_STARTED) or cannot spawn
                        echo(f"  {p.name}: {err.faultString}")
                started.add(p.name)
        if len(ready) < len(progs):
            time.sleep(0.5)
    for p in progs:
        if p.name not in ready and not set(p.needs) <= ready:
            echo(f"  not started: {p.name} waits for {', '.join(n for n in p.needs if n not in ready)}")
    return {p.name for p in progs} - ready


def down(settings: Settings, root: Path) -> None:
    shutdown((root / settings.var_dir).resolve() / "supervisord.conf")


def shutdown(conf: Path, timeout_s: float = 60) -> None:
    """Stop the supervisord of ``conf`` and its programs (each one's process group; SIGKILL after stopwaitsecs)."""
    if running(conf):
        ctl(conf, "shutdown")
        pid_file = conf.parent / "supervisord.pid"
        deadline = time.monotonic() + timeout_s
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)


def table(progs: list[Program], conf: Path) -> str:
    rows = [("service", "state", "open")]
    for p in progs:
        state = ctl(conf, "status", p.name).stdout.split()
        rows.append((p.name, state[1] if len(state) > 1 else "?", p.url))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def status(settings: Settings, root: Path) -> str:
    conf = (root / settings.var_dir).resolve() / "supervisord.conf"
    if not running(conf):
        return "the stack is not running (start it with `make up`)"
    return table(programs(settings, root), conf)
