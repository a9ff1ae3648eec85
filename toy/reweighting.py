"""The reweighting report for a (reference, post-RL) pair of exact one-token toy policies.

The LLM report samples answers and estimates; here every number is exact over the prompts, because a one-token
toy policy is a known distribution over the V process tokens (``toy.grpo.policy_probs``) and the reward of every
answer is known from the prompt's exact belief (``toy.rewards.LatentReward.table``). So the toy world gives the
LLM report its known answers.

Behaviour (per prompt x, over ``N >= 10,000`` prompts; KL and log-likelihoods in nats)
- **Success** of answer y on prompt x: ``r(x, y)`` equals the prompt's maximum reward. Every latent reward here is
  0/1 (``report["reward_is_binary"]`` says so; for any other reward success means "reached the maximum").
  ``p(x) = pi(success | x)``; exact ``pass@k = 1 - (1 - p)^k`` (``probes.passk.pass_at_k_exact``) for the
  pre-registered ks of ``probes.passk.PassKConfig`` (1 .. 256), mean over prompts with a bootstrap CI over
  prompts, coverage at the largest k and ``probes.passk.passk_verdict``.
- **Full support** (sampling at temperature 1, as GRPO trained): a softmax policy gives every answer positive
  probability, and a one-token answer from V tokens is guessable, so at k = 256 the reference solves nearly
  every prompt, as does the **chance policy** (uniform over the V tokens): ``passk_verdict`` then says
  "uninformative". That is a real limit of the pass@k test on guessable answers, not a bug.
- **Truncated support** (the papers' decoding: temperature, then top-p nucleus, ``ExactReweightingConfig``): the exact
  truncated distribution of both policies. The reference can now put zero probability on the right answer, and
  "the reference cannot solve this prompt at any k" means something: ``ref_unsolvable`` is that share of prompts.
  The chance gate is not applied here (a truncated reference cannot guess outside its nucleus; the chance
  policy's pass@k is still reported).
- **In-support likelihood**: ``E_{y ~ post}[log pi_ref(y|x)]`` against ``E_{y ~ ref}[log pi_ref(y|x)]`` (minus the
  reference's entropy), and the share of the post-RL mass outside the reference's truncated support.
- ``KL(post || ref)`` and ``KL(ref || post)`` of the full-support policies, averaged over prompts.

Belief side (models only): cross-fitted (``folds``) balanced accuracy of a linear read-out of the reward's latent
class (``toy.representation.latent_readout``) from the last prompt position's residual stream, every site concatenated
and the output site alone (``final_norm``, the unembedding's input), before and after RL: is the latent readable in
the reference before RL, and does RL make it readable where the output reads?

What it cannot say: pass@k tests the *support* of the post-RL policy against the reference's, not which
information it uses; a policy that reads a new latent but puts its mass inside the reference's support (the
exact-latent optimum is one, it only restricts pi_ref) is "reweighting" to pass@k. ``toy.ladder`` is the detector
for information.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probes.passk import PassKConfig, coverage, pass_at_k_curve, pass_at_k_exact, passk_verdict
from toy.grpo import policy_probs
from toy.representation import last_position_activations, latent_readout


@dataclass
class ExactReweightingConfig:
    """Decoding of the truncated-support test and fitting choices of the belief side (pass@k thresholds:
    ``probes.passk.PassKConfig``, pre-registered)."""

    decode_top_p: float = field(
        default=0.95, metadata={"help": "Top-p (nucleus) of the truncated-support decoding (1 = no truncation)."}
    )
    decode_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the truncated-support decoding, applied before top-p."}
    )
    sharpen_temperature: float = field(
        default=0.5,
        metadata={"help": "Temperature (< 1) of the sharpened-reference control (same support: known reweighting)."},
    )
    readout_folds: int = field(default=5, metadata={"help": "Cross-fitting folds of the latent read-outs."})
    readout_alpha: float = field(default=1e-3, metadata={"help": "Ridge strength of the latent read-outs."})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples of the prompts for the pass@k CIs."})

    def __post_init__(self):
        if not 0 < self.decode_top_p <= 1 or self.decode_temperature <= 0:
            raise ValueError(
                f"decode_top_p={self.decode_top_p} must be in (0, 1], decode_temperature={self.decode_temperature} > 0"
            )
        if not 0 < self.sharpen_temperature < 1:
            raise ValueError(f"sharpen_temperature={self.sharpen_temperature} must be in (0, 1): the control sharpens")
        if self.readout_folds < 2 or self.n_boot < 10:
            raise ValueError("readout_folds must be >= 2 and n_boot >= 10")


# --------------------------------------------------------------------------- exact policies


def success_mask(table: torch.Tensor) -> torch.Tensor:
    """``(N, V)`` bool: the answers that reach each prompt's maximum reward (``table (N, V)`` exact rewards)."""
    return table >= table.max(1, keepdim=True).values - 1e-12


def success_probability(pi: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``p(x) = pi(success | x)``: ``pi (N, V)``, ``table (N, V)`` -> ``(N,)`` float64."""
    return (pi.double() * success_mask(table)).sum(1).clamp(0.0, 1.0)


def with_temperature(pi: torch.Tensor, temperature: float) -> torch.Tensor:
    """``pi^(1 / T)`` renormalised: the policy sampled at temperature ``T`` (same support)."""
    logits = pi.double().clamp_min(1e-300).log() / temperature
    return torch.where(pi > 0, (logits - logits.logsumexp(-1, keepdim=True)).exp(), torch.zeros_like(logits))


def nucleus(pi: torch.Tensor, top_p: float) -> torch.Tensor:
    """``(N, V)`` bool: the top-p nucleus, the most likely answers down to the first whose cumulative mass reaches
    ``top_p`` (HF's ``TopPLogitsWarper``; ties at the boundary broken by index; always at least one answer)."""
    p, order = pi.double().sort(-1, descending=True)
    keep_sorted = (p.cumsum(-1) - p) < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & (pi > 0)


def decode(pi: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The exact sampling distribution of temperature-then-top-p decoding of ``pi (N, V)``: ``(N, V)`` float64."""
    q = with_temperature(pi, temperature) if temperature != 1.0 else pi.double()
    q = q * nucleus(q, top_p) if top_p < 1.0 else q
    return q / q.sum(-1, keepdim=True)


def chance_policy(n: int, vocab_size: int) -> torch.Tensor:
    """Uniform guessing over the V answers: ``(n, V)``."""
    return torch.full((n, vocab_size), 1.0 / vocab_size, dtype=torch.float64)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(p || q)`` in nats (0 log 0 = 0; inf where q = 0 < p)."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def outside_support_exact(
    pi_ref: torch.Tensor, pi_post: torch.Tensor, correct: torch.Tensor, support_k: float
) -> torch.Tensor:
    """``(N,)`` bool, exact: the post-RL policy solves the prompt and the reference gives the correct replies the
    post-RL policy gives total probability below ``1 / support_k`` (what ``probes.passk.outside_support`` estimates)."""
    t = (pi_ref.double() * (correct & (pi_post > 0))).sum(1)
    return (t < 1 / support_k) & ((pi_post.double() * correct).sum(1) > 0)


# --------------------------------------------------------------------------- behaviour


def passk_section(
    pi_ref: torch.Tensor,
    pi_post: torch.Tensor,
    table: torch.Tensor,
    pk: PassKConfig,
    chance: torch.Tensor | None,
    n_boot: int,
    seed: int = 0,
) -> dict:
    """Exact per-prompt success, pass@k curves (with CIs), coverage at k = 1 and the largest k, and the pass@k
    verdict of one decoding; ``chance`` (a policy) gates the verdict when given."""
    p_ref, p_post = success_probability(pi_ref, table), success_probability(pi_post, table)
    ref, post = pass_at_k_exact(p_ref, pk.ks), pass_at_k_exact(p_post, pk.ks)
    curves = {
        "reference": pass_at_k_curve(ref, pk.ks, n_boot=n_boot, seed=seed),
        "post-RL": pass_at_k_curve(post, pk.ks, n_boot=n_boot, seed=seed),
    }
    chance_table = None
    if chance is not None:
        chance_table = pass_at_k_exact(success_probability(chance, table), pk.ks)
        curves["chance"] = pass_at_k_curve(chance_table, pk.ks, n_boot=n_boot, seed=seed)
    unsolvable = p_ref <= 0
    outside = outside_support_exact(pi_ref, pi_post, success_mask(table), pk.support_k)
    K = f"{pk.support_k:.0e}".replace("e+0", "e")
    return {
        "outside_support_share": float(outside.double().mean()),
        "outside_support": (
            f"outside the reference's support at K={K}"
            if outside.any()
            else f"not outside the reference's support (K={K})"
        )
        + " (exact)",
        "curves": curves,
        "coverage_k1": coverage(post[:, 0], ref[:, 0]),
        "coverage_k_max": coverage(post[:, -1], ref[:, -1]),
        "ref_unsolvable": float(unsolvable.double().mean()),
        "post_success_where_ref_unsolvable": float(p_post[unsolvable].mean()) if unsolvable.any() else 0.0,
        **passk_verdict(ref, post, pk, chance=chance_table),
    }


def behaviour_report(
    pi_ref: torch.Tensor,
    pi_post: torch.Tensor,
    table: torch.Tensor,
    cfg: ExactReweightingConfig,
    pk: PassKConfig | None = None,
    seed: int = 0,
) -> dict:
    """The exact behavioural report of ``pi_post`` against ``pi_ref`` (both ``(N, V)``, full support) on prompts
    whose exact rewards are ``table (N, V)``: full-support and truncated pass@k, in-support likelihood, KL."""
    pk = pk or PassKConfig(
        n_boot=cfg.n_boot
    )  # 10,000 prompts: fewer resamples, the CI ends' Monte-Carlo error is printed
    N, V = pi_ref.shape
    ref_t = decode(pi_ref, cfg.decode_temperature, cfg.decode_top_p)
    post_t = decode(pi_post, cfg.decode_temperature, cfg.decode_top_p)
    chance = chance_policy(N, V)
    support = ref_t > 0
    log_ref = pi_ref.double().clamp_min(1e-300).log()
    return {
        "n_prompts": N,
        "vocab_size": V,
        "reward_is_binary": bool(((table == 0) | (table == 1)).all()),
        "reward_ref": float((pi_ref.double() * table).sum(1).mean()),
        "reward_post": float((pi_post.double() * table).sum(1).mean()),
        "full": passk_section(pi_ref, pi_post, table, pk, chance, cfg.n_boot, seed),
        "truncated": passk_section(ref_t, post_t, table, pk, None, cfg.n_boot, seed)
        | {
            "chance_k_max_reported": float(
                pass_at_k_exact(
                    success_probability(decode(chance, cfg.decode_temperature, cfg.decode_top_p), table), pk.ks[-1]
                ).mean()
            )
        },
        "decoding": {"temperature": cfg.decode_temperature, "top_p": cfg.decode_top_p},
        "loglik_post_under_ref": float((pi_post.double() * log_ref).sum(1).mean()),
        "loglik_ref_under_ref": float((pi_ref.double() * log_ref).sum(1).mean()),
        "post_mass_outside_ref_support": float((pi_post.double() * ~support).sum(1).mean()),
        "post_decoded_mass_outside_ref_support": float((post_t * ~support).sum(1).mean()),
        "ref_support_size": float(support.double().sum(1).mean()),
        "kl_post_ref": float(kl_rows(pi_post, pi_ref).mean()),
        "kl_ref_post": float(kl_rows(pi_ref, pi_post).mean()),
        "thresholds": {
            "ks": pk.ks,
            "min_gain_k1": pk.min_gain_k1,
            "gap_margin": pk.gap_margin,
            "support_k": pk.support_k,
            "max_chance": pk.max_chance,
        },
    }


# --------------------------------------------------------------------------- belief side


def cross_fitted_readout(X: torch.Tensor, latent: torch.Tensor, folds: int, alpha: float, seed: int = 0) -> float:
    """Balanced accuracy of a linear read-out of ``latent (N,)`` from ``X (N, D)``, averaged over ``folds``
    held-out folds (every prompt is scored once by a read-out fitted without it)."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.randperm(len(X), generator=g).chunk(folds)
    accs = []
    for i, test in enumerate(parts):
        train = torch.cat([q for j, q in enumerate(parts) if j != i])
        accs.append(latent_readout(X, latent, train, test, alpha))
    return float(sum(accs) / len(accs))


def readability_report(
    X_pre: torch.Tensor,
    X_post: torch.Tensor,
    latent: torch.Tensor,
    d_model: int,
    cfg: ExactReweightingConfig,
    seed: int = 0,
) -> dict:
    """Latent read-out before and after RL from every site (``X_* (N, n_sites * d_model)``, last position) and
    from the output site alone (the last ``d_model`` columns)."""
    acc = {}
    for when, X in (("pre", X_pre), ("post", X_post)):
        acc[f"{when}_all_sites"] = cross_fitted_readout(X, latent, cfg.readout_folds, cfg.readout_alpha, seed)
        acc[f"{when}_output_site"] = cross_fitted_readout(
            X[:, -d_model:], latent, cfg.readout_folds, cfg.readout_alpha, seed
        )
    return {
        "balanced_accuracy": acc,
        "chance": 1 / len(torch.unique(latent)),
        "gain_output_site": acc["post_output_site"] - acc["pre_output_site"],
        "gain_all_sites": acc["post_all_sites"] - acc["pre_all_sites"],
    }


def reweighting_report(
    pre_model,
    post_model,
    reward,
    prompts: torch.Tensor,
    beliefs: torch.Tensor,
    cfg: ExactReweightingConfig,
    pk: PassKConfig | None = None,
    seed: int = 0,
) -> dict:
    """The full report for one (reference, post-RL) pair of models on ``prompts (N, L)`` with exact ``beliefs (N, S)``."""
    V = reward.matrix.shape[1]
    table = reward.table(beliefs)
    out = behaviour_report(
        policy_probs(pre_model, prompts, V), policy_probs(post_model, prompts, V), table, cfg, pk, seed
    )
    out["readability"] = readability_report(
        last_position_activations(pre_model, prompts),
        last_position_activations(post_model, prompts),
        reward.latent(beliefs),
        post_model.config.hidden_size,
        cfg,
        seed,
    )
    return out


def verdict_class(verdict: str) -> str | None:
    """The side a verdict takes: "composes" (outside the reference's support; a ladder's "composition beyond rung
    k"), "reweights" ("not sharper / wider at k": the reference keeps up; a ladder's "reweighting within rung k"), or
    None: "sharper at k" and "wider at k" take no side, a same-support reweighting passes both."""
    if verdict.startswith("outside the reference's support") or verdict.startswith("composition"):
        return "composes"
    if verdict.startswith(("not sharper", "not wider", "reweighting")):
        return "reweights"
    return None


def agreement(passk: str, ladder: str | None) -> str:
    """ "yes" / "no" when both verdicts make a call, else "n/a"."""
    a, b = verdict_class(passk), verdict_class(ladder) if ladder else None
    return "n/a" if a is None or b is None else ("yes" if a == b else "no")
