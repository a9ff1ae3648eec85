"""Subspaces of the residual stream: bases, principal angles, overlaps, effective dimension.

A subspace is given either as a (d_model, m) matrix whose columns span it, or as a ``LinearProbe``,
whose subspace is the column space of ``W`` (d_model, k): the directions the read-out is sensitive to
(the row space of the map x -> x @ W). Work is done in float64 on the input's device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .linear import LinearProbe

__all__ = [
    "effective_dim",
    "fraction_in_subspace",
    "orthonormal_basis",
    "principal_angles",
    "random_fraction_baseline",
    "random_subspace",
    "subspace_overlap",
]


def _columns(span: Tensor | LinearProbe) -> Tensor:
    A = span.W if isinstance(span, LinearProbe) else span
    if A.dim() == 1:
        A = A[:, None]
    if A.dim() != 2:
        raise ValueError(
            f"a subspace is a (d_model, m) matrix of spanning columns or a LinearProbe, got shape {tuple(A.shape)}"
        )
    return A.double()


def orthonormal_basis(span: Tensor | LinearProbe, rtol: float | None = None) -> Tensor:
    """Orthonormal (d_model, r) basis of the column span, r = numerical rank.

    Singular values below ``rtol * s_max`` are dropped (default ``max(d, m) * eps``, as
    ``torch.linalg.matrix_rank``), so e.g. a probe onto simplex beliefs, whose columns sum to zero,
    gives k - 1 directions."""
    A = _columns(span)
    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        raise ValueError("the subspace is empty (all spanning vectors are zero)")
    rtol = max(A.shape) * torch.finfo(A.dtype).eps if rtol is None else rtol
    return U[:, s > rtol * s[0]]


def principal_angles(a: Tensor | LinearProbe, b: Tensor | LinearProbe) -> Tensor:
    """Principal angles (radians, ascending) between two subspaces of R^d_model; (min(r_a, r_b),).

    0 means a shared direction, pi/2 an orthogonal one."""
    Qa = orthonormal_basis(a)
    Qb = orthonormal_basis(b).to(Qa.device)
    if Qa.shape[0] != Qb.shape[0]:
        raise ValueError(f"subspaces live in different spaces: d_model {Qa.shape[0]} vs {Qb.shape[0]}")
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)
    return torch.arccos(cosines).sort().values


def subspace_overlap(a: Tensor | LinearProbe, b: Tensor | LinearProbe) -> dict:
    """Plain-dict summary of how much two subspaces share.

    Keys: ``mean_cos2`` (mean squared cosine of the principal angles: 1 identical or nested, 0
    orthogonal), ``random_mean_cos2`` (its expectation for uniformly random subspaces of the same
    dimensions, max(r_a, r_b) / d), ``angles_deg``, ``dim_a``, ``dim_b``, ``d_model``."""
    Qa, Qb = orthonormal_basis(a), orthonormal_basis(b)
    angles = principal_angles(Qa, Qb)
    d = Qa.shape[0]
    return {
        "mean_cos2": (angles.cos() ** 2).mean().item(),
        "random_mean_cos2": max(Qa.shape[1], Qb.shape[1]) / d,
        "angles_deg": torch.rad2deg(angles).tolist(),
        "dim_a": Qa.shape[1],
        "dim_b": Qb.shape[1],
        "d_model": d,
    }


def fraction_in_subspace(vectors: Tensor, span: Tensor | LinearProbe) -> Tensor:
    """Share of each vector's squared norm inside the span: ``||P v||^2 / ||v||^2``.

    ``vectors`` (..., d_model) -> (...,) float64. A uniformly random direction has expectation r / d."""
    Q = orthonormal_basis(span)
    v = vectors.to(device=Q.device, dtype=torch.float64)
    if v.shape[-1] != Q.shape[0]:
        raise ValueError(f"vectors have width {v.shape[-1]} but the subspace lives in d_model={Q.shape[0]}")
    norm2 = (v * v).sum(-1)
    if bool((norm2 == 0).any()):
        raise ValueError("a zero vector has no direction; drop it before measuring its share in a subspace")
    return ((v @ Q) ** 2).sum(-1) / norm2


def random_subspace(d_model: int, dim: int, seed: int = 0, n: int | None = None, device=None) -> Tensor:
    """Uniformly random (Haar) orthonormal basis (d_model, dim), or ``n`` of them (n, d_model, dim), seeded."""
    if not 1 <= dim <= d_model:
        raise ValueError(f"dim must be in [1, d_model={d_model}], got {dim}")
    G = torch.randn((n or 1, d_model, dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(G.to(device))
    # Fixing the signs of R's diagonal makes Q Haar-distributed rather than biased by the QR convention.
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    return Q if n is not None else Q[0]


def random_fraction_baseline(vectors: Tensor, dim: int, n_draws: int = 200, seed: int = 0) -> Tensor:
    """``fraction_in_subspace`` of ``vectors`` (..., d_model) in ``n_draws`` random ``dim``-dimensional
    subspaces: (n_draws, ...). The control beside a measured share (e.g. a LoRA B vector in a factor's
    subspace); its mean is about dim / d_model."""
    v = vectors.double()
    Q = random_subspace(v.shape[-1], dim, seed, n=n_draws, device=v.device)  # (n_draws, d, dim)
    flat = v.reshape(-1, v.shape[-1])
    inside = torch.einsum("nd,sdr->snr", flat, Q).pow(2).sum(-1) / (flat * flat).sum(-1)
    return inside.reshape(n_draws, *v.shape[:-1])


def effective_dim(
    points: Tensor, thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.99), weights: Tensor | None = None
) -> dict:
    """Number of principal components needed to explain each fraction of a point cloud's variance.

    ``points`` (n, d) are centred on their (weighted) mean. Returns ``{"dims": {threshold: n_components},
    "explained_variance_ratio": [...]}`` (plain Python values; keys are the thresholds as given)."""
    X = points.double()
    if X.dim() != 2 or X.shape[0] < 2:
        raise ValueError(f"points must be (n >= 2, d), got shape {tuple(X.shape)}")
    w = torch.ones(X.shape[0], dtype=X.dtype, device=X.device) if weights is None else weights.to(X).flatten()
    w = w / w.sum()
    Xc = w.sqrt()[:, None] * (X - (w[:, None] * X).sum(0))
    var = torch.linalg.svdvals(Xc) ** 2
    if var.sum() == 0:
        raise ValueError("the point cloud has zero variance")
    ratio = var / var.sum()
    cumulative = ratio.cumsum(0)
    dims = {}
    for t in thresholds:
        if not 0 < t <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        # A small slack so a cloud of exactly rank r reaches 100% at r despite round-off.
        dims[t] = int((cumulative < t - 1e-12).sum().item()) + 1
    return {"dims": dims, "explained_variance_ratio": ratio.tolist()}
