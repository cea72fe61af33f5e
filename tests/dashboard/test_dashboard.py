"""The Streamlit dashboard end to end with ``AppTest``: services down, empty Redis, Redis with counters."""

from __future__ import annotations

import time

import pytest
from scipy.stats import norm
from streamlit.testing.v1 import AppTest

from pipelines import dashboard_data as dd
from pipelines.schemas import RedisKeys
from pipelines.state import OnlineState
from tests.dashboard.conftest import APP

PAGES = ("app_pages/ab_traffic.py", "app_pages/cold_start.py", "app_pages/cache.py")
DEAD_REDIS = "redis://:s3cret@127.0.0.1:1/0"
DEAD_MLFLOW = "http://127.0.0.1:1"


def run_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30).run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


@pytest.mark.parametrize("page", PAGES)
def test_services_down_show_a_warning_not_a_traceback(dashboard_env, page):
    dashboard_env(DEAD_REDIS, DEAD_MLFLOW)
    at = run_page(page)
    warnings = texts(at.warning)
    assert "Redis is down" in warnings and "make up" in warnings
    assert "s3cret" not in warnings  # the password in the URL is not shown
    if page == PAGES[0]:
        assert "MLflow is down" in warnings
    assert not at.error


@pytest.mark.parametrize("page", PAGES)
def test_empty_redis_says_no_traffic(dashboard_env, redis_client, redis_url, page):
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page(page)
    assert "No traffic yet" in texts(at.info)
    assert "Redis is down" not in texts(at.warning)


def seed(state: OnlineState) -> None:
    """Counters as serving and the stream consumer write them."""
    ab = {"champion": {"impressions": 1000, "clicks": 50, "carts": 20, "purchases": 10},
          "challenger": {"impressions": 1000, "clicks": 80, "carts": 25, "purchases": 12}}
    for variant, counts in ab.items():
        for f, n in counts.items():
            state.r.hincrby(RedisKeys.ab(state.experiment, variant), f, n)
        state.incr_stats(dd.ab_stats_name(variant), counts)
    state.incr_stats(dd.STATS_REQUESTS, {"cache": 30, "model": 60, "fallback": 10, "cold_user": 20,
                                         "cold_user_session": 15, "cold_user_trending": 5})
    state.incr_stats(dd.STATS_CACHE, {"hit": 30, "miss": 70})
    state.count_dlq({"invalid_json": 3, "schema": 1})
    state.set_consumer_status(lag=5, rate_eps=12.5, consumed=100, updated_ts=time.time())


@pytest.fixture()
def seeded(dashboard_env, redis_client, redis_url, mlflow_with_champion):
    seed(OnlineState(redis_client))
    dashboard_env(redis_url, mlflow_with_champion)


def test_ab_page_shows_ctr_test_and_models(seeded):
    at = run_page("app_pages/ab_traffic.py")
    m = metrics(at)
    assert m["champion impressions"] == "1,000"
    assert m["champion CTR"] == "5.00 %"
    assert m["challenger CTR"] == "8.00 %"
    assert m["champion conversion"] == "1.00 %"
    assert m["challenger purchases"] == "12"
    # pooled two-proportion z-test: 50/1000 vs 80/1000
    pooled = 130 / 2000
    z = (0.08 - 0.05) / (pooled * (1 - pooled) * (2 / 1000)) ** 0.5
    assert m["p-value"] == f"{2 * norm.sf(z):.3g}"
    assert m["CTR lift of challenger"] == "60.0 %"
    assert "challenger gets clicked more" in texts(at.success)
    assert m["Champion"] == "v1" and m["Challenger"] == "none"
    assert "ndcg_at_10 0.3125" in texts(at.caption)
    assert not at.warning
    assert len(at.get("vega_lite_chart")) == 1
    # ingestion
    assert m["Consumer lag (records)"] == "5" and m["Rate (events/s)"] == "12.5"
    dlq = at.dataframe[0].value
    assert dlq["records"].to_dict() == {"invalid_json": 3, "schema": 1}


def test_cold_start_page_shows_shares(seeded):
    at = run_page("app_pages/cold_start.py")
    m = metrics(at)
    assert m["Requests"] == "100"
    assert m["From new users"] == "20.0 %"
    assert m["New users served from session"] == "75.0 %"
    assert m["New users served trending"] == "25.0 %"
    assert len(at.get("vega_lite_chart")) == 2


def test_cache_page_shows_hit_rate_and_sources(seeded):
    at = run_page("app_pages/cache.py")
    m = metrics(at)
    assert m["Hit rate"] == "30.0 %"
    assert (m["Hits"], m["Misses"]) == ("30", "70")
    assert (m["From cache"], m["From model"], m["From fallback"]) == ("30", "60", "10")
    assert len(at.get("vega_lite_chart")) == 2
    assert not at.warning and not at.info


def test_one_variant_only_explains_there_is_no_test(dashboard_env, redis_client, redis_url):
    state = OnlineState(redis_client)
    state.r.hincrby(RedisKeys.ab(state.experiment, "champion"), "impressions", 10)
    dashboard_env(redis_url, DEAD_MLFLOW)
    at = run_page("app_pages/ab_traffic.py")
    assert "Only one variant has traffic" in texts(at.info)
    assert "p-value" not in metrics(at)
    assert "MLflow is down" in texts(at.warning)
