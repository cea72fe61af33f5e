"""The cached per-partition lake summaries give the same numbers as the raw lake computations, and the
one-round-trip Redis reads give the same numbers as the per-key ones."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from pipelines import dashboard_agg as ag
from pipelines import dashboard_data as dd
from pipelines.lake import write_events
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, RedisKeys, new_event
from pipelines.simulator import make_catalog
from pipelines.state import BUCKET_S, OnlineState

H = 3_600_000
NOW_S = 1_800_000_000.0 + 1800  # half past an hour
NOW = int(NOW_S * 1000)


def imp(rid, user, variant, ts, items=("i00001", "i00002"), tag=None):
    return new_event("impression", user, None, "s", ts=ts, request_id=rid, variant=variant, items=list(items),
                     experiment=tag)


def ab_lake(lake) -> None:
    """Four hourly partitions; purchases an hour after their impression, a request logged twice, impressions
    without request id or variant, a purchase of a list shown outside the window and one without a request."""
    events = []
    for h in range(4):
        t = NOW - (3 - h) * H
        for j in range(6):
            v = ALIAS_CHAMPION if j % 2 else ALIAS_CHALLENGER
            tag = None if h < 2 else f"default@champion.1:challenger.{h}"  # two later comparisons name their versions
            events.append(imp(f"r{h}-{j}", f"u{j + h}", v, t - j * 1000, tag=tag))
    events += [
        imp("r0-1", "u1", ALIAS_CHAMPION, NOW - 2 * H),  # the same request again, an hour later
        imp(None, "u50", ALIAS_CHAMPION, NOW - H), imp("r-nov", "u51", None, NOW - H),
        imp("r-old", "u52", ALIAS_CHAMPION, NOW - 30 * H),  # outside a 4 h window
        new_event("purchase", "u0", "i1", "s", ts=NOW - 2 * H, price=9.5, quantity=2, request_id="r0-1"),
        new_event("purchase", "u0", "i2", "s", ts=NOW - H, price=3.0, request_id="r0-1"),
        new_event("purchase", "u2", "i2", "s", ts=NOW - 3 * H, price=7.25, quantity=1, request_id="r0-2"),
        new_event("purchase", "u3", "i2", "s", ts=NOW, price=1.0, quantity=4, request_id="r3-5"),
        new_event("purchase", "u9", "i2", "s", ts=NOW, price=100.0, quantity=1, request_id="r-old"),
        new_event("purchase", "u9", "i2", "s", ts=NOW, price=100.0, quantity=1),
        new_event("view", "u9", "i2", "s", ts=NOW),
    ]
    write_events(lake, events)


def assert_same_ab(got: dd.LakeAB, want: dd.LakeAB) -> None:
    assert got.users == want.users
    assert list(got.revenue) == list(want.revenue)
    for v in want.revenue:
        np.testing.assert_array_equal(got.revenue[v], want.revenue[v])


def test_ab_summaries_equal_the_raw_lake_and_follow_new_files(tmp_path):
    lake, cache = tmp_path / "lake", tmp_path / "cache"
    ab_lake(lake)
    want = dd.fetch_lake_ab(lake, hours=4, now_s=NOW_S)
    assert want.of("default", "default").revenue[ALIAS_CHAMPION].sum() == pytest.approx(2 * 9.5 + 3.0)
    later = want.of("default@champion.1:challenger.3", "default")  # the comparison of the last hour alone
    assert later.revenue[ALIAS_CHAMPION].sum() == pytest.approx(4.0) and later.users == {ALIAS_CHAMPION: 3,
                                                                                         ALIAS_CHALLENGER: 3}
    first = ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S)
    assert_same_ab(first, want)
    assert len(list((cache / "ab").iterdir())) == 4  # one summary per partition, stored
    assert_same_ab(ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S), want)  # read back from the cache
    assert_same_ab(ag.fetch_lake_ab(lake, None, hours=4, now_s=NOW_S), want)
    assert_same_ab(ag.fetch_lake_ab(lake, cache, hours=40, now_s=NOW_S), dd.fetch_lake_ab(lake, hours=40, now_s=NOW_S))

    # a new file in the current hour: that partition is summarized again, the others come from the cache
    write_events(lake, [imp("r-new", "u77", ALIAS_CHALLENGER, NOW - 60_000),
                        new_event("purchase", "u77", "i1", "s", ts=NOW, price=20.0, request_id="r-new")])
    after = ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S)
    assert_same_ab(after, dd.fetch_lake_ab(lake, hours=4, now_s=NOW_S))
    untagged = "\t" + ALIAS_CHALLENGER  # lake_ab_key of an impression without a tag
    assert after.users[untagged] == first.users[untagged] + 1
    assert all(len(list(d.glob("*.arrow"))) == 3 for d in (cache / "ab").iterdir())  # the stale one is gone

    # an hour later the oldest partition leaves the window and its summary is dropped
    ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S + 2 * 3600)
    assert len(list((cache / "ab").iterdir())) == 3
    assert ag.fetch_lake_ab(tmp_path / "none", cache, hours=4, now_s=NOW_S) == dd.LakeAB()


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    lake, cache = tmp_path / "lake", tmp_path / "cache"
    ab_lake(lake)
    want = ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S)
    bad = sorted((cache / "ab").rglob("*.arrow"))
    assert bad, "the first read should have cached a summary per lake partition"
    for f in bad:
        f.write_bytes(b"not arrow")
    assert_same_ab(ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S), want)
    rebuilt = sorted((cache / "ab").rglob("*.arrow"))
    assert rebuilt and all(f.read_bytes() != b"not arrow" for f in rebuilt)  # rewritten, not just read around


def new_items_lake(lake, catalog_path, *, with_late: bool) -> None:
    catalog = make_catalog(4, seed=1, start_ms=NOW - 40 * 86_400_000)
    old = catalog["item_id"].tolist()
    new = pd.DataFrame({"item_id": ["n1", "n2", "n3", "future"],
                        "created_at": [NOW - 30 * H, NOW - 10 * H, NOW - 2 * H - 1, NOW + H]})
    if with_late:
        new = pd.concat([new, pd.DataFrame({"item_id": ["late"], "created_at": [NOW - 3 * H]})])
    pd.concat([catalog[["item_id", "created_at"]], new], ignore_index=True).to_parquet(catalog_path)
    if with_late:
        return
    events = []
    for h in range(-40, 1, 3):  # impressions every 3 h over 40 h, a few products each
        t = NOW + h * H - 5 * 60_000
        events.append(imp(f"q{h}", "u1", ALIAS_CHAMPION, t, items=[old[h % 4], "n1", "n2", "n3", "future", "late"]))
        events.append(imp(f"p{h}", "u2", ALIAS_CHALLENGER, t + 1000, items=[old[(h + 1) % 4], old[h % 4]]))
    events += [new_event("click", "u1", item, "s", ts=NOW - hours * H)
               for item, hours in (("n2", 9), ("n3", 3), ("n1", 2), ("late", 1))]
    events.append(imp("empty", "u3", ALIAS_CHAMPION, NOW - H, items=[]))
    write_events(lake, events)


def assert_same_report(got: dd.NewItemReport, want: dd.NewItemReport) -> None:
    for f in ("new_items", "with_impression", "median_first_impression_s", "median_first_click_s", "clicked",
              "new_slots", "all_slots", "explore_share", "launched_in_window", "shown_in_window", "window_start_ms"):
        assert getattr(got, f) == pytest.approx(getattr(want, f)), f
    pd.testing.assert_frame_equal(got.hourly, want.hourly)


def test_new_item_summaries_equal_the_raw_lake(tmp_path):
    lake, cache, catalog = tmp_path / "lake", tmp_path / "cache", tmp_path / "catalog.parquet"
    new_items_lake(lake, catalog, with_late=False)
    args = dict(age_h=24.0, explore_share=0.1, hours=49, now_s=NOW_S)
    want = dd.fetch_new_item_report(catalog, lake, **args)
    # n2 and n3 are new ("future" is not launched yet); n3's click came before its launch
    assert (want.new_items, want.with_impression, want.clicked) == (2, 2, 1)
    assert want.new_slots > 0 and not want.hourly.empty
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **args), want)
    # the product "late" is shown before the catalog knows it: only the 3 hours with clicks alone are cached...
    assert len(list((cache / "new_items").rglob("*.arrow"))) == 3 * len(ag.NEW_ITEM_TABLES)
    new_items_lake(lake, catalog, with_late=True)
    # ...so when the catalog catches up, the report counts it like the raw computation does
    want = dd.fetch_new_item_report(catalog, lake, **args)
    assert (want.new_items, want.with_impression, want.clicked) == (3, 3, 2)
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **args), want)
    n_parts = len(ag.window_partitions(lake, NOW_S - 49 * 3600, NOW_S + 3600))
    assert len(list((cache / "new_items").iterdir())) == n_parts > 10
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **args), want)  # from the cache
    other_age = dict(args, age_h=6.0, hours=13)  # another age: its own summaries
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **other_age),
                       dd.fetch_new_item_report(catalog, lake, **other_age))
    assert ag.fetch_new_item_report(tmp_path / "no.parquet", lake, cache, **args) is None
    empty = ag.fetch_new_item_report(catalog, tmp_path / "none", cache, **args)
    assert empty.all_slots == 0 and empty.hourly.empty and empty.with_impression == 0


M = 60_000


def backfill_history(lake, catalog_path, *, start: int) -> list[str]:
    """What ``shoprec stack up`` makes of an empty lake, then the stream's first impression: 12 h of the
    simulator's backfill ending at ``start`` (products appear meanwhile, with no impression: the backfill has no
    recommender), then 5 min after ``start`` an impression of the three newest backfilled products and a click on
    the newest. Returns the backfilled products' ids."""
    from pipelines.simulator import ShopSimulator

    sim = ShopSimulator(make_catalog(50, seed=1, start_ms=start - 60 * 86_400_000), n_users=50, seed=3, id_seed=7)
    sim.backfill(lake, days=0.5, events_per_day=2_000, end_ms=start, progress=False, catalog_path=catalog_path)
    backfilled = [it["item_id"] for it in sim.new_items]
    assert len(backfilled) >= 3 and all(start - 12 * H <= it["created_at"] <= start for it in sim.new_items)
    write_events(lake, [imp("s-0", "u1", ALIAS_CHAMPION, start + 5 * M, items=["i00001", *backfilled[-3:]]),
                        new_event("click", "u1", backfilled[-1], "s", ts=start + 6 * M, request_id="s-0",
                                  variant=ALIAS_CHAMPION)])
    return backfilled


def launch_live(lake, catalog_path, *, start: int) -> None:
    """Two launches the stream sees (:func:`backfill_history`'s ``start`` on): ``live1`` 10 min in, shown 5 min and
    clicked 8 min after its launch; ``live2`` 25 min in, not shown yet."""
    from pipelines.simulator import add_to_catalog

    row = pd.read_parquet(catalog_path).iloc[:1]
    add_to_catalog(pd.concat([row.assign(item_id="live1", created_at=start + 10 * M),
                              row.assign(item_id="live2", created_at=start + 25 * M)]), catalog_path)
    write_events(lake, [imp("s-1", "u2", ALIAS_CHALLENGER, start + 15 * M, items=["live1", "i00002"]),
                        new_event("click", "u2", "live1", "s", ts=start + 18 * M, request_id="s-1",
                                  variant=ALIAS_CHALLENGER)])


def test_a_backfill_s_products_are_not_timed_and_the_summaries_agree(tmp_path):
    """Shown minutes after the stream started, the backfilled products waited hours since their simulated launch:
    that wait measures the stream's start, so only launches after the first impression are timed."""
    lake, cache, catalog = tmp_path / "lake", tmp_path / "cache", tmp_path / "catalog.parquet"
    start = NOW - 30 * M
    backfilled = backfill_history(lake, catalog, start=start)
    args = dict(age_h=24.0, explore_share=0.1, hours=49, now_s=NOW_S)
    want = dd.fetch_new_item_report(catalog, lake, **args)
    assert (want.new_items, want.with_impression, want.launched_in_window) == (len(backfilled), 3, 0)
    assert want.window_start_ms == start + 5 * M
    assert want.median_first_impression_s is None and want.median_first_click_s is None and want.clicked == 0
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **args), want)

    launch_live(lake, catalog, start=start)
    want = dd.fetch_new_item_report(catalog, lake, **args)
    assert (want.new_items, want.launched_in_window, want.shown_in_window) == (len(backfilled) + 2, 2, 1)
    assert want.median_first_impression_s == 5 * 60 and want.median_first_click_s == 8 * 60 and want.clicked == 1
    assert_same_report(ag.fetch_new_item_report(catalog, lake, cache, **args), want)


def test_build_summaries_fills_the_cache(tmp_path):
    lake, cache = tmp_path / "lake", tmp_path / "cache"
    ab_lake(lake)
    new_items_lake(lake, tmp_path / "catalog.parquet", with_late=True)
    assert ag.build_summaries(lake, cache, tmp_path / "catalog.parquet", hours=4, age_h=24, now_s=NOW_S) == 4
    assert len(list((cache / "ab").iterdir())) == 4 and (cache / "new_items").is_dir()


def test_summarize_partition_fills_one_hour(tmp_path):
    from pipelines.lake import partition_key

    lake, cache = tmp_path / "lake", tmp_path / "cache"
    ab_lake(lake)
    new_items_lake(lake, tmp_path / "catalog.parquet", with_late=True)
    key = partition_key(NOW - 3 * H)
    rows = ag.summarize_partition(lake, cache, tmp_path / "catalog.parquet", key, age_h=24)
    assert rows == {"ab_impressions": 6, "ab_purchases": 1, "ab_users": 6, "skipped_files": 0, "new_items_slots": 6,  # one row per time
                    "new_items_first_impression": 2, "new_items_first_click": 0}
    assert len(list((cache / "ab").iterdir())) == 1
    ag.summarize_partition(lake, cache, tmp_path / "catalog.parquet", partition_key(NOW), age_h=24)
    assert len(list((cache / "ab").iterdir())) == 2  # the older hour is kept
    assert_same_ab(ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S), dd.fetch_lake_ab(lake, hours=4, now_s=NOW_S))


def test_minute_counts_and_ab_counts_in_one_round_trip(redis_client):
    state = OnlineState(redis_client)
    now = time.time()
    b = int(now) // BUCKET_S * BUCKET_S
    tag = state.experiment
    for ago, counts in ((0, {"impressions": 5, "clicks": 1}), (3, {"impressions": 2}), (9, {"clicks": 4})):
        redis_client.hset(RedisKeys.counter(dd.ab_stats_name(tag, ALIAS_CHAMPION), b // BUCKET_S - ago),
                          mapping=counts)
    state.incr_stats(dd.ab_stats_name(tag, ALIAS_CHALLENGER), {"impressions": 7})
    got = dd.fetch_minute_counts(state, dd.ab_stats_name(tag, ALIAS_CHAMPION), ("impressions", "clicks"), 10, now)
    want = dd.buckets_to_frame(state.read_stats(dd.ab_stats_name(tag, ALIAS_CHAMPION), 10), ("impressions", "clicks"),
                               minutes=10, now_s=now)
    pd.testing.assert_frame_equal(got, want)
    assert got["impressions"].sum() == 7 and got["clicks"].sum() == 5
    assert dd.fetch_minute_counts(state, "nothing", ("x",), 3, now)["x"].tolist() == [0, 0, 0]

    for v, n in ((ALIAS_CHAMPION, 3), (ALIAS_CHALLENGER, 4)):
        state.r.hset(RedisKeys.ab(state.experiment, v), mapping={"impressions": n, "clicks": 1})
    assert dd.fetch_ab_counts(state, tag) == state.ab_counts() == {
        ALIAS_CHAMPION: {"impressions": 3, "clicks": 1}, ALIAS_CHALLENGER: {"impressions": 4, "clicks": 1}}


def test_a_file_that_does_not_fit_is_left_out_and_reported_from_the_cache_too(tmp_path):
    from pipelines.lake import partition_dir, partition_key
    from tests.dashboard.test_dashboard_data import write_misfit

    lake, cache = tmp_path / "lake", tmp_path / "cache"
    ab_lake(lake)
    want = ag.fetch_lake_ab(lake, None, hours=4, now_s=NOW_S)
    good = max(lake.rglob("*.parquet"))
    write_misfit(good, "import-price.parquet", "price", "n/a")
    # an hour, a month later, that holds nothing but a misfit
    later = NOW + 30 * 24 * H
    write_misfit(good, "only.parquet", "ts", 1, folder=partition_dir(lake, partition_key(later)))
    for _ in range(2):  # summarized, then from the cache
        got = ag.fetch_lake_ab(lake, cache, hours=4, now_s=NOW_S)
        assert_same_ab(got, want)
        assert [(s.path.rsplit("/", 1)[-1], s.column) for s in got.skipped] == [("import-price.parquet", "price")]
    far = ag.fetch_lake_ab(lake, cache, hours=1, now_s=later / 1000)
    assert far.revenue == {} and [s.column for s in far.skipped] == ["ts"]


def test_lake_version_changes_when_a_file_arrives_and_only_then(tmp_path):
    lake = tmp_path / "lake"
    empty = ag.lake_version(lake, hours=4, now_s=NOW_S)
    ab_lake(lake)
    first = ag.lake_version(lake, hours=4, now_s=NOW_S)
    assert first != empty and ag.lake_version(lake, hours=4, now_s=NOW_S + 60) == first
    write_events(lake, [imp("r-new", "u77", ALIAS_CHALLENGER, NOW - 60_000)])
    assert ag.lake_version(lake, hours=4, now_s=NOW_S + 60) != first
