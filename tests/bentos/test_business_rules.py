"""The business rules hold for every list a user sees: scored, filled in, explored, pre-warmed or cached.

README: no out-of-stock product, nothing the user bought, at most ``max_per_category`` per category in
the top 10, and a share of the slots for new products (which obey the same rules).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pandas as pd
import pytest

from pipelines.rules import DIVERSITY_TOP, apply_rules
from pipelines.schemas import ALIAS_CHAMPION, SOURCE_CACHE, SOURCE_MODEL, RedisKeys
from tests.conftest import synthetic_interactions


def _ids(items) -> list[str]:
    return [i["item_id"] if isinstance(i, dict) else i[0] for i in items]


def _over_cap(ids: list[str], category: dict[str, str], cap: int) -> dict[str, int]:
    """Categories with more than ``cap`` products in the top 10 of a list."""
    counts = Counter(category.get(i, i) for i in ids[:DIVERSITY_TOP])
    return {c: n for c, n in counts.items() if n > cap}


# --- the rules on their own --------------------------------------------------------------
def test_a_new_product_of_a_category_at_the_cap_replaces_its_lowest_model_product_in_the_top_10():
    """The walk-through: a user who just clicked a Veltek phone has three phones in the top 10; the exploration
    slot went to earrings, never to the new Veltek phone. Now the new phone takes the slot and the model's third
    phone moves just below the top 10: still three phones there, one of them new."""
    scored = [("phone-1", 9.9), ("phone-2", 9.8), ("phone-3", 9.7)] + [(f"p{n}", 9.0 - n / 10) for n in range(20)]
    category = {"phone-1": "phones", "phone-2": "phones", "phone-3": "phones", "new-phone": "phones",
                "new-earrings": "earrings", "new-gone": "earrings"} | {f"p{n}": f"c{n}" for n in range(20)}
    rules = dict(category=category, max_per_category=3, explore_share=0.1)
    relevance = {"new-phone": 0.9, "new-earrings": 0.1, "new-gone": 0.5}
    rank_new = lambda c: [(i, relevance[i]) for i in c]  # (the content path: the phone first)
    out = apply_rules(scored, 20, new_items=["new-earrings", "new-phone"], rank_new=rank_new, **rules)
    ids = _ids(out)
    assert ids[:10] == ["phone-1", "phone-2"] + [f"p{n}" for n in range(7)] + ["new-phone"]
    assert ids[10] == "phone-3"  # the first below the top 10 (the cap does not apply there)
    assert ids[19] == "new-earrings" and len(ids) == len(set(ids)) == 20
    assert not _over_cap(ids, category, 3)
    assert [s for _, s in out[:10]] == sorted((s for _, s in out[:10]), reverse=True)
    # the same newest first (no content path): the phone, which is newest, takes the slot the same way
    ids = _ids(apply_rules(scored, 10, new_items=["new-phone", "new-earrings"], **rules))
    assert ids[9] == "new-phone" and "phone-3" not in ids and not _over_cap(ids, category, 3)
    # two slots, two new phones: the second replaces the model's second phone, never its best one
    more = category | {"new-phone-2": "phones"}
    two = _ids(apply_rules(scored, 20, new_items=["new-phone", "new-phone-2", "new-earrings"], category=more,
                           max_per_category=3, explore_share=0.2))
    assert two[:10] == ["phone-1", "p0", "p1", "new-phone", "p2", "p3", "p4", "p5", "p6", "new-phone-2"]
    assert two[10:12] == ["phone-2", "phone-3"] and two[14] == "new-earrings" and not _over_cap(two, more, 3)
    # one per category: the user's only phone is their best pick in it, so the new phone is passed over
    one = _ids(apply_rules(scored, 10, new_items=["new-phone", "new-earrings"], category=category, max_per_category=1,
                           explore_share=0.1))
    assert one[0] == "phone-1" and one[9] == "new-earrings" and "new-phone" not in one
    assert not _over_cap(one, category, 1)
    # out of stock or bought: never shown, not even in an exploration slot
    ids = _ids(apply_rules(scored, 10, new_items=["new-gone", "new-earrings"], out_of_stock={"new-gone"}, **rules))
    assert ids[9] == "new-earrings" and "new-gone" not in ids
    ids = _ids(apply_rules(scored, 10, new_items=["new-phone", "new-earrings"], bought={"new-phone"}, **rules))
    assert ids[9] == "new-earrings" and "phone-3" in ids


def test_capped_products_never_come_back_into_the_top_10_when_the_candidates_run_out():
    """The reported list: nearly all shoes, so the over-cap shoes came back at positions 6-9 (…5.40, 9.94, 9.80)."""
    scored = [(f"shoe-{n}", 9.99 - n / 100) for n in range(25)] + [("bag-1", 5.6), ("hat-1", 5.5), ("belt-1", 5.4)]
    category = {i: i.split("-")[0] for i, _ in scored}
    popular = [("shoe-0", 50.0), ("shoe-30", 49.0), ("sock-1", 48.0), ("bag-1", 47.0), ("toy-1", 46.0),
               ("gone-1", 45.0), ("mug-1", 44.0), ("mug-2", 43.0), ("pen-1", 42.0), ("cap-1", 41.0)]
    category |= {i: i.split("-")[0] for i, _ in popular}
    out = apply_rules(scored, 10, out_of_stock={"gone-1"}, bought={"mug-1"}, category=category, max_per_category=3,
                      backfill=popular)
    ids = _ids(out)
    assert ids == ["shoe-0", "shoe-1", "shoe-2", "bag-1", "hat-1", "belt-1", "sock-1", "toy-1", "mug-2", "pen-1"]
    assert [s for _, s in out] == sorted((s for _, s in out), reverse=True)  # best first, as a shop shows it
    # with nothing to fill in with, a shorter list rather than a fourth shoe in the top 10
    assert _ids(apply_rules(scored, 10, category=category, max_per_category=3)) == ids[:6]
    # a longer list: the capped shoes follow the top 10, in the model's order
    ids = _ids(apply_rules(scored, 20, out_of_stock={"gone-1"}, bought={"mug-1"}, category=category,
                           max_per_category=3, backfill=popular))
    assert ids[10:] == [f"shoe-{n}" for n in range(3, 13)]


@pytest.mark.parametrize("seed", range(300))
def test_every_list_obeys_every_rule(seed):
    """Random lists, catalogs, purchases, stock, new products and shares: the rules hold for the whole answer."""
    rng = random.Random(seed)
    n_cat = rng.choice([1, 2, 3, 5, 20])
    universe = [f"i{n}" for n in range(rng.randint(5, 120))]
    category = {i: f"c{rng.randrange(n_cat)}" for i in universe if rng.random() < 0.95}  # some without one
    new_items = [i for i in universe if rng.random() < 0.15]
    scored = sorted(((i, rng.uniform(0, 10)) for i in rng.sample(universe, rng.randint(0, len(universe)))),
                    key=lambda x: -x[1])
    popular = [(i, 100.0 - n) for n, i in enumerate(rng.sample(universe, rng.randint(0, len(universe))))]
    out_of_stock = {i for i in universe if rng.random() < 0.1}
    bought = {i for i in universe if rng.random() < 0.1}
    cap, k = rng.choice([1, 2, 3, 10]), rng.choice([1, 5, 10, 20, 50])
    share = rng.choice([0.0, 0.1, 0.2, 0.5, 1.0])
    rank_new = rng.choice([None, lambda c: [(i, float(n)) for n, i in enumerate(c)],
                           lambda c: [(i, rng.random()) for i in c[::2]]])  # (candidates left out: not explored)
    explore_seed = rng.choice([None, rng.getrandbits(64)])
    out = apply_rules(scored, k, out_of_stock=out_of_stock, bought=bought, category=category, max_per_category=cap,
                      new_items=new_items, explore_share=share, rank_new=rank_new, explore_seed=explore_seed,
                      backfill=popular)
    ids = _ids(out)
    assert len(ids) == len(set(ids)) <= k
    assert not set(ids) & (out_of_stock | bought)
    assert not _over_cap(ids, category, cap)
    assert set(ids) <= {i for i, _ in scored} | {i for i, _ in popular} | set(new_items)
    # as long as k when the rules allow it: every eligible product placed, or the top 10 full under the cap
    eligible = ({i for i, _ in scored} | {i for i, _ in popular}) - out_of_stock - bought
    left = eligible - set(ids)
    if len(ids) < k and left:
        top_cats = Counter(category.get(i, i) for i in ids[:DIVERSITY_TOP])
        assert len(ids) < DIVERSITY_TOP and all(top_cats[category.get(i, i)] >= cap for i in left)


# --- the rules in serving, on a real model -----------------------------------------------
@pytest.fixture()
def shoe_shop(settings):
    """u0's candidates are nearly all shoes; the products u0 has already seen are each their own category.

    Returns ``(seen, now_ms)``: u0's seen products (the model never recommends them; the popular list has them).
    """
    seen = set(synthetic_interactions().query("user_id == 'u0'")["item_id"])
    now = int(time.time() * 1000)
    old = now - 90 * 86_400_000
    rows = [{"item_id": f"i{n}", "title": f"item {n}", "brand": "b", "price": 9.5, "created_at": old, "in_stock": True,
             "category": f"seen-{n}" if f"i{n}" in seen else {1: "bags", 3: "hats"}.get(n, "shoes")}
            for n in range(40)]
    rows += [{"item_id": "fresh-shoe", "title": "new", "category": "shoes", "brand": "b", "price": 5.0,
              "created_at": now - 1_800_000, "in_stock": True},
             {"item_id": "fresh-toy", "title": "new", "category": "toys", "brand": "b", "price": 5.0,
              "created_at": now - 3_600_000, "in_stock": True},
             {"item_id": "fresh-gone", "title": "new", "category": "gone", "brand": "b", "price": 5.0,
              "created_at": now - 600_000, "in_stock": False}]
    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(settings.catalog_path)
    return sorted(seen, key=lambda i: int(i[1:])), now


def _catalog(settings) -> tuple[dict[str, str], set[str]]:
    df = pd.read_parquet(settings.catalog_path)
    return dict(zip(df["item_id"], df["category"])), set(df.loc[~df["in_stock"], "item_id"])


def test_a_user_whose_candidates_are_nearly_all_one_category_gets_a_full_list_under_the_cap(
        settings, registered_champion, shoe_shop):
    from pipelines.serving import ModelHolder

    seen, _ = shoe_shop
    registry, _ = registered_champion
    holder = ModelHolder(settings.model_copy(update={"explore_share": 0.2}), registry=registry)
    holder.refresh()
    category, gone = _catalog(settings)
    bought = {seen[0]}
    for k in (10, 20):
        [answer] = holder.score([{"user_id": "u0", "variant": ALIAS_CHAMPION, "k": k, "bought": sorted(bought)}])
        ids, scores = _ids(answer["items"]), [s for _, s in answer["items"]]
        assert len(ids) == len(set(ids)) == k
        assert not _over_cap(ids, category, 3), ids
        assert not set(ids) & (gone | bought)
        assert scores[:10] == sorted(scores[:10], reverse=True)  # no capped shoe pulled back into the top 10
        # both new products take the two exploration slots (20 %) of the top 10, whichever the draw puts first;
        # the new shoe in place of the model's third shoe (it would be a 4th shoe), which moves below the top 10
        assert {i for i in ids[:10] if i.startswith("fresh-")} == {"fresh-shoe", "fresh-toy"}
        assert ids[9].startswith("fresh-") and sum(category[i] == "shoes" for i in ids[:10]) == 3
        assert {"i1", "i3"} <= set(ids[:10])  # the model's few other products are all in the top 10
        assert set(ids[:10]) & set(seen[1:])  # and popular products that fit filled in the rest
        if k == 20:
            assert all(category[i] == "shoes" for i in ids[10:])


def test_the_warmed_cache_is_what_serving_would_cache(settings, redis_client, registered_champion, shoe_shop):
    """After train_job the first /recommend is a cache hit: with the rules applied, as serving itself caches it.

    The exploration slots are drawn per user, session and period (``rules.explore_seed``): the warm-up and
    serving draw alike within one period (SHOPREC_EXPLORE_RESEED_S); the test makes it longer than the test, so that
    a boundary cannot fall between them.
    """
    from pipelines import training
    from pipelines.serving import ModelHolder, RecommendationEngine
    from pipelines.state import OnlineState

    seen, _ = shoe_shop
    settings = settings.model_copy(update={"explore_reseed_s": 10 ** 12})  # one period for the whole test
    registry, reg = registered_champion
    state = OnlineState(redis_client, recent_cap=settings.recent_items_cap, cache_ttl_s=settings.cache_ttl_s)
    users = [f"u{n}" for n in range(8)]
    state.mark_purchased("u0", [seen[1]])
    model = registry.load(ALIAS_CHAMPION).recommender
    raw = model.recommend_scored(["u2"], 1)[0]
    state.mark_purchased("u2", [raw[0][0]])  # u2's best-scored product: bought
    sold_out = model.recommend_scored(["u1"], 1)[0][0][0]  # u1's: out of stock
    df = pd.read_parquet(settings.catalog_path)
    df.loc[df["item_id"] == sold_out, "in_stock"] = False
    df.to_parquet(settings.catalog_path)
    category, gone = _catalog(settings)
    assert sold_out in gone

    warmed = training.warm_cache(state, registry.load(ALIAS_CHAMPION), users, settings.warm_cache_k, ALIAS_CHAMPION,
                                 settings)
    assert warmed == len(users)
    cached = {u: state.get_cached(u, ALIAS_CHAMPION) for u in users}

    holder = ModelHolder(settings, registry=registry)
    holder.refresh()

    async def score(requests):
        return holder.score(requests)

    async def info():
        return {"versions": holder.versions(), "popular": holder.popular(settings.fallback_k)}

    # no local copies: the second pass must read Redis right after the deletes (a copy goes when Redis's
    # invalidation reaches the process, which the test would otherwise have to wait for)
    engine = RecommendationEngine.from_settings(settings.model_copy(update={"serve_local_cache_entries": 0}), score,
                                                info)

    async def twice():  # (one event loop: the engine's Redis client belongs to it)
        after_warming = [await engine.recommend(u, 10) for u in users]
        for user in users:
            redis_client.delete(RedisKeys.cache(user))
        scored = [await engine.recommend(u, 10) for u in users]
        return after_warming, scored

    try:
        after_warming, scored = asyncio.run(twice())
    finally:
        engine.close()
    # what the users see right after the warm-up: the cache, under every rule
    for rec in after_warming:
        ids = _ids(rec.items)
        assert rec.source == SOURCE_CACHE and rec.model_version == reg.version
        assert len(ids) == 10 and not set(ids) & gone and not _over_cap(ids, category, 3)
        assert len({"fresh-toy", "fresh-shoe"} & set(ids)) == 1 and "fresh-gone" not in ids  # one slot of 10
    assert seen[1] not in _ids(cached["u0"]["items"]) and raw[0][0] not in _ids(cached["u2"]["items"])
    # and exactly what serving caches when it scores them itself
    for user, rec in zip(users, scored):
        assert rec.source == SOURCE_MODEL
        fresh = state.get_cached(user, ALIAS_CHAMPION)
        assert fresh.keys() == cached[user].keys() and fresh["n"] == cached[user]["n"]
        assert fresh["model_version"] == cached[user]["model_version"] == reg.version
        assert _ids(fresh["items"]) == _ids(cached[user]["items"])
        assert [i["score"] for i in fresh["items"]] == pytest.approx([i["score"] for i in cached[user]["items"]],
                                                                     abs=1e-5)
