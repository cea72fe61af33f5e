"""The quality benchmark's data, split and a quick run of `shoprec bench quality` on a sample."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.datasets import load_ml100k, split_by_ratio
from pipelines.schemas import COL_ITEM, COL_USER

METRICS = {"ndcg@10", "recall@10", "mrr@10", "hit@10", "precision@10"}


def test_ml100k_comes_from_the_recbole_package():
    inter, items = load_ml100k()
    assert len(inter) == 100_000 and inter[COL_USER].nunique() == 943 and inter[COL_ITEM].nunique() == 1682
    assert len(items) == 1682 and {"title", "genres", "year"} <= set(items.columns)
    assert items.loc[items[COL_ITEM] == "1", "genres"].item() == "Animation Children's Comedy"


def test_recbole_split_is_8_1_1_per_user_disjoint_and_seeded():
    inter, _ = load_ml100k()
    train, valid, test = split_by_ratio(inter, seed=2020)
    assert len(train) + len(valid) + len(test) == len(inter)
    n = inter.groupby(COL_USER).size()
    assert (valid.groupby(COL_USER).size() == (n * 0.1).astype(int)).all()
    assert (test.groupby(COL_USER).size() == (n * 0.1).astype(int)).all()
    key = lambda df: set(zip(df[COL_USER], df[COL_ITEM], df["ts"]))  # noqa: E731
    assert not key(train) & key(test) and not key(valid) & key(test)
    again = split_by_ratio(inter, seed=2020)[2]
    assert key(again) == key(test) and key(split_by_ratio(inter, seed=1)[2]) != key(test)


# sha256 of the sorted "user<TAB>item" lines of each part as RecBole 1.2.1 itself split ml-100k.inter with its
# defaults (Config(model="Pop", dataset="ml-100k"), init_seed, create_dataset, data_preparation)
RECBOLE_VALID_SHA256 = "c5f5b48d655e1fafbf52e12e1a7f4d95012da662ac03e140064315c131e378f1"
RECBOLE_TEST_SHA256 = "44178b5362793b89c474e0ea1c6d8b6cff40f68d0f86b6e0e4265b516b6a4c0a"


def test_split_is_recboles_own_pair_for_pair():
    """The benchmark's valid and test parts are the very ones RecBole evaluates its published models on."""
    inter, _ = load_ml100k()
    _, valid, test = split_by_ratio(inter, seed=2020)

    def digest(part):
        lines = sorted(f"{u}\t{i}" for u, i in zip(part[COL_USER], part[COL_ITEM]))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    assert digest(valid) == RECBOLE_VALID_SHA256
    assert digest(test) == RECBOLE_TEST_SHA256


def test_quality_benchmark_runs_on_a_sample(tmp_path):
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(app, ["bench", "quality", "--sample", "120", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["dataset"].startswith("ml-100k") and "8:1:1" in data["protocol"]
    assert set(data["results"]) == {"popularity", "implicit_als", "implicit_bpr", "itemitem", "twotower", "ials",
                                    "shoprec"}
    for row in data["results"].values():
        assert METRICS | {"fit_s", "predict_s"} <= set(row)
        assert all(0.0 <= row[m] <= 1.0 for m in METRICS)
    # learned models beat popularity, and the content path beats random on cold items
    assert data["results"]["shoprec"]["ndcg@10"] > data["results"]["popularity"]["ndcg@10"]
    cold = data["cold_start"]
    assert cold["shoprec_content"]["ndcg@10"] > cold["random"]["ndcg@10"]
    assert "shoprec" in result.output and "cold_start" in result.output
