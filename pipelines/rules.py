"""Business rules applied to a scored list after the model and before the cache.

In order: drop out-of-stock products and what the user bought; keep at most
``max_per_category`` products of one category in the top 10 (the rest move down; when the
model's list runs out of products that fit, popular ones that fit fill in); give
``explore_share`` of the slots to new products (younger than ``new_item_age_h``), which obey
the same rules. Which new product takes a slot is drawn per request (:func:`explore_order`),
favouring the ones the model's content path finds relevant, so that every new product collects
impressions. See :func:`apply_rules`.
The catalog is the Parquet file ``Settings.catalog_path``, re-read when it changes.
"""

from __future__ import annotations

import hashlib
import logging
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import lake
from pipelines.schemas import COL_CATEGORY, COL_ITEM

log = logging.getLogger(__name__)

Scored = list[tuple[str, float]]
#: positions the per-category cap applies to
DIVERSITY_TOP = 10
#: most new products kept as exploration candidates (newest first)
MAX_NEW_CANDIDATES = 500
#: temperature of the exploration draw (:func:`explore_order`), in standard deviations of the candidates'
#: relevance scores: a new product one standard deviation more relevant is e (2.7) times as likely to be
#: drawn first; lower favours the relevant ones more, higher spreads the slots more evenly
EXPLORE_TEMPERATURE = 1.0
#: seconds one user's exploration draw stays the same (while their session does not change): a reload
#: shows the same list, a visit later on explores other new products (:func:`explore_seed`)
EXPLORE_RESEED_S = 600


class Catalog:
    """What the rules need from the catalog: stock, category, and the new in-stock products.

    Reading is lazy and cheap to call per request: the file is re-read at most every ``reload_s``
    seconds and only when its modification time changed. A missing or broken file means "no
    catalog rules" (everything in stock, no categories, no new products), never an error; it is
    logged once (a missing file again each time it goes missing), so a server without its catalog says so.
    """

    def __init__(self, path: Path, *, reload_s: float = 60.0, new_item_age_h: float = 24.0):
        self.path = Path(path)
        self.reload_s = reload_s
        self.new_item_age_h = new_item_age_h
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime: float | None = None
        self._said_missing = False
        self.out_of_stock: frozenset[str] = frozenset()
        self.category: dict[str, str] = {}
        self.new_items: list[str] = []  # newest first, in stock
        self.new_frame: pd.DataFrame | None = None  # catalog rows of ``new_items`` (a model's content path reads them)
        self._created: dict[str, int] = {}
        self._frame: pd.DataFrame | None = None

    def maybe_reload(self, now: float | None = None, *, force: bool = False) -> None:
        """Re-read the file if it changed, at most every ``reload_s`` seconds (``force``: check now)."""
        now = time.monotonic() if now is None else now
        if now - self._checked < self.reload_s and self._checked and not force:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self.path.stat().st_mtime
            except OSError as err:
                if not self._said_missing:
                    self._said_missing = True
                    log.warning("no catalog at %s (%s): no stock, category cap or new-product rules until it exists "
                                "(the catalog feed, `shoprec catalog sync`, writes it; SHOPREC_VAR_DIR says where "
                                "var/ is)", self.path, err.strerror or err)
                return
            self._said_missing = False
            if mtime == self._mtime:
                self._recompute_new()
                return
            try:
                df = lake.read_parquet(self.path)
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

    def rows(self, ids: Iterable[str]) -> pd.DataFrame | None:
        """The catalog rows of those of ``ids`` it has (``None``: none of them, or no catalog)."""
        frame = self._frame
        if frame is None:
            return None
        found = [i for i in dict.fromkeys(ids) if i in frame.index]
        return frame.loc[found] if found else None

    def _recompute_new(self) -> None:
        cutoff = int(time.time() * 1000 - self.new_item_age_h * 3_600_000)
        new = [(c, i) for i, c in self._created.items() if c >= cutoff]
        new.sort(reverse=True)
        self.new_items = [i for _, i in new[:MAX_NEW_CANDIDATES]]
        self.new_frame = self._frame.loc[self.new_items] if self._frame is not None and self.new_items else None


def explore_seed(user_id: str, recent: Sequence[str] = (), now: float | None = None,
                 period_s: float | None = None) -> int:
    """The seed of one request's exploration draw: the user, their session and the period of ``now``.

    A hash every process computes alike (not Python's salted ``hash``): the cache warm-up and serving
    draw the same for the same user, session and period (``period_s`` seconds, default
    :data:`EXPLORE_RESEED_S`). Another user, a new click, or the next period: another draw.
    """
    now = time.time() if now is None else now
    period = EXPLORE_RESEED_S if period_s is None else period_s
    key = "\x1f".join([str(user_id), str(int(now // period)), *map(str, recent)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def explore_order(candidates: Sequence[str], scores: Sequence[float] | None, seed: int,
                  temperature: float = EXPLORE_TEMPERATURE) -> list[str]:
    """``candidates`` in the order one request's exploration slots take them: drawn, favouring the relevant.

    A Gumbel-top-k draw: the first is candidate ``i`` with probability ``softmax(z / temperature)_i``,
    ``z`` the candidates' ``scores`` standardised over them, the next one the same draw among the rest,
    and so on. Without scores, or with all scores equal (nothing to personalise for), every order is
    equally likely. The same ``seed`` (:func:`explore_seed`) gives the same order; ``temperature <= 0``
    gives the score order (no draw). Costs one random number per candidate.
    """
    n = len(candidates)
    if n <= 1:
        return list(candidates)
    z = None
    if scores is not None:
        s = np.asarray(scores, dtype="float64")
        std = s.std()
        if np.isfinite(std) and std > 1e-12 * max(1.0, float(np.abs(s).max())):
            z = (s - s.mean()) / std
    if temperature <= 0:
        keys = z if z is not None else np.zeros(n)
    else:
        keys = np.random.default_rng(seed).gumbel(size=n)
        if z is not None:
            keys += z / temperature
    return [candidates[i] for i in np.argsort(-keys, kind="stable")]


def apply_rules(scored: Scored, k: int, *, out_of_stock: frozenset[str] | set[str] = frozenset(),
                bought: set[str] | frozenset[str] = frozenset(), category: dict[str, str] | None = None,
                max_per_category: int = 3, new_items: Sequence[str] = (), explore_share: float = 0.0,
                rank_new: Callable[[Sequence[str]], Sequence[tuple[str, float]]] | None = None,
                explore_seed: int | None = None, explore_temperature: float | None = None,
                backfill: Sequence[tuple[str, float]] = ()) -> Scored:
    """Apply the business rules to a model's list.

    Every rule holds for every item shown, whatever its source (the model, an exploration slot or
    the backfill): no out-of-stock or bought product, and at most ``max_per_category`` products of
    one category among the first ``DIVERSITY_TOP`` positions. Over-cap model items move below those
    positions, in their order. When the model's list has too few items that fit the cap to fill the
    top positions (a user whose candidates are nearly all one category), the gaps are filled from
    ``backfill`` (the popular list) under the same rules, with a score just below the item before
    them; an over-cap item is never pulled back into the top positions. If even the backfill cannot
    fill them (a catalog with too few categories for the cap), the answer is shorter than ``k``:
    the cap is a hard rule, the length is not.

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
            ``1/explore_share``-th slot with a score just below the item before them. The slots take
            the candidates in the order of the draw (:func:`explore_order`; without ``explore_seed``, in
            ``rank_new``'s order, or newest first). In the top positions a candidate whose category is
            at the cap replaces that category's lowest-placed product from the model's list, which
            moves below the top positions with the other over-cap ones (the user sees as many products
            of the category, one of them new), unless that is the category's only one from the model
            there (the user's best pick in it stays); a candidate that can do neither is passed over,
            and when none can the slot goes to the model's next item.
        rank_new: scores the candidates for this user (e.g. the model's content path): ``(item_id,
            score)`` pairs, higher is more relevant; candidates it leaves out are not explored.
            Default: no preference.
        explore_seed: draws the order of the candidates (:func:`explore_seed`): the same seed, the
            same order. ``None``: no draw, the best-scored (or newest) first.
        explore_temperature: of the draw (default :data:`EXPLORE_TEMPERATURE`).
        backfill: ``(item_id, score)`` best first (popular items) that fill what the model's list
            cannot (see above); read only when needed.

    Returns:
        At most ``k`` ``(item_id, score)`` pairs: exactly ``k`` unless the rules leave too few items.
    """
    cat = (category or {}).get
    kept = [(i, s) for i, s in scored if i not in out_of_stock and i not in bought]
    n_explore = int(round(explore_share * k)) if new_items else 0
    explore: list[str] = []
    more: Iterator[str] = iter(())
    slots: set[int] = set()
    if n_explore > 0:
        shown = {i for i, _ in kept}
        if rank_new is None and explore_seed is None:  # by recency: the first few are enough, unless the cap rejects them
            more = (i for i in new_items if i not in shown and i not in bought and i not in out_of_stock)
            explore = list(itertools.islice(more, n_explore))
        else:
            explore = [i for i in new_items if i not in shown and i not in bought and i not in out_of_stock]
            scores: list[float] | None = None
            if explore and rank_new is not None:
                ranked = sorted(rank_new(explore), key=lambda x: -x[1])  # (stable: ties keep their order)
                explore, scores = [i for i, _ in ranked], [s for _, s in ranked]
            if explore and explore_seed is not None:
                explore = explore_order(explore, scores, explore_seed,
                                        EXPLORE_TEMPERATURE if explore_temperature is None else explore_temperature)
        # spread the slots (every 1/share-th position) so that any prefix of a cached list explores its share;
        # a slot no candidate fits (see take_new) goes to the model's next item
        if explore:
            slots = {min(k - 1, int((j + 1) / explore_share) - 1) for j in range(n_explore)}
    out: Scored = []
    per_cat: dict[str, int] = {}
    deferred: Scored = []
    model = iter(kept)
    used: set[str] | None = None  # items shown, once the backfill or a late candidate may repeat one
    fill: Iterator[tuple[str, float]] | None = None
    spare: Scored = []  # backfill items over the cap in the top positions (they may come after them)
    rank: dict[str, int] = {}  # model item -> its place in the model's list (filled on the first replacement)

    def replaceable(i: str) -> int | None:
        """Where in ``out`` the lowest-placed model item of ``i``'s category is (``None``: none, or only the
        category's best one, which stays)."""
        if not rank:
            rank.update((j, n) for n, (j, _) in enumerate(kept))
        c = cat(i, i)
        found = [v for v, (j, _) in enumerate(out) if j in rank and cat(j, j) == c]
        return found[-1] if len(found) >= 2 else None

    def take_new(capped: bool) -> tuple[str, int | None] | None:
        """The next unused exploration candidate, and (when ``capped`` and its category is at the cap) the
        position in ``out`` of the model item it replaces; candidates that can do neither are passed over."""
        for j, i in enumerate(explore):
            if used is not None and i in used:
                continue
            if not capped or per_cat.get(cat(i, i), 0) < max_per_category:
                del explore[j]
                return i, None
            v = replaceable(i)
            if v is not None:
                del explore[j]
                return i, v
        for i in more:  # candidates past the first few (recency order): only when the cap rejected those
            if used is None or i not in used:
                if not capped or per_cat.get(cat(i, i), 0) < max_per_category:
                    return i, None
                v = replaceable(i)
                if v is not None:
                    return i, v
                explore.append(i)
        return None

    def add_new(i: str) -> None:
        """Append exploration candidate ``i`` just below the item before it."""
        if used is not None:
            used.add(i)
        out.append((i, (out[-1][1] if out else 0.0) - 1e-6))

    def place_next() -> bool:
        """Append the model's next item that fits the cap, else the backfill's; ``False``: nothing fits."""
        nonlocal used, fill
        for i, s in model:
            c = cat(i, i)
            n = per_cat.get(c, 0)
            if n >= max_per_category:
                deferred.append((i, s))
                continue
            per_cat[c] = n + 1
            out.append((i, s))
            return True
        # the model's list has nothing left that fits the cap: the backfill, under the same rules
        if fill is None:
            used = {i for i, _ in out}
            used.update(i for i, _ in kept)
            fill = iter(backfill)
        for i, s in fill:
            if i in used or i in out_of_stock or i in bought:
                continue
            c = cat(i, i)
            n = per_cat.get(c, 0)
            if n >= max_per_category:
                spare.append((i, s))
                continue
            per_cat[c] = n + 1
            used.add(i)
            out.append((i, (out[-1][1] if out else 0.0) - 1e-6))
            return True
        return False

    top = min(k, DIVERSITY_TOP)
    while len(out) < top:
        if len(out) in slots:
            got = take_new(True)
            if got is not None:
                i, v = got
                if v is None:
                    c = cat(i, i)
                    per_cat[c] = per_cat.get(c, 0) + 1
                else:  # its category is full: the model's lowest-placed one of it moves below the top (same count)
                    moved = out.pop(v)
                    at = next((n for n, (j, _) in enumerate(deferred) if rank[j] > rank[moved[0]]), len(deferred))
                    deferred.insert(at, moved)  # (the over-cap items, in the model's order)
                    if not place_next():  # nothing else fits the cap: the new product ends the list
                        add_new(i)
                        return out
                add_new(i)
                continue
        if not place_next():
            return out  # nothing left fits the cap: a shorter list rather than a broken rule
    if len(out) >= k:
        return out
    # past the top positions: the deferred model items, then the rest of the model's list, in their order
    rest = itertools.chain(deferred, model)
    for pos in sorted(p for p in slots if p >= len(out)):
        out.extend(itertools.islice(rest, pos - len(out)))
        if len(out) < pos:
            break  # the model's list ran out: the backfill below
        got = take_new(False)
        if got is not None:  # (else the next model item takes the slot)
            add_new(got[0])
    out.extend(itertools.islice(rest, k - len(out)))
    if spare:
        fill = itertools.chain(spare, fill)
    while len(out) < k:  # the model's list ran out: the backfill, with the exploration slots still spread
        if len(out) in slots:
            got = take_new(False)
            if got is not None:
                add_new(got[0])
                continue
        if fill is None:
            used = {i for i, _ in out}
            used.update(i for i, _ in kept)
            fill = iter(backfill)
        for i, _ in fill:
            if i not in used and i not in out_of_stock and i not in bought:
                used.add(i)
                out.append((i, out[-1][1] - 1e-6))
                break
        else:
            break
    return out
