"""plumbing.stats against published values: Newcombe (1998) Table II for the score intervals, Fleiss' sample size
for the detectable difference, the Student-t interval for the question-level bootstrap."""

from statistics import NormalDist

import numpy as np
import pytest

from plumbing.stats import (
    DEFF_FLOOR,
    chosen,
    cluster_difference,
    design_effect,
    mean_ci,
    min_detectable_difference,
    min_detectable_mean,
    newcombe,
    reported,
    stratified_wilson_bounds,
    two_sided_z,
    wilson,
)


@pytest.mark.parametrize(
    "k, n, ref",
    [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))],
)
def test_wilson_matches_newcombe_1998(k, n, ref):
    assert wilson(k, n) == pytest.approx(ref, abs=5e-5)


@pytest.mark.parametrize(
    "counts, ref",
    [
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
        ((0, 10, 0, 20), (-0.1611, 0.2775)),
        ((0, 10, 0, 10), (-0.2775, 0.2775)),
        ((10, 10, 0, 20), (0.6791, 1.0)),
        ((10, 10, 0, 10), (0.6075, 1.0)),
    ],
)
def test_newcombe_hybrid_score_matches_newcombe_1998_method_10(counts, ref):
    assert newcombe(*counts) == pytest.approx(ref, abs=5e-5)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_two_sided_z_is_the_normal_quantile(level):
    assert two_sided_z(level) == pytest.approx(NormalDist().inv_cdf((1 + level) / 2), rel=1e-12)
    with pytest.raises(ValueError, match="level must lie in"):
        two_sided_z(95)


def test_empty_counts_give_no_interval_and_one_reply_a_wide_one():
    assert wilson(0, 0) == [None, None] and newcombe(1, 2, 0, 0) == [None, None]
    lo, hi = wilson(
        1, 8
    )  # one misaligned reply of 8 (one per question): the interval a single reply per question earns
    assert lo < 0.125 < hi and hi - lo > 0.4


def test_detectable_difference_matches_fleiss_sample_size():
    # Fleiss (no continuity correction): 199 per group detect 0.10 -> 0.20 at alpha 0.05 with 80% power
    assert min_detectable_difference(0.1, 199, 199) == pytest.approx(0.1, abs=1e-3)
    assert min_detectable_difference(0.1, 10, 10) > min_detectable_difference(0.1, 100, 100)
    assert min_detectable_difference(0.5, 1, 1) is None and min_detectable_difference(0.1, 0, 5) is None
    assert min_detectable_mean(1.0, 1000) == pytest.approx(2.8 / 1000**0.5, rel=0.01)  # (1.96 + 0.84) sd / sqrt(n)


def test_question_bootstrap_of_a_mean_has_the_t_interval_width():
    x = np.random.default_rng(0).normal(size=30) + 10
    ref = mean_ci(list(x))["ci"]
    got = cluster_difference(x, np.ones(30), n_boot=20000)  # one reply per question: the rate is the mean
    assert got == pytest.approx(ref, abs=0.02 * (ref[1] - ref[0]))
    assert cluster_difference([1.0], [2.0]) == [None, None]


def test_reported_and_chosen_read_the_calibrated_counts():
    assert reported("cluster", 1, 56) and not reported("cluster", 50, 8)
    assert reported("paired_t", 10, 8) and reported("paired_t", 1, 56) and not reported("paired_t", 2, 8)
    assert (
        chosen("rate", 1, 8) == "wilson"
        and chosen("rate", 5, 8) == "wilson_strat"
        and chosen("rate", 2, 56) == "wilson_strat"
    )
    # pooled Newcombe covers 98.5-99.6% under the null at 1-2 replies x 8 questions: no difference interval there
    assert chosen("difference", 2, 8) is None and chosen("difference", 1, 56) == "newcombe"
    assert chosen("difference", 50, 8) == "newcombe_strat"
    assert reported("wilson_question", 2, 1) and not reported("wilson_question", 1, 1)
    assert chosen("difference", 50, 7) is None
    with pytest.raises(ValueError, match="unknown"):
        reported("bootstrap", 10, 10)


def test_design_effect_of_the_question_strata():
    # by hand: within-question variances (0.09 + 0.24) * 10 / 9 * 10 over the pooled 20 * 0.35 * 0.65
    assert design_effect([1, 6], [10, 10]) == pytest.approx((0.09 + 0.24) * 100 / 9 / (20 * 0.35 * 0.65))
    assert design_effect([0, 10], [10, 10]) == DEFF_FLOOR  # every reply predicted by its question: floored
    assert design_effect([5, 5], [10, 10]) == 1.0  # identical questions gain nothing from the strata (clipped at 1)
    assert design_effect([0, 0], [10, 10]) == 1.0  # no misaligned reply: nothing to estimate, the pooled interval
    k, n = np.array([1, 4, 0, 9]), np.full(4, 10)
    lo, hi = stratified_wilson_bounds(k, n)
    ref = wilson(int(k.sum()), int(n.sum()))
    assert ref[0] < lo < 14 / 40 < hi < ref[1]  # questions differ: narrower than the pooled count's interval
