"""pass@k, coverage and three verdicts named by what they test, for sampled or exact per-prompt success.

The behavioural side of "does RL find new answers or reweight old ones?". The KL-regularised RL optimum
``pi_ref(y) exp(beta r(y)) / Z`` has the reference's support and raises pass@k at *every* finite k, so a pass@k gain
shows sharpening, never new support (Yue et al. 2025 read the curve to large k and the base's likelihood of RL's
correct answers). Hence three verdicts, none of which says more than its rule tests:

* **"sharper at k"** (``passk_verdict``): pass@k gain at ``k_verdict``, paired bootstrap CI over prompts;
* **"wider at k"** (``wider_verdict``): the reference's pass@k at the largest affordable k stays below the post-RL
  policy's -- still passed by a reweighting of a reference whose success on some prompts is below ~1/k;
* **"outside the reference's support at K"** (``outside_support``): the reference's probability of the post-RL
  policy's correct replies, importance-sampled from those replies' log-likelihoods, has an upper bound below 1/K for
  a K far beyond sampling reach. Only this one is called "new" (``summary``).

Both sides of the toolkit use this module: ``llm`` with sampled answers, ``toy`` with exact success probabilities.

* Sampled answers (n per prompt, c correct): the unbiased estimator of Chen et al. 2021 (the Codex paper, also
  Yue et al.'s), ``pass@k = 1 - C(n - c, k) / C(n, k)`` for ``k <= n``, in its stable product form.
* Exact success probability ``p`` per prompt (a toy policy is a known distribution): ``pass@k = 1 - (1 - p)^k``.

Either way the per-prompt values are probabilities that at least one of k samples is correct, so **coverage** is
computed the same way for both: with ``a_i``, ``b_i`` two policies' per-prompt pass@k, the expected share of
prompts solved by A only is ``mean(a_i (1 - b_i))`` (independent samples), by both ``mean(a_i b_i)``, by neither
``mean((1 - a_i)(1 - b_i))``. With k = n sampled answers the values are 0/1 and this is the plain count.

**Chance.** Where the answer is guessable (a one-token answer from a vocabulary of 6), the reference "solves" every
prompt at large k by guessing, and a pass@k gap at that k says nothing: pass the chance policy's
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
    "gap_call",
    "informative_k",
    "null_controls",
    "outside_support",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_exact",
    "passk_verdict",
    "plot_pass_at_k",
    "split_half_null",
    "summary",
    "wider_verdict",
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
        raise ValueError(
            f"pass@{k} needs at least {k} samples per prompt; the smallest n is {int(n.min())}: sample more or lower k"
        )
    if ((c < 0) | (c > n)).any():
        raise ValueError("correct counts must lie in [0, n]")
    # C(n-c, k) / C(n, k) = (n-c)! (n-k)! / ((n-c-k)! n!), in log space; 0 (pass 1) when fewer than k are wrong
    wrong = n - c
    ok = wrong >= k
    w = torch.where(ok, wrong, torch.full_like(wrong, float(k)))
    log_ratio = torch.lgamma(w + 1) - torch.lgamma(w - k + 1) - torch.lgamma(n + 1) + torch.lgamma(n - k + 1)
    out = torch.where(ok, -torch.expm1(log_ratio), torch.ones_like(n))
    # c = 0 is exactly 0 (the lgamma terms cancel only to ~1e-13, which printed as "-0.000")
    return torch.where(c == 0, torch.zeros_like(out), out)


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


def pass_at_k_curve(
    per_prompt: Tensor, ks: Sequence[int], level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> dict:
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
    """Thresholds of the three verdicts. The margins were fixed before any report ran; the gap rule was revised once
    (2026-11-30) after a split-half null came out positive under a one-sided rule, and the verdicts were renamed by
    what they test: the old "new coverage" rule is "sharper at k", which a simulated ``pi_ref exp(beta r) / Z`` reweighting
    passes in up to 100 of 100 reports (``toy.experiments.passk_calibration``)."""

    ks: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256],
        metadata={"help": "k values of the curves (largest = the k of the 'sharper' verdict)."},
    )
    min_gain_k1: float = field(
        default=0.02, metadata={"help": "Below this pass@1 gain (post - ref) RL did not help at k = 1: inconclusive."}
    )
    gap_margin: float = field(
        default=0.02,
        metadata={
            "help": "pass@k(post) - pass@k(ref) from which (CI above 0) a policy is sharper / wider at k, and under which (CI's upper end) it is not."
        },
    )
    max_chance: float = field(
        default=0.5, metadata={"help": "Chance pass@k at or above which a pass@k gap at that k is uninformative."}
    )
    level: float = field(default=0.95, metadata={"help": "Level of the paired bootstrap CI of a pass@k gap."})
    n_boot: int = field(
        default=20000,
        metadata={
            "help": "Bootstrap resamples of the prompts for that CI (its Monte-Carlo error is reported beside it)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    support_k: float = field(
        default=1e5,
        metadata={
            "help": "K of 'outside the reference's support': the reference's probability of the post-RL correct replies must be below 1/K (390x the 256 replies of the largest report)."
        },
    )
    support_level: float = field(
        default=0.95,
        metadata={
            "help": "Family-wise level of the per-prompt one-sided upper bounds of that probability (Bonferroni over the prompts tested)."
        },
    )

    def __post_init__(self):
        if self.n_boot < 20 or self.support_k < 1 or not 0 < self.level < 1 or not 0 < self.support_level < 1:
            raise ValueError("need n_boot >= 20, support_k >= 1, level and support_level in (0, 1)")


def gap_ci(ref_k: Tensor, post_k: Tensor, cfg: PassKConfig) -> tuple[float, list[float], float]:
    """Mean per-prompt gap ``post_k - ref_k`` (pass@k at one k), its paired percentile bootstrap CI over prompts and
    the Monte-Carlo standard error of the CI's ends (spread of the ends over 20 blocks of resamples / sqrt(20)).
    The resamples are drawn in blocks, so 20,000 of them over 10,000 prompts fit in memory."""
    diff = torch.as_tensor(post_k, dtype=torch.float64) - torch.as_tensor(ref_k, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.seed)
    blocks = 20
    per = -(-cfg.n_boot // blocks)
    q = torch.tensor([(1 - cfg.level) / 2, (1 + cfg.level) / 2], dtype=torch.float64)
    boots = torch.cat([diff[torch.randint(0, len(diff), (per, len(diff)), generator=g)].mean(1) for _ in range(blocks)])
    lo, hi = torch.quantile(boots, q).tolist()
    mc = float(torch.quantile(boots.view(blocks, per), q, dim=1).std(1).max()) / math.sqrt(blocks)
    return float(diff.mean()), [lo, hi], mc


def gap_call(ref_k: Tensor, post_k: Tensor, cfg: PassKConfig) -> dict:
    """The gap rule at one k: "above" when the CI lies above 0 and the gap is at least ``gap_margin``, "below" when
    the CI's upper end is under the margin, else "undecided"; with the gap, its CI and the CI's Monte-Carlo error."""
    gap, ci, mc = gap_ci(ref_k, post_k, cfg)
    call = "above" if ci[0] > 0 and gap >= cfg.gap_margin else "below" if ci[1] < cfg.gap_margin else "undecided"
    return {"gap": gap, "ci": ci, "ci_mc_se": mc, "call": call}


def _gap_text(k: int, g: dict, cfg: PassKConfig) -> str:
    return (
        f"pass@{k} post - ref = {g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] (CI ends +- {g['ci_mc_se']:.4f} "
        f"Monte-Carlo, {cfg.n_boot} resamples; margin {cfg.gap_margin})"
    )


def split_half_null(n: int, c: Tensor, k: int, cfg: PassKConfig, seed: int = 0) -> dict:
    """The null control of the sampled verdicts: one policy's ``n`` replies per prompt (``c (prompts,)`` correct) split
    at random into two halves of ``n // 2`` (the correct count of a half is hypergeometric: replies are exchangeable),
    compared with each other at ``k <= n // 2`` as if they were two policies. Their true gap is 0, so the gap rule must
    not call them "sharper"; ``only_first`` is the share solved by the first half only, the quantity a one-sided rule
    would read (about ``q (1 - q)`` per prompt)."""
    import numpy as np

    h = n // 2
    if not 1 <= k <= h:
        raise ValueError(f"the split-half null needs 1 <= k <= n // 2 = {h}, got k = {k}")
    c = torch.as_tensor(c, dtype=torch.long)
    first = torch.as_tensor(np.random.default_rng(seed).hypergeometric(c.numpy(), (n - c).numpy(), h), dtype=torch.long)
    second = torch.minimum(c - first, torch.full_like(c, h))  # an odd n leaves one reply out of the second half
    a, b = pass_at_k(h, first, k), pass_at_k(h, second, k)
    g = gap_call(b, a, cfg)
    return {
        "k": k,
        "half": h,
        "gap": g["gap"],
        "gap_ci": g["ci"],
        "only_first": coverage(a, b)["only_a"],
        "calls_sharper": g["call"] == "above",
    }


def null_controls(counts: dict[str, Tensor], n: int, k: int, pcfg: PassKConfig) -> dict:
    """``split_half_null`` for each model's correct counts (``counts``: name -> (prompts,) out of ``n``) at
    ``min(k, n // 2)``, rounded down to a power of two: known nulls the gap rule must not call sharper."""
    half = n // 2
    if half < 1:
        return {}
    kn = max(kk for kk in log2_ks(half) if kk <= min(k, half))
    return {name: split_half_null(n, c, kn, pcfg) for name, c in counts.items()}


def passk_verdict(ref: Tensor, post: Tensor, cfg: PassKConfig, chance: Tensor | None = None) -> dict:
    """ "Sharper at k": the pass@k gain at the tables' largest k, from per-prompt pass@k tables (prompts, len(cfg.ks))
    of the reference and the post-RL policy (cut at ``k_verdict`` by the caller).

    * "inconclusive": pass@1 gained less than ``min_gain_k1``;
    * "uninformative": ``chance`` (per-prompt pass@k table of a guessing policy) reaches ``max_chance`` at that k;
    * "sharper at k=K": the paired bootstrap CI (over prompts) of ``pass@K(post) - pass@K(ref)`` lies above 0 and the
      gap is at least ``gap_margin``;
    * "not sharper at k=K": the CI's upper end is under the margin (the reference has caught up by K: Yue et al.);
    * "undecided at k=K": the CI straddles the margin.

    What it cannot say: the KL-regularised RL optimum ``pi_ref exp(beta r) / Z`` has the reference's support and raises
    pass@k at *every* finite k, so "sharper at k" is what a pure reweighting gives; it never shows new support
    (``outside_support`` does). Why the gap and not the share solved by the post-RL policy only (``only_post``, still
    reported): two *identical* policies each solve a prompt the other misses with probability ``q (1 - q)``, far above
    any margin; the gap ``only_post - only_ref`` is 0 in expectation under that null.
    """
    ref, post = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(post, dtype=torch.float64)
    k = cfg.ks[-1]
    gain = float(post[:, 0].mean() - ref[:, 0].mean())
    cov = coverage(post[:, -1], ref[:, -1])  # a = post, b = ref
    g = gap_call(ref[:, -1], post[:, -1], cfg)
    out = {
        "k_max": k,
        "gain_k1": gain,
        "gap_k_max": g["gap"],
        "gap_k_max_ci": g["ci"],
        "gap_ci_mc_se": g["ci_mc_se"],
        "only_post": cov["only_a"],
        "only_ref": cov["only_b"],
        "both": cov["both"],
        "neither": cov["neither"],
        "crossover_k": crossover_k(ref.mean(0).tolist(), post.mean(0).tolist(), cfg.ks),
        "chance_k_max": None if chance is None else float(torch.as_tensor(chance, dtype=torch.float64)[:, -1].mean()),
    }
    at = _gap_text(k, g, cfg)
    if gain < cfg.min_gain_k1:
        out["verdict"], out["why"] = "inconclusive", f"pass@1 gained {gain:+.3f} < {cfg.min_gain_k1}"
    elif out["chance_k_max"] is not None and out["chance_k_max"] >= cfg.max_chance:
        out["verdict"] = "uninformative"
        out["why"] = f"guessing alone solves {out['chance_k_max']:.2f} of the prompts at k = {k} (>= {cfg.max_chance})"
    elif g["call"] == "above":
        out["verdict"], out["why"] = f"sharper at k={k}", f"{at}: above 0 and >= the margin"
    elif g["call"] == "below":
        out["verdict"] = f"not sharper at k={k}"
        out["why"] = f"{at}: below the margin" + (
            f"; the reference catches up from k = {out['crossover_k']}" if out["crossover_k"] else ""
        )
    else:
        out["verdict"], out["why"] = (
            f"undecided at k={k}",
            f"{at}: the CI straddles 0 or the margin; more prompts or samples would decide",
        )
    return out


def wider_verdict(ref_k: Tensor, post_k: Tensor, k: int, cfg: PassKConfig, chance_k: Tensor | None = None) -> dict:
    """ "Wider at k": the reference's pass@k at the largest affordable k (``ref_k``, ``post_k``: per-prompt pass@k at
    that ``k``) stays below the post-RL policy's -- the gap rule of ``passk_verdict`` at the end of the budget, without
    the pass@1 gate. "uninformative at k=K" when guessing (``chance_k``) reaches ``max_chance`` there. A reweighting
    of a reference whose success on some prompts is below ~1/K passes it too: the budget, not the support, ends."""
    g = gap_call(ref_k, post_k, cfg)
    chance = None if chance_k is None else float(torch.as_tensor(chance_k, dtype=torch.float64).mean())
    out = {"k": k, "gap": g["gap"], "gap_ci": g["ci"], "gap_ci_mc_se": g["ci_mc_se"], "chance": chance}
    at = _gap_text(k, g, cfg)
    if chance is not None and chance >= cfg.max_chance:
        out["verdict"], out["why"] = (
            f"uninformative at k={k}",
            f"guessing alone solves {chance:.2f} of the prompts at k = {k}",
        )
    else:
        out["verdict"] = {
            "above": f"wider at k={k}",
            "below": f"not wider at k={k}",
            "undecided": f"undecided at k={k}",
        }[g["call"]]
        out["why"] = at
    return out


def outside_support(n: int, c_post: Tensor, c_ref: Tensor, log_w: list[Tensor], cfg: PassKConfig) -> dict:
    """ "Outside the reference's support at K": the reference gives the post-RL policy's correct replies on a prompt a
    total probability below ``1 / cfg.support_k``, with confidence.

    Per prompt, from the post-RL policy's ``n`` replies (``c_post`` correct; ``log_w[i]``: for each correct reply,
    ``log pi_ref(y) - log pi_post(y)``, -inf where the reference cannot produce it) the importance-sampled estimate
    ``p_hat = sum_correct pi_ref(y) / pi_post(y) / n`` of the reference's success on the replies the post-RL policy
    gives (unbiased: E over y ~ pi_post of ``1[correct] pi_ref / pi_post``), and its one-sided upper bound ``p_hat + z
    sd / sqrt(n)`` at level ``1 - (1 - support_level) / m`` (Bonferroni over the m prompts tested). Tested: prompts the
    post-RL policy solved (``c_post >= 1``) and the reference's own replies did not (``c_ref == 0``; one correct
    reference reply in ``n`` already says its success is not far below 1/n). Flagged: upper bound < 1/K.

    Under ``pi_ref exp(beta r) / Z`` every weight of a correct reply is ``Z e^-beta`` and ``p_hat`` estimates the
    reference's own success, so a reweighting is flagged only where the reference's success truly is below 1/K. What
    it cannot see: correct replies the post-RL policy no longer gives (a reference that solves a prompt in another
    format); the claim is about the post-RL policy's replies, not about every reply that scores correct.
    """
    c_post, c_ref = torch.as_tensor(c_post, dtype=torch.long), torch.as_tensor(c_ref, dtype=torch.long)
    if len(log_w) != len(c_post) or any(len(w) != int(c) for w, c in zip(log_w, c_post)):
        raise ValueError("log_w needs one log-weight per correct post-RL reply, for every prompt")
    tested = (c_post >= 1) & (c_ref == 0)
    m = int(tested.sum())
    z = float(
        torch.distributions.Normal(0.0, 1.0).icdf(
            torch.tensor(1 - (1 - cfg.support_level) / max(m, 1), dtype=torch.float64)
        )
    )
    p_hat, upper = [], []
    for w in log_w:
        w = torch.as_tensor(w, dtype=torch.float64).exp()
        s1, s2 = float(w.sum()), float((w**2).sum())
        mean = s1 / n
        var = max(s2 / n - mean**2, 0.0) * n / max(n - 1, 1)
        p_hat.append(mean)
        upper.append(mean + z * math.sqrt(var / n))
    p_hat, upper = torch.tensor(p_hat, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64)
    flagged = tested & (upper < 1 / cfg.support_k)
    f = int(flagged.sum())
    K = f"{cfg.support_k:.0e}".replace("e+0", "e")
    out = {
        "support_k": cfg.support_k,
        "n_tested": m,
        "n_flagged": f,
        "flagged": flagged.nonzero().flatten().tolist(),
        "p_hat": p_hat.tolist(),
        "upper": upper.tolist(),
        "z": z,
    }
    if f:
        out["verdict"] = f"outside the reference's support at K={K}"
        out["why"] = (
            f"on {f} of {len(c_post)} prompts the reference gives the post-RL correct replies probability < 1/K "
            f"(importance-sampled, one-sided upper bound at family-wise {cfg.support_level}; {m} prompts tested)"
        )
    else:
        out["verdict"] = f"not shown outside the reference's support (K={K})"
        out["why"] = (
            f"no prompt's upper bound is below 1/K ({m} tested: solved by the post-RL policy, by none of the reference's "
            "replies)" + ("" if m == 0 else f"; smallest upper bound {float(upper[tested].min()):.2e}")
        )
    return out


def summary(sharper: dict, wider: dict | None, outside: dict | None, elicited: Tensor | None = None) -> str:
    """One line naming what the verdicts show: "new" only where ``outside_support`` flagged a prompt that the
    elicitation baseline did not solve (``elicited``: per prompt, whether the reference with worked examples in
    context solved it; None: no baseline). The flag is about the post-RL policy's replies: a reference that answers
    the same prompt correctly in another format, or after a few examples, has the capability."""
    parts = (
        [sharper["verdict"]]
        + ([wider["verdict"]] if wider else [])
        + [outside["verdict"] if outside else "outside-support test not run (no per-reply log-likelihoods)"]
    )
    flagged = outside["flagged"] if outside else []
    new = [i for i in flagged if elicited is None or not bool(elicited[i])]
    if new:
        head = "new support" + ("" if elicited is not None else " (no elicitation baseline run)")
    elif flagged:
        head = f"no new support: the {len(flagged)} prompts outside the zero-shot reference's support are solved by it with worked examples in context"
    else:
        head = "no new support shown"
    return f"{head}: " + "; ".join(parts)


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
