"""Seeded, vectorized sampling of token sequences (and their exact beliefs) from a ``Process``.

Sequences start from the stationary distribution, so every window is a draw from the stationary
process. Sampling walks the belief, not a hidden state: ``P(x | prefix) = eta T[x] 1``, then
``eta <- eta T[x] / P(x | prefix)``; this is exact for generalized HMMs too and yields the beliefs for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toy.processes import Process


@dataclass
class Batch:
    """``tokens (batch, length)`` long; ``beliefs (batch, length, states)`` (after reading token t) or None;
    ``states (batch, length + 1)`` hidden states (state before token t, last entry the final state) or None."""

    tokens: torch.Tensor
    beliefs: torch.Tensor | None = None
    states: torch.Tensor | None = None


def sample(
    process: Process,
    batch_size: int,
    length: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    return_beliefs: bool = False,
    return_states: bool = False,
    belief_dtype: torch.dtype = torch.float64,
) -> Batch:
    """Draw ``batch_size`` sequences of ``length`` tokens on ``device``.

    Pass either a ``torch.Generator`` (on ``device``) or an integer ``seed``; the same seed on the same
    device gives identical data. ``return_states`` samples the hidden state path instead (HMMs only);
    it draws the same token distribution.
    """
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be >= 1; got {batch_size}, {length}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None else torch.device("cpu"))
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if return_states:
        return _sample_states(process, batch_size, length, generator, device, return_beliefs, belief_dtype)
    S, V = process.n_states, process.vocab_size
    flat = process.T.to(device=device, dtype=belief_dtype).permute(1, 0, 2).reshape(S, V * S)
    eta = process.stationary.to(device=device, dtype=belief_dtype).expand(batch_size, S)
    u = torch.rand(batch_size, length, generator=generator, device=device, dtype=belief_dtype)
    tokens = torch.empty(batch_size, length, dtype=torch.long, device=device)
    beliefs = torch.empty(batch_size, length, S, dtype=belief_dtype, device=device) if return_beliefs else None
    rows = torch.arange(batch_size, device=device)
    for t in range(length):  # over positions; the whole batch moves at once
        joint = (eta @ flat).view(batch_size, V, S)
        px = joint.sum(-1)
        # inverse-CDF draw; the clamp guards the rounding of the last cumulative sum below u
        x = (px.cumsum(-1) < u[:, t, None] * px.sum(-1, keepdim=True)).sum(-1).clamp_max(V - 1)
        tokens[:, t] = x
        eta = joint[rows, x] / px[rows, x, None]
        if return_beliefs:
            beliefs[:, t] = eta
    return Batch(tokens, beliefs)


def _sample_states(process, batch_size, length, generator, device, return_beliefs, belief_dtype) -> Batch:
    if process.generalized:
        raise ValueError(f"{process.name} is a generalized HMM: it has no hidden state path to sample")
    S, V = process.n_states, process.vocab_size
    cum = process.T.to(device).permute(1, 0, 2).reshape(S, V * S).cumsum(-1)  # [i, x * S + j]
    pi_cum = process.stationary.to(device).cumsum(0)
    u0 = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    s = (pi_cum[None] < u0[:, None]).sum(-1).clamp_max(S - 1)
    u = torch.rand(batch_size, length, generator=generator, device=device, dtype=torch.float64)
    tokens = torch.empty(batch_size, length, dtype=torch.long, device=device)
    states = torch.empty(batch_size, length + 1, dtype=torch.long, device=device)
    states[:, 0] = s
    for t in range(length):
        c = cum[s]
        idx = (c < u[:, t, None] * c[:, -1:]).sum(-1).clamp_max(V * S - 1)
        tokens[:, t], s = idx // S, idx % S
        states[:, t + 1] = s
    beliefs = None
    if return_beliefs:
        from toy.beliefs import belief_states

        beliefs = belief_states(process, tokens).to(belief_dtype)
    return Batch(tokens, beliefs, states)
