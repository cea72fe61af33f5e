"""The hourly incremental refresh of the hybrid, and the model core's promise to need only torch/numpy/pandas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipelines.bench import gpu
from pipelines.models.hybrid import ShopRec
from tests.models.test_hybrid import FAST_EMBED, catalog
from tests.models.test_models import frame, two_groups


def shifted_window():
    """The next hours: a-people now take the B3..B5 lamps together with the A0..A2 shoes."""
    rows = []
    for u in range(1, 8):
        rows += [(f"a{u}", it) for it in ("A0", "A1", "A2", "B3", "B4", "B5")]
        rows += [(f"b{u}", it) for it in ("B0", "B1", "B2")]
    rows += [("z9", "UNKNOWN-ITEM")]
    return frame(rows)


@pytest.mark.parametrize("dense_max_items", [6000, 1], ids=["ease", "co-visitation"])
def test_refresh_follows_the_new_window_and_keeps_the_rest(dense_max_items):
    model = ShopRec(l2=1.0, dense_max_items=dense_max_items, content_weight=0.0, w_embed=0.0, w_pop=0.0, w_ials=0.0,
                    **FAST_EMBED)
    model.fit(two_groups(), catalog())
    before = model.recommend(["a0"], 3)[0]
    assert set(before) == {"A3", "A4", "A5"}
    item_ids, emb = list(model.item_ids), model.embed.item_emb.clone()

    stats = model.refresh(shifted_window())

    assert stats["dropped_rows"] == 1 and stats["rows"] == len(shifted_window()) - 1
    assert set(model.recommend(["a0"], 3)[0]) == {"B3", "B4", "B5"}  # a0's A0..A2 now lead to the lamps
    assert model.item_ids == item_ids  # same index: a drop-in replacement for serving
    assert torch.equal(model.embed.item_emb, emb)  # embeddings wait for the full retrain
    assert model.trending[model.item_ids.index("A0")] > model.trending[model.item_ids.index("A3")]


def test_refresh_with_only_unknown_items_is_refused_and_changes_nothing():
    model = ShopRec(l2=1.0, w_embed=0.0, w_pop=0.0, w_ials=0.0, **FAST_EMBED).fit(two_groups(), catalog())
    before = model.recommend(["a0", "b0"], 3)
    with pytest.raises(ValueError, match="full retrain"):
        model.refresh(frame([("z1", "NOPE1"), ("z2", "NOPE2")]))
    assert model.recommend(["a0", "b0"], 3) == before


def test_model_core_runs_with_only_torch_numpy_pandas(tmp_path):
    """Import, fit, save and load the hybrid with every service package made unimportable."""
    blocked = ["pydantic", "pydantic_settings", "orjson", "redis", "kafka", "mlflow", "dagster", "bentoml",
               "streamlit", "great_expectations", "typer", "scipy", "sklearn", "pyarrow"]
    code = f"""
import sys
sys.modules.update(dict.fromkeys({blocked!r}))  # None there: `import x` fails as if x were not installed
import json
from pipelines.models import get_recommender, load_recommender
import pandas as pd
rows = [(g + str(u), g.upper() + str(i)) for g in "ab" for u in range(8) for i in range(3 if u == 0 else 6)]
data = pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(ts=pd.Timestamp("2026-01-01", tz="UTC"))
m = get_recommender("shoprec", l2=1.0, dim=8, epochs=2, device="cpu").fit(data)
m.save({str(tmp_path)!r})
again = load_recommender({str(tmp_path)!r})
from pipelines.bench import gpu  # the GPU benchmark, command line included, runs with the core alone
gpu.main(["--n-items", "500", "--no-training", "--out", {str(tmp_path / "gpu.json")!r}])
scoring = json.load(open({str(tmp_path / "gpu.json")!r}))["scoring"]
assert scoring["n_items"] == 500 and scoring["by_batch"]["64"]["cpu"]["ms_per_batch"] > 0, scoring
print(json.dumps(again.recommend(["a0"], 3)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout.strip().splitlines()[-1])[0]) == 3


def test_gpu_bench_reports_cpu_figures_without_a_gpu():
    result = gpu.run(n_items=2_000, training=False)
    assert result["scoring"]["model"] == "shoprec" and result["scoring"]["n_items"] == 2_000  # the production hybrid
    row = result["scoring"]["by_batch"]["64"]
    assert row["cpu"]["ms_per_batch"] > 0 and row["cpu"]["users_per_s"] > 0
    if torch.cuda.is_available():
        assert row["speedup"] > 0
    else:
        assert "no CUDA" in result["note"] and "cuda" not in row
