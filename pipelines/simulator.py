"""The shop simulator: a catalog, users with hidden tastes, and their sessions.

The behaviour is deterministic for a seed (one ``numpy.random.Generator`` per
simulator, no global random state): the same seed gives the same users, products,
sessions, items and timestamps. Event and session ids are not part of it: they come
from a second generator seeded from the OS (``id_seed``) for each simulator, so a
backfill, a live run and every restart of either produce ids no other run produces
(the lake and the stream consumer drop a repeated ``event_id`` as a duplicate).

* :func:`make_catalog` builds ~5,000 products in 20 categories and 100 brands.
  Every item has a hidden Zipf-like base popularity (a stable hash of seed and
  item id, so it does not depend on the catalog's size or order).
* Users have a hidden taste: a Dirichlet preference concentrated on 1-3
  categories (about three quarters of their views fall there), a favourite
  brand in each, and an activity level. A user's taste is a function of
  ``(seed, user number)``, so ``u002001`` is the same person in a backfill and in
  a later live run with the same seed.
* :class:`ShopSimulator` interleaves many concurrent sessions in time order:
  views (taste x popularity), add-to-cart (about 10% of views), purchases
  (about 40% of cart items), with second-scale gaps. New users (a share of
  sessions) and new products (a rate per simulated hour, ``created_at`` = the
  moment they appear, promoted so they get views) arrive over time.
* Closed loop: a share of sessions asks a ``recommend_fn`` first; the user sees
  the list (an ``impression``, unless the recommender logs it itself, as the
  BentoML service does), clicks an item with a probability that grows
  with the hidden taste match and falls with the position (1/log2(pos+2)),
  and the click, add-to-cart and purchase that follow carry the ``request_id``,
  ``variant`` and ``model_version`` of the list.

Entry points: :meth:`ShopSimulator.events` (an iterator), :meth:`~ShopSimulator.backfill`
(history straight into the Parquet lake), :meth:`~ShopSimulator.run_live`
(paced in real time, e.g. to Kafka), :meth:`~ShopSimulator.step_with_recommender`
(one closed-loop session) and :func:`http_recommend_fn` (the BentoML service as
a ``recommend_fn``).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import lake
from pipelines.schemas import CATALOG_COLUMNS, CatalogItem, new_event

log = logging.getLogger("shoprec.simulator")

#: what a recommend_fn returns: (request_id, item ids best first, variant, model_version), or None
Recommendation = tuple[str, list[str], str, str | None]
RecommendFn = Callable[[str], Recommendation | None]

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

# (category, median price, nouns used in titles)
CATEGORIES: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("electronics", 180.0, ("smart speaker", "charger", "power bank", "smartwatch", "e-reader")),
    ("phones", 420.0, ("smartphone", "phone case", "screen protector", "phone mount")),
    ("computers", 750.0, ("laptop", "monitor", "keyboard", "mouse", "tablet")),
    ("audio", 110.0, ("headphones", "earbuds", "soundbar", "turntable", "speaker")),
    ("cameras", 480.0, ("camera", "lens", "tripod", "action cam", "drone")),
    ("home", 55.0, ("lamp", "rug", "curtain", "cushion", "mirror")),
    ("kitchen", 45.0, ("blender", "knife set", "frying pan", "coffee maker", "kettle")),
    ("furniture", 320.0, ("sofa", "desk", "office chair", "bookshelf", "bed frame")),
    ("garden", 40.0, ("hose", "planter", "lawn mower", "garden chair", "pruner")),
    ("tools", 60.0, ("drill", "screwdriver set", "toolbox", "saw", "wrench")),
    ("toys", 28.0, ("building set", "puzzle", "doll", "board game", "rc car")),
    ("books", 16.0, ("novel", "cookbook", "comic", "biography", "travel guide")),
    ("fashion", 42.0, ("t-shirt", "jacket", "jeans", "dress", "hoodie")),
    ("shoes", 85.0, ("running shoe", "sneaker", "boot", "sandal", "loafer")),
    ("beauty", 22.0, ("face cream", "shampoo", "perfume", "lipstick", "serum")),
    ("sports", 50.0, ("yoga mat", "dumbbell", "football", "tennis racket", "bike helmet")),
    ("outdoor", 95.0, ("tent", "backpack", "sleeping bag", "headlamp", "water bottle")),
    ("grocery", 9.0, ("coffee beans", "olive oil", "tea", "chocolate", "pasta")),
    ("pets", 26.0, ("dog bed", "cat toy", "leash", "pet food", "aquarium")),
    ("jewelry", 140.0, ("necklace", "ring", "bracelet", "earrings", "watch")),
)
_BRAND_HEADS = ("Acme", "Nor", "Vel", "Zen", "Ark", "Lum", "Cor", "Tri", "Sol", "Kai")
_BRAND_TAILS = ("", "tek", "ora", "wood", "line", "io", "mont", "craft", "ly", "ex")
#: 100 brand names ("Acme", "Acmetek", ..., "Kaiex")
BRANDS: tuple[str, ...] = tuple(h + t for h in _BRAND_HEADS for t in _BRAND_TAILS)
ADJECTIVES = ("classic", "pro", "ultra", "compact", "premium", "eco", "smart", "vintage", "lite", "sport",
              "deluxe", "essential", "urban", "wireless", "organic", "travel")
COLORS = ("black", "white", "blue", "red", "green", "grey", "silver", "navy", "beige", "pink", "gold", "brown")

# --- behaviour knobs (module constants: documented, not configuration) ---------
TASTE_STRENGTH = 0.75      # share of a user's category preference on their 1-3 favourite categories
SESSION_STICKINESS = 0.6   # chance a view stays in the session's category
BRAND_LOYALTY = 0.3        # chance a view is drawn from the user's favourite brand of that category
REVIEW_PROB = 0.12         # chance a view goes back to an item seen earlier in the session
MEAN_EVENT_GAP_S = 28.0   # mean time between two events of a session (measured; used for the warm start)
EVENTS_PER_SESSION = 5.6  # mean events of a browsing session (measured; sets the session start rate)
EXTRA_EVENTS_CLOSED_LOOP = 1.3  # impression + click and what follows (measured with a fixed list)
MEAN_EXTRA_VIEWS = 4.0     # views per session = 1 + geometric(mean 4)
MAX_VIEWS = 60
VIEW_TO_CART = 0.10        # mean add-to-cart rate per view (scaled by taste match)
CART_TO_PURCHASE = 0.40    # chance each cart item is bought at the end of the session
CLICK_BASE = 0.22          # click chance of a perfectly matching item at position 0
POPULARITY_FLOOR = 2e-4    # Zipf: popularity = 1/max(u, floor), u ~ U(0,1) -> share of top 10% ~ 70%
CLOSED_LOOP_SHARE = 0.3    # share of live sessions that ask the recommender first


_VARIANT = {f"{i:x}": f"{8 + (i & 3):x}" for i in range(16)}  # RFC 4122 variant nibble


def now_ms() -> int:
    return int(time.time() * 1000)


def _unit_hash(*parts: object) -> float:
    """A stable uniform number in (0, 1) from the parts (independent of numpy and of Python's hash seed)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") + 0.5) / 2.0**64


def _uniforms(n: int, *parts: object) -> list[float]:
    """``n`` stable uniform numbers in (0, 1) from the parts."""
    out: list[float] = []
    block = 0
    while len(out) < n:
        h = hashlib.blake2b(":".join(map(str, (*parts, block))).encode(), digest_size=64).digest()
        out += [(int.from_bytes(h[i:i + 8], "big") + 0.5) / 2.0**64 for i in range(0, 64, 8)]
        block += 1
    return out[:n]


def _item_number(item_id: str) -> int:
    digits = "".join(ch for ch in str(item_id) if ch.isdigit())
    return int(digits) if digits else 0


# --- catalog -------------------------------------------------------------------


def _brand_categories(seed: int) -> list[list[int]]:
    """Categories each brand sells in: brand b always in category b % 20, plus 0-2 more."""
    g = np.random.default_rng([seed, 7])
    n_cat = len(CATEGORIES)
    out = []
    for b in range(len(BRANDS)):
        cats = [b % n_cat]
        for c in g.choice(n_cat, size=int(g.integers(0, 3)), replace=False):
            if int(c) not in cats:
                cats.append(int(c))
        out.append(cats)
    return out


def _category_brands(seed: int) -> list[list[int]]:
    by_cat: list[list[int]] = [[] for _ in CATEGORIES]
    for b, cats in enumerate(_brand_categories(seed)):
        for c in cats:
            by_cat[c].append(b)
    return by_cat


def _item_attributes(g: np.random.Generator, cat: int, cat_brands: list[list[int]]) -> tuple[str, str, str, float]:
    """(title, category, brand, price) of one item of category ``cat``."""
    name, median, nouns = CATEGORIES[cat]
    brands = cat_brands[cat]
    w = 1.0 / np.arange(1, len(brands) + 1)  # a few big brands per category
    brand = BRANDS[brands[int(g.choice(len(brands), p=w / w.sum()))]]
    title = f"{brand} {ADJECTIVES[int(g.integers(len(ADJECTIVES)))]} {nouns[int(g.integers(len(nouns)))]} " \
            f"{COLORS[int(g.integers(len(COLORS)))]}"
    price = max(0.99, round(float(median * math.exp(0.55 * g.standard_normal())), 2))
    return title, name, brand, price


def make_catalog(n_items: int = 5000, seed: int = 0, start_ms: int | None = None) -> pd.DataFrame:
    """A product catalog of ``n_items`` items (ids ``i00001``...).

    Args:
        n_items: number of products.
        seed: the catalog is a pure function of the seed and these arguments.
        start_ms: the catalog as of this moment (UTC epoch ms): every ``created_at`` lies in the two
            years before it. Default: 60 days ago, so a backfill of up to 60 days sees every item.

    Returns:
        Columns ``item_id, title, category, brand, price, created_at, in_stock`` (rows valid as
        :class:`~pipelines.schemas.CatalogItem`).
    """
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    start_ms = now_ms() - 60 * DAY_MS if start_ms is None else int(start_ms)
    g = np.random.default_rng([seed, 11])
    n_cat = len(CATEGORIES)
    cats = g.choice(n_cat, size=n_items, p=g.dirichlet(np.full(n_cat, 6.0)))
    cat_brands = _category_brands(seed)
    brands = np.empty(n_items, dtype=object)
    for c in range(n_cat):
        rows = np.flatnonzero(cats == c)
        w = 1.0 / np.arange(1, len(cat_brands[c]) + 1)  # a few big brands per category
        brands[rows] = [BRANDS[cat_brands[c][j]] for j in g.choice(len(w), size=len(rows), p=w / w.sum())]
    adj = g.integers(len(ADJECTIVES), size=n_items)
    noun = g.integers(1 << 30, size=n_items)
    color = g.integers(len(COLORS), size=n_items)
    medians = np.array([c[1] for c in CATEGORIES])[cats]
    prices = np.maximum(0.99, np.round(medians * np.exp(0.55 * g.standard_normal(n_items)), 2))
    titles = [f"{b} {ADJECTIVES[a]} {CATEGORIES[c][2][n % len(CATEGORIES[c][2])]} {COLORS[k]}"
              for b, a, c, n, k in zip(brands, adj, cats, noun, color)]
    return pd.DataFrame({
        "item_id": [f"i{i + 1:05d}" for i in range(n_items)],
        "title": titles,
        "category": [CATEGORIES[c][0] for c in cats],
        "brand": brands.astype(str),
        "price": prices.astype("float64"),
        "created_at": (start_ms - g.integers(0, 730 * DAY_MS, size=n_items)).astype("int64"),
        "in_stock": g.random(n_items) > 0.03,
    })


def save_catalog(catalog: pd.DataFrame, path: Path) -> None:
    """Write the catalog to Parquet durably and atomically (:func:`pipelines.lake.write_catalog`), replacing it."""
    with lake.catalog_lock(path):
        lake.write_catalog(catalog, path)


def add_to_catalog(items: pd.DataFrame, path: Path) -> int:
    """Add the products of ``items`` that the catalog file lacks (the file is made when missing); what it
    already holds, including changes the catalog feed applied, is kept. Returns how many were added."""
    with lake.catalog_lock(path):
        current = lake.read_catalog(path)
        if current is not None:
            items = items[~items["item_id"].astype(str).isin(set(current["item_id"].astype(str)))]
            items = pd.concat([current, items], ignore_index=True) if len(items) else None
        if items is not None:
            lake.write_catalog(items, path)
        return 0 if items is None else len(items) - (0 if current is None else len(current))


def load_or_make_catalog(path: Path, seed: int = 0, n_items: int = 5000) -> pd.DataFrame:
    """The catalog at ``path``; made with :func:`make_catalog` and saved there when missing."""
    catalog = lake.read_catalog(path)
    if catalog is not None:
        return catalog
    if add_to_catalog(make_catalog(n_items, seed=seed), path):
        log.info("made a catalog of %d items at %s", n_items, path)
    return lake.read_catalog(path)


# --- simulator -----------------------------------------------------------------
class _User:
    __slots__ = ("idx", "uid", "pref", "pref_cum", "pmax", "fav_brand", "fav_brands", "top_cats")

    def __init__(self, idx, uid, pref, fav_brand, top_cats):
        self.idx = idx
        self.uid = uid
        self.pref = pref
        self.pref_cum = list(accumulate(pref))
        self.pmax = max(pref)
        self.fav_brand = fav_brand  # category index -> brand name
        self.fav_brands = set(fav_brand.values())
        self.top_cats = top_cats


class _Session:
    __slots__ = ("user", "sid", "views_left", "cat", "viewed", "cart", "action", "item", "attr", "to_buy",
                 "n_events", "stream")

    def __init__(self, user, sid, views_left, cat, stream):
        self.user = user
        self.sid = sid
        self.views_left = views_left
        self.cat = cat
        self.viewed: list[int] = []
        self.cart: list[tuple[int, int, tuple | None]] = []
        self.action = "view"
        self.item = -1
        self.attr: tuple | None = None  # (request_id, variant, model_version) of the list that led here
        self.to_buy: list[tuple[int, int, tuple | None]] = []
        self.n_events = 0
        self.stream = stream


class _Stream:
    """Concurrent sessions merged in time order; each ``pop`` emits exactly one event."""

    def __init__(self, sim: ShopSimulator, start_ms: int, rate_eps: float, recommend_fn: RecommendFn | None = None,
                 loop_share: float = CLOSED_LOOP_SHARE):
        if rate_eps <= 0:
            raise ValueError("rate_eps must be > 0")
        self.sim = sim
        self.rate_eps = rate_eps
        self.recommend_fn = recommend_fn
        self.loop_share = loop_share if recommend_fn is not None else 0.0
        self.heap: list[tuple[int, int, _Session]] = []
        self.seq = 0
        self.counts: Counter = Counter()
        self.next_start = float(start_ms)
        sim._schedule_items(start_ms)
        # warm start: the sessions already under way at start_ms (Little's law), so the rate holds at once
        n_running = int(rate_eps * MEAN_EVENT_GAP_S * (1.0 - 1.0 / self._per_session()) + 0.5)
        for _ in range(n_running):
            self._push_session(start_ms + int(-math.log(1.0 - sim._r()) * MEAN_EVENT_GAP_S * 1000))

    def _per_session(self) -> float:
        """Mean events per session (measured constants; an online estimate is biased by early short sessions)."""
        return EVENTS_PER_SESSION + self.loop_share * EXTRA_EVENTS_CLOSED_LOOP

    def _start_gap_ms(self) -> float:
        return -math.log(1.0 - self.sim._r()) * self._per_session() / self.rate_eps * 1000.0

    def _push_session(self, ts: int) -> None:
        closed = self.loop_share > 0 and self.sim._r() < self.loop_share
        sess = self.sim._new_session(self, closed)
        self.seq += 1
        heapq.heappush(self.heap, (ts, self.seq, sess))

    def peek_ts(self) -> int:
        heap = self.heap
        while not heap or self.next_start <= heap[0][0]:
            self._push_session(int(self.next_start))
            self.next_start += self._start_gap_ms()
        return heap[0][0]

    def pop(self) -> dict:
        while True:
            ts = self.peek_ts()
            _, _, sess = heapq.heappop(self.heap)
            self.sim._arrivals_until(ts)
            ev, next_ts = self.sim._step(sess, ts)
            if next_ts is None:
                self.sim._session_done(sess)
            else:
                self.seq += 1
                heapq.heappush(self.heap, (next_ts, self.seq, sess))
            if ev is not None:  # None: an impression the recommendation service logged itself
                self.counts[ev["event_type"]] += 1
                return ev


class ShopSimulator:
    """Users with hidden tastes browsing a catalog that grows over time.

    Args:
        catalog: as made by :func:`make_catalog` (or loaded from Parquet; extra columns are ignored).
        n_users: users that exist at the start (``u000001``...).
        seed: the behaviour (users, sessions, items, timestamps, new products) is a function of the seed and
            the calls made.
        id_seed: seeds the event and session ids only. None (the default) draws it from the OS, so every
            simulator makes ids no other makes, whatever its ``seed``; give one only to repeat a run's ids
            exactly (a test), never for data that goes to the lake or the stream.
        new_item_rate: new products per simulated hour (0 = none). They are appended to
            :attr:`catalog` with ``created_at`` = the moment they appear and start getting views.
        new_user_rate: share of sessions that come from a brand-new user.
    """

    def __init__(self, catalog: pd.DataFrame, n_users: int = 2000, seed: int = 0, new_item_rate: float = 2.0,
                 new_user_rate: float = 0.05, id_seed: int | None = None):
        missing = set(CATALOG_COLUMNS) - set(catalog.columns)
        if missing:
            raise ValueError(f"catalog lacks columns {sorted(missing)}")
        if len(catalog) == 0:
            raise ValueError("catalog is empty")
        if n_users < 1:
            raise ValueError("n_users must be >= 1")
        self.seed = seed
        self.new_item_rate = float(new_item_rate)
        self.new_user_rate = float(new_user_rate)
        self.rng = np.random.default_rng([seed, 1])
        #: ids only (never the behaviour): from the OS unless ``id_seed`` is given, so runs never share ids
        self._id_rng = np.random.default_rng(id_seed)
        self._u_buf: list[float] = []
        self._u_i = 0
        self._n_buf: list[float] = []
        self._n_i = 0
        self._b_buf = b""
        self._b_i = 0

        # categories: the fixed list first, then any other found in the catalog
        names = [c[0] for c in CATEGORIES]
        for c in catalog["category"].astype(str).unique():
            if c not in names:
                names.append(c)
        self.categories = names
        self._cat_index = {c: i for i, c in enumerate(names)}
        n_cat = len(names)

        # items, column-wise
        cat = catalog[list(CATALOG_COLUMNS)].reset_index(drop=True)
        self._ids: list[str] = cat["item_id"].astype(str).tolist()
        self._titles: list[str] = cat["title"].astype(str).tolist()
        self._brands: list[str] = cat["brand"].astype(str).tolist()
        self._cats: list[int] = [self._cat_index[c] for c in cat["category"].astype(str)]
        self._prices: list[float] = cat["price"].astype(float).tolist()
        self._created: list[int] = cat["created_at"].astype("int64").tolist()
        self._stock: list[bool] = cat["in_stock"].astype(bool).tolist()
        self._index = {iid: i for i, iid in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            raise ValueError("catalog item_id values are not unique")
        self._next_item_no = max(_item_number(i) for i in self._ids) + 1
        self._pop: list[float] = [1.0 / max(_unit_hash(seed, "pop", iid), POPULARITY_FLOOR) for iid in self._ids]
        self._cat_items: list[list[int]] = [[] for _ in range(n_cat)]
        self._cat_cum: list[list[float]] = [[] for _ in range(n_cat)]
        self._cb_items: dict[tuple[int, str], list[int]] = {}
        self._cb_cum: dict[tuple[int, str], list[float]] = {}
        for i in range(len(self._ids)):
            self._index_item(i)
        counts = np.array([len(x) for x in self._cat_items], dtype=float)
        self._cat_share = counts / counts.sum()
        self._cat_brand_names: list[list[str]] = [
            sorted({self._brands[i] for i in items}) for items in self._cat_items]
        self._catalog_brands = _category_brands(seed)
        self.new_items: list[dict] = []  # items added by the simulator, in order of arrival

        # users
        self._users: list[_User] = []
        self._activity_cum: list[float] = []
        for _ in range(n_users):
            self._add_user()
        self.n_initial_users = n_users

        self._next_item_ts = math.inf
        self._done_events = 0
        self._done_sessions = 0
        self._pos_bias = [1.0 / math.log2(p + 2) for p in range(200)]

    # --- random numbers (buffered draws from the one generator) -----------------
    def _r(self) -> float:
        i = self._u_i
        if i >= len(self._u_buf):
            self._u_buf = self.rng.random(16_384).tolist()
            i = 0
        self._u_i = i + 1
        return self._u_buf[i]

    def _z(self) -> float:
        i = self._n_i
        if i >= len(self._n_buf):
            self._n_buf = self.rng.standard_normal(8192).tolist()
            i = 0
        self._n_i = i + 1
        return self._n_buf[i]

    def _bytes(self, n: int) -> bytes:
        """Random bytes for ids, from the id generator (drawing them leaves the behaviour's generator alone)."""
        i = self._b_i
        if i + n > len(self._b_buf):
            self._b_buf = self._id_rng.bytes(65_536)
            i = 0
        self._b_i = i + n
        return self._b_buf[i:i + n]

    def _event_id(self) -> str:
        """A version-4 UUID string made of id-generator bytes (same as ``str(uuid.UUID(bytes=b, version=4))``)."""
        h = self._bytes(16).hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"

    def _gap_ms(self, median_ms: float, sigma: float, lo: int, hi: int) -> int:
        return min(hi, max(lo, int(median_ms * math.exp(sigma * self._z()))))

    # --- catalog -------------------------------------------------------------------
    def _index_item(self, i: int) -> None:
        c = self._cats[i]
        p = self._pop[i]
        cum = self._cat_cum[c]
        cum.append((cum[-1] if cum else 0.0) + p)
        self._cat_items[c].append(i)
        key = (c, self._brands[i])
        cum = self._cb_cum.setdefault(key, [])
        cum.append((cum[-1] if cum else 0.0) + p)
        self._cb_items.setdefault(key, []).append(i)

    def _add_item(self, created_at: int) -> dict:
        """A new product (a function of seed and item number), promoted into the top ~10% of popularity."""
        no = self._next_item_no
        self._next_item_no += 1
        iid = f"i{no:05d}"
        g = np.random.default_rng([self.seed, 3, no])
        c = int(g.choice(len(CATEGORIES), p=self._cat_share[:len(CATEGORIES)] / self._cat_share[:len(CATEGORIES)].sum()))
        title, cat_name, brand, price = _item_attributes(g, c, self._catalog_brands)
        u = 0.003 + 0.08 * _unit_hash(self.seed, "pop", iid)
        i = len(self._ids)
        self._ids.append(iid)
        self._titles.append(title)
        self._brands.append(brand)
        self._cats.append(self._cat_index[cat_name])
        self._prices.append(price)
        self._created.append(int(created_at))
        self._stock.append(True)
        self._pop.append(1.0 / u)
        self._index[iid] = i
        self._index_item(i)
        item = {"item_id": iid, "title": title, "category": cat_name, "brand": brand, "price": price,
                "created_at": int(created_at), "in_stock": True}
        self.new_items.append(item)
        return item

    def _schedule_items(self, from_ms: int) -> None:
        self._next_item_ts = (from_ms + -math.log(1.0 - self._r()) * HOUR_MS / self.new_item_rate
                              if self.new_item_rate > 0 else math.inf)

    def _arrivals_until(self, ts: int) -> None:
        while self._next_item_ts <= ts:
            self._add_item(int(self._next_item_ts))
            self._schedule_items(int(self._next_item_ts))

    @property
    def catalog(self) -> pd.DataFrame:
        """The current catalog, new items included."""
        return pd.DataFrame({
            "item_id": self._ids, "title": self._titles, "category": [self.categories[c] for c in self._cats],
            "brand": self._brands, "price": self._prices,
            "created_at": pd.Series(self._created, dtype="int64"), "in_stock": pd.Series(self._stock, dtype=bool),
        })

    def save_catalog(self, path: Path) -> None:
        """Write the current catalog (new items included) to Parquet, e.g. ``settings.catalog_path``."""
        save_catalog(self.catalog, path)

    # --- users ---------------------------------------------------------------------
    def _add_user(self) -> _User:
        """A user whose hidden taste is a function of (seed, user number)."""
        idx = len(self._users)
        u = _uniforms(16, self.seed, "user", idx)
        k = 1 if u[0] < 0.35 else (2 if u[0] < 0.8 else 3)
        share = self._cat_share.tolist()
        top: list[int] = []
        for j in range(k):  # k categories weighted by their size, without replacement
            cum = list(accumulate(0.0 if c in top else x for c, x in enumerate(share)))
            top.append(min(bisect_right(cum, u[1 + j] * cum[-1]), len(share) - 1))
        w = [-math.log(u[4 + j]) for j in range(k)]  # Dirichlet(1, ..., 1) over the favourites
        pref = [(1.0 - TASTE_STRENGTH) * x for x in share]
        for c, x in zip(top, w):
            pref[c] += TASTE_STRENGTH * x / sum(w)
        fav = {}
        for j, c in enumerate(top):
            brands = self._cat_brand_names[c]
            if brands:
                fav[c] = brands[int(u[7 + j] * len(brands))]
        user = _User(idx, f"u{idx + 1:06d}", pref, fav, top)
        z = math.sqrt(-2.0 * math.log(u[10])) * math.cos(2.0 * math.pi * u[11])
        activity = math.exp(z)  # lognormal(0, 1): a few heavy shoppers
        self._users.append(user)
        self._activity_cum.append((self._activity_cum[-1] if self._activity_cum else 0.0) + activity)
        return user

    @property
    def n_users(self) -> int:
        return len(self._users)

    def user_taste(self, user_id: str) -> dict:
        """The hidden taste of a user (for evaluation and tests; the platform never sees it)."""
        u = self._users[int(user_id[1:]) - 1]
        return {"categories": [self.categories[c] for c in u.top_cats],
                "preference": dict(zip(self.categories, u.pref)),
                "brands": {self.categories[c]: b for c, b in u.fav_brand.items()}}

    def _pick_user(self) -> _User:
        if self._r() < self.new_user_rate:
            return self._add_user()
        cum = self._activity_cum
        j = bisect_right(cum, self._r() * cum[-1])
        return self._users[min(j, len(cum) - 1)]

    # --- behaviour -------------------------------------------------------------------
    def _affinity(self, user: _User, i: int) -> float:
        a = user.pref[self._cats[i]] / user.pmax
        if self._brands[i] in user.fav_brands:
            a += 0.25
        return a if a < 1.0 else 1.0

    def _sample_cat(self, user: _User) -> int:
        cum = user.pref_cum
        return min(bisect_right(cum, self._r() * cum[-1]), len(cum) - 1)

    def _sample_item(self, sess: _Session) -> int:
        user = sess.user
        if sess.viewed and self._r() < REVIEW_PROB:
            return sess.viewed[int(self._r() * len(sess.viewed))]
        c = sess.cat if self._r() < SESSION_STICKINESS else self._sample_cat(user)
        items, cum = self._cat_items[c], self._cat_cum[c]
        brand = user.fav_brand.get(c)
        if brand is not None and self._r() < BRAND_LOYALTY:
            key = (c, brand)
            if key in self._cb_items:
                items, cum = self._cb_items[key], self._cb_cum[key]
        if not items:  # a category without items: fall back to the whole catalog by category share
            c = max(range(len(self._cat_items)), key=lambda x: len(self._cat_items[x]))
            items, cum = self._cat_items[c], self._cat_cum[c]
        j = bisect_right(cum, self._r() * cum[-1])
        return items[min(j, len(items) - 1)]

    def _new_session(self, stream: _Stream | None, closed: bool) -> _Session:
        user = self._pick_user()
        extra = int(math.log(1.0 - self._r()) / math.log(MEAN_EXTRA_VIEWS / (MEAN_EXTRA_VIEWS + 1)))
        sess = _Session(user, "s" + self._bytes(8).hex(), min(1 + extra, MAX_VIEWS), self._sample_cat(user), stream)
        if closed:
            sess.action = "rec"
        return sess

    def _session_done(self, sess: _Session) -> None:
        self._done_events += sess.n_events
        self._done_sessions += 1

    def _emit(self, sess: _Session, etype: str, ts: int, item: int | None, attr: tuple | None = None,
              **extra) -> dict:
        sess.n_events += 1
        if attr is not None:
            extra["request_id"], extra["variant"], extra["model_version"] = attr
        iid = None if item is None else self._ids[item]
        return new_event(etype, sess.user.uid, iid, sess.sid, ts=ts, event_id=self._event_id(), **extra)

    def _after_item(self, sess: _Session, ts: int, i: int) -> int | None:
        """What follows seeing item ``i``: maybe add it to the cart, else the next view or checkout."""
        if self._stock[i] and self._r() < VIEW_TO_CART * (0.4 + 0.8 * self._affinity(sess.user, i)):
            sess.action, sess.item = "cart", i
            return ts + self._gap_ms(15_000, 0.6, 2_000, 120_000)
        return self._next_browse(sess, ts)

    def _next_browse(self, sess: _Session, ts: int) -> int | None:
        if sess.views_left > 0:
            sess.action, sess.attr = "view", None
            return ts + self._gap_ms(20_000, 0.8, 1_500, 600_000)
        if sess.cart:
            sess.to_buy = [x for x in sess.cart if self._r() < CART_TO_PURCHASE]
            sess.cart = []
            if sess.to_buy:
                sess.action = "purchase"
                return ts + self._gap_ms(60_000, 0.6, 10_000, 600_000)
        return None

    def _step(self, sess: _Session, ts: int) -> tuple[dict | None, int | None]:
        """Emit the session's event due at ``ts``; returns it and the time of the next one (None = ended).

        The event is None for an impression that the recommendation service logged itself
        (a ``recommend_fn`` with ``logs_impressions`` set, such as :func:`http_recommend_fn`).
        """
        action = sess.action
        if action == "rec":
            answered, ev, nxt = self._step_rec(sess, ts)
            if answered:
                return ev, nxt
            action = "view"
        if action == "view":
            i = self._sample_item(sess)
            sess.viewed.append(i)
            sess.views_left -= 1
            sess.cat = self._cats[i]
            return self._emit(sess, "view", ts, i), self._after_item(sess, ts, i)
        if action == "click":
            i, attr = sess.item, sess.attr
            sess.viewed.append(i)
            sess.cat = self._cats[i]
            ev = self._emit(sess, "click", ts, i, attr)
            nxt = self._after_item(sess, ts, i)
            if sess.action == "cart":
                sess.attr = attr  # the add-to-cart is credited to the list
            return ev, nxt
        if action == "cart":
            i, attr = sess.item, sess.attr
            r = self._r()
            qty = 1 if r < 0.88 else (2 if r < 0.97 else 3)
            sess.cart.append((i, qty, attr))
            ev = self._emit(sess, "add_to_cart", ts, i, attr, price=self._prices[i], quantity=qty)
            return ev, self._next_browse(sess, ts)
        if action == "purchase":
            i, qty, attr = sess.to_buy.pop(0)
            ev = self._emit(sess, "purchase", ts, i, attr, price=self._prices[i], quantity=qty)
            return ev, (ts + self._gap_ms(800, 0.5, 100, 5_000) if sess.to_buy else None)
        raise AssertionError(f"unknown session action {action!r}")

    def _step_rec(self, sess: _Session, ts: int) -> tuple[bool, dict | None, int | None]:
        """Ask the recommender: ``(True, impression, next)`` with maybe a click on the list next, or ``(False, None,
        None)`` to browse instead. The impression is None when the recommender logs its impressions itself."""
        stream = sess.stream
        fn = stream.recommend_fn if stream is not None else self._step_fn
        got = None
        if fn is not None:
            try:
                got = fn(sess.user.uid)
            except Exception:  # a failing recommender never stops the shop
                log.debug("recommend_fn failed", exc_info=True)
                got = None
            if stream is not None:
                stream.counts["recommend_calls"] += 1
                if not got or not got[1]:
                    stream.counts["recommend_failures"] += 1
        if not got or not got[1]:
            return False, None, None
        request_id, items, variant, model_version = got
        items = [str(x) for x in items][:200]
        attr = (str(request_id), str(variant), None if model_version is None else str(model_version)[:64])
        # a second impression of a list the service already logged would count it twice in the A/B test
        ev = None if getattr(fn, "logs_impressions", False) else self._emit(sess, "impression", ts, None, attr,
                                                                             items=items)
        pos_bias = self._pos_bias
        for pos, iid in enumerate(items):
            i = self._index.get(iid, -1)
            if i >= 0 and self._r() < CLICK_BASE * (0.1 + 0.9 * self._affinity(sess.user, i)) * pos_bias[pos]:
                sess.action, sess.item, sess.attr = "click", i, attr
                return True, ev, ts + self._gap_ms(6_000, 0.6, 500, 60_000)
        return True, ev, self._next_browse(sess, ts)

    _step_fn: RecommendFn | None = None

    # --- public API ----------------------------------------------------------------
    def events(self, n_events: int, start_ms: int | None = None, rate_eps: float | None = None,
               recommend_fn: RecommendFn | None = None, loop_share: float = CLOSED_LOOP_SHARE) -> Iterator[dict]:
        """``n_events`` event dicts in time order, from ``start_ms`` (default now) at about ``rate_eps`` events/s.

        Args:
            rate_eps: mean event rate of the simulated shop (default 20/s).
            recommend_fn: when given, ``loop_share`` of the sessions go through the closed loop.
        """
        start_ms = now_ms() if start_ms is None else int(start_ms)
        stream = _Stream(self, start_ms, 20.0 if rate_eps is None else rate_eps, recommend_fn, loop_share)
        for _ in range(n_events):
            yield stream.pop()

    def step_with_recommender(self, recommend_fn: RecommendFn, ts_ms: int | None = None) -> list[dict]:
        """Run one closed-loop session to its end and return its events (time order).

        The user asks ``recommend_fn(user_id)`` first: on an answer they see the list (an
        ``impression``) and may click one item (chance ~ taste match x 1/log2(pos+2)); the click and the
        add-to-cart/purchase that follow carry the list's ``request_id``, ``variant`` and
        ``model_version``. Then (or when the answer is None) they browse on their own.
        """
        ts = now_ms() if ts_ms is None else int(ts_ms)
        self._step_fn = recommend_fn
        try:
            sess = self._new_session(None, closed=True)
            out = []
            nxt: int | None = ts
            while nxt is not None:
                self._arrivals_until(nxt)
                ev, nxt = self._step(sess, nxt)
                if ev is not None:
                    out.append(ev)
            self._session_done(sess)
            return out
        finally:
            self._step_fn = None

    def backfill(self, lake_dir: Path, days: float, events_per_day: int, end_ms: int | None = None,
                 progress: bool = True, chunk_size: int = 50_000, catalog_path: Path | None = None) -> int:
        """Write ``days`` of history ending at ``end_ms`` (default now) straight into the lake.

        Sessions run at ``events_per_day`` on average; events are written in chunks with
        :func:`pipelines.lake.write_events` (files named ``backfill-*``); sessions still running at
        ``end_ms`` are cut off there, so the count is close to, not exactly, ``days * events_per_day``.
        With ``catalog_path`` the products that appeared meanwhile are added to the catalog file there.

        Returns:
            The number of events written.
        """
        end_ms = now_ms() if end_ms is None else int(end_ms)
        start_ms = end_ms - int(days * DAY_MS)
        target = int(days * events_per_day)
        if target <= 0:
            return 0
        stream = _Stream(self, start_ms, events_per_day / 86_400)
        t0 = time.monotonic()
        written = 0
        chunk: list[dict] = []
        items_before = len(self.new_items)

        def flush() -> None:
            nonlocal written, chunk
            if not chunk:
                return
            lake.write_events(lake_dir, chunk, prefix=lake.BACKFILL_PREFIX)
            written += len(chunk)
            if progress:
                el = time.monotonic() - t0
                upto = datetime.fromtimestamp(chunk[-1]["ts"] / 1000, tz=timezone.utc)
                log.info("backfill: %d/~%d events (%.0f%%), %.0f events/s, simulated up to %s",
                         written, target, 100.0 * written / target, written / max(el, 1e-9),
                         upto.strftime("%Y-%m-%d %H:%M"))
            chunk = []

        while stream.peek_ts() < end_ms:
            chunk.append(stream.pop())
            if len(chunk) >= chunk_size:
                flush()
        flush()
        if catalog_path is not None:
            add_to_catalog(self.catalog, catalog_path)
        if progress:
            log.info("backfill done: %d events over %.1f days in %.1fs (%d new users, %d new items)",
                     written, days, time.monotonic() - t0, self.n_users - self.n_initial_users,
                     len(self.new_items) - items_before)
        return written

    def run_live(self, produce_fn: Callable[[list[dict]], object], rate_eps: float, duration_s: float | None = None,
                 recommend_fn: RecommendFn | None = None, stop_event: threading.Event | None = None,
                 loop_share: float = CLOSED_LOOP_SHARE, batch_interval_s: float = 0.1,
                 catalog_fn: Callable[[list[dict]], object] | None = None) -> dict[str, int]:
        """Emit events in real time at about ``rate_eps`` events/s until ``duration_s`` (None = forever) or stop.

        Every ``batch_interval_s`` the events that are due are passed to ``produce_fn(list_of_dicts)``
        (their ``ts`` is the wall clock). With ``recommend_fn``, ``loop_share`` of the sessions go
        through the closed loop. ``catalog_fn(list_of_item_dicts)``, when given, gets the products
        that appeared (e.g. to publish them to the catalog topic).

        Returns:
            Counts: ``events``, one entry per event type, ``batches``, ``recommend_calls``,
            ``recommend_failures``, ``new_items``, ``new_users``.
        """
        wall0 = now_ms()
        mono0 = time.monotonic()
        stream = _Stream(self, wall0, rate_eps, recommend_fn, loop_share)
        deadline = None if duration_s is None else mono0 + duration_s
        users0, items_seen = self.n_users, len(self.new_items)
        items0 = items_seen
        total = batches = 0
        next_tick = mono0
        next_log = mono0 + 60.0
        while True:
            if stop_event is not None and stop_event.is_set():
                break
            now = time.monotonic()
            horizon = now if deadline is None else min(now, deadline)
            sim_now = wall0 + int((horizon - mono0) * 1000)
            batch = []
            while stream.peek_ts() <= sim_now:
                batch.append(stream.pop())
            if batch:
                produce_fn(batch)
                total += len(batch)
                batches += 1
            if catalog_fn is not None and len(self.new_items) > items_seen:
                catalog_fn(self.new_items[items_seen:])
                items_seen = len(self.new_items)
            if now >= next_log:
                log.info("simulator: %d events in %.0fs (%.1f events/s)", total, now - mono0,
                         total / max(now - mono0, 1e-9))
                next_log = now + 60.0
            if deadline is not None and now >= deadline:
                break
            next_tick += batch_interval_s
            wait = next_tick - time.monotonic()
            if wait < 0:  # fell behind (slow produce_fn or recommender): do not try to catch up in a burst loop
                next_tick = time.monotonic()
                wait = 0.0
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if stop_event is not None:
                stop_event.wait(wait)
            elif wait > 0:
                time.sleep(wait)
        counts = {"events": total, "batches": batches}
        counts.update({k: int(v) for k, v in stream.counts.items()})
        counts["new_items"] = len(self.new_items) - items0
        counts["new_users"] = self.n_users - users0
        return counts


# --- closed loop over HTTP -------------------------------------------------------
def http_recommend_fn(base_url: str, timeout: float = 2.0, k: int = 10,
                      headers: dict[str, str] | None = None) -> RecommendFn:
    """A ``recommend_fn`` that POSTs ``{"user_id", "k"}`` to ``{base_url}/recommend`` (the BentoML service),
    with ``headers`` (its API key: :meth:`pipelines.settings.Settings.client_headers`).

    Any error (connection, status, malformed answer) gives None: the simulated user then browses on
    their own. A refused key (401, 403, 503) is logged once as a warning: the loop is then open.
    """
    import httpx

    client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
    warned = False

    def recommend(user_id: str) -> Recommendation | None:
        nonlocal warned
        try:
            resp = client.post("/recommend", json={"user_id": user_id, "k": k})
            if resp.status_code in (401, 403, 503) and not warned:
                warned = True
                log.warning("the service refused /recommend (%d: %s): simulated users browse without its lists; "
                            "set SHOPREC_API_KEYS to a key the service accepts", resp.status_code, resp.text[:200])
            resp.raise_for_status()
            body = resp.json()
            items = [str(it["item_id"]) for it in body["items"]]
            return str(body["request_id"]), items, str(body["variant"]), body.get("model_version")
        except Exception as err:  # noqa: BLE001 - the shop keeps going whatever the service does
            log.debug("recommend(%s) failed: %s", user_id, err)
            return None

    recommend.client = client  # type: ignore[attr-defined]  # closable by the caller
    recommend.logs_impressions = True  # type: ignore[attr-defined]  # the service logs each answer's impression
    return recommend


def validate_catalog(catalog: pd.DataFrame) -> None:
    """Raise ``pydantic.ValidationError`` when a row is not a valid :class:`CatalogItem`."""
    for row in catalog[list(CATALOG_COLUMNS)].to_dict("records"):
        CatalogItem.model_validate(row)


__all__: Sequence[str] = (
    "CATEGORIES", "BRANDS", "make_catalog", "save_catalog", "load_or_make_catalog", "validate_catalog",
    "ShopSimulator", "http_recommend_fn", "Recommendation", "RecommendFn",
)
