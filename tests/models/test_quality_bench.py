"""The quality benchmark's data, split and a quick run of `shoprec bench quality` on a sample."""

from __future__ import annotations

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
