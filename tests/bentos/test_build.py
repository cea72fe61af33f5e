"""``bentoml build`` makes a Bento that serves the packaged champion, even with an empty registry."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from pipelines import localstack
from pipelines.serve_process import ROOT, bentoml_exe, stop_group, wait_ready

pytestmark = pytest.mark.slow


def test_built_bento_serves_the_packaged_champion(settings, redis_client, serve_env, registered_champion, tmp_path,
                                                   monkeypatch):
    from bentos.package import package

    registry, reg = registered_champion
    src = tmp_path / "src"  # a copy of the sources, so the packaged model never lands in the checkout
    for folder in ("bentos", "pipelines"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "packaged"))
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", registry.name)
    from pipelines.settings import get_settings

    get_settings.cache_clear()
    assert package(src / "bentos" / "packaged") == reg.version
    env = {**os.environ, **serve_env, "BENTOML_HOME": str(tmp_path / "bentoml-home"),
           "SHOPREC_MLFLOW_MODEL_NAME": registry.name}
    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(k, None)  # the serving defaults, not this process's
    build = subprocess.run([bentoml_exe(), "build", "-f", "bentos/bentofile.yaml", "--output", "tag", "."],
                           cwd=src, env=env, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento_dir = Path(env["BENTOML_HOME"]) / "bentos" / tag.replace(":", "/")
    assert (bento_dir / "src" / "bentos" / "packaged" / "champion.json").exists()
    assert (bento_dir / "src" / "pyproject.toml").exists()  # /docs.json's version where shoprec is not installed

    # at run time MLflow cannot be reached (nothing listens there): only the packaged champion can answer. MLflow's
    # client used to retry such a server for about 4 minutes before the scorer started, and meanwhile the API was
    # ready and answered from the fallback
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{localstack.free_port()}"
    port = localstack.free_port()
    proc = subprocess.Popen([bentoml_exe(), "serve", tag, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120, proc)
        body = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": "u0", "k": 5}, timeout=15,
                          headers=get_settings().client_headers()).json()
    finally:
        stop_group(proc)
    assert body["source"] == "model" and body["model_version"] == reg.version, body
