"""Through Dagster's GraphQL API (what the UI calls), a launched run of `train_job` completes.

Starts `dagster-webserver` on a free port with a temporary DAGSTER_HOME whose instance uses the
DefaultRunCoordinator: the webserver launches runs itself (a subprocess per run), no daemon needed.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient

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
@pytest.mark.timeout(600)  # its own waits (server 120 s, submit 90 s, run 240 s) fail first, with the server log
def test_a_train_job_launched_through_graphql_completes(shop, tmp_path, monkeypatch):
    s, _ = shop
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    # the webserver and the run it launches inherit these (the `settings` fixture set the rest)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SHOPREC_HOLDOUT_HOURS", "1")
    port = localstack.free_port()
    exe = Path(sys.executable).parent / "dagster-webserver"
    log = tmp_path / "webserver.log"
    name = f"shoprec-graphql-{uuid.uuid4().hex[:6]}"
    cmd = [str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(ROOT / "workspace.yaml")]
    with localstack.running(cmd, port, log, timeout=120):
        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
        run_id = _submit(client, {
            "resources": {"mlflow_registry": {"config": {"model_name": name}}},
            "ops": {"trained_model": {"config": {"epochs": 10, "dim": 16}}},
        })
        status = _wait(client, run_id, timeout=240)
        assert status == "SUCCESS", log.read_text()[-3000:]
    assert ModelRegistry(s.mlflow_tracking_uri, name=name).version_for(ALIAS_CHAMPION) == "1"


def _submit(client: DagsterGraphQLClient, run_config: dict) -> str:
    """Submit once the code location has loaded (the webserver answers before it has)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            return client.submit_job_execution("train_job", run_config=run_config)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _wait(client: DagsterGraphQLClient, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise TimeoutError(f"run {run_id} did not finish in {timeout}s")
