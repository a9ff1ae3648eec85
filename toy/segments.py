"""Prompts that join segments of separately learned processes: two skills learned apart and composed only in the prompt.

Pre-training sees ``toy.processes.mixture(components)``: every sequence is one component's, never two (disjoint
tokens, block-diagonal states). An RL prompt here is one segment per component, in order -- e.g. 5 Mess3 tokens
then 6 RRXOR tokens -- a context no pre-training sequence ever had. Each segment is a fresh stationary draw of its
component (the segments are independent), written in the mixture's token ids (component k's tokens shifted by
the vocabularies of the components before it). The prompt's "belief" is the concatenation of every component's
exact belief after its own segment, ``(N, sum_k S_k)``; ``SegmentComposedReward`` reads one latent bit from each.
"""

from __future__ import annotations

from typing import Sequence

import torch

from toy.data import sample
from toy.processes import Process
from toy.rewards import ComposedLatentReward, LatentReward, Op, _argmax


def segment_prompts(
    components: Sequence[Process], lengths: Sequence[int], n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of one segment per component (``lengths[k]`` tokens of component ``k``), in mixture token ids,
    and each segment's exact final belief concatenated: ``(n, sum(lengths))`` long, ``(n, sum_k S_k)`` float64."""
    if len(components) != len(lengths) or any(L < 1 for L in lengths):
        raise ValueError(
            f"segment_lengths={list(lengths)} needs one length >= 1 per mixture component ({len(components)})"
        )
    tokens, beliefs, offset = [], [], 0
    for k, (c, L) in enumerate(zip(components, lengths)):
        batch = sample(c, n, L, seed=seed * 1000 + k, return_beliefs=True)  # independent segments, reproducible
        tokens.append(batch.tokens + offset)
        beliefs.append(batch.beliefs[:, -1])
        offset += c.vocab_size
    return torch.cat(tokens, 1), torch.cat(beliefs, 1)


class SegmentComposedReward(LatentReward):
    """The completion must name ``op(a, b)``: ``a = 1`` when the first segment's component's most likely state (after
    its segment) is in ``states_a``, ``b`` likewise for the second segment and ``states_b``; token
    ``output_tokens[op(a, b)]`` of ``process`` (the mixture) earns 1. The separate-skills analogue of
    ``toy.rewards.ComposedLatentReward``: no pre-training context held both segments."""

    def __init__(
        self,
        process: Process,
        components: Sequence[Process],
        states_a: Sequence[int],
        states_b: Sequence[int],
        op: Op,
        output_tokens: Sequence[int],
    ):
        if len(components) != 2:
            raise ValueError(
                f"the separate-skills reward reads two segments; the mixture has {len(components)} components"
            )
        for c, states, name in (
            (components[0], states_a, "latent_states_a"),
            (components[1], states_b, "latent_states_b"),
        ):
            if not states or not all(0 <= s < c.n_states for s in states):
                raise ValueError(f"{name}={list(states)} must be non-empty states of {c.name} (0..{c.n_states - 1})")
        if op not in ComposedLatentReward.OPS:
            raise ValueError(f"op={op!r}; use one of {sorted(ComposedLatentReward.OPS)}")
        if (
            len(output_tokens) != 2
            or len(set(output_tokens)) != 2
            or not all(0 <= t < process.vocab_size for t in output_tokens)
        ):
            raise ValueError(
                f"output_tokens={list(output_tokens)} must be two different tokens of {process.name} (0..{process.vocab_size - 1})"
            )
        self.process, self.op, self.sizes = process, op, (components[0].n_states, components[1].n_states)
        self.states_a, self.states_b = torch.tensor(list(states_a)), torch.tensor(list(states_b))
        self.matrix = torch.zeros(2, process.vocab_size, dtype=torch.float64)
        self.matrix[0, output_tokens[0]] = self.matrix[1, output_tokens[1]] = 1.0
        self.class_names = [f"{op}=0", f"{op}=1"]
        self.__name__ = f"{op}_of_segment_latents"

    def latent(self, beliefs: torch.Tensor) -> torch.Tensor:
        S1, S2 = self.sizes
        a = torch.isin(_argmax(beliefs[:, :S1]), self.states_a).long()
        b = torch.isin(_argmax(beliefs[:, S1 : S1 + S2]), self.states_b).long()
        return ComposedLatentReward.OPS[self.op](a, b)
