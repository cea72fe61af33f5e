"""Item-to-item recommender: EASE on small catalogs, cosine co-visitation on large ones.

References:
    Harald Steck. "Embarrassingly Shallow Autoencoders for Sparse Data." WWW 2019.
    https://arxiv.org/abs/1905.03375
    Badrul Sarwar et al. "Item-based collaborative filtering recommendation algorithms." WWW 2001.

Either way the model keeps a sparse top-N neighbour table: ``neighbours[i]`` are the N items
whose weights ``w[i, j]`` are largest, and a profile ``x`` (weighted items) scores item ``j`` with
``sum_i x_i w[i, j]``. With at most ``dense_max_items`` items the weights are EASE's closed form
``B = I - P / diag(P)``, ``P = (X^T X + l2 I)^-1`` (diagonal zeroed). With ``content_weight`` > 0
and a catalog, ``X`` also gets one pseudo-user row per content token (category, brand, price band,
title word), weighted ``content_weight``: items that share content co-occur, so the weights learn
content as well as behaviour, and a product nobody has clicked yet still has neighbours (Jeunen et
al., "Closed-form models for collaborative filtering with side-information", RecSys 2020). With
``weight_power`` > 0, a row of ``X`` holds ``(min(w, weight_cap) / weight_cap) ** weight_power`` instead
of 1, ``w`` the summed ``weight`` of the (user, item) pair (a rating, or view/cart/purchase 1/3/5), so
strong interactions shape the weights more; profiles still count every item once. Above
``dense_max_items``, a dense inverse
is out of reach (50,000 items would need 10 GB), so the weights are co-visitation counts
``C = X^T X`` normalised as ``C_ij / (c_i^alpha c_j^(1-alpha))``, computed in item chunks with
sparse matrix products and kept sparse until each row's top N is taken, so the fit follows the
number of co-visited pairs, not the square of the catalog (1,000,000 products: seconds).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipelines.models import register
from pipelines.models.content import catalog_token_bags
from pipelines.models.popularity import interaction_weights
from pipelines.models.scoring import Profiles, ScoringRecommender
from pipelines.columns import COL_ITEM, COL_USER

log = logging.getLogger(__name__)

_DENSE_SCORING_MAX = 8192  # up to this many items a dense [n, n] weight matrix scores by one matmul
_DENSE_BLOCK_SHARE = 0.05  # a co-visitation block with more of its pairs filled is topk'd dense


@register
class ItemItem(ScoringRecommender):
    """Item-to-item weights kept as a top-N neighbour table.

    Args:
        l2: EASE's L2 regularisation (larger = smoother).
        content_weight: weight of the content pseudo-users in EASE (0: behaviour only; the
            co-visitation path of big catalogs ignores it).
        neighbours: N, weights kept per item (the table is ``[n_items, N]``).
        dense_max_items: largest catalog for EASE; larger ones use co-visitation.
        alpha: co-visitation normalisation exponent (0.5 = cosine).
        weight_power, weight_cap: EASE's interaction strength ``(min(w, cap) / cap) ** power`` (0: binary;
            the co-visitation path is always binary).
        seed, device, session_weight: see :class:`~pipelines.models.scoring.ScoringRecommender`.
    """

    name = "itemitem"

    def __init__(self, l2: float = 300.0, neighbours: int = 1000, dense_max_items: int = 6000, alpha: float = 0.5,
                 content_weight: float = 0.0, weight_power: float = 0.0, weight_cap: float = 5.0,
                 seed: int = 2020, device: str = "auto", session_weight: float = 1.0):
        super().__init__(seed=seed, device=device, session_weight=session_weight)
        self.l2 = float(l2)
        self.weight_power, self.weight_cap = float(weight_power), float(weight_cap)
        self.content_weight = float(content_weight)
        self._tokens = np.zeros(0, "int64")  # content token bags in item index order (EmbeddingBag layout)
        self._offsets = np.zeros(0, "int64")
        self.neighbours = int(neighbours)
        self.dense_max_items = int(dense_max_items)
        self.alpha = float(alpha)
        self.nb_index = torch.zeros(0, 0, dtype=torch.int32)  # [n_items, N]
        self.nb_weight = torch.zeros(0, 0)  # [n_items, N]
        self._dense: torch.Tensor | None = None

    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> ItemItem:
        """Fit on interactions; catalog items without interactions get no neighbours."""
        t0 = time.perf_counter()
        ucodes, icodes, weights = self._index(interactions, items)
        n_users, n_items = len(self._user_ids), len(self._item_ids)
        if self.content_weight > 0 and n_items <= self.dense_max_items:
            _, self._tokens, self._offsets = catalog_token_bags(items, self._item_ids)
        else:
            self._tokens, self._offsets = np.zeros(0, "int64"), np.zeros(n_items, "int64")
        u, i, x = self._pairs(ucodes, icodes, weights, n_items)
        if n_items <= self.dense_max_items:
            self._fit_ease(u, i, x, n_users, n_items)
        else:
            self._fit_covisit(u, i, n_users, n_items)
        self._dense = None
        log.info("itemitem fitted %d items (%s, N=%d) in %.1fs", n_items,
                 "ease" if n_items <= self.dense_max_items else "co-visitation", self.nb_index.shape[1],
                 time.perf_counter() - t0)
        return self

    def refit(self, interactions: pd.DataFrame) -> int:
        """Recompute the neighbour table from ``interactions`` on the item index the model already has.

        The incremental refresh: fresher neighbours for the same items, so the other parts of a
        hybrid (and the serving item table) stay aligned. Rows of items the model does not know
        are dropped (they wait for the next full retrain); users are indexed locally.

        Returns:
            The number of interaction rows used.

        Raises:
            ValueError: when no row names a known item (the model is left unchanged).
        """
        if not self._item_ids:
            raise ValueError("refit needs a fitted model: fit() it first")
        codes = interactions[COL_ITEM].astype(str).map(self._item_index)
        known = codes.notna().to_numpy()
        if not known.any():
            raise ValueError("none of the interactions names an item this model knows: run a full retrain")
        t0 = time.perf_counter()
        icodes = codes[known].to_numpy(dtype="int64")
        ucodes = pd.factorize(interactions.loc[known, COL_USER].astype(str))[0].astype("int64")
        n_items = len(self._item_ids)
        u, i, x = self._pairs(ucodes, icodes, interaction_weights(interactions[known]), n_items)
        n_users = int(ucodes.max()) + 1
        if n_items <= self.dense_max_items:
            self._fit_ease(u, i, x, n_users, n_items)
        else:
            self._fit_covisit(u, i, n_users, n_items)
        self._dense = None
        log.info("itemitem refreshed from %d rows in %.1fs", int(known.sum()), time.perf_counter() - t0)
        return int(known.sum())

    def _pairs(self, ucodes: np.ndarray, icodes: np.ndarray, weights: np.ndarray, n_items: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct (user, item) pairs and each one's value in ``X`` (see ``weight_power``)."""
        pairs, inverse = np.unique(ucodes * n_items + icodes, return_inverse=True)
        if self.weight_power > 0:
            total = np.bincount(inverse.ravel(), weights=weights, minlength=len(pairs))
            x = (np.clip(total, 0.0, self.weight_cap) / self.weight_cap) ** self.weight_power
        else:
            x = np.ones(len(pairs))
        return pairs // n_items, pairs % n_items, x

    def _keep_top(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.neighbours, weights.shape[1])  # all of them when N >= n_items (the zero diagonal included)
        w, idx = torch.topk(weights, n, dim=1)
        return idx.to(torch.int32), w

    def _fit_ease(self, u: np.ndarray, i: np.ndarray, values: np.ndarray, n_users: int, n_items: int) -> None:
        dev = self._device
        x = torch.zeros(n_users, n_items, device=dev, dtype=torch.float64)
        x[torch.from_numpy(u).to(dev), torch.from_numpy(i).to(dev)] = torch.from_numpy(values).to(dev, torch.float64)
        if self.content_weight > 0 and len(self._tokens):  # one pseudo-user per content token
            item_of = np.repeat(np.arange(n_items), np.diff(np.append(self._offsets, len(self._tokens))))
            f = torch.zeros(int(self._tokens.max()) + 1, n_items, device=dev, dtype=torch.float64)
            f[torch.from_numpy(self._tokens).to(dev), torch.from_numpy(item_of).to(dev)] = self.content_weight
            x = torch.cat([x, f])
        g = x.T @ x
        g.diagonal().add_(self.l2)
        p = torch.linalg.inv(g)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        self.nb_index, self.nb_weight = self._keep_top(b.float())

    def _fit_covisit(self, u: np.ndarray, i: np.ndarray, n_users: int, n_items: int, chunk: int = 1024) -> None:
        """The co-visitation table, ``chunk`` item rows at a time.

        ``X^T X`` is formed block by block as a sparse product. A sparse block (the usual case) keeps
        only its co-visited pairs and each row's top N is taken from those, so time and memory follow
        the number of co-visited pairs, not ``n_items^2`` (1,000,000 products fit in seconds). A block
        that is mostly filled (a user who viewed most of the catalog makes every pair co-visited) is
        made dense and its top N taken with ``topk``, which is then the cheaper way. Either way a row
        with fewer than N co-visited items is padded with weight 0 (the row's own item), which scores
        nothing.
        """
        dev = self._device  # the sparse products run on the GPU when there is one
        xt = torch.sparse_coo_tensor(torch.from_numpy(np.stack([i, u])), torch.ones(len(u)), (n_items, n_users),
                                     check_invariants=True).coalesce()
        x = xt.t().coalesce()
        row_start = np.searchsorted(xt.indices()[0].numpy(), np.arange(n_items + 1))
        xt, x = xt.to(dev), x.to(dev)
        counts = torch.from_numpy(np.bincount(i, minlength=n_items).astype("float32")).to(dev)
        inv_a = counts.clamp_min(1).pow(-self.alpha)
        inv_b = counts.clamp_min(1).pow(-(1 - self.alpha))
        n = min(self.neighbours, n_items)
        self.nb_index = torch.empty(n_items, n, dtype=torch.int32, device=dev)
        self.nb_weight = torch.zeros(n_items, n, device=dev)
        for start in range(0, n_items, chunk):
            stop = min(start + chunk, n_items)
            rows = torch.arange(start, stop, device=dev)
            block = torch.sparse.mm(_coo_rows(xt, row_start, start, stop), x)  # [chunk, n_items], sparse
            if block._nnz() > _DENSE_BLOCK_SHARE * (stop - start) * n_items:
                w = block.to_dense() * inv_a[start:stop, None] * inv_b[None, :]
                w[rows - start, rows] = 0.0
                w, idx = torch.topk(w, n, dim=1)
                self.nb_index[start:stop] = torch.where(w > 0, idx, rows[:, None]).to(torch.int32)
                self.nb_weight[start:stop] = w
                continue
            block = block.coalesce()
            self.nb_index[start:stop] = rows[:, None].to(torch.int32)
            r, c = block.indices()
            off = r != c - start  # the diagonal is not a neighbour
            r, c = r[off], c[off]
            v = block.values()[off].float() * inv_a[r + start] * inv_b[c]
            order = torch.argsort(v, descending=True, stable=True)  # each row best first: by value, then by row
            order = order[torch.argsort(r[order], stable=True)]
            r, c, v = r[order], c[order], v[order]
            first = torch.searchsorted(r, torch.arange(stop - start, device=dev))
            rank = torch.arange(len(r), device=dev) - first[r]
            top = rank < n
            self.nb_index[r[top] + start, rank[top]] = c[top].to(torch.int32)
            self.nb_weight[r[top] + start, rank[top]] = v[top]

    def _dense_weights(self) -> torch.Tensor:
        if self._dense is None:
            n = len(self._item_ids)
            w = torch.zeros(n, n, device=self._device)
            w.scatter_(1, self.nb_index.long().to(self._device), self.nb_weight.to(self._device))
            self._dense = w
        return self._dense

    def _score(self, profiles: Profiles) -> torch.Tensor:
        n_items = len(self._item_ids)
        if n_items <= _DENSE_SCORING_MAX:
            return profiles.dense(n_items, self._device) @ self._dense_weights()
        scores = torch.zeros(profiles.n_rows * n_items, device=self._device)
        if len(profiles.rows):
            dev = self._device
            items = torch.from_numpy(profiles.items).to(dev)
            rows = torch.from_numpy(profiles.rows).to(dev)
            w = torch.from_numpy(profiles.weights.astype("float32")).to(dev)
            nb = self.nb_index[items].long()  # [nnz, N]
            flat = rows[:, None] * n_items + nb
            scores.index_add_(0, flat.reshape(-1), (self.nb_weight[items] * w[:, None]).reshape(-1))
        return scores.view(profiles.n_rows, n_items)

    def _item_similarity(self, code: int) -> torch.Tensor:
        sims = torch.full((len(self._item_ids),), -1e9, device=self._device)
        sims[self.nb_index[code].long()] = self.nb_weight[code]
        return sims

    def table_bytes(self) -> int:
        """Memory held by the neighbour table."""
        return self.nb_index.element_size() * self.nb_index.nelement() + \
            self.nb_weight.element_size() * self.nb_weight.nelement()

    def params(self) -> dict:
        return {"l2": self.l2, "neighbours": self.neighbours, "dense_max_items": self.dense_max_items,
                "alpha": self.alpha, "content_weight": self.content_weight, "weight_power": self.weight_power,
                "weight_cap": self.weight_cap, **super().params()}

    def _state(self) -> dict:
        return {"nb_index": self.nb_index, "nb_weight": self.nb_weight,
                "tokens": torch.from_numpy(self._tokens), "offsets": torch.from_numpy(self._offsets)}

    def _restore(self, state: dict) -> None:
        self.nb_index, self.nb_weight = state["nb_index"], state["nb_weight"]
        if "tokens" in state:  # models saved before content_weight existed have none
            self._tokens, self._offsets = state["tokens"].cpu().numpy(), state["offsets"].cpu().numpy()


def _coo_rows(m: torch.Tensor, row_start: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a coalesced sparse COO matrix (``row_start[r]``: first entry of row r)."""
    a, b = int(row_start[start]), int(row_start[stop])
    idx = m.indices()[:, a:b].clone()
    idx[0] -= start
    return torch.sparse_coo_tensor(idx, m.values()[a:b], (stop - start, m.shape[1]), check_invariants=False)
