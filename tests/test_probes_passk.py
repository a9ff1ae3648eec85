"""probes.passk: the unbiased pass@k estimator, the exact form, coverage and the pre-registered verdict rules."""

import math

import pytest
import torch

from probes.passk import (
    PassKConfig,
    coverage,
    crossover_k,
    gap_ci,
    informative_k,
    log2_ks,
    outside_support,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_exact,
    passk_verdict,
    summary,
    wider_verdict,
)


def brute(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_unbiased_estimator_matches_combinatorics():
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 8, 5), (256, 1, 128), (256, 255, 256), (300, 17, 64)]:
        assert float(pass_at_k(n, c, k)) == pytest.approx(brute(n, c, k), abs=1e-9)
    got = pass_at_k(torch.tensor([10, 10, 10]), torch.tensor([0, 2, 10]), 3)
    assert got.tolist() == pytest.approx([brute(10, 0, 3), brute(10, 2, 3), 1.0])


def test_estimator_is_unbiased_for_the_exact_value():
    # E over c ~ Binomial(n, p) of the estimator equals 1 - (1 - p)^k
    n, k, p = 20, 5, 0.13
    expect = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * brute(n, c, k) for c in range(n + 1))
    assert expect == pytest.approx(float(pass_at_k_exact(torch.tensor(p, dtype=torch.float64), k)), abs=1e-12)


def test_bad_inputs_say_what_to_change():
    with pytest.raises(ValueError, match="at least 8 samples"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match=r"\[0, n\]"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        pass_at_k_exact(torch.tensor([1.5]), 2)


def test_exact_curve_shape_and_tiny_p():
    p = torch.tensor([0.0, 1e-12, 0.5, 1.0])
    t = pass_at_k_exact(p, [1, 2, 256])
    assert t.shape == (4, 3)
    assert t[0].tolist() == [0.0, 0.0, 0.0] and t[3].tolist() == [1.0, 1.0, 1.0]
    assert float(t[1, 2]) == pytest.approx(256e-12, rel=1e-6)
    assert float(t[2, 1]) == pytest.approx(0.75)


def test_coverage_counts_and_probabilities():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert coverage(a, b) == {"both": 0.25, "only_a": 0.25, "only_b": 0.25, "neither": 0.25}
    c = coverage(torch.tensor([0.5]), torch.tensor([0.5]))
    assert sum(c.values()) == pytest.approx(1.0)


def test_curve_ci_brackets_mean_and_crossover():
    per = pass_at_k_exact(torch.linspace(0, 1, 50), [1, 4])
    cur = pass_at_k_curve(per, [1, 4])
    for m, lo, hi in zip(cur["mean"], cur["lo"], cur["hi"]):
        assert lo <= m <= hi
    assert crossover_k([0.2, 0.6, 0.9], [0.5, 0.7, 0.85], [1, 2, 4]) == 4
    assert crossover_k([0.2, 0.6], [0.5, 0.7], [1, 2]) is None
    assert log2_ks(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256] and log2_ks(100)[-1] == 100


def test_verdicts_on_known_policies():
    cfg = PassKConfig(ks=[1, 16, 256])
    p_ref = torch.full((100,), 0.2)
    sharpened = torch.full((100,), 0.6)  # same support, more mass: wins at k = 1, reference catches up
    v = passk_verdict(pass_at_k_exact(p_ref, cfg.ks), pass_at_k_exact(sharpened, cfg.ks), cfg)
    assert v["verdict"] == "not sharper at k=256" and v["crossover_k"] is not None
    # half the prompts the reference can never solve (zero success probability), the post-RL policy can
    p_ref2 = torch.cat([torch.zeros(50), torch.full((50,), 0.2)])
    v = passk_verdict(pass_at_k_exact(p_ref2, cfg.ks), pass_at_k_exact(torch.full((100,), 0.6), cfg.ks), cfg)
    assert v["verdict"] == "sharper at k=256" and v["only_post"] == pytest.approx(0.5)
    # guessing solves everything at k = 256: the test cannot tell
    chance = pass_at_k_exact(torch.full((100,), 1 / 6), cfg.ks)
    v = passk_verdict(
        pass_at_k_exact(p_ref2, cfg.ks), pass_at_k_exact(torch.full((100,), 0.6), cfg.ks), cfg, chance=chance
    )
    assert v["verdict"] == "uninformative"
    v = passk_verdict(pass_at_k_exact(p_ref, cfg.ks), pass_at_k_exact(p_ref, cfg.ks), cfg)
    assert v["verdict"] == "inconclusive"


def test_informative_k_against_closed_form():
    ks = log2_ks(256)
    for p in (1 / 57, 1 / 17, 1 / 989, 0.3, 1e-6):
        # chance pass@k < m  <=>  k < log(1 - m) / log(1 - p): the largest power of two below that bound
        bound = math.log(0.5) / math.log1p(-p)
        want = max(k for k in ks if k < bound) if bound > 1 else None
        assert informative_k(p, ks, 0.5) == want
    assert informative_k(1 / 57, ks, 0.5) == 32  # add: guessing solves 0.43 at k = 32, 0.68 at k = 64
    assert informative_k(0.5, ks, 0.5) is None and informative_k(0.0, ks, 0.5) == 256
    assert informative_k(1 / 57, [64, 1, 16], 0.5) == 16  # order of ks does not matter
    with pytest.raises(ValueError, match="probability"):
        informative_k(1.5, ks, 0.5)


def test_the_rule_is_calibrated_on_a_split_half_null():
    """One policy's sampled replies split into two halves: their true gap is 0. The rule must not call them sharper
    (<= 2 of 40 draws at the 95% level), while the share solved by one half only -- the old one-sided rule's
    statistic -- is far above the 0.02 margin (q (1 - q) per prompt)."""
    from probes.passk import split_half_null

    cfg = PassKConfig(ks=[1, 2, 4, 8, 16, 32], n_boot=2000)
    g = torch.Generator().manual_seed(0)
    p = torch.rand(48, generator=g) * 0.2  # per-prompt success, like SmolLM2's on `add`
    calls, shares = 0, []
    for s in range(40):
        c = (torch.rand(48, 64, generator=torch.Generator().manual_seed(s + 1)) < p[:, None]).sum(1)
        r = split_half_null(64, c, 32, cfg, seed=s)
        calls += r["calls_sharper"]
        shares.append(r["only_first"])
    assert calls <= 2 and min(shares) > 0.02
    with pytest.raises(ValueError, match="n // 2"):
        split_half_null(10, torch.zeros(4), 8, cfg)


def test_gap_verdict_reweighting_new_coverage_and_undecided():
    cfg = PassKConfig(ks=[1, 32])
    ref = torch.tensor([[0.1, 0.9]] * 50)
    v = passk_verdict(ref, torch.tensor([[0.5, 0.9]] * 50), cfg)  # wins at k = 1, level at k = 32
    assert v["verdict"] == "not sharper at k=32" and v["gap_k_max_ci"] == pytest.approx([0.0, 0.0])
    v = passk_verdict(ref, torch.tensor([[0.5, 1.0]] * 50), cfg)
    assert v["verdict"] == "sharper at k=32" and v["gap_k_max"] == pytest.approx(0.1)
    noisy = torch.tensor([[0.5, 1.0], [0.5, 0.8]] * 25)  # per-prompt gaps +0.1 / -0.1: mean 0, CI straddles the margin
    assert passk_verdict(ref, noisy, cfg)["verdict"] == "undecided at k=32"
    # wider: the same gap rule at the budget's end, no pass@1 gate; guessing makes it uninformative
    assert wider_verdict(ref[:, 1], torch.ones(50), 32, cfg)["verdict"] == "wider at k=32"
    assert (
        wider_verdict(ref[:, 1], torch.ones(50), 32, cfg, chance_k=torch.full((50,), 0.6))["verdict"]
        == "uninformative at k=32"
    )


def test_all_wrong_prompt_is_exactly_zero():
    """c = 0 gives exactly 0 at every k (the log-gamma form left +-1e-13, printed as "-0.000")."""
    for n in (16, 96, 256, 1000):
        for k in log2_ks(n):
            assert float(pass_at_k(n, 0, k)) == 0.0


def test_bootstrap_ci_is_pinned_and_its_monte_carlo_error_small():
    """20,000 resamples by default; the CI ends' Monte-Carlo error is reported and is small next to the margin, and a
    second seed moves the ends by about that much, not more."""
    d = torch.distributions.Bernoulli(0.3).sample((96,)).double()
    cfg = PassKConfig(ks=[1])
    gap, ci, mc = gap_ci(torch.zeros(96), d, cfg)
    assert cfg.n_boot == 20000 and 0 < mc < 0.002 and ci[0] < gap < ci[1]
    _, ci2, _ = gap_ci(torch.zeros(96), d, PassKConfig(ks=[1], seed=1))
    assert max(abs(a - b) for a, b in zip(ci, ci2)) < 8 * mc


def test_outside_support_on_known_weights():
    """The importance-sampled reference success of the post-RL correct replies: a reweighting pi_ref e^(beta r) / Z
    has one weight Z e^-beta per correct reply, so p_hat is the reference's success exactly when every reply is
    correct; a reply the reference cannot produce has weight 0; a prompt the reference solved is not tested."""
    cfg = PassKConfig(ks=[1], support_k=1e5)
    p_ref, beta, n = 3e-4, 12.0, 64
    z = 1 - p_ref + p_ref * math.exp(beta)
    log_w = [
        torch.full((n,), math.log(z) - beta),
        torch.full((5,), float("-inf")),
        torch.full((3,), -20.0),
        torch.zeros(0),
    ]
    o = outside_support(n, torch.tensor([n, 5, 3, 0]), torch.tensor([0, 0, 1, 0]), log_w, cfg)
    assert o["p_hat"][0] == pytest.approx(z * math.exp(-beta)) and o["p_hat"][1] == 0.0
    assert o["n_tested"] == 2 and o["flagged"] == [1] and o["verdict"] == "outside the reference's support at K=1e5"
    # the reweighting: E[p_hat] = p_ref (3e-4 > 1e-5, not flagged); equal weights leave no spread, so the bound is p_hat
    assert o["upper"][0] == pytest.approx(o["p_hat"][0]) and 0 not in o["flagged"]
    # "new" needs a flagged prompt the elicitation baseline did not solve
    assert summary(o, None, o).startswith("new support (no elicitation baseline run)")
    assert summary(o, None, o, elicited=torch.tensor([False, True, False, False])).startswith(
        "no new support: the 1 prompts"
    )
    assert summary(o, None, o, elicited=torch.tensor([True, False, True, True])).startswith("new support:")
    with pytest.raises(ValueError, match="one log-weight per correct"):
        outside_support(n, torch.tensor([2]), torch.tensor([0]), [torch.zeros(3)], cfg)
