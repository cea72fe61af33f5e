"""Content features of catalog items as token bags, for the item tower of the embedding model.

Every catalog column becomes tokens, so a product nobody has clicked yet still has a
representation: categorical columns (``category``, ``brand``...) give one ``col=value`` token,
text columns (``title``, genres...) one ``col:word`` token per word, numeric columns (``price``)
a ``col#band`` token from quantile bands fitted on the catalog (the "price band"). Tokens seen
fewer than ``min_count`` times are dropped. ``item_id``, ``created_at`` and ``in_stock`` are not
content.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipelines.columns import COL_ITEM

#: columns split into words (others that hold strings are one token per value)
TEXT_COLUMNS = frozenset({"title", "movie_title", "genres", "class", "description", "tags"})
SKIP_COLUMNS = frozenset({COL_ITEM, "created_at", "in_stock", "ts"})
_WORD = re.compile(r"[a-z0-9]+")


class ContentFeatures:
    """Maps catalog rows to token-index bags (``torch.nn.EmbeddingBag`` input).

    Args:
        n_bands: quantile bands per numeric column.
        min_count: tokens rarer than this in the fitted catalog are dropped.
    """

    def __init__(self, n_bands: int = 8, min_count: int = 2):
        self.n_bands = int(n_bands)
        self.min_count = int(min_count)
        self.vocab: dict[str, int] = {}
        self.bands: dict[str, list[float]] = {}

    def _tokens(self, items: pd.DataFrame) -> list[list[str]]:
        cols = [c for c in items.columns if c not in SKIP_COLUMNS]
        per_col: list[list[list[str]]] = []
        for col in cols:
            s = items[col]
            if col in self.bands or (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)):
                edges = self.bands.get(col)
                if edges is None:
                    continue
                vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64")
                band = np.searchsorted(np.asarray(edges), vals, side="right")
                per_col.append([[] if np.isnan(v) else [f"{col}#{b}"] for v, b in zip(vals, band)])
            elif col in TEXT_COLUMNS:
                per_col.append([[f"{col}:{w}" for w in _WORD.findall(str(v).lower())] if pd.notna(v) else []
                                for v in s])
            else:
                per_col.append([[f"{col}={v}"] if pd.notna(v) else [] for v in s])
        return [sum((c[n] for c in per_col), []) for n in range(len(items))]

    def fit(self, items: pd.DataFrame) -> ContentFeatures:
        """Learn the numeric bands and the token vocabulary from a catalog."""
        self.bands = {}
        for col in items.columns:
            s = items[col]
            if col in SKIP_COLUMNS or pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
                continue
            q = np.nanquantile(s.to_numpy(dtype="float64"), np.linspace(0, 1, self.n_bands + 1)[1:-1])
            self.bands[col] = sorted(set(float(x) for x in q))
        counts: dict[str, int] = {}
        for toks in self._tokens(items):
            for t in set(toks):
                counts[t] = counts.get(t, 0) + 1
        self.vocab = {t: n for n, t in enumerate(sorted(t for t, c in counts.items() if c >= self.min_count))}
        return self

    def transform(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Token bags of ``items`` (rows in order).

        Returns:
            ``(tokens, offsets)``: int64 ``[n_tokens]`` vocabulary indices and int64 ``[len(items)]``
            start of each row's bag (EmbeddingBag layout; a row may have no token).
        """
        bags = [[self.vocab[t] for t in dict.fromkeys(toks) if t in self.vocab] for toks in self._tokens(items)]
        lengths = np.array([len(b) for b in bags], dtype="int64")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("int64") if len(bags) else np.zeros(0, "int64")
        tokens = np.array([t for b in bags for t in b], dtype="int64")
        return tokens, offsets

    def state(self) -> dict:
        return {"n_bands": self.n_bands, "min_count": self.min_count, "vocab": self.vocab, "bands": self.bands}

    @classmethod
    def from_state(cls, state: dict) -> ContentFeatures:
        out = cls(state["n_bands"], state["min_count"])
        out.vocab, out.bands = dict(state["vocab"]), {k: list(v) for k, v in state["bands"].items()}
        return out


def catalog_token_bags(items: pd.DataFrame | None, item_ids: list[str]
                       ) -> tuple[ContentFeatures, np.ndarray, np.ndarray]:
    """Fit :class:`ContentFeatures` on a catalog and return the token bags in ``item_ids`` order.

    Items missing from the catalog get an empty bag; no catalog gives no tokens at all.

    Returns:
        ``(features, tokens, offsets)`` as :meth:`ContentFeatures.transform` gives them.
    """
    if items is None or not len(items):
        return ContentFeatures(), np.zeros(0, "int64"), np.zeros(len(item_ids), "int64")
    catalog = items.assign(**{COL_ITEM: items[COL_ITEM].astype(str)}).drop_duplicates(COL_ITEM, keep="last")
    catalog = catalog.set_index(COL_ITEM).reindex(item_ids).reset_index()
    features = ContentFeatures().fit(catalog)
    tokens, offsets = features.transform(catalog)
    return features, tokens, offsets
