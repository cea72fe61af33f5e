"""Hundreds of concurrent scoring calls between the API and the scorer: every answer comes from the model."""

from __future__ import annotations

import collections

import pytest

from pipelines import localstack
from pipelines.serve_process import bento_serving
from tests.bentos.conftest import steady_load, wait_for

pytestmark = pytest.mark.slow


def test_no_request_falls_back_while_the_scorer_is_healthy(settings, serve_env, registered_champion, tmp_path):
    # one scoring call per request (no batching), several at once: BentoML 1.4.40's client replaced its
    # HTTP session every 100 calls and failed the calls still in flight ("Server disconnected")
    registry, reg = registered_champion
    port = localstack.free_port()
    env = {**serve_env, "SHOPREC_MLFLOW_MODEL_NAME": registry.name, "SHOPREC_SERVE_CACHE": "false",
           "SHOPREC_SERVE_MAX_BATCH_SIZE": "1",
           # what is tested is the client's session, not speed: a call queued past the usual 1 s deadline on a
           # busy machine would answer from the fallback (still under BentoML's 5 s request timeout)
           "SHOPREC_SERVE_DEADLINE_MS": "4000"}
    with bento_serving(port, env, tmp_path / "bentoml.log"), \
            steady_load(f"http://127.0.0.1:{port}", clients=8) as answers:
        wait_for(lambda: len(answers) >= 600, 120, "600 answers")
    sources = collections.Counter(body.get("source", f"status {status}") for _, status, body in answers)
    assert sources.keys() == {"model"}, sources
    assert {body["model_version"] for _, _, body in answers} == {reg.version}
