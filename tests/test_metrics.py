"""Offline metrics against hand-computed values, the time split and ``evaluate``."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipelines.metrics import evaluate, hit_at_k, mrr_at_k, ndcg_at_k, precision_at_k, recall_at_k, time_split
from pipelines.models.popularity import Popularity
from pipelines.schemas import COL_ITEM, COL_TS, COL_USER

ALL = {"ndcg": ndcg_at_k, "recall": recall_at_k, "precision": precision_at_k, "mrr": mrr_at_k, "hit": hit_at_k}


def metric_values(recommended, relevant, k) -> dict[str, float]:
    return {name: fn(recommended, relevant, k) for name, fn in ALL.items()}


def test_perfect_ranking():
    values = metric_values([["a", "b", "x"]], [{"a", "b"}], k=2)
    assert values == {"ndcg": 1.0, "recall": 1.0, "precision": 1.0, "mrr": 1.0, "hit": 1.0}


def test_one_relevant_item_at_position_two():
    values = metric_values([["x", "a", "y"]], [{"a"}], k=3)
    assert values["ndcg"] == pytest.approx(1 / math.log2(3))
    assert values["mrr"] == pytest.approx(0.5)
    assert values["precision"] == pytest.approx(1 / 3)
    assert values["recall"] == 1.0 and values["hit"] == 1.0


def test_hits_at_positions_one_and_three():
    values = metric_values([["a", "x", "b"]], [{"a", "b"}], k=3)
    assert values["ndcg"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert values["precision"] == pytest.approx(2 / 3)
    assert values["recall"] == 1.0 and values["mrr"] == 1.0


def test_no_hit_is_zero_everywhere():
    assert set(metric_values([["x", "y"]], [{"a"}], k=2).values()) == {0.0}


def test_items_below_the_cut_off_do_not_count():
    assert metric_values([["x", "y", "a"]], [{"a"}], k=2)["hit"] == 0.0


def test_ideal_dcg_uses_at_most_k_items():
    # five relevant items, k = 2, both top-2 items relevant: as good as a top-2 list can be
    values = metric_values([["a", "b"]], [{"a", "b", "c", "d", "e"}], k=2)
    assert values["ndcg"] == 1.0 and values["precision"] == 1.0
    assert values["recall"] == pytest.approx(2 / 5)


def test_mean_over_users_with_relevant_items_only():
    recommended = [["a"], ["x"], ["q"]]
    relevant = [{"a"}, {"b"}, set()]  # the third user has nothing relevant: not counted
    assert hit_at_k(recommended, relevant, 1) == 0.5
    assert recall_at_k(recommended, relevant, 1) == 0.5
    assert ndcg_at_k([["q"]], [set()], 1) == 0.0  # nobody to average over


def test_short_lists_and_repeated_items():
    assert precision_at_k([["a"]], [{"a"}], 4) == 0.25  # hits / k, also for a short list
    assert recall_at_k([["a", "a"]], [{"a", "b"}], 2) == 0.5  # a repeated hit counts once
    assert ndcg_at_k([["a", "a"]], [{"a", "b"}], 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [{"a"}, {"b"}], 1)
    with pytest.raises(ValueError):
        ndcg_at_k([["a"]], [{"a"}], 0)


def interactions(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[COL_USER, COL_ITEM, COL_TS])


def test_time_split_holds_out_the_last_interactions_by_time():
    df = interactions([("u1", "late", 30), ("u1", "early", 10), ("u1", "mid", 20), ("u2", "only", 5),
                       ("u3", "first", 1), ("u3", "second", 2)])
    train, test = time_split(df)
    assert sorted(zip(test[COL_USER], test[COL_ITEM])) == [("u1", "late"), ("u3", "second")]
    assert sorted(train[COL_ITEM]) == ["early", "first", "mid", "only"]  # u2 (one interaction) stays in train
    assert list(train.columns) == list(df.columns) and len(train) + len(test) == len(df)

    train2, test2 = time_split(df, holdout_per_user=2)
    assert sorted(test2[COL_ITEM]) == ["late", "mid", "second"]  # u3 keeps one interaction in train
    assert sorted(train2[COL_ITEM]) == ["early", "first", "only"]
    with pytest.raises(ValueError):
        time_split(df, holdout_per_user=0)


def test_time_split_works_on_datetimes():
    df = interactions([("u1", "b", 2), ("u1", "a", 1)])
    df[COL_TS] = pd.to_datetime(df[COL_TS], unit="ms", utc=True)
    train, test = time_split(df)
    assert list(test[COL_ITEM]) == ["b"] and list(train[COL_ITEM]) == ["a"]


def test_evaluate_popularity_by_hand():
    # popularity in train: p1 (3) > p2 (2) > p3 (1); every train user has seen p1
    train = interactions([("u1", "p1", 1), ("u2", "p1", 2), ("u3", "p1", 3), ("u2", "p2", 4), ("u3", "p2", 5),
                          ("u3", "p3", 6)])
    test = interactions([
        ("u1", "p2", 10),  # u1 gets [p2, p3]: a hit at rank 1
        ("u2", "p3", 11),  # u2 has seen p1, p2 -> gets [p3]: a hit at rank 1
        ("u3", "p1", 12),  # already seen in train: nothing left to find, not counted
        ("stranger", "p2", 13),  # unknown to the model: not counted
    ])
    model = Popularity().fit(train)
    assert evaluate(model, train, test, k=2) == {"ndcg@2": 1.0, "recall@2": 1.0, "mrr@2": 1.0, "hit@2": 1.0,
                                                 "precision@2": 0.5}

    test_b = interactions([("u1", "p3", 10)])  # u1 gets [p2, p3]: a hit at rank 2
    scores = evaluate(model, train, test_b, k=10)
    assert set(scores) == {"ndcg@10", "recall@10", "mrr@10", "hit@10", "precision@10"}
    assert scores["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert scores["mrr@10"] == 0.5 and scores["precision@10"] == pytest.approx(0.1)


def test_evaluate_with_nobody_to_evaluate_is_zero():
    train = interactions([("u1", "p1", 1)])
    scores = evaluate(Popularity().fit(train), train, interactions([("stranger", "p1", 2)]), k=5)
    assert scores == {"ndcg@5": 0.0, "recall@5": 0.0, "mrr@5": 0.0, "hit@5": 0.0, "precision@5": 0.0}
