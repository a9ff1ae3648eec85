"""toy.steering's mean-difference edit and exact capability KL; toy.experiments.steering_knob's rule, axes and CLI."""

import json

import pytest
import torch

from probes import fit_ridge
from toy import processes as P
from toy.alignment import persona_world
from toy.beliefs import belief_states, enumerate_sequences
from toy.data import sample
from toy.experiments.steering_knob import KnobConfig, main, make_world, parse_setting, verdict
from toy.factors import factor_marginals, product_belief
from toy.processes import tagged
from toy.steering import (
    kl,
    mean_difference,
    mean_difference_edit,
    misaligned_readout,
    opposite_donors,
    steering_metrics,
)


def _cap_marginal(p: torch.Tensor, V: int) -> torch.Tensor:
    """Capability marginal by token arithmetic (joint token j = copy * V + x), not by the library's reshape."""
    out = torch.zeros(p.shape[0], V, dtype=torch.float64)
    for j in range(p.shape[1]):
        out[:, j % V] += p[:, j]
    return out


def _oracle_out(process, n=60, length=6):
    """``steer_factor``'s output for a 'model' that is the exact process and an edit that lands exactly on the target."""
    tokens = sample(process, n, length, seed=0).tokens
    exact = belief_states(process, tokens)[:, -1]
    emit = process.T.sum(-1).T
    tags, cap = factor_marginals(process, exact)
    donors = opposite_donors(exact @ misaligned_readout(process) > 0.5, torch.Generator().manual_seed(0))
    eta_t = product_belief([tags[donors], cap])
    p, ones = exact @ emit, torch.ones(n, dtype=torch.float64)
    return {
        "p0": p,
        "p_exact": p,
        "target": eta_t @ emit,
        "eta_target": eta_t,
        "resid_norm": ones,
        "s_residual": 0 * ones,
        "exact_product_residual": 0 * ones,
        "readout": misaligned_readout(process),
        "covariance": {"steered": eta_t @ emit, "random": p, "edit_norm": ones, "probe_after": eta_t},
    }


@pytest.mark.parametrize(
    "process", [tagged(P.mess3(), 0.5), persona_world(P.mess3(), [0, 1, 2], 0.0)], ids=["rho", "coupling"]
)
def test_exact_cap_kl_is_zero_for_the_process_itself_and_for_an_edit_onto_the_target(process):
    out = _oracle_out(process)
    m = steering_metrics(process, out)
    assert m["cap_kl_exact_unsteered"] < 1e-12
    # the target keeps the capability belief, and the next capability token depends on nothing else (even at rho > 0,
    # where the tag and capability beliefs are dependent): landing on the target leaves the capability exact
    cov = m["covariance"]
    assert (
        cov["cap_kl_exact"]["steered"] < 1e-12
        and cov["tag_kl"]["steered"] < 1e-12
        and cov["tag_kl_by_token"]["steered"] < 1e-12
    )
    assert cov["tag_kl"]["random"] == pytest.approx(m["tag_kl_unsteered"]) and m["tag_kl_unsteered"] > 0.05
    # a model that is off: the exact-process KL is the KL of the capability marginals, against the exact one
    V = process.factor_vocab_sizes[1]
    q = 0.7 * out["p0"] + 0.3 * torch.rand(
        out["p0"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    q = q / q.sum(-1, keepdim=True)
    m = steering_metrics(process, {**out, "p0": q})
    expected = kl(_cap_marginal(out["p_exact"], V), _cap_marginal(q, V)).mean().item()
    assert m["cap_kl_exact_unsteered"] == pytest.approx(expected, rel=1e-10) and expected > 1e-4
    assert m["covariance"]["cap_kl"]["random"] == pytest.approx(
        kl(_cap_marginal(q, V), _cap_marginal(out["p0"], V)).mean().item()
    )
    # the per-token tag KL is the chain rule's other term: KL(joint) = KL(capability marginal) + E_x KL(copy | x)
    chain = kl(out["target"], q) - kl(_cap_marginal(out["target"], V), _cap_marginal(q, V))
    assert m["tag_kl_by_token_unsteered"] == pytest.approx(chain.mean().item(), rel=1e-9)
    # a target off the simplex (the probe's v_cap can dip below 0) stays finite: it is clipped first
    bad = out["target"].clone()
    bad[:, 0], bad[:, V] = -2e-4, 1e-4  # capability token 0: target probability below 0, as a negative v_cap can give
    m = steering_metrics(process, {**out, "target": bad, "p0": q})
    assert 0 <= m["tag_kl_by_token_unsteered"] < 10


def test_mean_difference_edit_moves_the_misaligned_reading_along_v():
    process = tagged(P.mess3(), 0.0)
    g = torch.Generator().manual_seed(0)
    beliefs = belief_states(process, sample(process, 80, 5, seed=0).tokens).reshape(-1, process.n_states)
    X = beliefs @ torch.randn(process.n_states, 10, generator=g, dtype=torch.float64) + 0.01 * torch.randn(
        len(beliefs), 10, generator=g, dtype=torch.float64
    )
    r = misaligned_readout(process)
    # the copy shows the *next* tag (switch 0.05) through noise 0.1: P(misaligned copy | tag 0) = 0.05 * 0.9 + 0.95 * 0.1
    # = 0.14, | tag 1 = 0.86, so "more likely misaligned" is "tag more likely misaligned"
    assert torch.allclose(beliefs @ r, 0.14 + 0.72 * factor_marginals(process, beliefs)[0][:, 1])
    side = beliefs @ r > 0.5
    v = mean_difference(X, beliefs, process)
    assert torch.allclose(v, X[side].mean(0) - X[~side].mean(0))
    probe = fit_ridge(X, beliefs, 1e-3)
    eta_hat = probe.predict(X[:7])
    eta_t = beliefs[torch.randperm(len(beliefs), generator=g)[:7]]
    dx = mean_difference_edit(probe, v, eta_hat, eta_t, r)
    assert torch.allclose(probe.predict(X[:7] + dx) @ r, eta_t @ r, atol=1e-10)
    assert torch.allclose(dx / dx.norm(dim=-1, keepdim=True), v / v.norm() * torch.sign(dx @ v)[:, None], atol=1e-10)
    with pytest.raises(ValueError, match="one side"):
        mean_difference(X[~side], beliefs[~side], process)


def test_rho_zero_and_coupling_one_are_the_same_process():
    a, b = tagged(P.mess3(), 0.0, 0.05, 0.1), persona_world(P.mess3(), [0, 1, 2], 1.0, 0.05, 0.1)
    ta, pa = enumerate_sequences(a, 4, drop_zero=False)
    tb, pb = enumerate_sequences(b, 4, drop_zero=False)
    assert torch.equal(ta, tb) and torch.allclose(pa, pb, atol=1e-14)
    # and off that point they differ, each along its own axis
    assert not torch.allclose(pa, enumerate_sequences(tagged(P.mess3(), 0.5), 4, drop_zero=False)[1], atol=1e-6)
    assert not torch.allclose(
        pb, enumerate_sequences(persona_world(P.mess3(), [0, 1, 2], 0.5), 4, drop_zero=False)[1], atol=1e-6
    )


def test_settings_and_the_declared_rule():
    assert parse_setting("rho=0.5") == ("rho", 0.5) and parse_setting("coupling=1") == ("coupling", 1.0)
    for bad in ("rho", "tau=0.1", "coupling=1.5", "rho=x"):
        with pytest.raises(ValueError, match="rho=<0..1> or coupling=<0..1>"):
            parse_setting(bad)

    def d(lo, hi):
        return {"mean": (lo + hi) / 2, "ci": [lo, hi], "n": 3}

    # differences are mean_diff - covariance
    assert verdict(d(0.1, 0.2), d(-0.1, 0.1)) == "covariance wins"
    assert verdict(d(-0.2, -0.1), d(-0.1, 0.1)) == "mean_diff wins"
    assert verdict(d(-0.2, -0.1), d(-0.3, -0.1)) == "mean_diff wins"  # and it steers better too
    assert (
        verdict(d(0.1, 0.2), d(-0.3, -0.1)) == "trade-off"
    )  # covariance spares the capability, mean_diff steers better
    assert verdict(d(-0.2, -0.1), d(0.1, 0.3)) == "trade-off"
    assert verdict(d(-0.1, 0.2), d(0.1, 0.3)) == "tie"
    assert verdict({"mean": 0.1, "ci": [float("nan")] * 2, "n": 1}, d(0.1, 0.3)) == "tie"  # one seed: no CI, no winner


def test_steering_knob_cli_on_a_tiny_setting(tmp_path):
    metrics = main(
        [
            "--config",
            "configs/toy/factor_steering_knob.yaml",
            "--output_dir",
            str(tmp_path),
            "--steps",
            "40",
            "--settings",
            "rho=0.5",
            "coupling=0.0",
            "--n_seeds",
            "2",
            "--n_contexts",
            "60",
            "--probe_sequences",
            "60",
            "--val_samples",
            "100",
        ]
    )
    for f in ("metrics.json", "summary.md", "knob.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["aggregate"] == json.loads(json.dumps(metrics["aggregate"]))
    assert [(c["setting"], c["seed"]) for c in saved["cells"]] == [
        ("rho=0.5", 0),
        ("rho=0.5", 1),
        ("coupling=0.0", 0),
        ("coupling=0.0", 1),
    ]
    for c in saved["cells"]:
        assert c["covariance"]["probe_after_error"] < 1e-6  # the S-step edit makes the probe read the whole target
        assert c["mean_diff"]["readout_after_error"] < 1e-6  # the baseline only its misaligned reading
        assert c["cap_kl_exact_unsteered"] > 0 and c["wall_s"] > 0
        assert c["steered_position"] == 8  # context_length 10: the last position that training gives a label
    assert "persona_world" in saved["cells"][2]["process"] and saved["cells"][2]["tag_mi_nats"] < 1e-9
    for a in saved["aggregate"].values():
        assert a["verdict_exact"] in ("covariance wins", "mean_diff wins", "trade-off", "tie")
        assert a["covariance.cap_kl_exact.steered"]["n"] == 2
    assert "| coupling=0.0 |" in (tmp_path / "summary.md").read_text()
    assert make_world(KnobConfig(), "rho=0.0").name.startswith("tagged")
