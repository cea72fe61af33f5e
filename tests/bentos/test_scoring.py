"""The scoring core: one batched call gives what per-request calls give; the business rules."""

from __future__ import annotations

import pytest

from pipelines.rules import apply_rules
from pipelines.serving import score_batch
from tests.conftest import synthetic_interactions


@pytest.fixture(scope="module")
def bpr():
    from pipelines.models import get_recommender

    return get_recommender("bpr", dim=16, epochs=5, device="cpu").fit(synthetic_interactions())


def test_batched_scoring_equals_one_by_one(bpr):
    requests = [("u0", []), ("walk-in", ["i3", "i5"]), ("u1", ["i2"]), ("nobody", []), ("other", ["zzz", "i4"])]
    lists, cold = score_batch(bpr, requests, 7)
    assert cold == [False, True, False, True, True]
    for (user, recent), got in zip(requests, lists):
        want = bpr.recommend_scored([user], 7)[0] if user in bpr.known_users else bpr.recommend_session_scored(recent, 7)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5, abs=1e-5)


def test_rules_drop_stock_and_purchases_cap_categories_and_spread_exploration():
    scored = [(f"a{n}", 10.0 - n * 0.1) for n in range(8)] + [(f"b{n}", 5.0 - n * 0.1) for n in range(8)]
    category = {i: i[0] for i, _ in scored}
    out = apply_rules(scored, 20, out_of_stock={"a0"}, bought={"b0"}, category=category, max_per_category=3)
    ids = [i for i, _ in out]
    assert "a0" not in ids and "b0" not in ids
    assert ids[:6] == ["a1", "a2", "a3", "b1", "b2", "b3"]  # three of each category, best first
    # two categories cannot fill a top 10 under the cap, and with nothing to fill in with the list ends there:
    # the deferred ones never come back into the top 10
    assert ids == ["a1", "a2", "a3", "b1", "b2", "b3"]
    # popular items that fit (in stock, not bought, under the cap) fill the top 10, then the deferred ones follow
    popular = [("a9", 99.0), ("c1", 98.0), ("b0", 97.0), ("oos", 96.0), ("c2", 95.0), ("c3", 94.0), ("c4", 93.0),
               ("d1", 92.0), ("d2", 91.0)]
    category |= {"a9": "a", "c1": "c", "c2": "c", "c3": "c", "c4": "c", "d1": "d", "d2": "d", "oos": "d"}
    out = apply_rules(scored, 20, out_of_stock={"a0", "oos"}, bought={"b0"}, category=category, max_per_category=3,
                      backfill=popular)
    ids = [i for i, _ in out]
    assert ids[:10] == ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3", "d1"]
    # past the top 10: the deferred ones, in their order, then the rest of the popular items
    assert ids[10:] == ["a4", "a5", "a6", "a7", "b4", "b5", "b6", "b7", "a9", "c4"]
    assert [s for _, s in out[:10]] == sorted((s for _, s in out[:10]), reverse=True)  # filled in below b3
    explored = apply_rules(scored, 20, category=category, max_per_category=20, new_items=["n1", "n2", "n3", "n4"],
                           explore_share=0.2)
    assert [n for n, (i, _) in enumerate(explored) if i.startswith("n")] == [4, 9, 14, 19]
    assert explored[4][1] < explored[3][1]


@pytest.mark.parametrize("setting", ["bfloat16", "float32"])
def test_the_scorer_loads_the_champion_with_the_configured_product_dtype(settings, registered_champion, setting):
    """``SHOPREC_SERVE_PRODUCT_DTYPE`` reaches the served hybrid, which answers known and new users either way."""
    import torch

    from pipelines.serving import ModelHolder

    registry, _ = registered_champion
    holder = ModelHolder(settings.model_copy(update={"serve_product_dtype": setting}), registry=registry)
    holder.refresh()
    model = holder.models["champion"].recommender
    assert model._product_dtype == getattr(torch, setting)
    answers = holder.score([{"user_id": "u0", "variant": "champion", "k": 5}, {"user_id": "walk-in", "k": 5}])
    assert [len(a["items"]) for a in answers] == [5, 5] and answers[0]["cold"] is False and answers[1]["cold"] is True


def test_a_challenger_left_on_the_promoted_version_is_not_served_as_an_experiment(settings, registered_champion):
    """Promoting by hand moves ``champion`` onto the challenger's version; the stale alias must not split traffic."""
    from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION
    from pipelines.serving import ModelHolder

    registry, reg = registered_champion
    model = registry.load(ALIAS_CHAMPION).recommender
    _, v2 = registry.log_and_register(model, params=model.params(), metrics={"ndcg_at_10": 0.1}, tags={})
    registry.set_alias(ALIAS_CHALLENGER, v2)
    holder = ModelHolder(settings, registry=registry)
    assert holder.refresh() == {ALIAS_CHAMPION: reg.version, ALIAS_CHALLENGER: v2}  # an A/B test of two versions
    registry.set_alias(ALIAS_CHAMPION, v2)  # a person promotes the challenger and leaves its alias
    assert holder.refresh() == {ALIAS_CHAMPION: v2}
    assert holder.refresh() == {ALIAS_CHAMPION: v2}  # and stays so on the next polls
    answer = holder.score([{"user_id": "u0", "variant": ALIAS_CHALLENGER, "k": 5}])[0]
    assert answer["model_version"] == v2 and len(answer["items"]) == 5


def test_a_click_on_a_product_added_after_training_moves_a_new_visitors_list(settings):
    """The model never saw the product; its nearest trained products by content stand in for the click, so a new
    visitor whose first click is a new lamp gets lamps (it got trending), and the dashboard counts it as served
    from the session. A click the catalog cannot place is still trending."""
    import pandas as pd

    from pipelines.models import get_recommender
    from pipelines.registry import LoadedModel
    from pipelines.schemas import ALIAS_CHAMPION
    from pipelines.serving import ModelHolder
    from tests.models.test_hybrid import FAST_EMBED, catalog
    from tests.models.test_models import two_groups

    model = get_recommender("shoprec", **FAST_EMBED).fit(two_groups(), catalog(extra_new=False))
    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    later = catalog(extra_new=False).iloc[[8]].assign(item_id="LATER_B")  # a blue Zeta desk lamp
    pd.concat([catalog(extra_new=False), later]).to_parquet(settings.catalog_path)
    holder = ModelHolder(settings, models={ALIAS_CHAMPION: LoadedModel(model, "1", ALIAS_CHAMPION)})

    lamp, stranger, nothing = holder.score([{"user_id": "walk-in", "recent": ["LATER_B"], "k": 4},
                                            {"user_id": "walk-in-2", "recent": ["not-in-catalog"], "k": 4},
                                            {"user_id": "walk-in-3", "k": 4}])
    assert lamp["cold"] and lamp["cold_from"] == "session"
    # (six lamps in all: the three nearest stand in for the click and are not offered back)
    assert [i[0] for i in lamp["items"][:3]] and all(i.startswith("B") for i, _ in lamp["items"][:3]), lamp["items"]
    assert stranger["cold_from"] == nothing["cold_from"] == "trending"
    # what /similar answers for it: its nearest lamps by content
    similar = holder.by_content(holder.models[ALIAS_CHAMPION], ["LATER_B", "not-in-catalog"], 3)
    assert list(similar) == ["LATER_B"] and all(i.startswith("B") for i in similar["LATER_B"])
    assert stranger["items"] == nothing["items"]  # the unplaceable click changes nothing
    # a known user's click on the new product moves their list towards lamps too
    before, after = holder.score([{"user_id": "a0", "k": 6}, {"user_id": "a0", "recent": ["LATER_B"], "k": 6}])
    assert "cold_from" not in before
    top3 = lambda answer: {i[0] for i, _ in answer["items"][:3]}  # noqa: E731
    assert top3(before) == {"A"} and top3(after) == {"B"}
