"""Edge-emitting (generalized) hidden Markov processes with validated transition tensors.

Convention, shared by every function in ``toy``: ``T[x, i, j] = P(emit token x, move to state j | state i)``,
shape ``(vocab, states, states)``, float64. ``T.sum(0)`` is row-stochastic. A *generalized* HMM may
have negative entries (it still needs ``T.sum(0) @ 1 = 1`` and a stationary vector); its "states"
are then only a linear representation.

Factored processes run several processes side by side; their token is the radix encoding of the
factor tokens with the *first* factor most significant (``x = x_0 * V_1 * ... + ... + x_{K-1}``),
and their state index encodes the factor states the same way, so a joint belief reshapes to
``(S_0, ..., S_{K-1})``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch

from toy.hmm import TOL, Process  # noqa: F401  (TOL, Process: public here too)

# --------------------------------------------------------------------------- named processes


def _check_prob(name: str, **params: float) -> None:
    for k, v in params.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: parameter {k}={v} must lie in [0, 1]")


def mess3(x: float = 0.05, a: float = 0.85) -> Process:
    """Mess3(x, a): 3 states, 3 tokens, non-unifilar; uniform stationary distribution.

    With ``b = (1 - a) / 2`` and ``y = 1 - 2x``: ``T[k, i, j] = (a if j == k else b) * (y if i == j else x)``,
    which is the published table (Shai et al. 2024 used x=0.05, a=0.85; x=0.15, a=0.6 is also common).
    """
    _check_prob("mess3", x=x, a=a)
    if x > 0.5:
        raise ValueError(f"mess3: x={x} must be <= 0.5 so that y = 1 - 2x is a probability")
    b, y = (1 - a) / 2, 1 - 2 * x
    eye = torch.eye(3, dtype=torch.float64)
    emit = eye * a + (1 - eye) * b  # emit[k, j]: token k's weight when moving to j
    move = eye * y + (1 - eye) * x  # move[i, j]
    return Process(emit[:, None, :] * move[None, :, :], name=f"mess3(x={x},a={a})")


def rrxor(p1: float = 0.5, p2: float = 0.5) -> Process:
    """RRXOR: two random bits then their XOR. States in order ``S, 0, 1, T, F``.

    ``p1`` = P(first bit is 0), ``p2`` = P(second bit is 0). Stationary ``[1/3, 1/6, 1/6, 1/6, 1/6]`` at
    p1 = p2 = 0.5; entropy rate 2/3 bit.
    """
    _check_prob("rrxor", p1=p1, p2=p2)
    S, Z, O, Tr, F = range(5)
    T = torch.zeros(2, 5, 5, dtype=torch.float64)
    T[0, S, Z], T[1, S, O] = p1, 1 - p1
    T[0, Z, F], T[1, Z, Tr] = p2, 1 - p2
    T[0, O, Tr], T[1, O, F] = p2, 1 - p2
    T[1, Tr, S] = 1.0
    T[0, F, S] = 1.0
    return Process(T, name=f"rrxor(p1={p1},p2={p2})")


def zero_one_random(p: float = 0.5) -> Process:
    """Z1R: states ``Z, O, R`` in a cycle; Z emits 0, O emits 1, R emits 0 with probability ``p`` (else 1)."""
    _check_prob("zero_one_random", p=p)
    T = torch.zeros(2, 3, 3, dtype=torch.float64)
    T[0, 0, 1] = 1.0
    T[1, 1, 2] = 1.0
    T[0, 2, 0], T[1, 2, 0] = p, 1 - p
    return Process(T, name=f"z1r(p={p})")


def even(p: float = 0.5) -> Process:
    """Even process: 1s come in blocks of even length. States ``A, B``.

    From A: emit 0 with probability ``p`` and stay; emit 1 with ``1 - p`` and go to B. From B: emit 1, go to A.
    """
    _check_prob("even", p=p)
    if p == 1.0:
        raise ValueError("even: p=1 never leaves state A (state B unreachable); use p < 1")
    T = torch.zeros(2, 2, 2, dtype=torch.float64)
    T[0, 0, 0], T[1, 0, 1] = p, 1 - p
    T[1, 1, 0] = 1.0
    return Process(T, name=f"even(p={p})")


def golden_mean(p: float = 0.5) -> Process:
    """Golden mean process: no two 0s in a row. States ``A, B``.

    From A: emit 1 with probability ``p`` and stay; emit 0 with ``1 - p`` and go to B. From B: emit 1, go to A.
    """
    _check_prob("golden_mean", p=p)
    if p == 1.0:
        raise ValueError("golden_mean: p=1 never leaves state A (state B unreachable); use p < 1")
    T = torch.zeros(2, 2, 2, dtype=torch.float64)
    T[1, 0, 0], T[0, 0, 1] = p, 1 - p
    T[1, 1, 0] = 1.0
    return Process(T, name=f"golden_mean(p={p})")


def noisy_gate(truth_table: Sequence[int], noise: float = 0.1, name: str | None = None) -> Process:
    """A noisy n-input logic gate as a binary-token HMM.

    Each block of ``n + 1`` tokens is ``n`` uniform random input bits ``b_1..b_n`` followed by the output
    ``truth_table[b_1 * 2^(n-1) + ... + b_n]`` flipped with probability ``noise``; then the next block.
    States: one per (position in block, input bits seen so far) -- ``2^(n+1) - 1`` states, the block
    start first. A model must find the block phase from the data (as in RRXOR, which is the noiseless
    2-input XOR gate).
    """
    table = [int(v) for v in truth_table]
    n = int(math.log2(len(table))) if table else 0
    if len(table) < 2 or 2**n != len(table) or any(v not in (0, 1) for v in table):
        raise ValueError(
            f"noisy_gate: truth_table must list 2^n output bits (0/1) for n >= 1 inputs; got {truth_table}"
        )
    _check_prob("noisy_gate", noise=noise)
    # state index of "seen k input bits with value v" = 2^k - 1 + v (prefix-tree order, start = 0)
    n_states = 2 ** (n + 1) - 1
    T = torch.zeros(2, n_states, n_states, dtype=torch.float64)
    for k in range(n):
        for v in range(2**k):
            for bit in (0, 1):
                T[bit, 2**k - 1 + v, 2 ** (k + 1) - 1 + 2 * v + bit] = 0.5
    for v in range(2**n):
        out = table[v]
        T[out, 2**n - 1 + v, 0] += 1 - noise
        T[1 - out, 2**n - 1 + v, 0] += noise
    return Process(T, name=name or f"noisy_gate({''.join(map(str, table))},noise={noise})")


def noisy_not(noise: float = 0.1) -> Process:
    """Noisy NOT: pairs ``a, NOT a`` (output flipped with probability ``noise``)."""
    return noisy_gate([1, 0], noise, name=f"noisy_not(noise={noise})")


def noisy_and(noise: float = 0.1) -> Process:
    """Noisy AND: triples ``a, b, a AND b`` (output flipped with probability ``noise``)."""
    return noisy_gate([0, 0, 0, 1], noise, name=f"noisy_and(noise={noise})")


def noisy_implies(noise: float = 0.1) -> Process:
    """Noisy IMPLIES = NOT a OR b: triples ``a, b, a -> b`` (output flipped with probability ``noise``)."""
    return noisy_gate([1, 1, 0, 1], noise, name=f"noisy_implies(noise={noise})")


# --------------------------------------------------------------------------- factored processes


def mixture(components: Sequence[Process], weights: Sequence[float] | None = None) -> Process:
    """Each sequence comes from one component, never two: block-diagonal states, disjoint tokens (component k's
    tokens follow component k-1's), starting in component k with probability ``weights[k]`` (default uniform)."""
    w = (
        torch.full((len(components),), 1 / len(components), dtype=torch.float64)
        if weights is None
        else torch.tensor(weights, dtype=torch.float64)
    )
    if len(components) < 2 or len(w) != len(components) or (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-9:
        raise ValueError(
            f"mixture needs >= 2 components and one positive weight each, summing to 1; got {len(components)}, {w.tolist()}"
        )
    T = torch.zeros(
        sum(c.vocab_size for c in components),
        sum(c.n_states for c in components),
        sum(c.n_states for c in components),
        dtype=torch.float64,
    )
    x = s = 0
    for c in components:
        T[x : x + c.vocab_size, s : s + c.n_states, s : s + c.n_states] = c.T
        x, s = x + c.vocab_size, s + c.n_states
    return Process(
        T,
        f"mixture({', '.join(c.name for c in components)})",
        initial=torch.cat([wk * c.stationary for wk, c in zip(w, components)]),
    )


def _radix_kron(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Kronecker product of ``(V_k, S_k, S_k)`` tensors in radix order (first factor most significant)."""
    out = blocks[0]
    for B in blocks[1:]:
        V, S = out.shape[0] * B.shape[0], out.shape[1] * B.shape[1]
        out = torch.einsum("xij,ykl->xyikjl", out, B).reshape(V, S, S)
    return out


def product(*processes: Process) -> Process:
    """Independent factored process: each factor runs on its own; the token is the radix-encoded tuple."""
    flat = processes[0] if len(processes) == 1 and isinstance(processes[0], (list, tuple)) else processes
    if not all(isinstance(p, Process) for p in flat) or flat is not processes:
        # a list, or names: the spec form of the configs, given to the function that takes built processes
        got = (
            f"one {type(processes[0]).__name__}"
            if flat is not processes
            else f"{[type(p).__name__ for p in processes]}"
        )
        raise ValueError(
            f"product takes built processes as separate arguments, e.g. product(mess3(), mess3()); got {got}. "
            'By name: make_process("product", factors=[{"name": "mess3"}, {"name": "mess3"}])'
        )
    if len(processes) < 2:
        raise ValueError("product: give at least two processes")
    if any(p.generalized for p in processes):
        raise ValueError("product: generalized HMMs are not supported as factors")
    return Process(
        _radix_kron([p.T for p in processes]),
        name=" x ".join(p.name for p in processes),
        factor_vocab_sizes=tuple(p.vocab_size for p in processes),
        factor_state_sizes=tuple(p.n_states for p in processes),
        factor_names=tuple(p.name for p in processes),
    )


def chained(first: Process, conditioned: Sequence[Process]) -> Process:
    """Two-factor chained process: factor 2's parameters are chosen by factor 1's token of the same step.

    ``conditioned[k]`` is factor 2's process when factor 1 emits token ``k`` (all with the same vocab and
    state count), so ``T[(x1, x2), (i1, i2), (j1, j2)] = T1[x1, i1, j1] * T2^(x1)[x2, i2, j2]``.
    Longer chains: chain the result again (factor i's parameters chosen by factor i-1's token).
    """
    if len(conditioned) != first.vocab_size:
        raise ValueError(
            f"chained: need one conditioned process per token of {first.name} ({first.vocab_size}); got {len(conditioned)}"
        )
    shapes = {tuple(p.T.shape) for p in conditioned}
    if len(shapes) != 1:
        raise ValueError(f"chained: conditioned processes must share vocab and state count; got shapes {shapes}")
    names = (first.factor_names or (first.name,)) + ("|".join(p.name for p in conditioned),)
    name = f"chained({first.name} -> [{', '.join(p.name for p in conditioned)}])"
    return _chain(first, torch.stack([p.T for p in conditioned]), name, names)


def _chain(first: Process, stacked: torch.Tensor, name: str, factor_names: tuple[str, ...]) -> Process:
    """``T[(x1, x2), (i1, i2), (j1, j2)] = T1[x1, i1, j1] * stacked[x1, x2, i2, j2]``."""
    if first.generalized or (stacked < 0).any():
        raise ValueError(f"{name}: generalized HMMs are not supported as factors")
    V1, S1 = first.vocab_size, first.n_states
    _, V2, S2, _ = stacked.shape
    T = torch.einsum("xij,xykl->xyikjl", first.T, stacked).reshape(V1 * V2, S1 * S2, S1 * S2)
    return Process(
        T,
        name=name,
        factor_vocab_sizes=(first.factor_vocab_sizes or (V1,)) + (V2,),
        factor_state_sizes=(first.factor_state_sizes or (S1,)) + (S2,),
        factor_names=factor_names,
    )


def _quantile_coupling(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Comonotone coupling of discrete distributions ``p (..., n)`` and ``q (..., m)``: ``(..., n, m)``.

    ``C[a, b]`` is the overlap of the CDF intervals of ``a`` under p and ``b`` under q (north-west corner rule):
    the coupling that makes the two outcomes as dependent as their marginals allow.
    """
    P, Q = p.cumsum(-1), q.cumsum(-1)
    P0, Q0 = P - p, Q - q
    hi = torch.minimum(P[..., :, None], Q[..., None, :])
    lo = torch.maximum(P0[..., :, None], Q0[..., None, :])
    return (hi - lo).clamp_min(0.0)


def correlated(first: Process, second: Process, rho: float) -> Process:
    """Two factors whose steps are coupled with strength ``rho`` in [0, 1], each factor's own process unchanged.

    At every step, from joint state ``(i1, i2)`` the pair of moves ``((x1, j1), (x2, j2))`` is drawn
    with probability ``(1 - rho) * P1(x1, j1 | i1) P2(x2, j2 | i2) + rho * C(x1, j1, x2, j2 | i1, i2)``,
    where ``C`` is the comonotone (quantile) coupling of the two factors' one-step distributions
    (moves ordered as ``x * S + j``). Any coupling keeps each factor's marginal kernel, so each factor
    alone is *exactly* its original process for every rho; only their dependence changes.
    rho = 0 is the independent product; rho = 1 makes the factors as dependent as their marginals allow
    (for two copies of one process started together they move in lockstep, and the joint belief is no
    longer a product).
    """
    _check_prob("correlated", rho=rho)
    if first.generalized or second.generalized:
        raise ValueError("correlated: generalized HMMs are not supported as factors (a coupling needs probabilities)")
    V1, S1, V2, S2 = first.vocab_size, first.n_states, second.vocab_size, second.n_states
    m1 = first.T.permute(1, 0, 2).reshape(S1, V1 * S1)  # (i1, move1)
    m2 = second.T.permute(1, 0, 2).reshape(S2, V2 * S2)
    indep = m1[:, None, :, None] * m2[None, :, None, :]  # (i1, i2, move1, move2)
    coupled = _quantile_coupling(m1[:, None, :].expand(S1, S2, -1), m2[None, :, :].expand(S1, S2, -1))
    joint = ((1 - rho) * indep + rho * coupled).reshape(S1, S2, V1, S1, V2, S2)
    T = joint.permute(2, 4, 0, 1, 3, 5).reshape(V1 * V2, S1 * S2, S1 * S2)
    return Process(
        T,
        name=f"correlated({first.name}, {second.name}, rho={rho})",
        factor_vocab_sizes=(V1, V2),
        factor_state_sizes=(S1, S2),
        factor_names=(first.name, second.name),
    )


def rare_factor(common: Process, rare: Process, trigger_token: int) -> Process:
    """A rare factor that only emits after the common factor shows ``trigger_token``.

    Each step the common factor emits ``x1``. If ``x1 == trigger_token`` the rare factor takes a step and
    emits ``x2``; otherwise it stays put and emits a blank (token index ``rare.vocab_size``). The factor-2
    vocabulary is therefore ``rare.vocab_size + 1`` with the blank last.
    """
    if (
        isinstance(trigger_token, bool)
        or not isinstance(trigger_token, int)
        or not 0 <= trigger_token < common.vocab_size
    ):
        raise ValueError(f"rare_factor: trigger_token {trigger_token} not in 0..{common.vocab_size - 1}")
    V2, S2 = rare.vocab_size + 1, rare.n_states
    # given factor 1's token: the rare process's step on the trigger, else a blank and no move
    stacked = torch.zeros(common.vocab_size, V2, S2, S2, dtype=torch.float64)
    stacked[:, -1] = torch.eye(S2, dtype=torch.float64)
    stacked[trigger_token] = 0.0
    stacked[trigger_token, :-1] = rare.T
    name = f"rare_factor({common.name}, {rare.name}, trigger={trigger_token})"
    return _chain(common, stacked, name, (common.name, rare.name))


def capability_tag(capability: Process, switch_prob: float = 0.05, tag_noise: float = 0.1) -> Process:
    """Capability x alignment-tag process: a capability written in an aligned or a misaligned copy.

    A slowly switching two-state tag (0 = aligned, 1 = misaligned; it flips with probability
    ``switch_prob`` per step) changes how the capability's tokens are written: token ``x`` of the
    capability is written as ``x`` (aligned copy) or ``x + V`` (misaligned copy). The copy shows the
    new tag with probability ``1 - tag_noise``, so the tag is a hidden factor the model must track.
    Factors: (tag, capability) in radix order: the joint token is ``copy * V + x`` and the joint state
    is ``tag * S + capability_state``, so a joint belief reshapes to ``(2, S)``.
    """
    _check_prob("capability_tag", switch_prob=switch_prob, tag_noise=tag_noise)
    if not 0 < switch_prob < 1:
        raise ValueError("capability_tag: switch_prob must be strictly between 0 and 1 so both tags occur")
    V, S = capability.vocab_size, capability.n_states
    tag_move = torch.tensor([[1 - switch_prob, switch_prob], [switch_prob, 1 - switch_prob]], dtype=torch.float64)
    shows = torch.tensor([[1 - tag_noise, tag_noise], [tag_noise, 1 - tag_noise]], dtype=torch.float64)  # [tag, copy]
    # T[copy, x, a, i, b, j] = Tc[x, i, j] * P(b | a) * P(copy | b)
    T = torch.einsum("xij,ab,bc->cxaibj", capability.T, tag_move, shows).reshape(2 * V, 2 * S, 2 * S)
    return Process(
        T,
        name=f"capability_tag({capability.name}, switch={switch_prob}, noise={tag_noise})",
        factor_vocab_sizes=(2, V),
        factor_state_sizes=(2, S),
        factor_names=("tag", capability.name),
    )


def tag_process(switch_prob: float = 0.05, tag_noise: float = 0.1) -> Process:
    """The alignment tag alone: 2 states (0 aligned, 1 misaligned) flipping with ``switch_prob`` per step;
    the emitted token is the copy (0 aligned, 1 misaligned) showing the *new* state with ``1 - tag_noise``."""
    if not 0 < switch_prob < 1 or not 0 <= tag_noise <= 1:
        raise ValueError(
            f"tag_process: need 0 < switch_prob < 1 and 0 <= tag_noise <= 1; got {switch_prob}, {tag_noise}"
        )
    move = torch.tensor([[1 - switch_prob, switch_prob], [switch_prob, 1 - switch_prob]], dtype=torch.float64)
    shows = torch.tensor([[1 - tag_noise, tag_noise], [tag_noise, 1 - tag_noise]], dtype=torch.float64)  # [state, copy]
    # T[copy, a, b] = P(b | a) P(copy | b)
    return Process(torch.einsum("ab,bc->cab", move, shows), name=f"tag(switch={switch_prob},noise={tag_noise})")


def tagged(capability: Process, rho: float = 0.0, switch_prob: float = 0.05, tag_noise: float = 0.1) -> Process:
    """Capability x alignment tag with a correlation knob: ``correlated(tag_process(...), capability, rho)``.

    Factors (tag, capability) in radix order as in ``toy.processes.capability_tag``: the joint token is
    ``copy * V + x`` (copy 1 = the misaligned copy of capability token x) and a joint belief reshapes to
    ``(2, S)``. ``rho = 0`` is exactly ``capability_tag(capability, switch_prob, tag_noise)``; larger rho
    couples each step of the tag with the capability's step (comonotone coupling), so the tag becomes
    predictable from the capability's tokens and the joint belief stops being a product. Each factor
    alone is the same process for every rho.
    """
    p = correlated(tag_process(switch_prob, tag_noise), capability, rho)
    return replace(
        p,
        name=f"tagged({capability.name}, rho={rho}, switch={switch_prob}, noise={tag_noise})",
        factor_names=("tag", capability.name),
    )


# --------------------------------------------------------------------------- processes by name

# name -> constructor. Keyword values that are process specs ({"name": ..., **kwargs}) or lists of them
# are built first, so factored processes nest: see ``make_process``.
PROCESSES: dict[str, Callable[..., Process]] = {
    "mess3": mess3,
    "rrxor": rrxor,
    "zero_one_random": zero_one_random,
    "even": even,
    "golden_mean": golden_mean,
    "noisy_gate": noisy_gate,
    "noisy_not": noisy_not,
    "noisy_and": noisy_and,
    "noisy_implies": noisy_implies,
    "product": lambda factors: product(*factors),
    "mixture": mixture,
    "chained": chained,
    "correlated": correlated,
    "rare_factor": rare_factor,
    "capability_tag": capability_tag,
}


def make_process(name: str, **kwargs) -> Process:
    """Build a ``toy.processes`` process from its name and keyword arguments (as a config holds them).

    Factored processes take nested specs, a spec being ``{"name": <process>, **its kwargs}``::

        make_process("mess3", x=0.15, a=0.6)
        make_process("product", factors=[{"name": "mess3"}, {"name": "mess3", "x": 0.15, "a": 0.6}])
        make_process("correlated", first={"name": "mess3"}, second={"name": "mess3"}, rho=0.5)
        make_process("chained", first={"name": "even"}, conditioned=[{"name": "mess3"}, {"name": "mess3", "a": 0.6}])
        make_process("rare_factor", common={"name": "mess3"}, rare={"name": "rrxor"}, trigger_token=0)
        make_process("capability_tag", capability={"name": "mess3"}, switch_prob=0.05, tag_noise=0.1)

    In YAML: ``process: product`` and ``process_kwargs: {factors: [{name: mess3}, {name: mess3}]}``.
    """
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; use one of {sorted(PROCESSES)}")

    def build(value):
        if isinstance(value, dict) and "name" in value:
            spec = dict(value)
            return make_process(spec.pop("name"), **spec)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) and "name" in v for v in value):
            return [build(v) for v in value]
        return value

    try:
        return PROCESSES[name](**{k: build(v) for k, v in kwargs.items()})
    except TypeError as err:  # a wrong keyword: say which process and what it takes
        raise ValueError(f"process {name!r} does not accept kwargs {sorted(kwargs)}: {err}") from None
