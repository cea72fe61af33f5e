"""A/B statistics: hand-checked examples, agreement with scipy/statsmodels, SRM, power, A/A false positives,
and A/B validity end to end on the closed-loop simulator."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats import proportion as smp
from statsmodels.stats.power import NormalIndPower

from pipelines import abstats
from pipelines import dashboard_data as dd
from pipelines.experiment import Experiment
from pipelines.state import OnlineState
from dashboard import abrun


# --- hand-checked examples ----------------------------------------------------------------------
def test_wilson_interval_hand_checked():
    # 50 / 1000: z = 1.95996; centre (0.05 + z²/2000) / (1 + z²/1000) = 0.051728;
    # half-width z * sqrt(0.05*0.95/1000 + z²/4e6) / (1 + z²/1000) = 0.013592
    r = abstats.rate_interval(50, 1000)
    assert r.value == 0.05
    assert (r.low, r.high) == pytest.approx((0.038130, 0.065314), abs=1e-6)
    assert math.isnan(abstats.rate_interval(0, 0).value)
    assert abstats.rate_interval(150, 100).value == 1.0  # late clicks are capped at the impressions


def test_rate_lift_hand_checked_and_equals_pooled_z_test():
    # 80/1000 vs 50/1000: lift 0.08/0.05 - 1 = +60 %; pooled z = 0.03 / sqrt(0.065*0.935*2/1000) = 2.7211
    r = abstats.rate_lift(50, 1000, 80, 1000)
    assert r.lift == pytest.approx(0.6)
    z = 0.03 / math.sqrt(0.065 * 0.935 * 2 / 1000)
    assert z == pytest.approx(2.7211, abs=1e-4)
    assert r.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-6)
    chi2, p, _, _ = stats.chi2_contingency([[80, 920], [50, 950]], correction=False)
    assert r.p_value == pytest.approx(p, rel=1e-6)
    assert r.significant and r.low > 0 and r.high > r.lift
    # the interval excludes 0 exactly when the test is significant (both are score methods)
    for x_b in range(40, 90, 3):
        rr = abstats.rate_lift(50, 1000, x_b, 1000)
        assert (rr.low > 0 or rr.high < 0) == rr.significant, x_b
    assert abstats.rate_lift(0, 100, 5, 100) is None and abstats.rate_lift(5, 0, 5, 100) is None


@pytest.mark.parametrize("x_a,n_a,x_b,n_b", [(50, 1000, 80, 1000), (400, 5000, 330, 4000), (3, 300, 9, 250)])
def test_rate_lift_matches_statsmodels(x_a, n_a, x_b, n_b):
    r = abstats.rate_lift(x_a, n_a, x_b, n_b)
    lo, hi = smp.confint_proportions_2indep(x_b, n_b, x_a, n_a, compare="ratio", method="score",
                                             correction=False)
    assert (r.low, r.high) == pytest.approx((lo - 1, hi - 1), rel=1e-9)
    p = smp.test_proportions_2indep(x_b, n_b, x_a, n_a, compare="ratio", method="score",
                                    correction=False).pvalue
    assert r.p_value == pytest.approx(p, rel=1e-9)


def test_mean_interval_and_lift_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.exponential(30, 2000) * (rng.random(2000) < 0.05)
    b = rng.exponential(30, 2000) * (rng.random(2000) < 0.08)
    m = abstats.mean_interval(a)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert (m.value, m.low, m.high) == pytest.approx((a.mean(), lo, hi), rel=1e-9)
    lift = abstats.mean_lift(a, b)
    welch = stats.ttest_ind(b, a, equal_var=False)
    assert lift.p_value == pytest.approx(welch.pvalue, rel=1e-9)
    ci = welch.confidence_interval(0.95)
    assert (lift.low, lift.high) == pytest.approx((ci.low / a.mean(), ci.high / a.mean()), rel=1e-9)
    assert lift.lift == pytest.approx(b.mean() / a.mean() - 1)
    assert abstats.mean_lift([0, 0, 0], [1, 2, 3]) is None  # no baseline revenue: no relative lift
    # hand-checked: [0, 0, 1, 2] has mean 0.75, sd 0.9574, t(3, 0.975) = 3.1824 -> 0.75 ± 1.5235
    assert abstats.mean_interval([0, 0, 1, 2]).high == pytest.approx(0.75 + 3.18245 * 0.957427 / 2, rel=1e-5)
    # ... whose lower end, 0.75 - 1.5235, would be negative: revenue per impression is never below 0
    assert abstats.mean_interval([0, 0, 1, 2]).low == 0.0
    assert abstats.mean_interval([-1, 0, 1, 2]).low < 0  # values that can be negative keep the t interval


# --- sample-ratio mismatch ----------------------------------------------------------------------------
def test_srm_detects_a_skewed_split_and_accepts_a_fair_one():
    skewed = abstats.srm_check({"champion": 5200, "challenger": 4800}, {"champion": 0.5, "challenger": 0.5})
    assert skewed.chi2 == pytest.approx(16.0)  # (200² + 200²) / 5000
    assert skewed.p_value == pytest.approx(stats.chi2.sf(16.0, 1)) and skewed.mismatch
    assert skewed.observed_share["champion"] == pytest.approx(0.52)
    fair = abstats.srm_check({"champion": 5030, "challenger": 4970}, {"champion": 0.5, "challenger": 0.5})
    assert not fair.mismatch
    configured = abstats.srm_check({"champion": 8000, "challenger": 2000}, {"champion": 0.8, "challenger": 0.2})
    assert configured.chi2 == pytest.approx(0.0) and not configured.mismatch
    assert abstats.srm_check({"champion": 8000, "challenger": 2000}, {"champion": 0.5, "challenger": 0.5}).mismatch
    assert abstats.srm_check({"champion": 0, "challenger": 0}, {"champion": 0.5, "challenger": 0.5}) is None


# --- sample size and verdict -------------------------------------------------------------------------
def test_required_sample_size_matches_statsmodels_power():
    n = abstats.required_per_variant(0.05, 0.10, alpha=0.05, power=0.8)
    h = smp.proportion_effectsize(0.055, 0.05)
    assert n == math.ceil(NormalIndPower().solve_power(abs(h), alpha=0.05, power=0.8, ratio=1.0))
    assert 31_000 < n < 31_500  # the textbook ~31k per arm for +10 % on a 5 % rate
    # the power is reached: a test with n per arm detects +10 % about 80 % of the time
    assert NormalIndPower().power(abs(h), n, alpha=0.05) == pytest.approx(0.8, abs=1e-3)
    assert abstats.required_per_variant(0.0, 0.1) is None
    assert abstats.required_per_variant(0.05, 0.1, ratio=0.25) > n  # a small challenger needs a bigger champion


def test_verdict_kinds():
    early = abstats.verdict("champion", "challenger", 50, 1000, 80, 1000)
    assert early.kind == "not enough data" and early.winner is None
    # still needed: the shortfall of both variants, not of one (that read as half the time to a verdict)
    assert early.remaining == 2 * (early.required - 1000) and "challenger is ahead" in early.message
    assert f"{early.remaining:,} more are still needed in all ({early.required - 1000:,} for champion, " in early.message
    lopsided = abstats.verdict("champion", "challenger", 50, 1000, 80, 1000, ratio=0.5)  # challenger gets 1/3
    assert lopsided.remaining == (lopsided.required - 1000) + max(0, math.ceil(lopsided.required * 0.5) - 1000)
    win = abstats.verdict("champion", "challenger", 2000, 40_000, 2600, 40_000)
    assert (win.kind, win.winner) == ("winner", "challenger") and "+" in win.message
    lose = abstats.verdict("champion", "challenger", 2600, 40_000, 2000, 40_000)
    assert (lose.kind, lose.winner) == ("winner", "champion")
    same = abstats.verdict("champion", "challenger", 2000, 40_000, 2030, 40_000)
    assert same.kind == "no difference yet" and same.winner is None
    assert abstats.verdict("champion", "challenger", 0, 500, 3, 500).kind == "not enough data"


def test_aa_false_positive_rate_is_near_alpha():
    """1,000 A/A experiments run past the planned size (binomial draws): winners ~alpha of the time."""
    rng = np.random.default_rng(7)
    p, alpha, runs = 0.08, 0.05, 1000
    # the plan is estimated from the observed baseline, so run 20 % past it as an experimenter would
    n = int(1.2 * abstats.required_per_variant(p, 0.1, alpha=alpha, power=0.8))
    xa, xb = rng.binomial(n, p, runs), rng.binomial(n, p, runs)
    winners = sum(abstats.verdict("champion", "challenger", int(a), n, int(b), n, alpha=alpha).kind == "winner"
                  for a, b in zip(xa, xb))
    rate = winners / runs
    # binomial sd of the rate: sqrt(0.05*0.95/1000) = 0.0069; allow ~3 sd
    assert abs(rate - alpha) < 0.02, rate


def test_ab_power_is_reached():
    """With a true +10 % lift, experiments name the challenger as often as the power at their size says."""
    rng = np.random.default_rng(8)
    p, runs = 0.08, 600
    n = int(1.2 * abstats.required_per_variant(p, 0.1))
    expected = NormalIndPower().power(abs(smp.proportion_effectsize(p * 1.1, p)), n, alpha=0.05)
    assert 0.85 < expected < 0.95
    xa, xb = rng.binomial(n, p, runs), rng.binomial(n, p * 1.1, runs)
    wins = [abstats.verdict("champion", "challenger", int(a), n, int(b), n) for a, b in zip(xa, xb)]
    share = sum(w.winner == "challenger" for w in wins) / runs
    assert abs(share - expected) < 0.05, (share, expected)
    assert not any(w.winner == "champion" for w in wins)  # never the wrong sign


def test_cumulative_lift_converges_to_the_total():
    steps = np.array([[100, 5], [100, 6], [100, 4]]), np.array([[100, 8], [100, 9], [100, 7]])
    out = abstats.cumulative_lift(*steps)
    assert out.shape == (3, 3)
    assert out[0, 0] == pytest.approx(8 / 5 - 1) and out[-1, 0] == pytest.approx(24 / 15 - 1)
    assert (out[:, 1] <= out[:, 0]).all() and (out[:, 0] <= out[:, 2]).all()


# --- end to end on the closed-loop simulator --------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    return abrun.trained_world()


def run_experiment(world, variants, n_sessions, redis_client, tmp_path, salt):
    sim, models = world
    exp = Experiment("sim", salt, {"champion": 0.5, "challenger": 0.5})
    fn = abrun.recommend_fn({v: models[m] for v, m in variants.items()}, exp)
    now = int(time.time() * 1000)
    events = abrun.run_sessions(sim, fn, n_sessions, start_ms=now - 6 * 3_600_000, end_ms=now - 60_000)
    state = OnlineState(redis_client, experiment="sim")
    abrun.record(state, events, tmp_path / "lake")
    counts = state.ab_counts()
    assert counts == abrun.ab_counts(events)  # what Redis holds is what the users did
    return counts, dd.fetch_lake_ab(tmp_path / "lake", hours=8).of("sim", "sim")


@pytest.mark.slow
def test_simulated_ab_names_the_trained_model_winner(world, redis_client, tmp_path):
    """BPR fitted on the shop's history against popularity: the dashboard's analysis names BPR, lift > 0."""
    counts, lake = run_experiment(world, {"champion": "popularity", "challenger": "bpr"}, 30_000,
                                  redis_client, tmp_path, salt="ab-1")
    report = dd.ab_report(counts, lake.revenue, dd.ABConfig(), users=lake.users)
    assert report.verdict.kind == "winner" and report.verdict.winner == "challenger", report.verdict.message
    ctr = report.lifts.loc["CTR"]
    assert ctr.lift > 0 and ctr.low > 0 and ctr.p_value < 0.05
    assert report.srm_unit == "users" and not report.srm.mismatch
    assert report.variants.loc["challenger", "ctr"] > report.variants.loc["champion", "ctr"]
    assert report.variants["revenue_impressions"].sum() == sum(c["impressions"] for c in counts.values())


@pytest.mark.slow
def test_simulated_aa_declares_no_winner(world, redis_client, tmp_path):
    counts, lake = run_experiment(world, {"champion": "popularity", "challenger": "popularity"}, 30_000,
                                  redis_client, tmp_path, salt="aa-1")
    report = dd.ab_report(counts, lake.revenue, dd.ABConfig(), users=lake.users)
    assert report.verdict.kind != "winner", report.verdict.message
    assert report.verdict.winner is None and not report.srm.mismatch
