"""`shoprec bench gpu`: the model core on CUDA against the CPU, in one run on one machine.

Needs only torch, numpy and pandas (and the ml-100k file from the ``recbole`` package), so it
runs on a bare GPU machine too: ``python -m pipelines.bench.gpu --out var/bench/gpu.json``.

* ``scoring``: the serving core (:meth:`pipelines.models.bpr.BPR.score_users`: a batch of user
  vectors against the item table, one matmul and a top-k, seen items excluded) over a
  1,000,000-item table, per batch size, on cpu and cuda; ``speedup`` is cpu time / cuda time.
* ``scale`` (with ``--scale-data``): the hybrid fitted on the 1M-interaction, 50k-item simulated
  shop of the quality benchmark's scale run, per device.
* ``training``: the production hybrid fitted on MovieLens-100K (RecBole split, the hyperparameters
  the quality benchmark chose) on each device: fit seconds, test NDCG@10 / Recall@10, and whether
  two fits with the same seed give the same lists (``deterministic``).

Without CUDA it measures the cpu side only and says so.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

N_ITEMS = 1_000_000
DIM = 64
K = 10
BATCHES = (1, 64, 256, 1024)
#: hyperparameters the quality benchmark chose on valid (BENCHMARKS.md, quiet run)
HYBRID_PARAMS = {"l2": 500.0, "neighbours": 2000, "epochs": 20, "dim": 64, "batch_size": 16384,
                 "user_embedding": False, "w_itemitem": 1.0, "w_embed": 0.75, "w_pop": 0.1}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after two warm-ups."""
    import numpy as np

    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_scoring(devices: list[str], n_items: int = N_ITEMS, batches=BATCHES) -> dict:
    """Seconds per scored batch (matmul + exclusion + top-k) for each device and batch size."""
    import torch

    from pipelines.models.bpr import BPR

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(n_items, DIM, generator=gen) / DIM ** 0.5
    users = torch.randn(max(batches), DIM, generator=gen)
    exclude = [[(r * 7 + j) % n_items for j in range(20)] for r in range(max(batches))]  # 20 seen items each
    out: dict = {"n_items": n_items, "dim": DIM, "k": K, "by_batch": {}}
    for dev_name in devices:
        model = BPR(dim=DIM, device=dev_name)
        dev = model._device
        model.item_emb = table.to(dev)
        model.item_bias = torch.zeros(n_items, device=dev)
        model._set_ids([], [f"i{n}" for n in range(n_items)])
        for b in batches:
            vecs = users[:b].to(dev)
            ex = exclude[:b]
            repeats = 20 if dev.type == "cuda" or b <= 64 else 5
            sec = _timed(lambda: model.score_users(vecs, K, ex), dev, repeats)
            row = out["by_batch"].setdefault(str(b), {})
            row[dev.type] = {"ms_per_batch": round(sec * 1e3, 3), "users_per_s": round(b / sec, 1)}
            log.info("scoring %s batch %d: %.2f ms", dev.type, b, sec * 1e3)
    for row in out["by_batch"].values():
        if "cpu" in row and "cuda" in row:
            row["speedup"] = round(row["cpu"]["ms_per_batch"] / row["cuda"]["ms_per_batch"], 1)
    return out


def bench_training(devices: list[str]) -> dict:
    """Fit the hybrid on ml-100k per device: seconds, test metrics, same-seed determinism."""
    import torch

    from pipelines.bench.quality import evaluate
    from pipelines.datasets import load_ml100k, split_by_ratio
    from pipelines.models.hybrid import ShopRec

    inter, items = load_ml100k()
    train, valid, test = split_by_ratio(inter, (0.8, 0.1, 0.1), seed=2020)
    out: dict = {"dataset": "ml-100k", "params": HYBRID_PARAMS}
    for dev_name in devices:
        lists, res = [], {}
        for run in range(2):
            t0 = time.perf_counter()
            model = ShopRec(device=dev_name, **HYBRID_PARAMS).fit(train, items)
            _sync(model._device)
            fit_s = time.perf_counter() - t0
            users = sorted(test["user_id"].unique())
            lists.append(model.recommend(users, K))
            if run == 0:
                metrics, predict_s = evaluate(lambda u, k: model.recommend(list(u), k), test, valid)
                res = {"fit_s": round(fit_s, 2), "fit_parts_s": {k: round(v, 2) for k, v in model.fit_seconds.items()},
                       "predict_s": round(predict_s, 3), "ndcg@10": round(metrics["ndcg@10"], 4),
                       "recall@10": round(metrics["recall@10"], 4)}
            else:
                res["fit_s_second_run"] = round(fit_s, 2)
        res["deterministic"] = lists[0] == lists[1]
        out[torch.device(dev_name).type] = res
        log.info("training on %s: %s", dev_name, res)
    if "cpu" in out and "cuda" in out:
        out["speedup_fit"] = round(out["cpu"]["fit_s"] / out["cuda"]["fit_s"], 2)
    return out


def bench_scale(devices: list[str], data: Path, epochs: int = 3) -> dict:
    """Fit the hybrid on the 1M-interaction / 50k-item synthetic shop (:func:`export_synthetic`) per device."""
    import torch

    import pandas as pd

    from pipelines.models.hybrid import ShopRec

    inter = pd.read_parquet(data / "interactions.parquet")
    catalog = pd.read_parquet(data / "catalog.parquet")
    out: dict = {"interactions": len(inter), "items": len(catalog), "embedding_epochs": epochs}
    users = list(inter["user_id"].drop_duplicates().iloc[:1000])
    for dev_name in devices:
        t0 = time.perf_counter()
        model = ShopRec(device=dev_name, epochs=epochs, neighbours=100).fit(inter, catalog)
        _sync(model._device)
        fit_s = time.perf_counter() - t0
        model.recommend(users[:10], K)
        t0 = time.perf_counter()
        model.recommend(users, K)
        rec_s = time.perf_counter() - t0
        out[torch.device(dev_name).type] = {"fit_s": round(fit_s, 1),
                                            "fit_parts_s": {k: round(v, 1) for k, v in model.fit_seconds.items()},
                                            "recommend_1000_users_s": round(rec_s, 3)}
        log.info("scale fit on %s: %s", dev_name, out[torch.device(dev_name).type])
    if "cpu" in out and "cuda" in out:
        out["speedup_fit"] = round(out["cpu"]["fit_s"] / out["cuda"]["fit_s"], 2)
    return out


def export_synthetic(folder: Path) -> None:
    """Write the scale run's interactions and catalog as Parquet (to carry to a machine without the simulator)."""
    from pipelines.bench.quality import synthetic_interactions

    inter, catalog = synthetic_interactions()
    folder.mkdir(parents=True, exist_ok=True)
    inter.to_parquet(folder / "interactions.parquet", index=False)
    catalog.to_parquet(folder / "catalog.parquet", index=False)


def machine() -> dict:
    import torch

    info = {"cpu_cores": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(n_items: int = N_ITEMS, training: bool = True, scale_data: Path | None = None) -> dict:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "scoring": bench_scoring(devices, n_items)}
    if training:
        result["training"] = bench_training(devices)
    if scale_data is not None:
        result["scale"] = bench_scale(devices, scale_data)
    if not torch.cuda.is_available():
        result["note"] = "no CUDA device here: cpu figures only"
    return result


def command(out: Path = Path("var/bench/gpu.json"), n_items: int = N_ITEMS, training: bool = True,
            scale_data: Path | None = None, export_scale_data: Path | None = None) -> None:
    """Scoring (1M-item table) and hybrid training on CUDA vs CPU; cpu only where there is no GPU.

    ``--scale-data DIR`` adds the 1M-interaction fit from Parquet that ``--export-scale-data DIR``
    wrote (on a machine with the simulator's dependencies).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if export_scale_data is not None:
        export_synthetic(export_scale_data)
        print(f"scale data written to {export_scale_data}")
        return
    result = run(n_items, training, scale_data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    import typer

    typer.run(command)
