"""Seeded, vectorized sampling of token sequences (and their exact beliefs) from a ``Process``.

Sequences start from the stationary distribution, so every window is a draw from the stationary
process. Sampling walks the belief, not a hidden state: ``P(x | prefix) = eta T[x] 1``, then
``eta <- eta T[x] / P(x | prefix)``; this is exact for generalized HMMs too and yields the beliefs for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toy.beliefs import belief_states
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

    Pass either a ``torch.Generator`` (on ``device``) or an integer ``seed`` (default 0). The same seed,
    device, ``belief_dtype`` and ``return_states`` give identical tokens, and beliefs equal up to the last bit (CPU kernels may round
    differently with buffer alignment; round before taking an argmax over exact ties). ``belief_dtype`` is the precision
    of the belief walk and of the returned beliefs: float64 (default) for exact analytics, float32 for
    bulk training data (~1.5x faster; token probabilities are then exact to ~1e-7, far below sampling
    noise, but a float32 draw differs from a float64 draw with the same seed). ``return_states`` samples
    the hidden state path instead (HMMs only): the same token distribution through a different draw.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not isinstance(length, int):
        raise ValueError(f"batch_size and length must be integers; got {batch_size!r}, {length!r}")
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be >= 1; got {batch_size}, {length}")
    if belief_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"belief_dtype must be torch.float32 or torch.float64; got {belief_dtype}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    device = (
        torch.device(device)
        if device is not None
        else (generator.device if generator is not None else torch.device("cpu"))
    )
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
    elif generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}; create it on {device}")
    if return_states:
        return _sample_states(process, batch_size, length, generator, device, return_beliefs, belief_dtype)
    B, L, S, V = batch_size, length, process.n_states, process.vocab_size
    T = process.T.to(device=device, dtype=belief_dtype)
    # One (V*S + V, S) @ (S, B) matmul per step gives, for every sequence, eta T[x] for every token x (rows
    # x*S + j) and the cumulative token probabilities P(token <= k | prefix) (last V rows). Sequences lie
    # along the last axis so each later op is elementwise over contiguous rows of length B.
    W = torch.cat([T.permute(0, 2, 1).reshape(V * S, S), T.sum(-1).cumsum(0)]).contiguous()
    u = torch.rand(L, B, generator=generator, device=device, dtype=belief_dtype)
    tokens = torch.empty(L, B, dtype=torch.long, device=device)
    beliefs = torch.empty(L, S, B, dtype=belief_dtype, device=device) if return_beliefs else None
    eta = process.stationary.to(device=device, dtype=belief_dtype)[:, None].expand(S, B).contiguous()
    out = torch.empty(V * S + V, B, dtype=belief_dtype, device=device)
    candidates, cum = out[: V * S].view(V, S, B), out[V * S :]
    for t in range(L):  # over positions; the whole batch moves at once
        torch.mm(W, eta, out=out)
        # inverse-CDF draw: x = #{k < V-1 : P(<= k) < u * P(<= V-1)}; a zero-probability token has a
        # cumulative equal (bit for bit) to its predecessor's, so it is never drawn
        x = tokens[t]
        torch.sum(cum[:-1] < u[t] * cum[-1], 0, out=x)
        e = candidates.gather(0, x.view(1, 1, B).expand(1, S, B))[0]
        eta = torch.div(e, e.sum(0), out=beliefs[t]) if return_beliefs else e / e.sum(0)
    # (L, B) -> (B, L) and (L * S, B) -> (B, L * S): plain 2-D transposes, the cheapest re-layout
    tokens = tokens.T.contiguous()
    if return_beliefs:
        beliefs = beliefs.view(L * S, B).T.contiguous().view(B, L, S)
    return Batch(tokens, beliefs)


def _sample_states(process, batch_size, length, generator, device, return_beliefs, belief_dtype) -> Batch:
    if process.generalized:
        raise ValueError(f"{process.name} is a generalized HMM: it has no hidden state path to sample")
    B, L, S, V = batch_size, length, process.n_states, process.vocab_size
    # cum[i, x * S + j] = P((token, next state) <= (x, j) | state i), the moves in token-major order
    cum = process.T.to(device).permute(1, 0, 2).reshape(S, V * S).cumsum(-1)
    pi_cum = process.stationary.to(device).cumsum(0)
    u0 = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    s = (pi_cum[:-1, None] < u0 * pi_cum[-1]).sum(0)
    u = torch.rand(L, B, generator=generator, device=device, dtype=torch.float64)
    moves = torch.empty(L, B, dtype=torch.long, device=device)
    states = torch.empty(L + 1, B, dtype=torch.long, device=device)
    states[0] = s
    cum_t = cum.T.contiguous()  # (V*S, S): column s is state s's cumulative move distribution
    for t in range(L):
        c = cum_t.index_select(1, s)  # (V*S, B)
        torch.sum(c[:-1] < u[t] * c[-1], 0, out=moves[t])
        s = states[t + 1] = moves[t] % S
    tokens = (moves // S).T.contiguous()
    beliefs = None
    if return_beliefs:
        beliefs = belief_states(process, tokens).to(belief_dtype)
    return Batch(tokens, beliefs, states.T.contiguous())
