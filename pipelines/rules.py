"""Business rules applied to a scored list after the model and before the cache.

In order: drop out-of-stock products and what the user bought; keep at most
``max_per_category`` products of one category in the top 10 (the rest move down);
give ``explore_share`` of the slots to new products (younger than ``new_item_age_h``).
The catalog is the Parquet file ``Settings.catalog_path``, re-read when it changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from pipelines.schemas import COL_CATEGORY, COL_ITEM

log = logging.getLogger(__name__)

Scored = list[tuple[str, float]]
#: positions the per-category cap applies to
DIVERSITY_TOP = 10
#: most new products kept as exploration candidates (newest first)
MAX_NEW_CANDIDATES = 500


class Catalog:
    """What the rules need from the catalog: stock, category, and the new in-stock products.

    Reading is lazy and cheap to call per request: the file is re-read at most every ``reload_s``
    seconds and only when its modification time changed. A missing or broken file means "no
    catalog rules" (everything in stock, no categories, no new products), never an error.
    """

    def __init__(self, path: Path, *, reload_s: float = 60.0, new_item_age_h: float = 24.0):
        self.path = Path(path)
        self.reload_s = reload_s
        self.new_item_age_h = new_item_age_h
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: float | None = None
        self.out_of_stock: frozenset[str] = frozenset()
        self.category: dict[str, str] = {}
        self.new_items: list[str] = []  # newest first, in stock
        self.new_frame: pd.DataFrame | None = None  # catalog rows of ``new_items`` (a model's content path reads them)
        self._created: dict[str, int] = {}
        self._frame: pd.DataFrame | None = None

    def maybe_reload(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._checked < self.reload_s and self._checked:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                return
            if mtime == self._mtime:
                self._recompute_new()
                return
            try:
                df = pd.read_parquet(self.path)
            except Exception as err:  # a half-written or foreign file: keep the previous catalog
                log.warning("could not read the catalog %s (%s); keeping the previous one", self.path, err)
                return
            ids = df[COL_ITEM].astype(str)
            self.out_of_stock = frozenset(ids[~df["in_stock"].astype(bool)])
            self.category = dict(zip(ids, df[COL_CATEGORY].astype(str)))
            created = df["created_at"]
            if pd.api.types.is_datetime64_any_dtype(created):
                created = created.astype("int64") // 1_000_000
            self._created = {i: int(c) for i, c, s in zip(ids, created, df["in_stock"].astype(bool)) if s}
            self._mtime = mtime
            self._frame = df.set_index(ids.to_numpy(), drop=False)
            self._recompute_new()
            log.info("catalog reloaded: %d items, %d out of stock, %d new", len(ids), len(self.out_of_stock),
                     len(self.new_items))

    def _recompute_new(self) -> None:
        cutoff = int(time.time() * 1000 - self.new_item_age_h * 3_600_000)
        new = [(c, i) for i, c in self._created.items() if c >= cutoff]
        new.sort(reverse=True)
        self.new_items = [i for _, i in new[:MAX_NEW_CANDIDATES]]
        self.new_frame = self._frame.loc[self.new_items] if self._frame is not None and self.new_items else None


def apply_rules(scored: Scored, k: int, *, out_of_stock: frozenset[str] | set[str] = frozenset(),
                bought: set[str] | frozenset[str] = frozenset(), category: dict[str, str] | None = None,
                max_per_category: int = 3, new_items: Sequence[str] = (), explore_share: float = 0.0,
                rank_new: Callable[[Sequence[str]], Sequence[str]] | None = None) -> Scored:
    """Apply the business rules to a model's list.

    Args:
        scored: ``(item_id, score)`` best first, ideally longer than ``k`` so that filtered items
            can be replaced.
        k: length of the answer (>= 1).
        out_of_stock: products never shown.
        bought: products the user bought (never shown).
        category: item -> category; items without one count as their own category.
        max_per_category: most products of one category among the first ``DIVERSITY_TOP`` positions.
        new_items: new in-stock products, newest first (the exploration candidates).
        explore_share: share in [0, 1] of the ``k`` slots given to new products; they take every
            ``1/explore_share``-th slot with a score just below the item before them.
        rank_new: orders the candidates for this user (e.g. the model's content path); default recency.

    Returns:
        At most ``k`` ``(item_id, score)`` pairs.
    """
    category = category or {}
    kept = [(i, s) for i, s in scored if i not in out_of_stock and i not in bought]
    # per-category cap in the top positions: over-cap items move below them, in their order
    top: Scored = []
    deferred: Scored = []
    per_cat: dict[str, int] = {}
    for i, s in kept:
        if len(top) < DIVERSITY_TOP:
            c = category.get(i, i)
            if per_cat.get(c, 0) >= max_per_category:
                deferred.append((i, s))
                continue
            per_cat[c] = per_cat.get(c, 0) + 1
        top.append((i, s))
    ranked = top[:DIVERSITY_TOP] + deferred + top[DIVERSITY_TOP:]
    n_explore = int(round(explore_share * k))
    if n_explore <= 0 or not new_items:
        return ranked[:k]
    shown = {i for i, _ in ranked}
    candidates = [i for i in new_items if i not in shown and i not in bought and i not in out_of_stock]
    if rank_new is not None and candidates:
        candidates = list(rank_new(candidates))
    explore = candidates[:n_explore]
    # spread the slots (every 1/share-th position) so that any prefix of a cached list explores its share
    slots = {min(k - 1, int((j + 1) / explore_share) - 1) for j in range(len(explore))}
    out: Scored = []
    model_items = iter(ranked)
    new = iter(explore)
    for pos in range(k):
        if pos in slots:
            i = next(new)
            out.append((i, (out[-1][1] if out else 0.0) - 1e-6))
        else:
            nxt = next(model_items, None)
            if nxt is None:
                break
            out.append(nxt)
    return out
