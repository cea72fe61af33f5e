"""The item-to-item, two-tower and ``shoprec`` hybrid models: the shared contract plus what users notice.

The two taste groups of ``two_groups()`` (A-items and B-items) make the right answers obvious:
A-people get A-items, a click on a B-item pulls a list towards B-items, and a new product that
looks like the A-items (same category, brand, price band, title words) ranks first for an A-person.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.models import get_recommender, load_recommender
from pipelines.models.content import ContentFeatures
from pipelines.models.hybrid import ShopRec
from pipelines.models.ials import IALS
from pipelines.models.scoring import Profiles
from pipelines.models.itemitem import ItemItem
from pipelines.models.twotower import TwoTower
from pipelines.schemas import COL_ITEM, COL_USER
from tests.models.test_models import RecommenderContract, frame, two_groups

FAST_EMBED = {"dim": 16, "epochs": 80, "lr": 0.05, "device": "cpu"}


def catalog(extra_new: bool = True) -> pd.DataFrame:
    """Content for the A/B items: A-items are cheap red Acme shoes, B-items pricey blue Zeta lamps."""
    rows = []
    for g, (cat, brand, price, word) in {"A": ("shoes", "Acme", 20.0, "red runner"),
                                         "B": ("lamps", "Zeta", 300.0, "blue desk")}.items():
        for i in range(6):
            rows.append({"item_id": f"{g}{i}", "title": f"{brand} {word} {i}", "category": cat, "brand": brand,
                         "price": price + i, "created_at": 0, "in_stock": True})
        if extra_new:  # never clicked yet
            rows.append({"item_id": f"NEW{g}", "title": f"{brand} {word} new", "category": cat, "brand": brand,
                         "price": price + 2.5, "created_at": 1, "in_stock": True})
    return pd.DataFrame(rows)


def same(rows: list, expected: list) -> None:
    """Equal lists, scores up to float rounding (one matmul over a batch may round differently)."""
    assert [[i for i, _ in r] for r in rows] == [[i for i, _ in r] for r in expected]
    assert np.allclose([s for r in rows for _, s in r], [s for r in expected for _, s in r], rtol=1e-5, atol=1e-6)


class TestItemItemEASE(RecommenderContract):
    probe_user = "a0"
    probe_expected = {"A3", "A4", "A5"}

    def make(self, **params) -> ItemItem:
        return get_recommender("itemitem", **{"l2": 1.0, "device": "cpu", **params})

    def data(self) -> pd.DataFrame:
        return two_groups()

    def test_similar_items_stay_in_the_group(self, fitted):
        assert set(fitted.similar_items("A0", 3)) <= {f"A{i}" for i in range(6)}


def test_content_gives_a_never_clicked_product_neighbours_in_ease():
    """With content pseudo-users, NEWA (an Acme shoe nobody clicked) sits among the A-items."""
    model = ItemItem(l2=20.0, content_weight=1.0, device="cpu").fit(two_groups(), catalog())
    assert set(model.similar_items("NEWA", 4)) <= {f"A{i}" for i in range(6)}
    score = dict(model.recommend_scored(["a0"], 20)[0])
    assert score["NEWA"] > score.get("NEWB", float("-inf"))
    plain = ItemItem(l2=20.0, device="cpu").fit(two_groups(), catalog())
    assert "NEWA" not in plain.similar_items("A0", 6)  # behaviour alone knows nothing of it
    again = load_recommender_roundtrip(model)
    assert again.similar_items("NEWA", 3) == model.similar_items("NEWA", 3)


def load_recommender_roundtrip(model, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        return load_recommender(d)


class TestItemItemCoVisitation(TestItemItemEASE):
    """The path for catalogs too big for EASE: sparse co-visitation, a top-N neighbour table."""

    def make(self, **params) -> ItemItem:
        return get_recommender("itemitem", **{"dense_max_items": 0, "device": "cpu", **params})

    def test_neighbour_table_is_top_n(self):
        model = self.make(neighbours=4).fit(self.data())
        assert tuple(model.nb_index.shape) == (12, 4)
        assert model.table_bytes() == 12 * 4 * (4 + 4)
        assert set(model.similar_items("B1", 4)) <= {f"B{i}" for i in range(6)}

    @pytest.mark.parametrize("dense_share", [2.0, 0.0], ids=["sparse-blocks", "dense-blocks"])
    def test_table_matches_the_dense_cosine_co_visitation(self, dense_share, monkeypatch):
        """Each row holds the N largest ``C_ij / sqrt(c_i c_j)`` of the dense formula, whichever way a block is taken."""
        from pipelines.models import itemitem

        monkeypatch.setattr(itemitem, "_DENSE_BLOCK_SHARE", dense_share)
        rng = np.random.default_rng(3)
        n_items, n = 300, 7
        inter = pd.DataFrame({"user_id": rng.integers(0, 120, 3000).astype(str),
                              "item_id": rng.zipf(1.3, 3000).clip(1, n_items).astype(str),
                              "ts": pd.Timestamp("2024-05-01", tz="UTC")})
        lone = pd.DataFrame({"user_id": "solo", "item_id": ["X1", "X2"], "ts": pd.Timestamp("2024-05-01", tz="UTC")})
        inter = pd.concat([inter, lone], ignore_index=True)  # X1 and X2 are co-visited with one item each
        model = self.make(neighbours=n).fit(inter)
        model._fit_covisit(*self._codes(model, inter), chunk=16)  # many chunks, same table
        pairs = inter.drop_duplicates(["user_id", "item_id"])
        x = pd.crosstab(pairs["user_id"], pairs["item_id"]).reindex(columns=model.item_ids).to_numpy(float)
        c = x.T @ x
        count = np.diag(c).copy()
        w = c / np.sqrt(np.outer(count, count))
        np.fill_diagonal(w, 0.0)
        expected = -np.sort(-w, axis=1)[:, :n]
        got = model.nb_weight.numpy()
        assert np.allclose(got, expected, atol=1e-6)  # the same top-N weights, best first
        rows = np.arange(len(w))[:, None]
        assert np.allclose(w[rows, model.nb_index.numpy()], got, atol=1e-6)  # each weight at its own neighbour
        x1 = model.item_index["X1"]  # fewer co-visited items than N: the rest is padding at weight 0
        assert model.nb_index[x1, 0].item() == model.item_index["X2"] and got[x1, 0] == pytest.approx(1.0)
        assert (got[x1, 1:] == 0).all() and (model.nb_index[x1, 1:] == x1).all()
        assert model.similar_items("X1", 3)[0] == "X2"

    @staticmethod
    def _codes(model, inter):
        pairs = inter.drop_duplicates(["user_id", "item_id"])
        users = {u: k for k, u in enumerate(sorted(pairs["user_id"].unique()))}
        return (pairs["user_id"].map(users).to_numpy(), pairs["item_id"].map(model.item_index).to_numpy(),
                len(users), len(model.item_ids))


class TestIALS(RecommenderContract):
    """The hybrid's second collaborative signal: iALS, user vectors folded in from the profile."""

    probe_user = "a0"
    probe_expected = {"A3", "A4", "A5"}

    def make(self, **params) -> IALS:
        return get_recommender("ials", **{"dim": 8, "alpha0": 0.5, "reg": 0.01, "device": "cpu", **params})

    def data(self) -> pd.DataFrame:
        return two_groups()

    def test_session_pulls_an_unknown_user_to_its_group(self, fitted):
        b, a = fitted.recommend_session(["B0"], 3), fitted.recommend_session(["A0"], 3)
        assert len(a) == len(b) == 3
        assert set(b) <= {f"B{i}" for i in range(6)} and set(a) <= {f"A{i}" for i in range(6)}

    def test_catalog_items_without_interactions_get_no_vector(self):
        model = self.make().fit(self.data(), catalog())
        assert torch.count_nonzero(model.item_vectors[model.item_ids.index("NEWA")]) == 0

    def test_folded_in_vectors_solve_each_profiles_normal_equations(self, fitted, monkeypatch):
        """Profiles of different lengths (one empty, one with a repeated item), across several chunks."""
        import pipelines.models.ials as ials_mod

        monkeypatch.setattr(ials_mod, "_FOLD_IN_BLOCK", 6)  # a few rows per chunk
        n_items = len(fitted.item_ids)
        bags = [[0, 3, 3], [], [1], [2, 4, 5, 0, 7], [6, 8], [9, 1, 2]]
        rows = np.concatenate([[r] * len(b) for r, b in enumerate(bags)]).astype("int64")
        items = np.concatenate([b for b in bags]).astype("int64")
        weights = np.linspace(0.5, 2.0, len(items))
        got = fitted.user_vectors(Profiles(len(bags), rows, items, weights, np.full(len(bags), -1)))
        h = fitted.item_vectors.double()
        for r in range(len(bags)):
            a = fitted.alpha0 * h.T @ h
            b = torch.zeros(fitted.dim, dtype=torch.float64)
            for i, w in zip(items[rows == r], weights[rows == r]):
                a += w * torch.outer(h[i], h[i])
                b += w * h[i]
            a += fitted.reg * (weights[rows == r].sum() + fitted.alpha0 * n_items) ** fitted.nu * torch.eye(fitted.dim)
            torch.testing.assert_close(got[r].double(), torch.linalg.solve(a, b), rtol=1e-4, atol=1e-6)


def test_interaction_strength_shapes_the_ease_weights():
    """With weight_power, a0's purchases (weight 5) of A1 pull A4 (bought with A1) above A3 (only viewed with it)."""
    rows = [("a0", "A0", 1.0), ("a0", "A1", 5.0)]
    for u in range(1, 6):
        rows += [(f"a{u}", "A0", 1.0), (f"a{u}", "A3", 1.0), (f"a{u + 5}", "A1", 5.0), (f"a{u + 5}", "A4", 5.0)]
    rows += [(f"a{u}", "A3", 1.0) for u in range(6, 8)]  # A3 is a bit more popular overall
    data = frame(rows)
    binary = ItemItem(l2=1.0, device="cpu").fit(data)
    weighted = ItemItem(l2=1.0, weight_power=1.0, device="cpu").fit(data)
    assert binary.recommend(["a0"], 1)[0] == ["A3"]
    assert weighted.recommend(["a0"], 1)[0] == ["A4"]
    assert load_recommender_roundtrip(weighted).recommend(["a0"], 2) == weighted.recommend(["a0"], 2)


class TestTwoTower(RecommenderContract):
    probe_user = "a0"
    probe_expected = {"A3", "A4", "A5"}

    def make(self, **params) -> TwoTower:
        return get_recommender("twotower", **{**FAST_EMBED, **params})

    def data(self) -> pd.DataFrame:
        return two_groups()

    def test_new_product_gets_a_content_embedding(self):
        model = self.make().fit(self.data(), catalog())
        assert set(model.new_item_ids) == {"NEWA", "NEWB"}
        code = model.item_ids.index("NEWA")
        assert torch.linalg.norm(model.item_emb[code]) > 0
        # the new A-like product is recommended to an A-person before the new B-like one
        ranked = [i for i in model.recommend(["a1"], len(model.item_ids))[0] if i.startswith("NEW")]
        assert ranked == ["NEWA", "NEWB"]

    def test_content_embedding_of_a_product_added_after_training(self):
        model = self.make().fit(self.data(), catalog())
        later = catalog().iloc[[0]].assign(item_id="LATER", title="Acme red runner later")
        vec = model.content_embedding(later)
        assert vec.shape == (1, 16) and torch.linalg.norm(vec) > 0


class TestTwoTowerSparseIds(TestTwoTower):
    """The path for catalogs too big for dense id tables: sparse gradients and SparseAdam, sampled softmax.

    Small batches and few negatives, so a step reads only some rows of each table (what makes lazy
    Adam differ from Adam); no user embedding, as in the production hybrid.
    """

    def make(self, **params) -> TwoTower:
        model = super().make(**{"batch_size": 32, "full_softmax_max": 0, "n_negatives": 4, "weight_decay": 1e-4,
                                "user_embedding": False, **params})
        model.dense_id_max = 0  # every id table counts as big here (the real threshold is 100,000 rows)
        return model

    def test_both_id_tables_take_the_sparse_path_and_two_fits_are_identical(self, caplog):
        with caplog.at_level("INFO", logger="pipelines.models.twotower"):
            a = self.make(user_embedding=True).fit(self.data(), catalog())
        assert "SparseAdam for the id tables over 0 rows: item, user" in caplog.text
        b = self.make(user_embedding=True).fit(self.data(), catalog())
        assert torch.equal(a.item_emb, b.item_emb) and torch.equal(a.user_emb, b.user_emb)
        assert a.user_emb.abs().sum() > 0
        assert a.recommend_scored(["a1", "b1"], 5) == b.recommend_scored(["a1", "b1"], 5)

    def test_tables_up_to_the_threshold_stay_dense(self, caplog):
        """12 items, 16 users: a threshold of 12 rows leaves the item table on the dense path; 16, both."""
        with caplog.at_level("INFO", logger="pipelines.models.twotower"):
            model = self.make(user_embedding=True)
            model.dense_id_max = 12
            model.fit(self.data())
        assert "SparseAdam for the id tables over 12 rows: user" in caplog.text
        caplog.clear()
        with caplog.at_level("INFO", logger="pipelines.models.twotower"):
            model.dense_id_max = 16
            dense = model.fit(self.data())
        assert "SparseAdam" not in caplog.text
        default = super().make(batch_size=32, full_softmax_max=0, n_negatives=4, weight_decay=1e-4).fit(self.data())
        assert torch.equal(dense.item_emb, default.item_emb)


class TestShopRec(RecommenderContract):
    probe_user = "a0"
    probe_expected = {"A3", "A4", "A5"}

    def make(self, **params) -> ShopRec:
        return get_recommender("shoprec", **{**FAST_EMBED, "l2": 1.0, "half_life_days": None, **params})

    def data(self) -> pd.DataFrame:
        return two_groups()

    def test_is_the_production_default_and_takes_the_training_config(self):
        from pipelines.settings import TrainConfig

        params = TrainConfig().model_dump(exclude={"holdout_per_user", "k", "min_improvement", "model"})
        model = get_recommender("shoprec", **params)
        assert {k: model.params()[k] for k in params} == params

    def test_one_new_click_changes_the_next_list(self, fitted):
        n = len(fitted.item_ids)
        before = [i for i, _ in fitted.recommend_batch([("a0", [])], n)[0]]
        after = [i for i, _ in fitted.recommend_batch([("a0", ["B0"])], n)[0]]
        assert before[:3] == sorted(before[:3]) or set(before[:3]) == {"A3", "A4", "A5"}
        assert "B0" not in after  # the clicked item is not offered again
        # B-items (the clicked one's neighbours) move up the list, without retraining
        assert after.index("B1") < before.index("B1") and after.index("B2") < before.index("B2")

    def test_session_changes_the_session_list(self, fitted):
        a = fitted.recommend_session(["A0"], 3)
        b = fitted.recommend_session(["B0"], 3)
        assert len(a) == len(b) == 3
        assert all(i.startswith("A") for i in a) and all(i.startswith("B") for i in b)

    def test_batch_equals_one_request_at_a_time(self, fitted):
        requests = [("a0", []), ("b1", ["A2"]), ("nobody", ["B3", "B1"]), ("nobody", []), ("a2", ["nope"])]
        batch = fitted.recommend_batch(requests, 4)
        same(batch, [fitted.recommend_batch([r], 4)[0] for r in requests])
        same(batch[:1], fitted.recommend_scored(["a0"], 4))
        same(batch[2:3], [fitted.recommend_session_scored(["B3", "B1"], 4)])
        for (_, session), row in zip(requests, batch):
            assert len(row) == 4 and not set(session) & {i for i, _ in row}

    def test_new_user_without_history_gets_trending(self):
        df = frame([("u1", "old"), ("u2", "old"), ("u3", "old"), ("u4", "new"), ("u5", "new")])
        df.loc[df[COL_ITEM] == "old", "ts"] -= 30 * 86_400_000
        model = self.make(half_life_days=1.0, epochs=2).fit(df)
        assert model.recommend_batch([("stranger", [])], 2)[0][0][0] == "new"
        assert model.recommend_session([], 2) == ["new", "old"]

    def test_new_products_are_scored_from_content(self):
        model = self.make().fit(self.data(), catalog())
        assert set(model.new_item_ids) == {"NEWA", "NEWB"}
        ranked = model.rank_new_items("a1", [], 2)
        assert [i for i, _ in ranked] == ["NEWA", "NEWB"] and all(s != 0.0 for _, s in ranked)
        # a session of B-clicks turns it round for someone the model has never seen
        assert model.rank_new_items(None, ["B1", "B2"], 2)[0][0] == "NEWB"
        # products added after training, described by catalog rows
        later = catalog(extra_new=False).iloc[[1, 8]].assign(item_id=["LATER_A", "LATER_B"])
        assert model.rank_new_items("b2", [], 1, catalog=later)[0][0] == "LATER_B"
        assert model.rank_new_items("a1", [], 1, catalog=later)[0][0] == "LATER_A"  # (the same frame again)
        other = later.iloc[::-1].assign(item_id=["OTHER_B", "OTHER_A"])  # another frame: its own vectors
        assert model.rank_new_items("b2", [], 1, catalog=other)[0][0] == "OTHER_B"
        # nobody to personalise for (no history, no usable session): no new product ranks above another, so the
        # exploration slots draw among them evenly (it used to be the longest content vector, for every visitor)
        assert model.rank_new_items(None, [], 2) == [("NEWA", 0.0), ("NEWB", 0.0)]
        assert model.rank_new_items("walk-in", ["nope"], 2, catalog=later) == [("LATER_A", 0.0), ("LATER_B", 0.0)]

    def test_a_product_added_after_training_has_neighbours_by_content(self):
        model = self.make().fit(self.data(), catalog(extra_new=False))
        later = catalog(extra_new=False).iloc[[1, 8]].assign(item_id=["LATER_A", "LATER_B"])
        shoe, lamp = model.content_neighbours(later, 3)
        assert len(shoe) == len(lamp) == 3
        assert all(i.startswith("A") for i in shoe) and all(i.startswith("B") for i in lamp)
        # without content the model knows, it has nothing to say (not three arbitrary products)
        assert self.make().fit(self.data()).content_neighbours(later, 3) == [[], []]

    def test_save_load_keeps_content_and_trending(self, tmp_path):
        model = self.make().fit(self.data(), catalog())
        model.save(tmp_path / "m")
        loaded = load_recommender(tmp_path / "m")
        assert loaded.rank_new_items("a1", [], 2) == model.rank_new_items("a1", [], 2)
        assert loaded.recommend_batch([("a0", ["B1"])], 5) == model.recommend_batch([("a0", ["B1"])], 5)


    def test_ials_part_blends_round_trips_and_can_be_left_out(self, tmp_path):
        model = self.make(w_ials=1.0).fit(self.data())
        prof, _ = model._profiles([("a0", ["B1"])])
        assert set(model.part_scores(prof)) == {"itemitem", "ials", "embed", "pop"}
        model.save(tmp_path / "m")
        assert load_recommender(tmp_path / "m").recommend_batch([("a0", ["B1"])], 5) == \
            model.recommend_batch([("a0", ["B1"])], 5)
        without = self.make(ials_dim=0).fit(self.data())
        assert without.ials is None and "ials" not in without.part_scores(prof)
        without.save(tmp_path / "w")
        again = load_recommender(tmp_path / "w")
        assert again.ials is None and again.recommend(["a0"], 3) == without.recommend(["a0"], 3)
        assert set(again.recommend(["a0"], 3)[0]) == {"A3", "A4", "A5"}

    def test_a_model_saved_before_weights_and_ials_loads_as_it_was_fitted(self, tmp_path):
        import json
        import shutil

        old = self.make(ials_dim=0, weight_power=0.0).fit(self.data())
        old.save(tmp_path / "m")
        meta = tmp_path / "m" / "recommender.json"
        doc = json.loads(meta.read_text())
        holder = doc["params"]
        for key in ("weight_power", "weight_cap", "ials_dim", "ials_alpha0", "ials_reg", "ials_iterations", "w_ials"):
            holder.pop(key, None)
        meta.write_text(json.dumps(doc))
        legacy = load_recommender(tmp_path / "m")
        assert legacy.itemitem.weight_power == 0.0 and legacy.ials is None
        assert legacy.recommend(["a0"], 3) == old.recommend(["a0"], 3)
        # a new model whose iALS files are missing is refused, not silently served without them
        new = self.make(w_ials=1.0).fit(self.data())
        new.save(tmp_path / "n")
        shutil.rmtree(tmp_path / "n" / "ials")
        with pytest.raises(FileNotFoundError, match="ials"):
            load_recommender(tmp_path / "n")


def test_content_features_tokens():
    feats = ContentFeatures(n_bands=2, min_count=1).fit(catalog())
    assert {"category=shoes", "brand=Zeta", "title:runner"} <= set(feats.vocab)
    assert any(t.startswith("price#") for t in feats.vocab)
    tokens, offsets = feats.transform(catalog().iloc[:2])
    assert len(offsets) == 2 and len(tokens) > 0
    # a row with no known token gives an empty bag, not an error
    tokens, offsets = feats.transform(pd.DataFrame({"item_id": ["x"], "title": ["zzz"]}))
    assert len(tokens) == 0 and list(offsets) == [0]


def _reference_bags(feats: ContentFeatures, items: pd.DataFrame) -> tuple[list[list[str]], dict[str, int]]:
    """Token bags row by row, straight from the rules in ``pipelines.models.content`` (and the vocabulary they
    give): what the column-wise implementation must reproduce exactly."""
    import re

    from pipelines.models.content import SKIP_COLUMNS, TEXT_COLUMNS

    bags = []
    for _, row in items.iterrows():
        toks = []
        for col in (c for c in items.columns if c not in SKIP_COLUMNS):
            v = row[col]
            if col in feats.bands:
                if pd.notna(v):
                    toks.append(f"{col}#{int(np.searchsorted(feats.bands[col], float(v), side='right'))}")
            elif pd.api.types.is_numeric_dtype(items[col]) and not pd.api.types.is_bool_dtype(items[col]):
                continue
            elif col in TEXT_COLUMNS:
                toks += [f"{col}:{w}" for w in re.findall(r"[a-z0-9]+", str(v).lower())] if pd.notna(v) else []
            elif pd.notna(v):
                toks.append(f"{col}={v}")
        bags.append(list(dict.fromkeys(toks)))
    docs: dict[str, int] = {}
    for b in bags:
        for t in b:
            docs[t] = docs.get(t, 0) + 1
    vocab = {t: n for n, t in enumerate(sorted(t for t, c in docs.items() if c >= feats.min_count))}
    return bags, vocab


def _hostile_catalog() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": ["a", "b", "c", "d", "e", "f"],
        "title": ["Red red RUNNER-2000", None, "", "Ünïcode café 42", "red", "  runner  red  "],
        "category": ["shoes", "shoes", None, "lamps", "lamps", "shoes"],
        "brand": ["Acme", "Acme", "Zeta", None, "Zeta", "Acme"],
        "price": [20.0, np.nan, 300.0, 25.0, 310.0, 20.0],
        "on_sale": [True, False, True, True, False, True],
        "created_at": [0, 1, 2, 3, 4, 5], "in_stock": [True] * 6,
    })


@pytest.mark.parametrize("source", ["hostile", "simulator", "ml-100k"])
def test_content_bags_match_the_row_by_row_rules(source):
    """The column-wise tokenizer gives exactly the bags and vocabulary of the rules applied row by row
    (repeated words once, in first-occurrence order; missing values no token; rare tokens dropped)."""
    if source == "hostile":
        items = _hostile_catalog()
    elif source == "simulator":
        from pipelines.simulator import make_catalog

        items = make_catalog(2000, seed=3)
    else:
        from pipelines.datasets import load_ml100k

        items = load_ml100k()[1]
    feats = ContentFeatures(min_count=2).fit(items)
    bags, vocab = _reference_bags(feats, items)
    assert feats.vocab == vocab and len(vocab) > 3
    tokens, offsets = feats.transform(items)
    ends = list(offsets[1:]) + [len(tokens)]
    inverse = {n: t for t, n in vocab.items()}
    got = [[inverse[int(t)] for t in tokens[a:b]] for a, b in zip(offsets, ends)]
    assert got == [[t for t in b if t in vocab] for b in bags]
    once_tokens, once_offsets = ContentFeatures(min_count=2).fit_transform(items)  # tokenizes once
    assert np.array_equal(once_tokens, tokens) and np.array_equal(once_offsets, offsets)


@pytest.mark.parametrize("name", ["twotower", "bpr"])
def test_torch_fits_are_bit_identical_with_two_threads(name):
    """On ml-100k with two threads (this machine's default), where reading the embedding tables by indexing
    let the gradients' summation order vary between runs: two fits must give the same bits."""
    from pipelines.datasets import load_ml100k

    inter, items = load_ml100k(rating_as_weight=True)
    params = {"twotower": {"user_embedding": True}, "bpr": {}}[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = (get_recommender(name, device="cpu", epochs=1, dim=32, **params).fit(inter, items) for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.item_emb, b.item_emb) and torch.equal(a.user_emb, b.user_emb)


def test_fit_is_deterministic_for_a_seed(synthetic_interactions_df):
    a = ShopRec(dim=8, epochs=3, device="cpu").fit(synthetic_interactions_df)
    b = ShopRec(dim=8, epochs=3, device="cpu").fit(synthetic_interactions_df)
    users = sorted(a.known_users)[:10]
    assert a.recommend_scored(users, 5) == b.recommend_scored(users, 5)
    assert np.array_equal(a.embed.item_emb.numpy(), b.embed.item_emb.numpy())


@pytest.fixture()
def synthetic_interactions_df():
    from tests.conftest import synthetic_interactions

    return synthetic_interactions()


def test_taste_groups_are_found_in_the_synthetic_data(synthetic_interactions_df):
    model = ShopRec(dim=16, epochs=20, device="cpu").fit(synthetic_interactions_df)
    users = sorted(set(synthetic_interactions_df[COL_USER]))
    lists = model.recommend(users, 5)
    assert len(lists) == len(users) > 0
    for user, recs in zip(users, lists):
        assert len(recs) == 5
        group = int(user[1:]) % 2
        assert all(int(i[1:]) % 2 == group for i in recs)


def test_the_serving_blend_equals_the_standardised_parts_it_is_tuned_on(synthetic_interactions_df):
    """Serving standardises the factor parts analytically; the lists must be the ones the blend was tuned on."""
    model = ShopRec(dim=16, epochs=5, device="cpu", w_ials=0.5, w_embed=0.7).fit(synthetic_interactions_df)
    users = sorted(model.known_users)[:40]
    profiles, _ = model._profiles([(u, ("i3", "i8") if n % 3 == 0 else ()) for n, u in enumerate(users)])
    weights = model.blend_weights()
    expected = sum(weights[k] * s for k, s in model.part_scores(profiles).items())
    got = model._score(profiles)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.topk(got, 10).indices, torch.topk(expected, 10).indices)


def test_row_standardisation_matches_torch_std_mean_including_constant_rows():
    from pipelines.models.scoring import row_std_mean, zscore_rows

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5000, generator=gen) * 4 + 9  # a large mean next to the spread
    scores[1] = 0.0
    scores[2, :4990] = 0.0  # mostly zeros, as item-to-item rows are
    scores[3] = 7.5  # constant: standardises to zeros, not NaN
    std, mean = row_std_mean(scores)
    want_std, want_mean = torch.std_mean(scores.double(), dim=1, keepdim=True)
    assert torch.allclose(std.double(), want_std, rtol=1e-5, atol=1e-6)
    assert torch.allclose(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    z = zscore_rows(scores)
    assert torch.isfinite(z).all() and (z[1] == 0).all() and (z[3] == 0).all()


def test_new_visitors_get_trending_without_being_scored(synthetic_interactions_df, monkeypatch):
    """A request with nothing known (unknown user, no session) costs no scoring pass, and batching it changes nothing."""
    model = ShopRec(dim=8, epochs=3, device="cpu").fit(synthetic_interactions_df)
    users = sorted(model.known_users)[:6]
    requests = [(users[0], []), ("a-new-visitor", []), (users[1], ["i3"]), ("another-visitor", []),
                ("visitor-with-a-click", ["i8"]), (users[2], [])]
    alone = [model.recommend_batch([r], 10)[0] for r in requests]
    scored_rows = []
    real_score = model._score
    monkeypatch.setattr(model, "_score", lambda p: scored_rows.append(p.n_rows) or real_score(p))
    together = model.recommend_batch(requests, 10)
    assert scored_rows == [4]  # the two visitors with nothing known were not scored
    assert [[i for i, _ in r] for r in together] == [[i for i, _ in r] for r in alone]
    trending = [i for i, _ in model.recommend_session_scored([], 10)]
    assert [i for i, _ in together[1]] == [i for i, _ in together[3]] == trending
    scored_rows.clear()
    assert [i for i, _ in model.recommend_batch([("nobody", [])], 10)[0]] == trending and scored_rows == []


def test_bfloat16_item_product_keeps_the_lists(synthetic_interactions_df):
    """Serving's bfloat16 product (half the memory per batch) ranks like float32; other dtypes are refused."""
    model = ShopRec(dim=16, epochs=5, device="cpu").fit(synthetic_interactions_df)
    users = sorted(model.known_users)[:40]
    exact = model.recommend(users, 10)
    model.set_product_dtype(torch.bfloat16)
    assert model._stacked_items_t([m for _, _, m in model._factor_parts()]).dtype == torch.bfloat16
    approx = model.recommend(users, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.9, overlap
    model.set_product_dtype(torch.float32)
    assert model.recommend(users, 10) == exact
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        model.set_product_dtype(torch.float16)
