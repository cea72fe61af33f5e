"""`shoprec train`: through Dagster's GraphQL API (what the UI calls), a launched run of `train_job` completes.

Starts `dagster-webserver` on a free port with a temporary DAGSTER_HOME whose instance uses the
DefaultRunCoordinator: the webserver launches runs itself (a subprocess per run), no daemon needed.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipelines import localstack
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION

ROOT = Path(__file__).resolve().parents[2]
INSTANCE_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own waits (server 120 s, the command 400 s) fail first, with the server log
def test_shoprec_train_launches_train_job_through_graphql_and_follows_it(shop, tmp_path, monkeypatch):
    s, _ = shop
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    # the webserver and the run it launches inherit these (the `settings` fixture set the rest); the run trains
    # into the model SHOPREC_MLFLOW_MODEL_NAME names, as serving follows it (Dagster used a fixed name)
    name = f"shoprec-graphql-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SHOPREC_HOLDOUT_HOURS", "1")
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", name)
    port = localstack.free_port()
    exe = Path(sys.executable).parent / "dagster-webserver"
    log = tmp_path / "webserver.log"
    cmd = [str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(ROOT / "workspace.yaml")]
    with localstack.running(cmd, port, log, timeout=120):
        url = f"http://127.0.0.1:{port}"
        done = subprocess.run([str(Path(sys.executable).parent / "shoprec"), "train", "--epochs", "10", "--dim", "16",
                               "--dagster-url", url], capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("train_job run ") and f"{url}/runs/" in lines[0]  # the link to its steps in the UI
    assert "  success (" in done.stdout and lines[-1].startswith("registered; now champion v1"), done.stdout
    assert ModelRegistry(s.mlflow_tracking_uri, name=name).version_for(ALIAS_CHAMPION) == "1"


def test_shoprec_train_says_what_to_do_when_dagster_does_not_answer(settings):
    done = subprocess.run([str(Path(sys.executable).parent / "shoprec"), "train", "--dagster-url",
                           f"http://127.0.0.1:{localstack.free_port()}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Dagster does not answer at" in done.stderr and "make up" in done.stderr
