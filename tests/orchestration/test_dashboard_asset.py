"""The hourly `dashboard_summaries` asset writes the summaries the dashboard then reads instead of the raw lake."""

from __future__ import annotations

import time

import dagster as dg

from orchestration import assets
from orchestration.resources import LakeResource
from pipelines import dashboard_agg as ag
from pipelines import dashboard_data as dd
from pipelines import lake
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, new_event
from pipelines.settings import get_settings
from tests.dashboard.test_dashboard_agg import assert_same_ab
from tests.orchestration.conftest import hours_ago, key_of


def shown_and_bought(hours) -> list[dict]:
    events = []
    for h, hour in enumerate(hours):
        t = int(hour.timestamp() * 1000) + 60_000
        for j in range(6):
            variant = ALIAS_CHAMPION if j % 2 else ALIAS_CHALLENGER
            events.append(new_event("impression", f"u{j + h}", None, "s", ts=t + j, request_id=f"r{h}-{j}",
                                    variant=variant, items=["i00001", "i00002"]))
        events.append(new_event("purchase", f"u{h}", "i00001", "s", ts=t + 1000, price=9.5, quantity=2,
                                request_id=f"r{h}-0"))
    return events


def test_the_asset_summarises_each_hour_and_the_dashboard_reads_the_same_numbers(settings):
    s = get_settings()
    hours = [hours_ago(n) for n in (3, 2, 1)]
    lake.write_events(s.lake_dir, shown_and_bought(hours))
    store = LakeResource(lake_dir=str(s.lake_dir), catalog_file=str(s.catalog_path), quality_dir=str(s.quality_dir))
    for hour in hours:
        run = dg.materialize([assets.dashboard_summaries], partition_key=key_of(hour), resources={"lake_store": store})
        assert run.success
        meta = run.asset_materializations_for_node("dashboard_summaries")[0].metadata
        assert meta["ab_impressions"].value == 6 and meta["ab_purchases"].value == 1

    cache = ag.cache_dir(s)
    summarised = {p.name for p in cache.rglob("*") if p.is_file()}
    assert summarised  # the asset wrote the summaries ...
    now = time.time()
    got = ag.fetch_lake_ab(s.lake_dir, cache, hours=5, now_s=now)
    assert {p.name for p in cache.rglob("*") if p.is_file()} == summarised  # ... and the page only read them
    assert_same_ab(got, dd.fetch_lake_ab(s.lake_dir, hours=5, now_s=now))
    users = got.of(s.ab_experiment, s.ab_experiment).users  # untagged impressions: the experiment's own comparison
    assert users[ALIAS_CHAMPION] > 0 and users[ALIAS_CHALLENGER] > 0
