"""Linear probes from activations to targets, with held-out metrics and the two controls.

Conventions: activations ``X`` are (n, d_model), targets ``Y`` are (n, k); a probe predicts
``Y_hat = X @ W + b`` with ``W`` (d_model, k) and ``b`` (k,). Fits run in float64 on ``X``'s device;
the returned probe keeps float64 weights (``predict`` casts inputs). Sample weights (n,), e.g.
sequence probabilities, are normalised to mean 1, so ``alpha`` means the same with or without them.

Ridge objective: ``sum_i w_i ||x_i W + b - y_i||^2 + alpha ||W||_F^2`` (the intercept is not penalised).
``alpha = 0`` is least squares solved through the SVD with a pseudo-inverse cut-off, which stays stable
for rank-deficient inputs such as several layers concatenated.

Metrics (``regression_metrics``): ``mse`` is the mean over samples and target coordinates (the
belief-geometry paper's "MSE per coordinate"), ``rmse`` its square root, ``r2`` pooled over coordinates
(1 - SSE / SST about the weighted mean), plus per-target ``mse_by_target`` / ``r2_by_target``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "LinearProbe",
    "fit_probe_report",
    "fit_reduced_rank",
    "fit_ridge",
    "kfold_indices",
    "population_probe_report",
    "reduced_rank_curve",
    "regression_metrics",
    "split_indices",
]


@dataclass
class LinearProbe:
    """An affine read-out ``Y_hat = X @ W + b``.

    Attributes:
        W: (d_model, k) weights.
        b: (k,) intercept.
        alpha: ridge strength it was fitted with.
        rank: rank constraint it was fitted with (``None``: full rank).
        site: residual site it reads (see ``probes.activations``), if known.
        target_names: k names of the target coordinates, if known.
        metrics: fit metrics to keep with the probe (e.g. a ``fit_probe_report`` entry).
        source: name or path of the model whose activations it was fitted on, if known.
        n_layers: number of blocks of that model, if known (``probes.io`` checks it on load).
    """

    W: Tensor
    b: Tensor
    alpha: float = 0.0
    rank: int | None = None
    site: str | None = None
    target_names: list[str] | None = None
    metrics: dict = field(default_factory=dict)
    source: str | None = None
    n_layers: int | None = None

    @property
    def d_model(self) -> int:
        return self.W.shape[0]

    @property
    def n_targets(self) -> int:
        return self.W.shape[1]

    def predict(self, X: Tensor) -> Tensor:
        """(..., d_model) -> (..., k), in ``X``'s dtype and on ``X``'s device."""
        if X.shape[-1] != self.d_model:
            raise ValueError(
                f"probe reads d_model={self.d_model} but activations have width {X.shape[-1]}; "
                "use activations from a model (and site) of the probe's width."
            )
        W, b = self.W.to(X.device), self.b.to(X.device)
        return (X.to(W.dtype) @ W + b).to(X.dtype if X.is_floating_point() else W.dtype)


# --------------------------------------------------------------------------------------------
# Fitting


def _prepare(X: Tensor, Y: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if X.dim() != 2:
        raise ValueError(f"X must be (n, d_model), got shape {tuple(X.shape)}; flatten batch and positions first")
    if Y.dim() == 1:
        Y = Y[:, None]
    if Y.dim() != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must be (n, k) with n = {X.shape[0]} rows like X, got shape {tuple(Y.shape)}")
    X, Y = X.double(), Y.to(device=X.device, dtype=torch.float64)
    if weights is None:
        w = torch.ones(X.shape[0], dtype=torch.float64, device=X.device)
    else:
        w = weights.to(device=X.device, dtype=torch.float64).flatten()
        if w.shape[0] != X.shape[0] or bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError(f"weights must be (n,) = ({X.shape[0]},), non-negative, not all zero")
        w = w * (w.shape[0] / w.sum())
    return X, Y, w


def _solve(X: Tensor, Y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Weighted ridge with intercept on float64 X (n, d), Y (n, k), w (n,); returns ``W`` (d, k), ``b`` (k,)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    mu_x = (w[:, None] * X).sum(0) / w.sum()
    mu_y = (w[:, None] * Y).sum(0) / w.sum()
    root_w = w.sqrt()[:, None]
    Xs, Ys = root_w * (X - mu_x), root_w * (Y - mu_y)
    n, d = Xs.shape
    if n > d:
        # Householder QR first, then the SVD of the small R: same stability as an SVD of Xs (never forms
        # X^T X, whose condition number is squared) at about half the cost for tall designs, and Q^T Y
        # is applied without materialising Q.
        packed, tau = torch.geqrf(Xs)
        U, s, Vh = torch.linalg.svd(packed[:d].triu())
        UtY = U.T @ torch.ormqr(packed, tau, Ys, left=True, transpose=True)[:d]
    else:
        U, s, Vh = torch.linalg.svd(Xs, full_matrices=False)
        UtY = U.T @ Ys
    # Singular values below numpy's lstsq cut-off carry only round-off: drop them (min-norm solution).
    keep = s > s.max().clamp_min(1e-300) * max(n, d) * torch.finfo(s.dtype).eps
    shrink = torch.where(keep, s / (s * s + alpha), torch.zeros_like(s))
    W = Vh.T @ (shrink[:, None] * UtY)
    b = mu_y - mu_x @ W
    return W, b


def fit_ridge(X: Tensor, Y: Tensor, alpha: float = 0.0, weights: Tensor | None = None, **metadata) -> LinearProbe:
    """Fit ``Y ~ X @ W + b`` by weighted ridge (``alpha = 0``: least squares). X (n, d), Y (n, k) or (n,),
    weights (n,). ``metadata`` (site, target_names, metrics) is stored on the probe."""
    X, Y, w = _prepare(X, Y, weights)
    W, b = _solve(X, Y, w, alpha)
    return LinearProbe(W, b, alpha=alpha, **metadata)


def fit_reduced_rank(
    X: Tensor, Y: Tensor, rank: int, alpha: float = 0.0, weights: Tensor | None = None, **metadata
) -> LinearProbe:
    """Best rank-``rank`` ridge probe: the full ridge ``W`` projected onto the top ``rank`` principal
    directions of its (weighted, centred) fitted values, ``W_r = W V_r V_r^T`` (reduced-rank regression).
    For ``alpha = 0`` this is the exact weighted least-squares optimum under the rank constraint; for
    ``alpha > 0`` it is the usual reduced-rank ridge approximation. The rank at which held-out error
    stops falling estimates how many dimensions carry the targets."""
    return _reduced_rank_probes(X, Y, [rank], alpha, weights, metadata)[0]


def _reduced_rank_probes(X, Y, ranks, alpha, weights, metadata) -> list[LinearProbe]:
    X, Y, w = _prepare(X, Y, weights)
    for r in ranks:
        if not 1 <= r <= Y.shape[1]:
            raise ValueError(f"rank must be in [1, k={Y.shape[1]}], got {r}")
    W, b = _solve(X, Y, w, alpha)
    mu_x = (w[:, None] * X).sum(0) / w.sum()
    fitted = w.sqrt()[:, None] * ((X - mu_x) @ W)
    V = torch.linalg.svd(fitted, full_matrices=False).Vh.T  # (k, k): output directions by explained SS
    mu_y = (w[:, None] * Y).sum(0) / w.sum()
    probes = []
    for r in ranks:
        W_r = W @ V[:, :r] @ V[:, :r].T
        probes.append(LinearProbe(W_r, mu_y - mu_x @ W_r, alpha=alpha, rank=r, **metadata))
    return probes


# --------------------------------------------------------------------------------------------
# Metrics and splits


def regression_metrics(Y: Tensor, Y_hat: Tensor, weights: Tensor | None = None) -> dict:
    """Held-out (or in-sample) metrics of predictions ``Y_hat`` against ``Y``, both (n, k); plain floats.

    Keys: ``mse``, ``rmse``, ``r2``, ``mse_by_target``, ``r2_by_target``, ``n``. Weighted by ``weights``
    (n,) when given (weighted means and variances)."""
    Y = Y.double()[:, None] if Y.dim() == 1 else Y.double()
    Y_hat = Y_hat.to(device=Y.device, dtype=torch.float64).reshape(Y.shape)
    w = torch.ones(Y.shape[0], dtype=torch.float64, device=Y.device) if weights is None else weights.to(Y).flatten()
    w = w / w.sum()
    sse = (w[:, None] * (Y - Y_hat) ** 2).sum(0)  # (k,) weighted mean squared error per target
    sst = (w[:, None] * (Y - (w[:, None] * Y).sum(0)) ** 2).sum(0)
    mse = sse.mean()
    return {
        "mse": mse.item(),
        "rmse": mse.sqrt().item(),
        "r2": (1 - sse.sum() / sst.sum()).item(),
        "mse_by_target": sse.tolist(),
        "r2_by_target": (1 - sse / sst).tolist(),
        "n": int(Y.shape[0]),
    }


def _group_ids(n: int, groups: Tensor | None, device) -> tuple[Tensor, int]:
    if groups is None:
        return torch.arange(n, device=device), n
    if groups.shape != (n,):
        raise ValueError(f"groups must be (n,) = ({n},), got {tuple(groups.shape)}")
    ids = torch.unique(groups.to(device), return_inverse=True)[1]
    return ids, int(ids.max()) + 1


def split_indices(
    n: int, test_fraction: float = 0.2, seed: int = 0, groups: Tensor | None = None, device=None
) -> tuple[Tensor, Tensor]:
    """Seeded random ``(train_idx, test_idx)`` over ``n`` rows. With ``groups`` (n,) (e.g. sequence ids),
    whole groups go to one side, so no prefix shared within a sequence leaks from train to test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids, n_groups = _group_ids(n, groups, device)
    order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed)).to(ids.device)
    n_test = max(1, round(test_fraction * n_groups))
    if n_test >= n_groups:
        raise ValueError(f"test_fraction {test_fraction} leaves no training data among {n_groups} groups")
    is_test = torch.zeros(n_groups, dtype=torch.bool, device=ids.device)
    is_test[order[:n_test]] = True
    rows = is_test[ids]
    return (~rows).nonzero().flatten(), rows.nonzero().flatten()


def kfold_indices(
    n: int, n_folds: int = 5, seed: int = 0, groups: Tensor | None = None, device=None
) -> list[tuple[Tensor, Tensor]]:
    """Seeded k-fold ``[(train_idx, test_idx), ...]``; every row is a test row exactly once. ``groups``
    as in ``split_indices``."""
    ids, n_groups = _group_ids(n, groups, device)
    if not 2 <= n_folds <= n_groups:
        raise ValueError(f"n_folds must be in [2, {n_groups}] (number of groups), got {n_folds}")
    order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed)).to(ids.device)
    fold_of_group = torch.empty(n_groups, dtype=torch.long, device=ids.device)
    fold_of_group[order] = torch.arange(n_groups, device=ids.device) % n_folds
    fold = fold_of_group[ids]
    return [((fold != f).nonzero().flatten(), (fold == f).nonzero().flatten()) for f in range(n_folds)]


# --------------------------------------------------------------------------------------------
# Reports


def _held_out(X, Y, w, folds, alpha, shuffle_seed: int | None) -> tuple[Tensor, Tensor | None, float]:
    """Out-of-fold predictions (n, k) for every row in some fold's test set, the same for targets
    shuffled within each training set (``shuffle_seed`` set, else ``None``), and the mean train MSE."""
    k = Y.shape[1]
    Y_hat = torch.full(
        (Y.shape[0], 2 * k if shuffle_seed is not None else k), float("nan"), dtype=Y.dtype, device=Y.device
    )
    train_mse = []
    for train, test in folds:
        Y_train = Y[train]
        if shuffle_seed is not None:
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(shuffle_seed)).to(Y.device)
            # The shuffled control shares the design, so solve it as k extra target columns.
            Y_train = torch.cat([Y_train, Y_train[perm]], dim=1)
        W, b = _solve(X[train], Y_train, w[train], alpha)
        Y_hat[test] = X[test] @ W + b
        train_mse.append(regression_metrics(Y_train[:, :k], (X[train] @ W[:, :k] + b[:k]), w[train])["mse"])
    shuffled = Y_hat[:, k:] if shuffle_seed is not None else None
    return Y_hat[:, :k], shuffled, sum(train_mse) / len(train_mse)


def _site_report(X, Y, w, X_control, folds, test_rows, alpha, seed) -> dict:
    Y_hat, Y_shuf, train_mse = _held_out(X, Y, w, folds, alpha, seed)
    Y_test, w_test = Y[test_rows], w[test_rows]
    report = {"test": regression_metrics(Y_test, Y_hat[test_rows], w_test), "train": {"mse": train_mse}}
    report["shuffled"] = {"test": regression_metrics(Y_test, Y_shuf[test_rows], w_test)}
    report["ratio_to_shuffled"] = report["test"]["mse"] / report["shuffled"]["test"]["mse"]
    if X_control is not None:
        Y_ctrl, _, _ = _held_out(X_control, Y, w, folds, alpha, None)
        report["random_init"] = {"test": regression_metrics(Y_test, Y_ctrl[test_rows], w_test)}
        report["ratio_to_random_init"] = report["test"]["mse"] / report["random_init"]["test"]["mse"]
    return report


def _check_sites(activations: dict, random_init_activations: dict | None, targets, weights):
    """The site names, row count, device and prepared ``(Y, w)`` of a probe report; raises on an empty
    ``activations`` or a random-init control read at other sites."""
    if not activations:
        raise ValueError("activations is empty; pass {site: (n, d_model) tensor}")
    sites = list(activations)
    if random_init_activations is not None and set(random_init_activations) != set(sites):
        raise ValueError(
            f"random_init_activations has sites {sorted(random_init_activations)} but activations has "
            f"{sorted(sites)}; read the same sites from both models."
        )
    first = activations[sites[0]]
    _, Y, w = _prepare(first[:, :1], targets, weights)
    return sites, first.shape[0], first.device, Y, w


def fit_probe_report(
    activations: Mapping[str, Tensor],
    targets: Tensor,
    random_init_activations: Mapping[str, Tensor] | None = None,
    weights: Tensor | None = None,
    alpha: float = 0.0,
    test_fraction: float = 0.2,
    n_folds: int | None = None,
    seed: int = 0,
    groups: Tensor | None = None,
    concat: bool = True,
    target_names: Sequence[str] | None = None,
) -> dict:
    """Fit a probe per site (and on all sites concatenated) and report held-out metrics with controls.

    Args:
        activations: site -> (n, d_model) activations, rows aligned with ``targets``. From
            ``residual_stream`` output ``R`` (n_sites, batch, seq, d): ``dict(zip(sites, R.flatten(1, 2)))``.
        targets: (n, k) targets (belief vectors, factor marginals, one-hot labels, ...).
        random_init_activations: the same sites and rows from a random-init model of the same
            architecture (control a). Omit only when no such model exists; the headline ratio is then absent.
        weights: (n,) sample weights (e.g. sequence probabilities); metrics are weighted too.
        alpha: ridge strength (0: least squares).
        test_fraction, n_folds: one seeded train/test split, or (``n_folds`` set) k-fold CV whose
            metrics pool every row's out-of-fold prediction.
        groups: (n,) group ids (e.g. sequence index) kept whole on one side of every split.
        concat: also fit on all sites concatenated (key ``"concat"``).

    Returns a plain (JSON-ready) dict::

        {"config": {...},
         "sites": {site: {"test": metrics, "train": {"mse"}, "shuffled": {"test": metrics},
                          "random_init": {"test": metrics}, "ratio_to_random_init": float,
                          "ratio_to_shuffled": float}},
         "concat": {same keys}, "best_site": site with the lowest test mse}

    ``ratio_to_random_init`` (test MSE / random-init control's test MSE) is the headline: a random-init
    model already reads out much of a belief state, so R^2 alone proves little. The shuffled control
    permutes target rows within each training set and is evaluated against the true test targets.
    """
    sites, n, device, Y, w = _check_sites(activations, random_init_activations, targets, weights)
    if n_folds is None:
        train, test = split_indices(n, test_fraction, seed, groups, device)
        folds, test_rows = [(train, test)], test
    else:
        folds = kfold_indices(n, n_folds, seed, groups, device)
        test_rows = torch.arange(n, device=device)

    def as_design(acts: Mapping[str, Tensor], site: str) -> Tensor:
        if site == "concat":
            return torch.cat([acts[s].to(device).double() for s in sites], dim=1)
        X = acts[site]
        if X.dim() != 2 or X.shape[0] != n:
            raise ValueError(f"activations[{site!r}] must be (n={n}, d_model), got {tuple(X.shape)}")
        return X.to(device).double()

    report = {
        "config": {
            "alpha": alpha,
            "test_fraction": None if n_folds else test_fraction,
            "n_folds": n_folds,
            "seed": seed,
            "n": n,
            "n_test": len(test_rows),
            "grouped": groups is not None,
            "weighted": weights is not None,
            "target_names": list(target_names) if target_names is not None else None,
        },
        "sites": {},
    }
    for site in sites + (["concat"] if concat and len(sites) > 1 else []):
        control = None if random_init_activations is None else as_design(random_init_activations, site)
        entry = _site_report(as_design(activations, site), Y, w, control, folds, test_rows, alpha, seed)
        if site == "concat":
            report["concat"] = entry
        else:
            report["sites"][site] = entry
    report["best_site"] = min(report["sites"], key=lambda s: report["sites"][s]["test"]["mse"])
    return report


def population_probe_report(
    activations: Mapping[str, Tensor],
    targets: Tensor,
    weights: Tensor,
    random_init_activations: Mapping[str, Tensor] | None = None,
    alpha: float = 0.0,
    concat: bool = True,
    target_names: Sequence[str] | None = None,
) -> dict:
    """Exact probe metrics when the rows *are* the population: every input with its probability (e.g. every
    window of a process enumerated, weighted by its exact probability). Each probe is the weighted
    least-squares (ridge) fit on all rows and is scored on all rows, so ``mse`` is the population MSE of the
    best affine read-out, not an estimate: no split, no split seed, nothing held out (there is no sample to
    overfit). A split of such rows would score a few dozen effective windows and move with the split seed.

    Same arguments (``weights`` required: the population's probabilities) and the same dict layout as
    ``fit_probe_report``, with ``config["evaluation"] = "population"``; ``"test"`` holds the population
    metrics. Controls, in the same metric: ``random_init`` fits and scores the random-init model's
    activations on the same population; ``shuffled`` is the population under an independent pairing of
    activations and targets, whose best affine read-out is the weighted target mean (MSE = the targets'
    weighted variance per coordinate), exactly.
    """
    sites, n, device, Y, w = _check_sites(activations, random_init_activations, targets, weights)
    mean = (w[:, None] * Y).sum(0) / w.sum()
    shuffled = {"test": regression_metrics(Y, mean.expand_as(Y), w)}

    def design(acts: Mapping[str, Tensor], site: str) -> Tensor:
        if site == "concat":
            return torch.cat([acts[s].to(device).double() for s in sites], dim=1)
        if acts[site].dim() != 2 or acts[site].shape[0] != n:
            raise ValueError(f"activations[{site!r}] must be (n={n}, d_model), got {tuple(acts[site].shape)}")
        return acts[site].to(device).double()

    def scored(X: Tensor) -> dict:
        W, b = _solve(X, Y, w, alpha)
        return regression_metrics(Y, X @ W + b, w)

    report = {
        "config": {
            "evaluation": "population",
            "alpha": alpha,
            "n": n,
            "weighted": True,
            "target_names": list(target_names) if target_names is not None else None,
        },
        "sites": {},
    }
    for site in sites + (["concat"] if concat and len(sites) > 1 else []):
        test = scored(design(activations, site))
        entry = {
            "test": test,
            "train": {"mse": test["mse"]},
            "shuffled": shuffled,
            "ratio_to_shuffled": test["mse"] / shuffled["test"]["mse"],
        }
        if random_init_activations is not None:
            entry["random_init"] = {"test": scored(design(random_init_activations, site))}
            entry["ratio_to_random_init"] = test["mse"] / entry["random_init"]["test"]["mse"]
        if site == "concat":
            report["concat"] = entry
        else:
            report["sites"][site] = entry
    report["best_site"] = min(report["sites"], key=lambda s: report["sites"][s]["test"]["mse"])
    return report


def reduced_rank_curve(
    X: Tensor,
    Y: Tensor,
    ranks: Sequence[int] | None = None,
    alpha: float = 0.0,
    weights: Tensor | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    groups: Tensor | None = None,
) -> dict[int, float]:
    """Held-out MSE of the best rank-r probe for each ``r`` in ``ranks`` (default 1..k), one seeded split.
    The smallest rank within noise of the full-rank MSE is the number of dimensions the read-out needs."""
    ranks = list(ranks) if ranks is not None else list(range(1, (Y.shape[1] if Y.dim() == 2 else 1) + 1))
    train, test = split_indices(X.shape[0], test_fraction, seed, groups, X.device)
    w_train = None if weights is None else weights[train]
    w_test = None if weights is None else weights[test]
    probes = _reduced_rank_probes(X[train], Y[train], ranks, alpha, w_train, {})
    return {p.rank: regression_metrics(Y[test], p.predict(X[test].double()), w_test)["mse"] for p in probes}
