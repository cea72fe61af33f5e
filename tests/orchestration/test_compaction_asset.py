"""The ``events`` asset compacts the hour's committed consumer files before it validates them."""

from __future__ import annotations

import dagster as dg

from orchestration import assets
from orchestration.resources import LakeResource
from pipelines import lake, validation
from pipelines.settings import get_settings
from tests.orchestration.conftest import hours_ago, key_of
from tests.pipelines.test_compaction import _consumer_files, _topic_with_commits


def test_the_events_asset_compacts_the_hour_before_validating_it(settings, monkeypatch):
    monkeypatch.setenv("SHOPREC_LAKE_COMPACT_MIN_AGE_S", "0")
    get_settings.cache_clear()
    s = get_settings()
    topic, log = _topic_with_commits(s, {0: 40})
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", topic)
    get_settings.cache_clear()
    hour = hours_ago(2)
    folder = lake.partition_dir(s.lake_dir, key_of(hour))
    _consumer_files(s.lake_dir, hour, 0, 0, 25, log=log, topic=topic)  # offsets 0..49: 0..39 committed
    rows = validation.partition_rows(s.lake_dir, key_of(hour), stream_only=True)
    store = LakeResource(lake_dir=str(s.lake_dir), catalog_file=str(s.catalog_path), quality_dir=str(s.quality_dir))

    run = dg.materialize([assets.events], partition_key=key_of(hour), resources={"lake_store": store},
                         raise_on_error=False)

    mat = run.asset_materializations_for_node("events")[0]
    assert mat.metadata["compacted_files"].value == 20 and mat.metadata["rows"].value == 50
    names = sorted(f.name for f in folder.glob("*.parquet"))
    assert len(names) == 6 and names[0].startswith(f"{lake.COMPACTED_PREFIX}-")
    assert validation.partition_rows(s.lake_dir, key_of(hour), stream_only=True) == rows == 50
