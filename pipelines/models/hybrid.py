"""``shoprec``, the production hybrid: item-to-item + iALS + content-aware embeddings + trending.

For each request the parts score every item from the same profile (a known user's
training items plus their real-time session, newest click weighted most), each part's scores
are standardised per request (:func:`~pipelines.models.scoring.zscore_rows`) and blended:
``w_itemitem * z(item-item) + w_ials * z(iALS) + w_embed * z(two-tower) + w_pop * z(log trending)``
(iALS, :class:`~pipelines.models.ials.IALS`, folds the profile in at request time). A click
therefore moves the next list at once, without retraining; a brand-new user with no session
gets trending items (the empty-profile fallback); a product with no interaction yet gets its
score from the content half of the item tower (:meth:`ShopRec.rank_new_items` ranks only those,
for the serving layer's exploration slots).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipelines.models import register
from pipelines.models.base import Scored
from pipelines.models.ials import IALS
from pipelines.models.itemitem import ItemItem
from pipelines.models.popularity import interaction_weights, item_popularity
from pipelines.models.scoring import Profiles, ScoringRecommender, row_std_mean, zscore_rows
from pipelines.models.twotower import TwoTower
from pipelines.columns import COL_ITEM

log = logging.getLogger(__name__)


#: what a hybrid saved before interaction strength and the iALS part was fitted with
_BEFORE_WEIGHTS_AND_IALS = {"weight_power": 0.0, "ials_dim": 0, "w_ials": 0.0}


@register
class ShopRec(ScoringRecommender):
    """The blend of :class:`ItemItem`, :class:`IALS`, :class:`TwoTower` and time-decayed popularity.

    Args:
        dim, epochs, lr, weight_decay, batch_size, seed, device: the embedding part's training
            (the keys of ``TrainConfig``).
        l2, neighbours, dense_max_items, content_weight, weight_power, weight_cap: the item-to-item
            part (see :class:`ItemItem`).
        ials_dim, ials_alpha0, ials_reg, ials_iterations: the iALS part (see :class:`IALS`;
            ``ials_dim=0`` leaves it out).
        w_itemitem, w_ials, w_embed, w_pop: blend weights.
        half_life_days: decay of the trending part (``None``: plain popularity).
        session_weight: weight of the newest session item relative to a training item.
        temperature, id_dropout, user_embedding: see :class:`TwoTower`.
    """

    name = "shoprec"

    def __init__(self, dim: int = 64, epochs: int = 20, lr: float = 0.005, weight_decay: float = 0.0,
                 batch_size: int = 4096, seed: int = 2020, device: str = "auto",
                 l2: float = 300.0, neighbours: int = 1000, dense_max_items: int = 6000, content_weight: float = 3.0,
                 weight_power: float = 0.5, weight_cap: float = 5.0,
                 ials_dim: int = 64, ials_alpha0: float = 0.1, ials_reg: float = 0.03, ials_iterations: int = 10,
                 w_itemitem: float = 1.0, w_ials: float = 0.25, w_embed: float = 0.5, w_pop: float = 0.05,
                 half_life_days: float | None = 7.0, session_weight: float = 2.0,
                 temperature: float = 0.2, id_dropout: float = 0.3, user_embedding: bool = False):
        super().__init__(seed=seed, device=device, session_weight=session_weight)
        self.w_itemitem, self.w_embed, self.w_pop = float(w_itemitem), float(w_embed), float(w_pop)
        self.w_ials = float(w_ials)
        self.half_life_days = None if half_life_days is None else float(half_life_days)
        self.itemitem = ItemItem(l2=l2, neighbours=neighbours, dense_max_items=dense_max_items,
                                 content_weight=content_weight, weight_power=weight_power,
                                 weight_cap=weight_cap, seed=seed, device=device, session_weight=session_weight)
        self.ials: IALS | None = IALS(dim=ials_dim, alpha0=ials_alpha0, reg=ials_reg, iterations=ials_iterations,
                                      seed=seed, device=device, session_weight=session_weight) if ials_dim > 0 else None
        self.embed = TwoTower(dim=dim, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                              seed=seed, device=device, session_weight=session_weight, temperature=temperature,
                              id_dropout=id_dropout, user_embedding=user_embedding)
        self.trending = np.zeros(0, dtype="float64")
        self.fit_seconds: dict[str, float] = {}
        self._item_moments: dict[str, tuple] = {}  # per factor part: (item matrix, mean, second moment)
        self._stacked: tuple | None = None  # (the factor parts' item matrices, their stacked transpose)
        self._product_dtype = torch.float32  # of the factor parts' item product (see set_product_dtype)
        self._catalog_vectors: tuple | None = None  # (catalog frame, its ids, their content vectors): rank_new_items

    @property
    def trending(self) -> np.ndarray:
        """Time-decayed popularity per item row (set by fit, refresh and load)."""
        return self._trending

    @trending.setter
    def trending(self, value: np.ndarray) -> None:
        self._trending = value
        self._trend_z: torch.Tensor | None = None  # its standardised log, computed once per value

    def _trend_scores(self) -> torch.Tensor:
        """``[n_items]``: the trending part's standardised scores (the same for every request)."""
        if self._trend_z is None:
            trend = torch.from_numpy(np.log1p(self._trending).astype("float32")).to(self._device)
            self._trend_z = zscore_rows(trend[None])[0]
        return self._trend_z

    def fit(self, interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> ShopRec:
        """Fit the learned parts and the trending scores on the same item index."""
        _, icodes, _ = self._index(interactions, items)
        t0 = time.perf_counter()
        self.itemitem.fit(interactions, items)
        t1 = time.perf_counter()
        self.embed.fit(interactions, items)
        t2 = time.perf_counter()
        if self.ials is not None:
            self.ials.fit(interactions, items)
        t3 = time.perf_counter()
        self.fit_seconds = {"itemitem": t1 - t0, "embed": t2 - t1, "ials": t3 - t2}
        self.history = {f"embed_{k}": v for k, v in self.embed.history.items()}
        parts = [self.itemitem, self.embed] + ([self.ials] if self.ials is not None else [])
        if any(p.item_ids != self._item_ids for p in parts):
            raise RuntimeError("the parts of the hybrid indexed items differently")
        w = interaction_weights(interactions, self.half_life_days)
        self.trending = item_popularity(icodes, w, len(self._item_ids))
        log.info("shoprec fitted in %.1fs (item-item %.1fs, embeddings %.1fs, ials %.1fs)", t3 - t0, t1 - t0,
                 t2 - t1, t3 - t2)
        return self

    def refresh(self, interactions: pd.DataFrame) -> dict[str, float]:
        """The hourly incremental refresh: new item-to-item neighbours and trending, same embeddings and iALS.

        ``interactions`` is the recent window (the same columns as :meth:`fit`). The item index,
        the embeddings and the known users stay as trained, so the refreshed model is a drop-in
        replacement for the one it came from; rows of products the model has never seen are
        dropped (a full retrain picks them up).

        Returns:
            ``{"rows", "dropped_rows", "seconds"}``.
        """
        t0 = time.perf_counter()
        rows = self.itemitem.refit(interactions)
        codes = interactions[COL_ITEM].astype(str).map(self._item_index)
        known = codes.notna().to_numpy()
        w = interaction_weights(interactions[known], self.half_life_days)
        self.trending = item_popularity(codes[known].to_numpy(dtype="int64"), w, len(self._item_ids))
        return {"rows": rows, "dropped_rows": int(len(interactions) - rows), "seconds": time.perf_counter() - t0}

    def part_scores(self, profiles: Profiles, skip_zero: bool = False) -> dict[str, torch.Tensor]:
        """The standardised score matrices ``[B, n_items]`` of each part (for tuning the blend).

        Args:
            skip_zero: leave out the parts whose blend weight is 0 (what scoring needs).
        """
        parts = {k: zscore_rows(f(profiles)) for k, f in self._scorers(skip_zero).items()}
        parts["pop"] = self._trend_scores().expand(profiles.n_rows, -1)
        return parts

    def _scorers(self, skip_zero: bool) -> dict:
        weights = self.blend_weights()
        scorers = {"itemitem": self.itemitem._score, "embed": self.embed._score}
        if self.ials is not None:
            scorers["ials"] = self.ials._score
        return {k: f for k, f in scorers.items() if not (skip_zero and weights[k] == 0.0)}

    def blend_weights(self) -> dict[str, float]:
        """The blend weight of each part (the keys of :meth:`part_scores`)."""
        return {"itemitem": self.w_itemitem, "embed": self.w_embed, "pop": self.w_pop,
                "ials": self.w_ials if self.ials is not None else 0.0}

    def _score(self, profiles: Profiles) -> torch.Tensor:
        """``sum(w_k * zscore(part_k))`` over :meth:`part_scores`: the serving hot path.

        The same blend without a standardised ``[B, n_items]`` temporary per part. The factor parts
        (iALS and the two-tower, whose scores are ``U @ V.T``) are standardised analytically, from each
        user vector and the item matrix's mean and second moment (``O(dim^2)`` per user instead of a pass
        over every item), by scaling the user vectors before their one matrix product, accumulated in
        place; only the item-to-item part is standardised over its row. Equal to the z-scored blend up
        to float rounding.
        """
        weights = self.blend_weights()
        offset = torch.zeros(profiles.n_rows, 1, device=self._device, dtype=torch.float64)
        out: torch.Tensor | None = None
        scaled_parts, mats = [], []
        for name, part, items in self._factor_parts():
            if weights[name] == 0.0:
                continue
            u = part.user_vectors(profiles)
            mean_v, second_v = self._moments(name, items)
            u64 = u.double()
            mean = u64 @ mean_v  # [B]: the mean of the row u @ V.T
            var = ((u64 @ second_v) * u64).sum(1) - mean * mean  # its (population) variance
            n = items.shape[0]
            std = (var.clamp_min(0.0) * (n / max(n - 1, 1))).sqrt()  # torch.std's unbiased estimate
            scale = weights[name] / std.clamp_min(1e-12)
            offset += (mean * scale)[:, None]
            scaled_parts.append(u * scale.to(u.dtype)[:, None])
            mats.append(items)
        if scaled_parts:  # one product over the stacked, pre-transposed item matrices
            items_t = self._stacked_items_t(mats)
            users = torch.cat(scaled_parts, 1)
            out = users @ items_t if items_t.dtype == users.dtype else (users.to(items_t.dtype) @ items_t).float()
        if out is None:
            out = torch.zeros(profiles.n_rows, len(self._item_ids), device=self._device)
        if self.w_itemitem:
            s = self.itemitem._score(profiles)
            std, mean = row_std_mean(s)
            scale = self.w_itemitem / std.clamp_min(1e-12)
            out.addcmul_(s, scale)
            offset += (mean * scale).double()
        out.sub_(offset.to(out.dtype))
        if self.w_pop:
            out.add_(self._trend_scores(), alpha=self.w_pop)
        return out

    def _factor_parts(self) -> list[tuple[str, object, torch.Tensor]]:
        """``(blend name, part, item matrix [n_items, dim])`` of the parts that score ``user_vectors @ items.T``."""
        parts = [("embed", self.embed, self.embed.item_emb)]
        if self.ials is not None:
            parts.append(("ials", self.ials, self.ials.item_vectors.to(self._device)))
        return parts

    def set_product_dtype(self, dtype: torch.dtype) -> None:
        """Run the factor parts' item product in ``dtype`` (``torch.bfloat16`` or ``torch.float32``, the default).

        For serving on hardware with native bfloat16 matrix products (:func:`native_bfloat16`): the
        stacked item matrix is kept in bfloat16 (half the memory to stream per batch) and the product
        is accumulated in float32; standardisation, the item-to-item part and trending stay float32.
        On ml-100k the hybrid's test figures moved by under 0.001 and 99 % of top-10 slots stayed the
        same; on an AVX512-BF16 CPU the product for 64 users over 50,000 items took 6 ms instead of 14.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the item product runs in float32 or bfloat16, not {dtype}")
        self._product_dtype = dtype
        self._stacked = None

    def _stacked_items_t(self, mats: list[torch.Tensor]) -> torch.Tensor:
        """``[sum of dims, n_items]``: the factor parts' item matrices side by side, transposed, contiguous (cached).

        One product over it reads the items once, in the layout the matrix kernel streams fastest:
        for a small serving batch over 50,000 items 1.6x faster than a product per part over
        ``items.T`` views. Costs one more copy of the item vectors (in :meth:`set_product_dtype`'s dtype).
        """
        cached = self._stacked
        if cached is None or len(cached[0]) != len(mats) or any(a is not b for a, b in zip(cached[0], mats)):
            cached = (list(mats), torch.cat(mats, 1).T.contiguous().to(self._product_dtype))
            self._stacked = cached
        return cached[1]

    def _moments(self, name: str, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The item matrix's column mean ``[dim]`` and second moment ``V.T @ V / n`` ``[dim, dim]`` (float64, cached)."""
        cached = self._item_moments.get(name)
        if cached is None or cached[0] is not items:
            v = items.double()
            cached = (items, v.mean(0), (v.T @ v) / max(len(v), 1))
            self._item_moments[name] = cached
        return cached[1], cached[2]

    def _fallback_scores(self) -> np.ndarray:
        """A new user with no session gets trending items."""
        return self.trending

    def _item_similarity(self, code: int) -> torch.Tensor:
        ii = self.itemitem._item_similarity(code).clamp_min(-1e3)
        return zscore_rows(ii[None])[0] + self.w_embed * zscore_rows(self.embed._item_similarity(code)[None])[0]

    # --- new products ---------------------------------------------------------------------
    def content_neighbours(self, items: pd.DataFrame, k: int) -> list[list[str]]:
        """See :meth:`TwoTower.content_neighbours` (the item tower's content half)."""
        return self.embed.content_neighbours(items, k)

    @torch.inference_mode()
    def rank_new_items(self, user_id: str | None, recent_item_ids: Sequence[str], k: int,
                       catalog: pd.DataFrame | None = None) -> Scored:
        """Rank products without interactions for one user/session from their content alone.

        Args:
            user_id: a known user (their training items join the profile) or ``None``/unknown.
            recent_item_ids: the session, newest first.
            k: list length.
            catalog: rows of products added after training (catalog columns); default: the
                catalog items the model saw without interactions (:attr:`new_item_ids`). The content
                vectors of the last frame are kept while the same frame object comes back (a frame
                must not be edited in place after it was passed).

        Returns:
            Top-k ``(item_id, score)`` among those products, best first (the exploration candidates).
            With no profile (an unknown user with no session the model can use) every product scores
            0.0, in the given order: nothing makes one more relevant than another (the exploration
            draw of :func:`pipelines.rules.explore_order` is then uniform).
        """
        cached = None
        if catalog is None:
            ids = self.new_item_ids
        else:  # serving asks with the same frame on every request until its catalog changes (it never edits one)
            cached = self._catalog_vectors
            if cached is None or cached[0] is not catalog:
                cached = self._catalog_vectors = (catalog, [str(i) for i in catalog["item_id"]], None)
            ids = cached[1]
        if not ids or k <= 0:
            return []
        profiles, _ = self.embed._profiles([(user_id, list(recent_item_ids))])
        if not len(profiles.rows):  # nobody to personalise for: no product is more relevant than another
            return [(i, 0.0) for i in ids[:k]]
        if cached is None:
            vectors = self.embed._content_part[self._n_warm:]
        elif cached[2] is None:  # (computed on the first request that needs them)
            vectors = self.embed.content_embedding(catalog)
            self._catalog_vectors = (catalog, ids, vectors)
        else:
            vectors = cached[2]
        scores = self.embed.score_candidates(profiles, vectors)[0]
        top = torch.topk(scores, min(k, len(ids)))
        return [(ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def params(self) -> dict:
        ii, em = self.itemitem, self.embed
        return {"dim": em.dim, "epochs": em.epochs, "lr": em.lr, "weight_decay": em.weight_decay,
                "batch_size": em.batch_size, "seed": self.seed, "device": self.device, "l2": ii.l2,
                "neighbours": ii.neighbours, "dense_max_items": ii.dense_max_items,
                "content_weight": ii.content_weight, "weight_power": ii.weight_power, "weight_cap": ii.weight_cap,
                "ials_dim": self.ials.dim if self.ials is not None else 0,
                **({"ials_alpha0": self.ials.alpha0, "ials_reg": self.ials.reg,
                    "ials_iterations": self.ials.iterations} if self.ials is not None else {}),
                "w_itemitem": self.w_itemitem, "w_ials": self.w_ials, "w_embed": self.w_embed, "w_pop": self.w_pop,
                "half_life_days": self.half_life_days, "session_weight": self.session_weight,
                "temperature": em.temperature, "id_dropout": em.id_dropout,
                "user_embedding": em.user_embedding}

    def _save(self, path: Path) -> None:
        super()._save(path)
        self.itemitem.save(path / "itemitem")
        self.embed.save(path / "embed")
        if self.ials is not None:
            self.ials.save(path / "ials")
        torch.save({"trending": torch.from_numpy(self.trending)}, path / "trending.pt")

    @classmethod
    def _load(cls, path: Path, params: dict) -> ShopRec:
        # a model saved before these parameters existed was fitted without them: keep it that way
        # (the new defaults would change what a refresh of an old champion refits)
        params = {**_BEFORE_WEIGHTS_AND_IALS, **params}
        model = super()._load(path, params)
        model.itemitem = ItemItem._load(path / "itemitem", model.itemitem.params())
        model.embed = TwoTower._load(path / "embed", model.embed.params())
        if model.ials is not None:
            if not (path / "ials").is_dir():
                raise FileNotFoundError(f"{path / 'ials'} is missing but the model was saved with ials_dim="
                                        f"{model.ials.dim}: the saved model is incomplete; copy it again")
            model.ials = IALS._load(path / "ials", model.ials.params())
        else:
            model.w_ials = 0.0
        model.trending = torch.load(path / "trending.pt", weights_only=True)["trending"].numpy()
        return model
