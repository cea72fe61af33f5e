"""Matrix factorisation trained with Bayesian Personalized Ranking (BPR).

Reference:
    Steffen Rendle, Christoph Freudenthaler, Zeno Gantner, Lars Schmidt-Thieme.
    "BPR: Bayesian Personalized Ranking from Implicit Feedback." UAI 2009.
    https://arxiv.org/abs/1205.2618

The score of item ``i`` for user ``u`` is ``x_ui = <p_u, q_i> + b_i``. Training maximises
``ln sigmoid(x_ui - x_uj)`` over triples of a user, an item they interacted with (``i``) and a
uniformly sampled item (``j``), with L2 regularisation of the embeddings and biases of each
batch (coefficient ``weight_decay``). Every epoch shuffles all distinct ``(user, item)``
pairs, draws one negative per pair (re-drawn once when it hits one of the user's own items)
and takes minibatch Adam steps. A pair's term in the loss is weighted by ``log1p`` of its
summed interaction ``weight`` (normalised to mean 1), so a purchase counts more than a view
without letting heavy repeat-viewers dominate.

Cold users are served from their session: the mean of the embeddings of their recent items
(newest weighted most) stands in for ``p_u``. An empty or unknown session falls back to the
items' (weighted) popularity in the training data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipelines.models import register
from pipelines.models.base import IndexedRecommender, Scored
from pipelines.models.popularity import encode, interaction_weights, item_popularity

log = logging.getLogger(__name__)

#: weight of the item at position ``n`` (0 = newest) of a session: ``SESSION_DECAY ** n``
SESSION_DECAY = 0.8
_CHUNK = 1024  # users scored per matmul in recommend_scored
_STATE_FILE = "bpr.pt"
_IDS_FILE = "bpr_ids.json"


def _resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; a requested but missing cuda also gives cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %r requested but CUDA is not available; using cpu", device)
        return torch.device("cpu")
    return dev


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten the CSR rows ``rows`` into coordinate form.

    Returns:
        ``(r, c)``: int64 arrays ``[nnz_selected]``; ``r`` indexes into ``rows`` (0..len(rows)-1),
        ``c`` holds the column (item) indices.
    """
    starts, ends = indptr[rows], indptr[rows + 1]
    counts = ends - starts
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype="int64"), np.zeros(0, dtype="int64")
    r = np.repeat(np.arange(len(rows), dtype="int64"), counts)
    offsets = np.arange(total, dtype="int64") - np.repeat(np.cumsum(counts) - counts, counts)
    return r, indices[np.repeat(starts, counts) + offsets]


@register
class BPR(IndexedRecommender):
    """Matrix factorisation with an item bias, trained with BPR in torch.

    Args:
        dim: embedding size.
        epochs: passes over all distinct (user, item) pairs.
        lr: Adam learning rate.
        weight_decay: L2 coefficient on the embeddings and biases of each batch.
        batch_size: (user, positive, negative) triples per Adam step.
        seed: seeds the initialisation (torch Generator) and the shuffling and negative
            sampling (numpy Generator); on CPU two fits with one seed give identical models.
        device: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Attributes:
        user_emb: float32 ``[n_users, dim]``.
        item_emb: float32 ``[n_items, dim]``.
        item_bias: float32 ``[n_items]``.
        popularity: float32 ``[n_items]``, summed interaction weight (the cold-start fallback).
    """

    name = "bpr"

    def __init__(self, dim: int = 64, epochs: int = 15, lr: float = 0.01, weight_decay: float = 1e-5,
                 batch_size: int = 4096, seed: int = 2020, device: str = "auto"):
        self.dim = int(dim)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = device
        self._device = _resolve_device(device)
        self._set_ids([], [])
        self.user_emb = torch.zeros(0, self.dim, device=self._device)
        self.item_emb = torch.zeros(0, self.dim, device=self._device)
        self.item_bias = torch.zeros(0, device=self._device)
        self.popularity = torch.zeros(0, device=self._device)
        self._indptr = np.zeros(1, dtype="int64")
        self._indices = np.zeros(0, dtype="int64")

    def _set_ids(self, users: list[str], items: list[str]) -> None:
        self._user_ids = list(users)
        self._item_ids = list(items)
        self._user_index = {u: n for n, u in enumerate(self._user_ids)}
        self._item_index = {it: n for n, it in enumerate(self._item_ids)}

    # --- training ----------------------------------------------------------------
    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> BPR:
        """Train on ``interactions`` (``user_id, item_id, ts[, weight]``); ``items`` is ignored.

        Raises:
            ValueError: when there are no interactions.
        """
        if interactions.empty:
            raise ValueError("no interactions to fit on")
        t0 = time.perf_counter()
        users, item_ids, ucodes, icodes = encode(interactions)
        n_users, n_items = len(users), len(item_ids)
        w = interaction_weights(interactions)

        # distinct (user, item) pairs, sorted by user then item: they are also the CSR of seen items
        keys, inverse = np.unique(ucodes * n_items + icodes, return_inverse=True)
        pair_w = np.log1p(np.maximum(np.bincount(inverse.ravel(), weights=w), 0.0))
        pair_w = pair_w / pair_w.mean() if pair_w.mean() > 0 else np.ones_like(pair_w)
        pair_u, pair_i = keys // n_items, keys % n_items
        self._indptr = np.zeros(n_users + 1, dtype="int64")
        np.cumsum(np.bincount(pair_u, minlength=n_users), out=self._indptr[1:])
        self._indices = pair_i.astype("int64")
        self._set_ids(users, item_ids)

        dev = self._device
        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        P = torch.empty(n_users, self.dim).normal_(0.0, 0.1, generator=gen).to(dev).requires_grad_()
        Q = torch.empty(n_items, self.dim).normal_(0.0, 0.1, generator=gen).to(dev).requires_grad_()
        b = torch.zeros(n_items, device=dev, requires_grad=True)
        opt = torch.optim.Adam([P, Q, b], lr=self.lr)
        n, bs, reg = len(keys), self.batch_size, self.weight_decay
        for epoch in range(1, self.epochs + 1):
            perm = rng.permutation(n)
            u_np, i_np = pair_u[perm], pair_i[perm]
            neg = rng.integers(0, n_items, size=n)
            if n_items > 1:  # re-draw, once, the negatives that are the user's own items
                hit = np.isin(u_np * n_items + neg, keys, assume_unique=False)
                neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
            u_t = torch.from_numpy(u_np).to(dev)
            i_t = torch.from_numpy(i_np).to(dev)
            j_t = torch.from_numpy(neg).to(dev)
            w_t = torch.from_numpy(pair_w[perm].astype("float32")).to(dev)
            total = torch.zeros((), device=dev)
            for start in range(0, n, bs):
                ub, ib, jb = u_t[start:start + bs], i_t[start:start + bs], j_t[start:start + bs]
                # F.embedding, not P[ub]: its backward sums each row's gradients in a fixed order (indexing's
                # accumulates in thread order on CPU, so two fits differed in the low bits)
                pu, qi, qj = F.embedding(ub, P), F.embedding(ib, Q), F.embedding(jb, Q)
                bi, bj = F.embedding(ib, b[:, None])[:, 0], F.embedding(jb, b[:, None])[:, 0]
                x = (pu * (qi - qj)).sum(dim=1) + bi - bj  # [B]
                rank_loss = -(w_t[start:start + bs] * F.logsigmoid(x)).sum()
                l2 = reg * (pu.square().sum() + qi.square().sum() + qj.square().sum()
                            + bi.square().sum() + bj.square().sum())
                loss = (rank_loss + l2) / len(ub)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += rank_loss.detach()
            log.info("bpr epoch %d/%d: loss %.4f, %.1fs", epoch, self.epochs, float(total) / n,
                     time.perf_counter() - t0)

        self.user_emb = P.detach().clone()
        self.item_emb = Q.detach().clone()
        self.item_bias = b.detach().clone()
        self.popularity = torch.from_numpy(item_popularity(icodes, w, n_items).astype("float32")).to(dev)
        log.info("bpr fitted %d users x %d items (%d pairs) in %.1fs on %s", n_users, n_items, n,
                 time.perf_counter() - t0, dev)
        return self

    # --- vectors and scoring ---------------------------------------------------------
    def user_vector(self, user_id: str) -> torch.Tensor | None:
        """The embedding ``[dim]`` of a known user, else ``None``."""
        u = self._user_index.get(str(user_id))
        return None if u is None else self.user_emb[u]

    def session_vector(self, items: Sequence[str]) -> torch.Tensor | None:
        """Weighted mean ``[dim]`` of the embeddings of the known items of a session.

        Args:
            items: item ids, newest first; the item at position ``n`` weighs ``0.8 ** n``
                (positions count unknown items too).

        Returns:
            The vector, or ``None`` when no item of the session is known.
        """
        pos_codes = [(p, self._item_index[str(i)]) for p, i in enumerate(items) if str(i) in self._item_index]
        if not pos_codes:
            return None
        pos, codes = zip(*pos_codes)
        w = torch.tensor([SESSION_DECAY ** p for p in pos], dtype=torch.float32, device=self._device)
        emb = self.item_emb[torch.tensor(codes, device=self._device)]  # [n, dim]
        return (w[:, None] * emb).sum(dim=0) / w.sum()

    @torch.inference_mode()
    def _topk(self, vectors: torch.Tensor, k: int, rows: np.ndarray, cols: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B, k']`` and item indices ``[B, k']`` (on cpu) for user vectors ``[B, dim]``.

        ``(rows[n], cols[n])`` are masked to ``-inf``; ``k' = min(k, n_items)``.
        """
        vectors = vectors.to(self._device, torch.float32)
        if vectors.dim() == 1:
            vectors = vectors[None]
        kk = max(0, min(k, len(self._item_ids)))
        if kk == 0 or vectors.shape[0] == 0:
            empty = torch.zeros(vectors.shape[0], 0)
            return empty, empty.long()
        scores = vectors @ self.item_emb.T + self.item_bias  # [B, n_items]
        if len(rows):
            scores[torch.from_numpy(rows).to(self._device), torch.from_numpy(cols).to(self._device)] = float("-inf")
        top_s, top_i = torch.topk(scores, kk, dim=1)
        return top_s.cpu(), top_i.cpu()

    def score_users(self, user_vectors: torch.Tensor, k: int, exclude: list[list[int]] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items for a batch of user vectors.

        Args:
            user_vectors: float ``[B, dim]`` (e.g. from :meth:`user_vector` / :meth:`session_vector`).
            k: list length; capped at the number of items.
            exclude: per row, item indices (into :attr:`item_ids`) that must not be returned.

        Returns:
            ``(scores, indices)``, both ``[B, min(k, n_items)]`` on cpu, best first. When fewer
            than k items remain after ``exclude``, the tail holds excluded items with score ``-inf``.
        """
        if exclude:
            rows = np.array([r for r, ex in enumerate(exclude) for _ in ex], dtype="int64")
            cols = np.array([c for ex in exclude for c in ex], dtype="int64")
        else:
            rows = cols = np.zeros(0, dtype="int64")
        return self._topk(user_vectors, k, rows, cols)

    def _to_scored(self, scores: torch.Tensor, indices: torch.Tensor) -> list[Scored]:
        ids = self._item_ids
        return [[(ids[i], s) for s, i in zip(srow, irow) if s != float("-inf")]
                for srow, irow in zip(scores.tolist(), indices.tolist())]

    # --- recommending --------------------------------------------------------------
    def recommend_scored(self, user_ids: Sequence[str], k: int, exclude_seen: bool = True) -> list[Scored]:
        """Top-k ``(item_id, score)`` per user from one matmul per chunk of users; unknown users get ``[]``."""
        out: list[Scored] = [[] for _ in user_ids]
        known = [(p, self._user_index[str(u)]) for p, u in enumerate(user_ids) if str(u) in self._user_index]
        for start in range(0, len(known), _CHUNK):
            chunk = known[start:start + _CHUNK]
            pos = [p for p, _ in chunk]
            codes = np.array([c for _, c in chunk], dtype="int64")
            if exclude_seen:
                rows, cols = _csr_rows(self._indptr, self._indices, codes)
            else:
                rows = cols = np.zeros(0, dtype="int64")
            vecs = self.user_emb[torch.from_numpy(codes).to(self._device)]
            for p, row in zip(pos, self._to_scored(*self._topk(vecs, k, rows, cols))):
                out[p] = row
        return out

    def recommend_session_scored(self, recent_item_ids: Sequence[str], k: int) -> Scored:
        """Top-k for a cold user from their recent items (newest first); session items are excluded.

        An empty or unknown session gives the most popular items of the training data.
        """
        vec = self.session_vector(recent_item_ids)
        if vec is None:  # no known item in the session (so nothing to exclude): popular items
            if k <= 0 or not self._item_ids:
                return []
            s, i = torch.topk(self.popularity, min(k, len(self._item_ids)))
            return self._to_scored(s[None].cpu(), i[None].cpu())[0]
        cols = np.array(sorted({self._item_index[str(i)] for i in recent_item_ids if str(i) in self._item_index}),
                        dtype="int64")
        return self._to_scored(*self._topk(vec[None], k, np.zeros(len(cols), dtype="int64"), cols))[0]

    @torch.inference_mode()
    def similar_items(self, item_id: str, k: int) -> list[str]:
        """The k items with the highest cosine similarity of embeddings (``[]`` for an unknown item)."""
        code = self._item_index.get(str(item_id))
        if code is None or k <= 0:
            return []
        normed = F.normalize(self.item_emb, dim=1)  # [n_items, dim]
        sims = normed @ normed[code]  # [n_items]
        sims[code] = float("-inf")
        kk = min(k, len(self._item_ids) - 1)
        if kk <= 0:
            return []
        return [self._item_ids[i] for i in torch.topk(sims, kk).indices.tolist()]

    # --- introspection -----------------------------------------------------------
    def params(self) -> dict:
        return {"dim": self.dim, "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "seed": self.seed, "device": self.device}

    # --- persistence -----------------------------------------------------------------
    def _save(self, path: Path) -> None:
        torch.save({
            "user_emb": self.user_emb.cpu(), "item_emb": self.item_emb.cpu(), "item_bias": self.item_bias.cpu(),
            "popularity": self.popularity.cpu(), "seen_indptr": torch.from_numpy(self._indptr),
            "seen_indices": torch.from_numpy(self._indices),
        }, path / _STATE_FILE)
        (path / _IDS_FILE).write_text(json.dumps({"users": self._user_ids, "items": self._item_ids}))

    @classmethod
    def _load(cls, path: Path, params: dict) -> BPR:
        model = cls(**params)
        state = torch.load(path / _STATE_FILE, map_location=model._device, weights_only=True)
        ids = json.loads((path / _IDS_FILE).read_text())
        model._set_ids(ids["users"], ids["items"])
        model.user_emb = state["user_emb"]
        model.item_emb = state["item_emb"]
        model.item_bias = state["item_bias"]
        model.popularity = state["popularity"]
        model._indptr = state["seen_indptr"].cpu().numpy()
        model._indices = state["seen_indices"].cpu().numpy()
        return model
