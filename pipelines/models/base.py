"""The one interface every shoprec recommender fills.

Interactions are a pandas DataFrame with ``user_id``, ``item_id``, ``ts`` and an
optional ``weight``; items (optional) is the catalog with content columns.
Models depend only on torch, numpy and pandas.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

Scored = list[tuple[str, float]]


class Recommender(abc.ABC):
    """A trained recommender.

    Subclasses set ``name`` and implement ``fit``, ``recommend_scored``,
    ``recommend_session_scored``, ``similar_items``, ``_save`` and ``_load``.
    """

    name: str = "base"

    @abc.abstractmethod
    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> Recommender:
        """Train on interactions; returns self."""

    @abc.abstractmethod
    def recommend_scored(self, user_ids: Sequence[str], k: int, exclude_seen: bool = True) -> list[Scored]:
        """Top-k ``(item_id, score)`` per user, best first. Unknown users get ``[]``."""

    @abc.abstractmethod
    def recommend_session_scored(self, recent_item_ids: Sequence[str], k: int) -> Scored:
        """Top-k for a user the model has not seen, from their recent items (newest first).

        Items in the session are excluded; an empty or unknown session gives popular items.
        """

    @abc.abstractmethod
    def similar_items(self, item_id: str, k: int) -> list[str]:
        """The k items most similar to ``item_id`` (``[]`` for an unknown item)."""

    @property
    @abc.abstractmethod
    def known_users(self) -> set[str] | Sequence[str]:
        """Users seen in training."""

    @property
    @abc.abstractmethod
    def item_ids(self) -> Sequence[str]:
        """Items the model can rank."""

    # --- derived -----------------------------------------------------------------
    def recommend(self, user_ids: Sequence[str], k: int, exclude_seen: bool = True) -> list[list[str]]:
        """One ranked list of item ids per user."""
        return [[i for i, _ in row] for row in self.recommend_scored(user_ids, k, exclude_seen)]

    def recommend_session(self, recent_item_ids: Sequence[str], k: int) -> list[str]:
        return [i for i, _ in self.recommend_session_scored(recent_item_ids, k)]

    def recommend_batch(self, requests: Sequence[tuple[str, Sequence[str]]], k: int,
                        exclude_seen: bool = True) -> list[Scored]:
        """Top-k for a batch of requests, each ``(user_id, recent_item_ids newest first)``.

        Known users are ranked from their learned profile, unknown ones from their session
        (:meth:`recommend_session_scored`). This default loops; models override it with one
        batched computation (the serving layer's adaptive batching calls this).
        """
        known = self.known_users
        out: list[Scored] = []
        for user_id, recent in requests:
            if user_id in known:
                out.append(self.recommend_scored([user_id], k, exclude_seen)[0])
            else:
                out.append(self.recommend_session_scored(list(recent), k))
        return out

    def params(self) -> dict:
        """Hyperparameters (logged to MLflow)."""
        return {}

    # --- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the model to a folder (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "recommender.json").write_text(json.dumps({"name": self.name, "params": self.params()}))
        self._save(path)

    @abc.abstractmethod
    def _save(self, path: Path) -> None: ...

    @classmethod
    @abc.abstractmethod
    def _load(cls, path: Path, params: dict) -> Recommender: ...


class IndexedRecommender(Recommender, abc.ABC):
    """A recommender that keeps ``_user_index`` (user id -> row) and ``_item_ids`` (row -> item id)."""

    _user_index: dict[str, int]
    _item_ids: list[str]
    _item_index: dict[str, int]

    @property
    def known_users(self):
        """Users seen in training (a set-like view)."""
        return self._user_index.keys()

    @property
    def item_ids(self) -> list[str]:
        """Item ids in index order (the rows of the model's item tables)."""
        return self._item_ids

    @property
    def item_index(self) -> dict[str, int]:
        """Item id -> row (the inverse of :attr:`item_ids`; do not mutate)."""
        return self._item_index


def load_recommender(path: str | Path) -> Recommender:
    """Load any recommender written by :meth:`Recommender.save`."""
    from pipelines.models import REGISTRY

    path = Path(path)
    meta = json.loads((path / "recommender.json").read_text())
    if meta["name"] not in REGISTRY:
        _fill_registry()
    return REGISTRY[meta["name"]]._load(path, meta["params"])


def _fill_registry() -> None:
    """Import every model module so that each registers its name (a loading process may not have)."""
    import importlib
    import pkgutil

    import pipelines.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"pipelines.models.{mod.name}")
