"""Two-tower embedding model with a content-aware item tower, trained with a softmax over items.

References:
    Dawen Liang et al. "Variational Autoencoders for Collaborative Filtering." WWW 2018 (the
    multinomial likelihood over all items, with the input history dropped out: Mult-DAE).
    Xinyang Yi et al. "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations." RecSys 2019 (two towers, sampled softmax).

Item tower: ``v_i = e_i + W c_i`` with ``e_i`` an id embedding (dropped out during training with
probability ``id_dropout`` so the content part learns to stand alone) and ``c_i`` the mean of
the embeddings of the item's content tokens (:mod:`pipelines.models.content`: category, brand,
price band, title words). A product nobody has clicked has ``e_i = 0``: its embedding comes from
content alone. User tower: ``u = p_u + A mean(v_j for j in the profile)``; a user the model has
not seen has ``p_u = 0``, so the session alone places them. Training takes batches of users,
drops half of each history from the input and maximises the log-likelihood of the whole history
under ``softmax(u . v / temperature)`` over all items, or, above ``full_softmax_max`` items, over
the batch's items plus ``n_negatives`` uniformly sampled ones. An id table with more than
``dense_id_max`` rows gets sparse gradients and lazy Adam (:class:`torch.optim.SparseAdam`: only the
rows a step reads move), so a step costs the batch, not the catalog.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models import register
from pipelines.models.content import ContentFeatures, catalog_token_bags
from pipelines.models.scoring import Profiles, ScoringRecommender

log = logging.getLogger(__name__)


class _Towers(nn.Module):
    def __init__(self, n_users: int, n_items: int, n_tokens: int, dim: int, gen: torch.Generator):
        super().__init__()
        self.user = nn.Parameter(torch.empty(n_users, dim).normal_(0, 0.01, generator=gen))
        self.item = nn.Parameter(torch.empty(n_items, dim).normal_(0, 0.01, generator=gen))
        self.token = nn.Parameter(torch.empty(max(n_tokens, 1), dim).normal_(0, 0.1, generator=gen))
        self.content = nn.Linear(dim, dim, bias=False)
        self.context = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.content.weight.copy_(torch.eye(dim) + 0.01 * torch.randn(dim, dim, generator=gen))
            self.context.weight.copy_(torch.eye(dim) + 0.01 * torch.randn(dim, dim, generator=gen))


@register
class TwoTower(ScoringRecommender):
    """Embedding model whose item tower reads content features.

    Args:
        dim: embedding size.
        epochs: passes over all users.
        lr: Adam learning rate.
        weight_decay: L2 coefficient (Adam ``weight_decay``).
        batch_size: interactions per training step (users per step = batch_size / mean history).
        temperature: softmax temperature.
        input_dropout: share of each history hidden from the user tower during training.
        id_dropout: probability that an item's id embedding is dropped in a step (content only).
        n_negatives: sampled items per step when the catalog exceeds ``full_softmax_max``.
        full_softmax_max: largest catalog trained with the softmax over every item.
        user_embedding: learn ``p_u`` per user (off: users are their profile only, as in Mult-DAE).
        seed, device, session_weight: see :class:`~pipelines.models.scoring.ScoringRecommender`.
    """

    name = "twotower"
    #: largest id table (user or item rows) trained with dense gradients and Adam. Adam rewrites every
    #: row of a dense table and its moments every step, read or not: on the 1M-item shop of ``bench gpu``
    #: a step took 0.59 s on 2 CPU cores. A larger table gets sparse gradients and SparseAdam, which moves
    #: only the rows the step read (0.035 s a step; L2 likewise lazily); smaller ones train as before.
    dense_id_max: int = 100_000

    def __init__(self, dim: int = 64, epochs: int = 30, lr: float = 0.005, weight_decay: float = 0.0,
                 batch_size: int = 4096, temperature: float = 0.2, input_dropout: float = 0.5,
                 id_dropout: float = 0.3, n_negatives: int = 4096, full_softmax_max: int = 8192,
                 user_embedding: bool = True, seed: int = 2020, device: str = "auto", session_weight: float = 1.0):
        super().__init__(seed=seed, device=device, session_weight=session_weight)
        self.dim, self.epochs, self.lr, self.weight_decay = int(dim), int(epochs), float(lr), float(weight_decay)
        self.batch_size, self.temperature = int(batch_size), float(temperature)
        self.input_dropout, self.id_dropout = float(input_dropout), float(id_dropout)
        self.n_negatives, self.full_softmax_max = int(n_negatives), int(full_softmax_max)
        self.user_embedding = bool(user_embedding)
        self.content = ContentFeatures()
        self.user_emb = torch.zeros(0, self.dim)
        self.item_emb = torch.zeros(0, self.dim)  # final item vectors [n_items, dim]
        self.context_w = torch.eye(self.dim)
        self._content_part = torch.zeros(0, self.dim)  # content-only item vectors [n_items, dim]
        self._token_emb = torch.zeros(0, self.dim)
        self._content_w = torch.eye(self.dim)

    # --- training ----------------------------------------------------------------
    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> TwoTower:
        """Train both towers; ``items`` (the catalog) feeds the item tower's content features."""
        t0 = time.perf_counter()
        self._index(interactions, items)
        dev, n_users, n_items = self._device, len(self._user_ids), len(self._item_ids)
        tokens, offsets = self._catalog_tokens(items)
        tok_t, off_t = torch.from_numpy(tokens).to(dev), torch.from_numpy(offsets).to(dev)
        len_t = _bag_lengths(off_t, len(tokens))  # once: a step then costs its own items, not the catalog
        gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        net = _Towers(n_users, n_items, len(self.content.vocab), self.dim, gen).to(dev)
        big = {"item": n_items > self.dense_id_max, "user": n_users > self.dense_id_max}
        sparse = [p for name, p in (("item", net.item), ("user", net.user)) if big[name]]
        opts = [torch.optim.Adam([p for p in net.parameters() if all(p is not q for q in sparse)],
                                 lr=self.lr, weight_decay=self.weight_decay)]
        if sparse:
            opts.append(torch.optim.SparseAdam(sparse, lr=self.lr))
            log.info("twotower: sparse gradients and SparseAdam for the id tables over %d rows: %s",
                     self.dense_id_max, ", ".join(name for name, b in big.items() if b))
        indptr, indices = self._indptr, self._indices
        lengths = np.diff(indptr)
        users_per_step = max(8, int(self.batch_size / max(lengths.mean(), 1.0)))
        full = n_items <= self.full_softmax_max
        has_content = len(tokens) > 0

        def item_vectors(codes: torch.Tensor, drop_ids: bool) -> torch.Tensor:
            # F.embedding, not net.item[codes]: its backward sums each row's gradients in a fixed order
            # (indexing's accumulates in thread order on CPU, so two fits differed in the low bits)
            vec = F.embedding(codes, net.item, sparse=big["item"])
            if drop_ids and self.id_dropout > 0:
                keep = (torch.rand(len(codes), 1, device=dev) >= self.id_dropout).float()
                vec = vec * keep
            if has_content:
                bag_tokens, bag_offsets = _gather_bags(tok_t, off_t, len_t, codes)
                bag = F.embedding_bag(bag_tokens, net.token, bag_offsets, mode="mean")
                vec = vec + net.content(bag)
            return vec

        torch.manual_seed(self.seed)
        self.history = {"train_loss": []}  # per epoch; training logs it to MLflow as a metric per step
        for epoch in range(1, self.epochs + 1):
            order = rng.permutation(n_users)
            total = 0.0
            for start in range(0, n_users, users_per_step):
                ub = order[start:start + users_per_step]
                starts, counts = indptr[ub], lengths[ub]
                rows = np.repeat(np.arange(len(ub)), counts)
                cols = indices[np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))]
                keep = rng.random(len(cols)) >= self.input_dropout
                if full:
                    cand = torch.arange(n_items, device=dev)
                    target_cols = torch.from_numpy(cols).to(dev)
                else:
                    cand_np, inv = np.unique(np.concatenate([cols, rng.integers(0, n_items, self.n_negatives)]),
                                             return_inverse=True)
                    cand = torch.from_numpy(cand_np).to(dev)
                    target_cols = torch.from_numpy(inv[:len(cols)]).to(dev)
                v_cand = item_vectors(cand, drop_ids=True)  # [C, dim]
                # the user tower reads the kept part of the history
                kr, kc = rows[keep], cols[keep]
                v_in = item_vectors(torch.from_numpy(kc).to(dev), drop_ids=True)
                bag = torch.zeros(len(ub), self.dim, device=dev).index_add_(0, torch.from_numpy(kr).to(dev), v_in)
                n_in = torch.from_numpy(np.bincount(kr, minlength=len(ub)).astype("float32")).to(dev).clamp_min(1)
                u = net.context(bag / n_in[:, None])
                if self.user_embedding:
                    ub_t = torch.from_numpy(ub).to(dev)
                    u = u + F.embedding(ub_t, net.user, sparse=big["user"])
                logp = F.log_softmax(u @ v_cand.T / self.temperature, dim=1)  # [B, C]
                loss = -logp[torch.from_numpy(rows).to(dev), target_cols].sum() / len(ub)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                if sparse and self.weight_decay:
                    _decay_read_rows(sparse, self.weight_decay)
                for opt in opts:
                    opt.step()
                total = total + loss.detach() * len(ub)  # a tensor: no GPU sync per step
            epoch_loss = float(total) / n_users
            self.history["train_loss"].append(epoch_loss)
            log.info("twotower epoch %d/%d: loss %.4f, %.1fs", epoch, self.epochs, epoch_loss,
                     time.perf_counter() - t0)

        with torch.no_grad():
            item = net.item.detach().clone()
            item[self._n_warm:] = 0.0  # never trained: their embedding is their content
            self._token_emb = net.token.detach().clone()
            self._content_w = net.content.weight.detach().clone()
            self._content_part = self._content_vectors(tok_t, off_t, n_items)
            self.item_emb = item + self._content_part
            self.user_emb = net.user.detach().clone() * float(self.user_embedding)
            self.context_w = net.context.weight.detach().clone()
        log.info("twotower fitted %d users x %d items (%d content tokens) in %.1fs on %s", n_users, n_items,
                 len(self.content.vocab), time.perf_counter() - t0, dev)
        return self

    def _catalog_tokens(self, items: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
        """Token bags in item index order (no catalog: no tokens)."""
        self.content, tokens, offsets = catalog_token_bags(items, self._item_ids)
        return tokens, offsets

    def _content_vectors(self, tokens: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        if not len(tokens) or not len(self._token_emb):
            return torch.zeros(n, self.dim, device=self._device)
        bag = F.embedding_bag(tokens, self._token_emb, offsets, mode="mean")
        return bag @ self._content_w.T

    def content_embedding(self, items: pd.DataFrame) -> torch.Tensor:
        """Content-only item vectors ``[len(items), dim]`` for catalog rows (e.g. products added after training)."""
        tokens, offsets = self.content.transform(items)
        return self._content_vectors(torch.from_numpy(tokens).to(self._device),
                                     torch.from_numpy(offsets).to(self._device), len(items))

    # --- scoring -----------------------------------------------------------------------
    def user_vectors(self, profiles: Profiles) -> torch.Tensor:
        """``[B, dim]``: ``p_u`` (known users) plus the projected weighted mean of the profile's items."""
        dev = self._device
        bag = torch.zeros(profiles.n_rows, self.dim, device=dev)
        if len(profiles.rows):
            rows = torch.from_numpy(profiles.rows).to(dev)
            w = torch.from_numpy(profiles.weights.astype("float32")).to(dev)
            bag.index_add_(0, rows, self.item_emb[torch.from_numpy(profiles.items).to(dev)] * w[:, None])
            tot = torch.zeros(profiles.n_rows, device=dev).index_add_(0, rows, w).clamp_min(1e-12)
            bag = bag / tot[:, None]
        u = bag @ self.context_w.T
        known = torch.from_numpy(profiles.user_codes).to(dev)
        mask = known >= 0
        if mask.any():
            u[mask] = u[mask] + self.user_emb[known[mask]]
        return u

    def _score(self, profiles: Profiles) -> torch.Tensor:
        return self.user_vectors(profiles) @ self.item_emb.T

    def score_candidates(self, profiles: Profiles, item_vectors: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, C]`` of arbitrary item vectors ``[C, dim]`` (e.g. :meth:`content_embedding`)."""
        return self.user_vectors(profiles) @ item_vectors.T

    def _item_similarity(self, code: int) -> torch.Tensor:
        normed = F.normalize(self.item_emb, dim=1)
        return normed @ normed[code]

    @torch.inference_mode()
    def content_neighbours(self, items: pd.DataFrame, k: int) -> list[list[str]]:
        """For catalog rows the model has never seen, the ``k`` items with interactions nearest to each by content.

        The cosine between the row's content-only vector (:meth:`content_embedding`) and the trained
        items' vectors, the same space a new item is scored in. What a product added after training
        stands for: its similar items, and the stand-ins for a click on it. A row none of whose content
        tokens the model knows (or a model fitted without a catalog) gets ``[]``.
        """
        n_warm = self._n_warm
        if not len(items) or k <= 0 or not n_warm:
            return [[] for _ in range(len(items))]
        vectors = self.content_embedding(items)
        described = (vectors.norm(dim=1) > 1e-12).cpu().tolist()  # no content token the model knows: nothing to say
        sims = F.normalize(vectors, dim=1) @ F.normalize(self.item_emb[:n_warm], dim=1).T
        top = torch.topk(sims, min(k, n_warm), dim=1).indices.cpu().tolist()
        return [[self._item_ids[i] for i in row] if ok else [] for row, ok in zip(top, described)]

    def params(self) -> dict:
        return {"dim": self.dim, "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "temperature": self.temperature,
                "input_dropout": self.input_dropout, "id_dropout": self.id_dropout,
                "n_negatives": self.n_negatives, "full_softmax_max": self.full_softmax_max,
                "user_embedding": self.user_embedding, **super().params()}

    def _state(self) -> dict:
        return {"user_emb": self.user_emb, "item_emb": self.item_emb, "context_w": self.context_w,
                "content_part": self._content_part, "token_emb": self._token_emb, "content_w": self._content_w,
                "content": self.content.state()}

    def _restore(self, state: dict) -> None:
        self.user_emb, self.item_emb, self.context_w = state["user_emb"], state["item_emb"], state["context_w"]
        self._content_part, self._token_emb = state["content_part"], state["token_emb"]
        self._content_w = state["content_w"]
        self.content = ContentFeatures.from_state(state["content"])


def _decay_read_rows(params: list[nn.Parameter], weight_decay: float) -> None:
    """Adam's ``weight_decay`` (L2 added to the gradient) on the rows of sparse-gradient ``params`` that a step read."""
    for p in params:
        if p.grad is not None:
            g = p.grad.coalesce()  # one row per index: each read row decays once
            g.values().add_(p.detach()[g.indices()[0]], alpha=weight_decay)
            p.grad = g


def _bag_lengths(offsets: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """int64 ``[n_items]``: the number of tokens in each item's bag (``offsets`` as :meth:`ContentFeatures.transform`)."""
    ends = torch.cat([offsets[1:], torch.tensor([n_tokens], device=offsets.device)])
    return ends - offsets


def _gather_bags(tokens: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                 codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token bags of items ``codes``: their concatenated tokens and EmbeddingBag offsets into them.

    Args:
        tokens: int64 ``[n_tokens]``, the catalog's bags one after another.
        offsets: int64 ``[n_items]``, where each item's bag starts in ``tokens``.
        lengths: int64 ``[n_items]``, :func:`_bag_lengths`.
        codes: int64 ``[C]``, item rows.
    """
    lengths = lengths[codes]
    bag_offsets = torch.cumsum(lengths, 0) - lengths
    rel = torch.arange(int(lengths.sum()), device=tokens.device) - torch.repeat_interleave(bag_offsets, lengths)
    return tokens[torch.repeat_interleave(offsets[codes], lengths) + rel], bag_offsets
