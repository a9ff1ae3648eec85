"""pass@k, coverage and the pass@k reweighting verdict (Yue et al. 2025), for sampled or exact per-prompt success.

The behavioural side of "does RL compose or reweight?": a policy that only reweights the reference wins at k = 1
and loses at large k, because every prompt it solves the reference also solves given enough samples. Both sides
of the toolkit use this module: ``llm`` with sampled answers, ``toy`` with exact success probabilities.

* Sampled answers (n per prompt, c correct): the unbiased estimator of Chen et al. 2021 (the Codex paper, also
  Yue et al.'s), ``pass@k = 1 - C(n - c, k) / C(n, k)`` for ``k <= n``, in its stable product form.
* Exact success probability ``p`` per prompt (a toy policy is a known distribution): ``pass@k = 1 - (1 - p)^k``.

Either way the per-prompt values are probabilities that at least one of k samples is correct, so **coverage** is
computed the same way for both: with ``a_i``, ``b_i`` two policies' per-prompt pass@k, the expected share of
prompts solved by A only is ``mean(a_i (1 - b_i))`` (independent samples), by both ``mean(a_i b_i)``, by neither
``mean((1 - a_i)(1 - b_i))``. With k = n sampled answers the values are 0/1 and this is the plain count.

**Chance.** Where the answer is guessable (a one-token answer from a vocabulary of 6), the reference "solves" every
prompt at large k by guessing, and the pass@k verdict says "reweighting" for any policy: pass the chance policy's
per-prompt success (e.g. uniform over the answer space) and the verdict is "uninformative" when chance alone reaches
``max_chance`` at the largest k. With a large sampling budget the verdict can instead be taken at a smaller k fixed
from chance before any sampling (``informative_k``: the largest k at which guessing stays below ``max_chance``), while
the curves go on to the budget. Sampling with a truncated support (top-p / top-k, as the papers' decoding does) is
the other way a reference can be unable to solve a prompt at any k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "PassKConfig",
    "log2_ks",
    "coverage",
    "crossover_k",
    "informative_k",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_exact",
    "passk_verdict",
    "plot_pass_at_k",
]


def pass_at_k(n: Tensor | Sequence[int] | int, c: Tensor | Sequence[int] | int, k: int) -> Tensor:
    """Unbiased per-prompt pass@k from ``n`` samples with ``c`` correct (``1 - C(n-c, k) / C(n, k)``), float64.

    ``n`` and ``c`` broadcast; every ``n`` must be >= ``k`` (fewer samples cannot estimate pass@k without bias).
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64)
    n, c = torch.broadcast_tensors(n, c)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (n < k).any():
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt; the smallest n is {int(n.min())}: sample more or lower k")
    if ((c < 0) | (c > n)).any():
        raise ValueError("correct counts must lie in [0, n]")
    # C(n-c, k) / C(n, k) = (n-c)! (n-k)! / ((n-c-k)! n!), in log space; 0 (pass 1) when fewer than k are wrong
    wrong = n - c
    ok = wrong >= k
    w = torch.where(ok, wrong, torch.full_like(wrong, float(k)))
    log_ratio = torch.lgamma(w + 1) - torch.lgamma(w - k + 1) - torch.lgamma(n + 1) + torch.lgamma(n - k + 1)
    out = torch.where(ok, -torch.expm1(log_ratio), torch.ones_like(n))
    return out


def pass_at_k_exact(p: Tensor, k: int | Sequence[int]) -> Tensor:
    """Exact pass@k of a policy whose per-prompt success probability is ``p``: ``1 - (1 - p)^k``.

    ``k`` an int gives ``p``'s shape; a sequence gives shape ``(*p.shape, len(k))``. Stable for tiny ``p``.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    if ((p < -1e-12) | (p > 1 + 1e-12)).any():
        raise ValueError("success probabilities must lie in [0, 1]")
    p = p.clamp(0.0, 1.0)
    ks = torch.as_tensor(k, dtype=torch.float64)
    if (ks < 1).any():
        raise ValueError("every k must be >= 1")
    if ks.dim() == 1:
        p = p[..., None]
    return -torch.expm1(ks * torch.log1p(-p))


def pass_at_k_curve(per_prompt: Tensor, ks: Sequence[int], level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean pass@k over prompts with a percentile bootstrap CI over prompts: ``per_prompt`` is (prompts, len(ks))."""
    per_prompt = torch.as_tensor(per_prompt, dtype=torch.float64)
    if per_prompt.dim() != 2 or per_prompt.shape[1] != len(ks):
        raise ValueError(f"per_prompt must be (prompts, {len(ks)}), got {tuple(per_prompt.shape)}")
    g = torch.Generator().manual_seed(seed)
    n = per_prompt.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    boots = per_prompt[idx].mean(1)  # (n_boot, len(ks))
    lo, hi = torch.quantile(boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64), dim=0)
    return {"k": list(ks), "mean": per_prompt.mean(0).tolist(), "lo": lo.tolist(), "hi": hi.tolist(), "n_prompts": n}


def coverage(a: Tensor, b: Tensor) -> dict:
    """Expected shares of prompts solved by both, by A only, by B only, by neither, from per-prompt pass@k values."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"coverage compares the same prompts: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return {
        "both": float((a * b).mean()),
        "only_a": float((a * (1 - b)).mean()),
        "only_b": float(((1 - a) * b).mean()),
        "neither": float(((1 - a) * (1 - b)).mean()),
    }


def crossover_k(ref_mean: Sequence[float], post_mean: Sequence[float], ks: Sequence[int]) -> int | None:
    """The smallest k from which on the reference's pass@k is at least the post-RL policy's (None if never)."""
    for j in range(len(ks)):
        if all(r >= q for r, q in zip(ref_mean[j:], post_mean[j:])):
            return int(ks[j])
    return None


def informative_k(chance_p: float, ks: Sequence[int], max_chance: float) -> int | None:
    """The largest k in ``ks`` at which a guessing policy with per-prompt success ``chance_p`` solves less than
    ``max_chance`` of the prompts (exact: ``1 - (1 - chance_p)^k``); None when even the smallest k reaches it.

    A function of the task and the budget alone, so it can be fixed before any sample is drawn.
    """
    if not 0 <= chance_p <= 1:
        raise ValueError(f"chance_p is a probability, got {chance_p}")
    ok = [int(k) for k in ks if float(pass_at_k_exact(torch.tensor(chance_p), int(k))) < max_chance]
    return max(ok) if ok else None


@dataclass
class PassKConfig:
    """Thresholds of the pass@k verdict, fixed before any report was run (committed with this module)."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256], metadata={"help": "k values of the curves (largest = the coverage k)."})
    min_gain_k1: float = field(default=0.02, metadata={"help": "Below this pass@1 gain (post - ref) RL did not help at k = 1: inconclusive."})
    coverage_margin: float = field(default=0.02, metadata={"help": "Share of prompts solved by the post-RL policy only, at the largest k, above which it has new coverage."})
    max_chance: float = field(default=0.5, metadata={"help": "Chance pass@k (largest k) at or above which the pass@k test is uninformative."})


def passk_verdict(ref: Tensor, post: Tensor, cfg: PassKConfig, chance: Tensor | None = None) -> dict:
    """The pass@k verdict from per-prompt pass@k tables (prompts, len(cfg.ks)) of the reference and the post-RL policy.

    * "inconclusive": pass@1 gained less than ``min_gain_k1``;
    * "uninformative": ``chance`` (per-prompt pass@k table of a guessing policy) reaches ``max_chance`` at the largest k;
    * "new coverage": the post-RL policy alone solves at least ``coverage_margin`` of the prompts at the largest k;
    * "reweighting": otherwise -- the reference covers what the post-RL policy solves, given k samples.
    """
    ref, post = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(post, dtype=torch.float64)
    ks = cfg.ks
    gain = float(post[:, 0].mean() - ref[:, 0].mean())
    cov = coverage(post[:, -1], ref[:, -1])  # a = post, b = ref
    out = {
        "k_max": ks[-1],
        "gain_k1": gain,
        "gap_k_max": float(post[:, -1].mean() - ref[:, -1].mean()),
        "only_post": cov["only_a"],
        "only_ref": cov["only_b"],
        "both": cov["both"],
        "neither": cov["neither"],
        "crossover_k": crossover_k(ref.mean(0).tolist(), post.mean(0).tolist(), ks),
        "chance_k_max": None if chance is None else float(torch.as_tensor(chance, dtype=torch.float64)[:, -1].mean()),
    }
    if gain < cfg.min_gain_k1:
        out["verdict"] = "inconclusive"
        out["why"] = f"pass@1 gained {gain:+.3f} < {cfg.min_gain_k1}"
    elif out["chance_k_max"] is not None and out["chance_k_max"] >= cfg.max_chance:
        out["verdict"] = "uninformative"
        out["why"] = f"guessing alone solves {out['chance_k_max']:.2f} of the prompts at k = {ks[-1]} (>= {cfg.max_chance})"
    elif cov["only_a"] >= cfg.coverage_margin:
        out["verdict"] = "new coverage"
        out["why"] = f"the post-RL policy alone solves {cov['only_a']:.3f} of the prompts at k = {ks[-1]} (>= {cfg.coverage_margin})"
    else:
        out["verdict"] = "reweighting"
        out["why"] = (f"the post-RL policy alone solves {cov['only_a']:.3f} < {cfg.coverage_margin} of the prompts at k = {ks[-1]}"
                      + (f"; the reference catches up from k = {out['crossover_k']}" if out["crossover_k"] else ""))
    return out


def plot_pass_at_k(curves: dict[str, dict], path, title: str = "") -> None:
    """pass@k against k (log2 axis) with CI bands, one line per named curve from ``pass_at_k_curve``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, c in curves.items():
        ax.plot(c["k"], c["mean"], marker="o", ms=3, label=name)
        ax.fill_between(c["k"], c["lo"], c["hi"], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log2_ks(k_max: int) -> list[int]:
    """1, 2, 4, ..., up to ``k_max`` (and ``k_max`` itself if it is not a power of two)."""
    ks = [2**i for i in range(int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]
