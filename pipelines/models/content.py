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

    def _tokens(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tokens, column-wise (no Python loop per item): ``(rows, tokens)``, row-major, each row's
        tokens in column order and, within a text column, in word order; a token may repeat within a row."""
        cols = [c for c in items.columns if c not in SKIP_COLUMNS]
        rows, toks = [], []
        for col in cols:
            s = items[col].reset_index(drop=True)
            if col in self.bands or (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)):
                edges = self.bands.get(col)
                if edges is None:
                    continue
                vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64")
                band = np.searchsorted(np.asarray(edges), vals, side="right")
                keep = ~np.isnan(vals)
                t = f"{col}#" + pd.Series(band[keep]).astype(str)
                r = np.flatnonzero(keep)
            elif col in TEXT_COLUMNS:
                words = s[s.notna()].astype(str).str.lower().str.findall(_WORD).explode().dropna()
                t = f"{col}:" + words.astype(str)
                r = words.index.to_numpy()
            else:
                present = s[s.notna()]
                t = f"{col}=" + present.map(str)
                r = present.index.to_numpy()
            rows.append(np.asarray(r, dtype="int64"))
            toks.append(np.asarray(t, dtype=object))
        if not rows:
            return np.zeros(0, "int64"), np.zeros(0, object)
        row, tok = np.concatenate(rows), np.concatenate(toks)
        order = np.argsort(row, kind="stable")  # by row; within a row, the column and word order above
        return row[order], tok[order]

    def fit(self, items: pd.DataFrame) -> ContentFeatures:
        """Learn the numeric bands and the token vocabulary from a catalog."""
        self._fit(items)
        return self

    def fit_transform(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`fit` then :meth:`transform` of the same catalog, tokenizing it once."""
        return self._bags(*self._fit(items), len(items))

    def _fit(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        self.bands = {}
        for col in items.columns:
            s = items[col]
            if col in SKIP_COLUMNS or pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
                continue
            q = np.nanquantile(s.to_numpy(dtype="float64"), np.linspace(0, 1, self.n_bands + 1)[1:-1])
            self.bands[col] = sorted(set(float(x) for x in q))
        row, tok = self._tokens(items)
        pairs = pd.DataFrame({"row": row, "tok": tok}).drop_duplicates()
        counts = pairs["tok"].value_counts()  # in how many items each token occurs
        self.vocab = {t: n for n, t in enumerate(sorted(counts.index[counts.to_numpy() >= self.min_count]))}
        return row, tok

    def transform(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Token bags of ``items`` (rows in order).

        Returns:
            ``(tokens, offsets)``: int64 ``[n_tokens]`` vocabulary indices and int64 ``[len(items)]``
            start of each row's bag (EmbeddingBag layout; a row may have no token). A bag holds each known
            token once, in the order of its first occurrence.
        """
        return self._bags(*self._tokens(items), len(items))

    def _bags(self, row: np.ndarray, tok: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        pos = pd.Index(list(self.vocab), dtype=object).get_indexer(tok) if len(tok) else np.zeros(0, "int64")
        values = np.fromiter(self.vocab.values(), dtype="int64", count=len(self.vocab))
        known = pd.DataFrame({"row": row[pos >= 0], "code": values[pos[pos >= 0]]})
        known = known.drop_duplicates()  # keeps each row's first occurrence of a token, in order
        lengths = np.bincount(known["row"].to_numpy(), minlength=n_rows).astype("int64")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("int64") if n_rows else np.zeros(0, "int64")
        return known["code"].to_numpy(dtype="int64", copy=True), offsets  # writable: torch.from_numpy takes it

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
    features = ContentFeatures()
    tokens, offsets = features.fit_transform(catalog)
    return features, tokens, offsets
