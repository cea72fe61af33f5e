"""A/B test statistics for the dashboard: intervals, lift, sample-ratio mismatch, power, a verdict.

Every number comes from statsmodels or scipy; this module only picks the
tests and turns their results into sentences a product manager can act on.

* Rates per variant (CTR = clicks / impressions, conversion = purchases /
  impressions) get Wilson score intervals (``proportion_confint``).
* Revenue per impression gets a t interval of the mean over impressions
  (``DescrStatsW``); the challenger's lift in it a Welch t-test
  (``ttest_ind_from_stats``).
* The lift of a rate is the ratio challenger / champion minus one, with the
  score interval and score test of ``confint_proportions_2indep`` /
  ``test_proportions_2indep`` (``compare="ratio"``), which agree with each
  other: the interval excludes 0 exactly when ``p < alpha``.
* Sample-ratio mismatch: chi-square goodness of fit of the impressions per
  variant against the configured shares (``scipy.stats.chisquare``).
* Sample size: impressions per variant needed to detect a relative lift of
  ``mde`` at the baseline CTR with ``alpha`` and ``power``
  (``NormalIndPower`` on Cohen's h).

The verdict is a fixed-horizon decision: a winner is named only when the
planned sample size is reached *and* the test is significant, so looking at
the dashboard every few seconds does not inflate the false-positive rate
beyond what a single look at the planned size gives (``alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "rate_interval", "mean_interval", "Lift", "rate_lift", "mean_lift",
           "SrmResult", "srm_check", "required_per_variant", "Verdict", "verdict", "cumulative_lift"]

WINNER, NO_DIFFERENCE, NOT_ENOUGH = "winner", "no difference yet", "not enough data"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval (NaN when undefined)."""

    value: float
    low: float
    high: float


def rate_interval(successes: int, trials: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval of ``successes / trials``; NaN when ``trials`` is 0. Values in [0, 1]."""
    from statsmodels.stats.proportion import proportion_confint

    if trials <= 0:
        return Interval(math.nan, math.nan, math.nan)
    x = min(int(successes), int(trials))
    lo, hi = proportion_confint(x, trials, alpha=alpha, method="wilson")
    return Interval(x / trials, float(lo), float(hi))


def mean_interval(values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> Interval:
    """Mean with its t interval (e.g. revenue per impression, one value per impression).

    With no negative value (revenue) the interval is cut at 0: a mean of such values cannot be below
    it, whereas the t interval of a few purchases among many zeros reaches below 0.
    """
    from statsmodels.stats.weightstats import DescrStatsW

    v = np.asarray(values, dtype="float64")
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    if v.size == 1 or float(v.std()) == 0.0:
        m = float(v.mean())
        return Interval(m, m, m)
    lo, hi = DescrStatsW(v).tconfint_mean(alpha=alpha)
    if float(v.min()) >= 0.0:
        lo = max(float(lo), 0.0)
    return Interval(float(v.mean()), float(lo), float(hi))


@dataclass(frozen=True)
class Lift:
    """Relative lift of ``b`` over baseline ``a`` (0.1 = +10 %) with its interval and two-sided p-value.

    For rates (:func:`rate_lift`) ``rate_b / rate_a - 1`` with the score interval of the ratio; for means
    (:func:`mean_lift`) ``mean_b / mean_a - 1`` with the Welch interval of the difference divided by the
    baseline mean (the baseline's own noise is left out of that scaling).
    """

    lift: float
    low: float
    high: float
    p_value: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha


def rate_lift(x_a: int, n_a: int, x_b: int, n_b: int, alpha: float = 0.05) -> Lift | None:
    """Score test and score interval of the ratio of two proportions (``b`` vs baseline ``a``), two-sided.

    Returns None when a variant has no trials or the baseline has no successes (no ratio).
    """
    from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

    if n_a <= 0 or n_b <= 0:
        return None
    x_a, x_b = min(int(x_a), n_a), min(int(x_b), n_b)
    if x_a == 0:
        return None
    if x_a + x_b == n_a + n_b:  # everybody succeeded everywhere: no variance, no evidence
        return Lift(0.0, 0.0, 0.0, 1.0, alpha)
    # correction=False: the plain score test, which for "no difference" is the pooled two-proportion z-test
    test = test_proportions_2indep(x_b, n_b, x_a, n_a, compare="ratio", method="score", correction=False)
    lo, hi = confint_proportions_2indep(x_b, n_b, x_a, n_a, compare="ratio", method="score", alpha=alpha,
                                        correction=False)
    p = float(test.pvalue)
    return Lift((x_b / n_b) / (x_a / n_a) - 1, float(lo) - 1, float(hi) - 1,
                    1.0 if math.isnan(p) else p, alpha)


def mean_lift(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float], alpha: float = 0.05) -> Lift | None:
    """Welch t-test of mean(b) vs mean(a) (e.g. revenue per impression); None without data or baseline."""
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    if a.size < 2 or b.size < 2 or a.mean() == 0:
        return None
    ma, mb = float(a.mean()), float(b.mean())
    if a.std() == 0 and b.std() == 0:
        return Lift(mb / ma - 1, mb / ma - 1, mb / ma - 1, 1.0 if ma == mb else 0.0, alpha)
    cm = CompareMeans(DescrStatsW(b), DescrStatsW(a))
    _, p, _ = cm.ttest_ind(usevar="unequal")
    lo, hi = cm.tconfint_diff(alpha=alpha, usevar="unequal")
    return Lift(mb / ma - 1, float(lo) / ma, float(hi) / ma, float(p), alpha)


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio mismatch check: observed impressions per variant against the configured shares."""

    observed: dict[str, int]
    expected_share: dict[str, float]
    chi2: float
    p_value: float
    threshold: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.threshold

    @property
    def observed_share(self) -> dict[str, float]:
        n = sum(self.observed.values())
        return {v: (c / n if n else math.nan) for v, c in self.observed.items()}


def srm_check(observed: Mapping[str, int], expected_share: Mapping[str, float],
              threshold: float = 0.001) -> SrmResult | None:
    """Chi-square goodness of fit of ``observed`` counts against ``expected_share`` (normalised to 1).

    The usual threshold is strict (0.001): a mismatch means the split itself is broken (a bug in
    assignment or logging), which makes every other number on the page untrustworthy.
    Returns None with fewer than two variants or no observations.
    """
    from scipy.stats import chisquare

    variants = [v for v in expected_share if expected_share[v] > 0]
    obs = np.array([int(observed.get(v, 0)) for v in variants], dtype="float64")
    if len(variants) < 2 or obs.sum() <= 0:
        return None
    shares = np.array([float(expected_share[v]) for v in variants])
    shares = shares / shares.sum()
    chi2, p = chisquare(obs, f_exp=shares * obs.sum())
    return SrmResult({v: int(o) for v, o in zip(variants, obs)}, dict(zip(variants, shares.tolist())),
                     float(chi2), float(p), threshold)


def required_per_variant(baseline_rate: float, mde: float, alpha: float = 0.05, power: float = 0.8,
                         ratio: float = 1.0) -> int | None:
    """Impressions the baseline variant needs to detect a relative lift ``mde`` of ``baseline_rate``.

    Args:
        baseline_rate: the champion's CTR, in (0, 1).
        mde: minimum detectable effect as a relative lift (0.1 = +10 %).
        ratio: size of the other variant relative to the baseline (challenger share / champion share).

    Returns:
        Impressions for the baseline (the other needs ``ratio`` times as many); None when the rate is 0 or 1.
    """
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    if not 0 < baseline_rate < 1 or mde <= 0:
        return None
    target = min(baseline_rate * (1 + mde), 1 - 1e-9)
    h = abs(float(proportion_effectsize(target, baseline_rate)))
    if h == 0:
        return None
    n = NormalIndPower().solve_power(effect_size=h, alpha=alpha, power=power, ratio=ratio, alternative="two-sided")
    return int(math.ceil(float(np.asarray(n).item())))


@dataclass(frozen=True)
class Verdict:
    """The plain-language decision: ``kind`` is ``winner``, ``no difference yet`` or ``not enough data``."""

    kind: str
    winner: str | None
    message: str
    required: int | None
    remaining: int | None


def verdict(a: str, b: str, x_a: int, n_a: int, x_b: int, n_b: int, *, alpha: float = 0.05, power: float = 0.8,
            mde: float = 0.1, ratio: float | None = None, metric: str = "CTR") -> Verdict:
    """Fixed-horizon verdict on the CTR of ``b`` (challenger) against ``a`` (champion).

    * not enough data: the baseline has fewer impressions than the planned size for ``mde``
      (or no clicks yet to plan from); says how many more impressions are needed, in all and per variant;
    * winner: planned size reached and the two-sided test is significant; the variant with the higher
      rate wins;
    * no difference yet: planned size reached, not significant (any true lift is likely below ``mde``).
    """
    ratio = (n_b / n_a if n_a else 1.0) if ratio is None else ratio
    rate_a = x_a / n_a if n_a else 0.0
    required = required_per_variant(rate_a, mde, alpha, power, ratio=max(ratio, 1e-6)) if n_a else None
    lift = rate_lift(x_a, n_a, x_b, n_b, alpha)
    if required is None:
        return Verdict(NOT_ENOUGH, None, f"Not enough data yet: no {metric} events for {a} to plan the test from. "
                       "Keep the experiment running.", None, None)
    need_b = int(math.ceil(required * ratio))
    more_a, more_b = max(required - n_a, 0), max(need_b - n_b, 0)
    remaining = more_a + more_b  # in all: the time to a verdict is the traffic of both
    mde_txt = f"{mde:+.0%}".replace("+", "±")
    if remaining > 0:
        lead = ""
        if lift is not None and lift.significant:
            ahead = b if lift.lift > 0 else a
            lead = f" {ahead} is ahead so far (p = {lift.p_value:.3g}), but calling it now would be premature."
        return Verdict(NOT_ENOUGH, None,
                       f"Not enough data yet: to detect a {mde_txt} change of {metric} (alpha {alpha}, power {power:.0%}) "
                       f"each variant needs about {required:,} impressions for {a} and {need_b:,} for {b}; "
                       f"about {remaining:,} more are still needed in all ({more_a:,} for {a}, {more_b:,} for "
                       f"{b}).{lead}", required, remaining)
    if lift is not None and lift.significant:
        win, lose = (b, a) if lift.lift > 0 else (a, b)
        conf = f"{1 - alpha:.0%}"
        return Verdict(WINNER, win,
                       f"{win} wins: {b}'s {metric} is {abs(lift.lift):.1%} {'higher' if lift.lift > 0 else 'lower'} "
                       f"than {a}'s ({conf} interval {lift.low:+.1%} to {lift.high:+.1%}, p = {lift.p_value:.3g} "
                       f"< {alpha}). Roll out {win}.", required, 0)
    p_txt = f"p = {lift.p_value:.3g}" if lift is not None else "no clicks to compare"
    return Verdict(NO_DIFFERENCE, None,
                   f"No difference yet: after the planned {required:,} impressions per variant the {metric} of {b} "
                   f"and {a} do not differ significantly ({p_txt} ≥ {alpha}); any real difference is probably "
                   f"smaller than {mde_txt}. Keep the champion, or run longer to detect smaller effects.",
                   required, 0)


def cumulative_lift(a_counts: np.ndarray, b_counts: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Cumulative CTR lift of ``b`` over ``a`` per time step.

    The band is the log (Katz) interval of the ratio, computed for all steps in one vectorised
    statsmodels call (the score interval of :func:`rate_lift` needs a root search per step, too slow
    for a week of minutes); at the last step the two agree closely.

    Args:
        a_counts, b_counts: shape (T, 2) arrays of (impressions, clicks) per step, oldest first.

    Returns:
        Shape (T, 3): lift, low, high per step (NaN while a ratio is undefined).
    """
    from statsmodels.stats.proportion import confint_proportions_2indep

    ca, cb = np.cumsum(np.asarray(a_counts), axis=0), np.cumsum(np.asarray(b_counts), axis=0)
    out = np.full((len(ca), 3), np.nan)
    n_a, x_a = ca[:, 0], np.minimum(ca[:, 1], ca[:, 0])
    n_b, x_b = cb[:, 0], np.minimum(cb[:, 1], cb[:, 0])
    ok = (n_a > 0) & (n_b > 0) & (x_a > 0) & (x_b > 0)
    if ok.any():
        lo, hi = confint_proportions_2indep(x_b[ok], n_b[ok], x_a[ok], n_a[ok], compare="ratio", method="log",
                                            alpha=alpha)
        out[ok, 0] = (x_b[ok] / n_b[ok]) / (x_a[ok] / n_a[ok]) - 1
        out[ok, 1] = np.asarray(lo) - 1
        out[ok, 2] = np.asarray(hi) - 1
    return out
