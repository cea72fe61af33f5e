"""The `shoprec` command line checks its options itself: a number out of range is a usage error (exit 2) naming
the option, never a traceback or a run that silently does nothing; the help shows flags without a value and
lists the options of every command. Nothing here starts a service: each bad value stops before the command runs."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli import app


def _text(output: str) -> str:
    """Output without rich's boxes and line wrapping."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize("args,option", [
    (["simulate", "--rate", "-5", "--duration", "1"], "--rate"),  # was a rich traceback (ValueError: rate_eps > 0)
    (["simulate", "--rate", "0", "--duration", "1"], "--rate"),
    (["simulate", "--backfill", "-1"], "--backfill"),  # was "wrote 0 events (-1 days)", exit 0
    (["simulate", "--duration", "-5"], "--duration"),  # sent nothing, silently
    (["simulate", "--backfill", "1", "--events-per-day", "0"], "--events-per-day"),
    (["simulate", "--seed", "-1", "--backfill", "1"], "--seed"),  # numpy refuses a negative seed, with a traceback
    (["consume", "--idle-exit-s", "-1"], "--idle-exit-s"),  # ran
    (["catalog", "sync", "--idle-exit-s", "-1"], "--idle-exit-s"),
    (["stack", "up", "--backfill-days", "-1"], "--backfill-days"),
    (["bench", "gpu", "--n-items", "0"], "--n-items"),
    (["bench", "ingest", "--events", "0"], "--events"),
    (["bench", "ingest", "--rate", "-1"], "--rate"),
    (["bench", "serve", "--concurrency", "0"], "--concurrency"),
    (["bench", "quality", "--sample", "-1"], "--sample"),
    (["bench", "dashboard", "--days", "-1"], "--days"),  # started Redis and MLflow, then a traceback
    (["bench", "dashboard", "--repeats", "0"], "--repeats"),
])
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(args, option, monkeypatch):
    import subprocess

    from pipelines import kafka_io, simulator, stack
    from pipelines.bench import gpu

    def ran(*args, **kwargs):
        raise AssertionError("the command ran: the value was not checked first")

    # should a check go missing, the command fails here instead of starting the stack, a broker client or a bench
    for module, name in ((stack, "up"), (kafka_io, "ensure_topics"), (subprocess, "run"),
                         (simulator, "load_or_make_catalog"), (gpu, "command")):
        monkeypatch.setattr(module, name, ran)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in _text(res.output), res.output


def _help(*command: str) -> str:
    return _text(CliRunner().invoke(app, [*command, "--help"]).output)


def test_flags_show_no_value_in_the_help():
    """Every flag showed `<bool>` (`--help <bool>`), as if it took a value."""
    for command in ((), ("consume",), ("simulate",), ("catalog", "sync"), ("bench", "gpu"), ("bench", "quality")):
        text = _help(*command)
        assert "<bool>" not in text, (command, text)
    assert "<float range>" in _help("simulate") and "<path>" in _help("bench", "gpu")  # other options keep theirs


def test_every_option_has_help():
    """`consume --verbose`, `catalog sync --verbose` and `simulate --seed` had none."""
    root = typer.main.get_command(app)

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    for path, cmd in walk(root, []):
        for param in cmd.params:
            if param.param_type_name == "option":
                assert param.help, f"shoprec {' '.join(path)} {param.opts[0]} has no help"


def test_bench_dashboard_lists_and_checks_the_options_it_passes_on(monkeypatch):
    """Its help listed no option, and `--foo` failed with `Possible options: --out` from another process."""
    text = _help("bench", "dashboard")
    for option in ("--out", "--days", "--rate", "--sessions-per-day", "--rps", "--repeats", "--workdir"):
        assert option in text, text
    assert "Render every dashboard page" in text
    res = CliRunner().invoke(app, ["bench", "dashboard", "--foo"])
    assert res.exit_code == 2 and "No such option: --foo" in res.output

    import subprocess

    ran = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: ran.append(argv) or subprocess.CompletedProcess(argv, 0))
    res = CliRunner().invoke(app, ["bench", "dashboard", "--days", "2", "--workdir", "/tmp/w"])
    assert res.exit_code == 0, res.output
    argv = ran[0]
    assert argv[1:3] == ["-m", "dashboard.bench"]
    assert argv[argv.index("--days") + 1] == "2.0" and argv[argv.index("--workdir") + 1] == "/tmp/w"
    assert argv[argv.index("--repeats") + 1] == "3"  # the defaults, as the module's own


def test_stack_status_exits_1_when_the_stack_is_not_running(tmp_path, monkeypatch):
    """`make status` is usable in a script: it fails when nothing runs."""
    from pipelines.settings import get_settings

    monkeypatch.setenv("SHOPREC_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["stack", "status"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "the stack is not running" in result.output


def test_the_benchmarks_run_as_modules_check_their_numbers_too(capsys):
    """`python -m dashboard.bench` and `python -m pipelines.bench.gpu` (a bare GPU machine) bound their options
    themselves, not only behind `shoprec bench`."""
    from pipelines.bench import gpu

    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--n-items", "0"])
    assert exit_.value.code == 2 and "--n-items" in capsys.readouterr().err
    from dashboard import bench

    one = typer.Typer(add_completion=False)
    one.command()(bench.command)  # as `typer.run(command)` in its __main__
    result = CliRunner().invoke(one, ["--days", "-1"])
    assert result.exit_code == 2 and "--days" in _text(result.output)


# --- `shoprec model` and `shoprec catalog publish` ---------------------------------------
@pytest.mark.parametrize("args,says", [
    (["1", "--remove"], "not both"),  # took the alias off and ignored the 1
    ([], "neither was given"),  # exit 1, unlike every other usage error
])
def test_model_challenger_takes_a_version_or_remove(args, says, monkeypatch):
    from pipelines import cli

    def registry():
        raise AssertionError("the command ran: the arguments were not checked first")

    monkeypatch.setattr(cli, "_registry", registry)
    res = CliRunner().invoke(app, ["model", "challenger", *args])
    assert res.exit_code == 2, res.output
    text = _text(res.output)
    assert "Usage: " in text and " model challenger [OPTIONS] [VERSION]" in text, text
    assert ("Invalid value for 'VERSION' / '--remove': give the VERSION to serve as the challenger, or --remove to "
            f"take the alias off; {says}") in text, text


def test_model_promote_of_a_version_that_does_not_exist_names_those_that_do(tmp_path, monkeypatch):
    """It said only `has no version '99'`."""
    from mlflow import MlflowClient

    from pipelines.settings import get_settings

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # a registry of its own (a file: no service)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("shoprec-cli")
    for _ in range(2):
        client.create_model_version("shoprec-cli", source=str(tmp_path / "model"))
    client.create_registered_model("shoprec-empty")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", "shoprec-cli")
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["model", "promote", "v99"])
        assert res.exit_code == 1 and _text(res.output) == (
            "error: shoprec-cli has no version '99': it has v1, v2 (`shoprec model show` names the champion's and "
            "the challenger's)"), res.output
        res = CliRunner().invoke(app, ["model", "challenger", "7"])
        assert res.exit_code == 1 and "has no version '7': it has v1, v2" in _text(res.output), res.output
        monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", "shoprec-empty")
        get_settings.cache_clear()
        res = CliRunner().invoke(app, ["model", "promote", "1"])
        assert res.exit_code == 1 and "it has no version yet (`shoprec train` registers one)" in _text(res.output)
    finally:
        get_settings.cache_clear()
    assert client.get_registered_model("shoprec-cli").aliases == {}  # the errors changed nothing


def test_catalog_publish_names_the_dlq_reason_a_partial_update_gets(tmp_path, monkeypatch):
    """It named `catalog_missing_field`, the dashboard's counter; the DLQ record's reason header is `missing_field`."""
    import orjson

    from pipelines import catalog_feed, kafka_io
    from pipelines.settings import get_settings

    class Sent:
        def get(self, timeout=None):
            return None

    class Producer:  # no broker: what a send returns is all the command waits on
        def send(self, topic, key=None, value=None):
            return Sent()

        def close(self):
            pass

    monkeypatch.setenv("SHOPREC_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda s: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda s: Producer())
    path = tmp_path / "change.jsonl"
    path.write_bytes(orjson.dumps({"item_id": "p-unknown", "in_stock": False}))
    try:
        catalog_feed.write_catalog({"p1": {"item_id": "p1", "title": "Lamp", "category": "home", "brand": "Acme",
                                           "price": 25.0, "created_at": 1_700_000_000_000, "in_stock": True}},
                                   get_settings().catalog_path)
        res = CliRunner().invoke(app, ["catalog", "publish", str(path)])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, res.output
    text = _text(res.output)
    assert "the catalog feed rejects such a change to its DLQ (reason missing_field, counted on the dashboard as " \
        "catalog_missing_field)" in text, text


def test_a_failed_step_shows_what_to_do_however_long_its_reason():
    """`shoprec train` prints a few lines of each failed step; the line saying how to fix it was cut off with them."""
    from pipelines.cli import _short

    fix = "  to fix: send these products again with correct values" + " (POST /catalog ...)" * 12
    reason = "\n".join(["8/14 expectations met", *(f"  - expectation {i} failed" for i in range(6)), fix])
    lines = _short(reason)
    assert lines[-1] == fix and len(fix) > 200  # whole, after the rest was shortened
    assert lines[-2] == "... (4 more lines at the link)" and lines[0] == "8/14 expectations met"
    assert _short("boom") == ["boom"]
