"""Promoting a new version in MLflow while clients send requests: nothing fails, answers switch promptly."""

from __future__ import annotations

import time

import pytest

from pipelines import localstack
from pipelines.schemas import ALIAS_CHAMPION
from pipelines.serve_process import bento_serving
from tests.bentos.conftest import steady_load, wait_for

pytestmark = pytest.mark.slow

POLL_S = 2.0


def test_promotion_under_load_switches_within_the_polling_interval(settings, serve_env, registered_champion,
                                                                   tmp_path):
    registry, reg = registered_champion
    port = localstack.free_port()
    env = {**serve_env, "SHOPREC_MLFLOW_MODEL_NAME": registry.name, "SHOPREC_MODEL_POLL_S": str(POLL_S)}
    with bento_serving(port, env, tmp_path / "bentoml.log"), steady_load(f"http://127.0.0.1:{port}") as answers:
        wait_for(lambda: len(answers) > 50, 30, "traffic on the old version")
        model = registry.load(ALIAS_CHAMPION).recommender
        _, new_version = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.2}, tags={})
        registry.set_alias(ALIAS_CHAMPION, new_version)
        promoted = time.monotonic()
        wait_for(lambda: any(b.get("model_version") == new_version for _, _, b in answers[-5:]), 30,
                 "answers from the new version")
        first_new = min(t for t, _, b in list(answers) if b.get("model_version") == new_version)
        # traffic over two more registry polls after the switch: a flap back to the old version would show there
        wait_for(lambda: sum(t > first_new + 1.0 for t, _, _ in list(answers)) >= 50
                 and answers[-1][0] > first_new + 1.0 + 2 * POLL_S, 60, "traffic over two polls after the switch")
    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    # one registry poll, plus loading the model from MLflow: a few seconds on this 2-core machine, more while the
    # clients, the API and the scorer share its cores (the switch itself is what the next lines check)
    assert first_new - promoted <= POLL_S + 12.0
    after = [b["model_version"] for t, _, b in answers if t > first_new + 1.0 and b["source"] in ("model", "cache")]
    assert after and set(after) == {new_version}  # no flapping back to the old version
    assert {b.get("model_version") for _, _, b in answers} >= {reg.version, new_version}
    # the swap is in the server's log: operators follow versions there (BentoML's root level is WARNING)
    assert f"serving champion = version {new_version}" in (tmp_path / "bentoml.log").read_text()


def test_a_champion_that_cannot_be_loaded_is_named_once_and_the_last_one_keeps_serving(settings, registered_champion,
                                                                                        caplog):
    from pathlib import Path

    from pipelines.serving import ModelHolder

    registry, reg = registered_champion
    holder = ModelHolder(settings, registry=registry)
    assert holder.refresh() == {"champion": reg.version}
    model = registry.load().recommender
    _, broken = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1}, tags={})
    uri = registry.client.get_model_version_download_uri(registry.name, broken)
    for f in Path(uri.removeprefix("file://")).rglob("*.pt"):  # truncated artifacts, as a failed upload leaves
        f.write_bytes(f.read_bytes()[:100])
    registry.set_alias("champion", broken)
    with caplog.at_level("INFO", logger="pipelines.serving"):
        for _ in range(3):  # three polls
            assert holder.refresh() == {"champion": reg.version}  # the shop keeps the working model
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"cannot load champion version {broken}" in errors[0], errors
    assert f"still serving version {reg.version}" in errors[0]
    registry.set_alias("champion", reg.version)  # the alias moves: everything as before
    assert holder.refresh() == {"champion": reg.version} and not holder._unloadable
