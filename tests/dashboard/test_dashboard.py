"""The Streamlit dashboard end to end with ``AppTest``: services down, nothing recorded yet, and real data.

Real Redis (session fixture), a real MLflow SQLite registry, a real Parquet lake, catalog and
Great Expectations reports in a private ``var/`` dir; every page is rendered by Streamlit's
``AppTest`` and the numbers shown are compared with what the test wrote.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from statsmodels.stats import proportion as sm_proportion
from streamlit.testing.v1 import AppTest

from pipelines import dashboard_data as dd
from pipelines.lake import write_events
from pipelines.schemas import RedisKeys, new_event
from pipelines.simulator import make_catalog, save_catalog
from pipelines.state import OnlineState
from tests.dashboard.conftest import APP

PAGES = ("app_pages/overview.py", "app_pages/ab_test.py", "app_pages/cold_start.py", "app_pages/cache.py",
         "app_pages/data_quality.py")
DEAD_REDIS = "redis://:s3cret@127.0.0.1:1/0"
DEAD_MLFLOW = "http://127.0.0.1:1"
HOUR_MS = 3_600_000


def run_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30).run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart")) + len(at.get("arrow_vega_lite_chart"))


def chart_data(at: AppTest, column: str):
    """The data (a DataFrame) of the page's chart that has ``column``."""
    import pyarrow as pa

    frames = [pa.ipc.open_stream(ds.data.data).read_pandas()
              for chart in at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart") for ds in chart.proto.datasets]
    return next(f for f in frames if column in f)


class StoppedClock:
    """The ``time`` module as one module sees it, stopped at ``now_s`` (its other functions are the real ones)."""

    def __init__(self, now_s: float):
        self.now_s = now_s

    def time(self) -> float:
        return self.now_s

    def __getattr__(self, name: str):
        return getattr(time, name)


# --- services down / nothing yet --------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_services_down_show_a_message_not_a_traceback(dashboard_env, page):
    dashboard_env(DEAD_REDIS, DEAD_MLFLOW)
    at = run_page(page)
    messages = texts(at.warning) + texts(at.info)
    if page.endswith("data_quality.py"):  # reads files only: says there are none yet
        assert "No validation results" in messages
    else:
        assert "Redis is down" in messages and "make up" in messages
        assert "s3cret" not in messages  # the password is redacted
    if page.endswith("overview.py"):
        assert "MLflow is down" in messages


@pytest.mark.parametrize("page", PAGES[:4])
def test_redis_down_is_said_once_per_page(dashboard_env, mlflow_with_champion, page):
    dashboard_env(DEAD_REDIS, mlflow_with_champion)
    warnings = [str(w.value) for w in run_page(page).warning]
    assert sum("Redis is down" in w for w in warnings) == 1, warnings


@pytest.mark.parametrize("page", PAGES)
def test_empty_stack_says_no_data_yet(dashboard_env, redis_client, redis_url, mlflow_with_champion, page):
    dashboard_env(redis_url, mlflow_with_champion)
    at = run_page(page)
    assert not at.warning and not at.error
    assert at.info, "an empty stack must say that there is no data yet"


# --- with data --------------------------------------------------------------------------------------
AB = {"champion": {"impressions": 1000, "clicks": 50, "carts": 20, "purchases": 10},
      "challenger": {"impressions": 1000, "clicks": 80, "carts": 25, "purchases": 12}}


def seed_redis(state: OnlineState, ab=AB) -> None:
    for variant, counts in ab.items():
        for f, n in counts.items():
            state.r.hincrby(RedisKeys.ab(state.experiment, variant), f, n)
        state.incr_stats(dd.ab_stats_name(state.experiment, variant), counts)
    state.incr_stats(dd.STATS_REQUESTS, {"cache": 30, "model": 60, "fallback": 10, "cold_user": 20,
                                         "cold_user_session": 15, "cold_user_trending": 5})
    state.incr_stats(dd.STATS_CACHE, {"hit": 30, "miss": 70, "hit:champion": 20, "miss:champion": 30,
                                      "hit:challenger": 10, "miss:challenger": 40})
    state.incr_stats("events", {"view": 50, "click": 10})
    state.incr_stats(dd.latency_stats_name("cache"), {"1": 9})
    state.incr_stats(dd.latency_stats_name("model"), {"15": 10})
    state.count_dlq({"invalid_json": 3, "schema": 1, "duplicate": 2})
    now = time.time()
    state.set_consumer_status(lag=5, rate_eps=12.5, consumed=100, last_commit_ts=now - 3, updated_ts=now)
    state.set_serving_status({"champion": "1"})


def seed_lake(settings) -> dict:
    """10 impressions per variant; champion: two purchases of 2 x 10.00, challenger: one of 50.00.

    Catalog: 4 old products and 2 launched 2 h and 30 min ago; the older new one is shown 1 h after
    its launch and clicked 90 min after it. The stream has run for a day: an impression without a variant
    25 h ago (before the new products' window) is the lake's first, so both launches are ones it saw.
    """
    now = int(time.time() * 1000)
    catalog = make_catalog(4, seed=1, start_ms=now - 40 * 86_400_000)
    new = catalog.iloc[:2].copy()
    new["item_id"] = ["n00001", "n00002"]
    new["created_at"] = [now - 2 * HOUR_MS, now - HOUR_MS // 2]

    save_catalog(pd.concat([catalog, new], ignore_index=True), settings.catalog_path)
    old = catalog["item_id"].tolist()
    events = []
    for variant in ("champion", "challenger"):
        for j in range(10):
            rid = f"{variant}-{j}"
            items = [old[j % 4], "n00001"] if (variant == "champion" and j == 0) else [old[j % 4], old[(j + 1) % 4]]
            ts = now - HOUR_MS if (variant == "champion" and j == 0) else now - 10 * 60_000
            events.append(new_event("impression", f"u{j}", None, f"s{j}", ts=ts, request_id=rid, variant=variant,
                                    items=items))
    events.append(new_event("impression", "u9", None, "s9", ts=now - 25 * HOUR_MS, items=old[:2]))
    events.append(new_event("click", "u0", "n00001", "s0", ts=now - 2 * HOUR_MS + 90 * 60_000,
                            request_id="champion-0", variant="champion"))
    for j in (1, 2):
        events.append(new_event("purchase", f"u{j}", old[0], f"s{j}", ts=now - 5 * 60_000, price=10.0, quantity=2,
                                request_id=f"champion-{j}"))
    events.append(new_event("purchase", "u3", old[1], "s3", ts=now - 5 * 60_000, price=50.0,
                            request_id="challenger-3", variant="challenger"))
    write_events(settings.lake_dir, events)
    return {"slots": 40, "new_slots": 1}


def seed_quality(settings) -> None:
    settings.quality_dir.mkdir(parents=True, exist_ok=True)
    ok = {"partition": "2026-11-24-11:00", "success": True, "evaluated": 12, "failed": [], "statistics": {},
          "dagster_run_id": "run-ok-1", "validated_at": "2026-11-24T12:05:00Z"}
    bad = {"partition": "2026-11-24-12:00", "success": False, "evaluated": 12, "statistics": {},
           "dagster_run_id": "run-bad-2", "validated_at": "2026-11-24T13:05:00Z",
           "failed": [{"suite": "events", "expectation_type": "expect_column_values_to_not_be_null",
                       "column": "user_id", "description": "every event has a user", "unexpected_count": 7,
                       "unexpected_percent": 0.7, "observed_value": None, "sample": ["evt-a", "evt-b"],
                       "exception": None}]}
    for rep in (ok, bad):
        (settings.quality_dir / f"{rep['partition']}.json").write_text(json.dumps(rep))


@pytest.fixture()
def seeded(dashboard_env, redis_client, redis_url, mlflow_with_champion):
    s = dashboard_env(redis_url, mlflow_with_champion, SHOPREC_DAGSTER_URL="http://dagster.example:3000")
    seed_redis(OnlineState(redis_client))
    lake = seed_lake(s)
    seed_quality(s)
    return s, lake


def test_overview_shows_models_traffic_ingestion(seeded):
    at = run_page(PAGES[0])
    m = metrics(at)
    assert m["Champion"] == "v1" and m["Challenger"] == "none"
    captions = texts(at.caption)
    assert "ndcg@10 0.3125" in captions and "trained on 2026-11-17T00:00 → 2026-11-24T00:00" in captions
    assert m["Events (window)"] == "60"
    assert (m["p50 latency"], m["p99 latency"]) == ("≤ 15 ms", "≤ 15 ms")  # 9 at ≤1 ms, 10 at ≤15 ms
    assert m["Consumer lag (records)"] == "5" and m["Rate (events/s)"] == "12.5"
    assert m["Last commit"].endswith("s ago")
    assert m["Refused records"] == "4" and m["Duplicates dropped"] == "2"  # a client's retry is no refusal
    dlq = [d.value for d in at.dataframe if "records" in d.value.columns][0]
    assert dlq["records"].to_dict() == {"invalid_json": 3, "duplicate": 2, "schema": 1}
    assert charts(at) == 1 and not at.warning
    assert "served by the API (reported" in captions  # serving reported v1, as the registry has it
    chart = (at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart"))[0]
    assert json.loads(chart.proto.spec)["config"]["axisTemporal"]["format"] == "%H:%M"  # 24-hour labels, no "08 PM"


def test_overview_reads_the_model_serving_follows(seeded, monkeypatch):
    """The dashboard read a fixed registered-model name, whatever SHOPREC_MLFLOW_MODEL_NAME made serving follow."""
    from pipelines.settings import get_settings

    monkeypatch.setenv("SHOPREC_MLFLOW_MODEL_NAME", "another-shop")
    get_settings.cache_clear()
    at = run_page(PAGES[0])
    assert metrics(at)["Champion"] == "none"
    assert "No `another-shop@champion` in the registry: training registers one (`shoprec train`" in texts(at.caption)


def test_ab_page_shows_rates_lift_verdict_and_revenue(seeded):
    at = run_page(PAGES[1])
    m = metrics(at)
    assert m["champion impressions"] == "1,000" and m["challenger purchases"] == "12"
    assert m["champion CTR"] == "5.00 %" and m["challenger CTR"] == "8.00 %"
    assert m["champion conversion"] == "1.00 %"
    # revenue per impression from the lake: 2 x (2 x 10.00) / 10 and 50.00 / 10
    assert m["champion revenue/impression"] == "4.000" and m["challenger revenue/impression"] == "5.000"
    assert m["CTR lift"] == "60.0 %"
    p = sm_proportion.test_proportions_2indep(80, 1000, 50, 1000, compare="ratio", method="score",
                                              correction=False).pvalue
    assert m["CTR p-value"] == f"{p:.3g}"
    # 1,000 impressions per variant are far from the ~31,000 needed for a 10 % change of a 5 % CTR
    assert m["Verdict"] == "not enough data"
    info = texts(at.info)
    assert "Not enough data yet" in info and "more are still needed" in info and "challenger is ahead" in info
    assert not at.error  # 1000/1000 matches the configured 50/50 split
    table = at.dataframe[0].value
    assert table.loc["champion", "CTR 95% CI"] == "3.81 % – 6.53 %"
    assert charts(at) == 1  # cumulative lift


def test_ab_page_names_the_winner_and_flags_a_skewed_split(dashboard_env, redis_client, redis_url):
    dashboard_env(redis_url, DEAD_MLFLOW)
    seed_redis(OnlineState(redis_client), {"champion": {"impressions": 40_000, "clicks": 2_000},
                                           "challenger": {"impressions": 40_000, "clicks": 2_600}})
    at = run_page(PAGES[1])
    assert metrics(at)["Verdict"] == "winner: challenger"
    assert "challenger wins" in texts(at.success) and not at.error

    redis_client.flushdb()
    dashboard_env(redis_url, DEAD_MLFLOW)
    seed_redis(OnlineState(redis_client), {"champion": {"impressions": 40_000, "clicks": 2_000},
                                           "challenger": {"impressions": 44_000, "clicks": 2_200}})
    at = run_page(PAGES[1])
    assert "Sample-ratio mismatch" in texts(at.error)


def test_ab_page_reads_the_configured_shares(dashboard_env, redis_client, redis_url):
    """A 80/20 split that is configured as 80/20 is no mismatch; the same split configured 50/50 is."""
    seed_redis(OnlineState(redis_client), {"champion": {"impressions": 8_000, "clicks": 400},
                                           "challenger": {"impressions": 2_000, "clicks": 100}})
    dashboard_env(redis_url, DEAD_MLFLOW, SHOPREC_AB_CHALLENGER_SHARE="0.2")
    assert not run_page(PAGES[1]).error
    dashboard_env(redis_url, DEAD_MLFLOW)
    assert "Sample-ratio mismatch" in texts(run_page(PAGES[1]).error)


def test_the_page_compares_the_latest_versions_and_an_earlier_comparison_can_be_picked(dashboard_env, redis_client,
                                                                                       redis_url):
    """The champion served alone for a while, then with a challenger: the latest comparison holds only the
    traffic both shared (mixed with the champion's solo traffic, a 50/50 split would look broken)."""
    state = OnlineState(redis_client)
    solo, pair = f"{state.experiment}@champion.1", f"{state.experiment}@champion.1:challenger.2"
    now = int(time.time() * 1000)

    def shown(n: int, variant: str, tag: str, ts: int) -> list[dict]:
        return [new_event("impression", f"{variant}-{tag}-{i % 50}", None, "s", ts=ts + i, items=["i1"],
                          request_id=f"{tag}-{variant}-{i}", variant=variant, experiment=tag) for i in range(n)]

    state.apply_events(shown(800, "champion", solo, now - 2 * HOUR_MS))
    state.apply_events(shown(500, "champion", pair, now - HOUR_MS) + shown(500, "challenger", pair, now - HOUR_MS))
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[1])
    assert metrics(at)["champion impressions"] == "500" and metrics(at)["challenger impressions"] == "500"
    assert "Sample-ratio mismatch" not in texts(at.error)
    picker = at.selectbox(key="ab_comparison")
    assert picker.value == "" and picker.options[0].startswith("the latest: champion v1 vs challenger v2")
    # the labels hold no time that moves while a comparison runs (a changed label resets the choice)
    assert picker.options[1] == dd.comparison_label(pair, now - HOUR_MS)
    picker.set_value(solo).run()
    assert metrics(at)["champion impressions"] == "800" and "challenger impressions" not in metrics(at)
    assert "Only one variant has traffic" in texts(at.info)


def test_one_variant_only_explains_there_is_no_test(dashboard_env, redis_client, redis_url):
    state = OnlineState(redis_client)
    state.r.hincrby(RedisKeys.ab(state.experiment, "champion"), "impressions", 10)
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[1])
    assert "Only one variant has traffic" in texts(at.info)
    assert "CTR p-value" not in metrics(at)


def test_cold_start_page_shows_new_users_and_new_products(seeded):
    at = run_page(PAGES[2])
    m = metrics(at)
    assert m["Requests answered by the model"] == "60"
    assert m["From new users"] == "33.3 %"  # of the 60 the model answered (a cache hit says nothing of the user)
    assert m["New users served from session"] == "75.0 %"
    assert m["New users served trending"] == "25.0 %"
    assert "New users served by model" not in m  # every new user is served from a session or trending
    assert m["New products"] == "2"
    assert m["Shown at least once"] == "50.0 %"
    assert m["Median time to first impression"] == "60 min"
    assert m["Median time to first click"] == "90 min"
    assert m["Share of impression slots"] == "2.50 %"  # 1 of 40 slots
    assert "Products launched in the window: 2 of the 2 new products (1 shown so far)" in texts(at.caption)
    assert charts(at) == 3


def test_cold_start_page_times_only_the_launches_the_stream_saw(dashboard_env, redis_client, redis_url):
    """Right after ``stack up`` on an empty lake: the backfill's products, launched during its 12 h of history, are
    first shown when impressions begin, hours after their launch. Their wait is no time to a first impression."""
    from tests.dashboard.test_dashboard_agg import backfill_history, launch_live

    s = dashboard_env(redis_url, DEAD_MLFLOW)
    seed_redis(OnlineState(redis_client))
    start = int(time.time() * 1000) - 30 * 60_000  # the stream started 30 min ago
    backfilled = backfill_history(s.lake_dir, s.catalog_path, start=start)
    at = run_page(PAGES[2])
    m = metrics(at)
    assert m["New products"] == f"{len(backfilled)}" and m["Shown at least once"] == dd.pct(3 / len(backfilled))
    assert m["Median time to first impression"] == m["Median time to first click"] == "–"
    assert (f"Products launched in the window: 0, so the times to a first impression and click are blank: all "
            f"{len(backfilled)} new products were launched before the lake's first impression") in texts(at.caption)

    launch_live(s.lake_dir, s.catalog_path, start=start)  # live1 shown 5 min and clicked 8 min after its launch
    at.run()
    assert not at.exception
    m = metrics(at)
    assert m["New products"] == f"{len(backfilled) + 2}"
    assert (m["Median time to first impression"], m["Median time to first click"]) == ("5 min", "8 min")
    assert (f"Products launched in the window: 2 of the {len(backfilled) + 2} new products (1 shown so far)"
            in texts(at.caption))


def test_cache_page_shows_hit_rates_latency_and_memory(seeded):
    at = run_page(PAGES[3])
    m = metrics(at)
    assert m["Hit rate"] == "30.0 %" and (m["Hits"], m["Misses"]) == ("30", "70")
    assert m["champion hit rate"] == "40.0 %" and m["challenger hit rate"] == "20.0 %"
    assert (m["Hit p50"], m["Miss p50"]) == ("≤ 1 ms", "≤ 15 ms")
    assert (m["From cache"], m["From model"], m["From fallback"]) == ("30", "60", "10")
    assert int(m["Keys"].replace(",", "")) >= 10
    assert re.fullmatch(r"[\d.,]+ (B|KiB|MiB|GiB)", m["Memory used"]), m["Memory used"]  # not "1.02M"
    fams = [d.value for d in at.dataframe if "keys" in d.value.columns][0]["keys"].to_dict()
    assert fams["stats:cache"] == 1 and fams["ab:default"] == 2
    assert charts(at) == 2 and not at.warning


def test_cache_page_leaves_the_minute_in_progress_off_the_hit_rate_line(dashboard_env, redis_client, redis_url,
                                                                      monkeypatch):
    """10 s into a minute its first 2 lookups (both hits) would end the line at 100 % after minutes at 50 and 75 %:
    the line ends at the last complete minute, while the totals and a caption still count the minute in progress.
    The snapshot's clock (``now_s``) is stopped 10 s into the current minute, so the test does not race the clock."""
    now_s = time.time() // 60 * 60 + 10
    b = int(now_s) // 60 * 60
    for start, counts in {b - 120: {"hit": 10, "miss": 10}, b - 60: {"hit": 30, "miss": 10}, b: {"hit": 2}}.items():
        for field, n in counts.items():
            redis_client.hincrby(RedisKeys.counter(dd.STATS_CACHE, start // 60), field, n)
    monkeypatch.setattr(dd, "time", StoppedClock(now_s))
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[3])
    m = metrics(at)
    assert (m["Hit rate"], m["Hits"], m["Misses"]) == ("67.7 %", "42", "20")  # every lookup: 42 of 62
    line = chart_data(at, "hit_rate")
    assert line["minute"].max() == pd.Timestamp(b - 60, unit="s", tz="UTC")
    assert line["hit_rate"].dropna().tolist() == [0.5, 0.75]
    assert f"The minute in progress ({datetime.fromtimestamp(b, tz=timezone.utc):%H:%M} UTC, 2 lookups so far)" \
        in texts(at.caption)


def test_data_quality_page_lists_partitions_failures_and_run_links(seeded):
    at = run_page(PAGES[4])
    m = metrics(at)
    assert (m["Partitions validated"], m["Partitions failing"]) == ("2", "1")
    assert m["Latest partition"] == "2026-11-24-12:00"
    assert "1 partition(s) fail validation" in texts(at.error)
    table = at.dataframe[0].value
    assert table.loc["2026-11-24-12:00", "dagster_run"] == "http://dagster.example:3000/runs/run-bad-2"
    fails = at.dataframe[1].value
    assert fails.iloc[0]["expectation"] == "expect_column_values_to_not_be_null"
    assert fails.iloc[0]["unexpected"] == 7 and "evt-a" in fails.iloc[0]["examples"]


def test_cache_page_says_when_every_request_got_the_fallback(dashboard_env, redis_client, redis_url):
    """Right after `make up` nothing is trained: the latency section must say why, not "no traffic"."""
    state = OnlineState(redis_client)
    state.incr_stats(dd.STATS_REQUESTS, {"fallback": 243})
    state.incr_stats(dd.STATS_CACHE, {"miss": 243, "miss:champion": 243})
    state.incr_stats(dd.latency_stats_name("fallback"), {"1": 243})
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[3])
    warning = texts(at.warning)
    assert "all 243 requests got the fallback list" in warning and "train_job" in warning
    assert "no `/recommend` latency" not in texts(at.info)


def test_overview_adds_up_consumers_and_flags_one_without_partitions(dashboard_env, redis_client, redis_url):
    state = OnlineState(redis_client)
    now = time.time()
    state.set_consumer_status("a", lag=7, rate_eps=10.0, consumed=90, partitions=6, last_commit_ts=now, updated_ts=now)
    state.set_consumer_status("b", lag=0, rate_eps=0.0, consumed=0, partitions=0, last_commit_ts=0, updated_ts=now)
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[0])
    assert metrics(at)["Consumer lag (records)"] == "7"
    assert "1 of 2 stream consumers own no partition" in texts(at.warning)


def test_cold_start_page_before_any_model_answered(dashboard_env, redis_client, redis_url):
    """240 fallback answers (no champion yet) are not 240 requests whose users were looked at."""
    OnlineState(redis_client).incr_stats(dd.STATS_REQUESTS, {"fallback": 240})
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(PAGES[2])
    assert "Requests answered by the model" not in metrics(at)
    shown = texts(at.info) + texts(at.caption) + texts(at.markdown)
    assert "No recommendation request was answered by the model" in shown and "240 came from the cache or the fallback" \
        in shown, shown


# --- a bad file, fresh data, the open hour, labels -------------------------------------------------------
def test_a_wrong_typed_lake_file_is_named_and_the_rest_still_shows(seeded):
    """An imported file with text prices and one with integer timestamps sit in the current hour."""
    from pipelines.lake import partition_dir, partition_key
    from tests.dashboard.test_dashboard_data import write_misfit

    s, _ = seeded
    folder = partition_dir(s.lake_dir, partition_key(int(time.time() * 1000) - 10 * 60_000))
    good = min(folder.glob("batch-*.parquet"))
    write_misfit(good, "import-price.parquet", "price", "n/a")
    write_misfit(good, "import-ts.parquet", "ts", int(time.time()))
    for page in (PAGES[2], PAGES[1]):
        at = run_page(page)
        warning = texts(at.warning)
        assert "2 lake file(s) skipped" in warning, warning
        assert "import-price.parquet`: price is string" in warning and "import-ts.parquet`: ts is int64" in warning
        assert "Cannot read the event lake" not in warning
    m = metrics(run_page(PAGES[2]))
    assert (m["New products"], m["Share of impression slots"]) == ("2", "2.50 %")  # as without the bad files
    m = metrics(run_page(PAGES[1]))
    assert m["champion revenue/impression"] == "4.000" and m["challenger revenue/impression"] == "5.000"


def test_impressions_show_at_the_next_refresh_and_the_page_says_when_the_lake_was_read(dashboard_env, redis_client,
                                                                                         redis_url):
    s = dashboard_env(redis_url, DEAD_MLFLOW)
    seed_redis(OnlineState(redis_client))
    at = run_page(PAGES[1])
    assert "No impressions in the lake yet" in texts(at.caption)
    assert re.search(r"Lake read at \d\d:\d\d:\d\d UTC", texts(at.caption))
    seed_lake(s)  # the consumer writes the hour's first files
    at.run()
    assert not at.exception
    assert metrics(at)["champion revenue/impression"] == "4.000"
    assert "No impressions in the lake yet" not in texts(at.caption)


def test_data_quality_page_keeps_the_catalog_and_the_open_hour_apart(seeded):
    s, _ = seeded
    now = datetime.now(timezone.utc)
    if now.minute == 59 and now.second >= 30:  # the page must see this hour still open: start in the next one
        time.sleep(60.5 - now.second - now.microsecond / 1e6)
        now = datetime.now(timezone.utc)
    open_hour = now.strftime("%Y-%m-%d-%H:00")
    for rep in ({"partition": "catalog", "success": True, "evaluated": 6, "failed": [],
                 "validated_at": now.isoformat(), "dagster_run_id": "run-cat"},
                {"partition": open_hour, "success": True, "evaluated": 12, "failed": [],
                 "validated_at": (now - timedelta(seconds=1)).isoformat()}):
        (s.quality_dir / f"{rep['partition']}.json").write_text(json.dumps(rep))
    at = run_page(PAGES[4])
    m = metrics(at)
    assert (m["Partitions validated"], m["Partitions failing"]) == ("2", "1")  # the two closed hours of seed_quality
    assert m["Latest partition"] == "2026-11-24-12:00"
    hours = at.dataframe[0].value
    assert "catalog" not in hours.index
    assert hours.loc[open_hour, "status"] == "open — validated when the hour closes"
    assert "The product catalog passes its expectations" in texts(at.success)
    assert at.dataframe[2].value.index.tolist() == ["catalog"]


def test_overview_labels_each_models_metrics_with_its_holdout(dashboard_env, redis_client, redis_url, tmp_path):
    from mlflow import MlflowClient

    from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, REGISTERED_MODEL

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(REGISTERED_MODEL)
    for alias, tags in ((ALIAS_CHAMPION, {"metric.ndcg_at_10": "0.312500", "holdout": "last 24 h of the window"}),
                        (ALIAS_CHALLENGER, {"metric.ndcg_at_10": "0.410000", "holdout": "last 12 h of the window",
                                            "champion_holdout_ndcg": "0.290000"})):
        mv = client.create_model_version(REGISTERED_MODEL, source=str(tmp_path / alias), tags=tags)
        client.set_registered_model_alias(REGISTERED_MODEL, alias, mv.version)
    dashboard_env(redis_url, uri)
    captions = texts(run_page(PAGES[0]).caption)
    assert "on its own holdout (last 24 h of the window): ndcg@10 0.3125" in captions
    assert "on its own holdout (last 12 h of the window): ndcg@10 0.4100" in captions
    assert "the champion on this holdout: ndcg 0.2900" in captions
    assert "compare only on the same holdout" in captions


def test_overview_warns_when_serving_does_not_serve_the_registered_version(seeded, redis_client):
    """The registry says champion v1; the API (a version that failed to load, a swap in progress) serves v7."""
    OnlineState(redis_client).set_serving_status({"champion": "7"})
    warning = texts(run_page(PAGES[0]).warning)
    assert "the API serves v7, not v1" in warning and "scorer's log" in warning


def _encodings(spec):
    """Every ``encoding`` of a Vega-Lite spec (one per layer)."""
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict):
            yield spec["encoding"]
        for v in spec.values():
            yield from _encodings(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from _encodings(v)


def test_chart_axes_print_each_label_once(seeded):
    """Time axes with one hour's point, count axes of a few requests: labels a person reads are distinct and have
    no noise digits (Vega's own ticks repeated "06:00" and printed "0.000000")."""
    checked = 0
    for page in PAGES[:4]:
        at = run_page(page)
        for chart in at.get("vega_lite_chart"):
            checked += 1
            encodings = [{ch: e[ch] for ch in ("x", "y") if isinstance(e.get(ch), dict)}
                         for e in _encodings(json.loads(chart.proto.spec))]
            scaled = {ch for e in encodings for ch, enc in e.items() if enc["type"] in ("temporal", "quantitative")}
            axes = {ch: (enc["type"], enc["axis"]) for e in encodings for ch, enc in e.items()
                    if "values" in enc.get("axis", {})}
            assert scaled <= set(axes), f"{page}: a chart leaves its ticks to Vega: {encodings}"
            for kind, axis in axes.values():
                fmt, values = axis["format"], axis["values"]
                if kind == "temporal":  # instants of the data's days (ISO: the browser reads no epoch numbers)
                    instants = [datetime.fromisoformat(v) for v in values]
                    assert all(abs(t.timestamp() - time.time()) < 3 * 86_400 for t in instants), values
                    labels = [t.strftime(fmt) for t in instants]
                elif fmt.endswith("%"):
                    labels = [f"{100 * v:.{int(fmt[1:-1])}f}%" for v in values]
                else:
                    assert fmt == ",d" and all(float(v).is_integer() for v in values)
                    labels = [f"{v:,.0f}" for v in values]
                assert len(set(labels)) == len(labels), (page, labels)
    assert checked >= 4, f"only {checked} charts on the first four pages: the seeded data should draw more"


# --- what a walk-through on a fresh clone found -----------------------------------------------------------
def _impressions(state: OnlineState, tag: str, per_variant: int = 300) -> None:
    now = int(time.time() * 1000)
    state.apply_events([new_event("impression", f"{variant}-{i % 40}", None, "s", ts=now - 60_000 + i, items=["i1"],
                                  request_id=f"{variant}-{i}", variant=variant, experiment=tag)
                        for variant in ("champion", "challenger") for i in range(per_variant)])


def test_the_ab_page_says_which_versions_each_arm_serves_now(dashboard_env, redis_client, redis_url,
                                                             mlflow_with_refreshes):
    """The comparison is named by the trained versions (champion v1 vs challenger v4) while the Overview names
    the registered ones (v5, v6: their hourly refreshes): the A/B page says how the two fit."""
    state = OnlineState(redis_client)
    _impressions(state, f"{state.experiment}@champion.1:challenger.4")
    state.set_serving_status({"champion": "5", "challenger": "6"})
    dashboard_env(redis_url, mlflow_with_refreshes)
    at = run_page(PAGES[1])
    assert at.selectbox(key="ab_comparison").options[0].startswith("the latest: champion v1 vs challenger v4")
    captions = texts(at.caption)
    assert ("Served now: champion v1 (served as v5, its hourly refresh) vs "
            "challenger v4 (served as v6, its hourly refresh).") in captions, captions
    assert "named by each arm's *trained* version" in captions
    overview = metrics(run_page(PAGES[0]))
    assert (overview["Champion"], overview["Challenger"]) == ("v5", "v6")


def test_the_ab_page_tells_a_refresh_from_a_new_model_by_what_the_api_reports_without_mlflow(
        dashboard_env, redis_client, redis_url):
    state = OnlineState(redis_client)
    _impressions(state, f"{state.experiment}@champion.1:challenger.4")
    state.set_serving_status({"champion": "5", "challenger": "8"}, {"champion": "1", "challenger": "7"})
    dashboard_env(redis_url, DEAD_MLFLOW)
    captions = texts(run_page(PAGES[1]).caption)
    assert ("Served now: champion v1 (served as v5, its hourly refresh) vs "
            "challenger v4 (no longer served: the API serves v8 now, a refresh of v7).") in captions, captions


def test_the_overview_reads_a_real_mlflow_server_with_days_of_hourly_refreshes(dashboard_env, redis_client, redis_url,
                                                                              tmp_path):
    """The dashboard as the stack runs it: MLflow over HTTP, a registry that the cadence has filled (the page-load
    benchmark's registry, two days here), the versions the API reports serving."""
    from dashboard.bench import fill_registry
    from pipelines import localstack

    served = fill_registry(tmp_path / "mlflow.db", time.time(), days=2)
    assert served["trained:champion"] != served["champion"]  # the champion is an hourly refresh
    OnlineState(redis_client).set_serving_status({a: v for a, v in served.items() if ":" not in a},
                                                 {a[8:]: v for a, v in served.items() if ":" in a})
    port = localstack.free_port()
    with localstack.running(localstack.mlflow_command(port, tmp_path), port, tmp_path / "mlflow.log", timeout=120,
                                 health_path="/health"):
        dashboard_env(redis_url, f"http://127.0.0.1:{port}")
        at = run_page(PAGES[0])
    overview = metrics(at)
    assert "Champion" in overview, (texts(at.warning), texts(at.error), overview)
    assert (overview["Champion"], overview["Challenger"]) == (f"v{served['champion']}", f"v{served['challenger']}")
    captions = texts(at.caption)
    assert "embeddings trained on" in captions and f"(v{served['trained:champion']})" in captions, captions
    assert "MLflow" not in texts(at.warning)


def test_the_overview_shows_a_refresh_s_quality_apart_from_its_timings_and_both_windows(
        dashboard_env, redis_client, redis_url, mlflow_with_refreshes):
    OnlineState(redis_client).set_serving_status({"champion": "5", "challenger": "6"})
    dashboard_env(redis_url, mlflow_with_refreshes)
    captions = [str(c.value) for c in run_page(PAGES[0]).caption]
    champion = next(c for c in captions if c.startswith("served by the API") and "v1)" in c)
    assert "on its own holdout (last 1 h of the window): ndcg@10 0.3200, recall@10 0.4500" in champion
    assert "refresh_seconds" not in champion and "source_" not in champion and "10.4" not in champion
    # the window the embeddings were trained on (v1's), and the refresh's, not one span of both
    assert "embeddings trained on 2026-11-17T00:00 → 2026-11-24T00:00 (v1)" in champion
    assert "neighbours and trending refreshed on 2026-11-24T09:10 → 2026-11-24T10:10" in champion
    assert "trained on 2026-11-17T00:00 → 2026-11-24T10:10" not in champion
    assert ("Also logged (not quality metrics of this version): v1 before this refresh, on the same holdout: "
            "ndcg@10 0.2900 · the refresh took 10.4 s") in captions


def test_catalog_rejects_are_counted_in_total_across_a_restart(dashboard_env, redis_client, redis_url):
    """`make down` / `make up`: the Redis data stays, so the feed's count of a previous run is no "since the feed
    started"; the line gives the total, and a reject after the restart adds to it."""
    from collections import Counter

    from pipelines.catalog_feed import CatalogSync

    state = OnlineState(redis_client)

    def feed() -> CatalogSync:  # the feed as `make up` runs it (no broker needed to report)
        sync = CatalogSync(dashboard_env(redis_url, DEAD_MLFLOW), consumer=object(), producer=object(), state=state)
        sync.rows = {"i1": {"item_id": "i1", "in_stock": True}, "i2": {"item_id": "i2", "in_stock": False}}
        return sync

    def reject(sync: CatalogSync) -> None:
        sync.counts.update(records=1, rejected=1)
        sync._report(0, Counter(schema=1))

    reject(feed())
    feed()  # restarted: it has not received a record yet
    line = [c for c in texts(run_page(PAGES[0]).caption).splitlines() if c.startswith("Catalog:")][0]
    assert "1 catalog record(s) rejected in total (a count kept in Redis across restarts" in line, line
    assert "since the feed started" not in line
    reject(feed())
    line = [c for c in texts(run_page(PAGES[0]).caption).splitlines() if c.startswith("Catalog:")][0]
    assert "2 catalog record(s) rejected in total" in line, line


def test_the_data_quality_page_says_the_volume_suite_was_skipped_and_why(dashboard_env, redis_url, tmp_path):
    """Validated by the real validation: one stream hour before the hour is not enough to learn a volume band."""
    from pipelines import lake, validation

    s = dashboard_env(redis_url, DEAD_MLFLOW)
    hour = datetime(2026, 11, 24, 10, tzinfo=timezone.utc)
    ms = int(hour.timestamp() * 1000)
    lake.write_events(s.lake_dir, [new_event("view", f"u{i % 5}", f"i{i}", f"s{i}", ts=ms - HOUR_MS + i * 1000)
                                   for i in range(50)])
    lake.write_events(s.lake_dir, [new_event("view", f"u{i % 5}", f"i{i}", f"s{i}", ts=ms + i * 1000)
                                   for i in range(50)])
    key = lake.partition_key(ms)
    validation.validate_partition(s.lake_dir, key, quality_dir=s.quality_dir, known_items=[f"i{i}" for i in range(50)])
    at = run_page(PAGES[4])
    why = "volume: skipped — needs 3 hours of stream history, has 1 (of the 24 h before this hour)"
    assert at.dataframe[0].value.loc[key, "skipped"] == why
    assert f"1 of 1 validated partition(s) skipped a suite (column *skipped*); the latest, {key}: {why}." \
        in texts(at.info)
