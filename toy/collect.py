"""The one collection step of every toy experiment: windows of a process -> exact beliefs -> residual stream ->
rows for a probe.

Activations come from ``probes.activations.residual_stream`` (the one nnsight adapter); beliefs from
``toy.beliefs.belief_states`` (the belief *after* reading each position's token, which goes with the model's
output at that position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probes.activations import residual_sites, residual_stream
from toy.beliefs import belief_states, enumerate_sequences
from toy.data import sample
from toy.processes import Process


@dataclass
class ProbeRows:
    """Probe rows: every position of every window of ``tokens (N, L)``, row ``r = n * L + t``.

    ``beliefs (N * L, S)`` float64: the exact belief after reading ``tokens[n, :t + 1]``;
    ``weights (N * L,)``: the window's probability (enumerated) or 1 (sampled windows, which are
    drawn with their probabilities); ``groups (N * L,)``: the window index, so a window's positions stay
    on one side of a train/test split; ``acts``: site -> ``(N * L, d_model)`` float32 activations on the
    model's device, once read (``collect``).
    """

    tokens: torch.Tensor
    beliefs: torch.Tensor
    weights: torch.Tensor
    groups: torch.Tensor
    enumerated: bool
    acts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def X(self) -> torch.Tensor:
        """``(N * L, d_model)`` activations of the one site read, on CPU."""
        if len(self.acts) != 1:
            raise ValueError(f"X needs exactly one site read; these rows hold {sorted(self.acts)}: use acts[site]")
        return next(iter(self.acts.values())).cpu()


def probe_windows(
    process: Process,
    length: int,
    n_samples: int = 0,
    seed: int = 0,
    max_sequences: int = 0,
    tokens: torch.Tensor | None = None,
) -> ProbeRows:
    """Every window of ``length`` tokens with its probability when ``vocab ** length <= max_sequences``; else the
    given ``tokens (N, length)`` or ``n_samples`` windows sampled with ``seed``; with the exact beliefs at every
    position."""
    if tokens is None and process.vocab_size**length <= max_sequences:
        tokens, probs = enumerate_sequences(process, length, max_sequences=max_sequences)
        weights, enumerated = probs.repeat_interleave(length), True
    else:
        if tokens is None:
            tokens = sample(process, n_samples, length, seed=seed).tokens
        weights, enumerated = torch.ones(tokens.numel(), dtype=torch.float64), False
    N, L = tokens.shape
    beliefs = belief_states(process, tokens).reshape(N * L, process.n_states)
    return ProbeRows(tokens, beliefs, weights, torch.arange(N).repeat_interleave(L), enumerated)


def distinct_prefix_rows(rows: ProbeRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of enumerated windows that share a prefix are the same input (a causal model's activation at
    position ``t`` reads only tokens ``0..t``) with the same target: merge them. Returns ``index (M,)``, the first
    row of each distinct prefix, and ``weights (M,)`` float64, the summed window probabilities, i.e. each
    prefix's own probability. A weighted fit or metric on the merged rows equals the one on all rows (Mess3,
    9-token windows: 29,523 rows instead of 177,147)."""
    N, L = rows.tokens.shape
    base = int(rows.tokens.max()) + 2  # digit 0 is "no token": prefixes of different lengths never collide
    if base**L >= 2**62:
        raise ValueError(
            f"{base - 1} tokens x {L} positions overflow the int64 prefix code; merge only enumerated windows"
        )
    digits = (rows.tokens.long() + 1) * base ** torch.arange(L)
    codes = digits.cumsum(1).flatten()  # row n * L + t: the code of tokens[n, :t + 1]
    distinct, inverse = torch.unique(codes, return_inverse=True)
    weights = torch.zeros(len(distinct), dtype=torch.float64).scatter_add_(0, inverse, rows.weights.double())
    first = torch.full((len(distinct),), N * L, dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(N * L), "amin"
    )
    return first, weights


def read_residual(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    sites: list[str] | None = None,
    batch_size: int | None = None,
    positions: slice = slice(None),
) -> dict[str, torch.Tensor]:
    """site -> ``(N * P, d_model)`` float32 on the model's device: the residual stream of ``tokens (N, L)`` at
    ``sites`` (default every site, ``probes.activations.residual_sites``) and the ``P`` positions ``positions``
    of each window, row ``n * P + p``."""
    sites = list(sites) if sites else residual_sites(model)
    acts = residual_stream(model, tokens, sites=sites, batch_size=batch_size)[:, :, positions]
    return dict(zip(sites, acts.flatten(1, 2)))


def collect(
    model: torch.nn.Module,
    process: Process,
    length: int,
    n_samples: int = 0,
    seed: int = 0,
    *,
    sites: list[str] | None = None,
    tokens: torch.Tensor | None = None,
    max_sequences: int = 0,
    batch_size: int | None = None,
) -> ProbeRows:
    """``probe_windows`` (see there for which windows) with the model's residual stream at ``sites`` read on them.

    ``length`` must be below the model's ``n_positions``: a toy model trained on windows of ``n_positions`` tokens
    never has its last position's output in the loss (its position embedding stays at its random init), so rows read
    there are not what training shaped (Mess3 block3 belief MSE 1.3e-2 there against ~4e-4 elsewhere)."""
    n_positions = getattr(getattr(model, "config", None), "n_positions", None)
    if n_positions is not None and length >= n_positions:
        raise ValueError(
            f"length={length} reaches the model's last position (n_positions={n_positions}), whose output training "
            f"never scores; probe windows of at most {n_positions - 1} tokens"
        )
    rows = probe_windows(process, length, n_samples, seed, max_sequences, tokens)
    rows.acts = read_residual(model, rows.tokens, sites, batch_size)
    return rows


def default_site(model: torch.nn.Module) -> str:
    """The last block's output (``resid_post`` of the last layer), read before the final LayerNorm."""
    return f"block{model.config.num_hidden_layers - 1}"
