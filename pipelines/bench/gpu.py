"""`shoprec bench gpu`: the model core on CUDA against the CPU, in one run on one machine.

Needs only torch, numpy and pandas (and the ml-100k file from the ``recbole`` package), so it
runs on a bare GPU machine too: ``python -m pipelines.bench.gpu --out var/bench/gpu.json``.

* ``scoring``: the serving core, the production hybrid's batched call
  (:meth:`~pipelines.models.scoring.ScoringRecommender.recommend_batch`, what the scoring service
  runs per adaptive batch: known users with a live session, every part scored, blended, seen
  items excluded, top-k) over a 1,000,000-item catalog, per batch size, on cpu and cuda;
  ``speedup`` is cpu time / cuda time. The hybrid is fitted once (on cuda when there is one) on a
  shop that :func:`synthetic_shop` draws with numpy alone, and loaded on each device.
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
SESSION = 3  # recent items per scoring request
#: hyperparameters the quality benchmark chose on valid (BENCHMARKS.md, 2026-12-06 09:33 UTC run)
HYBRID_PARAMS = {"l2": 300.0, "neighbours": 2000, "content_weight": 3.0, "weight_power": 0.5, "epochs": 20,
                 "dim": 64, "batch_size": 16384, "user_embedding": False, "ials_dim": 64, "ials_alpha0": 0.3,
                 "ials_reg": 0.01, "w_itemitem": 1.0, "w_ials": 1.0, "w_embed": 1.5, "w_pop": 0.1}


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


def synthetic_shop(n_items: int, n_interactions: int, n_users: int, seed: int = 0):
    """``(interactions, catalog)`` of a shop drawn with numpy alone (no simulator: runs on a bare GPU machine).

    Products have a title of two words, a category, a brand and a price; interactions pick
    products by a Zipf-like popularity and weigh 80 % views, 15 % carts and 5 % purchases (1 / 3 / 5).
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    words = np.array([f"w{n}" for n in range(2000)])
    title = pd.Series(words[rng.integers(0, len(words), n_items)]) + " " + words[rng.integers(0, len(words), n_items)]
    catalog = pd.DataFrame({"item_id": [f"i{n}" for n in range(n_items)], "title": title,
                            "category": [f"c{c}" for c in rng.integers(0, 200, n_items)],
                            "brand": [f"b{b}" for b in rng.integers(0, 5000, n_items)],
                            "price": np.round(rng.lognormal(3.0, 1.0, n_items), 2)})
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    items = rng.choice(n_items, n_interactions, p=pop / pop.sum())
    inter = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, n_users, n_interactions)],
                          "item_id": catalog["item_id"].to_numpy()[items],
                          "ts": pd.to_datetime(1_700_000_000 + np.sort(rng.integers(0, 30 * 86400, n_interactions)),
                                               unit="s", utc=True),
                          "weight": rng.choice([1.0, 3.0, 5.0], n_interactions, p=[0.8, 0.15, 0.05])})
    return inter, catalog


def _load_on(path: Path, device: str):
    """The hybrid saved at ``path``, loaded with its tensors on ``device``."""
    from pipelines.models.hybrid import ShopRec

    params = json.loads((path / "recommender.json").read_text())["params"]
    return ShopRec._load(path, {**params, "device": device})


def bench_scoring(devices: list[str], n_items: int = N_ITEMS, batches=BATCHES,
                  n_interactions: int | None = None) -> dict:
    """Seconds per scored batch of the production hybrid (all parts, exclusion, top-k) per device and batch size."""
    import tempfile

    from pipelines.models.hybrid import ShopRec

    n_interactions = n_interactions or max(n_items, 20_000)
    inter, catalog = synthetic_shop(n_items, n_interactions, n_users=max(n_interactions // 10, max(batches)))
    fit_device = devices[-1]  # cuda when there is one: a 1M-item fit takes minutes on a few CPU cores
    t0 = time.perf_counter()
    model = ShopRec(device=fit_device, epochs=1, neighbours=100).fit(inter, catalog)
    _sync(model._device)
    fit_s = time.perf_counter() - t0
    log.info("hybrid over %d items fitted on %s in %.1fs", len(model.item_ids), fit_device, fit_s)
    recent = inter.groupby("user_id", sort=False)["item_id"].agg(lambda s: list(s.iloc[::-1][:SESSION]))
    requests = list(zip(recent.index[:max(batches)], recent.to_numpy()[:max(batches)]))
    out: dict = {"model": "shoprec", "n_items": len(model.item_ids), "interactions": n_interactions,
                 "dim": model.embed.dim, "k": K, "session_items": SESSION, "fit_device": fit_device,
                 "fit_s": round(fit_s, 1), "fit_parts_s": {k: round(v, 1) for k, v in model.fit_seconds.items()},
                 "by_batch": {}}
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        del model
        for dev_name in devices:
            scorer = _load_on(Path(folder), dev_name)
            dev = scorer._device
            for b in batches:
                batch = requests[:b]
                repeats = 20 if dev.type == "cuda" or b <= 64 else 5
                sec = _timed(lambda: scorer.recommend_batch(batch, K), dev, repeats)  # noqa: B023 (called at once)
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

    inter, items = load_ml100k(rating_as_weight=True)
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


#: the options' help, for both command lines (``shoprec bench gpu`` and ``python -m pipelines.bench.gpu``)
OPTION_HELP = {
    "out": "where to write the JSON result",
    "n_items": "items in the scored table",
    "training": "also time the hybrid's fit on each device (--no-training: scoring only, a few minutes less)",
    "scale_data": "a folder written by --export-scale-data: adds the 1M-interaction fit from it",
    "export_scale_data": "write the simulator's 1M-interaction shop to this folder as Parquet, and stop",
}


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.bench.gpu``: the same options as ``shoprec bench gpu``, with only the standard library
    for the command line (a bare GPU machine has torch, numpy and pandas, not necessarily typer)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipelines.bench.gpu", description=command.__doc__)
    h = OPTION_HELP
    p.add_argument("--out", type=Path, default=Path("var/bench/gpu.json"), help=h["out"])
    p.add_argument("--n-items", type=int, default=N_ITEMS, help=h["n_items"])
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True, help=h["training"])
    p.add_argument("--scale-data", type=Path, default=None, help=h["scale_data"])
    p.add_argument("--export-scale-data", type=Path, default=None, help=h["export_scale_data"])
    a = p.parse_args(argv)
    if a.n_items < 1:
        p.error(f"argument --n-items: {a.n_items} is not a catalog size: give 1 or more")
    command(a.out, a.n_items, a.training, a.scale_data, a.export_scale_data)


if __name__ == "__main__":
    main()
