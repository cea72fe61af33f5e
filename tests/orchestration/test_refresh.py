"""The hourly refresh_job in process on a synthetic lake: nothing to do before the first champion,
then the champion's item-to-item part is refreshed from the validated partitions, registered as a
new version and served through the same alias."""

from __future__ import annotations

import dagster as dg

from orchestration import assets
from orchestration.definitions import defs
from orchestration.jobs import refresh_job
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION
from tests.orchestration.conftest import key_of


def _meta(run, node):
    return {k: v.value for k, v in run.asset_materializations_for_node(node)[0].metadata.items()}


def _refresh_job(resources) -> dg.ExecuteInProcessResult:
    """The repository's refresh_job, with the test's resources bound."""
    job_defs = dg.Definitions(assets=list(defs.assets), jobs=[refresh_job], resources=resources)
    return job_defs.resolve_job_def("refresh_job").execute_in_process()


def test_refresh_job_waits_for_a_champion_then_refreshes_it_and_moves_the_alias(shop, resources):
    s, hours = shop
    registry: ModelRegistry = resources["mlflow_registry"].registry()

    # no champion yet: the hourly run succeeds and says so, and registers nothing
    idle = _refresh_job(resources)
    assert idle.success
    meta = _meta(idle, "itemitem_refresh")
    assert "nothing to refresh" in meta["note"] and meta["aliases_moved"] == "none"
    assert registry.version_for(ALIAS_CHAMPION) is None
    assert "top_10" in _meta(idle, "trending")

    # the daily retrain made a champion from the hours before the last one
    trained = dg.materialize(
        [assets.catalog, assets.training_interactions, assets.trained_model], resources=resources,
        run_config={"ops": {"training_interactions": {"config": {"end": hours[-2].isoformat()}},
                            "trained_model": {"config": {"epochs": 10, "dim": 16}}}})
    champion = _meta(trained, "trained_model")["model_version"]
    assert registry.version_for(ALIAS_CHAMPION) == champion

    # an hour later: the refresh reads all five validated hours, is not worse, and takes `champion`
    run = _refresh_job(resources)
    assert run.success
    meta = _meta(run, "itemitem_refresh")
    new = meta["champion_new_version"]
    assert meta["champion_status"] == "refreshed" and meta["champion_alias_moved"], meta["champion_note"]
    assert meta["champion_refreshed_version"] == champion and new != champion
    assert registry.version_for(ALIAS_CHAMPION) == new and meta["aliases_moved"] == ALIAS_CHAMPION
    assert meta["partitions_used"] == 5 and meta["window_rows"] > 0 and meta["holdout"].startswith("last 1h")
    assert meta["champion_rows"] > 0 and meta["champion_seconds"] > 0
    assert meta["champion_holdout_ndcg_after"] >= meta["champion_holdout_ndcg_before"] * (1 - s.challenger_tolerance)
    assert meta["challenger_status"] == "skipped" and "no `challenger`" in meta["challenger_note"]
    tags = registry.tags(new)
    assert tags["refresh_of"] == champion and tags["gate_decision"] == ALIAS_CHAMPION
    assert tags["gx_success"] == "true" and tags["gx_partitions_used"] == "5"
    assert tags["dagster_run_id"] == run.run_id and tags["refresh_window_end"].startswith(key_of(hours[-1])[:10])
    assert registry.client.get_run(meta["champion_mlflow_run_id"]).data.params["refresh_of"] == champion

    # the next hour with no new events: nothing is registered, the run still succeeds
    again = _meta(_refresh_job(resources), "itemitem_refresh")
    assert again["champion_status"] == "skipped" and "no new events" in again["champion_note"]
    assert registry.version_for(ALIAS_CHAMPION) == new
