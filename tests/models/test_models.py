"""Behaviour every recommender shows (``RecommenderContract``) plus what is special to each model.

Each model is fitted on a tiny matrix with an obvious answer, so a failure means the
model got something a user would notice wrong, not that a number moved.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.models import REGISTRY, Recommender, get_recommender, load_recommender
from pipelines.models.bpr import BPR
from pipelines.models.popularity import Popularity
from pipelines.schemas import COL_ITEM, COL_TS, COL_USER, COL_WEIGHT

T0 = 1_700_000_000_000  # epoch ms
DAY_MS = 86_400_000


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Interactions from ``(user, item)`` or ``(user, item, weight)`` rows, one second apart."""
    out = []
    for n, row in enumerate(rows):
        user, item, *weight = row
        out.append({COL_USER: user, COL_ITEM: item, COL_TS: T0 + 1000 * n, COL_WEIGHT: weight[0] if weight else 1.0})
    return pd.DataFrame(out)


def two_groups() -> pd.DataFrame:
    """Users a0..a7 consume items A0..A5, users b0..b7 items B0..B5; a0 and b0 have seen only half."""
    rows = []
    for g in "ab":
        items = [f"{g.upper()}{i}" for i in range(6)]
        for u in range(8):
            rows += [(f"{g}{u}", it) for it in (items[:3] if u == 0 else items)]
    return frame(rows)


def ladder() -> pd.DataFrame:
    """X0 is consumed by 6 users, X1 by 5, ... X5 by 1; u0 has seen X0, X2 and X5."""
    users = {"X0": "u0 u1 u2 u3 u4 u5", "X1": "u1 u2 u3 u4 u5", "X2": "u0 u1 u2 u3", "X3": "u1 u2 u3",
             "X4": "u1 u2", "X5": "u0"}
    return frame([(u, item) for item, us in users.items() for u in us.split()])


class RecommenderContract:
    """What every recommender must do; a subclass sets the model, its data and the obvious answer."""

    #: the probe user's top ``len(probe_expected)`` recommendations (exclude_seen) are these items
    probe_user: str
    probe_expected: set[str]
    #: an item of the data and what an unknown user gets: [] by the base contract
    unknown_user_gets_popular = False

    def make(self, **params) -> Recommender:
        raise NotImplementedError

    def data(self) -> pd.DataFrame:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def fitted(self) -> Recommender:
        return self.make().fit(self.data())

    def seen(self, user: str) -> set[str]:
        df = self.data()
        return set(df.loc[df[COL_USER] == user, COL_ITEM])

    # --- the obvious answer -----------------------------------------------------------
    def test_probe_user_gets_the_obvious_items_first(self, fitted):
        n = len(self.probe_expected)
        assert set(fitted.recommend([self.probe_user], n)[0]) == self.probe_expected

    def test_registered_and_buildable_by_name(self, fitted):
        assert REGISTRY[fitted.name] is type(fitted)
        rebuilt = get_recommender(fitted.name, **fitted.params())
        assert type(rebuilt) is type(fitted) and rebuilt.params() == fitted.params()

    def test_knows_the_users_and_items_of_its_data(self, fitted):
        df = self.data()
        assert set(fitted.known_users) == set(df[COL_USER])
        assert sorted(fitted.item_ids) == sorted(set(df[COL_ITEM]))
        assert self.probe_user in fitted.known_users

    # --- lists -----------------------------------------------------------------------------
    def test_lists_have_k_distinct_items_best_first(self, fitted):
        rows = fitted.recommend_scored(sorted(fitted.known_users), 3, exclude_seen=False)
        assert len(rows) == len(fitted.known_users) > 0
        for row in rows:
            items, scores = [i for i, _ in row], [s for _, s in row]
            assert len(items) == 3 == len(set(items))
            assert scores == sorted(scores, reverse=True)
            assert all(isinstance(s, float) and math.isfinite(s) for s in scores)

    def test_exclude_seen_never_returns_a_seen_item(self, fitted):
        n_items = len(fitted.item_ids)
        users = sorted(fitted.known_users)
        lists = fitted.recommend(users, n_items, exclude_seen=True)
        assert len(lists) == len(users) > 0
        for user, recs in zip(users, lists):
            assert not set(recs) & self.seen(user)
            assert len(recs) == n_items - len(self.seen(user))  # everything else is still rankable

    def test_without_exclude_seen_all_items_can_come_back(self, fitted):
        n_items = len(fitted.item_ids)
        recs = fitted.recommend([self.probe_user], n_items, exclude_seen=False)[0]
        assert sorted(recs) == sorted(fitted.item_ids)

    def test_k_larger_than_the_catalog_gives_the_whole_catalog(self, fitted):
        assert len(fitted.recommend([self.probe_user], 1000, exclude_seen=False)[0]) == len(fitted.item_ids)

    def test_unknown_user(self, fitted):
        unknown = fitted.recommend(["nobody"], 3)[0]
        if self.unknown_user_gets_popular:
            assert unknown == fitted.recommend_session([], 3)
        else:
            assert unknown == []
        # an unknown user in a batch changes nothing for the others
        both = fitted.recommend(["nobody", self.probe_user], 3)
        assert both[1] == fitted.recommend([self.probe_user], 3)[0]

    # --- sessions and similar items ------------------------------------------------------
    def test_session_items_are_excluded(self, fitted):
        session = sorted(self.seen(self.probe_user))
        recs = fitted.recommend_session(session, len(fitted.item_ids))
        assert not set(recs) & set(session)
        assert len(recs) == len(fitted.item_ids) - len(session)

    def test_empty_or_unknown_session_gives_popular_items(self, fitted):
        popular = fitted.recommend_session([], 3)
        assert len(popular) == 3
        assert fitted.recommend_session(["no-such-item"], 3) == popular

    def test_similar_items_exclude_the_item_and_unknown_gives_nothing(self, fitted):
        item = fitted.item_ids[0]
        similar = fitted.similar_items(item, 4)
        assert len(similar) == 4 and item not in similar
        assert fitted.similar_items("no-such-item", 4) == []

    # --- persistence and determinism ---------------------------------------------------
    def test_save_load_round_trip_gives_identical_answers(self, fitted, tmp_path):
        fitted.save(tmp_path / "model")
        loaded = load_recommender(tmp_path / "model")
        users = sorted(fitted.known_users) + ["nobody"]
        assert type(loaded) is type(fitted) and loaded.params() == fitted.params()
        assert loaded.recommend_scored(users, 5) == fitted.recommend_scored(users, 5)
        assert loaded.recommend_scored(users, 5, exclude_seen=False) == fitted.recommend_scored(users, 5, False)
        session = sorted(self.seen(self.probe_user))
        assert loaded.recommend_session_scored(session, 5) == fitted.recommend_session_scored(session, 5)
        assert loaded.similar_items(fitted.item_ids[1], 5) == fitted.similar_items(fitted.item_ids[1], 5)
        assert set(loaded.known_users) == set(fitted.known_users)

    def test_two_fits_give_the_same_lists(self, fitted):
        again = self.make().fit(self.data())
        users = sorted(fitted.known_users)
        assert again.recommend_scored(users, 5) == fitted.recommend_scored(users, 5)

    def test_fit_on_nothing_raises(self):
        with pytest.raises(ValueError):
            self.make().fit(self.data().iloc[:0])


class TestPopularity(RecommenderContract):
    probe_user = "u0"
    probe_expected = {"X1", "X3"}  # the two most popular items u0 has not seen
    unknown_user_gets_popular = True

    def make(self, **params) -> Popularity:
        return get_recommender("popularity", **params)

    def data(self) -> pd.DataFrame:
        return ladder()

    def test_ranks_by_count(self, fitted):
        assert fitted.recommend(["u0"], 3)[0] == ["X1", "X3", "X4"]
        assert fitted.recommend_scored(["nobody"], 3)[0] == [("X0", 6.0), ("X1", 5.0), ("X2", 4.0)]

    def test_session_and_similar_are_popular_items_minus_the_given_ones(self, fitted):
        assert fitted.recommend_session(["X1", "X0"], 2) == ["X2", "X3"]
        assert fitted.similar_items("X0", 2) == ["X1", "X2"]

    def test_weight_column_counts(self):
        df = frame([("u1", "cheap"), ("u2", "cheap"), ("u3", "cheap"), ("u1", "bought", 5.0)])
        assert Popularity().fit(df).recommend(["nobody"], 2)[0] == ["bought", "cheap"]
        assert Popularity().fit(df.drop(columns=[COL_WEIGHT])).recommend(["nobody"], 2)[0] == ["cheap", "bought"]

    @pytest.mark.parametrize("as_datetime", [False, True])
    def test_half_life_makes_recent_items_trend(self, as_datetime):
        old = [(f"u{n}", "old") for n in range(4)]
        df = frame(old + [("u9", "new"), ("u8", "new")])
        df.loc[df[COL_ITEM] == "old", COL_TS] -= 10 * DAY_MS  # four interactions 10 days ago
        if as_datetime:
            df[COL_TS] = pd.to_datetime(df[COL_TS], unit="ms", utc=True)
        assert Popularity().fit(df).recommend(["nobody"], 2)[0] == ["old", "new"]
        trending = Popularity(half_life_days=1.0).fit(df)
        assert trending.recommend(["nobody"], 2)[0] == ["new", "old"]
        assert trending.recommend_scored(["nobody"], 1)[0][0][1] == pytest.approx(2.0, rel=1e-4)  # the two are 1 s apart
        assert trending.params() == {"half_life_days": 1.0}


class TestBPR(RecommenderContract):
    probe_user = "a0"
    probe_expected = {"A3", "A4", "A5"}  # the rest of a0's group's items

    def make(self, **params) -> BPR:
        return get_recommender("bpr", **{"dim": 16, "epochs": 100, "lr": 0.05, "device": "cpu", **params})

    def data(self) -> pd.DataFrame:
        return two_groups()

    def test_default_params(self):
        assert BPR().params() == {"dim": 64, "epochs": 15, "lr": 0.01, "weight_decay": 1e-5,
                                  "batch_size": 4096, "seed": 2020, "device": "auto"}

    def test_both_groups_get_their_own_items(self, fitted):
        a, b = fitted.recommend(["a0", "b0"], 3)
        assert set(a) == {"A3", "A4", "A5"} and set(b) == {"B3", "B4", "B5"}

    def test_session_follows_the_session(self, fitted):
        a_session = fitted.recommend_session(["A1", "A0"], 4)
        b_session = fitted.recommend_session(["B2"], 4)
        assert len(a_session) == len(b_session) == 4
        assert all(i.startswith("A") for i in a_session) and "A1" not in a_session
        assert all(i.startswith("B") for i in b_session) and "B2" not in b_session

    def test_newest_session_item_weighs_most(self, fitted):
        vec = fitted.session_vector(["A0", "B0"])
        emb = dict(zip(fitted.item_ids, fitted.item_emb))
        expected = (emb["A0"] + 0.8 * emb["B0"]) / 1.8
        assert torch.allclose(vec, expected, atol=1e-6)
        assert torch.allclose(fitted.session_vector(["nope", "A0"]), emb["A0"])  # unknown items are skipped
        assert fitted.session_vector(["nope"]) is None and fitted.session_vector([]) is None

    def test_cold_session_falls_back_to_training_popularity(self):
        df = frame([("u1", "hit"), ("u2", "hit"), ("u3", "hit"), ("u1", "miss"), ("u2", "rare", 0.5)])
        model = self.make(epochs=2).fit(df)
        assert model.recommend_session([], 3) == ["hit", "miss", "rare"]

    def test_similar_items_of_an_a_item_are_a_items(self, fitted):
        a, b = fitted.similar_items("A0", 5), fitted.similar_items("B4", 5)
        assert len(a) == len(b) == 5
        assert all(i.startswith("A") for i in a) and all(i.startswith("B") for i in b)

    def test_score_users_batch(self, fitted):
        vecs = torch.stack([fitted.user_vector("a1"), fitted.user_vector("b1")])  # [2, dim]
        a3 = fitted.item_ids.index("A3")
        scores, idx = fitted.score_users(vecs, 4, exclude=[[a3], []])
        assert scores.shape == idx.shape == (2, 4)
        assert a3 not in idx[0].tolist()
        assert all(fitted.item_ids[i].startswith("A") for i in idx[0].tolist())
        assert all(fitted.item_ids[i].startswith("B") for i in idx[1].tolist())
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
        # the same numbers as the per-user API
        row = fitted.recommend_scored(["a1"], 4, exclude_seen=False)[0]
        full_s, full_i = fitted.score_users(vecs[:1], 4)
        assert [fitted.item_ids[i] for i in full_i[0].tolist()] == [i for i, _ in row]
        assert np.allclose(full_s[0].numpy(), [s for _, s in row])

    def test_user_vector(self, fitted):
        assert fitted.user_vector("a1").shape == (16,)
        assert fitted.user_vector("nobody") is None

    def test_another_seed_gives_another_model(self, fitted):
        other = self.make(seed=7).fit(self.data())
        assert not torch.equal(other.item_emb, fitted.item_emb)
        assert set(other.recommend(["a0"], 3)[0]) == self.probe_expected

    def test_user_who_has_seen_everything_gets_an_empty_list(self):
        df = frame([("u1", "i1"), ("u1", "i2"), ("u2", "i1")])
        model = self.make(epochs=2).fit(df)
        assert model.recommend(["u1"], 5) == [[]]
        assert model.recommend(["u2"], 5) == [["i2"]]
