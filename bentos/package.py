"""Package the current champion into the Bento: ``python -m bentos.package && bentoml build -f bentos/bentofile.yaml .``

Exports the model behind ``champion`` from MLflow (``MLFLOW_TRACKING_URI``) into
``bentos/packaged/`` (``champion/`` + ``champion.json``), which ``bentofile.yaml`` includes. A
Bento built after this serves that champion even when it cannot reach MLflow; when it can, it
follows the registry's aliases as usual.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pipelines.registry import ModelRegistry
from pipelines.schemas import ALIAS_CHAMPION
from pipelines.settings import get_settings

PACKAGED = Path(__file__).resolve().parent / "packaged"


def package(dest: Path = PACKAGED) -> str:
    """Write the champion to ``dest``; returns its version.

    Raises:
        SystemExit: when the registry has no champion yet (train and register one first).
    """
    s = get_settings()
    loaded = ModelRegistry(s.mlflow_tracking_uri, name=s.mlflow_model_name).load(ALIAS_CHAMPION)
    if loaded is None:
        raise SystemExit(f"no '{ALIAS_CHAMPION}' for {s.mlflow_model_name} in {s.mlflow_tracking_uri}: "
                         "train and register a model first: `shoprec train` with the stack up (`make up`), or Dagster → Jobs → "
                         "train_job → Materialize all")
    if dest.exists():
        shutil.rmtree(dest)
    loaded.recommender.save(dest / "champion")
    (dest / "champion.json").write_text(json.dumps({"version": loaded.version, "model": s.mlflow_model_name}))
    return loaded.version


if __name__ == "__main__":
    version = package(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGED)
    print(f"packaged champion version {version}")
