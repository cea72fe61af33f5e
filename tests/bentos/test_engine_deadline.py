"""A scorer that raises or runs past the deadline: the shop still gets popular items, on time, never an error."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipelines.schemas import SOURCE_FALLBACK, SOURCE_MODEL, STATS_MODEL_ERROR, STATS_MODEL_TIMEOUT, STATS_REQUESTS
from pipelines.serving import RecommendationEngine
from pipelines.settings import get_settings

POPULAR = [["p1", 9.0], ["p2", 7.0], ["p3", 5.0]]


async def info():
    return {"versions": {"champion": "7"}, "popular": POPULAR}


def model_answer(requests):
    return [{"items": [["m1", 1.0], ["m2", 0.5]], "model_version": "7", "variant": "champion"} for _ in requests]


@pytest.fixture()
def engine_with(settings, redis_client, monkeypatch):
    monkeypatch.setenv("SHOPREC_SERVE_DEADLINE_MS", "300")
    monkeypatch.setenv("SHOPREC_SERVE_CACHE", "false")
    get_settings.cache_clear()
    engines = []

    def make(score_fn):
        eng = RecommendationEngine.from_settings(get_settings(), score_fn, info)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()


def _requests_counted(engine) -> dict[str, int]:
    engine.flush_stats()
    totals: dict[str, int] = {}
    for fields in engine.state.read_stats(STATS_REQUESTS).values():
        for f, n in fields.items():
            totals[f] = totals.get(f, 0) + n
    return totals


def test_a_scorer_past_the_deadline_gives_the_fallback_in_time(engine_with):
    async def slow(requests):
        await asyncio.sleep(5)
        return model_answer(requests)

    engine = engine_with(slow)
    t0 = time.perf_counter()
    rec = asyncio.run(engine.recommend("u1", 2))
    took = time.perf_counter() - t0
    assert rec.source == SOURCE_FALLBACK and [i["item_id"] for i in rec.items] == ["p1", "p2"]
    assert took < 2.0  # the 300 ms deadline, not the scorer's 5 s
    counted = _requests_counted(engine)
    assert counted.get(STATS_MODEL_TIMEOUT) == 1 and counted.get(SOURCE_FALLBACK) == 1


def test_a_raising_scorer_gives_the_fallback(engine_with):
    async def broken(requests):
        raise RuntimeError("CUDA error: device-side assert triggered")

    engine = engine_with(broken)
    rec = asyncio.run(engine.recommend("u1", 3))
    assert rec.source == SOURCE_FALLBACK and [i["item_id"] for i in rec.items] == ["p1", "p2", "p3"]
    assert rec.model_version is None
    assert _requests_counted(engine).get(STATS_MODEL_ERROR) == 1


def test_a_healthy_scorer_answers_from_the_model(engine_with):
    async def ok(requests):
        return model_answer(requests)

    rec = asyncio.run(engine_with(ok).recommend("u1", 2))
    assert rec.source == SOURCE_MODEL and rec.model_version == "7" and [i["item_id"] for i in rec.items] == ["m1", "m2"]


def test_a_swap_the_api_has_not_heard_of_yet_tags_answers_with_the_scorers_versions(engine_with):
    """The scorer promoted version 8 and stopped serving the challenger before the API process polled /info:
    the answer must be tagged with what the scorer now serves, not the new champion beside the old challenger."""
    async def promoted(requests):
        return [{"items": [["m1", 1.0]], "model_version": "8", "variant": "champion", "versions": {"champion": "8"}}
                for _ in requests]

    engine = engine_with(promoted)

    async def run():
        await engine.refresh_info()
        engine.versions = {"champion": "7", "challenger": "8"}  # what it heard last
        return [await engine.recommend(f"u{n}", 1) for n in range(3)]

    answers = asyncio.run(run())
    assert {(a.model_version, a.experiment) for a in answers} == {("8", f"{engine.experiment.name}@champion.8")}
    assert engine.versions == {"champion": "8"}


def test_the_fallback_list_obeys_stock_and_the_category_cap(engine_with, settings):
    import pandas as pd

    popular = [[f"p{n}", 100.0 - n] for n in range(20)]

    async def info_many():
        return {"versions": {"champion": "7"}, "popular": popular}

    async def failing(requests):
        raise RuntimeError("scorer down")

    # p0 sold out; p1..p6 share one category, the rest have their own
    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"item_id": f"p{n}", "title": "t", "category": "shoes" if 1 <= n <= 6 else f"c{n}", "brand": "b",
                   "price": 1.0, "created_at": 0, "in_stock": n != 0} for n in range(20)]).to_parquet(settings.catalog_path)
    engine = engine_with(failing)
    engine.info_fn = info_many

    async def scenario():
        first = await engine.recommend("u1", 10)
        # a product selling out reaches the fallback at the next poll
        pd.DataFrame([{"item_id": f"p{n}", "title": "t", "category": f"c{n}", "brand": "b", "price": 1.0,
                       "created_at": 0, "in_stock": n not in (0, 1)} for n in range(20)]).to_parquet(settings.catalog_path)
        await engine.refresh_info()
        return first, await engine.recommend("u2", 3)

    rec, later = asyncio.run(scenario())
    ids = [i["item_id"] for i in rec.items]
    assert rec.source == SOURCE_FALLBACK and len(ids) == 10
    assert "p0" not in ids  # sold out: never shown, not even by the fallback
    assert ids[:3] == ["p1", "p2", "p3"] and sum(i in {f"p{n}" for n in range(1, 7)} for i in ids) == 3
    assert [i["item_id"] for i in later.items] == ["p2", "p3", "p4"]
