"""The ``shoprec`` command line."""

from __future__ import annotations

import functools
import signal
import threading
from pathlib import Path
from urllib.parse import urlparse

import typer
from typer.core import TyperOption

from pipelines.settings import SettingsError, get_settings


def _no_flag_metavar(display_type_rich):
    """Typer shows a type after every option in the help, ``<bool>`` too: ``--help <bool>`` and ``--verbose <bool>``
    read as if they took a value. A flag takes none, so it shows none (every other option keeps its type)."""
    def display(self, ctx):
        return None if self.is_bool_flag else display_type_rich(self, ctx)
    return display


if hasattr(TyperOption, "display_type_rich"):  # typer 0.29's hook; another typer keeps its own help as it is
    TyperOption.display_type_rich = _no_flag_metavar(TyperOption.display_type_rich)

# docstrings are help texts: Markdown joins their wrapped lines and shows ``--option`` as code
HELP = {"no_args_is_help": True, "rich_markup_mode": "markdown"}
app = typer.Typer(help="shoprec: real-time product recommendations.", pretty_exceptions_show_locals=False, **HELP)
stack_app = typer.Typer(help="The local stack (what `make up/down/status` run).", **HELP)
app.add_typer(stack_app, name="stack")
bench_app = typer.Typer(help="Benchmarks (JSON to --out; results are recorded in BENCHMARKS.md).", **HELP)
app.add_typer(bench_app, name="bench")
catalog_app = typer.Typer(help="The product catalog: its Kafka feed and the file it keeps.", **HELP)
app.add_typer(catalog_app, name="catalog")
model_app = typer.Typer(help="The registered model's aliases in MLflow (what serving follows).", **HELP)
app.add_typer(model_app, name="model")


def _logging(verbose: bool = False) -> None:
    from pipelines import logs

    logs.setup(verbose)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@app.command()
def init() -> None:
    """Create the Kafka topics (safe to run again)."""
    from pipelines import kafka_io

    _logging()
    kafka_io.ensure_topics(get_settings())
    typer.echo("topics ready")


@app.command()
def consume(verbose: bool = typer.Option(False, help="log at DEBUG level"),
            idle_exit_s: float = typer.Option(None, min=0, help="exit after this many seconds without a record")
            ) -> None:
    """Run one stream consumer (Kafka → lake + Redis; invalid records → DLQ) until stopped (SIGINT/SIGTERM)."""
    from pipelines.consumer import StreamConsumer

    s, state = _consumer_setup(verbose)
    StreamConsumer(s, state).run(_stop_on_signals(), idle_exit_s=idle_exit_s)


@app.command()
def dlq(last: int = typer.Option(20, min=1, max=10_000, help="how many of the newest records"),
        reason: str = typer.Option(None, help="only records with this reason (e.g. ts_too_old, duplicate, "
                                              "missing_field; the dashboard's Overview counts them per reason)"),
        as_json: bool = typer.Option(False, "--json", help="one JSON object per line instead of text"),
        value_chars: int = typer.Option(300, min=20, help="show at most this much of each original record"),
        timeout: float = typer.Option(15.0, min=1, help="seconds to wait for the broker")) -> None:
    """Show the newest records the consumer and the catalog feed refused (the DLQ topic), oldest first: when,
    why (reason and error), from which topic, and the record as it was sent. Reads without a consumer group, so
    it moves no one's offsets."""
    import orjson

    from pipelines.dlq import format_records, read_dlq

    s = get_settings()
    try:
        records = read_dlq(s, last=last, reason=reason, value_chars=value_chars, timeout_s=timeout)
    except (ConnectionError, TimeoutError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        for d in records:
            typer.echo(orjson.dumps(d.to_dict()).decode())
        return
    if not records:
        typer.echo(f"no refused records{f' with reason {reason!r}' if reason else ''} in {s.kafka_topic_dlq}")
        return
    typer.echo(format_records(records))


def _consumer_setup(verbose: bool):
    """Logging, settings, the topics and the online state of a consumer process."""
    from pipelines import kafka_io
    from pipelines.experiment import counter_name
    from pipelines.state import OnlineState, connect

    _logging(verbose)
    s = get_settings()
    kafka_io.ensure_topics(s)
    return s, OnlineState(connect(s.redis_url), recent_cap=s.recent_items_cap, cache_ttl_s=s.cache_ttl_s,
                          experiment=counter_name(s))


@app.command()
def simulate(
    rate: float = typer.Option(20.0, min=0.01, help="events per second"),
    duration: float = typer.Option(None, min=0.1, help="seconds to run (default: until stopped)"),
    backfill: int = typer.Option(0, min=0, help="write DAYS of history straight into the lake, then exit"),
    events_per_day: int = typer.Option(20_000, min=1, help="history density for --backfill"),
    closed_loop: bool = typer.Option(False, help="simulated users call /recommend and react to it"),
    seed: int = typer.Option(0, min=0, help="the same seed, the same users, sessions and new products (and "
                                            "catalog, when it makes one); event ids differ"),
) -> None:
    """Run the shop simulator: live events to Kafka (new products to the catalog topic), or --backfill
    history into the lake (new products into the catalog file)."""
    from pipelines import catalog_feed, kafka_io, simulator

    _logging()
    s = get_settings()
    catalog = simulator.load_or_make_catalog(s.catalog_path, seed=seed)
    sim = simulator.ShopSimulator(catalog, seed=seed)
    if backfill:
        n = sim.backfill(s.lake_dir, days=backfill, events_per_day=events_per_day, catalog_path=s.catalog_path)
        typer.echo(f"wrote {n} events ({backfill} days) to {s.lake_dir}")
        return
    kafka_io.ensure_topics(s)
    producer = kafka_io.make_producer(s)
    recommend_fn = simulator.http_recommend_fn(s.bento_url, headers=s.client_headers()) if closed_loop else None
    counts = sim.run_live(lambda evs: kafka_io.send_events(producer, evs, s.kafka_topic_events), rate_eps=rate, duration_s=duration,
                          recommend_fn=recommend_fn, stop_event=_stop_on_signals(),
                          catalog_fn=lambda items: catalog_feed.publish_items(producer, items, s.kafka_topic_catalog))
    producer.flush()
    typer.echo(f"sent {counts}")


@catalog_app.command("sync")
def catalog_sync(verbose: bool = typer.Option(False, help="log at DEBUG level"),
                 idle_exit_s: float = typer.Option(None, min=0, help="exit after this many seconds without a record")
                 ) -> None:
    """Apply the catalog topic (product upserts, stock changes) to the catalog file until stopped."""
    from pipelines.catalog_feed import CatalogSync

    s, state = _consumer_setup(verbose)
    counts = CatalogSync(s, state=state).run(_stop_on_signals(), idle_exit_s=idle_exit_s)
    typer.echo(f"catalog sync stopped: {dict(counts)}")


@catalog_app.command("publish")
def catalog_publish(path: Path = typer.Argument(..., exists=True, dir_okay=False, metavar="FILE",
                                                help="products as .jsonl, .csv or .parquet: item_id plus the fields "
                                                     "to set (all of them for a new product)")) -> None:
    """Send products (new ones, or changes such as in_stock) to the catalog topic and wait for the acks.

    Every record is checked first, as `POST /catalog` does; when any is invalid nothing is sent. A CSV cell is
    converted by its field's type (a number for price, true or false for in_stock, epoch ms for created_at).
    A change to a product the catalog file does not have yet is sent and named, as `POST /catalog` names it:
    the catalog feed drops it unless the whole product reaches the feed first.
    """
    from pipelines import catalog_feed, kafka_io
    from pipelines.ingest import validate_products

    _logging()
    s = get_settings()
    try:
        records = catalog_feed.read_product_file(path)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'FILE'") from None
    if not records:
        raise typer.BadParameter(f"{path.name} holds no product records: nothing to send", param_hint="'FILE'")
    products, errors = validate_products(records)
    if errors:
        for e in errors[:20]:
            typer.echo(f"record {e['index'] + 1}: {e['reason']}: {e['message']}", err=True)
        typer.echo(f"{len(errors)} invalid record(s) in {path.name}; nothing was sent", err=True)
        raise typer.Exit(1)
    kafka_io.ensure_topics(s)
    producer = kafka_io.make_producer(s)
    try:
        futures = catalog_feed.publish_items(producer, products, s.kafka_topic_catalog)
        with typer.progressbar(futures, label="sending", show_pos=True) as bar:
            for f in bar:
                f.get(timeout=60)
    finally:
        producer.close()
    n = len(products)
    typer.echo(f"sent {n} product{'' if n == 1 else 's'} to {s.kafka_topic_catalog}; `shoprec catalog sync` applies "
               f"{'it' if n == 1 else 'them'}")
    try:
        unknown = catalog_feed.unknown_products(products, s.catalog_path)
    except (OSError, ValueError) as err:  # the records are sent: a catalog file being replaced only skips the check
        typer.echo(f"warning: could not read {s.catalog_path} to check for unknown products ({err})", err=True)
        unknown = []
    if unknown:
        typer.echo(f"warning: {len(unknown)} record(s) change a product the catalog does not have yet "
                   f"({', '.join(unknown[:20])}{', ...' if len(unknown) > 20 else ''}); the catalog feed rejects such "
                   f"a change to its DLQ (reason missing_field, counted on the dashboard as catalog_missing_field) "
                   f"unless the whole product ({', '.join(catalog_feed.REQUIRED_FIELDS)}) reaches it first: send the "
                   "whole product", err=True)


def _registry():
    from pipelines.registry import ModelRegistry

    s = get_settings()
    return ModelRegistry(s.mlflow_tracking_uri, s.mlflow_model_name)


def _aliases_changed(change: dict) -> None:
    def show(a: dict) -> str:
        return ", ".join(f"{k} v{v}" if v else f"no {k}" for k, v in a.items())

    typer.echo(f"before: {show(change['before'])}\nnow:    {show(change['after'])}\n"
               f"serving follows within SHOPREC_MODEL_POLL_S plus the model's load time")


def _model_error(err: ValueError, registry=None) -> typer.Exit:
    """Print ``err`` (with the versions there are, when it named none of them); the exit to raise."""
    from mlflow.exceptions import MlflowException

    text = str(err)
    if registry is not None and isinstance(err.__cause__, MlflowException):  # the version asked for does not exist
        found = sorted(int(v.version) for v in registry.client.search_model_versions(f"name='{registry.name}'"))
        shown = ", ".join(f"v{v}" for v in found[-10:])
        text += (f": it has {'..., ' if len(found) > 10 else ''}{shown} (`shoprec model show` names the champion's "
                 "and the challenger's)" if found else ": it has no version yet (`shoprec train` registers one)")
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(1)


@model_app.command("promote")
def model_promote(version: str = typer.Argument(None, help="the version to make champion: 3, v3 or an alias "
                                                            "(default: the challenger)")) -> None:
    """Make a version (default: the challenger) the champion."""
    registry = _registry()
    try:
        change = registry.promote(version)
        if change.get("unchanged"):
            typer.echo(f"v{change['before']['champion']} already is the champion: nothing changed")
            return
        _aliases_changed(change)
    except ValueError as err:
        raise _model_error(err, registry) from None


@model_app.command("challenger")
def model_challenger(version: str = typer.Argument(None, metavar="VERSION",
                                                   help="the version to serve as the challenger (3 or v3)"),
                     remove: bool = typer.Option(False, "--remove", help="take the alias off: all traffic to the "
                                                                          "champion")) -> None:
    """Serve a version beside the champion as the `challenger` (the experiment's share of the traffic), as the
    training gate does for a candidate not worse than the champion; `--remove` ends the comparison."""
    from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION

    if (version is None) == (not remove):  # `challenger 3 --remove` took the alias off and ignored the 3
        raise typer.BadParameter("give the VERSION to serve as the challenger, or --remove to take the alias off; "
                                 + ("not both" if remove else "neither was given"),
                                 param_hint="'VERSION' / '--remove'")
    registry = _registry()
    try:
        before = registry.aliases()
        if remove:
            if before[ALIAS_CHALLENGER] is None:
                typer.echo("there is no challenger: nothing changed")
                return
            registry.client.delete_registered_model_alias(registry.name, ALIAS_CHALLENGER)
        else:
            resolved = registry.resolve(version)
            if resolved == before[ALIAS_CHAMPION]:
                raise ValueError(f"v{resolved} is the champion: a challenger is another version")
            registry.set_alias(ALIAS_CHALLENGER, resolved)
        _aliases_changed({"before": before, "after": registry.aliases()})
    except ValueError as err:
        raise _model_error(err, registry) from None


@model_app.command("rollback")
def model_rollback() -> None:
    """Give champion back to the version it replaced, and take challenger off the version rolled back."""
    try:
        _aliases_changed(_registry().rollback())
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@model_app.command("show")
def model_show() -> None:
    """The versions behind the aliases."""
    for alias, version in _registry().aliases().items():
        typer.echo(f"{alias}: {'v' + version if version else '-'}")


_RUN_EVENTS = """
query RunEvents($runId: ID!, $after: String) {
  logsForRun(runId: $runId, afterCursor: $after, limit: 1000) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on ExecutionStepFailureEvent { stepKey error { message cause { message cause { message } } } }
        ... on RunFailureEvent { message }
        ... on AssetCheckEvaluationEvent {
          stepKey
          evaluation { checkName success severity metadataEntries { label ... on TextMetadataEntry { text } } }
        }
      }
    }
    ... on Error { message }
  }
}
"""
#: lines of one step's reason `shoprec train` prints; the run's page in the UI has the rest
_REASON_LINES = 4


def _short(text: str, lines: int = _REASON_LINES, width: int = 200) -> list[str]:
    """At most ``lines`` lines of ``width`` characters, and then whole the line that says what to do ("to fix: ...")."""
    fix = [line for line in text.strip().splitlines() if line.strip().startswith("to fix:")]
    out = [line if len(line) <= width else line[:width - 3] + "..." for line in text.strip().splitlines()
           if line not in fix]
    out = out if len(out) <= lines else [*out[:lines - 1], f"... ({len(out) - lines + 1} more lines at the link)"]
    return out + fix


def _why_run_failed(url: str, run_id: str) -> list[str]:
    """Why a run failed, from its events through Dagster's GraphQL API: each failed step with its error (a blocking
    asset check that failed: the check and its ``summary`` metadata), a few lines each; the run's own failure
    message when no step failed (e.g. its process died)."""
    import httpx

    events, after = [], None
    while True:
        answer = httpx.post(f"{url.rstrip('/')}/graphql", timeout=30,
                            json={"query": _RUN_EVENTS, "variables": {"runId": run_id, "after": after}})
        answer.raise_for_status()
        logs = answer.json()["data"]["logsForRun"]
        if logs["__typename"] != "EventConnection":
            raise ValueError(logs.get("message") or logs["__typename"])
        events += logs["events"]
        if not logs["hasMore"]:
            break
        after = logs["cursor"]
    failed_checks: dict[str, list[dict]] = {}
    for e in events:
        ev = e.get("evaluation")
        if e["__typename"] == "AssetCheckEvaluationEvent" and not ev["success"] and ev["severity"] == "ERROR":
            failed_checks.setdefault(e["stepKey"], []).append(ev)
    lines = []
    for e in (e for e in events if e["__typename"] == "ExecutionStepFailureEvent"):
        step = e["stepKey"]
        if failed_checks.get(step):  # the step's error only says "1 blocking asset check failed"
            for ev in failed_checks[step]:
                summary = next((m["text"] for m in ev["metadataEntries"] if m["label"] == "summary" and "text" in m),
                               "")
                text = _short(f"check {ev['checkName']} failed: {summary.removeprefix('FAILED: ')}".rstrip(": "))
                lines += [f"step {step} failed: {text[0]}", *(f"  {line.strip()}" for line in text[1:])]
            continue
        error = e["error"] or {}
        while error.get("cause"):  # an exception raised in the step is the cause of Dagster's "Error occurred ..."
            error = error["cause"]
        text = _short(error.get("message") or "no error message")
        lines += [f"step {step} failed: {text[0]}", *(f"  {line.strip()}" for line in text[1:])]
    if not lines:
        failure = next((e["message"] for e in events if e["__typename"] == "RunFailureEvent"), None)
        lines = _short(failure) if failure else []
    return lines


@app.command()
def train(model: str = typer.Option(None, help="recommender to train (default SHOPREC_TRAIN__MODEL: shoprec)"),
          epochs: int = typer.Option(None, min=1, help="training epochs (default SHOPREC_TRAIN__EPOCHS)"),
          dim: int = typer.Option(None, min=4, max=1024, help="embedding size (default SHOPREC_TRAIN__DIM)"),
          wait: bool = typer.Option(True, help="follow the run to its end (exit 1 unless it succeeds)"),
          dagster_url: str = typer.Option(None, help="the Dagster webserver (default: the local stack's)")) -> None:
    """Launch `train_job` on the stack's Dagster now, as its UI's "Materialize all" does, and follow it.

    The run validates its window, trains a candidate, registers it in MLflow and lets the gate name it
    `challenger` or `champion`; the Dagster UI shows its steps (the link printed). Busy on 2 cores: 2-5 min."""
    import time

    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    from pipelines import stack

    s = get_settings()
    url = dagster_url or next(p.url for p in stack.programs(s, Path.cwd()) if p.name == "dagster")
    parsed = urlparse(url)
    client = DagsterGraphQLClient(parsed.hostname or "localhost", port_number=parsed.port, timeout=30)
    overrides = {k: v for k, v in {"model": model, "epochs": epochs, "dim": dim}.items() if v is not None}
    config = {"ops": {"trained_model": {"config": overrides}}} if overrides else None
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/server_info", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        typer.echo(f"error: Dagster does not answer at {url} ({err}): start the stack (`make up`) or pass "
                   "--dagster-url", err=True)
        raise typer.Exit(1) from None
    deadline, said = time.monotonic() + 90, False
    while True:
        try:
            run_id = client.submit_job_execution("train_job", run_config=config)
            break
        except DagsterGraphQLClientError as err:  # just after `make up` the code location is still loading
            loading = any(w in str(err).lower() for w in ("not found", "notfound", "location", "loading"))
            if not loading or time.monotonic() > deadline:
                typer.echo(f"error: Dagster at {url} did not take the run: {err}", err=True)
                raise typer.Exit(1) from None
            if not said:
                typer.echo("waiting for Dagster to load the code location ...")
                said = True
            time.sleep(2)
    typer.echo(f"train_job run {run_id}: {url.rstrip('/')}/runs/{run_id}")
    if not wait:
        return
    t0, last, status, note_at = time.monotonic(), None, None, 30.0
    while status not in ("SUCCESS", "FAILURE", "CANCELED"):
        time.sleep(2)
        try:
            status = client.get_run_status(run_id).value
        except (DagsterGraphQLClientError, OSError) as err:
            typer.echo(f"error: lost Dagster at {url} ({err}); the run may still finish: see the link", err=True)
            raise typer.Exit(1) from None
        took = time.monotonic() - t0
        if status != last or took >= note_at:  # each change, and every 30 s that it is still at it
            typer.echo(f"  {status.lower()} ({took:.0f} s)")
            last, note_at = status, (took // 30 + 1) * 30
    if status != "SUCCESS":
        link = f"{url.rstrip('/')}/runs/{run_id}"
        try:
            why = _why_run_failed(url, run_id) if status == "FAILURE" else []
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as err:  # the reason is extra: the link has it
            why = [f"(could not read why from Dagster: {err})"]
        typer.echo("\n".join([f"error: the run ended {status}", *(f"  {line}" for line in why),
                              f"its steps and logs: {link}"]), err=True)
        raise typer.Exit(1)
    aliases = _registry().aliases()
    typer.echo("registered; now " + ", ".join(f"{a} v{v}" if v else f"no {a}" for a, v in aliases.items())
               + " (serving follows within SHOPREC_MODEL_POLL_S plus the model's load time)")


@stack_app.command("up")
def stack_up(backfill_days: int = typer.Option(3, min=0, help="history to simulate when the lake is empty")) -> None:
    """Start everything in the background, wait for health checks, print the URLs."""
    from pipelines import lake, simulator, stack

    s = get_settings()
    if backfill_days and not lake.partitions(s.lake_dir):
        typer.echo(f"empty lake: simulating {backfill_days} days of shop history first")
        _logging()
        sim = simulator.ShopSimulator(simulator.load_or_make_catalog(s.catalog_path), seed=0)
        sim.backfill(s.lake_dir, days=backfill_days, events_per_day=20_000, catalog_path=s.catalog_path)
    ok = stack.up(s, Path.cwd(), echo=typer.echo)
    raise typer.Exit(0 if ok else 1)


@stack_app.command("down")
def stack_down() -> None:
    """Stop exactly what `stack up` started."""
    from pipelines import stack

    try:
        s = get_settings()
    except SettingsError as err:  # stopping needs only the var dir: a bad value elsewhere must not keep it running
        import os

        from pipelines.settings import Settings

        typer.echo(f"warning: ignoring invalid settings to stop the stack:\n{err}", err=True)
        s = Settings.model_construct(var_dir=Path(os.environ.get("SHOPREC_VAR_DIR", "var")))
    stack.down(s, Path.cwd())
    typer.echo("stack stopped")


@stack_app.command("status")
def stack_status() -> None:
    """Show what runs (exit 1 when the stack is not running, 0 when it is)."""
    from pipelines import stack

    s = get_settings()
    typer.echo(stack.status(s, Path.cwd()))
    if not stack.running((Path.cwd() / s.var_dir).resolve() / "supervisord.conf"):
        raise typer.Exit(1)


def _register_benchmarks() -> None:
    from dashboard import bench as dashboard_bench  # light: its heavy imports are inside its functions
    from pipelines.bench import gpu, ingest, quality, serve

    # each module's options bound every count, rate and duration (`--days -1` started Redis and MLflow, then
    # failed with a traceback)
    bench_app.command("quality")(quality.command)
    bench_app.command("ingest")(ingest.command)
    bench_app.command("serve")(serve.command)

    h = gpu.OPTION_HELP  # gpu.py itself runs without typer (a bare GPU machine)

    @bench_app.command("gpu", help=gpu.command.__doc__)
    def bench_gpu(out: Path = typer.Option(Path("var/bench/gpu.json"), help=h["out"]),
                  n_items: int = typer.Option(gpu.N_ITEMS, min=1, help=h["n_items"]),
                  training: bool = typer.Option(True, help=h["training"]),
                  scale_data: Path | None = typer.Option(None, help=h["scale_data"]),
                  export_scale_data: Path | None = typer.Option(None, help=h["export_scale_data"])) -> None:
        gpu.command(out, n_items, training, scale_data, export_scale_data)

    @functools.wraps(dashboard_bench.command)  # its options, as typer reads them through the signature
    def bench_dashboard(**options) -> None:
        """Runs the benchmark in a process of its own (it points the settings at a private Redis, MLflow and var/
        dir through the environment), with the options typer checked here (`--help` lists them)."""
        import subprocess
        import sys

        args = [a for name, value in options.items() if value is not None
                for a in (f"--{name.replace('_', '-')}", str(value))]
        raise typer.Exit(subprocess.run([sys.executable, "-m", "dashboard.bench", *args]).returncode)

    bench_app.command("dashboard")(bench_dashboard)

    @bench_app.command("all")
    def bench_all() -> None:
        """Run every benchmark with its defaults (what `make bench` runs)."""
        import subprocess
        import sys

        failed = [name for name in ("quality", "ingest", "serve", "gpu")
                  if subprocess.run([sys.argv[0], "bench", name]).returncode != 0]
        if failed:
            typer.echo(f"benchmarks that failed: {', '.join(failed)}", err=True)
            raise typer.Exit(1)


_register_benchmarks()


def main() -> None:
    """The ``shoprec`` command: ``app`` with an invalid setting told in one line per variable (exit 2), not a
    traceback."""
    import sys

    try:
        app()
    except SettingsError as err:
        typer.echo(f"error: invalid settings (fix or unset these variables):\n{err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
