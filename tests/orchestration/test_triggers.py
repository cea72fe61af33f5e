"""When to retrain: the evaluation gate's rules, the new-events/drift sensor, the PSI drift check,
and the failure sensor's log."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import numpy as np
import pytest

from orchestration import assets, sensors
from orchestration.resources import LakeResource
from pipelines import drift, lake
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, EVENT_TYPES, new_event
from pipelines.settings import get_settings
from pipelines.training import decide
from tests.orchestration.conftest import catalog_frame, hours_ago, key_of


# --- the evaluation gate -------------------------------------------------------------
@pytest.mark.parametrize(("candidate", "champion", "auto", "alias"), [
    (0.30, None, False, ALIAS_CHAMPION),  # the first model ever
    (0.30, 0.30, False, ALIAS_CHALLENGER),  # as good
    (0.29, 0.30, False, ALIAS_CHALLENGER),  # within the 5% tolerance
    (0.27, 0.30, False, None),  # worse by 10%
    (0.40, 0.30, False, ALIAS_CHALLENGER),  # better, but a person promotes
    (0.40, 0.30, True, ALIAS_CHAMPION),  # better by more than the margin, auto-promote on
    (0.303, 0.30, True, ALIAS_CHALLENGER),  # better by less than the margin
])
def test_gate(candidate, champion, auto, alias):
    got, reason = decide(candidate, champion, tolerance=0.05, margin=0.02, auto_promote=auto)
    assert got == alias, reason


# --- drift -----------------------------------------------------------------------------
def _mix(p, n, seed):
    rng = np.random.default_rng(seed)
    import pandas as pd

    types = rng.choice(list(EVENT_TYPES), size=n, p=p)
    return pd.DataFrame({"event_type": types, "item_id": [f"i{i}" for i in rng.integers(0, 60, n)]})


BASE = [0.5, 0.1, 0.05, 0.3, 0.05]  # view, add_to_cart, purchase, impression, click
SHIFTED = [0.25, 0.2, 0.15, 0.3, 0.1]  # views down, carts and purchases up
SERVED_MORE = [0.25, 0.05, 0.025, 0.6, 0.075]  # twice the impressions (a load test); the shop's own mix unchanged


def test_psi_is_zero_for_equal_mixes_and_grows_with_the_shift():
    assert drift.psi({"a": 10, "b": 30}, {"a": 1, "b": 3}) == pytest.approx(0.0)
    assert drift.psi({"a": 50, "b": 50}, {"a": 60, "b": 40}) < drift.psi({"a": 50, "b": 50}, {"a": 90, "b": 10})
    assert drift.psi({}, {"a": 1}) == 0.0


def test_drift_fires_on_a_shifted_mix_and_not_on_a_same_distribution_sample():
    ref = _mix(BASE, 5000, 0)
    same = drift.event_mix_drift(ref, _mix(BASE, 2000, 1), threshold=0.2, catalog=catalog_frame())
    assert not same.drifted and same.psi["event_type"] < 0.02 and same.psi["category"] < 0.02
    shifted = drift.event_mix_drift(ref, _mix(SHIFTED, 2000, 2), threshold=0.2, catalog=catalog_frame())
    assert shifted.drifted and shifted.psi["event_type"] > 0.2, shifted.summary()
    # impressions and clicks follow serving (load, cache warm-up): they are not the shop's mix drifting
    served = drift.event_mix_drift(ref, _mix(SERVED_MORE, 4000, 4), threshold=0.2, catalog=catalog_frame())
    assert not served.drifted and served.psi["event_type"] < 0.02, served.summary()
    odd_only = _mix(BASE, 2000, 3)
    odd_only["item_id"] = "i1"  # every event on one category
    assert drift.event_mix_drift(ref, odd_only, threshold=0.2, catalog=catalog_frame()).psi["category"] > 0.2


# --- the retrain sensor ----------------------------------------------------------------
def _write(lake_dir, n, start: datetime, span_s: int, p=BASE, seed=0):
    rng = np.random.default_rng(seed)
    t0 = int(start.timestamp() * 1000)
    evs = []
    for j in range(n):
        etype = str(rng.choice(list(EVENT_TYPES), p=p))
        evs.append(new_event(etype, f"u{j % 50}", None if etype == "impression" else f"i{j % 60}", "s",
                             ts=t0 + int(rng.integers(0, span_s * 1000)),
                             items=["i1"] if etype == "impression" else None))
    lake.write_events(lake_dir, evs)


def _evaluate(lake_dir, since: datetime):
    ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=since.isoformat(),
                                  resources={"lake_store": LakeResource(lake_dir=str(lake_dir),
                                                                        catalog_file="/nonexistent.parquet")})
    return sensors.retrain_sensor(ctx), ctx


@pytest.fixture()
def sensor_settings(settings, monkeypatch):
    monkeypatch.setenv("SHOPREC_RETRAIN_MIN_NEW_EVENTS", "300")
    get_settings.cache_clear()
    return get_settings()


def test_sensor_fires_after_n_new_events_and_not_before(sensor_settings):
    s = sensor_settings
    since = datetime.now(timezone.utc) - timedelta(minutes=30)
    _write(s.lake_dir, 500, since - timedelta(hours=3), 3 * 3600)  # before the last training: not new
    _write(s.lake_dir, 299, since + timedelta(seconds=1), 20 * 60, seed=1)
    result, _ = _evaluate(s.lake_dir, since)
    assert isinstance(result, dg.SkipReason) and "299 of 300 new events" in result.skip_message
    _write(s.lake_dir, 1, since + timedelta(minutes=25), 60, seed=2)
    result, ctx = _evaluate(s.lake_dir, since)
    assert isinstance(result, dg.RunRequest), result
    assert "300 new events" in result.tags["shoprec/trigger"]
    assert datetime.fromisoformat(ctx.cursor) > since  # the next count starts from now


def test_sensor_fires_early_when_the_event_mix_drifts(sensor_settings):
    s = sensor_settings
    since = datetime.now(timezone.utc) - timedelta(minutes=30)
    _write(s.lake_dir, 2000, since - timedelta(hours=6), 6 * 3600)
    _write(s.lake_dir, 250, since + timedelta(seconds=1), 20 * 60, seed=1)  # same mix, too few: skip
    assert isinstance(_evaluate(s.lake_dir, since)[0], dg.SkipReason)
    for f in lake.partition_dir(s.lake_dir, key_of(since)).glob("*.parquet"):
        f.unlink()
    for f in lake.partition_dir(s.lake_dir, key_of(since + timedelta(hours=1))).glob("*.parquet"):
        f.unlink()
    _write(s.lake_dir, 250, since + timedelta(seconds=1), 20 * 60, p=SHIFTED, seed=2)
    result, _ = _evaluate(s.lake_dir, since)
    assert isinstance(result, dg.RunRequest) and "drifted" in result.tags["shoprec/trigger"]


# --- the run-failure sensor ------------------------------------------------------------
def _sensor_on_failed_run(run: dg.ExecuteInProcessResult, instance: dg.DagsterInstance, store: LakeResource) -> str:
    """Evaluate ``failure_sensor`` on a failed run, as the daemon does; returns what it added to the run's own log."""
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    ctx = dg.build_run_status_sensor_context(sensor_name="failure_sensor", dagster_instance=instance,
                                             dagster_run=run.dagster_run, dagster_event=failure,
                                             resources={"lake_store": store}).for_run_failure()
    before = len(instance.all_logs(run.run_id))
    sensors.failure_sensor(ctx)
    return "\n".join(e.dagster_event.message if e.dagster_event else e.user_message  # an event's text, as the UI
                     for e in instance.all_logs(run.run_id)[before:])


def _store(s) -> LakeResource:
    return LakeResource(lake_dir=str(s.lake_dir), catalog_file=str(s.catalog_path), quality_dir=str(s.quality_dir))


def test_failure_sensor_writes_the_failed_expectations_to_the_failed_runs_log(settings):
    """It logged them to the sensor's tick log, which nobody looking at the failed run reads."""
    from tests.orchestration.test_lifecycle import _faulty_partition

    s = get_settings()
    hour = hours_ago(2)
    folder = lake.partition_dir(s.lake_dir, key_of(hour))
    folder.mkdir(parents=True)
    _faulty_partition(hour).to_parquet(folder / "faulty.parquet", index=False)
    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize([assets.events], partition_key=key_of(hour), resources={"lake_store": _store(s)},
                         instance=instance, raise_on_error=False)
    text = _sensor_on_failed_run(run, instance, _store(s))
    assert f"run {run.run_id} of {run.dagster_run.job_name} failed" in text
    assert f"partition {key_of(hour)}: FAILED" in text and "expect_column_values_to_be_unique(event_id)" in text
    price = next(line for line in text.splitlines() if "expect_column_values_to_be_between(price)" in line)
    assert "e.g. 100019.9" in price  # a sample of the offending values (19.9 + PRICE_MAX)


def test_failure_sensor_names_the_catalog_when_its_check_stopped_the_run(settings):
    s = get_settings()
    bad = catalog_frame()
    bad.loc[3, "price"] = 0.0
    s.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    bad.to_parquet(s.catalog_path, index=False)
    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize([assets.catalog], resources={"lake_store": _store(s)}, instance=instance,
                         raise_on_error=False)
    text = _sensor_on_failed_run(run, instance, _store(s))
    assert "the catalog: FAILED" in text and "partition catalog" not in text  # it read "partition catalog: FAILED"
    price = next(line for line in text.splitlines() if "expect_column_values_to_be_between(price)" in line)
    assert "1 unexpected" in price and "e.g. 0.0" in price
