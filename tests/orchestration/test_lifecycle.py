"""Materialize the graph in process on a synthetic lake: validation gates training, the evaluation
gate decides the aliases, serving's cache is warmed."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

from orchestration import assets
from pipelines import lake, schemas, training, validation
from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION
from pipelines.serving import cached_list_length
from pipelines.state import OnlineState
from tests.orchestration.conftest import key_of

TRAIN = [assets.catalog, assets.training_interactions, assets.trained_model, assets.popular_fallback,
         assets.served_model]
REPORT_FIELDS = {"partition", "success", "evaluated", "failed", "statistics", "dagster_run_id", "validated_at",
                 "files"}


def _train(resources, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(TRAIN, resources=resources,
                          run_config={"ops": {"trained_model": {"config": {"epochs": 30, "dim": 16, **config}}}})


def _meta(run, node):
    return {k: v.value for k, v in run.asset_materializations_for_node(node)[0].metadata.items()}


def test_training_registers_a_champion_with_tags_and_a_worse_model_gets_no_alias(shop, resources, redis_client):
    s, hours = shop
    checked = dg.materialize([assets.events], partition_key=key_of(hours[0]), resources=resources)
    assert checked.success and checked.get_asset_check_evaluations()[0].passed

    first = _train(resources)
    assert first.success
    meta = _meta(first, "trained_model")
    registry: ModelRegistry = resources["mlflow_registry"].registry()
    version = meta["model_version"]
    assert registry.version_for(ALIAS_CHAMPION) == version and meta["alias"] == ALIAS_CHAMPION
    assert meta["holdout"].startswith("last 1h") and meta["ndcg@10"] > 0.2
    tags = registry.client.get_model_version(registry.name, version).tags
    assert tags["gate_decision"] == ALIAS_CHAMPION and tags["gx_success"] == "true"
    assert tags["dagster_run_id"] == first.run_id and tags["model_family"] == s.train.model == "shoprec"
    assert tags["gx_partitions_used"] == "5"
    # the suites that ran on the window's partitions, and those skipped (volume: too little stream history)
    ran, skipped = ({name: int(n.split("/")[0]) for name, n in (x.split(" ") for x in tags[t].split(",") if x)}
                    for t in ("gx_suites", "gx_suites_skipped"))
    assert ran["events"] == ran["events_window"] == 5
    assert skipped["events_volume"] > 0 and ran.get("events_volume", 0) + skipped["events_volume"] == 5
    assert pd.Timestamp(tags["data_window_start"]) >= pd.Timestamp(hours[0])
    assert pd.Timestamp(tags["data_window_end"]) < pd.Timestamp(hours[-1]) + pd.Timedelta(hours=1)
    run = registry.client.get_run(meta["mlflow_run_id"])
    assert run.data.params["epochs"] == "30" and run.data.params["model"] == "shoprec"
    # the embedding part's training loss, one value per epoch, falling
    losses = [m.value for m in registry.client.get_metric_history(meta["mlflow_run_id"], "embed_train_loss")]
    assert len(losses) == 30 and losses[-1] < losses[0]

    # every partition was validated once and has its quality report for the dashboard
    for hour in hours:
        report = json.loads((s.quality_dir / f"{key_of(hour)}.json").read_text())
        assert set(report) == REPORT_FIELDS and report["success"] and report["partition"] == key_of(hour)
    assert json.loads((s.quality_dir / f"{key_of(hours[0])}.json").read_text())["dagster_run_id"] == checked.run_id
    # the hours training validated itself link to the training run (the data-quality page's run link)
    assert json.loads((s.quality_dir / f"{key_of(hours[1])}.json").read_text())["dagster_run_id"] == first.run_id

    # serving's cache holds the champion's top-N for the most active users, in serving's payload, under its rules
    served = _meta(first, "served_model")
    assert served["champion_users_warmed"] > 0 and served["champion_version"] == version
    state = OnlineState(redis_client)
    top_user = training.active_users(training.build_interactions(lake.read_all(s.lake_dir)), 1)[0]
    cached = state.get_cached(top_user, ALIAS_CHAMPION)
    assert cached["model_version"] == version and cached["n"] == cached_list_length(s, s.warm_cache_k)
    assert set(cached["items"][0]) == {"item_id", "score"}
    # this shop has two categories: at most 3 of each in the top 10 leaves a list of 6
    parity = [int(i["item_id"][1:]) % 2 for i in cached["items"]]
    assert len(parity) == 2 * s.max_per_category and sorted(parity) == [0, 0, 0, 1, 1, 1]
    assert len(state.popular_fallback(10)) == 10

    # a worse model (popularity ignores the taste groups) is registered but gets no alias
    second = _train(resources, model="popularity")
    assert second.success
    worse = _meta(second, "trained_model")
    assert worse["alias"] == "none" and not worse["promoted_to_champion"]
    assert worse["holdout_ndcg"] < worse["champion_holdout_ndcg"] * 0.95
    assert registry.version_for(ALIAS_CHAMPION) == version
    assert registry.version_for(ALIAS_CHALLENGER) is None
    assert registry.client.get_model_version(registry.name, worse["model_version"]).tags["gate_decision"] == "rejected"


def _faulty_partition(hour) -> pd.DataFrame:
    """A partition with prices above the bound, future timestamps and 30% duplicated event ids (the lake's types:
    a file of other types is named by the schema check and left out of the suites)."""
    from tests.orchestration.conftest import taste_events

    df = pd.DataFrame(taste_events([hour], n_users=40, per_user=10, seed=3))
    n = len(df)
    dup = int(n * 0.15)
    df.loc[:dup - 1, "event_id"] = df["event_id"].iloc[n - dup:].to_numpy()  # 30% of rows share an id
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
    df.loc[dup:dup + 4, "ts"] = pd.Timestamp(hour) + pd.Timedelta(hours=5)  # in the future of the hour
    df["price"] = df["price"] + schemas.PRICE_MAX
    for col in ("quantity", "request_id", "variant", "model_version", "items"):
        df[col] = None
    df["schema_version"] = 1
    return df


def test_a_faulty_partition_fails_its_blocking_check_and_training_leaves_it_out(shop, resources):
    s, hours = shop
    bad = hours[2]
    folder = lake.partition_dir(s.lake_dir, key_of(bad))
    for f in folder.glob("*.parquet"):
        f.unlink()
    _faulty_partition(bad).to_parquet(folder / "faulty.parquet", index=False)
    typed = _faulty_partition(bad).head(5).assign(price="12.50 EUR")  # exported by hand with price as text
    typed.to_parquet(folder / "export.parquet", index=False)

    run = dg.materialize([assets.events], partition_key=key_of(bad), resources=resources, raise_on_error=False)
    assert not run.success  # the blocking check stops the run
    [check] = run.get_asset_check_evaluations()
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    failed = set(check.metadata["failed_expectations"].value)
    rel = lake.partition_dir(s.lake_dir, key_of(bad)).relative_to(s.lake_dir).as_posix() + "/export.parquet"
    assert {"expect_column_values_to_be_unique(event_id)", "expect_column_values_to_be_between(ts)",
            "expect_column_values_to_be_between(price)", f"file_matches_lake_schema({rel})"} <= failed
    summary = check.metadata["summary"].value  # what pandas writes text as depends on its version: (large_)string
    assert f"{rel} does not fit the lake schema: price is " in summary and "string (double expected)" in summary
    assert check.description == summary  # what the Dagster UI shows beside the check's status
    row = next(line for line in check.metadata["failures"].value.splitlines() if rel in line)
    assert "| 5 rows | price is " in row and "string (double expected)" in row  # the problem, not the file's path
    assert check.metadata["sample_rows"].value  # whole offending rows for a person to look at
    report = validation.read_report(s.quality_dir, key_of(bad))
    assert report["success"] is False and report["dagster_run_id"] == run.run_id
    dups = next(f for f in report["failed"] if f["expectation_type"] == "expect_column_values_to_be_unique")
    assert dups["unexpected_percent"] == pytest.approx(30, abs=1)

    features = dg.materialize([assets.catalog, assets.training_interactions], resources=resources)
    meta = _meta(features, "training_interactions")
    assert meta["partitions_left_out"] == [key_of(bad)] and meta["partitions_used"] == 4
    assert meta["gx_success"] is False
    df = features.output_for_node("training_interactions")
    assert not (pd.to_datetime(df["ts"], utc=True).dt.floor("h") == pd.Timestamp(bad)).any()
