"""Offline ranking metrics and the time-based train/test split.

In the style of Microsoft Recommenders' ``python_evaluation``: small pure functions over
ranked lists. Every ``*_at_k`` takes one recommended list and one set of relevant items per
user and returns the mean over the users who have at least one relevant item (0.0 when no
user has one). Relevance is binary; an item recommended twice counts once (at its first rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from pipelines.models.base import Recommender
from pipelines.columns import COL_ITEM, COL_TS, COL_USER

Ranked = Sequence[Sequence[str]]
Relevant = Sequence[set[str]]


def _hit_ranks(rec: Sequence[str], rel: set[str], k: int) -> list[int]:
    """0-based ranks within the top k of the relevant items (first occurrence of each)."""
    ranks, found = [], set()
    for rank, item in enumerate(rec[:k]):
        if item in rel and item not in found:
            found.add(item)
            ranks.append(rank)
    return ranks


def _mean_over_users(recommended: Ranked, relevant: Relevant, k: int,
                     per_user: Callable[[list[int], set[str]], float]) -> float:
    if len(recommended) != len(relevant):
        raise ValueError(f"{len(recommended)} recommended lists for {len(relevant)} relevant sets")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    values = [per_user(_hit_ranks(rec, rel, k), rel) for rec, rel in zip(recommended, relevant) if rel]
    return float(np.mean(values)) if values else 0.0


def recall_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Share of each user's relevant items found in their top k.

    Returns:
        Mean over users with relevant items, in ``[0, 1]``.
    """
    return _mean_over_users(recommended, relevant, k, lambda hits, rel: len(hits) / len(rel))


def precision_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Share of the top k that is relevant (hits / k, also when a list is shorter than k).

    Returns:
        Mean over users with relevant items, in ``[0, 1]`` (at most ``|relevant| / k`` per user).
    """
    return _mean_over_users(recommended, relevant, k, lambda hits, rel: len(hits) / k)


def ndcg_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Normalised discounted cumulative gain with binary relevance.

    ``DCG = sum over hits of 1 / log2(rank + 2)`` (rank 0-based); the ideal DCG puts
    ``min(|relevant|, k)`` hits at the top.

    Returns:
        Mean over users with relevant items, in ``[0, 1]``; 1 for a perfect ranking.
    """
    def one(hits: list[int], rel: set[str]) -> float:
        dcg = sum(1.0 / math.log2(r + 2) for r in hits)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), k)))
        return dcg / idcg

    return _mean_over_users(recommended, relevant, k, one)


def mrr_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """Reciprocal rank (1-based) of the first relevant item in the top k, 0 when there is none.

    Returns:
        Mean over users with relevant items, in ``[0, 1]``.
    """
    return _mean_over_users(recommended, relevant, k, lambda hits, rel: 1.0 / (hits[0] + 1) if hits else 0.0)


def hit_at_k(recommended: Ranked, relevant: Relevant, k: int) -> float:
    """1 when at least one relevant item is in the top k, else 0 (hit rate).

    Returns:
        Mean over users with relevant items, in ``[0, 1]``.
    """
    return _mean_over_users(recommended, relevant, k, lambda hits, rel: 1.0 if hits else 0.0)


def time_split(interactions: pd.DataFrame, holdout_per_user: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Put each user's last ``holdout_per_user`` interactions (by ``ts``) in the test part.

    Users with fewer than 2 interactions stay entirely in train, and every user keeps at least
    one interaction in train (a user with ``n <= holdout_per_user`` gives ``n - 1`` to test).
    Ties in ``ts`` keep the input order.

    Returns:
        ``(train, test)`` with the input's columns and fresh indexes.

    Raises:
        ValueError: when ``holdout_per_user < 1``.
    """
    if holdout_per_user < 1:
        raise ValueError(f"holdout_per_user must be >= 1, got {holdout_per_user}")
    df = interactions.sort_values(COL_TS, kind="stable")
    grouped = df.groupby(COL_USER, sort=False)
    from_end = grouped.cumcount(ascending=False).to_numpy()  # 0 = the user's last interaction
    n = grouped[COL_TS].transform("size").to_numpy()
    is_test = from_end < np.minimum(holdout_per_user, n - 1)
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def evaluate(model: Recommender, train: pd.DataFrame, test: pd.DataFrame, k: int = 10) -> dict[str, float]:
    """Offline metrics of ``model`` on a held-out ``test`` part.

    Each test user the model knows gets ``k`` recommendations with ``exclude_seen=True``; their
    relevant items are their test items minus the items they already have in ``train`` (those a
    model that excludes seen items can never recommend). Users left with no relevant item are
    not counted.

    Returns:
        ``{"ndcg@k", "recall@k", "mrr@k", "hit@k", "precision@k"}`` with k the cut-off, each in
        ``[0, 1]`` (all 0.0 when no test user can be evaluated).
    """
    seen = train.groupby(COL_USER)[COL_ITEM].agg(lambda s: set(map(str, s))).to_dict() if len(train) else {}
    known = {str(u) for u in model.known_users}
    users, relevant = [], []
    for user, items in test.groupby(COL_USER, sort=True)[COL_ITEM]:
        if str(user) not in known:
            continue
        rel = set(map(str, items)) - seen.get(user, set())
        if rel:
            users.append(str(user))
            relevant.append(rel)
    recommended = model.recommend(users, k, exclude_seen=True) if users else []
    return {
        f"ndcg@{k}": ndcg_at_k(recommended, relevant, k),
        f"recall@{k}": recall_at_k(recommended, relevant, k),
        f"mrr@{k}": mrr_at_k(recommended, relevant, k),
        f"hit@{k}": hit_at_k(recommended, relevant, k),
        f"precision@{k}": precision_at_k(recommended, relevant, k),
    }


__all__ = ["evaluate", "hit_at_k", "mrr_at_k", "ndcg_at_k", "precision_at_k", "recall_at_k", "time_split"]
