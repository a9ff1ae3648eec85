"""toy.steering and toy.experiments.factor_steering: the edit algebra against direct solutions, the steering pipeline on a tiny model, the entry point."""

import json

import pytest
import torch

from probes import fit_ridge
from toy import processes as P
from toy.collect import collect
from toy.data import sample
from toy.model import ToyModelConfig, build_model
from toy.processes import tagged
from toy.steering import kl, opposite_donors, steer_factor, steering_edit, steering_metrics


def _probe(d=12, S=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    Y = (X @ torch.randn(d, S, generator=g, dtype=torch.float64)).softmax(-1)  # rows sum to 1, like beliefs
    return fit_ridge(X, Y), X


def _targets(n, S, seed=1):
    return torch.randn(n, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(-1)


def test_pinv_edit_is_the_minimal_norm_solution():
    probe, X = _probe()
    eta_hat, eta_t = probe.predict(X[:5]), _targets(5, 6)
    dx = steering_edit(probe, eta_hat, eta_t)
    assert torch.allclose(probe.predict(X[:5] + dx), eta_t, atol=1e-10)
    # minimal norm <=> no component in the null space of the map x -> x W
    null = torch.linalg.svd(probe.W.T, full_matrices=True).Vh[torch.linalg.matrix_rank(probe.W) :]
    assert (dx @ null.T).abs().max() < 1e-10
    # and an explicit least-norm solve agrees
    sol = torch.linalg.lstsq(probe.W.T, (eta_t - eta_hat).T, driver="gelsd").solution.T
    assert torch.allclose(dx, sol, atol=1e-8)


def test_covariance_edit_reads_the_target_and_reduces_to_pinv_for_isotropic_activations():
    probe, X = _probe()
    eta_hat, eta_t = probe.predict(X[:5]), _targets(5, 6)
    C = torch.cov(X.T)
    dx = steering_edit(probe, eta_hat, eta_t, C)
    assert torch.allclose(probe.predict(X[:5] + dx), eta_t, atol=1e-10)
    assert torch.allclose(
        steering_edit(probe, eta_hat, eta_t, 3.0 * torch.eye(12, dtype=torch.float64)),
        steering_edit(probe, eta_hat, eta_t),
        atol=1e-10,
    )
    # it is the least C^-1-norm edit: any other edit with the same reading (add a null-space move) is longer
    null = torch.linalg.svd(probe.W.T, full_matrices=True).Vh[-1]
    Ci = torch.linalg.inv(C)
    other = dx + 0.1 * null

    def mnorm(v):
        return (v @ Ci * v).sum(-1)

    assert torch.allclose(probe.predict(X[:5] + other), eta_t, atol=1e-10)
    assert (mnorm(other) > mnorm(dx)).all()


def test_kl_and_donors():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    expected = torch.tensor(
        [0.5 * (torch.log(torch.tensor(0.5 / 0.9)) + torch.log(torch.tensor(0.5 / 0.1))), torch.log(torch.tensor(2.0))]
    )
    assert torch.allclose(kl(p, q), expected.double())
    assert kl(p, p).abs().max() < 1e-12
    tag = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    donors = opposite_donors(tag.argmax(-1) == 1, torch.Generator().manual_seed(0))
    assert (tag.argmax(-1) != tag[donors].argmax(-1)).all()


def test_steer_factor_on_a_tiny_model():
    process = tagged(P.mess3(), 0.0)
    model = build_model(
        ToyModelConfig(preset="mess3_small", d_model=16, d_mlp=32), process.vocab_size, 7, seed=0
    ).eval()
    data = collect(model, process, 6, 60, seed=1, sites=["block1"])
    probe = fit_ridge(data.X, data.beliefs, 1e-2)
    Xc = data.X.double() - data.X.double().mean(0)
    out = steer_factor(model, process, probe, sample(process, 40, 6, seed=2).tokens, "block1", Xc.T @ Xc / len(Xc))
    assert out["p0"].shape == out["target"].shape == (40, 6)
    assert torch.allclose(out["target"].sum(-1), torch.ones(40, dtype=torch.float64))
    assert out["exact_product_residual"].max() < 1e-12  # independent factors: S is exact
    m = steering_metrics(process, out)
    for kind in ("pinv", "covariance"):
        assert m[kind]["probe_after_error"] < 1e-6
        # the control has the same norm as the edit, row by row
        assert m[kind]["edit_norm_over_resid_norm"] > 0
        assert not torch.allclose(out[kind]["steered"], out["p0"])


@pytest.mark.slow
def test_factor_steering_entry_point(tmp_path):
    from toy.experiments.factor_steering import main

    metrics = main(
        [
            "--config",
            "configs/toy/factor_steering.yaml",
            "--output_dir",
            str(tmp_path),
            "--steps",
            "150",
            "--rhos",
            "0.0",
            "--n_contexts",
            "200",
            "--probe_sequences",
            "200",
            "--val_samples",
            "200",
        ]
    )
    for f in ("metrics.json", "summary.md", "kl.png", "tag_scatter.png"):
        assert (tmp_path / f).is_file(), f
    m = json.loads((tmp_path / "metrics.json").read_text())["rhos"]["0.0"]
    assert m == json.loads(json.dumps(metrics["rhos"]["0.0"]))
    cov = m["covariance"]
    # the covariance edit steers the tag much better than an equal-norm random edit, and moves the tag at all
    assert cov["tag_kl"]["steered"] < 0.2 * min(cov["tag_kl"]["random"], m["tag_kl_unsteered"])
    assert cov["cap_kl"]["steered"] < cov["cap_kl"]["random"]
