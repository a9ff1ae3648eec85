"""Exact validation of a toy model: every prefix weighted by its probability against the exact next-token
distribution, and the loss floor on the same set (nats)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toy.beliefs import enumerate_sequences, next_token_distributions
from toy.data import sample
from toy.processes import Process


@dataclass
class ValidationSet:
    """Prefixes ``tokens (N, L - 1)`` with ``weights (N,)`` summing to 1, the exact next-token distributions
    ``targets (N, L - 1, V)`` after each prefix, and the floor on this set (nats).

    The loss of a window of ``L`` tokens at positions 2..L depends on its last token only through the
    target token of the last position, so summing that token out replaces it by the exact predictive
    distribution: the soft-target loss on the ``L - 1``-token prefixes equals the hard-target loss on all
    ``L``-token windows (``window_loss``) and needs a third of the forward passes for Mess3.
    ``exact``: every prefix of positive probability, weighted by its probability (then
    ``floor == toy.beliefs.loss_floor(process, L)``); otherwise seeded samples with uniform weights.
    """

    tokens: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    floor: float
    exact: bool


def window_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Probability-weighted mean next-token cross-entropy (nats) of whole windows, 0-dim float64.

    ``logits (N, L, V)`` (entry t predicts token t + 1; log-probabilities work too), ``tokens (N, L)``,
    ``weights (N,)`` (default uniform). Each window contributes the mean CE over positions 2..L (targets
    ``tokens[:, 1:]``); windows are averaged with ``weights / weights.sum()``. The training loss.
    """
    N, L, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), tokens[:, 1:].reshape(-1), reduction="none")
    per_seq = ce.view(N, L - 1).mean(1)
    if weights is None:
        return per_seq.mean()
    w = weights.to(per_seq)
    return (w * per_seq).sum() / w.sum()


def soft_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n mean_t sum_x targets[n, t, x] * -log_softmax(logits)[n, t, x]`` / ``sum w``: 0-dim float64.

    ``logits``/``targets (N, T, V)``, ``weights (N,)``. Zero-probability targets contribute nothing."""
    logp = torch.log_softmax(logits.double(), -1)
    ce = -(targets.double() * torch.where(targets > 0, logp, torch.zeros_like(logp))).sum(-1).mean(1)
    w = weights.to(ce)
    return (w * ce).sum() / w.sum()


def validation_set(
    process: Process, context_length: int, max_sequences: int = 200_000, n_samples: int = 20_000, seed: int = 12345
) -> ValidationSet:
    """Every prefix of ``context_length - 1`` tokens with its probability when ``vocab ** (context_length - 1)
    <= max_sequences``, else ``n_samples`` sampled prefixes; their exact next-token distributions; the floor."""
    n = context_length - 1
    exact = process.vocab_size**n <= max_sequences
    if exact:
        tokens, probs = enumerate_sequences(process, n, max_sequences=max_sequences)
        weights = probs / probs.sum()
    else:
        tokens = sample(process, n_samples, n, seed=seed).tokens
        weights = torch.full((n_samples,), 1.0 / n_samples, dtype=torch.float64)
    targets = next_token_distributions(process, tokens)
    floor = soft_loss(targets.clamp_min(1e-300).log(), targets, weights).item()
    return ValidationSet(tokens, weights, targets, floor, exact)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ValidationSet, batch_size: int = 8192) -> float:
    """Exact next-token loss of ``model`` on ``val`` (nats; see ``ValidationSet``), in chunks of
    ``batch_size`` prefixes on the model's device."""
    device = next(model.parameters()).device
    was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
    model.eval()
    # full float32 matmuls: TF32's 10-bit mantissa would blur a gap measured in 1e-4 nats
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(val.tokens), batch_size):
            rows = slice(start, start + batch_size)
            w = val.weights[rows].to(device)
            logits = model(input_ids=val.tokens[rows].to(device)).logits.float()
            targets = val.targets[rows].to(device)
            # a vocabulary wider than the process's (e.g. toy.grpo's <eos>/<pad>): the extra tokens are never
            # targets, and the mass the model puts on them counts as loss through the softmax
            targets = torch.nn.functional.pad(targets, (0, logits.shape[-1] - targets.shape[-1]))
            total += soft_loss(logits, targets, w) * w.sum()
    finally:
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return (total / val.weights.sum()).item()
