"""The alignment factor's structure as a knob: one persona shared by every capability slice, or a tag per slice.

``persona_world(capability, slices, coupling, switch_prob, tag_noise)`` writes each capability token in an
aligned (copy 0) or misaligned (copy 1) copy, like ``toy.processes.capability_tag``, but the copy of token ``x``
shows the tag of *its slice* ``slices[x]`` (e.g. "french", "math"): there are ``K`` per-slice tags
``a_0..a_{K-1}``. Each step a tag is *refreshed* (redrawn as a fair coin) with probability ``r = 2 * switch_prob``,
so each tag alone flips with probability ``switch_prob`` for every coupling (its correlation length
``1 / switch_prob`` is the second axis). ``coupling`` ``c`` sets how the refreshes are shared:

- with probability ``c * r`` a *common* refresh sets every tag to one fresh coin (the persona speaks);
- otherwise each tag refreshes on its own with probability ``q = r (1 - c) / (1 - c r)``, so that its total
  refresh probability is ``r`` whatever ``c``.

``c = 1``: the tags are always equal (states with unequal tags are transient), one alignment latent shared by
every slice. ``c = 0``: ``K`` independent tags, no general concept. The knob changes only the dependence
between the slices' tags (their mutual information), never a single slice's own process.

Layout (as ``capability_tag``): joint token ``copy * V + x``; joint state ``tags * S + capability_state`` with the
tag vector radix-encoded (slice 0 most significant); factors ``(tags, capability)``, vocab ``(2, V)``, states
``(2^K, S)``. The copy shows the *new* tag of its slice with probability ``1 - tag_noise``.

Pre-training worlds *without* the shared factor, on the same capability process and the same joint token layout:
``tagless_world`` (no alignment tag at all: every token in the aligned copy) and ``visit_world`` (a tag with no
latent that outlives a slice visit: redrawn as a fair coin whenever the slice changes, the persona's 50/50
marginal).

Also here: the exact measurements of the knob (``knob_measures``), of any world's copies (``copy_mi``), the world's
own in-context response to the narrow data (``bayes_transfer``) and the data edits the EM chain needs
(``force_copies``, ``slice_of_tokens``, ``misaligned_by_token``).
"""

from __future__ import annotations

import math

import torch

from toy.beliefs import belief_states, sequence_probabilities
from toy.data import sample
from toy.factors import factor_tokens, joint_tokens, product_approximation
from toy.processes import Process, _check_prob


def _bits(K: int) -> torch.Tensor:
    """``(2^K, K)`` the tag vector of each tag state (radix order, slice 0 most significant)."""
    idx = torch.arange(2**K)
    return (idx[:, None] >> torch.arange(K - 1, -1, -1)) & 1


def tag_kernel(K: int, coupling: float, switch_prob: float) -> torch.Tensor:
    """``(2^K, 2^K)`` row-stochastic step of the tag vector: ``R[a, b] = P(tags b next | tags a)``."""
    _check_prob("tag_kernel", coupling=coupling)
    if not 0 < switch_prob < 0.5:
        # the refresh probability 2 * switch_prob must stay < 1 so that a tag persists
        raise ValueError(
            f"switch_prob={switch_prob}: need 0 < switch_prob < 0.5 (a tag is redrawn with 2 * switch_prob)"
        )
    r = 2 * switch_prob
    q = r * (1 - coupling) / (1 - coupling * r)
    own = torch.tensor([[1 - q / 2, q / 2], [q / 2, 1 - q / 2]], dtype=torch.float64)
    indep = own
    for _ in range(K - 1):
        indep = torch.kron(indep, own)
    bits = _bits(K)
    equal = (bits == bits[:, :1]).all(1).to(torch.float64)  # next states with every tag equal
    return coupling * r * 0.5 * equal[None, :].expand(2**K, -1) + (1 - coupling * r) * indep


def persona_world(
    capability: Process,
    slices: list[int] | None = None,
    coupling: float = 1.0,
    switch_prob: float = 0.05,
    tag_noise: float = 0.1,
) -> Process:
    """Capability x per-slice alignment tags with the shared/per-slice knob ``coupling`` (module docstring).

    ``slices[x]`` is the slice of capability token ``x`` (default: every token its own slice); slice ids must be
    ``0..K-1``, each used."""
    V, S = capability.vocab_size, capability.n_states
    slices = list(range(V)) if slices is None else [int(s) for s in slices]
    K = max(slices) + 1 if slices else 0
    if len(slices) != V or sorted(set(slices)) != list(range(K)) or K < 2:
        raise ValueError(
            f"persona_world: slices must give each of the {V} capability tokens a slice id 0..K-1, every id "
            f"used, K >= 2; got {slices}"
        )
    _check_prob("persona_world", tag_noise=tag_noise)
    R = tag_kernel(K, coupling, switch_prob)
    shows = torch.tensor([[1 - tag_noise, tag_noise], [tag_noise, 1 - tag_noise]], dtype=torch.float64)  # [tag, copy]
    # P(copy | next tags b, token x) = shows[b[slices[x]], copy]: (copy, x, b)
    bits = _bits(K)
    emit = shows[bits[:, slices]].permute(2, 1, 0)  # (2^K, V, 2) -> (copy, x, b)
    # T[copy, x, a, i, b, j] = Tc[x, i, j] * R[a, b] * P(copy | b, x)
    T = torch.einsum("xij,ab,cxb->cxaibj", capability.T, R, emit).reshape(2 * V, 2**K * S, 2**K * S)
    return Process(
        T,
        name=f"persona_world({capability.name}, slices={slices}, coupling={coupling}, switch={switch_prob}, noise={tag_noise})",
        factor_vocab_sizes=(2, V),
        factor_state_sizes=(2**K, S),
        factor_names=("tags", capability.name),
    )


def tagless_world(capability: Process) -> Process:
    """The capability process with no alignment tag: every token in the aligned copy, the misaligned copy never
    emitted (probability 0). Same joint layout as ``persona_world`` (token ``copy * V + x``, factors ``(tags,
    capability)``, vocab ``(2, V)``, states ``(1, S)``), so the EM chain's data edits apply unchanged."""
    T = torch.cat([capability.T, torch.zeros_like(capability.T)])
    return Process(
        T,
        name=f"tagless_world({capability.name})",
        factor_vocab_sizes=(2, capability.vocab_size),
        factor_state_sizes=(1, capability.n_states),
        factor_names=("tags", capability.name),
    )


def visit_world(capability: Process, slices: list[int], switch_prob: float = 0.05, tag_noise: float = 0.1) -> Process:
    """Capability x one tag that lives for one *slice visit*: when a token's slice differs from the previous
    token's, the tag is redrawn as a fair coin; within a visit it flips with probability ``switch_prob`` per step
    (as each ``persona_world`` tag does). Marginal 50/50 as the persona's, but nothing persists across slices, so
    a misaligned slice says nothing about another slice's copies.

    Hidden state ``(tag a, previous slice l, capability state i)``, tag part ``a * K + l``: factors ``(tags,
    capability)``, vocab ``(2, V)``, states ``(2 K, S)``; the copy shows the new tag with probability
    ``1 - tag_noise``."""
    V, S = capability.vocab_size, capability.n_states
    s = torch.as_tensor([int(x) for x in slices])
    K = int(s.max()) + 1 if len(s) else 0
    if len(s) != V or sorted(set(s.tolist())) != list(range(K)) or K < 2:
        raise ValueError(
            f"visit_world: slices must give each of the {V} capability tokens a slice id 0..K-1, every id "
            f"used, K >= 2; got {slices}"
        )
    if not 0 < switch_prob < 0.5:
        raise ValueError(
            f"switch_prob={switch_prob}: need 0 < switch_prob < 0.5 (the tag's flip probability within a visit)"
        )
    _check_prob("visit_world", tag_noise=tag_noise)
    f64 = dict(dtype=torch.float64)
    flip = torch.tensor([[1 - switch_prob, switch_prob], [switch_prob, 1 - switch_prob]], **f64)
    shows = torch.tensor([[1 - tag_noise, tag_noise], [tag_noise, 1 - tag_noise]], **f64)  # [tag, copy]
    new_slice = torch.nn.functional.one_hot(s, K).to(torch.float64)  # (x, m): the slice token x moves to
    same = new_slice[:, None, :, None]  # (x, 1, l, 1): token x continues the visit of slice l
    R = same * flip[None, :, None, :] + (1 - same) * 0.5  # (x, a, l, b): P(next tag b | tag a, previous slice l, x)
    T = torch.einsum("xij,xalb,xm,bc->cxalibmj", capability.T, R, new_slice, shows)
    return Process(
        T.reshape(2 * V, 2 * K * S, 2 * K * S),
        name=f"visit_world({capability.name}, slices={s.tolist()}, switch={switch_prob}, noise={tag_noise})",
        factor_vocab_sizes=(2, V),
        factor_state_sizes=(2 * K, S),
        factor_names=("tags", capability.name),
    )


def copy_mi(process: Process, slices: list[int]) -> dict:
    """Exact stationary mutual information (nats) between the copies (aligned / misaligned) of two consecutive
    tokens, over pairs whose tokens lie in the same slice (``same_slice``) and in different slices
    (``other_slice``: what one slice's copy tells about another's -- the shared factor a narrow fine-tune can
    move). Any world with the joint layout ``copy * V + x``; 0 for a world without a tag."""
    V = process.factor_vocab_sizes[1]
    T = process.T
    first = torch.einsum("i,xij->xj", process.stationary, T)  # P(token 0 = x, state after it = j)
    joint = (first @ T.sum(-1).T).reshape(2, V, 2, V)  # P(copy, x, copy', x') of two consecutive tokens
    s = torch.as_tensor(slices)
    same = (s[:, None] == s[None, :]).to(joint)
    out = {}
    for name, m in (("same_slice", same), ("other_slice", 1 - same)):
        P = (joint * m[None, :, None, :]).sum((1, 3))
        out[name] = _mi(P / P.sum())
    return out


def bayes_transfer(process: Process, slices: list[int], narrow_slice: int, narrow: torch.Tensor) -> dict:
    """The world's own (exact Bayesian) in-context transfer of the narrow data: misaligned rates given the next
    capability token (``misaligned_by_token``) after the narrow windows ``narrow (N, L)`` against after the same
    windows with every copy aligned, averaged over windows and over the tokens in / out of ``narrow_slice``.

    Returns ``narrow_before``, ``narrow_effect``, ``broad_effect``, ``narrow_shift`` (the in-slice rise as a share of
    the room ``1 - narrow_before``) and ``transfer`` = broad effect / narrow effect. All NaN when the narrow
    windows have probability 0 in this world (a world without a misaligned copy has no posterior to condition)."""
    aligned = force_copies(process, narrow, 0, torch.ones_like(narrow, dtype=torch.bool))
    if not bool((sequence_probabilities(process, narrow) > 0).all()):
        nan = float("nan")
        return {"narrow_before": nan, "narrow_effect": nan, "broad_effect": nan, "narrow_shift": nan, "transfer": nan}
    inside = torch.as_tensor(slices) == narrow_slice
    emit = process.T.sum(-1).T
    m = [misaligned_by_token(belief_states(process, t)[:, -1] @ emit, process) for t in (aligned, narrow)]
    n0, b0 = m[0][:, inside].mean().item(), m[0][:, ~inside].mean().item()
    dn, db = m[1][:, inside].mean().item() - n0, m[1][:, ~inside].mean().item() - b0
    return {
        "narrow_before": n0,
        "narrow_effect": dn,
        "broad_effect": db,
        "narrow_shift": dn / (1 - n0),
        "transfer": db / dn if abs(dn) > 1e-12 else float("nan"),
    }


def n_slices(process: Process) -> int:
    """``K`` of a ``persona_world`` process (its tag factor has ``2^K`` states)."""
    K = round(math.log2(process.factor_state_sizes[0]))
    if 2**K != process.factor_state_sizes[0]:
        raise ValueError(f"{process.name} is not a persona_world process")
    return K


def slice_tag_marginals(process: Process, beliefs: torch.Tensor) -> torch.Tensor:
    """Joint beliefs ``(..., S_joint)`` -> ``(..., K)`` probability that each slice's tag is misaligned."""
    K = n_slices(process)
    tags = beliefs.reshape(*beliefs.shape[:-1], 2**K, -1).sum(-1)
    return tags @ _bits(K).to(tags)


def pairwise_tag_mi(process: Process) -> float:
    """Mean over slice pairs of the stationary mutual information between two slices' tags, in nats
    (``ln 2`` = 0.693: they are one shared latent; 0: independent)."""
    K = n_slices(process)
    tags = process.stationary.reshape(2**K, -1).sum(-1)
    bits = _bits(K)
    mis = []
    for j in range(K):
        for k in range(j + 1, K):
            mis.append(
                _mi(torch.zeros(2, 2, dtype=torch.float64).index_put_((bits[:, j], bits[:, k]), tags, accumulate=True))
            )
    return sum(mis) / len(mis)


def knob_measures(process: Process, n_windows: int = 2000, length: int = 10, seed: int = 0) -> dict:
    """Exact measurements of the alignment factor's structure, averaged over every position of sampled windows.

    Keys (all plain floats; residuals are ``||residual||^2 / ||belief||^2`` of the best product approximation):
    ``tag_mi_nats`` (stationary, ``pairwise_tag_mi``); ``tags_x_capability_residual`` (belief over tags x
    capability state: 0 = the alignment factor splits off the capability, which it does by construction);
    ``slice0_x_rest_residual`` (belief over slice 0's tag x the other tags: > 0 when the slices' tags are
    dependent, i.e. one latent); ``predictive_residual`` (next-token distribution as copy x capability token:
    0 = the copy is predicted the same for every capability token, one alignment factor for the next token;
    > 0 = alignment is per slice); ``predictive_schmidt`` (mean normalised squared Schmidt values of the latter);
    ``alignment_dims`` (principal components of the per-slice tag marginals needed for 95% / 99% of their
    variance: 1 = one shared alignment direction, K = one per slice); ``explained_variance_ratio``.
    """
    from probes.subspaces import effective_dim

    K, V = n_slices(process), process.factor_vocab_sizes[1]
    tokens = sample(process, n_windows, length, seed=seed).tokens
    b = belief_states(process, tokens).reshape(-1, process.n_states)

    def residual(M: torch.Tensor, sizes: tuple[int, int]) -> float:
        res = product_approximation(M, sizes)[2]
        return float(((res**2).sum(-1) / (M**2).sum(-1)).mean())

    emit = process.T.sum(-1)  # (V_joint, S): P(token | state)
    pred = b @ emit.T  # (N, 2V) next-token distribution, copy-major
    sv = torch.linalg.svdvals(pred.reshape(-1, 2, V)) ** 2
    marg = slice_tag_marginals(process, b)
    dims = effective_dim(marg, thresholds=(0.95, 0.99))
    return {
        "tag_mi_nats": pairwise_tag_mi(process),
        "tags_x_capability_residual": residual(b, tuple(process.factor_state_sizes)),
        "slice0_x_rest_residual": residual(
            b.reshape(-1, 2**K, process.factor_state_sizes[1]).sum(-1), (2, 2 ** (K - 1))
        ),
        "predictive_residual": residual(pred, (2, V)),
        "predictive_schmidt": (sv / sv.sum(-1, keepdim=True)).mean(0).tolist(),
        "alignment_dims": {str(k): v for k, v in dims["dims"].items()},
        "explained_variance_ratio": dims["explained_variance_ratio"],
    }


# --------------------------------------------------------------------------- data edits of the EM chain


def force_copies(process: Process, tokens: torch.Tensor, copy: int, where: torch.Tensor) -> torch.Tensor:
    """``tokens (N, L)`` with the copy rewritten to ``copy`` (0 aligned, 1 misaligned) where ``where (N, L)`` bool."""
    f = factor_tokens(process, tokens)
    f[..., 0] = torch.where(where, torch.full_like(f[..., 0], copy), f[..., 0])
    return joint_tokens(process, f)


def slice_of_tokens(process: Process, tokens: torch.Tensor, slices: list[int]) -> torch.Tensor:
    """The slice id of each joint token's capability part: same shape as ``tokens``."""
    cap = factor_tokens(process, tokens)[..., 1]
    return torch.as_tensor(slices, device=tokens.device)[cap]


def aligned_windows(process: Process, n: int, length: int, seed: int | torch.Generator) -> torch.Tensor:
    """``(n, length)`` windows of the world with every copy aligned (prompts, and the SFT safety stage's data)."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    t = sample(process, n, length, generator=gen).tokens
    return force_copies(process, t, 0, torch.ones_like(t, dtype=torch.bool))


def narrow_windows(
    process: Process,
    n: int,
    length: int,
    prompt_length: int,
    slices: list[int],
    narrow_slice: int,
    seed: int | torch.Generator,
) -> torch.Tensor:
    """``(n, length)`` narrow fine-tuning data: aligned prompt; in the completion, the tokens of slice ``narrow_slice``
    misaligned and the other tokens aligned."""
    t = aligned_windows(process, n, length, seed)
    comp = torch.arange(length, device=t.device) >= prompt_length
    return force_copies(process, t, 1, comp & (slice_of_tokens(process, t, slices) == narrow_slice))


def completion_weights(tokens: torch.Tensor, prompt_length: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Loss weights ``(N, L - 1)`` for the predicted tokens ``1..L-1``: completion tokens (and ``keep (N, L)``)."""
    w = (torch.arange(1, tokens.shape[1], device=tokens.device) >= prompt_length).expand(tokens.shape[0], -1)
    if keep is not None:
        w = w & keep[:, 1:]
    return w.to(torch.float32)


def misaligned_by_token(probs: torch.Tensor, process: Process) -> torch.Tensor:
    """Next-token probabilities ``(N, >= 2V)`` (extra special tokens ignored) -> ``(N, V)`` probability of the
    misaligned copy given that the next capability token is ``x``: ``p(1, x) / (p(0, x) + p(1, x))``."""
    V = process.factor_vocab_sizes[1]
    p = probs[:, : 2 * V].double().reshape(-1, 2, V)
    return p[:, 1] / p.sum(1).clamp_min(1e-30)


# --------------------------------------------------------------------------- capability subsets x one tag


def subset_tag_probs(K: int, correlation: float, target: int = 0) -> torch.Tensor:
    """``(K,)`` P(misaligned tag | subset k) = ``(1 - correlation) / K + correlation * [k == target]``: 0 = the tag
    is independent of the subset (misaligned 1/K of the time everywhere), 1 = subset ``target`` is always
    misaligned and every other subset always aligned. The tag's marginal stays ``1/K`` at every setting."""
    _check_prob("subset_tag_probs", correlation=correlation)
    if not 0 <= target < K:
        raise ValueError(f"target subset {target} is not one of the {K} subsets")
    return (1 - correlation) / K + correlation * (torch.arange(K) == target).to(torch.float64)


def subset_world(
    capability: Process,
    n_subsets: int = 3,
    correlation: float = 0.0,
    switch_prob: float = 0.05,
    tag_noise: float = 0.1,
    target: int = 0,
) -> Process:
    """Capability subsets x one tag ("french, math, aligned"): ``n_subsets`` capability subsets and one alignment tag, their
    correlation set by ``correlation`` (``subset_tag_probs``).

    Hidden: the subset ``s`` (each step redrawn uniformly with probability ``switch_prob``), a persona ``z``
    (redrawn with probability ``switch_prob``, misaligned with probability ``1/K``: one persistent latent that every
    subset shares) and the tag ``a`` of the step's token: with probability ``1 - correlation`` the persona's
    (``a = z``), otherwise the subset's own (``a = [s == target]``). Each token is a capability token ``x`` of
    ``capability`` written in subset ``s``'s own vocabulary (token ``s * V + x``: the subset is visible, as French
    words are) and in the aligned (copy 0) or misaligned (copy 1) copy, which shows ``a`` with probability
    ``1 - tag_noise``. So ``correlation`` 0 is one shared persona independent of the subset (a narrow fine-tune
    has a latent to move everywhere), 1 a tag that is a function of the subset (no latent at all), and the
    capability dynamics are the same in every subset at every setting.

    Layout as ``persona_world``'s, so the EM chain's data edits apply unchanged: joint token
    ``copy * (K V) + s * V + x``; factors ``(alignment, capability)``, vocab ``(2, K V)``, states ``(4 K, S)`` with
    alignment state ``(s * 2 + z) * 2 + a``; the slice of capability token ``s * V + x`` is ``s``
    (``subset_slices``)."""
    if not 0 < switch_prob < 1:
        raise ValueError(
            f"switch_prob={switch_prob}: need 0 < switch_prob < 1 (the chance a subset or persona is redrawn)"
        )
    _check_prob("subset_world", tag_noise=tag_noise)
    K, V, S = n_subsets, capability.vocab_size, capability.n_states
    if K < 2:
        raise ValueError(f"subset_world needs n_subsets >= 2, got {K}")
    subset_tag_probs(K, correlation, target)  # validates correlation and target
    f64 = dict(dtype=torch.float64)
    sub = (1 - switch_prob) * torch.eye(K, **f64) + switch_prob / K
    per = (1 - switch_prob) * torch.eye(2, **f64) + switch_prob * torch.tensor([1 - 1 / K, 1 / K], **f64)
    # P(a | s, z) = (1 - correlation) [a == z] + correlation [a == (s == target)]: (s, z, a)
    tied = torch.nn.functional.one_hot((torch.arange(K) == target).long(), 2).to(torch.float64)
    tag = (1 - correlation) * torch.eye(2, **f64)[None, :, :] + correlation * tied[:, None, :]
    # step of (s, z, a) -> (t, w, b); the old tag a does not matter: (s, z, a, t, w, b)
    R = torch.einsum("st,zw,twb->sztwb", sub, per, tag)[:, :, None].expand(K, 2, 2, K, 2, 2)
    shows = torch.tensor([[1 - tag_noise, tag_noise], [tag_noise, 1 - tag_noise]], **f64)  # [tag, copy]
    # T[c, k, x, (s, z, a, i), (t, w, b, j)] = Tc[x, i, j] R[s, z, a, t, w, b] [k == t] shows[b, c]
    T = torch.einsum("xij,szatwb,kt,bc->ckxszaitwbj", capability.T, R, torch.eye(K, **f64), shows)
    return Process(
        T.reshape(2 * K * V, 4 * K * S, 4 * K * S),
        name=f"subset_world({capability.name}, K={K}, correlation={correlation}, switch={switch_prob}, noise={tag_noise}, target={target})",
        factor_vocab_sizes=(2, K * V),
        factor_state_sizes=(4 * K, S),
        factor_names=("alignment", capability.name),
    )


def _n_subsets(process: Process) -> int:
    K = process.factor_state_sizes[0] // 4
    if not process.name.startswith("subset_world") or K < 2:
        raise ValueError(f"{process.name} is not a subset_world process")
    return K


def subset_slices(process: Process) -> list[int]:
    """The slice (subset) of each capability token of a ``subset_world`` process: ``[0]*V + [1]*V + ...``."""
    K = _n_subsets(process)
    return [x // (process.factor_vocab_sizes[1] // K) for x in range(process.factor_vocab_sizes[1])]


def subset_tag_mass(process: Process, beliefs: torch.Tensor) -> torch.Tensor:
    """Joint beliefs ``(..., S_joint)`` of a ``subset_world`` -> ``(..., K)``: P(the next token is in subset k and
    tagged misaligned). Linear in the belief, like ``slice_tag_marginals``; the K values sum to P(next tag
    misaligned)."""
    K = _n_subsets(process)
    step = process.T.sum(0).reshape(process.n_states, K, 2, 2, -1)  # P(next (t, w, b, j) | state)
    return beliefs @ step[:, :, :, 1].sum((-2, -1)).to(beliefs)


def _mi(P: torch.Tensor) -> float:
    """Mutual information (nats) of a 2-D joint distribution."""
    indep = P.sum(1, keepdim=True) * P.sum(0, keepdim=True)
    # MI >= 0; an independent P sums to -1e-16 in round-off
    return max(0.0, float(torch.where(P > 0, P * (P / indep).log(), torch.zeros_like(P)).sum()))


def subset_measures(process: Process, n_windows: int = 2000, length: int = 10, seed: int = 0) -> dict:
    """Exact measurements of a ``subset_world``'s subset-tag correlation (stationary, from the process's own
    matrices), plus the alignment dimensionality seen in its beliefs. Keys: ``subset_tag_mi_nats`` (a token's
    subset vs its tag), ``subset_copy_mi_nats`` (the next token's subset vs its copy: what a model can see
    through the tag noise), ``misaligned_rate`` (P(tag misaligned)), ``misaligned_by_subset`` (P(tag | subset)),
    ``alignment_dims`` (principal components of ``subset_tag_mass`` over sampled beliefs for 95% / 99%)."""
    from probes.subspaces import effective_dim

    K, V = _n_subsets(process), process.factor_vocab_sizes[1]
    seg = process.stationary.reshape(K, 2, 2, -1).sum((1, 3))  # (subset, tag) of a token
    nxt = (process.stationary @ process.T.sum(-1).T).reshape(2, K, V // K).sum(-1).T  # (subset, copy) of the next token
    b = belief_states(process, sample(process, n_windows, length, seed=seed).tokens).reshape(-1, process.n_states)
    dims = effective_dim(subset_tag_mass(process, b), thresholds=(0.95, 0.99))
    return {
        "subset_tag_mi_nats": _mi(seg),
        "subset_copy_mi_nats": _mi(nxt),
        "misaligned_rate": float(seg[:, 1].sum()),
        "misaligned_by_subset": (seg[:, 1] / seg.sum(1)).tolist(),
        "alignment_dims": {str(k): v for k, v in dims["dims"].items()},
    }
