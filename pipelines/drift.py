"""Drift of the event mix: population stability index (PSI) on event types and categories.

PSI compares two distributions over the same categories::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with ``e`` the reference shares (what the model was trained on) and ``a`` the current
shares. It is the symmetric KL divergence ``KL(a||e) + KL(e||a)``. Rule of thumb:
below 0.1 no shift, 0.1-0.25 a moderate shift, above 0.25 a large one. Shares are
smoothed with ``eps`` so a category absent on one side gives a large finite value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import rel_entr

from pipelines.schemas import COL_CATEGORY, COL_EVENT_TYPE, COL_ITEM

#: added to every share before the logarithm (a category missing on one side)
EPS = 1e-4
#: the events whose mix says something about the shop: impressions and the clicks on them follow serving
#: (request load, a load test, the cache warm-up after training), so counted in they made the first check
#: after any training report drift (PSI 1.7 on the local stack)
SHOP_EVENT_TYPES = ("view", "add_to_cart", "purchase")


def psi(expected: Mapping[str, float], actual: Mapping[str, float], eps: float = EPS) -> float:
    """Population stability index between two count (or share) distributions.

    Args:
        expected: reference counts per category (e.g. the training window).
        actual: current counts per category.
        eps: smoothing added to each share, > 0.

    Returns:
        PSI in ``[0, inf)``; 0 for identical shares, 0.0 when either side is empty.
    """
    keys = sorted(set(expected) | set(actual))
    e = np.array([float(expected.get(k, 0.0)) for k in keys])
    a = np.array([float(actual.get(k, 0.0)) for k in keys])
    if not keys or e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    e = e / e.sum() + eps
    a = a / a.sum() + eps
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum(rel_entr(a, e) + rel_entr(e, a)))


@dataclass
class DriftReport:
    """PSI per dimension of the event mix and whether any exceeds the threshold."""

    psi: dict[str, float]
    threshold: float
    reference_rows: int
    current_rows: int
    shares: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return any(v > self.threshold for v in self.psi.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in self.psi.items()) or "nothing to compare"
        return f"PSI {parts} (threshold {self.threshold}; {self.reference_rows} vs {self.current_rows} events)"


def _counts(df: pd.DataFrame, column: str) -> dict[str, int]:
    if df.empty or column not in df:
        return {}
    return {str(k): int(v) for k, v in df[column].dropna().value_counts().items()}


def _with_category(events: pd.DataFrame, catalog: pd.DataFrame | None) -> pd.DataFrame:
    if catalog is None or catalog.empty or events.empty:
        return events.iloc[:0].assign(**{COL_CATEGORY: pd.Series(dtype="object")})
    cats = catalog.set_index(COL_ITEM)[COL_CATEGORY]
    return events.assign(**{COL_CATEGORY: events[COL_ITEM].map(cats)})


def event_mix_drift(reference: pd.DataFrame, current: pd.DataFrame, *, threshold: float = 0.2,
                    catalog: pd.DataFrame | None = None, min_rows: int = 100) -> DriftReport:
    """Compare the event mix of ``current`` events with ``reference`` events.

    Dimensions: ``event_type`` and, when a catalog is given, the product ``category``, both over the
    shop's own events (:data:`SHOP_EVENT_TYPES`: not impressions and clicks, which follow serving).

    Args:
        reference: lake events the current model was trained on.
        current: lake events that arrived since.
        threshold: PSI above which a dimension counts as drifted.
        catalog: the catalog (``item_id``, ``category``) or None.
        min_rows: with fewer events on either side nothing is compared (PSI of a handful of
            events is noise).
    """
    out: dict[str, float] = {}
    shares: dict[str, dict[str, dict[str, float]]] = {}
    reference = reference[reference[COL_EVENT_TYPE].isin(SHOP_EVENT_TYPES)]
    current = current[current[COL_EVENT_TYPE].isin(SHOP_EVENT_TYPES)]
    if len(reference) >= min_rows and len(current) >= min_rows:
        dims = [(COL_EVENT_TYPE, reference, current)]
        if catalog is not None:
            dims.append((COL_CATEGORY, _with_category(reference, catalog), _with_category(current, catalog)))
        for name, ref, cur in dims:
            e, a = _counts(ref, name), _counts(cur, name)
            if name == COL_EVENT_TYPE:
                e = {k: e.get(k, 0) for k in SHOP_EVENT_TYPES} | e
            if sum(e.values()) and sum(a.values()):
                out[name] = psi(e, a)
                shares[name] = {"reference": _shares(e), "current": _shares(a)}
    return DriftReport(out, threshold, len(reference), len(current), shares)


def _shares(counts: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(counts.values())) or 1.0
    return {k: round(v / total, 4) for k, v in counts.items()}


__all__ = ["DriftReport", "event_mix_drift", "psi"]
