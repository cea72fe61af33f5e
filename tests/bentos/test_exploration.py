"""The exploration slots spread impressions over the new products, favouring the relevant ones.

What a walk-through on the local stack found (~50 new products among thousands): every new visitor
got the same new product in the exploration slot (the one whose content vector was longest), known
users got only the new products nearest their profile (a new phone was in none of 400 users' top 10
over 8 minutes), and a user at the phone cap never got the new phone. The shop here: five categories,
users who each like one of them, 20 products published after training (four per category), and the
default budget, one exploration slot in a top 10.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipelines.rules import DIVERSITY_TOP, apply_rules, explore_order, explore_seed
from pipelines.schemas import ALIAS_CHAMPION

CATEGORIES = {"phones": ("Veltek", "smartphone 5g", 600.0), "shoes": ("Acme", "running shoe", 80.0),
              "lamps": ("Zeta", "desk lamp", 40.0), "earrings": ("Lumo", "silver earrings", 25.0),
              "books": ("Papyr", "paperback novel", 12.0)}
CATS = list(CATEGORIES)
N_USERS = 200  # user u<n> likes CATS[n % 5]
PER_CATEGORY = 8  # products with interactions
NEW_PER_CATEGORY = 4


def taste(user: str) -> str:
    return CATS[int(user[1:]) % len(CATS)]


def at_cap(user: str) -> bool:
    """Half the users have seen five products of their category (of eight): the three left fill its cap in their top
    10. The others have seen six: two left, one place free under the cap."""
    return (int(user[1:]) // len(CATS)) % 2 == 0


def category_of(item: str) -> str:
    return item.split("-")[1] if item.startswith("new-") else item.split("-")[0]


def shop(now_ms: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(interactions, catalog at training, products published since)``: each user saw five or six products of
    their category (of eight, see :func:`at_cap`) and one of another. Of the four new products per category
    the first is one more of the category's brand and kind, the others only share its category and price."""
    rng = np.random.default_rng(0)
    items = pd.DataFrame([{"item_id": f"{c}-{n}", "title": f"{brand} {words} {n}", "category": c, "brand": brand,
                           "price": price * (1 + n / 20), "created_at": now_ms - 90 * 86_400_000, "in_stock": True}
                          for c, (brand, words, price) in CATEGORIES.items() for n in range(PER_CATEGORY)])
    rows, t0 = [], now_ms - 30 * 86_400_000
    for u in range(N_USERS):
        c = CATS[u % len(CATS)]
        for n, i in enumerate(rng.choice(PER_CATEGORY, size=5 if at_cap(f"u{u}") else 6, replace=False)):
            rows.append((f"u{u}", f"{c}-{i}", t0 + (u * 10 + n) * 1000))
        other = CATS[(u + 1 + rng.integers(len(CATS) - 1)) % len(CATS)]
        rows.append((f"u{u}", f"{other}-{rng.integers(PER_CATEGORY)}", t0 + (u * 10 + 9) * 1000))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(weight=1.0)
    inter["ts"] = pd.to_datetime(inter["ts"], unit="ms", utc=True)
    # per category one more product of its usual brand and kind, and three of brands nobody has seen yet
    new = pd.DataFrame([{"item_id": f"new-{c}-{n}", "title": f"{brand} {words} new" if n == 0 else f"launch {n}",
                         "category": c, "brand": brand if n == 0 else f"startup-{c}-{n}", "price": price * (1 + n / 20),
                         "created_at": now_ms - 600_000 * (1 + n + NEW_PER_CATEGORY * k), "in_stock": True}
                        for k, (c, (brand, words, price)) in enumerate(CATEGORIES.items())
                        for n in range(NEW_PER_CATEGORY)])
    return inter, items, new


@pytest.fixture(scope="module")
def trained():
    from pipelines.models.hybrid import ShopRec

    inter, items, new = shop(int(time.time() * 1000))
    model = ShopRec(dim=16, epochs=80, lr=0.05, ials_dim=0, device="cpu").fit(inter, items)
    return model, items, new


@pytest.fixture()
def holder_for(settings, trained):
    """A scorer of the trained hybrid, the catalog holding the 20 new products (published after training).

    The draws depend on the user, their session and the period (``rules.explore_seed``): one period for the whole
    test, so that every run draws alike.
    """
    from pipelines.registry import LoadedModel
    from pipelines.serving import ModelHolder

    model, items, new = trained
    settings.catalog_path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([items, new]).to_parquet(settings.catalog_path)

    def make(**change):
        s = settings.model_copy(update={"explore_share": 0.1, "max_per_category": 3, "explore_reseed_s": 10 ** 12,
                                        **change})
        return ModelHolder(s, models={ALIAS_CHAMPION: LoadedModel(model, "1", ALIAS_CHAMPION)})

    return make, set(new["item_id"])


def top10(answer: dict) -> list[str]:
    return [i for i, _ in answer["items"]][:DIVERSITY_TOP]


def explored(answers: list[dict], new: set[str]) -> list[str]:
    """The new product in each answer's top 10 (the one exploration slot of a top 10)."""
    out = []
    for answer in answers:
        shown = [i for i in top10(answer) if i in new]
        assert len(shown) == 1, top10(answer)  # the budget: 10 % of 10 slots
        out.append(shown[0])
    return out


def test_new_visitors_are_shown_many_different_new_products(holder_for):
    """200 new visitors (no history, no session): the exploration slot used to show all of them one product."""
    make, new = holder_for
    answers = make().score([{"user_id": f"visitor-{n}", "k": 10} for n in range(200)])
    shown = Counter(explored(answers, new))
    assert len(shown) >= 18, shown  # of 20 (a uniform draw: 20 expected; fewer than 18 is below one in 10**10)
    assert max(shown.values()) <= 30, shown  # none hogs the slot (10 expected per product)


def test_every_new_product_reaches_known_users_and_the_relevant_ones_more_often(holder_for):
    """200 known users, two requests each (as they arrive, then after a click in their category): every new product
    gets exploration impressions within these 400 requests (20 per product on average), more of them from users of
    its category than from others. It used to be 17 of the 20: the slot took the new product nearest the profile,
    so some products of brands nobody had seen yet were never anyone's first choice."""
    make, new = holder_for
    holder = make()
    requests = [{"user_id": f"u{n}", "k": 10} for n in range(N_USERS)]
    requests += [{"user_id": f"u{n}", "k": 10, "recent": [f"{taste(f'u{n}')}-{n % PER_CATEGORY}"]}
                 for n in range(N_USERS)]
    answers = holder.score(requests)
    shown = explored(answers, new)
    assert set(shown) == new, sorted(new - set(shown))  # every one of the 20
    # the preference stays: a uniform draw would give 20 % of the slots to the user's own category
    relevant = [category_of(i) == taste(r["user_id"]) for i, r in zip(shown, requests)]
    assert np.mean(relevant) >= 0.5, np.mean(relevant)
    # per product: how often a user of its category is shown it, and how often anyone else is
    rates = {item: (np.mean([i == item for i, r in zip(shown, requests) if taste(r["user_id"]) == category_of(item)]),
                    np.mean([i == item for i, r in zip(shown, requests) if taste(r["user_id"]) != category_of(item)]))
             for item in new}
    own, other = np.mean([a for a, _ in rates.values()]), np.mean([b for _, b in rates.values()])
    assert own > 3 * other, rates
    for c in CATS:  # the category's usual brand and kind: above all shown to users of the category
        assert rates[f"new-{c}-0"][0] > 4 * rates[f"new-{c}-0"][1], (c, rates[f"new-{c}-0"])
    # the same requests in the same period: the same lists (what the cache warm-up relies on)
    assert holder.score(requests[:20]) == answers[:20]


def test_a_user_at_the_category_cap_is_shown_new_products_of_that_category(holder_for):
    """Phone lovers with three phones in their top 10 (the cap) were never shown a new phone: the slot had to go to
    another category. Now most of them are (their content path favours phones), in place of the model's third phone,
    and the cap holds."""
    make, new = holder_for
    phone_users = [{"user_id": f"u{n}", "k": 10} for n in range(0, N_USERS, len(CATS)) if at_cap(f"u{n}")]
    category = {i: category_of(i) for i in new} | {f"{c}-{n}": c for c in CATS for n in range(PER_CATEGORY)}
    plain = make(explore_share=0.0).score(phone_users)
    assert all(Counter(category[i] for i in top10(a))["phones"] == 3 for a in plain)  # all at the cap
    answers = make().score(phone_users)
    shown = explored(answers, new)
    assert sum(category[i] == "phones" for i in shown) >= len(phone_users) // 3, shown  # (0 before; ~70 % now)
    for before, after, item in zip(plain, answers, shown):
        phones = [i for i in top10(after) if category[i] == "phones"]
        assert len(phones) <= 3  # the cap holds
        if category[item] == "phones":  # the new phone took the place of the model's third phone
            assert phones == [i for i in top10(before) if category[i] == "phones"][:2] + [item]
            assert [i for i, _ in after["items"]].index(item) == DIVERSITY_TOP - 1


# --- the draw on its own ----------------------------------------------------------------
def test_without_a_content_path_the_slots_are_spread_evenly_over_the_new_products():
    """No relevance to go by (a model without a content path): every new product as likely, not the newest always."""
    new = [f"new-{n}" for n in range(20)]  # newest first
    scored = [(f"p{n}", 10.0 - n / 10) for n in range(30)]
    shown = Counter(apply_rules(scored, 10, new_items=new, explore_share=0.1, explore_seed=explore_seed(f"v{n}"))[9][0]
                    for n in range(200))
    assert set(shown) <= set(new) and len(shown) >= 18 and max(shown.values()) <= 30, shown


def test_the_draw_is_the_same_for_the_same_user_session_and_period_and_differs_otherwise():
    now = 1_800_000_000.0
    assert explore_seed("u1", ["a", "b"], now) == explore_seed("u1", ["a", "b"], now + 1)
    assert len({explore_seed("u1", [], now), explore_seed("u2", [], now), explore_seed("u1", ["a"], now),
                explore_seed("u1", [], now + 3600)}) == 4
    candidates, scores = [f"n{n}" for n in range(30)], [float(n % 7) for n in range(30)]
    assert explore_order(candidates, scores, 7) == explore_order(candidates, scores, 7)
    assert sorted(explore_order(candidates, scores, 7)) == sorted(candidates)
    assert explore_order(candidates, scores, 7, temperature=0.0)[:4] == ["n6", "n13", "n20", "n27"]  # no draw


def test_the_draw_favours_relevance_as_its_temperature_says():
    """First picks follow ``softmax(z / temperature)`` of the standardised scores."""
    candidates, scores = ["a", "b", "c"], [2.0, 1.0, 0.0]  # z = 1.22, 0, -1.22
    z = np.array([1.0, 0.0, -1.0]) * np.sqrt(1.5)
    for temperature in (0.5, 1.0, 3.0):
        first = Counter(explore_order(candidates, scores, seed, temperature)[0] for seed in range(4000))
        want = np.exp(z / temperature) / np.exp(z / temperature).sum()
        got = np.array([first[c] for c in candidates]) / 4000
        assert np.abs(got - want).max() < 0.03, (temperature, got, want)
