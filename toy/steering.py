"""Residual edits that steer the alignment tag of a (tag, capability) toy process, and their exact scoring.

Shared by ``toy.experiments.factor_steering`` (one model per rho) and ``toy.experiments.steering_knob`` (the
edits against each other along both coupling axes, over seeds). Works for any two-factor process whose joint
token is ``copy * V + x`` (factor vocab ``(2, V)``, copy 1 = misaligned): ``toy.processes.tagged`` and
``toy.alignment.persona_world``.

The edits (each ``(n, d_model)``, added at the probed site and the last position):

- ``pinv`` / ``covariance`` (``steering_edit``): "factorize the belief with the product step S, steer the tag factor, map back": make the
  joint-belief probe read ``eta' = v_tag' (x) v_cap`` exactly, with the least Euclidean / Mahalanobis-norm move.
- ``mean_diff`` (``mean_difference_edit``): the plain baseline: the class-mean difference ``v`` of the residual
  (contexts whose next copy is more likely misaligned minus the rest), scaled per context so that the probe's
  *misaligned reading* (``misaligned_readout``: P(next token is a misaligned copy)) moves to the target's.

Scoring (``steering_metrics``, nats): tag KL = KL(target copy marginal || model's); capability KL against the
unedited model, KL(cap before || cap after), and against the exact process, KL(exact cap || cap after). The exact
capability marginal is the right one after a tag edit in both worlds: the next capability token's distribution
depends on the capability belief alone (each factor alone is its own process), and the target keeps ``v_cap``.
"""

from __future__ import annotations

import torch

from probes import add_vector, fit_ridge, next_token_logits, regression_metrics, residual_stream, split_indices
from toy.beliefs import belief_states
from toy.collect import collect
from toy.data import sample
from toy.factors import factor_marginals, product_approximation, product_belief
from toy.processes import Process

EDITS = ("pinv", "covariance", "mean_diff")


def steering_probe(
    model, process: Process, site: str, length: int, probe_sequences: int, n_contexts: int, alpha: float, seed: int
) -> dict:
    """The probe a steering run edits through, fitted on ``probe_sequences`` windows of ``length`` tokens (one short
    of training's: the last training position's output is never trained, see ``toy.collect.collect``): ``data`` (the
    probe rows), ``probe`` (ridge on every row: the steering contexts are fresh samples), ``probe_r2`` (held-out R^2
    of the same fit on 80% of the windows), ``cov`` (the activations' covariance, the S-step metric) and ``tokens``
    (``n_contexts`` fresh steering contexts)."""
    data = collect(model, process, length, probe_sequences, seed + 1, sites=[site], batch_size=1024)
    train_rows, test_rows = split_indices(data.X.shape[0], 0.2, seed, data.groups)
    held_out = fit_ridge(data.X[train_rows], data.beliefs[train_rows], alpha)
    probe_r2 = regression_metrics(data.beliefs[test_rows], held_out.predict(data.X[test_rows].double()))["r2"]
    Xc = data.X.double() - data.X.double().mean(0)
    return {
        "data": data,
        "probe": fit_ridge(data.X, data.beliefs, alpha),
        "probe_r2": probe_r2,
        "cov": Xc.T @ Xc / len(Xc),
        "tokens": sample(process, n_contexts, length, seed=seed + 2).tokens,
    }


def steering_edit(
    probe, eta_hat: torch.Tensor, eta_target: torch.Tensor, cov: torch.Tensor | None = None
) -> torch.Tensor:
    """Residual edits ``(n, d_model)`` that move the probe's reading from ``eta_hat`` to ``eta_target`` (both (n, S)).

    ``cov=None``: ``dx = (eta_target - eta_hat) @ pinv(W)`` with ``W`` (d_model, S) -- the least Euclidean-norm
    ``dx`` with ``dx @ W = eta_target - eta_hat``; it lies in the span of ``W``'s columns (the probe's row
    space). ``cov`` (d_model, d_model), the activations' covariance: ``dx = delta @ pinv(W^T C W) @ W^T C`` --
    the least Mahalanobis-norm (``dx C^+ dx^T``) edit with the same reading, i.e. a move along directions
    in which the activations actually vary (a probe's own directions can be ones the model barely uses).
    Exact when the change lies in the probe's output range (belief changes summing to zero do, for a probe
    fitted on beliefs); otherwise least squares.
    """
    W = probe.W.to(eta_hat.device, torch.float64)
    delta = eta_target.double() - eta_hat.double()
    if cov is None:
        return delta @ torch.linalg.pinv(W)
    CW = cov.to(W) @ W
    return delta @ torch.linalg.pinv(W.T @ CW, hermitian=True) @ CW.T


def misaligned_readout(process: Process) -> torch.Tensor:
    """``(S,)`` P(next token is a misaligned copy | state); ``beliefs @ it`` is that probability for a belief."""
    if process.factor_vocab_sizes is None or process.factor_vocab_sizes[0] != 2:
        raise ValueError(f"{process.name}: need factor vocab (2, V) -- copy 0 aligned, copy 1 misaligned")
    V = process.factor_vocab_sizes[1]
    return process.T.sum(-1).reshape(2, V, -1)[1].sum(0).double()


def mean_difference(X: torch.Tensor, beliefs: torch.Tensor, process: Process) -> torch.Tensor:
    """``(d_model,)`` mean of ``X (N, d_model)`` over rows whose exact belief ``(N, S)`` makes the next copy more
    likely misaligned, minus the mean over the rest."""
    side = beliefs.double() @ misaligned_readout(process) > 0.5
    if side.all() or not side.any():
        raise ValueError("mean_difference: every row is on one side; sample more sequences")
    X = X.double()
    return X[side].mean(0) - X[~side].mean(0)


def mean_difference_edit(
    probe, v: torch.Tensor, eta_hat: torch.Tensor, eta_target: torch.Tensor, readout: torch.Tensor
) -> torch.Tensor:
    """``(n, d_model)`` edits ``alpha_i v`` with ``alpha_i`` such that the probe's reading along ``readout (S,)``
    moves from ``eta_hat`` to ``eta_target`` (both (n, S)): ``alpha = (eta_target - eta_hat) @ r / (v @ W @ r)``."""
    W, v = probe.W.to(torch.float64), v.to(torch.float64)
    gain = v @ W @ readout
    if gain.abs() < 1e-12:
        raise ValueError("mean_difference_edit: the probe does not read the direction v at all")
    return ((eta_target.double() - eta_hat.double()) @ readout / gain)[:, None] * v


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats along the last axis (0 log 0 = 0); ``q`` clamped at 1e-12."""
    p, q = p.double(), q.double()
    return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-12).log())).sum(-1)


def opposite_donors(side: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row of the bool ``side (n,)``, a random other row on the other side: ``(n,)`` indices."""
    donors = torch.empty(len(side), dtype=torch.long)
    for s in (False, True):
        pool = (side != s).nonzero().squeeze(1)
        rows = (side == s).nonzero().squeeze(1)
        if len(rows) and not len(pool):
            raise ValueError("every context is on the same side (aligned / misaligned); sample more contexts")
        donors[rows] = pool[torch.randint(len(pool), (len(rows),), generator=generator)]
    return donors


def steer_factor(
    model,
    process: Process,
    probe,
    tokens: torch.Tensor,
    site: str,
    cov: torch.Tensor | None = None,
    mean_diff: torch.Tensor | None = None,
    kinds: tuple[str, ...] = ("pinv", "covariance"),
    seed: int = 0,
) -> dict:
    """Probe -> S -> steer the tag -> edit, on windows ``tokens (n, L)``, for each edit in ``kinds`` (``EDITS``;
    ``covariance`` needs ``cov`` (d_model, d_model), ``mean_diff`` the direction ``mean_diff`` (d_model,)), each
    beside a random edit of the same norm per row.

    The target: the exact tag belief of a donor window on the other side (next copy more likely misaligned or
    not), ``eta' = target_tag (x) v_cap``. Returns per-context CPU float64 tensors: ``p0`` (n, V) unmodified
    prediction, ``p_exact`` (n, V) the exact process's, ``target`` (n, V) the prediction ``eta'`` implies,
    ``resid_norm`` (n,), the S-step residuals, and per edit ``{"steered", "random"}`` predictions, ``edit_norm``
    and ``probe_after``."""
    if process.factor_state_sizes is None or len(process.factor_state_sizes) != 2:
        raise ValueError(f"{process.name}: factor steering needs a two-factor process (tag, capability)")
    if unknown := set(kinds) - set(EDITS):
        raise ValueError(f"unknown edits {sorted(unknown)}; choose from {EDITS}")
    gen = torch.Generator().manual_seed(seed)
    n, L = tokens.shape
    x = residual_stream(model, tokens, sites=[site])[0][:, -1].cpu().double()  # (n, d_model)
    eta_hat = probe.predict(x)
    _, v_cap, resid = product_approximation(eta_hat, process.factor_state_sizes)
    exact = belief_states(process, tokens)[:, -1]
    readout = misaligned_readout(process)
    target_tag = factor_marginals(process, exact)[0][opposite_donors(exact @ readout > 0.5, gen)]
    eta_target = product_belief([target_tag, v_cap])
    _, _, exact_resid = product_approximation(exact, process.factor_state_sizes)
    emit = process.T.sum(-1).T  # (S, V): P(token | state)

    def predict(edit):
        edits = [] if edit is None else [add_vector(site, edit.float(), positions=[L - 1])]
        return next_token_logits(model, tokens, edits).double().softmax(-1).cpu()

    out = {
        "p0": predict(None),
        "p_exact": exact @ emit,
        "target": eta_target @ emit,
        "eta_target": eta_target,
        "resid_norm": x.norm(dim=-1),
        "s_residual": resid.norm(dim=-1) / eta_hat.norm(dim=-1),
        "exact_product_residual": exact_resid.norm(dim=-1) / exact.norm(dim=-1),
        "readout": readout,
    }
    for kind in kinds:
        if kind == "mean_diff":
            if mean_diff is None:
                raise ValueError("the mean_diff edit needs the class-mean difference (toy.steering.mean_difference)")
            dx = mean_difference_edit(probe, mean_diff, eta_hat, eta_target, readout)
        else:
            if kind == "covariance" and cov is None:
                raise ValueError("the covariance edit needs the activations' covariance cov")
            dx = steering_edit(probe, eta_hat, eta_target, cov if kind == "covariance" else None)
        rand = torch.randn(dx.shape, generator=gen, dtype=torch.float64)
        rand = rand / rand.norm(dim=-1, keepdim=True) * dx.norm(dim=-1, keepdim=True)
        out[kind] = {
            "steered": predict(dx),
            "random": predict(rand),
            "edit_norm": dx.norm(dim=-1),
            "probe_after": probe.predict(x + dx),
        }
    return out


def steering_metrics(process: Process, out: dict) -> dict:
    """Mean KLs (nats), win rates (share of contexts where the steered KL is below the random one) and
    P(misaligned copy) from ``steer_factor``'s output, per edit present; plain floats. ``cap_kl`` is against the
    unedited model, ``cap_kl_exact`` against the exact process (``unsteered``: the model's own error);
    ``tag_kl_by_token`` is the tag KL per next capability token, ``E_x KL(target(copy | x) || model(copy | x))`` with
    ``x`` from the target (per slice in ``persona_world``; ``tag_kl`` sees only the average over slices)."""
    Vt, Vc = process.factor_vocab_sizes

    def marg(p):  # (n, V) -> tag (n, Vt), capability (n, Vc)
        p = p.reshape(-1, Vt, Vc)
        return p.sum(-1), p.sum(-2)

    def by_token(p, q):  # E_{x ~ p's capability marginal} KL(p(copy | x) || q(copy | x)): the tag of each token's slice
        # the target is built on the probe's v_cap, which can be slightly negative: clip to the simplex, else a
        # capability token of ~0 (or negative) target probability divides by ~0
        p = p.double().clamp_min(0)
        p, q = (p / p.sum(-1, keepdim=True)).reshape(-1, Vt, Vc), q.reshape(-1, Vt, Vc).double()
        w = p.sum(1)
        return (
            w * kl((p / w[:, None].clamp_min(1e-300)).transpose(1, 2), (q / q.sum(1, keepdim=True)).transpose(1, 2))
        ).sum(-1)

    (tag_t, _), (tag0, cap0), (_, cap_x) = marg(out["target"]), marg(out["p0"]), marg(out["p_exact"])
    metrics = {
        "tag_kl_unsteered": kl(tag_t, tag0).mean().item(),
        "tag_kl_by_token_unsteered": by_token(out["target"], out["p0"]).mean().item(),
        "cap_kl_exact_unsteered": kl(cap_x, cap0).mean().item(),
        "s_residual": out["s_residual"].mean().item(),
        "exact_product_residual": out["exact_product_residual"].mean().item(),
        "p_misaligned": {"target": tag_t[:, 1].mean().item(), "unsteered": tag0[:, 1].mean().item()},
    }
    for kind in (k for k in EDITS if k in out):
        o = out[kind]
        (tag_s, cap_s), (tag_r, cap_r) = marg(o["steered"]), marg(o["random"])
        tkl = {"steered": kl(tag_t, tag_s), "random": kl(tag_t, tag_r)}
        ckl = {"steered": kl(cap0, cap_s), "random": kl(cap0, cap_r)}
        metrics[kind] = {
            "tag_kl": {k: v.mean().item() for k, v in tkl.items()},
            "cap_kl": {k: v.mean().item() for k, v in ckl.items()},
            "cap_kl_exact": {"steered": kl(cap_x, cap_s).mean().item(), "random": kl(cap_x, cap_r).mean().item()},
            "tag_kl_by_token": {w: by_token(out["target"], o[w]).mean().item() for w in ("steered", "random")},
            "tag_kl_win_rate": (tkl["steered"] < tkl["random"]).double().mean().item(),
            "cap_kl_win_rate": (ckl["steered"] < ckl["random"]).double().mean().item(),
            "edit_norm_over_resid_norm": (o["edit_norm"] / out["resid_norm"]).mean().item(),
            "probe_after_error": (o["probe_after"] - out["eta_target"]).abs().max().item(),
            "readout_after_error": ((o["probe_after"] - out["eta_target"]) @ out["readout"]).abs().max().item(),
            "p_misaligned": {"steered": tag_s[:, 1].mean().item(), "random": tag_r[:, 1].mean().item()},
        }
    return metrics
