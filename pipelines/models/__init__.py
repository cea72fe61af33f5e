"""Recommenders behind one interface; ``get_recommender(name, **params)`` builds one by name."""

from __future__ import annotations

import warnings

from pipelines.models.base import Recommender, Scored, load_recommender

# torch notes once per process that sparse CSR tensors are "in beta"; item-to-item and iALS use them on purpose
# (tested), and the note filled every training run's log
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

REGISTRY: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    REGISTRY[cls.name] = cls
    return cls


def get_recommender(name: str = "bpr", **params) -> Recommender:
    """Build an untrained recommender by name (see ``REGISTRY`` for the names; ``shoprec`` is the
    production hybrid, ``itemitem`` and ``twotower`` its parts, ``bpr`` and ``popularity`` baselines)."""
    from pipelines.models import bpr, hybrid, itemitem, popularity, twotower  # noqa: F401  (fill the registry)

    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown recommender {name!r}; choose one of {sorted(REGISTRY)}") from None
    return cls(**params)


__all__ = ["REGISTRY", "Recommender", "Scored", "get_recommender", "load_recommender", "register"]
