"""The validated (generalized) hidden Markov process type that every process in ``toy.processes`` builds.

Convention, shared by every function in ``toy``: ``T[x, i, j] = P(emit token x, move to state j | state i)``,
shape ``(vocab, states, states)``, float64. ``T.sum(0)`` is row-stochastic. A *generalized* HMM may have
negative entries (it still needs ``T.sum(0) @ 1 = 1`` and a stationary vector); its "states" are then only a
linear representation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOL = 1e-9


@dataclass(frozen=True, eq=False)
class Process:
    """A validated (generalized) HMM.

    Attributes:
        T: ``(vocab, states, states)`` float64 on CPU, ``T[x, i, j] = P(x, j | i)``.
        name: short human-readable name, e.g. ``"mess3(x=0.05,a=0.85)"``.
        generalized: allow negative entries (a GHMM); sampling then goes through beliefs only.
        factor_vocab_sizes / factor_state_sizes: for factored processes, the factor shapes in
            radix order (first factor most significant); ``None`` for a plain process.
        factor_names: names of the factors of a factored process.
        initial: the start distribution when the state chain is reducible (``mixture``); it must be stationary.
    """

    T: torch.Tensor
    name: str = "process"
    generalized: bool = False
    factor_vocab_sizes: tuple[int, ...] | None = None
    factor_state_sizes: tuple[int, ...] | None = None
    factor_names: tuple[str, ...] | None = None
    initial: torch.Tensor | None = field(default=None, repr=False)
    stationary: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        T = torch.as_tensor(self.T, dtype=torch.float64).detach().cpu().contiguous()
        object.__setattr__(self, "T", T)
        _validate(T, self.name, self.generalized)
        if (self.factor_vocab_sizes is None) != (self.factor_state_sizes is None):
            raise ValueError(f"{self.name}: give both factor_vocab_sizes and factor_state_sizes, or neither")
        if self.factor_vocab_sizes is not None:
            if math.prod(self.factor_vocab_sizes) != T.shape[0] or math.prod(self.factor_state_sizes) != T.shape[1]:
                raise ValueError(
                    f"{self.name}: factor sizes {self.factor_vocab_sizes} x {self.factor_state_sizes} do not "
                    f"multiply to vocab {T.shape[0]} and states {T.shape[1]}"
                )
        pi = (
            _stationary(T, self.name, self.generalized)
            if self.initial is None
            else torch.as_tensor(self.initial, dtype=torch.float64)
        )
        if self.initial is not None and (
            pi.shape != (T.shape[1],) or (pi @ T.sum(0) - pi).abs().max() > 1e-9 or abs(pi.sum() - 1) > 1e-9
        ):
            raise ValueError(
                f"{self.name}: initial must be a stationary distribution of sum_x T[x] over {T.shape[1]} states"
            )
        object.__setattr__(self, "stationary", pi)

    @property
    def vocab_size(self) -> int:
        return self.T.shape[0]

    @property
    def n_states(self) -> int:
        return self.T.shape[1]

    @property
    def n_factors(self) -> int:
        return 1 if self.factor_vocab_sizes is None else len(self.factor_vocab_sizes)

    @property
    def unifilar(self) -> bool:
        """True for an HMM whose current state and emitted token fix the next state (at most one ``j`` with
        ``T[x, i, j] > 0`` for every ``x, i``); its entropy rate is then ``sum_i pi_i H(X | state i)`` exactly."""
        return not self.generalized and bool(((self.T > 0).sum(-1) <= 1).all())

    def __repr__(self) -> str:
        return f"Process({self.name}, vocab={self.vocab_size}, states={self.n_states})"


def _validate(T: torch.Tensor, name: str, generalized: bool) -> None:
    if T.ndim != 3 or T.shape[1] != T.shape[2]:
        raise ValueError(
            f"{name}: T must have shape (vocab, states, states) with T[x, i, j] = P(x, j | i); got {tuple(T.shape)}"
        )
    if T.shape[0] < 1 or T.shape[1] < 1:
        raise ValueError(f"{name}: T needs at least one token and one state; got shape {tuple(T.shape)}")
    if not torch.isfinite(T).all():
        raise ValueError(f"{name}: T has NaN or infinite entries")
    if not generalized and (T < -TOL).any():
        x, i, j = (T < -TOL).nonzero()[0].tolist()
        raise ValueError(
            f"{name}: T[{x}, {i}, {j}] = {T[x, i, j].item():.3g} is negative; an HMM needs probabilities "
            "(pass generalized=True for a generalized HMM)"
        )
    rows = T.sum(dim=(0, 2))
    bad = (rows - 1).abs() > 1e-8
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}: sum over tokens and next states from state {i} is {rows[i].item():.10g}, must be 1 "
            "(each state's outgoing probabilities sum_x,j T[x, i, j] must sum to 1)"
        )


def _stationary(T: torch.Tensor, name: str, generalized: bool) -> torch.Tensor:
    """Left eigenvector of ``sum_x T[x]`` for eigenvalue 1, normalised to sum 1; must be unique."""
    M = T.sum(0)
    n = M.shape[0]
    # pi (M - I) = 0 with sum(pi) = 1, solved as least squares; a unique solution needs rank n - 1.
    A = torch.cat([(M - torch.eye(n, dtype=M.dtype)).T, torch.ones(1, n, dtype=M.dtype)])
    if torch.linalg.matrix_rank(A[:-1], atol=1e-10) < n - 1:
        raise ValueError(
            f"{name}: the state chain sum_x T[x] has more than one stationary distribution (it is reducible); "
            "make every state reachable from every other, or split the process"
        )
    b = torch.zeros(n + 1, dtype=M.dtype)
    b[-1] = 1
    pi = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    if (A @ pi - b).abs().max() > 1e-8:
        raise ValueError(f"{name}: no stationary distribution found for sum_x T[x]")
    if not generalized:  # lstsq leaves ~1e-16 noise on transient states; an HMM's pi is a distribution
        pi = pi.clamp_min(0.0)
        pi = pi / pi.sum()
    return pi
