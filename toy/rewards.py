"""Reward callables for GRPO on toy processes, computed from the prompt's *exact* belief.

Every reward here is a plain callable with TRL's signature
``reward(prompts, completions, completion_ids, belief, **kwargs) -> list[float]``: ``belief`` is the
dataset column holding each prompt's exact joint belief after its last token (``toy.beliefs``
convention), ``completion_ids`` the generated token ids (process tokens are ids ``0..V-1``; special
tokens such as eos score 0).

Latent-class rewards (``NextTokenArgmaxReward``, ``ComposedLatentReward``) score the first completion
token through a latent class of the prompt: ``r(x, y) = matrix[latent(x), y]`` with a 0/1 ``matrix``
of shape ``(classes, V)``. The same ``table(beliefs)`` gives the exact ``(N, V)`` reward of every
candidate token, which ``toy.composition`` uses for exact expected rewards and for the
KL-regularised optimum ``pi_ref(y|x) exp(r(x, y) / beta) / Z``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from toy.factors import factor_marginals, factor_tokens
from toy.processes import Process

Op = Literal["xor", "implies", "and"]


def _beliefs(belief) -> torch.Tensor:
    """The ``belief`` column (list of lists, or a tensor) as ``(N, S)`` float64."""
    return torch.as_tensor(belief, dtype=torch.float64)


def _first_tokens(completion_ids: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """First completion token per row, ``-1`` for an empty completion or a special token."""
    first = torch.tensor([ids[0] if len(ids) else -1 for ids in completion_ids], dtype=torch.long)
    return torch.where((first >= 0) & (first < vocab_size), first, torch.full_like(first, -1))


def _argmax(p: torch.Tensor) -> torch.Tensor:
    """Argmax over the last axis with exact ties (RRXOR beliefs have many) broken towards the lowest index,
    also when the tied values differ in the last bit (beliefs are reproducible only to ~1e-15)."""
    return torch.round(p * 1e9).argmax(-1)


class LatentReward:
    """Reward 1 for a first completion token that ``matrix`` marks for the prompt's latent class, else 0.

    Subclasses define ``latent(beliefs (N, S)) -> (N,) long`` and set ``matrix (C, V)`` and ``class_names``.
    """

    process: Process
    matrix: torch.Tensor
    class_names: list[str]

    def latent(self, beliefs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def table(self, beliefs: torch.Tensor) -> torch.Tensor:
        """Exact reward of every candidate first token: ``(N, S)`` beliefs -> ``(N, V)`` float64."""
        return self.matrix[self.latent(beliefs)]

    def __call__(self, prompts, completions, completion_ids, belief, **kwargs) -> list[float]:
        table = self.table(_beliefs(belief))
        first = _first_tokens(completion_ids, self.process.vocab_size)
        scores = table.gather(1, first.clamp_min(0)[:, None]).squeeze(1)
        return torch.where(first >= 0, scores, torch.zeros_like(scores)).tolist()


class NextTokenArgmaxReward(LatentReward):
    """Family (a), reweighting: reward for emitting a token whose factor-``factor`` part is that factor's
    most likely next token (exact predictive of the process). A model that predicts the process already
    ranks these tokens first, so sharpening its own prediction earns the reward.

    Latent class = the argmax factor token (``V_factor`` classes).
    """

    def __init__(self, process: Process, factor: int = 0):
        sizes = process.factor_vocab_sizes or (process.vocab_size,)
        if not 0 <= factor < len(sizes):
            raise ValueError(f"reward_factor={factor} but {process.name} has {len(sizes)} factor(s)")
        self.process, self.factor = process, factor
        parts = (
            factor_tokens(process, torch.arange(process.vocab_size))[:, factor]
            if process.factor_vocab_sizes
            else torch.arange(process.vocab_size)
        )
        self.matrix = (parts[None, :] == torch.arange(sizes[factor])[:, None]).double()  # (V_factor, V)
        self.class_names = [f"next_{factor}={c}" for c in range(sizes[factor])]
        self.__name__ = f"argmax_next_token_factor{factor}"

    def latent(self, beliefs: torch.Tensor) -> torch.Tensor:
        joint = beliefs @ self.process.T.sum(-1).T  # (N, V): P(next token) = eta T[x] 1
        sizes = self.process.factor_vocab_sizes or (self.process.vocab_size,)
        shaped = joint.reshape(-1, *sizes)
        others = tuple(1 + k for k in range(len(sizes)) if k != self.factor)
        return _argmax(shaped.sum(others) if others else shaped)


class ComposedLatentReward(LatentReward):
    """Families (b) and (c), composition: the completion must name ``op(a, b)`` of two factor latents.

    ``a = 1`` when factor ``factors[0]``'s most likely hidden state (argmax of its marginal belief) is in
    ``states_a``, likewise ``b`` for ``factors[1]`` and ``states_b``; the rewarded token is
    ``output_tokens[op(a, b)]``. Neither factor alone determines ``op(a, b)`` (for xor not at all).
    """

    OPS = {
        "xor": lambda a, b: a ^ b,
        "implies": lambda a, b: (1 - a) | b,
        "and": lambda a, b: a & b,
    }

    def __init__(
        self,
        process: Process,
        factors: Sequence[int],
        states_a: Sequence[int],
        states_b: Sequence[int],
        op: Op,
        output_tokens: Sequence[int],
    ):
        sizes = process.factor_state_sizes
        if sizes is None:
            raise ValueError(f"{process.name} is not factored: a composed latent needs two factors")
        if len(factors) != 2 or len(set(factors)) != 2 or not all(0 <= f < len(sizes) for f in factors):
            raise ValueError(
                f"latent_factors={list(factors)} must name two different factors of {process.name} (0..{len(sizes) - 1})"
            )
        for f, states, name in ((factors[0], states_a, "latent_states_a"), (factors[1], states_b, "latent_states_b")):
            if not states or not all(0 <= s < sizes[f] for s in states):
                raise ValueError(f"{name}={list(states)} must be non-empty states of factor {f} (0..{sizes[f] - 1})")
        if op not in self.OPS:
            raise ValueError(f"op={op!r}; use one of {sorted(self.OPS)}")
        if (
            len(output_tokens) != 2
            or len(set(output_tokens)) != 2
            or not all(0 <= t < process.vocab_size for t in output_tokens)
        ):
            raise ValueError(
                f"output_tokens={list(output_tokens)} must be two different process tokens (0..{process.vocab_size - 1})"
            )
        self.process, self.factors, self.op = process, tuple(factors), op
        self.states_a = torch.tensor(list(states_a))
        self.states_b = torch.tensor(list(states_b))
        self.matrix = torch.zeros(2, process.vocab_size, dtype=torch.float64)
        self.matrix[0, output_tokens[0]] = self.matrix[1, output_tokens[1]] = 1.0
        self.class_names = [f"{op}=0", f"{op}=1"]
        self.__name__ = f"{op}_of_factor_latents"

    def bits(self, beliefs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factor bits ``(a, b)``, each ``(N,)`` long."""
        marg = factor_marginals(self.process, beliefs)
        a = torch.isin(_argmax(marg[self.factors[0]]), self.states_a).long()
        b = torch.isin(_argmax(marg[self.factors[1]]), self.states_b).long()
        return a, b

    def latent(self, beliefs: torch.Tensor) -> torch.Tensor:
        return self.OPS[self.op](*self.bits(beliefs))


class RareEmissionReward:
    """Rare capability on ``toy.processes.rare_factor``: reward = share of completion tokens that
    are rare-factor emissions (common part == trigger, so the rare factor steps and shows a non-blank
    token), and 0 for a completion the process cannot produce after the prompt (probability 0, or a
    special token): the policy must *reach* the rare process by choosing the trigger, not fake it.
    """

    __name__ = "rare_emissions"

    def __init__(self, process: Process, trigger_token: int):
        if process.factor_vocab_sizes is None or len(process.factor_vocab_sizes) != 2:
            raise ValueError(f"{process.name}: the rare reward needs a two-factor rare_factor process")
        self.process, self.trigger = process, trigger_token
        parts = factor_tokens(process, torch.arange(process.vocab_size))
        blank = process.factor_vocab_sizes[1] - 1
        self.is_rare = (parts[:, 0] == trigger_token) & (parts[:, 1] != blank)  # (V,) bool
        if not self.is_rare.any():
            raise ValueError(f"{process.name}: no token is a rare emission for trigger {trigger_token}")

    def valid(self, beliefs: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: completion ``(N, K)`` (``-1`` = not a process token) has positive probability under the
        process after a prompt whose belief is ``beliefs (N, S)``."""
        V, S = self.process.vocab_size, self.process.n_states
        flat = self.process.T.permute(1, 0, 2).reshape(S, V * S)
        eta, valid = beliefs.clone(), (completions >= 0).all(1)
        rows = torch.arange(len(eta))
        for t in range(completions.shape[1]):  # over completion positions; the batch moves at once
            x = completions[:, t].clamp_min(0)
            nxt = (eta @ flat).view(-1, V, S)[rows, x]
            p = nxt.sum(-1)
            valid &= p > 1e-12
            eta = nxt / p.clamp_min(1e-300)[:, None]
        return valid

    def score(self, beliefs: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """``(N,)`` rewards in [0, 1] of completions ``(N, K)`` after prompts with beliefs ``(N, S)``."""
        valid = self.valid(beliefs, completions)
        share = self.is_rare[completions.clamp_min(0)].double().mean(1)
        return torch.where(valid, share, torch.zeros_like(share))

    def __call__(self, prompts, completions, completion_ids, belief, **kwargs) -> list[float]:
        K = max(len(ids) for ids in completion_ids)
        V = self.process.vocab_size
        # pad short (eos-terminated) completions with -1: they are scored as invalid, like any special token
        ids = torch.full((len(completion_ids), max(K, 1)), -1, dtype=torch.long)
        for i, row in enumerate(completion_ids):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        ids = torch.where(ids < V, ids, torch.full_like(ids, -1))
        return self.score(_beliefs(belief), ids).tolist()
