"""Subspace geometry against analytic values."""

import math

import pytest
import torch

from probes.linear import LinearProbe, fit_ridge
from probes.subspaces import (
    effective_dim,
    fraction_in_subspace,
    orthonormal_basis,
    principal_angles,
    random_fraction_baseline,
    random_subspace,
    subspace_overlap,
)


def test_principal_angles_identical_orthogonal_and_known():
    Q = random_subspace(10, 3, seed=1)
    mixed = Q @ torch.randn(3, 3, dtype=torch.float64)  # another basis of the same span
    torch.testing.assert_close(principal_angles(Q, mixed), torch.zeros(3, dtype=torch.float64), atol=1e-7, rtol=0)
    e = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(
        principal_angles(e[:, :2], e[:, 2:5]), torch.full((2,), math.pi / 2, dtype=torch.float64)
    )
    t = 0.3
    tilted = torch.stack([e[0], math.cos(t) * e[1] + math.sin(t) * e[2]], dim=1)
    torch.testing.assert_close(
        principal_angles(e[:, :2], tilted), torch.tensor([0.0, t], dtype=torch.float64), atol=1e-7, rtol=0
    )

    overlap = subspace_overlap(e[:, :2], tilted)
    assert overlap["mean_cos2"] == pytest.approx((1 + math.cos(t) ** 2) / 2)
    assert (overlap["dim_a"], overlap["dim_b"], overlap["d_model"]) == (2, 2, 6)
    assert overlap["random_mean_cos2"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="different spaces"):
        principal_angles(e[:, :2], torch.eye(5)[:, :2])


def test_random_subspace_overlap_matches_its_expectation():
    d, a, b = 40, 3, 5
    draws = [
        subspace_overlap(random_subspace(d, a, seed=s), random_subspace(d, b, seed=100 + s))["mean_cos2"]
        for s in range(200)
    ]
    assert sum(draws) / len(draws) == pytest.approx(b / d, rel=0.1)


def test_probe_subspace_is_the_column_space_of_W():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 8, generator=g, dtype=torch.float64)
    logits = X[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    beliefs = torch.softmax(logits, dim=1)  # rows sum to one, so W's columns sum to zero
    probe = fit_ridge(X, beliefs)
    basis = orthonormal_basis(probe)
    assert basis.shape == (8, 2)  # k - 1 directions
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(orthonormal_basis(probe.W), basis)
    # W of a probe that only reads x0 and x1 spans exactly those axes.
    only01 = LinearProbe(torch.tensor([[1.0, 2.0], [3.0, -1.0], [0, 0], [0, 0]]), torch.zeros(2))
    torch.testing.assert_close(
        principal_angles(only01, torch.eye(4)[:, :2]), torch.zeros(2, dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_fraction_in_subspace_and_random_baseline():
    e = torch.eye(5, dtype=torch.float64)
    vectors = torch.stack([e[0] + e[1], e[3], e[0] + e[4] * 3])
    torch.testing.assert_close(
        fraction_in_subspace(vectors, e[:, :2]), torch.tensor([1.0, 0.0, 0.1], dtype=torch.float64)
    )
    v = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    baseline = random_fraction_baseline(v, dim=6, n_draws=500, seed=1)
    assert baseline.shape == (500, 2)
    assert baseline.mean().item() == pytest.approx(6 / 30, rel=0.1)
    torch.testing.assert_close(baseline[7], fraction_in_subspace(v, random_subspace(30, 6, seed=1, n=500)[7]))
    with pytest.raises(ValueError, match="zero vector"):
        fraction_in_subspace(torch.zeros(5), e[:, :2])


def test_random_subspace_is_seeded_and_orthonormal():
    Q = random_subspace(12, 4, seed=3)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))
    assert torch.equal(Q, random_subspace(12, 4, seed=3)) and not torch.equal(Q, random_subspace(12, 4, seed=4))
    with pytest.raises(ValueError, match="dim"):
        random_subspace(3, 4)


def test_effective_dim_of_a_known_low_rank_cloud():
    n, d = 300, 20
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Z, _ = torch.linalg.qr(Z - Z.mean(0))  # centred, orthonormal columns: exact sample variances below
    variances = torch.tensor([10.0, 5.0, 1.0], dtype=torch.float64)
    cloud = (Z * (variances * n).sqrt()) @ random_subspace(d, 3, seed=2).T + 7.0  # offset is removed
    result = effective_dim(cloud)
    # cumulative explained variance: 10/16, 15/16, 16/16
    assert result["dims"] == {0.8: 2, 0.9: 2, 0.95: 3, 0.99: 3}
    torch.testing.assert_close(
        torch.tensor(result["explained_variance_ratio"][:4]), torch.tensor([10, 5, 1, 0]) / 16.0, atol=1e-10, rtol=0
    )
    assert effective_dim(cloud, thresholds=(0.6,))["dims"] == {0.6: 1}
