"""The A/B experiment: variants mapped to MLflow aliases, traffic shares, sticky salted-hash assignment.

An experiment comes from settings (``ab_experiment``, ``ab_salt``, ``ab_challenger_share``) or
from a YAML file (``SHOPREC_AB_EXPERIMENT_FILE``)::

    name: ranking-2026-11
    salt: ranking-2026-11-a
    variants:          # variant name (= MLflow alias) -> traffic share; shares sum to 1
      champion: 0.8
      challenger: 0.2
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.schemas import ALIAS_CHALLENGER, ALIAS_CHAMPION
from pipelines.settings import Settings

_SCALE = 2**64
#: an experiment or variant name: it becomes part of Redis keys and of every impression's ``experiment`` tag
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}").fullmatch
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}").fullmatch  # an MLflow alias, without '.' (the tag's separator)
_TAG_MAX = 128  # an event id's length limit (pipelines.schemas.Id)
_VERSION_CHARS = 8  # room for ".<version>" and ":" per variant in a tag


@dataclass(frozen=True)
class Experiment:
    """One running experiment.

    Attributes:
        name: experiment name (the A/B counters in Redis are kept under it).
        salt: mixed into the hash; a new salt reshuffles every user.
        variants: variant name (an MLflow alias) -> traffic share in [0, 1]; shares sum to 1.
    """

    name: str
    salt: str
    variants: dict[str, float] = field(default_factory=lambda: {ALIAS_CHAMPION: 1.0})

    def __post_init__(self):
        if not _NAME(self.name):
            raise ValueError(f"experiment name {self.name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        bad = [v for v in self.variants if not _VARIANT(v)]
        if bad:
            raise ValueError(f"experiment {self.name!r}: variant {bad[0]!r} is not an MLflow alias name; "
                             "use 1-32 letters, digits, '_' or '-'")
        if len(self.name) + 1 + sum(len(v) + _VERSION_CHARS for v in self.variants) > _TAG_MAX:
            raise ValueError(f"experiment {self.name!r}: name and variant names are too long for the tag every "
                             f"impression carries ({_TAG_MAX} characters); shorten them")
        if not self.variants or any(s < 0 for s in self.variants.values()):
            raise ValueError(f"experiment {self.name!r}: give each variant a share >= 0")
        total = sum(self.variants.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"experiment {self.name!r}: traffic shares sum to {total:g}; make them sum to 1")
        if ALIAS_CHAMPION not in self.variants:
            raise ValueError(f"experiment {self.name!r} needs a '{ALIAS_CHAMPION}' variant (the default)")

    @classmethod
    def from_settings(cls, settings: Settings) -> Experiment:
        if settings.ab_experiment_file:
            return cls.from_yaml(settings.ab_experiment_file)
        share = settings.ab_challenger_share
        return cls(settings.ab_experiment, settings.ab_salt, {ALIAS_CHAMPION: 1.0 - share, ALIAS_CHALLENGER: share})

    @classmethod
    def from_yaml(cls, path: str | Path) -> Experiment:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ValueError(f"cannot read the experiment file {path}: {err}; fix SHOPREC_AB_EXPERIMENT_FILE") from None
        if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
            raise ValueError(f"{path}: expected 'name', 'salt' and a 'variants' mapping of alias -> share")
        name = str(data.get("name", "default"))
        return cls(name, str(data.get("salt", name)), {str(k): float(v) for k, v in data["variants"].items()})

    def tag(self, versions: Mapping[str, str | None]) -> str:
        """The comparison running while ``versions`` (alias -> version) are served: the experiment name and the
        version of each variant served, in the experiment's order (``default@champion.2:challenger.3``).
        Serving passes each variant's *trained* version (a refreshed version's ``trained_version`` tag), so
        that the hourly refreshes of both arms continue one comparison instead of starting a new one each hour.

        Every impression carries it, and the A/B counters are kept per tag: a new challenger version (or a
        new champion) starts a new comparison instead of mixing into the counts of the last one, and the
        champion's traffic from before a challenger was served stays out of the comparison with it.
        """
        served = [f"{v}.{versions[v]}" for v in self.variants if versions.get(v)]
        return f"{self.name}@{':'.join(served)}" if served else self.name

    def bucket(self, user_id: str) -> float:
        """The user's sticky position in [0, 1) (a salted SHA-256 hash)."""
        h = hashlib.sha256(f"{self.salt}:{user_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / _SCALE

    def assign(self, user_id: str, available: Collection[str] | None = None) -> str:
        """The variant of ``user_id``.

        Args:
            user_id: the user.
            available: variants that can serve right now (aliases with a loaded model); a user whose
                variant is not available goes to the champion. ``None`` means all.
        """
        x = self.bucket(user_id)
        acc = 0.0
        chosen = ALIAS_CHAMPION
        for variant, share in self.variants.items():
            acc += share
            if x < acc:
                chosen = variant
                break
        if available is not None and chosen not in available:
            return ALIAS_CHAMPION
        return chosen


def counter_name(settings: Settings) -> str:
    """The experiment name the A/B counters live under: the YAML file's ``name`` when there is one.

    The stream consumer (which counts), serving and the dashboard (which reads) all use this, so an
    experiment file's name reaches every one of them (``ab_experiment`` alone is the default).
    """
    return Experiment.from_settings(settings).name

