"""`shoprec train`: through Dagster's GraphQL API (what the UI calls), a launched run of `train_job` completes;
one that fails says which step failed and why.

Starts `dagster-webserver` on a free port with a temporary DAGSTER_HOME whose instance uses the
DefaultRunCoordinator: the webserver launches runs itself (a subprocess per run), no daemon needed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipelines import lake, localstack
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION
from tests.orchestration.conftest import catalog_frame

ROOT = Path(__file__).resolve().parents[2]
INSTANCE_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""


@contextlib.contextmanager
def _webserver(tmp_path, monkeypatch):
    """A `dagster-webserver` on a free port whose runs train into a model of their own; yields its URL, its log and
    the model's name."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    # the webserver and the run it launches inherit these (the `settings` fixture set the rest); the run trains
    # into the model SHOPREC_MLFLOW_MODEL_NAME names, as serving follows it (Dagster used a fixed name)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SHOPREC_HOLDOUT_HOURS", "1")
    name = f"shoprec-graphql-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", name)
    port = localstack.free_port()
    exe = Path(sys.executable).parent / "dagster-webserver"
    log = tmp_path / "webserver.log"
    cmd = [str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(ROOT / "workspace.yaml")]
    with localstack.running(cmd, port, log, timeout=120):
        yield f"http://127.0.0.1:{port}", log, name


def _shoprec_train(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "shoprec"), "train", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own waits (server 120 s, the command 400 s) fail first, with the server log
def test_shoprec_train_launches_train_job_through_graphql_and_follows_it(shop, tmp_path, monkeypatch):
    s, _ = shop
    with _webserver(tmp_path, monkeypatch) as (url, log, name):
        done = _shoprec_train("--epochs", "10", "--dim", "16", "--dagster-url", url, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("train_job run ") and f"{url}/runs/" in lines[0]  # the link to its steps in the UI
    assert "  success (" in done.stdout and lines[-1].startswith("registered; now champion v1"), done.stdout
    assert ModelRegistry(s.mlflow_tracking_uri, name=name).version_for(ALIAS_CHAMPION) == "1"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_shoprec_train_says_which_step_failed_and_why(shop, tmp_path, monkeypatch):
    """It printed only "the run ended FAILURE: its steps and logs are at the link above"."""
    s, _ = shop
    bad = catalog_frame()
    bad.loc[3, "price"] = 0.0  # below PRICE_MIN: the catalog's blocking check stops the run before training
    bad.to_parquet(s.catalog_path, index=False)
    with _webserver(tmp_path, monkeypatch) as (url, log, _):
        checked = _shoprec_train("--dagster-url", url, timeout=200)
        assert checked.returncode == 1, checked.stdout + checked.stderr + log.read_text()[-3000:]
        catalog_frame().to_parquet(s.catalog_path, index=False)  # the catalog fixed, but no events left to train on
        for key in lake.partitions(s.lake_dir):
            shutil.rmtree(lake.partition_dir(s.lake_dir, key))
        raised = _shoprec_train("--dagster-url", url, timeout=200)
        assert raised.returncode == 1, raised.stdout + raised.stderr + log.read_text()[-3000:]
    err = checked.stderr.splitlines()  # the failed check and its summary
    assert err[0] == "error: the run ended FAILURE", checked.stderr
    assert err[1].startswith("  step catalog failed: check catalog_suite failed: 8/9 expectations met"), checked.stderr
    assert err[2] == (f"    - expect_column_values_to_be_between(price): 1 unexpected (1.7%), e.g. 0.0 "
                      f"(products {bad.loc[3, 'item_id']})"), checked.stderr
    # and what to do about it, naming the file that failed
    assert err[3].startswith("    to fix: send these products again") and str(s.catalog_path) in err[3]
    assert err[4:] == [f"its steps and logs: {checked.stdout.splitlines()[0].split(': ', 1)[1]}"], checked.stderr
    err = raised.stderr.splitlines()  # the exception the step raised, not Dagster's "Error occurred while executing"
    assert err[1] == ("  step trained_model failed: ValueError: no interactions to train on: run the simulator "
                      "(`shoprec simulate`) or wait for traffic"), raised.stderr
    assert len(err) == 3 and err[-1].startswith(f"its steps and logs: {url}/runs/"), raised.stderr


def test_shoprec_train_says_what_to_do_when_dagster_does_not_answer(settings):
    done = subprocess.run([str(Path(sys.executable).parent / "shoprec"), "train", "--dagster-url",
                           f"http://127.0.0.1:{localstack.free_port()}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Dagster does not answer at" in done.stderr and "make up" in done.stderr
