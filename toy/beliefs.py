"""Exact belief states and information-theoretic quantities of a ``Process``.

Conventions (every function here, and every caller in the project):
- Beliefs start from the process's stationary distribution ``pi``.
- ``belief_states(p, tokens)[:, t]`` is the belief *after* reading tokens ``0..t`` -- the belief that goes
  with a model's output at input position ``t`` (which predicts token ``t + 1``).
- Entropies are in nats.
- ``myopic_entropy(p, L)[n - 1] = h(n) = H(X_n | X_1..X_{n-1})``; ``h(1) = H(X_1)``.
- ``loss_floor(p, n)`` = mean of ``h(2)..h(n)``: the best mean cross-entropy of a model with context ``n``
  trained with the usual shifted loss (predict tokens 2..n of a length-n window from their prefixes).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from toy.msp import TOL, MixedStatePresentation, mixed_state_presentation  # noqa: F401  (public here too)
from toy.processes import Process

# ---------------------------------------------------------------------------- filtering


def _flat(process: Process, device, dtype=torch.float64) -> torch.Tensor:
    """``(S, V * S)`` view of T with ``[i, x * S + j] = T[x, i, j]``: one matmul updates every token at once."""
    S, V = process.n_states, process.vocab_size
    return process.T.to(device=device, dtype=dtype).permute(1, 0, 2).reshape(S, V * S)


def _check_tokens(process: Process, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(
            f"tokens must be a tensor of shape (batch, length); got {getattr(tokens, 'shape', type(tokens))}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer token ids; got dtype {tokens.dtype}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= process.vocab_size):
        raise ValueError(
            f"tokens must lie in 0..{process.vocab_size - 1} for {process.name}; got range "
            f"{int(tokens.min())}..{int(tokens.max())}"
        )


def _filter(
    process: Process, tokens: torch.Tensor, beliefs: bool = True, predictive: bool = False, strict: bool = True
):
    """Forward filter over positions, every sequence at once.

    Returns ``(beliefs (B, L, S) or None, log P(token t | prefix) (B, L), predictive (B, L + 1, V) or None)``,
    float64 on the tokens' device. With ``strict`` a sequence of probability zero raises; otherwise its
    log-probabilities from the first impossible token on are ``-inf`` and its later beliefs NaN.
    """
    _check_tokens(process, tokens)
    B, L = tokens.shape
    S, V = process.n_states, process.vocab_size
    dev = tokens.device
    T = process.T.to(dev)
    # Sequences lie along the last axis (columns), so every op below is elementwise over contiguous rows
    # of length B; reductions over tiny state axes of (B, S) layouts cost ~10x more per element.
    W = T.permute(0, 2, 1).reshape(V * S, S)  # W[x * S + j, i] = T[x, i, j]
    emit = T.sum(-1)  # emit[x, i] = P(x | i), (V, S)
    eta = process.stationary.to(dev)[:, None].expand(S, B).contiguous()
    toks = tokens.T.contiguous().view(L, 1, 1, B)
    out_b = torch.empty(L, S, B, dtype=torch.float64, device=dev) if beliefs else None
    logp = torch.empty(L, B, dtype=torch.float64, device=dev)
    out_p = torch.empty(L + 1, V, B, dtype=torch.float64, device=dev) if predictive else None
    for t in range(L):  # over positions only
        if predictive:
            torch.mm(emit, eta, out=out_p[t])
        e = (W @ eta).view(V, S, B).gather(0, toks[t].expand(1, S, B))[0]  # eta T[x_t], unnormalised
        norm = e.sum(0)  # P(x_t | prefix)
        torch.log(norm, out=logp[t])
        eta = torch.div(e, norm, out=out_b[t]) if beliefs else e / norm
    if predictive:
        torch.mm(emit, eta, out=out_p[L])
    # one check after the loop (no per-step device sync): log of 0 is -inf, later steps NaN
    bad = ~(logp > -math.inf)
    if strict and bad.any():
        t, b = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"sequence {b} has probability 0 under {process.name} (token {t} is impossible after its prefix)"
        )
    if not strict:
        logp = logp.masked_fill(bad, -math.inf)
    if beliefs:  # (L * S, B) -> (B, L * S) is one 2-D transpose, several times faster than a 3-D permute
        out_b = out_b.view(L * S, B).T.contiguous().view(B, L, S)
    if predictive:
        out_p = out_p.view((L + 1) * V, B).T.contiguous().view(B, L + 1, V)
    return out_b, logp.T.contiguous(), out_p


def belief_states(process: Process, tokens: torch.Tensor) -> torch.Tensor:
    """Exact beliefs: ``tokens (batch, length)`` int -> ``(batch, length, states)`` float64.

    Entry ``t`` is ``P(state | tokens 0..t)``, i.e. the belief *after* reading token ``t``, starting from
    the stationary distribution. Raises if a sequence has probability zero.
    """
    return _filter(process, tokens)[0]


def sequence_log_probabilities(process: Process, tokens: torch.Tensor) -> torch.Tensor:
    """``log P(tokens)`` in nats for each sequence: ``(batch, length)`` -> ``(batch,)`` float64.

    Raises if a sequence has probability zero.
    """
    return _filter(process, tokens, beliefs=False)[1].sum(1)


def sequence_probabilities(process: Process, tokens: torch.Tensor) -> torch.Tensor:
    """``P(tokens)`` for each sequence: ``(batch, length)`` -> ``(batch,)`` float64 (0 for impossible ones)."""
    return _filter(process, tokens, beliefs=False, strict=False)[1].sum(1).exp()


def next_token_distributions(process: Process, tokens: torch.Tensor) -> torch.Tensor:
    """Exact predictive distributions: ``(batch, length)`` -> ``(batch, length, vocab)`` float64.

    Entry ``t`` is ``P(token t + 1 | tokens 0..t)`` -- aligned with a causal LM's logits at position ``t``.
    Raises if a sequence has probability zero.
    """
    return _filter(process, tokens, beliefs=False, predictive=True)[2][:, 1:]


def initial_token_distribution(process: Process) -> torch.Tensor:
    """``P(token 0)`` under the stationary distribution: ``(vocab,)``."""
    return process.stationary @ process.T.sum(-1).T


# ---------------------------------------------------------------------------- entropies


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last axis (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


_HASH = torch.randint(1, 2**62, (4096,), generator=torch.Generator().manual_seed(0)) | 1


def _hash(beliefs: torch.Tensor, tol: float) -> torch.Tensor:
    """1-D int64 hash of beliefs rounded to multiples of ``tol`` (wrapping arithmetic).

    Sorting one int64 per belief is ~10x faster than ``unique(dim=0)``; two different rounded beliefs
    collide with probability ~ N^2 / 2^64.
    """
    if beliefs.shape[-1] > len(_HASH):
        raise ValueError(f"beliefs with more than {len(_HASH)} states are not supported")
    return (torch.round(beliefs / tol).to(torch.int64) * _HASH[: beliefs.shape[-1]]).sum(-1)


def _myopic_levels(process: Process, tol: float):
    """Yield ``(h(n), number of beliefs at level n - 1)`` for n = 1, 2, ...: walk the belief distribution
    level by level, merging equal beliefs."""
    S, V = process.n_states, process.vocab_size
    flat = _flat(process, "cpu")
    beliefs, probs = process.stationary[None], torch.ones(1, dtype=torch.float64)
    while True:
        joint = (beliefs @ flat).view(-1, V, S)
        px = joint.sum(-1)
        yield (probs * _entropy(px)).sum().item(), beliefs.shape[0]
        p = (px * probs[:, None]).reshape(-1)
        keep = p > 0
        child = (joint / px.clamp_min(1e-300)[..., None]).reshape(-1, S)[keep]
        beliefs, probs = _merge(child, p[keep], tol)


def _merge(beliefs: torch.Tensor, probs: torch.Tensor, tol: float):
    """Merge beliefs that round to the same multiple of ``tol``, summing their probabilities."""
    uniq, inv = torch.unique(_hash(beliefs, tol), return_inverse=True)
    p = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, probs)
    b = torch.zeros(len(uniq), beliefs.shape[1], dtype=torch.float64).index_add_(0, inv, beliefs * probs[:, None])
    return b / p[:, None], p


def myopic_entropy(process: Process, max_length: int, tol: float = TOL) -> torch.Tensor:
    """``h(1..max_length)`` in nats: ``h(n) = H(X_n | X_1..X_{n-1})``, float64 ``(max_length,)``.

    Exact up to merging beliefs equal within ``tol``: ``h(n)`` averages the entropy of the next-token
    distribution over the beliefs reachable after ``n - 1`` tokens.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    levels = _myopic_levels(process, tol)
    return torch.tensor([next(levels)[0] for _ in range(max_length)], dtype=torch.float64)


def loss_floor(process: Process, context_length: int) -> float:
    """Best achievable mean next-token cross-entropy (nats) of a model with context ``context_length``.

    Averages ``h(2)..h(n)`` with ``n = context_length``: the positions a causal LM is scored on when it
    reads windows of ``n`` tokens drawn from the stationary process and predicts tokens 2..n (the
    shifted loss that ``toy`` training and the exact validation loss use).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (a window needs a token to predict); got {context_length}")
    return myopic_entropy(process, context_length)[1:].mean().item()


def entropy_rate(
    process: Process, tol: float = TOL, max_length: int = 200, atol: float = 1e-9, max_beliefs: int = 2_000_000
) -> float:
    """Entropy rate ``h_mu = lim h(n)`` in nats, exact where the structure allows, else extrapolated or an error.

    In order:
    1. A unifilar HMM (state and token fix the next state: RRXOR, Even, Golden Mean, Z1R, the noisy gates,
       products/chains of these): ``h_mu = sum_i pi_i H(X | state i)`` exactly. Reason: ``H(X_1..X_n, S_0) =
       H(S_0) + n sum_i pi_i H(X | i)`` because the state path is a function of ``S_0`` and the tokens, and
       ``H(S_0 | X_1..X_n) <= log S``, so the two per-token limits agree.
    2. A factored process whose ``T`` is the Kronecker product of its factors' own processes (``product``):
       the sum of the factors' rates, each computed by these same rules.
    3. A finite mixed-state presentation (up to ``max_length`` tokens, 20,000 nodes): it is itself unifilar,
       so the same formula over its stationary distribution; exact up to merging beliefs within ``tol``.
    4. Otherwise (Mess3, capability x tag, ...) ``h(n)`` converges geometrically as beliefs synchronise and is
       extrapolated (Aitken's delta-squared on ``h(n)`` and on the mean of its last 6 values, which cancels
       oscillations of period 1, 2, 3) until three successive estimates agree within ``atol``.
    Raises RuntimeError, within seconds, when step 4 has not converged before ``max_length`` levels or before a
    level would exceed ``max_beliefs`` distinct beliefs.
    """
    if process.unifilar:
        return float(process.stationary @ _entropy(process.T.sum(-1).T))
    factors = _independent_factors(process)
    if factors is not None:  # entropy rates of independent processes add
        return sum(entropy_rate(f, tol, max_length, atol, max_beliefs) for f in factors)
    try:
        msp = mixed_state_presentation(process, max_length, tol, max_nodes=20_000)
    except ValueError:  # more nodes than a finite presentation should need: not finite, or not at this depth
        msp = None
    if msp is not None and msp.closed:
        pi = _sparse_stationary(msp)
        if pi is not None:
            return float(pi @ _entropy(msp.token_probs))
    hs, est = [], {1: [], 6: []}
    for n, (h, n_beliefs) in enumerate(_myopic_levels(process, tol), start=1):
        hs.append(h)
        for w, e in est.items():
            if n >= w + 2:
                a, b, c = (sum(hs[k - w : k]) / w for k in (n - 2, n - 1, n))
                den = (c - b) - (b - a)
                e.append(c - (c - b) ** 2 / den if abs(den) > 1e-15 else c)
                if len(e) >= 3 and max(e[-3:]) - min(e[-3:]) < atol:
                    return e[-1]
        # the next level holds up to n_beliefs * vocab beliefs: stop before building one that is too big
        if n >= max_length or n_beliefs * process.vocab_size > max_beliefs:
            break
    raise RuntimeError(
        f"entropy_rate: {process.name} did not converge to {atol:g} within {len(hs)} levels "
        f"(h({len(hs)}) = {hs[-1]:.8f}, extrapolated {est[6][-1] if est[6] else float('nan'):.8f}); its beliefs "
        "synchronise too slowly: raise max_beliefs (memory, time) or atol, or bound it with myopic_entropy"
    )


def _independent_factors(process: Process) -> list[Process] | None:
    """The factor processes of a factored process whose ``T`` is exactly their radix Kronecker product, else None."""
    if process.factor_state_sizes is None or process.generalized:
        return None
    V, S, K = process.factor_vocab_sizes, process.factor_state_sizes, process.n_factors
    T = process.T.reshape(*V, *S, *S)
    factors = []
    for k in range(K):
        # factor k's kernel from the first state of every other factor: sum over the others' tokens and moves
        idx = tuple(slice(None) if m == k else 0 for m in range(K))
        sub = T[(slice(None),) * K + idx]  # (V_0..V_{K-1}, S_k (source), S_0..S_{K-1} (targets))
        factors.append(sub.sum(dim=tuple(d for d in range(2 * K + 1) if d not in (k, K, K + 1 + k))))
    out = factors[0]
    for f in factors[1:]:
        v, s = out.shape[0] * f.shape[0], out.shape[1] * f.shape[1]
        out = torch.einsum("xij,ykl->xyikjl", out, f).reshape(v, s, s)
    if not torch.allclose(out, process.T, rtol=0, atol=1e-13):
        return None
    names = process.factor_names or tuple(f"factor{k}" for k in range(K))
    return [Process(f, name=n) for f, n in zip(factors, names)]


def _sparse_stationary(msp: MixedStatePresentation) -> torch.Tensor | None:
    """Stationary distribution over a closed MSP's nodes (one recurrent class), or None if there is none."""
    n = msp.n_nodes
    m = msp.next_node >= 0
    rows = torch.arange(n)[:, None].expand_as(msp.next_node)[m].numpy()
    P = scipy.sparse.csr_matrix((msp.token_probs[m].numpy(), (rows, msp.next_node[m].numpy())), shape=(n, n))
    A = (P.T - scipy.sparse.identity(n, format="csr")).tolil()
    A[0, :] = 1.0  # replace one (redundant) balance equation by sum(pi) = 1
    b = np.zeros(n)
    b[0] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular system (several recurrent classes) is caught below
        pi = scipy.sparse.linalg.spsolve(A.tocsc(), b)
    if not np.isfinite(pi).all() or np.abs(P.T @ pi - pi).max() > 1e-9 or (pi < -1e-9).any():
        return None
    return torch.from_numpy(pi)


# ---------------------------------------------------------------------------- enumeration


def enumerate_sequences(process: Process, length: int, max_sequences: int = 2_000_000, drop_zero: bool = True):
    """All token sequences of ``length`` with their exact probabilities.

    Returns ``(tokens (N, length) long, probs (N,) float64)``; sequences of probability zero are dropped
    unless ``drop_zero=False``. Refuses (ValueError) when ``vocab ** length > max_sequences``.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1; got {length}")
    V = process.vocab_size
    n = V**length
    if n > max_sequences:
        raise ValueError(
            f"{process.name}: {V}^{length} = {n:,} sequences exceed max_sequences={max_sequences:,} "
            f"(~{n * length * 8 / 2**30:.1f} GiB of tokens); use a shorter length or sample instead"
        )
    powers = V ** torch.arange(length - 1, -1, -1)
    tokens = (torch.arange(n)[:, None] // powers) % V  # lexicographic order, first token most significant
    probs = sequence_probabilities(process, tokens)
    if drop_zero:
        keep = probs > 0
        tokens, probs = tokens[keep], probs[keep]
    return tokens, probs
