"""Factored processes: joint beliefs split into factor marginals, joint tokens into factor tokens and back
(radix order, first factor most significant), the Schmidt spectrum and the best product approximation."""

from __future__ import annotations

import torch

from toy.processes import Process


def factor_marginals(process: Process, beliefs: torch.Tensor) -> list[torch.Tensor]:
    """Split joint beliefs ``(..., S)`` of a factored process into per-factor marginals ``[(..., S_k)]``."""
    sizes = process.factor_state_sizes
    if sizes is None:
        raise ValueError(f"{process.name} is not a factored process (no factor_state_sizes)")
    if beliefs.shape[-1] != process.n_states:
        raise ValueError(f"beliefs have {beliefs.shape[-1]} states; {process.name} has {process.n_states}")
    shaped = beliefs.reshape(*beliefs.shape[:-1], *sizes)
    nd = beliefs.ndim - 1
    return [shaped.sum(dim=tuple(nd + j for j in range(len(sizes)) if j != k)) for k in range(len(sizes))]


def factor_tokens(process: Process, tokens: torch.Tensor) -> torch.Tensor:
    """Decode joint tokens ``(...)`` into factor tokens ``(..., K)`` (radix, first factor most significant)."""
    sizes = process.factor_vocab_sizes
    if sizes is None:
        raise ValueError(f"{process.name} is not a factored process (no factor_vocab_sizes)")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= process.vocab_size):
        raise ValueError(f"joint tokens must lie in 0..{process.vocab_size - 1} for {process.name}")
    out, rest = [], tokens
    for v in reversed(sizes):
        out.append(rest % v)
        rest = rest // v
    return torch.stack(out[::-1], dim=-1)


def joint_tokens(process: Process, factor_toks: torch.Tensor) -> torch.Tensor:
    """Encode factor tokens ``(..., K)`` into joint tokens ``(...)``; inverse of ``factor_tokens``."""
    sizes = process.factor_vocab_sizes
    if sizes is None or factor_toks.shape[-1] != len(sizes):
        raise ValueError(f"factor tokens need a last axis of {len(sizes or ())} factors for {process.name}")
    for k, v in enumerate(sizes):
        f = factor_toks[..., k]
        if f.numel() and (f.min() < 0 or f.max() >= v):
            raise ValueError(f"factor {k} tokens must lie in 0..{v - 1} for {process.name}")
    out = torch.zeros(factor_toks.shape[:-1], dtype=torch.long, device=factor_toks.device)
    for k, v in enumerate(sizes):
        out = out * v + factor_toks[..., k]
    return out


def schmidt_spectrum(beliefs: torch.Tensor, sizes: tuple[int, int]) -> torch.Tensor:
    """Singular values of each two-factor joint belief reshaped to ``(S_a, S_b)``: ``(..., min(S_a, S_b))``.

    One nonzero value means the belief is a product ``v_a (x) v_b``; the share of the squared spectrum
    outside the first value is a measure of how entangled it is.
    """
    Sa, Sb = sizes
    return torch.linalg.svdvals(beliefs.reshape(*beliefs.shape[:-1], Sa, Sb))


def product_approximation(beliefs: torch.Tensor, sizes: tuple[int, int]):
    """Best rank-1 (product) approximation of two-factor joint beliefs (the S step of factor steering).

    Args:
        beliefs: ``(..., S_a * S_b)`` joint beliefs (radix order, factor a most significant).
        sizes: ``(S_a, S_b)``.
    Returns:
        ``(v_a (..., S_a), v_b (..., S_b), residual (..., S_a * S_b))`` with ``v_a``, ``v_b`` normalised to sum 1
        and ``beliefs = scale * v_a (x) v_b + residual`` for the Frobenius-optimal ``scale``; for a product belief
        the residual is zero and ``v_a``, ``v_b`` are exactly the marginals.
    """
    Sa, Sb = sizes
    M = beliefs.reshape(*beliefs.shape[:-1], Sa, Sb)
    U, s, Vh = torch.linalg.svd(M)
    u, v = U[..., :, 0], Vh[..., 0, :]
    # the top singular pair of a non-negative matrix can be chosen non-negative (Perron-Frobenius)
    sign = torch.sign(u.sum(-1, keepdim=True))
    u, v = u * sign, v * sign
    va, vb = u / u.sum(-1, keepdim=True), v / v.sum(-1, keepdim=True)
    approx = (s[..., :1, None] * U[..., :, :1] * Vh[..., :1, :]).reshape(beliefs.shape)
    return va, vb, beliefs - approx


def product_belief(factors: list[torch.Tensor]) -> torch.Tensor:
    """Joint belief ``(..., prod S_k)`` of independent factor beliefs ``[(..., S_k)]`` (radix order)."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[..., :, None] * f[..., None, :]).reshape(*out.shape[:-1], -1)
    return out
