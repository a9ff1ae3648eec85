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
    "gap_ci",
    "informative_k",
    "null_controls",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_exact",
    "passk_verdict",
    "plot_pass_at_k",
    "split_half_null",
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
    """Thresholds of the pass@k verdict. The margins were fixed before any report ran; the rule that reads them was
    revised once (2026-11-30), after a null control -- a reference against a second half of its own samples -- came
    out "new coverage" under the first rule (see ``passk_verdict``)."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256], metadata={"help": "k values of the curves (largest = the coverage k)."})
    min_gain_k1: float = field(default=0.02, metadata={"help": "Below this pass@1 gain (post - ref) RL did not help at k = 1: inconclusive."})
    coverage_margin: float = field(default=0.02, metadata={"help": "Gap pass@k(post) - pass@k(ref) at the largest k from which the post-RL policy has new coverage (CI above 0), and under which (CI's upper bound) it is reweighting."})
    max_chance: float = field(default=0.5, metadata={"help": "Chance pass@k (largest k) at or above which the pass@k test is uninformative."})
    level: float = field(default=0.95, metadata={"help": "Level of the paired bootstrap CI of the gap at the largest k."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the prompts for that CI."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


def gap_ci(ref_k: Tensor, post_k: Tensor, cfg: PassKConfig) -> tuple[float, list[float]]:
    """Mean per-prompt gap ``post_k - ref_k`` (pass@k at one k) and its paired percentile bootstrap CI over prompts."""
    diff = torch.as_tensor(post_k, dtype=torch.float64) - torch.as_tensor(ref_k, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.seed)
    boots = diff[torch.randint(0, len(diff), (cfg.n_boot, len(diff)), generator=g)].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([(1 - cfg.level) / 2, (1 + cfg.level) / 2], dtype=torch.float64)).tolist()
    return float(diff.mean()), [lo, hi]


def _new_coverage(gap: float, ci: list[float], cfg: PassKConfig) -> bool:
    """The rule's "new coverage" call on a gap and its CI (one place: the verdict and its null control read it)."""
    return ci[0] > 0 and gap >= cfg.coverage_margin


def split_half_null(hits: Tensor, k: int, cfg: PassKConfig) -> dict:
    """The null control of the sampled verdict: one policy's replies ``hits (prompts, n)`` (1 = correct) split into two
    halves of ``n // 2``, compared with each other at ``k <= n // 2`` as if they were two policies. Their true gap is
    0, so the rule of ``passk_verdict`` must not call "new coverage" here; ``only_first`` is the share solved by the
    first half only, the quantity a one-sided coverage rule would read (about ``q (1 - q)`` per prompt)."""
    hits = torch.as_tensor(hits, dtype=torch.float64)
    h = hits.shape[1] // 2
    if not 1 <= k <= h:
        raise ValueError(f"the split-half null needs 1 <= k <= n // 2 = {h}, got k = {k}")
    a, b = pass_at_k(h, hits[:, :h].sum(1), k), pass_at_k(h, hits[:, h:2 * h].sum(1), k)
    gap, ci = gap_ci(b, a, cfg)
    return {"k": k, "half": h, "gap": gap, "gap_ci": ci, "only_first": coverage(a, b)["only_a"],
            "calls_new_coverage": _new_coverage(gap, ci, cfg)}


def null_controls(hits: dict[str, torch.Tensor], k: int, pcfg: PassKConfig) -> dict:
    """``split_half_null`` for each model's replies (``hits``: name -> (prompts, n) 0/1) at
    ``min(k, n // 2)``, rounded down to a power of two: known nulls the verdict's rule must not call new coverage."""
    out = {}
    for name, h in hits.items():
        half = h.shape[1] // 2
        if half >= 1:
            kn = max(kk for kk in log2_ks(half) if kk <= min(k, half))
            out[name] = split_half_null(h, kn, pcfg)
    return out


def passk_verdict(ref: Tensor, post: Tensor, cfg: PassKConfig, chance: Tensor | None = None) -> dict:
    """The pass@k verdict from per-prompt pass@k tables (prompts, len(cfg.ks)) of the reference and the post-RL policy.

    * "inconclusive": pass@1 gained less than ``min_gain_k1``;
    * "uninformative": ``chance`` (per-prompt pass@k table of a guessing policy) reaches ``max_chance`` at the largest k;
    * "new coverage": at the largest k the post-RL policy solves more prompts than the reference: the paired
      bootstrap CI (over prompts) of the gap ``pass@k(post) - pass@k(ref)`` lies above 0 and the gap is at least
      ``coverage_margin``;
    * "reweighting": the gap's upper CI bound is below ``coverage_margin`` -- given k samples the reference solves
      what the post-RL policy solves (Yue et al.'s pattern: the reference catches up at large k);
    * "undecided": the CI straddles the margin (more prompts or samples would decide).

    Why the gap and not the share "solved by the post-RL policy only" (``only_post``, still reported): with per-prompt
    pass@k ``q`` of two *identical* policies, each solves a prompt the other misses with probability ``q (1 - q)``, so
    ``only_post`` is far above any margin for a policy compared with itself (measured: SmolLM2's reference against a
    second independent half of its own samples, 0.12 of the prompts at k = 32 on ``add``). The gap ``only_post -
    only_ref`` = ``mean(post - ref)`` is 0 in expectation under that null, and its CI calibrates the call.
    """
    ref, post = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(post, dtype=torch.float64)
    ks = cfg.ks
    gain = float(post[:, 0].mean() - ref[:, 0].mean())
    cov = coverage(post[:, -1], ref[:, -1])  # a = post, b = ref
    gap, ci = gap_ci(ref[:, -1], post[:, -1], cfg)
    lo, hi = ci
    out = {
        "k_max": ks[-1],
        "gain_k1": gain,
        "gap_k_max": gap,
        "gap_k_max_ci": [lo, hi],
        "only_post": cov["only_a"],
        "only_ref": cov["only_b"],
        "both": cov["both"],
        "neither": cov["neither"],
        "crossover_k": crossover_k(ref.mean(0).tolist(), post.mean(0).tolist(), ks),
        "chance_k_max": None if chance is None else float(torch.as_tensor(chance, dtype=torch.float64)[:, -1].mean()),
    }
    at = f"pass@{ks[-1]} post - ref = {gap:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if gain < cfg.min_gain_k1:
        out["verdict"] = "inconclusive"
        out["why"] = f"pass@1 gained {gain:+.3f} < {cfg.min_gain_k1}"
    elif out["chance_k_max"] is not None and out["chance_k_max"] >= cfg.max_chance:
        out["verdict"] = "uninformative"
        out["why"] = f"guessing alone solves {out['chance_k_max']:.2f} of the prompts at k = {ks[-1]} (>= {cfg.max_chance})"
    elif _new_coverage(gap, ci, cfg):
        out["verdict"] = "new coverage"
        out["why"] = f"{at}: above 0 and >= {cfg.coverage_margin}"
    elif hi < cfg.coverage_margin:
        out["verdict"] = "reweighting"
        out["why"] = (f"{at}: below {cfg.coverage_margin}"
                      + (f"; the reference catches up from k = {out['crossover_k']}" if out["crossover_k"] else ""))
    else:
        out["verdict"] = "undecided"
        out["why"] = f"{at}: the CI straddles 0 or {cfg.coverage_margin}; more prompts or samples would decide"
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
