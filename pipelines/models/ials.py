"""Implicit alternating least squares (iALS) in torch: the hybrid's second collaborative signal.

Reference:
    Steffen Rendle, Walid Krichene, Li Zhang, Yehuda Koren. "Revisiting the Performance of iALS on
    Item Recommendation Benchmarks." RecSys 2022. https://arxiv.org/abs/2110.14037

Loss over user vectors ``w_u`` and item vectors ``h_i`` (every observed pair is a positive):
``sum_(u,i) observed (w_u.h_i - 1)^2 + alpha0 * sum_(u,i) all (w_u.h_i)^2
+ reg * (sum_u (n_u + alpha0 * n_items)^nu |w_u|^2 + sum_i (n_i + alpha0 * n_users)^nu |h_i|^2)``,
the unobserved weight ``alpha0`` small and the regularisation scaled by frequency, as in the paper.
Each half-step solves every row's normal equations with a few conjugate-gradient steps warm-started
from the previous vectors; the products touch only the observed pairs (one sampled product for
their dot products, one sparse product for the sums) plus one ``[dim, dim]`` Gram matrix, so memory
and time grow with the number of interactions, not users x items. Catalog items with no interactions
are left out of the solve: their vectors are zero.

Scoring folds a profile in: the user vector is solved from the profile's weighted items against
the fixed item vectors (the same normal equations), so a known user, a known user with a fresh
session and an anonymous session are scored the same way, and a new click moves the list at once.
Only the item vectors are kept.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from pipelines.models import register
from pipelines.models.scoring import Profiles, ScoringRecommender

log = logging.getLogger(__name__)

_FOLD_IN_BLOCK = 1 << 16  # rows x longest profile per fold-in chunk (x dim floats of memory)


@register
class IALS(ScoringRecommender):
    """iALS with frequency-scaled regularisation; item vectors kept, user vectors folded in per request.

    Args:
        dim: vector size.
        alpha0: weight of the unobserved pairs (small: 0.1-1).
        reg: regularisation, multiplied by ``(count + alpha0 * n_other)^nu`` per row.
        nu: exponent of that frequency scaling (0: plain L2).
        iterations: alternating passes.
        cg_steps: conjugate-gradient steps per row solve in training.
        seed, device, session_weight: see :class:`~pipelines.models.scoring.ScoringRecommender`.
    """

    name = "ials"

    def __init__(self, dim: int = 64, alpha0: float = 0.1, reg: float = 0.03, nu: float = 1.0,
                 iterations: int = 10, cg_steps: int = 3, seed: int = 2020, device: str = "auto",
                 session_weight: float = 1.0):
        super().__init__(seed=seed, device=device, session_weight=session_weight)
        self.dim, self.alpha0, self.reg, self.nu = int(dim), float(alpha0), float(reg), float(nu)
        self.iterations, self.cg_steps = int(iterations), int(cg_steps)
        self.item_vectors = torch.zeros(0, self.dim)  # [n_items, dim]
        self._gram: torch.Tensor | None = None

    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> IALS:
        """Fit on the distinct (user, item) pairs; catalog items without interactions get zero vectors."""
        t0 = time.perf_counter()
        ucodes, icodes, _ = self._index(interactions, items)
        n_users, n_items = len(self._user_ids), len(self._item_ids)
        pairs = np.unique(ucodes * n_items + icodes)
        dev = self._device
        u_np, i_np = pairs // n_items, pairs % n_items  # sorted by user
        # Only items with behaviour are solved for: a catalog-only item's vector is zero (no
        # behaviour, no vector), so it adds nothing to the Gram matrix and costs nothing per step;
        # in a big catalog most products have no interactions yet.
        # Items [0, n_warm) are those with interactions (ScoringRecommender._index puts them first).
        n_warm = self._n_warm
        by_item = np.argsort(i_np, kind="stable")
        users_side = _Rows(u_np, i_np, np.ones(len(u_np)), n_users, dev)
        items_side = _Rows(i_np[by_item], u_np[by_item], np.ones(len(u_np)), n_warm, dev)
        gen = torch.Generator().manual_seed(self.seed)
        scale = 0.1 / self.dim ** 0.5
        w = (torch.randn(n_users, self.dim, generator=gen) * scale).to(dev)
        h = (torch.randn(n_items, self.dim, generator=gen)[:n_warm] * scale).to(dev)
        lam_u = self._lambda(users_side.totals, n_items)
        lam_i = self._lambda(items_side.totals, n_users)
        for _ in range(self.iterations):
            w = self._solve(w, h, users_side, lam_u, self.cg_steps)
            h = self._solve(h, w, items_side, lam_i, self.cg_steps)
        self.item_vectors = torch.cat([h.float(), torch.zeros(n_items - n_warm, self.dim, device=dev)])
        self._gram = None
        log.info("ials fitted %d users x %d items (dim %d) in %.1fs", n_users, n_items, self.dim,
                 time.perf_counter() - t0)
        return self

    def _lambda(self, counts: torch.Tensor, n_other: int) -> torch.Tensor:
        return self.reg * (counts + self.alpha0 * n_other) ** self.nu

    def _solve(self, x: torch.Tensor, other: torch.Tensor, side: _Rows, lam: torch.Tensor, steps: int,
               gram: torch.Tensor | None = None) -> torch.Tensor:
        """Conjugate-gradient steps on every row's ``(sum_j c_j h_j h_j^T + alpha0 G + lam I) x = sum_j c_j h_j``."""
        g = self.alpha0 * (other.T @ other) if gram is None else gram

        def apply(p: torch.Tensor) -> torch.Tensor:
            s = side.dots(p, other) * side.conf
            return side.matmul(s, other) + p @ g + lam[:, None] * p

        r = side.matmul(side.conf, other) - apply(x)
        p = r.clone()
        rs = (r * r).sum(1)
        for _ in range(steps):
            ap = apply(p)
            a = rs / (p * ap).sum(1).clamp_min(1e-20)
            x = x + a[:, None] * p
            r = r - a[:, None] * ap
            rs_new = (r * r).sum(1)
            p = r + (rs_new / rs.clamp_min(1e-20))[:, None] * p
            rs = rs_new
        return x

    def user_vectors(self, profiles: Profiles) -> torch.Tensor:
        """``[n_rows, dim]`` vectors folded in from the profiles' weighted items.

        Each row's normal equations ``(sum_j c_j h_j h_j^T + alpha0 G + lam I) x = sum_j c_j h_j``
        are built with one batched product over the row's items (padded to the longest row of a
        chunk) and solved exactly: a handful of tensor calls per batch, where conjugate-gradient
        steps cost a dozen small calls each (most of a small serving batch's time on CPU).
        """
        dev = self._device
        h = self.item_vectors.to(dev)
        if self._gram is None:
            self._gram = self.alpha0 * (h.T @ h)
        n = profiles.n_rows
        order = np.argsort(profiles.rows, kind="stable")
        rows, items = profiles.rows[order], profiles.items[order]
        conf = profiles.weights[order].astype("float32")
        counts = np.bincount(rows, minlength=n)
        starts = np.concatenate([[0], np.cumsum(counts)])
        lam = self._lambda(torch.from_numpy(np.bincount(rows, weights=conf, minlength=n).astype("float32")).to(dev),
                           len(self._item_ids))
        out = torch.empty(n, self.dim, device=dev)
        eye = torch.eye(self.dim, device=dev)
        lo = 0
        while lo < n:  # chunks of rows whose padded item block stays under _FOLD_IN_BLOCK entries
            width = max(1, int(counts[lo]))
            hi = lo + 1
            while hi < n and (hi + 1 - lo) * max(width, int(counts[hi])) <= _FOLD_IN_BLOCK:
                width = max(width, int(counts[hi]))
                hi += 1
            sl = slice(starts[lo], starts[hi])
            r = torch.from_numpy(rows[sl] - lo).to(dev)
            pos = torch.from_numpy(np.arange(starts[lo], starts[hi]) - np.repeat(starts[lo:hi], counts[lo:hi])).to(dev)
            hp = torch.zeros(hi - lo, width, self.dim, device=dev)
            cp = torch.zeros(hi - lo, width, device=dev)
            hp[r, pos] = h[torch.from_numpy(items[sl]).to(dev)]
            cp[r, pos] = torch.from_numpy(conf[sl]).to(dev)
            weighted = hp * cp[:, :, None]
            a = weighted.transpose(1, 2) @ hp + self._gram + lam[lo:hi, None, None] * eye
            out[lo:hi] = torch.linalg.solve(a, weighted.sum(1))
            lo = hi
        return out

    def _score(self, profiles: Profiles) -> torch.Tensor:
        return self.user_vectors(profiles) @ self.item_vectors.to(self._device).T

    def _item_similarity(self, code: int) -> torch.Tensor:
        h = torch.nn.functional.normalize(self.item_vectors.to(self._device), dim=1)
        return h @ h[code]

    def params(self) -> dict:
        return {"dim": self.dim, "alpha0": self.alpha0, "reg": self.reg, "nu": self.nu,
                "iterations": self.iterations, "cg_steps": self.cg_steps, **super().params()}

    def _state(self) -> dict:
        return {"item_vectors": self.item_vectors}

    def _restore(self, state: dict) -> None:
        self.item_vectors = state["item_vectors"]
        self._gram = None


class _Rows:
    """Weighted (row, col) pairs sorted by row, kept as CSR so that ``sum_j v_rj y_j`` is one sparse product.

    A CSR product runs row by row, so the result does not depend on thread timing (unlike a
    scatter-add on a GPU): the same seed gives the same vectors on CUDA too.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, conf: np.ndarray, n_rows: int, device: torch.device):
        self.n_rows = n_rows
        self.cols = torch.from_numpy(cols.astype("int64")).to(device)
        self.conf = torch.from_numpy(conf.astype("float32")).to(device)
        self.crow = torch.from_numpy(np.searchsorted(rows, np.arange(n_rows + 1)).astype("int64")).to(device)
        self.totals = torch.from_numpy(np.bincount(rows, weights=conf, minlength=n_rows).astype("float32")).to(device)

    def dots(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[nnz]``: ``x[row] . y[col]`` of every pair, without forming the ``[nnz, dim]`` operands."""
        if not len(self.cols):
            return torch.zeros(0, device=x.device)
        pattern = self._csr(self.conf, y.shape[0])
        return torch.sparse.sampled_addmm(pattern, x, y.T, beta=0.0).values()

    def matmul(self, values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[n_rows, dim]``: for each row, the ``values``-weighted sum of ``y[col]``."""
        if not len(values):
            return torch.zeros(self.n_rows, y.shape[1], device=y.device)
        return self._csr(values, y.shape[0]) @ y

    def _csr(self, values: torch.Tensor, n_cols: int) -> torch.Tensor:
        """The pairs as a CSR matrix (built from sorted, in-range indices: torch's invariant check is not needed)."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values, (self.n_rows, n_cols), check_invariants=False)
