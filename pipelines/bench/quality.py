"""`shoprec bench quality`: offline ranking quality on MovieLens-100K with RecBole's default protocol.

Protocol (RecBole 1.2.1 defaults): every rating is a positive; each user's interactions are
shuffled (seed 2020, with RecBole's own ``torch.randperm``, so the parts are RecBole's, pair for pair)
and split 8:1:1 into train/valid/test; each model ranks all items for
every user; items of the user's train part (and, for test, valid part) are never counted;
Recall, MRR, NDCG, Hit and Precision at 10. Hyperparameters are picked on valid only; every
model is then evaluated once on test. Baselines: popularity and the ``implicit`` package's ALS
and BPR (tuned on the same valid part). A second, cold-start split holds out 10% of the items
from training and asks how well the content path of the hybrid ranks those items for the users
who interacted with them, against random and popularity-by-content rankings.

The rating (1-5) of a training row is its interaction ``weight``, the analogue of the shop's
view/cart/purchase weights 1/3/5: the item-to-item model may use it as interaction strength
(``weight_power``, chosen on valid with the rest; 0 = ignore it). Every rating is still a positive
and the split and metrics are untouched; popularity counts interactions, and the ``implicit``
baselines, the two-tower and iALS ignore the weight.

``--dataset synthetic-1m`` instead measures scale: 1,000,000 simulator events over a 50,000-item
catalog, fit time of the hybrid, its item table's memory and the time to recommend for 1,000 users.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipelines import metrics
from pipelines.columns import COL_ITEM, COL_USER

log = logging.getLogger(__name__)

K = 10
SEED = 2020
PROTOCOL = ("RecBole 1.2.1 default: all interactions positive, random 8:1:1 split per user (seed 2020, RecBole's "
            "own shuffle: the same pairs as RecBole's split), "
            "full ranking over all items, train (+valid for test) items excluded, @10; hyperparameters "
            "chosen on valid only")

Ranker = Callable[[Sequence[str], int], list[list[str]]]


# --- evaluation ---------------------------------------------------------------------
def _targets(part: pd.DataFrame, exclude: pd.DataFrame) -> tuple[list[str], list[set[str]], list[set[str]]]:
    """Users of ``part``, their relevant items, and items to skip (in ``exclude`` parts but not train)."""
    rel = part.groupby(COL_USER)[COL_ITEM].agg(set)
    ex = exclude.groupby(COL_USER)[COL_ITEM].agg(set) if len(exclude) else pd.Series(dtype=object)
    users = sorted(rel.index)
    return users, [rel[u] for u in users], [ex.get(u, set()) for u in users]


def score_lists(recommended: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    return {"ndcg@10": metrics.ndcg_at_k(recommended, relevant, K),
            "recall@10": metrics.recall_at_k(recommended, relevant, K),
            "mrr@10": metrics.mrr_at_k(recommended, relevant, K),
            "hit@10": metrics.hit_at_k(recommended, relevant, K),
            "precision@10": metrics.precision_at_k(recommended, relevant, K)}


def evaluate(rank: Ranker, part: pd.DataFrame, extra_seen: pd.DataFrame) -> tuple[dict[str, float], float]:
    """Metrics of a ranker (train items already excluded by it) on ``part``; ``extra_seen`` items are skipped.

    Returns:
        ``(metrics, predict seconds)``.
    """
    users, relevant, skip = _targets(part, extra_seen)
    extra = max((len(s) for s in skip), default=0)
    t0 = time.perf_counter()
    lists = rank(users, K + extra)
    predict_s = time.perf_counter() - t0
    lists = [[i for i in row if i not in sk][:K] for row, sk in zip(lists, skip)]
    return score_lists(lists, relevant), predict_s


# --- the implicit package's baselines --------------------------------------------------
class ImplicitRanker:
    """``implicit`` ALS or BPR behind the same ranking call (benchmark only; needs scipy)."""

    def __init__(self, kind: str, **params):
        self.kind, self.params = kind, params

    def fit(self, train: pd.DataFrame) -> ImplicitRanker:
        import scipy.sparse as sp
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        self.users = {u: n for n, u in enumerate(sorted(train[COL_USER].unique()))}
        self.items = np.array(sorted(train[COL_ITEM].unique()))
        item_index = {i: n for n, i in enumerate(self.items)}
        pairs = train[[COL_USER, COL_ITEM]].drop_duplicates()
        rows = pairs[COL_USER].map(self.users).to_numpy()
        cols = pairs[COL_ITEM].map(item_index).to_numpy()
        self.matrix = sp.csr_matrix((np.ones(len(rows), dtype="float32"), (rows, cols)),
                                    shape=(len(self.users), len(self.items)))
        cls = AlternatingLeastSquares if self.kind == "als" else BayesianPersonalizedRanking
        from threadpoolctl import threadpool_limits

        self.model = cls(random_state=SEED, num_threads=2, **self.params)
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
            self.model.fit(self.matrix, show_progress=False)
        return self

    def rank(self, users: Sequence[str], k: int) -> list[list[str]]:
        codes = np.array([self.users[u] for u in users])
        ids, _ = self.model.recommend(codes, self.matrix[codes], N=k, filter_already_liked_items=True)
        return [[self.items[i] for i in row if i >= 0] for row in ids]


# --- runs ---------------------------------------------------------------------------------
def _tune(name: str, grid: list[dict], build: Callable[[dict], object], rank_of: Callable[[object], Ranker],
          valid: pd.DataFrame) -> tuple[dict, object, float]:
    """Fit every grid point, keep the best valid NDCG@10. Returns ``(params, fitted model, fit seconds)``."""
    best = None
    for params in grid:
        t0 = time.perf_counter()
        model = build(params)
        fit_s = time.perf_counter() - t0
        score = evaluate(rank_of(model), valid, valid.iloc[:0])[0]["ndcg@10"]
        log.info("%s %s: valid ndcg@10 %.4f (fit %.1fs)", name, params, score, fit_s)
        if best is None or score > best[0]:
            best = (score, params, model, fit_s)
    return best[1], best[2], best[3]


def run_ml100k(sample_users: int | None = None, quick: bool = False) -> dict:
    """The full quality benchmark (``quick``: one small grid point per model, for CI)."""
    from pipelines.datasets import load_ml100k, split_by_ratio
    from pipelines.models.hybrid import ShopRec
    from pipelines.models.ials import IALS
    from pipelines.models.itemitem import ItemItem
    from pipelines.models.popularity import Popularity
    from pipelines.models.twotower import TwoTower

    inter, items = load_ml100k(rating_as_weight=True)
    if sample_users:
        keep = np.random.default_rng(SEED).permutation(sorted(inter[COL_USER].unique()))[:sample_users]
        inter = inter[inter[COL_USER].isin(set(keep))]
    train, valid, test = split_by_ratio(inter, (0.8, 0.1, 0.1), seed=SEED)
    log.info("ml-100k: %d interactions, %d users, %d items; train/valid/test %d/%d/%d", len(inter),
             inter[COL_USER].nunique(), inter[COL_ITEM].nunique(), len(train), len(valid), len(test))
    results, chosen = {}, {}

    def rec_rank(model):
        return lambda users, k: model.recommend(list(users), k, exclude_seen=True)

    def record(name, params, model, fit_s, rank):
        m, predict_s = evaluate(rank, test, valid)
        results[name] = {**{k: round(v, 4) for k, v in m.items()}, "fit_s": round(fit_s, 2),
                         "predict_s": round(predict_s, 3)}
        chosen[name] = params
        log.info("%s test: %s", name, results[name])

    # popularity
    t0 = time.perf_counter()
    pop = Popularity().fit(train.assign(weight=1.0))
    record("popularity", {}, pop, time.perf_counter() - t0, rec_rank(pop))

    # implicit ALS / BPR
    als_grid = [{"factors": 64, "regularization": 0.1, "iterations": 15, "alpha": 1.0}] if quick else [
        {"factors": f, "regularization": r, "iterations": 15, "alpha": a}
        for f in (64, 128) for r in (0.1, 1.0, 10.0) for a in (1.0, 5.0)]
    p, m, s = _tune("als", als_grid, lambda q: ImplicitRanker("als", **q).fit(train), lambda x: x.rank, valid)
    record("implicit_als", p, m, s, m.rank)
    bpr_grid = [{"factors": 64, "learning_rate": 0.05, "regularization": 0.01, "iterations": 50}] if quick else [
        {"factors": f, "learning_rate": lr, "regularization": 0.01, "iterations": it}
        for f in (64, 128) for lr in (0.01, 0.05) for it in (100, 300)]
    p, m, s = _tune("bpr", bpr_grid, lambda q: ImplicitRanker("bpr", **q).fit(train), lambda x: x.rank, valid)
    record("implicit_bpr", p, m, s, m.rank)

    # item-to-item (EASE; content_weight > 0 adds the catalog's content as pseudo-users)
    ii_grid = [{"l2": 300.0, "neighbours": 200, "content_weight": 3.0, "weight_power": 0.5}] if quick else [
        {"l2": l2, "neighbours": 2000, "content_weight": cw, "weight_power": wp}
        for wp in (0.0, 0.5, 1.0) for l2 in (200.0, 300.0, 500.0, 800.0) for cw in (0.0, 1.0, 2.0, 3.0, 5.0)]
    ii_p, m, s = _tune("itemitem", ii_grid, lambda q: ItemItem(device="cpu", **q).fit(train, items),
                       rec_rank, valid)
    record("itemitem", ii_p, m, s, rec_rank(m))

    # content-aware two-tower
    tt_grid = [{"epochs": 5, "dim": 32}] if quick else [
        {"epochs": e, "dim": 64, "batch_size": 16384, "user_embedding": ue} for e in (10, 20) for ue in (False, True)]
    tt_p, m, s = _tune("twotower", tt_grid, lambda q: TwoTower(device="cpu", **q).fit(train, items),
                       rec_rank, valid)
    record("twotower", tt_p, m, s, rec_rank(m))

    # iALS (torch), on its own and as the hybrid's second collaborative signal
    ials_grid = [{"dim": 16, "alpha0": 0.1, "reg": 0.03, "iterations": 5}] if quick else [
        {"dim": 64, "alpha0": a0, "reg": reg, "iterations": 10} for a0, reg in ((0.1, 0.03), (0.3, 0.01), (1.0, 0.01))]
    ials_models = []
    for q in ials_grid:
        t0 = time.perf_counter()
        ials_models.append((q, IALS(device="cpu", **q).fit(train, items), time.perf_counter() - t0))
    p, m, s = max(ials_models, key=lambda x: evaluate(rec_rank(x[1]), valid, valid.iloc[:0])[0]["ndcg@10"])
    record("ials", p, m, s, rec_rank(m))

    # the hybrid: parts as tuned above; which iALS and the blend weights tuned on valid from cached
    # part scores (no refit needed), then the chosen hybrid fitted once and evaluated once on test
    hybrid = ShopRec(device="cpu", **ii_p, **tt_p, **_ials_params(ials_grid[0])).fit(train, items)
    users, relevant, _ = _targets(valid, valid.iloc[:0])
    profiles, _ = hybrid._profiles([(u, ()) for u in users])
    parts = {k: v for k, v in hybrid.part_scores(profiles).items() if k != "ials"}
    seen = _seen_pairs(hybrid, users)
    best = None
    weights = [(1.0, 0.25, 0.5, 0.0)] if quick else [
        (1.0, wi, we, wp) for wi in (0.0, 0.25, 0.5, 1.0) for we in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
        for wp in (0.0, 0.05, 0.1)]
    for q, m, _ in ials_models:
        hybrid.ials = m
        parts["ials"] = hybrid.part_scores(profiles)["ials"]
        for w in weights:
            blend = sum(wk * parts[k] for wk, k in zip(w, ("itemitem", "ials", "embed", "pop")))
            score = score_lists(_top_lists(hybrid, blend, seen), relevant)["ndcg@10"]
            log.info("shoprec ials %s weights %s: valid ndcg@10 %.4f", q, w, score)
            if best is None or score > best[0]:
                best = (score, q, w)
    chosen_weights = dict(zip(("w_itemitem", "w_ials", "w_embed", "w_pop"), best[2]))
    hybrid_params = {**ii_p, **tt_p, **_ials_params(best[1]), **chosen_weights}
    t0 = time.perf_counter()
    hybrid = ShopRec(device="cpu", **hybrid_params).fit(train, items)
    record("shoprec", hybrid.params(), hybrid, time.perf_counter() - t0, rec_rank(hybrid))

    cold = cold_start_ml100k(inter, items, hybrid_params)
    return {"dataset": "ml-100k" + (f" (sample of {sample_users} users)" if sample_users else ""),
            "protocol": PROTOCOL, "results": results, "chosen_params": chosen, "cold_start": cold,
            "machine": _machine()}


def _ials_params(q: dict) -> dict:
    return {"ials_dim": q["dim"], "ials_alpha0": q["alpha0"], "ials_reg": q["reg"], "ials_iterations": q["iterations"]}


def _seen_pairs(model, users: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of every user's training items (row = position in ``users``), to exclude."""
    rows, cols = [], []
    for r, u in enumerate(users):
        code = model._user_index[str(u)]
        seen = model._indices[model._indptr[code]:model._indptr[code + 1]]
        rows.append(np.full(len(seen), r))
        cols.append(seen)
    return np.concatenate(rows), np.concatenate(cols)


def _top_lists(model, scores, seen: tuple[np.ndarray, np.ndarray]) -> list[list[str]]:
    """Top-K item ids per row of a blended ``[users, items]`` score tensor, training items excluded."""
    import torch

    scores = scores.clone()
    scores[torch.from_numpy(seen[0]), torch.from_numpy(seen[1])] = -torch.inf
    return [[model.item_ids[i] for i in row] for row in torch.topk(scores, K, dim=1).indices.tolist()]


def cold_start_ml100k(inter: pd.DataFrame, items: pd.DataFrame, params: dict) -> dict:
    """Hold out 10% of the items from training; rank them among themselves for the users who had them.

    ``shoprec_content``: the hybrid's content path (:meth:`ShopRec.rank_new_items`, the user's
    training items place them); ``random``: the expectation over 20 random orders;
    ``popularity``: cold items scored by the mean training popularity of the warm items that
    share their content tokens (a cold item has no popularity of its own).
    """
    from pipelines.models.hybrid import ShopRec

    rng = np.random.default_rng(SEED)
    all_items = np.array(sorted(inter[COL_ITEM].unique()))
    cold_items = set(rng.choice(all_items, size=max(1, len(all_items) // 10), replace=False))
    is_cold = inter[COL_ITEM].isin(cold_items)
    warm, cold = inter[~is_cold], inter[is_cold]
    catalog = items[items[COL_ITEM].isin(set(all_items))]
    t0 = time.perf_counter()
    model = ShopRec(device="cpu", **params).fit(warm, catalog)
    fit_s = time.perf_counter() - t0
    rel = cold.groupby(COL_USER)[COL_ITEM].agg(set)
    users = [u for u in sorted(rel.index) if u in model.known_users]
    relevant = [rel[u] for u in users]
    candidates = model.new_item_ids
    t0 = time.perf_counter()
    content = [[i for i, _ in model.rank_new_items(u, [], K)] for u in users]
    predict_s = time.perf_counter() - t0
    out = {"shoprec_content": {**score_lists(content, relevant), "fit_s": round(fit_s, 2),
                               "predict_s": round(predict_s, 3)}}
    rand = [score_lists([list(rng.permutation(candidates)[:K]) for _ in users], relevant) for _ in range(20)]
    out["random"] = {k: float(np.mean([r[k] for r in rand])) for k in rand[0]}
    # popularity by content: mean popularity of the warm items sharing each token
    tokens, offsets = model.embed.content.transform(catalog.set_index(COL_ITEM).loc[model.item_ids].reset_index())
    pop = np.bincount(warm[COL_ITEM].astype(str).map(model.item_index).to_numpy(dtype="int64"),
                      minlength=len(model.item_ids)).astype("float64")  # counts, not rating sums
    ends = np.append(offsets[1:], len(tokens))
    tok_sum, tok_n = np.zeros(len(model.embed.content.vocab)), np.zeros(len(model.embed.content.vocab))
    for n in range(model._n_warm):
        t = tokens[offsets[n]:ends[n]]
        tok_sum[t] += pop[n]
        tok_n[t] += 1
    tok_mean = tok_sum / np.maximum(tok_n, 1)
    cold_codes = range(model._n_warm, len(model.item_ids))
    cscore = {model.item_ids[n]: float(tok_mean[tokens[offsets[n]:ends[n]]].mean()) if ends[n] > offsets[n] else 0.0
              for n in cold_codes}
    by_pop = sorted(candidates, key=lambda i: -cscore[i])[:K]
    out["popularity"] = score_lists([by_pop for _ in users], relevant)
    for name in ("random", "popularity"):
        out[name] = {k: round(v, 4) for k, v in out[name].items()}
        out["shoprec_content"][f"ndcg_ratio_vs_{name}"] = round(
            out["shoprec_content"]["ndcg@10"] / max(out[name]["ndcg@10"], 1e-9), 2)
        out["shoprec_content"][f"recall_ratio_vs_{name}"] = round(
            out["shoprec_content"]["recall@10"] / max(out[name]["recall@10"], 1e-9), 2)
    out["shoprec_content"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in out["shoprec_content"].items()}
    out["setup"] = {"held_out_items": len(cold_items), "users": len(users), "candidates": len(candidates)}
    return out


def synthetic_interactions(n_events: int = 1_000_000, n_items: int = 50_000, n_users: int = 100_000
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Interactions (weighted by event type) and catalog of a simulated shop, for the scale runs."""
    from pipelines import simulator
    from pipelines.columns import COL_TS, COL_WEIGHT

    catalog = simulator.make_catalog(n_items, seed=0)
    sim = simulator.ShopSimulator(catalog, n_users=n_users, seed=0, new_item_rate=0)
    weights = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
    rows = [(e["user_id"], e["item_id"], e["ts"], weights.get(e["event_type"], 1.0))
            for e in sim.events(n_events) if e.get("item_id")]
    return pd.DataFrame(rows, columns=[COL_USER, COL_ITEM, COL_TS, COL_WEIGHT]), catalog


def run_synthetic(n_events: int = 1_000_000, n_items: int = 50_000, n_users: int = 100_000,
                  epochs: int = 3) -> dict:
    """Scale: fit the hybrid on simulator events over a big catalog; time it and weigh its item table."""
    from pipelines.models.hybrid import ShopRec

    t0 = time.perf_counter()
    inter, catalog = synthetic_interactions(n_events, n_items, n_users)
    gen_s = time.perf_counter() - t0
    log.info("synthetic: %d interactions, %d users, %d items in %.0fs", len(inter), inter[COL_USER].nunique(),
             inter[COL_ITEM].nunique(), gen_s)
    t0 = time.perf_counter()
    model = ShopRec(device="cpu", epochs=epochs, neighbours=100).fit(inter, catalog)
    fit_s = time.perf_counter() - t0
    users = list(inter[COL_USER].drop_duplicates().iloc[:1000])
    model.recommend(users[:10], K)  # warm-up
    t0 = time.perf_counter()
    model.recommend(users, K)
    rec_s = time.perf_counter() - t0
    vectors = [model.embed.item_emb, model.embed._content_part] + (
        [model.ials.item_vectors] if model.ials is not None else [])
    table = model.itemitem.table_bytes() + sum(t.element_size() * t.nelement() for t in vectors)
    return {"dataset": "synthetic-1m", "interactions": len(inter), "users": int(inter[COL_USER].nunique()),
            "items": len(model.item_ids), "generate_s": round(gen_s, 1), "fit_s": round(fit_s, 1),
            "fit_parts_s": {k: round(v, 1) for k, v in model.fit_seconds.items()},
            "item_table_mb": round(table / 2**20, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
            "recommend_1000_users_s": round(rec_s, 3), "embedding_epochs": epochs, "machine": _machine()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _machine() -> str:
    import platform

    import torch

    return f"{os.cpu_count()} CPU cores {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"


def format_table(result: dict) -> str:
    cols = ["ndcg@10", "recall@10", "mrr@10", "hit@10", "precision@10", "fit_s", "predict_s"]
    lines = []
    for section in ("results", "cold_start"):
        rows = {k: v for k, v in result.get(section, {}).items() if k != "setup"}
        if not rows:
            continue
        lines.append(f"{section}:")
        lines.append(f"{'model':<18}" + "".join(f"{c:>13}" for c in cols))
        for name, vals in rows.items():
            lines.append(f"{name:<18}" + "".join(f"{vals[c]:>13}" if c in vals else f"{'':>13}" for c in cols))
    return "\n".join(lines)


def command(
    dataset: str = typer.Option("ml-100k", help="ml-100k (quality) or synthetic-1m (scale)"),
    out: Path = typer.Option(Path("var/bench/quality.json"), help="where to write the JSON result"),
    sample: int = typer.Option(0, min=0, help="use only this many random users (0: all) — for a quick CI run"),
    quick: bool = typer.Option(False, help="one small hyperparameter point per model (CI)"),
) -> None:
    """Offline quality of every model on MovieLens-100K (RecBole protocol), or the scale run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if dataset == "ml-100k":
        result = run_ml100k(sample_users=sample or None, quick=quick)
    elif dataset == "synthetic-1m":
        result = run_synthetic()
    else:
        raise typer.BadParameter(f"unknown dataset {dataset!r}: use ml-100k or synthetic-1m")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    typer.echo(format_table(result) if dataset == "ml-100k" else json.dumps(result, indent=2))
    typer.echo(f"written to {out}")
