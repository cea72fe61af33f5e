"""The MLflow side of the model lifecycle: log, register, alias, load.

Models are logged as MLflow pyfunc models wrapping a shoprec ``Recommender``
folder, registered as ``shoprec-recommender`` and addressed by the aliases
``champion`` / ``challenger`` (never stages).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.models import Recommender, load_recommender
from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION, MLFLOW_EXPERIMENT, REGISTERED_MODEL, TAG_TRAINED_VERSION

log = logging.getLogger(__name__)

PRIMARY_METRIC = "ndcg_at_10"
TAG_CHAMPION_HISTORY = "champion_history"  # a registered-model tag: the champions, oldest first
HISTORY_KEPT = 50  # hourly refreshes add one each: two days of them


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict`` takes a frame with ``user_id`` and returns top-k item ids."""

    def load_context(self, context):
        self.recommender = load_recommender(context.artifacts["recommender"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        users = model_input["user_id"].astype(str).tolist()
        return pd.DataFrame({"user_id": users, "items": self.recommender.recommend(users, k)})


@dataclass(frozen=True)
class LoadedModel:
    recommender: Recommender
    version: str
    alias: str
    #: the version trained by ``train_job`` that this one comes from through hourly refreshes (itself when
    #: it was trained): an A/B comparison is between trained versions and goes on across their refreshes
    trained: str = ""

    @property
    def lineage(self) -> str:
        return self.trained or self.version


class ModelRegistry:
    """shoprec's view of one MLflow tracking server / registry."""

    def __init__(self, tracking_uri: str, name: str = REGISTERED_MODEL):
        self.tracking_uri = tracking_uri
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def log_and_register(self, model: Recommender, *, params: dict, metrics: dict[str, float],
                         tags: dict[str, str], metric_history: dict[str, list[float]] | None = None,
                         run_name: str | None = None) -> tuple[str, str]:
        """Log a trained model as a run of experiment ``shoprec`` and register a new version.

        ``run_name`` defaults to ``train-<model name>`` (the hourly refresh names its runs ``refresh-...``).

        Returns:
            ``(run_id, version)``.
        """
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mlflow.set_experiment(MLFLOW_EXPERIMENT)
        with mlflow.start_run(run_name=run_name or f"train-{model.name}") as run, tempfile.TemporaryDirectory() as tmp:
            mlflow.log_params(_flat(params))
            for key, values in (metric_history or {}).items():
                for step, v in enumerate(values):
                    mlflow.log_metric(key, v, step=step)
            mlflow.log_metrics({_metric_key(k): float(v) for k, v in metrics.items()})
            mlflow.set_tags(tags)
            model.save(Path(tmp) / "recommender")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=RecommenderPyfunc(),
                artifacts={"recommender": str(Path(tmp) / "recommender")},
                registered_model_name=self.name, pip_requirements=["torch", "numpy", "pandas"],
            )
            version = str(info.registered_model_version)
            run_id = run.info.run_id
        for k, v in tags.items():
            self.client.set_model_version_tag(self.name, version, k, v)
        for k, v in metrics.items():
            self.client.set_model_version_tag(self.name, version, f"metric.{_metric_key(k)}", f"{float(v):.6f}")
        log.info("registered %s version %s (run %s)", self.name, version, run_id)
        return run_id, version

    def version_for(self, alias: str) -> str | None:
        """The version behind an alias, or None when the alias (or the model) does not exist.

        Raises:
            MlflowException: the registry did not answer (unreachable, an error): not the same as no alias, which
                would make serving drop a model it is serving.
        """
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as err:
            if _not_found(err):
                return None
            raise

    def tags(self, version: str) -> dict[str, str]:
        """The tags of a model version (data window, gate decision, ``metric.*``, ...)."""
        return dict(self.client.get_model_version(self.name, version).tags or {})

    def versions_tagged(self, key: str, value: str) -> dict[str, dict[str, str]]:
        """Versions whose tag ``key`` is ``value``: ``{version: tags}``."""
        found = self.client.search_model_versions(f"name = '{self.name}' and tags.`{key}` = '{value}'")
        return {str(mv.version): dict(mv.tags or {}) for mv in found}

    def metric(self, version: str, key: str = PRIMARY_METRIC) -> float | None:
        mv = self.client.get_model_version(self.name, version)
        run = self.client.get_run(mv.run_id)
        return run.data.metrics.get(key)

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``; a new ``champion`` is also added to the champion history (what
        :meth:`rollback` goes back through)."""
        if alias != ALIAS_CHAMPION:
            self.client.set_registered_model_alias(self.name, alias, version)
            return
        history = self.champion_history()
        current = self.version_for(ALIAS_CHAMPION)
        if current and (not history or history[-1] != current):  # a person moved it in the MLflow UI meanwhile
            history.append(current)
        if not history or history[-1] != version:
            history.append(version)
        self.client.set_registered_model_alias(self.name, alias, version)
        self._set_history(history)

    def champion_history(self) -> list[str]:
        """The versions that were ``champion``, oldest first, as set through shoprec (training's gate, the hourly
        refresh, ``promote``, ``rollback``); the registered model's tag ``champion_history``."""
        try:
            tags = self.client.get_registered_model(self.name).tags or {}
        except MlflowException as err:
            if _not_found(err):
                return []
            raise
        return [v for v in tags.get(TAG_CHAMPION_HISTORY, "").split(",") if v]

    def _set_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, TAG_CHAMPION_HISTORY, ",".join(history[-HISTORY_KEPT:]))

    def promote(self, version: str | None = None) -> dict[str, str | None]:
        """Make ``version`` (default: the ``challenger``'s) the ``champion``; returns the aliases before and after,
        and ``unchanged: True`` when it already is the champion (then nothing is written).

        A ``challenger`` on the promoted version stays there: it names the champion's version, so it is not
        served (all traffic goes to the champion until the gate names a new challenger). A ``challenger`` left on
        the version that was champion (promoted earlier, its alias never moved) is taken off: it would otherwise
        put the demoted champion back into a share of the traffic.

        Raises:
            ValueError: no version given and no challenger, or the version does not exist.
        """
        version = self.resolve(version) if version else self.version_for(ALIAS_CHALLENGER)
        if version is None:
            raise ValueError("no challenger to promote: name a version (`shoprec model promote VERSION`)")
        before = self.aliases()
        if before[ALIAS_CHAMPION] == version:
            return {"before": before, "after": dict(before), "unchanged": True}
        self.set_alias(ALIAS_CHAMPION, version)
        if before[ALIAS_CHALLENGER] is not None and before[ALIAS_CHALLENGER] == before[ALIAS_CHAMPION] != version:
            self.client.delete_registered_model_alias(self.name, ALIAS_CHALLENGER)
        return {"before": before, "after": self.aliases()}

    def rollback(self) -> dict:
        """Give ``champion`` back to the version the current champion replaced, and take the ``challenger`` alias off
        the version rolled back, which would otherwise stay in half the traffic.

        The version replaced is the one before it in the champion history (:meth:`champion_history`), which is
        then shortened, so a second rollback goes back one further. When the champion was moved outside shoprec
        (the MLflow UI), the version it replaced is the last one the history has. A registry without a history
        (written before it was kept) uses the champion's ``champion_before`` tag (set when it was trained or
        refreshed; a promotion by hand does not change it).

        Raises:
            ValueError: no champion, or no earlier champion to go back to.
        """
        current = self.version_for(ALIAS_CHAMPION)
        if current is None:
            raise ValueError("no champion to roll back from")
        history = self.champion_history()
        if history and history[-1] != current:
            previous = history[-1]
        elif len(history) >= 2:
            history.pop()
            previous = history[-1]
        else:
            previous = self.tags(current).get("champion_before") or ""
            if not previous or previous == "none":
                raise ValueError(f"champion version {current} names no earlier champion (neither the champion "
                                 f"history nor its tag champion_before): promote a version by hand "
                                 "(`shoprec model promote VERSION`)")
            history = [previous]
        self._must_exist(previous)
        before = self.aliases()
        self.client.set_registered_model_alias(self.name, ALIAS_CHAMPION, previous)
        self._set_history(history)
        if self.version_for(ALIAS_CHALLENGER) == current:
            self.client.delete_registered_model_alias(self.name, ALIAS_CHALLENGER)
        return {"before": before, "after": self.aliases()}

    def aliases(self) -> dict[str, str | None]:
        """``champion`` and ``challenger`` -> version (None where unset), in one request: asking for an alias that
        is not set is an error answer, which the MLflow server logs (every poll of a missing ``challenger`` did).

        Raises:
            MlflowException: the registry did not answer.
        """
        try:
            found = self.client.get_registered_model(self.name).aliases or {}
        except MlflowException as err:
            if _not_found(err):
                found = {}
            else:
                raise
        return {a: (str(found[a]) if a in found else None) for a in (ALIAS_CHAMPION, ALIAS_CHALLENGER)}

    def resolve(self, ref: str) -> str:
        """The version ``ref`` names: a number (``3``), the same as ``model show`` prints it (``v3``) or an alias
        (``champion``, ``challenger``).

        Raises:
            ValueError: no such version, or an alias that names none.
        """
        ref = str(ref).strip()
        if ref.lower() in (ALIAS_CHAMPION, ALIAS_CHALLENGER):
            version = self.version_for(ref.lower())
            if version is None:
                raise ValueError(f"{self.name} has no {ref.lower()} (`shoprec model show` lists the aliases)")
            return version
        version = ref[1:] if ref[:1] in ("v", "V") else ref
        if not version.isdigit():
            raise ValueError(f"{ref!r} is not a version: name one as a number (3, or v3 as `shoprec model show` "
                             f"prints it) or an alias ({ALIAS_CHAMPION}, {ALIAS_CHALLENGER})")
        self._must_exist(version)
        return version

    def _must_exist(self, version: str) -> None:
        try:
            self.client.get_model_version(self.name, version)
        except MlflowException as err:
            raise ValueError(f"{self.name} has no version {version!r}") from err

    def load(self, alias: str = ALIAS_CHAMPION) -> LoadedModel | None:
        """Load the model behind ``alias``; None when there is none yet."""
        version = self.version_for(alias)
        if version is None:
            return None
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        pyfunc = mlflow.pyfunc.load_model(f"models:/{self.name}/{version}")
        trained = self.tags(version).get(TAG_TRAINED_VERSION) or version
        return LoadedModel(pyfunc.unwrap_python_model().recommender, version, alias, trained)


def _metric_key(k: str) -> str:
    return k.replace("@", "_at_")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _not_found(err: MlflowException) -> bool:
    """The registry answered that the model or the alias does not exist (not that it could not answer)."""
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
