"""What a policy's residual stream holds about a reward's latent and the process's beliefs: the representation half
of the composition report (``toy.composition``) and of ``toy.reweighting``'s read-outs.

- ``last_position_activations``: every residual site at the last prompt position, concatenated.
- ``latent_readout``: held-out balanced accuracy of a linear read-out (ridge onto one-hot, argmax) of a latent class.
- ``representation_report``: for a (pre-RL, post-RL) pair, probe transfer of the pre-RL factor-belief probes, the
  latent's read-out before and after (all sites, the output site, inside the union ``U`` of the pre-RL
  factor-probe subspaces) and the share of the activation change inside ``U`` (``toy.composition``'s docstring
  says how the verdict reads them).
- ``rare_decodability``: held-out R^2 of the rare factor's belief on a policy's own completions.
"""

from __future__ import annotations

import torch

from probes.linear import fit_ridge, regression_metrics, split_indices
from probes.subspaces import orthonormal_basis
from toy.beliefs import belief_states
from toy.collect import read_residual
from toy.factors import factor_marginals
from toy.processes import Process
from toy.rewards import LatentReward


def last_position_activations(model, prompts: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Residual stream at the last prompt position, all sites concatenated: ``(N, L)`` -> ``(N, n_sites * d_model)`` float64."""
    acts = read_residual(model, prompts, batch_size=batch_size, positions=slice(-1, None))
    return torch.cat(list(acts.values()), dim=1).double().cpu()


def _balanced_accuracy(y: torch.Tensor, pred: torch.Tensor) -> float:
    classes = torch.unique(y)
    return float(torch.stack([(pred[y == c] == c).double().mean() for c in classes]).mean())


def latent_readout(
    X: torch.Tensor, latent: torch.Tensor, train: torch.Tensor, test: torch.Tensor, alpha: float
) -> float:
    """Held-out balanced accuracy of a linear read-out (ridge onto one-hot, argmax) of ``latent`` from ``X``."""
    C = int(latent.max()) + 1
    onehot = torch.nn.functional.one_hot(latent, C).double()
    probe = fit_ridge(X[train], onehot[train], alpha=alpha)
    return _balanced_accuracy(latent[test], probe.predict(X[test]).argmax(-1))


def representation_report(
    X_pre: torch.Tensor,
    X_post: torch.Tensor,
    process: Process,
    reward: LatentReward,
    beliefs: torch.Tensor,
    alpha: float = 1e-3,
    test_fraction: float = 0.25,
    seed: int = 0,
    d_model: int | None = None,
) -> dict:
    """Probe transfer, new content and where the change lives (see module docstring). ``X_*`` ``(N, D)``, the
    sites concatenated; with ``d_model`` the last ``d_model`` columns are the output site (the unembedding's input)."""
    train, test = split_indices(len(X_pre), test_fraction, seed=seed)
    factors = factor_marginals(process, beliefs) if process.factor_state_sizes else [beliefs]
    probes, transfer = [], []
    for k, Y in enumerate(factors):
        pre_probe = fit_ridge(X_pre[train], Y[train], alpha=alpha)
        post_probe = fit_ridge(X_post[train], Y[train], alpha=alpha)
        probes.append(pre_probe)
        transfer.append(
            {
                "factor": k,
                "mse_pre_probe_on_pre": regression_metrics(Y[test], pre_probe.predict(X_pre[test]))["mse"],
                "mse_pre_probe_on_post": regression_metrics(Y[test], pre_probe.predict(X_post[test]))["mse"],
                "mse_refit_on_post": regression_metrics(Y[test], post_probe.predict(X_post[test]))["mse"],
                "r2_pre_probe_on_pre": regression_metrics(Y[test], pre_probe.predict(X_pre[test]))["r2"],
                "r2_refit_on_post": regression_metrics(Y[test], post_probe.predict(X_post[test]))["r2"],
            }
        )
    U = orthonormal_basis(torch.cat([p.W for p in probes], 1), rtol=1e-6)  # (D, r): union of factor subspaces
    latent = reward.latent(beliefs)
    chance = 1 / len(torch.unique(latent))
    acc = {
        "pre": latent_readout(X_pre, latent, train, test, alpha),
        "post": latent_readout(X_post, latent, train, test, alpha),
        "pre_in_factor_subspaces": latent_readout(X_pre @ U, latent, train, test, alpha),
        "post_in_factor_subspaces": latent_readout(X_post @ U, latent, train, test, alpha),
    }
    if d_model:
        acc["pre_output_site"] = latent_readout(X_pre[:, -d_model:], latent, train, test, alpha)
        acc["post_output_site"] = latent_readout(X_post[:, -d_model:], latent, train, test, alpha)
    delta = X_post - X_pre
    total = (delta**2).sum()
    share = float(((delta @ U) ** 2).sum() / total) if total > 0 else float("nan")
    return {
        "probe_transfer": transfer,
        "latent_accuracy": acc,
        "latent_chance": chance,
        "latent_gain": acc["post"] - acc["pre"],
        "latent_gain_output_site": acc["post_output_site"] - acc["pre_output_site"] if d_model else float("nan"),
        "latent_share_in_factor_subspaces": (acc["post_in_factor_subspaces"] - chance)
        / max(acc["post"] - chance, 1e-9),
        "change_share_in_factor_subspaces": share,
        "change_share_random_subspace": U.shape[1] / U.shape[0],
        "factor_subspace_dim": U.shape[1],
        "d_total": U.shape[0],
        "change_norm_ratio": float(delta.norm() / X_pre.norm()),
    }


def rare_decodability(
    model,
    process: Process,
    sequences: torch.Tensor,
    prompt_length: int,
    keep: torch.Tensor,
    seed: int = 0,
    alpha: float = 1e-3,
) -> dict:
    """Linear decodability of the rare factor's (factor 1's) belief on ``sequences (N, L)`` (prompt + the policy's
    own completion) at the completion positions: held-out R^2 of a ridge probe from all residual sites, on
    the sequences the process can produce (``keep (N,)`` bool, e.g. ``RareEmissionReward.valid``), split by
    sequence. Returns ``{"r2", "mse", "target_variance", "n_sequences"}``."""
    seqs = sequences[keep]
    if len(seqs) < 20:
        return {"r2": float("nan"), "target_variance": float("nan"), "n_sequences": int(len(seqs))}
    Y = factor_marginals(process, belief_states(process, seqs))[1][:, prompt_length:]  # (n, K, S_rare)
    X = torch.cat(list(read_residual(model, seqs, positions=slice(prompt_length, None)).values()), dim=1).double().cpu()
    groups = torch.arange(len(seqs))[:, None].expand(-1, Y.shape[1]).reshape(-1)
    Y = Y.reshape(-1, Y.shape[-1])
    train, test = split_indices(len(X), 0.25, seed=seed, groups=groups)
    probe = fit_ridge(X[train], Y[train], alpha=alpha)
    m = regression_metrics(Y[test], probe.predict(X[test]))
    return {"r2": m["r2"], "mse": m["mse"], "target_variance": float(Y.var(0).sum()), "n_sequences": int(len(seqs))}
