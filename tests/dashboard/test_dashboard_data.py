"""The dashboard's computations (pure functions) and its fetch functions against real Redis / MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2_contingency

from pipelines import dashboard_data as dd
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, LATENCY_EDGES_MS, RedisKeys
from pipelines.state import BUCKET_S, OnlineState

NOW = 1_800_000_000.0  # a minute boundary plus 0 s
B = int(NOW) // BUCKET_S * BUCKET_S  # start of the current bucket


def test_counter_names_are_the_serving_contract():
    assert (dd.STATS_REQUESTS, dd.STATS_CACHE) == ("requests", "cache")
    assert dd.REQUEST_SOURCES == ("cache", "model", "fallback")
    assert dd.COLD_FIELDS == ("cold_user", "cold_user_session", "cold_user_trending")
    assert (dd.CACHE_HIT, dd.CACHE_MISS) == ("hit", "miss")
    assert dd.ab_stats_name("exp@champion.1:challenger.2", "challenger") == "ab:exp@champion.1:challenger.2:challenger"


def test_rate_pct_totals():
    assert dd.rate(1, 4) == 0.25 and dd.rate(3, 0) is None
    assert dd.pct(0.1234) == "12.3 %" and dd.pct(0.05, 2) == "5.00 %"
    assert dd.pct(None) == dd.pct(math.nan) == "–"
    assert dd.totals({B: {"hit": 2}, B - 60: {"hit": 1, "miss": 4, "other": 9}}, ["hit", "miss"]) == {"hit": 3, "miss": 4}
    assert dd.totals({}, ["hit"]) == {"hit": 0}


def test_buckets_to_frame_fills_missing_minutes_and_drops_old_ones():
    buckets = {B: {"hit": 3}, B - 120: {"hit": 1, "miss": 2}, B - 3600: {"hit": 100}}
    df = dd.buckets_to_frame(buckets, ["hit", "miss"], minutes=60, now_s=NOW + 30)
    assert len(df) == 60 and df.index.name == "minute"
    assert df.index.is_monotonic_increasing and str(df.index.tz) == "UTC"
    assert df.index[-1] == pd.Timestamp(B, unit="s", tz="UTC")
    assert df["hit"].sum() == 4 and df["miss"].sum() == 2  # the bucket an hour ago is outside the window
    assert df.loc[pd.Timestamp(B - 120, unit="s", tz="UTC")].tolist() == [1, 2]
    assert (df.dtypes == "int64").all()


def test_ab_table_orders_variants_and_computes_rates():
    counts = {"zeta": {"impressions": 10, "clicks": 1}, ALIAS_CHALLENGER: {"impressions": 200, "clicks": 20,
                                                                            "purchases": 4},
              ALIAS_CHAMPION: {"impressions": 100, "clicks": 5, "carts": 2, "purchases": 1}, "empty": {"clicks": 3}}
    t = dd.ab_table(counts)
    assert list(t.index) == [ALIAS_CHAMPION, ALIAS_CHALLENGER, "empty", "zeta"]
    assert t.loc[ALIAS_CHAMPION, "ctr"] == pytest.approx(0.05)
    assert t.loc[ALIAS_CHALLENGER, "conversion"] == pytest.approx(0.02)
    assert t.loc[ALIAS_CHAMPION, "carts"] == 2
    assert math.isnan(t.loc["empty", "ctr"]) and math.isnan(t.loc["empty", "conversion"])
    assert dd.ab_table({}).empty


def test_ab_timeseries_has_a_column_per_variant_and_metric():
    per = {ALIAS_CHALLENGER: {B: {"impressions": 4, "clicks": 1}}, ALIAS_CHAMPION: {B - 60: {"impressions": 7}}}
    ts = dd.ab_timeseries(per, minutes=5, now_s=NOW)
    assert list(ts.columns) == ["champion impressions", "champion clicks", "challenger impressions",
                                "challenger clicks"]
    assert len(ts) == 5 and ts["champion impressions"].sum() == 7 and ts.iloc[-1]["challenger clicks"] == 1
    assert dd.ab_timeseries({}, minutes=5, now_s=NOW).empty


def test_pick_ab_pair():
    assert dd.pick_ab_pair({ALIAS_CHALLENGER: {"impressions": 1}, ALIAS_CHAMPION: {"impressions": 9},
                            "x": {"impressions": 100}}) == (ALIAS_CHAMPION, ALIAS_CHALLENGER)
    assert dd.pick_ab_pair({"a": {"impressions": 5}, "b": {"impressions": 50}, "c": {"impressions": 20}}) == ("b", "c")
    assert dd.pick_ab_pair({ALIAS_CHAMPION: {"impressions": 5}, ALIAS_CHALLENGER: {"impressions": 0}}) is None
    assert dd.pick_ab_pair({}) is None


@pytest.mark.parametrize("n_a,x_a,n_b,x_b", [(1000, 50, 1000, 80), (5000, 400, 4000, 330), (300, 3, 250, 2)])
def test_ctr_ztest_matches_the_chi_square_test(n_a, x_a, n_b, x_b):
    """A pooled two-sided z-test is the 2x2 chi-square test without continuity correction."""
    counts = {ALIAS_CHAMPION: {"impressions": n_a, "clicks": x_a}, ALIAS_CHALLENGER: {"impressions": n_b, "clicks": x_b}}
    r = dd.ctr_ztest(counts)
    chi2, p, _, _ = chi2_contingency([[x_a, n_a - x_a], [x_b, n_b - x_b]], correction=False)
    assert (r.a, r.b) == (ALIAS_CHAMPION, ALIAS_CHALLENGER)
    assert r.p_value == pytest.approx(p, rel=1e-9)
    assert r.z ** 2 == pytest.approx(chi2, rel=1e-9)
    assert math.copysign(1, r.z) == math.copysign(1, x_b / n_b - x_a / n_a)


def test_ctr_ztest_verdicts():
    sig = dd.ctr_ztest({ALIAS_CHAMPION: {"impressions": 1000, "clicks": 50},
                        ALIAS_CHALLENGER: {"impressions": 1000, "clicks": 80}})
    assert sig.significant and sig.p_value < 0.01
    assert sig.verdict.startswith("challenger gets clicked more") and "significant" in sig.verdict
    assert sig.lift == pytest.approx(0.6)

    worse = dd.ctr_ztest({ALIAS_CHAMPION: {"impressions": 1000, "clicks": 80},
                          ALIAS_CHALLENGER: {"impressions": 1000, "clicks": 50}})
    assert worse.significant and worse.verdict.startswith("champion gets clicked more")

    same = dd.ctr_ztest({ALIAS_CHAMPION: {"impressions": 1000, "clicks": 50},
                         ALIAS_CHALLENGER: {"impressions": 1000, "clicks": 52}})
    assert not same.significant and same.verdict.startswith("No significant difference")

    small = dd.ctr_ztest({ALIAS_CHAMPION: {"impressions": 20, "clicks": 0},
                          ALIAS_CHALLENGER: {"impressions": 20, "clicks": 15}})
    assert small.p_value < 0.05 and not small.enough_data and not small.significant
    assert small.verdict.startswith("Not enough data yet")


def test_ctr_ztest_edge_cases():
    assert dd.ctr_ztest({ALIAS_CHAMPION: {"impressions": 100, "clicks": 5}}) is None
    assert dd.ctr_ztest({}) is None
    no_clicks = dd.ctr_ztest({"a": {"impressions": 500}, "b": {"impressions": 400}})
    assert (no_clicks.z, no_clicks.p_value, no_clicks.significant) == (0.0, 1.0, False)
    assert no_clicks.lift is None
    # late impressions: more clicks than impressions are capped instead of giving a rate above 100 %
    capped = dd.ctr_ztest({"a": {"impressions": 100, "clicks": 150}, "b": {"impressions": 100, "clicks": 10}})
    assert capped.ctr_a == 1.0 and 0 <= capped.p_value <= 1
    # explicit pair, one without impressions
    assert dd.ctr_ztest({"a": {"impressions": 10}, "b": {}}, "a", "b") is None


def test_cache_summary_and_timeseries():
    buckets = {B: {"hit": 3, "miss": 1}, B - 60: {"miss": 4}}
    s = dd.cache_summary(buckets)
    assert (s.hits, s.misses, s.lookups) == (3, 5, 8) and s.hit_rate == pytest.approx(3 / 8)
    assert dd.cache_summary({}).hit_rate is None
    ts = dd.cache_timeseries(buckets, minutes=3, now_s=NOW)  # B is the minute in progress: off the line
    assert ts["hit_rate"].tolist()[1:] == [0.0] and math.isnan(ts["hit_rate"].iloc[0])


def test_the_hit_rate_line_leaves_out_the_minute_in_progress_and_the_totals_keep_it():
    """10 s into minute B its first 2 lookups (both hits) would end the line at 100 % after minutes at 50 and 75 %."""
    buckets = {B - 120: {"hit": 10, "miss": 10}, B - 60: {"hit": 30, "miss": 10}, B: {"hit": 2}}
    ts = dd.cache_timeseries(buckets, minutes=4, now_s=NOW + 10)
    assert ts.index[-1] == pd.Timestamp(B - 60, unit="s", tz="UTC")
    assert math.isnan(ts["hit_rate"].iloc[0]) and ts["hit_rate"].tolist()[1:] == [0.5, 0.75]
    assert (ts["hit"].sum(), ts["miss"].sum()) == (40, 20)
    total = dd.cache_summary(buckets)  # the headline counts every lookup, the minute in progress included
    assert (total.hits, total.misses) == (42, 20)
    running = dd.cache_in_progress(buckets, now_s=NOW + 10)
    assert (running.hits, running.misses) == (2, 0)
    # a minute later B has ended: it joins the line, and the new minute in progress has no lookups yet
    later = dd.cache_timeseries(buckets, minutes=4, now_s=NOW + 70)
    assert later.index[-1] == pd.Timestamp(B, unit="s", tz="UTC") and later["hit_rate"].tolist()[-2:] == [0.75, 1.0]
    assert dd.cache_in_progress(buckets, now_s=NOW + 70).lookups == 0


def test_requests_by_source():
    df = dd.requests_by_source({B: {"cache": 2, "model": 5, "cold_user": 4}, B - 60: {"model": 1, "fallback": 2}})
    assert df["requests"].to_dict() == {"cache": 2, "model": 6, "fallback": 2}
    assert df["share"].to_dict() == pytest.approx({"cache": 0.2, "model": 0.6, "fallback": 0.2})
    assert dd.requests_by_source({})["share"].isna().all()
    ts = dd.source_timeseries({B: {"fallback": 2}}, minutes=2, now_s=NOW)
    assert list(ts.columns) == ["cache", "model", "fallback"] and ts["fallback"].tolist() == [0, 2]


def test_cold_start_summary_and_timeseries():
    buckets = {B: {"cache": 10, "model": 30, "fallback": 0, "cold_user": 8, "cold_user_session": 6,
                   "cold_user_trending": 2},
               B - 60: {"model": 10, "cold_user": 2, "cold_user_trending": 2}}
    s = dd.cold_start_summary(buckets)
    assert (s.requests, s.scored, s.cold, s.from_session, s.from_trending) == (50, 40, 10, 6, 4)
    # of the requests the model answered (a cache hit or the fallback says nothing about the user)
    assert (s.cold_share, s.session_share, s.trending_share) == (0.25, 0.6, 0.4)
    empty = dd.cold_start_summary({})
    assert empty.requests == 0 and empty.cold_share is None and empty.session_share is None
    ts = dd.cold_start_timeseries(buckets, minutes=3, now_s=NOW)
    assert ts["requests"].tolist() == [0, 10, 40]
    assert ts["cold_user_trending"].tolist() == [0, 2, 2]
    assert math.isnan(ts["cold_share"].iloc[0]) and ts["cold_share"].tolist()[1:] == [0.2, 8 / 30]
    # the page's share line: complete minutes only (B is in progress at NOW: 8 of its first 30 would end the line)
    line = dd.complete_minutes(ts[["cold_share"]], NOW)
    assert line.index[-1] == pd.Timestamp(B - 60, unit="s", tz="UTC") and line["cold_share"].tolist()[-1] == 0.2
    assert dd.complete_minutes(ts, NOW + 60).index[-1] == pd.Timestamp(B, unit="s", tz="UTC")


def test_dlq_table_and_consumer_summary():
    t = dd.dlq_table({"schema": 2, "invalid_json": 5, "oversized": 2})
    assert list(t.index) == ["invalid_json", "oversized", "schema"] and t["records"].tolist() == [5, 2, 2]
    assert dd.dlq_table({}).empty

    assert dd.consumer_summary({}) is None
    c = dd.consumer_summary({"lag": "7", "rate_eps": "12.5", "consumed": "900", "updated_ts": str(NOW - 5)},
                            now_s=NOW)
    assert (c.lag, c.rate_eps, c.consumed, c.updated_ago_s, c.stale) == (7, 12.5, 900, 5.0, False)
    old = dd.consumer_summary({"lag": "x", "updated_ts": str(NOW - 600)}, now_s=NOW)
    assert old.lag is None and old.rate_eps is None and old.stale
    assert dd.consumer_summary({"lag": "1"}, now_s=NOW).stale  # never said when: treat as stale


def test_redact_url():
    assert dd.redact_url("redis://:pw@host:6380/0") == "redis://:***@host:6380/0"
    assert dd.redact_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert dd.redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert dd.redact_url("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


# --- fetching from real services ---------------------------------------------------------
def test_fetch_snapshot_reads_what_serving_and_the_consumer_write(redis_client):
    from pipelines.schemas import new_event

    state = OnlineState(redis_client, experiment="exp1")
    solo, pair = "exp1@champion.1", "exp1@champion.1:challenger.2"  # the champion alone, then with a challenger
    t0 = int(time.time() * 1000) - 60_000

    def shown(user, variant, tag, ts):
        return new_event("impression", user, None, "s", ts=ts, items=["i1"], request_id=f"r-{user}", variant=variant,
                         model_version=tag[-1], experiment=tag)

    state.apply_events([shown("u1", ALIAS_CHAMPION, solo, t0), shown("u2", ALIAS_CHAMPION, pair, t0 + 1000),
                        shown("u3", ALIAS_CHALLENGER, pair, t0 + 2000),
                        new_event("click", "u3", "i1", "s", request_id="r-u3", variant=ALIAS_CHALLENGER)])
    state.r.hincrby(RedisKeys.ab("other-exp", ALIAS_CHAMPION), "impressions", 99)
    state.incr_stats(dd.STATS_REQUESTS, {"model": 2, "cold_user": 1})
    state.incr_stats(dd.STATS_CACHE, {"miss": 2})
    state.count_dlq({"schema": 1})
    state.set_consumer_status(lag=0, updated_ts=time.time())

    snap = dd.fetch_snapshot(state, minutes=5)
    bucket = int(snap.now_s) // BUCKET_S * BUCKET_S
    assert snap.minutes == 5
    # the latest comparison by default: the champion's traffic from before the challenger is not in it
    assert snap.ab_tag == pair
    assert snap.ab_counts == {ALIAS_CHAMPION: {"impressions": 1}, ALIAS_CHALLENGER: {"impressions": 1, "clicks": 1}}
    assert snap.ab_comparisons == [(pair, t0 + 1000, t0 + 2000), (solo, t0, t0)]
    assert dd.fetch_snapshot(state, 5, solo).ab_counts == {ALIAS_CHAMPION: {"impressions": 1}}
    assert state.read_stats(dd.ab_stats_name(pair, ALIAS_CHALLENGER), 5) == {bucket: {"impressions": 1, "clicks": 1}}
    assert snap.requests == {bucket: {"model": 2, "cold_user": 1}}
    assert snap.cache == {bucket: {"miss": 2}}
    assert snap.dlq_reasons == {"schema": 1} and snap.consumer_status["lag"] == "0"


def test_comparison_labels_name_the_versions_and_when():
    t = 1_796_596_200_000  # 2026-12-06 22:30 UTC
    assert dd.comparison_label("exp1@champion.2:challenger.3") == "champion v2 vs challenger v3"
    assert dd.comparison_label("exp1@champion.2", t, t + 15 * 60_000) == "champion v2 (12-06 22:30 – 22:45 UTC)"
    assert dd.comparison_label("exp1@champion.2", t, t + 86_400_000).endswith("(12-06 22:30 – 12-07 22:30 UTC)")
    assert dd.comparison_label("exp1").startswith("untagged")


def test_fetch_snapshot_raises_when_redis_is_down():
    import redis

    from pipelines.state import connect

    with pytest.raises(redis.RedisError):
        dd.fetch_snapshot(OnlineState(connect("redis://127.0.0.1:1/0")))


def test_fetch_model_aliases(mlflow_with_champion):
    got = dd.fetch_model_aliases(mlflow_with_champion)
    assert got[ALIAS_CHALLENGER] is None
    champ = got[ALIAS_CHAMPION]
    assert (champ.alias, champ.version, champ.metrics) == (ALIAS_CHAMPION, "1", {"ndcg_at_10": 0.3125})
    assert champ.created_ms > 0
    # a model that does not exist: no versions, no error
    assert dd.fetch_model_aliases(mlflow_with_champion, name="not-registered") == {ALIAS_CHAMPION: None,
                                                                                  ALIAS_CHALLENGER: None}


def test_fetch_model_aliases_fails_fast_when_mlflow_is_down():
    assert not dd.mlflow_reachable("http://127.0.0.1:1")
    assert dd.mlflow_reachable("sqlite:///nowhere.db")
    t0 = time.monotonic()
    with pytest.raises(dd.MlflowUnavailable, match="127.0.0.1:1") as err:
        dd.fetch_model_aliases("http://user:pw@127.0.0.1:1")
    assert "pw" not in str(err.value)
    assert time.monotonic() - t0 < 5


# --- overview, cache, lake and quality helpers -----------------------------------------------------
def test_latency_quantiles_are_bucket_upper_edges():
    h = dd.latency_histogram({B: {"5": 10, "10": 80}, B - 60: {"inf": 10, "junk": 3}})
    assert int(h.sum()) == 100 and h.index[-1] == "inf"
    assert dd.latency_quantile(h, 0.5) == 10.0 and dd.latency_quantile(h, 0.05) == 5.0
    assert dd.latency_quantile(h, 0.99) == math.inf
    assert dd.latency_quantile(dd.latency_histogram({}), 0.5) is None
    s = dd.latency_summary({"cache": {B: {"1": 3}}, "model": {B: {"50": 1}}})
    assert s.loc["all", "requests"] == 4 and s.loc["all", "p50_ms"] == 1.0 and s.loc["all", "p99_ms"] == 50.0
    assert math.isnan(s.loc["fallback", "p50_ms"])
    assert (dd.fmt_ms(15.0), dd.fmt_ms(math.inf), dd.fmt_ms(math.nan)) == ("≤ 15 ms", "> 2500 ms", "–")
    assert dd.LATENCY_FIELDS[:-1] == tuple(str(e) for e in LATENCY_EDGES_MS)


def test_requests_per_second_uses_complete_minutes():
    buckets = {B: {"model": 600}, B - 60: {"cache": 30, "model": 30}, B - 300: {"model": 240}, B - 360: {"model": 999}}
    assert dd.requests_per_second(buckets, now_s=NOW + 10) == pytest.approx((60 + 240) / 300)
    assert dd.events_timeseries({B: {"view": 3}}, minutes=2, now_s=NOW)["view"].tolist() == [0, 3]


def test_fmt_age():
    assert [dd.fmt_age(x) for x in (5, 3600, 5 * 3600, 3 * 86_400, None)] == ["5 s", "60 min", "5.0 h", "3.0 d", "–"]


def test_cache_by_variant_and_key_family():
    t = dd.cache_by_variant({B: {"hit": 9, "hit:challenger": 1, "miss:challenger": 3, "hit:champion": 4},
                             B - 60: {"miss:champion": 4}})
    assert list(t.index) == [ALIAS_CHAMPION, ALIAS_CHALLENGER]
    assert t.loc[ALIAS_CHAMPION, "hit_rate"] == 0.5 and t.loc[ALIAS_CHALLENGER, "hit_rate"] == 0.25
    assert dd.cache_by_variant({}).empty
    assert dd.key_family(RedisKeys.counter("latency:cache", 123)) == "stats:latency:cache"
    assert dd.key_family(RedisKeys.ab("exp", "champion")) == "ab:exp"
    assert dd.key_family(RedisKeys.cache("u1")) == "cache" and dd.key_family(RedisKeys.trending) == "trending"


def test_fetch_redis_info(redis_client):
    state = OnlineState(redis_client)
    state.incr_stats("cache", {"hit": 1})
    state.set_cached("u1", "champion", {"items": []})
    info = dd.fetch_redis_info(redis_client)
    assert info.keys == 2 and info.keys_by_family == {"stats:cache": 1, "cache": 1} and info.scanned_all
    assert info.used_memory > 0 and info.used_memory_human


def test_consumer_summary_last_commit():
    c = dd.consumer_summary({"updated_ts": str(NOW), "last_commit_ts": str(NOW - 12)}, now_s=NOW)
    assert c.last_commit_ago_s == 12.0
    assert dd.consumer_summary({"updated_ts": str(NOW), "last_commit_ts": "0.0"}, now_s=NOW).last_commit_ago_s is None


def test_revenue_per_impression_joins_purchases_by_request_id():
    imp = pd.DataFrame({"request_id": ["r1", "r2", "r3", "r3", None], "variant": ["a", "a", "b", "b", "a"]})
    pur = pd.DataFrame({"request_id": ["r1", "r1", "r3", "zz", None], "variant": [None, "a", "b", "a", "a"],
                        "price": [10.0, 5.0, 7.0, 99.0, 1.0], "quantity": [2, None, 1, 1, 1]})
    rev = dd.revenue_per_impression(imp, pur)
    assert sorted(rev["a"].tolist()) == [0.0, 25.0]  # 2 x 10 + 5 (quantity missing = 1)
    assert rev["b"].tolist() == [7.0]  # a repeated impression event counts once
    assert dd.revenue_per_impression(imp.iloc[:0], pur) == {}
    assert dd.revenue_per_impression(imp, pur.iloc[:0])["a"].tolist() == [0.0, 0.0]


def test_fetch_lake_ab_reads_only_the_window(tmp_path):
    from pipelines.lake import write_events
    from pipelines.schemas import new_event

    now = int(NOW * 1000)
    write_events(tmp_path, [
        new_event("impression", "u1", None, "s", ts=now - 60_000, request_id="r1", variant="champion", items=["i1"]),
        new_event("impression", "u1", None, "s", ts=now - 50_000, request_id="r2", variant="champion", items=["i1"]),
        new_event("impression", "u2", None, "s", ts=now - 60_000, request_id="r3", variant="challenger", items=["i1"]),
        new_event("purchase", "u2", "i1", "s", ts=now - 30_000, request_id="r3", price=4.0, quantity=3),
        new_event("view", "u2", "i1", "s", ts=now - 30_000),
        new_event("impression", "u9", None, "s", ts=now - 30 * 3_600_000, request_id="old", variant="champion",
                  items=["i1"]),
        # a later comparison: impressions that name their versions
        new_event("impression", "u3", None, "s", ts=now - 20_000, request_id="r4", variant="challenger", items=["i1"],
                  experiment="default@champion.1:challenger.2"),
        new_event("purchase", "u3", "i1", "s", ts=now - 10_000, request_id="r4", price=5.0),
    ])
    lake = dd.fetch_lake_ab(tmp_path, hours=2, now_s=NOW)
    paired = lake.of("default@champion.1:challenger.2", "default")
    assert paired.users == {"challenger": 1} and paired.revenue["challenger"].tolist() == [5.0]
    got = lake.of("default", "default")  # untagged impressions belong to the comparison named like the experiment
    assert got.users == {"champion": 1, "challenger": 1}
    # impressions tagged with the bare name (served while no model was) join the untagged ones, not replace them
    merged = dd.LakeAB({"\tchampion": np.array([0.0, 2.0]), "default\tchampion": np.array([5.0])},
                       {"\tchampion": 2, "default\tchampion": 1}).of("default", "default")
    assert sorted(merged.revenue["champion"].tolist()) == [0.0, 2.0, 5.0] and merged.users == {"champion": 3}
    assert got.revenue["challenger"].tolist() == [12.0] and got.revenue["champion"].tolist() == [0.0, 0.0]
    assert dd.fetch_lake_ab(tmp_path / "nothing", hours=2, now_s=NOW) == dd.LakeAB()
    df = dd.read_lake_columns(tmp_path, NOW - 7200, NOW + 3600, ["ts"], ["view"])
    assert df["ts"].tolist() == [now - 30_000]


def test_new_item_report():
    now = int(NOW * 1000)
    h = 3_600_000
    catalog = pd.DataFrame({"item_id": ["old", "n1", "n2", "n3", "future"],
                            "created_at": [now - 100 * h, now - 10 * h, now - 4 * h, now - h, now + h]})
    imp = pd.DataFrame({"ts": [now - 9 * h, now - 2 * h, now - 30 * h],
                        "items": [["old", "n1"], ["n2", "old", "n1", "old"], ["old", "old"]]})
    clicks = pd.DataFrame({"ts": [now - 2 * h + 60_000, now - 8 * h], "item_id": ["n2", "old"]})
    r = dd.new_item_report(catalog, imp, clicks, now_ms=now, age_h=24, explore_share=0.1)
    assert (r.new_items, r.with_impression, r.clicked) == (3, 2, 1)
    assert r.impressed_share == pytest.approx(2 / 3)
    assert r.median_first_impression_s == pytest.approx(((1 + 2) / 2) * 3600)  # n1 after 1 h, n2 after 2 h
    assert r.median_first_click_s == pytest.approx(2 * 3600 + 60)
    assert (r.new_slots, r.all_slots, r.slot_share) == (3, 6, 0.5)  # the impression 30 h ago is outside
    assert r.hourly["slots"].sum() == 8 and r.hourly["new_share"].tolist() == [0.0, 0.5, 0.5]
    no_new_clicks = dd.new_item_report(catalog, imp, clicks[clicks["item_id"] == "old"], now_ms=now)
    assert no_new_clicks.clicked == 0 and no_new_clicks.median_first_click_s is None
    strings = catalog.astype({"item_id": "string"})  # the lake's Arrow-backed strings
    assert dd.new_item_report(strings, imp, clicks.astype({"item_id": "string"}).iloc[1:], now_ms=now).clicked == 0
    empty = dd.new_item_report(catalog, imp.iloc[:0], clicks.iloc[:0], now_ms=now)
    assert empty.with_impression == 0 and empty.slot_share is None and empty.hourly.empty


def test_time_to_first_impression_counts_only_the_launches_the_stream_saw():
    """Impressions begin at ``start`` (the stream started after a backfill): b1-b3 were launched before, in the
    backfill's history, and first shown at ``start``, 3 to 20 h after their launch. Only live1 and live2, launched
    after the first impression, are timed; live3 is not shown yet."""
    now, h, m = int(NOW * 1000), 3_600_000, 60_000
    start = now - 2 * h
    catalog = pd.DataFrame({"item_id": ["old", "b1", "b2", "b3", "live1", "live2", "live3"],
                            "created_at": [now - 100 * h, now - 20 * h, now - 9 * h, now - 3 * h, start + 10 * m,
                                           start + 30 * m, now - 5 * m]})
    imp = pd.DataFrame({"ts": [start, start + 15 * m, start + 40 * m],
                        "items": [["old", "b1", "b2", "b3"], ["live1", "b1"], ["live2"]]})
    clicks = pd.DataFrame({"ts": [start + 1000, start + 20 * m], "item_id": ["b2", "live1"]})
    r = dd.new_item_report(catalog, imp, clicks, now_ms=now, age_h=24)
    assert (r.new_items, r.with_impression, r.window_start_ms) == (6, 5, start)
    assert (r.launched_in_window, r.shown_in_window, r.launched_before_window) == (3, 2, 3)
    assert r.median_first_impression_s == pytest.approx(7.5 * 60)  # live1 after 5 min, live2 after 10 (b1: 20 h)
    assert (r.clicked, r.median_first_click_s) == (1, pytest.approx(10 * 60))  # live1's; b2's click 9 h in is not
    note = dd.new_item_timing_note(r)
    assert "Products launched in the window: 3 of the 6 new products (2 shown so far)" in note
    assert "the 3 launched before it (a backfill's history" in note

    # only the backfill's products: no time at all, and the page says why
    backfilled = dd.new_item_report(catalog.iloc[:4], imp.iloc[:1], clicks.iloc[:1], now_ms=now)
    assert (backfilled.new_items, backfilled.with_impression, backfilled.launched_in_window) == (3, 3, 0)
    assert backfilled.median_first_impression_s is None and backfilled.median_first_click_s is None
    assert dd.fmt_age(backfilled.median_first_impression_s) == "–"
    note = dd.new_item_timing_note(backfilled)
    assert note.startswith("Products launched in the window: 0, so the times to a first impression and click are "
                           "blank: all 3 new products were launched before the lake's first impression")
    # no impression read: no window, nothing timed
    blind = dd.new_item_report(catalog, imp.iloc[:0], clicks, now_ms=now)
    assert blind.window_start_ms is None and blind.launched_in_window == 0 and blind.median_first_click_s is None
    assert "the lake holds no impression yet" in dd.new_item_timing_note(blind)


def test_quality_tables(tmp_path):
    import json

    (tmp_path / "2026-11-24-10:00.json").write_text(json.dumps({"partition": "2026-11-24-10:00", "success": True,
                                                                "evaluated": 5, "dagster_run_id": "abc"}))
    (tmp_path / "2026-11-24-11:00.json").write_text(json.dumps({
        "partition": "2026-11-24-11:00", "success": False, "evaluated": 5,
        "failed": [{"suite": "events", "expectation_type": "expect_x", "column": "price", "unexpected_count": 2,
                    "sample": [-1, -2]}]}))
    (tmp_path / "broken.json").write_text("{not json")
    reps = dd.fetch_quality_reports(tmp_path)
    t = dd.quality_table(reps, "http://dagster:3000/")
    assert list(t.index) == ["broken", "2026-11-24-11:00", "2026-11-24-10:00"]
    assert t["status"].tolist() == ["error", "failed", "passed"]
    assert t.loc["2026-11-24-10:00", "dagster_run"] == "http://dagster:3000/runs/abc"
    assert pd.isna(t.loc["2026-11-24-11:00", "dagster_run"])
    f = dd.failing_expectations(reps)
    assert len(f) == 1 and f.iloc[0]["examples"] == "[-1, -2]" and f.iloc[0]["column"] == "price"


def test_ab_report_and_cumulative_lift_frame():
    counts = {ALIAS_CHAMPION: {"impressions": 1000, "clicks": 50}, ALIAS_CHALLENGER: {"impressions": 1000, "clicks": 80}}
    r = dd.ab_report(counts, {}, dd.ABConfig())
    assert (r.a, r.b, r.srm_unit) == (ALIAS_CHAMPION, ALIAS_CHALLENGER, "impressions")
    assert r.lifts.loc["CTR", "lift"] == pytest.approx(0.6)
    assert math.isnan(r.lifts.loc["revenue per impression", "lift"]) and math.isnan(r.variants.loc[ALIAS_CHAMPION, "rpi"])
    skew = dd.ab_report(counts, {}, dd.ABConfig(), users={ALIAS_CHAMPION: 700, ALIAS_CHALLENGER: 300})
    assert skew.srm_unit == "users" and skew.srm.mismatch
    cfg = dd.ABConfig(shares={ALIAS_CHAMPION: 0.7, ALIAS_CHALLENGER: 0.3})
    assert not dd.ab_report(counts, {}, cfg, users={ALIAS_CHAMPION: 700, ALIAS_CHALLENGER: 300}).srm.mismatch
    assert dd.ab_report({ALIAS_CHAMPION: {"impressions": 5}}).verdict is None

    per = {ALIAS_CHAMPION: {B - 120: {"impressions": 100, "clicks": 5}, B: {"impressions": 100, "clicks": 5}},
           ALIAS_CHALLENGER: {B - 120: {"impressions": 100, "clicks": 10}, B: {"impressions": 100, "clicks": 6}}}
    cum = dd.cumulative_lift_frame(per, ALIAS_CHAMPION, ALIAS_CHALLENGER, minutes=10, now_s=NOW)
    assert len(cum) == 3 and cum["lift"].tolist() == pytest.approx([1.0, 1.0, 0.6])
    coarse = dd.cumulative_lift_frame(per, ALIAS_CHAMPION, ALIAS_CHALLENGER, minutes=10, now_s=NOW, max_points=2)
    assert len(coarse) == 2 and coarse["lift"].iloc[-1] == pytest.approx(0.6)
    assert dd.cumulative_lift_frame({}, "a", "b", minutes=5, now_s=NOW).empty


# --- lake files that do not fit the schema -----------------------------------------------------------
def write_misfit(good: Path, name: str, column: str, values, folder: Path | None = None) -> Path:
    """A copy of the lake file ``good`` (in ``folder``, default its own) with ``column`` replaced by ``values``
    (another type)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(good)
    path = (folder or good.parent) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, pa.array([values] * len(t))), path)
    return path


def test_read_lake_files_skips_and_names_files_that_do_not_fit_the_schema(tmp_path):
    from pipelines.lake import write_events
    from pipelines.schemas import new_event

    now = int(NOW * 1000)
    [good] = write_events(tmp_path, [
        new_event("purchase", "u1", "i1", "s", ts=now - 60_000, request_id="r1", price=4.0, quantity=1)])
    text_price = write_misfit(good, "import-price.parquet", "price", "n/a")
    int_ts = write_misfit(good, "import-ts.parquet", "ts", now // 1000)  # seconds, not a timestamp
    files = [good, text_price, int_ts]

    df = dd.read_lake_files(files, ["ts", "price"], ["purchase"])
    assert df["price"].tolist() == [4.0] and df["ts"].tolist() == [now - 60_000]  # the good rows still count
    skipped = {s.path.rsplit("/", 1)[-1]: s for s in dd.skipped_lake_files(files)}
    assert set(skipped) == {"import-price.parquet", "import-ts.parquet"}
    assert skipped["import-price.parquet"].column == "price" and "string" in skipped["import-price.parquet"].problem
    assert skipped["import-ts.parquet"].column == "ts" and skipped["import-ts.parquet"].path.startswith("date=")

    # a known-bad file is not opened again while it is unchanged ...
    assert dd.lake_file_problem(text_price) is dd.lake_file_problem(text_price)
    # ... and is checked again once it is replaced by a good one
    import shutil

    shutil.copy(good, text_price)
    assert dd.lake_file_problem(text_price) is None
    assert dd.read_lake_files(files, ["price"], ["purchase"])["price"].tolist() == [4.0, 4.0]


# --- data quality: the catalog and the open hour ---------------------------------------------------------
def test_quality_table_keeps_the_catalog_apart_and_marks_hours_not_validated_closed():
    from datetime import datetime, timezone

    now = datetime(2026, 12, 7, 6, 40, tzinfo=timezone.utc)
    reports = [
        {"partition": "catalog", "success": True, "evaluated": 6},
        {"partition": "2026-12-07-05:00", "success": True, "validated_at": "2026-12-07T06:05:00+00:00"},
        {"partition": "2026-12-07-06:00", "success": True, "validated_at": "2026-12-07T06:30:00+00:00"},  # open
        # closed since its report, written while it was open: the schedule has not validated it yet
        {"partition": "2026-12-07-04:00", "success": True, "validated_at": "2026-12-07T04:50:00Z"},
    ]
    hours, catalog = dd.split_quality_reports(reports)
    assert catalog["partition"] == "catalog" and "catalog" not in [r["partition"] for r in hours]
    t = dd.quality_table(hours, "http://dagster:3000", now=now)
    assert t["status"].to_dict() == {"2026-12-07-06:00": "open — validated when the hour closes",
                                     "2026-12-07-05:00": "passed",
                                     "2026-12-07-04:00": "closed — awaiting its validation"}
    assert dd.quality_status(catalog, now) == "passed"


# --- cosmetics: sizes and chart axes ---------------------------------------------------------------------
def test_fmt_bytes_uses_binary_units():
    assert [dd.fmt_bytes(n) for n in (512, 3482, 12.3 * 2**20, 1.02 * 2**30)] == \
        ["512 B", "3.40 KiB", "12.3 MiB", "1.02 GiB"]
    assert dd.fmt_bytes(None) == "–"


@pytest.mark.parametrize("lo,hi,min_step", [(0, 0, 1), (0, 1, 1), (0, 5, 1), (0, 61_234, 1), (0, 1e-12, 0.001),
                                            (0, 0.025, 0.001), (-0.31, 0.62, 0.001), (float("nan"), float("nan"), 1)])
def test_value_ticks_print_each_label_once(lo, hi, min_step):
    ticks = dd.value_ticks(lo, hi, min_step=min_step)
    step = ticks[1] - ticks[0]
    if min_step == 1:
        labels = [f"{t:,.0f}" for t in ticks]
    else:
        digits = int(dd.percent_format(step)[1:-1])
        labels = [f"{100 * t:.{digits}f}%" for t in ticks]
    assert len(set(labels)) == len(labels) <= 7 and all("0.0000" not in x for x in labels)
    assert ticks[0] <= min(0, 0 if math.isnan(lo) else lo) and ticks[-1] >= (0 if math.isnan(hi) else hi)


@pytest.mark.parametrize("span_ms,min_step_ms", [(0, 60_000), (0, 3_600_000), (70_000, 60_000),
                                                 (3_540_000, 60_000), (49 * 3_600_000, 3_600_000),
                                                 (7 * 86_400_000, 60_000)])
def test_time_ticks_print_each_label_once(span_ms, min_step_ms):
    from datetime import datetime, timezone

    start = int(NOW * 1000) + 7_000  # not on a minute
    ticks, fmt, domain = dd.time_ticks(start, start + span_ms, min_step_ms=min_step_ms)
    labels = [datetime.fromtimestamp(t / 1000, tz=timezone.utc).strftime(fmt) for t in ticks]
    assert ticks and len(set(labels)) == len(labels) <= 9
    assert domain[0] <= ticks[0] and ticks[-1] <= domain[1] and domain[0] < domain[1]


def test_served_note_compares_serving_with_the_registry():
    now = 1_000.0
    status = {"champion": "3", "challenger": "4", "updated_ts": "990"}
    assert dd.served_note("champion", "3", status, now_s=now) == ("served by the API (reported 10 s ago)", False)
    text, alarming = dd.served_note("champion", "5", status, now_s=now)
    assert alarming and "serves v3, not v5" in text
    text, alarming = dd.served_note("challenger", "6", {"champion": "3", "updated_ts": "990"}, now_s=now)
    assert alarming and "registered but not served" in text
    # a challenger alias left on the champion's version is served as the champion, by design
    assert dd.served_note("challenger", "3", {"champion": "3", "updated_ts": "990"}, now_s=now)[1] is False
    text, alarming = dd.served_note("challenger", None, status, now_s=now)
    assert alarming and "still serves v4" in text
    assert dd.served_note("champion", "3", {}, now_s=now) == (
        "serving has not reported yet (the API writes what it serves while it answers requests)", False)


# --- what the walk-through found: versions served per arm, a refresh's figures and windows, catalog rejects -----
def test_served_arms_note_names_what_each_arm_serves_now():
    tag = "default@champion.1:challenger.4"
    assert dd.comparison_arms(tag) == [("champion", "1"), ("challenger", "4")]
    assert dd.comparison_arms("default") == [] and dd.served_arms_note("default", {}, {}) is None
    serving = {"champion": "5", "challenger": "6", "updated_ts": "1"}
    assert dd.served_arms_note(tag, serving, {"5": "1", "6": "4"}) == (
        "champion v1 (served as v5, its hourly refresh) vs challenger v4 (served as v6, its hourly refresh)")
    assert dd.served_arms_note(tag, {"champion": "1", "challenger": "4"}, {}) == (
        "champion v1 (served as v1) vs challenger v4 (served as v4)")
    # an earlier comparison: its challenger is gone, its champion's line continues
    assert dd.served_arms_note(tag, {"champion": "5", "challenger": "8"}, {"5": "1", "8": "7"}) == (
        "champion v1 (served as v5, its hourly refresh) vs "
        "challenger v4 (no longer served: the API serves v8 now, a refresh of v7)")
    assert "challenger v4 (not served now)" in dd.served_arms_note(tag, {"champion": "1"}, {})
    assert "whether it continues this comparison is unknown" in dd.served_arms_note(tag, serving, None)
    assert dd.served_arms_note(tag, {}, {}).startswith("not known: the API has not reported what it serves")


def test_served_lineage_reads_the_trained_versions_the_api_reports():
    serving = {"champion": "5", "challenger": "6", "trained:champion": "1", "trained:challenger": "4",
               "trained:gone": "2", "updated_ts": "1"}
    assert dd.served_lineage(serving) == {"5": "1", "6": "4"}
    assert dd.served_lineage({"champion": "5", "updated_ts": "1"}) == {}  # an API that does not report it


def test_fetch_trained_versions(mlflow_with_refreshes):
    assert dd.fetch_trained_versions(mlflow_with_refreshes, ["5", "6", "4", "99"]) == {"5": "1", "6": "4", "4": "4"}
    with pytest.raises(dd.MlflowUnavailable):
        dd.fetch_trained_versions("http://127.0.0.1:1", ["5"])


def test_the_refresh_tags_read_are_those_the_refresh_writes():
    from pipelines import refresh

    assert (dd.TAG_REFRESH_OF, dd.TAG_REFRESH_WINDOW_START, dd.TAG_REFRESH_WINDOW_END) == (
        refresh.TAG_REFRESH_OF, refresh.TAG_REFRESH_WINDOW_START, refresh.TAG_REFRESH_WINDOW_END)


def test_a_refreshed_version_shows_both_windows_and_its_quality_apart_from_other_figures(mlflow_with_refreshes):
    from tests.dashboard.conftest import REFRESH_WINDOW, TRAINED_WINDOW

    champ = dd.fetch_model_aliases(mlflow_with_refreshes)[ALIAS_CHAMPION]
    assert champ.version == "5" and champ.refreshed and champ.trained_version == "1" and champ.refresh_of == "1"
    assert champ.metrics == {"ndcg_at_10": 0.32, "recall_at_10": 0.45}
    assert champ.other_metrics == {"refresh_seconds": 10.44, "source_ndcg_at_10": 0.29}
    assert (champ.trained_window_start, champ.trained_window_end) == TRAINED_WINDOW
    assert (champ.refresh_window_start, champ.refresh_window_end) == REFRESH_WINDOW
    assert dd.model_lines(champ) == [
        "embeddings trained on 2026-11-17T00:00 → 2026-11-24T00:00 (v1)",
        "neighbours and trending refreshed on 2026-11-24T09:10 → 2026-11-24T10:10",
        "on its own holdout (last 1 h of the window): ndcg@10 0.3200, recall@10 0.4500"]
    assert dd.other_figures(champ) == ["v1 before this refresh, on the same holdout: ndcg@10 0.2900",
                                       "the refresh took 10.4 s"]
    # a version train_job trained: one window, nothing else logged
    trained = dd.ModelVersionInfo("champion", "1", None, None, {"ndcg_at_10": 0.3}, *TRAINED_WINDOW, "h")
    assert dd.model_lines(trained) == ["trained on 2026-11-17T00:00 → 2026-11-24T00:00",
                                       "on its own holdout (h): ndcg@10 0.3000"]
    assert dd.other_figures(trained) == []
    assert [dd.is_quality_metric(m) for m in ("ndcg_at_10", "precision_at_5", "refresh_seconds",
                                              "source_ndcg_at_10")] == [True, True, False, False]


def test_catalog_rejects_are_the_total_kept_in_redis_not_since_the_feed_started():
    status = {"products": "50", "out_of_stock": "2", "rejected": "1", "updated_ms": "0"}
    line = dd.catalog_line(status, now_s=60.0, dlq_reasons={"catalog_schema": 2, "catalog_invalid_json": 1,
                                                           "schema": 7})
    assert line.startswith("Catalog: 50 products (2 out of stock), last change from `shop.catalog` 60 s ago; ")
    assert "3 catalog record(s) rejected in total (a count kept in Redis across restarts" in line
    assert "since the feed started" not in line
    assert "0 catalog record(s) rejected in total" in dd.catalog_line(status, dlq_reasons={})
    assert "1 catalog record(s) rejected by the feed's last run" in dd.catalog_line(status)
