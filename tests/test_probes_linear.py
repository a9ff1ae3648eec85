"""Linear probes against independent references: exact recovery, numpy lstsq / closed-form ridge,
duplicated rows for weights, sklearn for metrics; the controls behave as controls."""

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_squared_error, r2_score

from probes.linear import (
    LinearProbe,
    fit_probe_report,
    fit_reduced_rank,
    fit_ridge,
    kfold_indices,
    population_probe_report,
    reduced_rank_curve,
    regression_metrics,
    split_indices,
)


def affine_data(n=400, d=12, k=3, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    Y = X @ W + b + noise * torch.randn(n, k, generator=g, dtype=torch.float64)
    return X, Y, W, b


def test_least_squares_recovers_a_known_affine_map():
    X, Y, W, b = affine_data()
    probe = fit_ridge(X.float(), Y)
    torch.testing.assert_close(probe.W, W, atol=1e-5, rtol=0)  # float32 activations
    torch.testing.assert_close(probe.b, b, atol=1e-5, rtol=0)
    exact = fit_ridge(X, Y)
    torch.testing.assert_close(exact.W, W, atol=1e-10, rtol=0)
    assert regression_metrics(Y, exact.predict(X))["mse"] < 1e-20

    Xn, Yn, Wn, bn = affine_data(n=4000, noise=0.05, seed=1)
    noisy = fit_ridge(Xn, Yn)
    assert (noisy.W - Wn).abs().max() < 0.01 and (noisy.b - bn).abs().max() < 0.01
    assert abs(regression_metrics(Yn, noisy.predict(Xn))["mse"] - 0.05**2) < 2e-4


def test_rank_deficient_design_matches_numpy_min_norm_lstsq():
    """Concatenated layers repeat directions; alpha=0 must give numpy's minimum-norm solution."""
    X, Y, _, _ = affine_data(n=100, d=6)
    Xdup = torch.cat([X, X, X[:, :2] - X[:, 2:4]], dim=1)  # rank 6 in 14 columns
    probe = fit_ridge(Xdup, Y)
    ones = np.ones((100, 1))
    Xc = Xdup.numpy() - Xdup.numpy().mean(0)
    W_ref = np.linalg.lstsq(Xc, Y.numpy() - Y.numpy().mean(0), rcond=None)[0]
    np.testing.assert_allclose(probe.W.numpy(), W_ref, atol=1e-10)
    full = np.linalg.lstsq(np.hstack([Xdup.numpy(), ones]), Y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(probe.predict(Xdup).numpy(), np.hstack([Xdup.numpy(), ones]) @ full, atol=1e-9)


def test_ridge_matches_closed_form_and_intercept_is_unpenalised():
    X, Y, _, _ = affine_data(n=60, d=8, noise=0.3)
    alpha = 7.0
    probe = fit_ridge(X, Y, alpha=alpha)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    W_ref = torch.linalg.solve(Xc.T @ Xc + alpha * torch.eye(8, dtype=X.dtype), Xc.T @ Yc)
    torch.testing.assert_close(probe.W, W_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(probe.b, Y.mean(0) - X.mean(0) @ W_ref, atol=1e-10, rtol=0)


def test_integer_weights_equal_duplicated_rows():
    X, Y, _, _ = affine_data(n=50, d=5, noise=0.5)
    counts = torch.randint(1, 4, (50,), generator=torch.Generator().manual_seed(2))
    Xd, Yd = X.repeat_interleave(counts, 0), Y.repeat_interleave(counts, 0)
    for alpha in (0.0, 3.0):
        # Weights are normalised to mean 1, so alpha is comparable to a fit on sum(counts) rows only
        # after rescaling by the mean count.
        weighted = fit_ridge(X, Y, alpha=alpha * 50 / counts.sum().item(), weights=counts.float())
        dup = fit_ridge(Xd, Yd, alpha=alpha)
        torch.testing.assert_close(weighted.W, dup.W, atol=1e-10, rtol=0)
        torch.testing.assert_close(weighted.b, dup.b, atol=1e-10, rtol=0)
    pred = weighted.predict(X)
    m_w = regression_metrics(Y, pred, weights=counts)
    m_d = regression_metrics(Yd, pred.repeat_interleave(counts, 0))
    for key in ("mse", "rmse", "r2"):
        assert m_w[key] == pytest.approx(m_d[key], rel=1e-10)


def test_metrics_match_sklearn():
    Y = torch.randn(40, 3, dtype=torch.float64)
    Y_hat = Y + 0.3 * torch.randn(40, 3, dtype=torch.float64)
    w = torch.rand(40, dtype=torch.float64)
    m = regression_metrics(Y, Y_hat, w)
    assert m["mse"] == pytest.approx(mean_squared_error(Y, Y_hat, sample_weight=w))
    assert m["rmse"] == pytest.approx(m["mse"] ** 0.5)
    assert m["r2"] == pytest.approx(r2_score(Y, Y_hat, sample_weight=w, multioutput="variance_weighted"))
    np.testing.assert_allclose(m["r2_by_target"], r2_score(Y, Y_hat, sample_weight=w, multioutput="raw_values"))


def test_splits_are_seeded_partitions_and_keep_groups_whole():
    train, test = split_indices(100, 0.25, seed=3)
    assert len(test) == 25 and sorted(torch.cat([train, test]).tolist()) == list(range(100))
    assert torch.equal(test, split_indices(100, 0.25, seed=3)[1])
    assert not torch.equal(test, split_indices(100, 0.25, seed=4)[1])
    groups = torch.arange(100) // 10
    train, test = split_indices(100, 0.3, seed=0, groups=groups)
    assert set(groups[train].tolist()).isdisjoint(groups[test].tolist()) and len(test) == 30
    folds = kfold_indices(100, 4, seed=0, groups=groups)
    assert sorted(torch.cat([t for _, t in folds]).tolist()) == list(range(100))
    for tr, te in folds:
        assert set(groups[tr].tolist()).isdisjoint(groups[te].tolist())
    with pytest.raises(ValueError, match="n_folds"):
        kfold_indices(10, 11)


def test_report_controls_separate_real_structure_from_chance():
    """Targets are a noisy linear read-out of the trained model's activations; the random-init
    model's activations are unrelated noise of the same shape. Shuffled targets destroy the map."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 600, 16, 3
    acts = {s: torch.randn(n, d, generator=g) for s in ("embed", "block0", "block1")}
    Y = acts["block1"][:, :k] @ torch.randn(k, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    control = {s: torch.randn(n, d, generator=g) for s in acts}
    report = fit_probe_report(acts, Y, control, target_names=["a", "b", "c"])

    best = report["sites"]["block1"]
    assert report["best_site"] == "block1"
    assert best["test"]["r2"] > 0.95 and best["ratio_to_random_init"] < 0.05 and best["ratio_to_shuffled"] < 0.05
    assert report["sites"]["embed"]["ratio_to_random_init"] > 0.8  # no signal: as bad as the control
    assert report["sites"]["embed"]["ratio_to_shuffled"] > 0.8
    assert report["concat"]["test"]["mse"] < 2 * best["test"]["mse"]
    assert report["config"]["n_test"] == 120 and best["test"]["n"] == 120

    cv = fit_probe_report(acts, Y, control, n_folds=5, groups=torch.arange(n) // 6, concat=False)
    assert "concat" not in cv and cv["sites"]["block1"]["test"]["n"] == n
    assert cv["sites"]["block1"]["ratio_to_random_init"] < 0.05
    import json

    json.dumps(report)  # a plain, serialisable dict
    with pytest.raises(ValueError, match="same sites"):
        fit_probe_report(acts, Y, {"embed": control["embed"]})


def test_reduced_rank_finds_the_rank_of_the_readout():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(800, 10, generator=g, dtype=torch.float64)
    W = torch.randn(10, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    Y = X @ W + 0.05 * torch.randn(800, 5, generator=g, dtype=torch.float64)
    curve = reduced_rank_curve(X, Y)
    assert list(curve) == [1, 2, 3, 4, 5]
    assert curve[1] > 10 * curve[2] and curve[2] == pytest.approx(curve[5], rel=0.05)
    full = fit_ridge(X, Y)
    top = fit_reduced_rank(X, Y, rank=5)
    torch.testing.assert_close(top.W, full.W, atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(fit_reduced_rank(X, Y, rank=2).W) == 2


def test_bad_inputs_fail_loudly():
    X, Y, _, _ = affine_data(n=20, d=4)
    with pytest.raises(ValueError, match="flatten"):
        fit_ridge(X[None], Y)
    with pytest.raises(ValueError, match="rows like X"):
        fit_ridge(X, Y[:10])
    with pytest.raises(ValueError, match="non-negative"):
        fit_ridge(X, Y, weights=-torch.ones(20))
    with pytest.raises(ValueError, match="width 3"):
        LinearProbe(torch.zeros(4, 2), torch.zeros(2)).predict(torch.zeros(5, 3))


def test_population_report_is_the_weighted_fit_scored_on_the_whole_population():
    """Against numpy's weighted lstsq on every row; the shuffled control is the targets' weighted variance
    (independent pairing), and a weight-k row counts as k duplicated rows."""
    g = torch.Generator().manual_seed(0)
    X, Y, _, _ = affine_data(n=300, d=6, k=3, noise=0.3)
    w = torch.rand(300, generator=g, dtype=torch.float64)
    control = torch.randn(300, 6, generator=g, dtype=torch.float64)
    rep = population_probe_report(
        {"a": X, "b": X[:, :2]}, Y, w, {"a": control, "b": control[:, :2]}, target_names=list("xyz")
    )
    design = np.hstack([X.numpy(), np.ones((300, 1))]) * np.sqrt(w.numpy())[:, None]
    coef, *_ = np.linalg.lstsq(design, Y.numpy() * np.sqrt(w.numpy())[:, None], rcond=None)
    resid = np.hstack([X.numpy(), np.ones((300, 1))]) @ coef - Y.numpy()
    expected = (w.numpy()[:, None] * resid**2).sum(0).mean() / w.numpy().sum()
    entry = rep["sites"]["a"]
    assert rep["config"]["evaluation"] == "population" and entry["test"]["n"] == 300
    assert entry["test"]["mse"] == pytest.approx(expected, rel=1e-9)
    mu = (w[:, None] * Y).sum(0) / w.sum()
    variance = float((w[:, None] * (Y - mu) ** 2).sum(0).mean() / w.sum())
    assert entry["shuffled"]["test"]["mse"] == pytest.approx(variance, rel=1e-9)
    assert entry["ratio_to_random_init"] < 0.2 and rep["best_site"] == "a" and "concat" in rep
    # integer weights: the same as fitting the rows repeated that many times
    counts = torch.randint(1, 4, (300,), generator=g)
    dup = population_probe_report(
        {"a": X.repeat_interleave(counts, 0)}, Y.repeat_interleave(counts, 0), torch.ones(int(counts.sum()))
    )
    assert population_probe_report({"a": X}, Y, counts.double())["sites"]["a"]["test"]["mse"] == pytest.approx(
        dup["sites"]["a"]["test"]["mse"], rel=1e-9
    )
