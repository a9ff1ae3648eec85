"""Composition report: did RL *compose* belief states into something new, or *reweight* what the model had?

Superseded as a verdict by ``toy.ladder`` (``python -m toy.experiments.ladder``): the output-only ceiling below reads
the last position only, and on the Mess3 x RRXOR reference a reweighting by every position's outputs earns far more.
This report stays for its representation measurements.

The detector behind ``toy.experiments.rl``, which runs it on every (pre-RL, post-RL) pair it trains or is given:

    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml --seeds 0 1 2
    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml --pre runs/toy_rl/pretrain/seed0/checkpoint-3000 \
        --post runs/toy_rl/compose/seed0/model --output_dir runs/toy_rl/compose/report_seed0

For a reward ``r(x, y) = M[c(x), y]`` that scores one completion token ``y`` through a latent class
``c(x)`` of the prompt (``toy.rewards.LatentReward``), everything below is exact over ``N`` held-out
prompts (one-token policies are softmaxes over the V process tokens). KL in nats.

Behaviour
- ``reward_pre``, ``reward_post``: exact expected rewards of the pre-RL policy pi_ref and the post-RL pi.
- Reweighting fit (true reward): ``kl_to_optimum = min_beta E_x KL(pi || pi_ref exp(r / beta) / Z)`` with the
  minimising ``beta_hat`` and the reward of that optimum. This is the KL-regularised optimum the issue
  asks for. It is reported but does NOT separate the cases on its own: it uses the true reward, which
  already knows ``c(x)``, so a policy that learned a new composition sits close to it too.
- Output-only ceiling: what a policy can earn that sees only the reference's own next-token distribution
  ``pi_ref(.|x)``: the best held-out (5-fold cross-fitted) reward of ``argmax_y E[r(x, y) | pi_ref(.|x)]``,
  with ``E[c | pi_ref]`` estimated by multinomial logistic regression and kNN classifiers on
  ``log pi_ref`` (the best of them: generous to "reweighting"; kNN neighbourhoods are a fixed share of the
  prompts, see ``output_only_reward``). ``excess_reward = reward_post -
  reward_output_only``: reward that needs information the reference's outputs do not carry.
- ``kl_to_output_reweighting``: ``E_x KL(pi || pi_ref exp(s(x) r_hat) / Z)`` with the output-only reward
  estimate ``r_hat`` and a per-prompt strength ``s(x) >= 0`` fitted exactly (moment matching); and
  ``explained_kl = 1 - kl_to_output_reweighting / KL(pi || pi_ref)``, the share of the policy's move that
  a reweighting by what the reference already predicts explains.

Representation (residual stream at the last prompt position, all sites concatenated; ridge probes,
``test_fraction`` held out)
- Probe transfer: test MSE of pre-RL factor-belief probes on pre-RL and on post-RL activations, and of
  probes refit on post-RL activations.
- New content: held-out balanced accuracy of a linear read-out (ridge onto one-hot) of the reward latent
  ``c(x)`` before and after RL -- from all sites concatenated and from the output site alone (``final_norm``,
  the unembedding's input) -- and after RL from inside the union ``U`` of the pre-RL factor-probe
  subspaces only: ``latent_share_in_factor_subspaces = (acc_U - chance) / (acc_full - chance)``.
- Where the change lives: share of ``sum ||P_U (h_post - h_pre)||^2 / sum ||h_post - h_pre||^2`` and the
  same for a random subspace of U's dimension (its mean, ``dim U / d``).

Verdict (thresholds in ``DetectorConfig``, stated in every report)
- ``inconclusive`` if ``reward_post - reward_pre < min_reward_gain`` (RL did not move the policy enough).
- ``composition`` if ``excess_reward >= excess_reward_threshold`` AND the latent's balanced accuracy at the
  output site rose by ``>= latent_gain_threshold``: the policy earns reward no function of the reference's
  outputs can, and the information it uses became linearly available to the unembedding -- new content
  where the output reads. Why the output site and not all sites (``latent_site: all`` restores that): a
  composed latent can be linear in the joint belief (XOR of two factors' bits is: 0.963 balanced accuracy
  from the exact joint belief), so a model that already holds the beliefs has it readable *somewhere*
  before RL (0.81-0.83 from all sites of the Mess3 x RRXOR model, 10,000 prompts), capping the all-sites
  gain near 0.17 even for a perfect policy; at the output site it is readable before RL only as far as the
  reference's own predictions carry it (0.72 there vs the output-only ceiling 0.69).
- ``reweighting`` if ``excess_reward < excess_reward_threshold`` AND ``explained_kl >= explained_kl_threshold``:
  the gain is within reach of the reference's own predictions and a reweighting of pi_ref by them
  accounts for most of the policy's move.
- otherwise ``inconclusive`` (the two signatures disagree).
Why these numbers: ``excess_reward_threshold = 0.05`` is > 5 standard errors of a reward mean on 2,000
prompts (SE <= 0.5 / sqrt(2000) ~ 0.011) and above the classifiers' finite-sample shortfall (<= 0.02 when
the exact predictive plays pi_ref on the reweighting family); ``latent_gain_threshold = 0.10`` of balanced
accuracy is several times the spread of a probe's held-out accuracy at this sample size;
``explained_kl_threshold = 0.5`` means "most of the move". With fewer prompts the output-only ceiling is
underestimated (same model, neighbourhoods as shares: 0.676 on 10,000 prompts, 0.685 on 20,000), which
flatters "composition": run the report on >= 10,000 prompts (the RL configs' default). Caveat: when the rewarded tokens are rare under
pi_ref, most of KL(pi || pi_ref) is the move onto them, which any reweighting explains, so ``explained_kl``
is a weak test there; the absolute ``kl_to_output_reweighting`` (nats) is reported beside it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from toy.grpo import freeze_except, policy_probs
from toy.processes import Process
from toy.representation import last_position_activations, representation_report
from toy.rewards import LatentReward


@dataclass
class DetectorConfig:
    """Thresholds and fitting choices of the composition report (the module docstring gives the reasons)."""

    min_reward_gain: float = field(
        default=0.05, metadata={"help": "Below this reward gain (post - pre) the verdict is inconclusive."}
    )
    excess_reward_threshold: float = field(
        default=0.05, metadata={"help": "Composition needs reward_post - reward_output_only >= this."}
    )
    latent_gain_threshold: float = field(
        default=0.10,
        metadata={
            "help": "Composition needs the reward latent's balanced accuracy to rise by >= this (at latent_site)."
        },
    )
    latent_site: Literal["output", "all"] = field(
        default="output",
        metadata={
            "help": "Where the verdict reads the latent: output = the unembedding's input (final_norm, last position); all = every site concatenated (reported either way)."
        },
    )
    explained_kl_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Reweighting needs the output-only reweighting to explain >= this share of KL(pi || pi_ref)."
        },
    )
    probe_alpha: float = field(default=1e-3, metadata={"help": "Ridge strength of the activation probes."})
    test_fraction: float = field(
        default=0.25, metadata={"help": "Held-out share of prompts for the activation probes."}
    )
    knn_shares: list[float] = field(
        default_factory=lambda: [0.005, 0.015, 0.05],
        metadata={
            "help": "Neighbourhoods of the kNN output-only classifiers, as shares of the training prompts (k = share x n)."
        },
    )

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction} must be in (0, 1)")
        if self.probe_alpha < 0 or not all(0 < k < 0.5 for k in self.knn_shares):
            raise ValueError("probe_alpha must be >= 0 and every knn_shares entry in (0, 0.5)")

    def thresholds(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "min_reward_gain",
                "excess_reward_threshold",
                "latent_gain_threshold",
                "latent_site",
                "explained_kl_threshold",
            )
        }


# --------------------------------------------------------------------------- behaviour (exact)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(p || q)`` in nats for ``(N, V)`` distributions (0 log 0 = 0)."""
    return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1)


def tilt(pi_ref: torch.Tensor, reward: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """``pi_ref(y|x) exp(strength * r(x, y)) / Z(x)``: ``(N, V)``, ``(N, V)``, scalar or ``(N,)`` -> ``(N, V)``."""
    s = torch.as_tensor(strength, dtype=pi_ref.dtype)
    s = s[:, None] if s.dim() == 1 else s
    logits = pi_ref.clamp_min(1e-300).log() + s * reward
    return (logits - logits.logsumexp(-1, keepdim=True)).exp()


def best_global_tilt(
    pi: torch.Tensor, pi_ref: torch.Tensor, reward: torch.Tensor, betas: torch.Tensor | None = None
) -> dict:
    """The KL-regularised optimum ``pi_ref exp(r / beta) / Z`` closest to ``pi`` over a grid of ``beta``:
    ``{"beta_hat", "kl", "reward"}`` (mean KL(pi || optimum) in nats, the optimum's expected reward)."""
    betas = torch.logspace(-3, 3, 241, dtype=torch.float64) if betas is None else betas
    kls = torch.stack([_kl(pi, tilt(pi_ref, reward, 1 / b)).mean() for b in betas])
    i = int(kls.argmin())
    q = tilt(pi_ref, reward, 1 / betas[i])
    return {"beta_hat": float(betas[i]), "kl": float(kls[i]), "reward": float((q * reward).sum(-1).mean())}


def per_prompt_tilt(pi: torch.Tensor, pi_ref: torch.Tensor, reward: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Per-prompt strength ``s(x) >= 0`` minimising ``KL(pi || tilt(pi_ref, r, s))``: ``(N,)``.

    The objective is convex in ``s`` with derivative ``E_tilt[r] - E_pi[r]`` (increasing in ``s``), so the
    optimum matches the tilted mean reward to ``pi``'s, found by bisection on ``log(1 + s)``; ``s = 0``
    when ``pi`` earns no more than ``pi_ref`` under ``r``."""
    target = (pi * reward).sum(-1)
    lo = torch.zeros(len(pi), dtype=pi.dtype)
    hi = torch.full_like(lo, math.log1p(1e4))
    for _ in range(iters):  # vectorised bisection over every prompt at once
        mid = (lo + hi) / 2
        above = (tilt(pi_ref, reward, mid.expm1()) * reward).sum(-1) > target
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return ((lo + hi) / 2).expm1()


def output_only_reward(
    pi_ref: torch.Tensor,
    latent: torch.Tensor,
    matrix: torch.Tensor,
    table: torch.Tensor,
    knn_shares=(0.005, 0.015, 0.05),
    seed: int = 0,
) -> dict:
    """What the reference's outputs know about the reward: cross-fitted ``E[c | pi_ref(.|x)]`` from classifiers
    on ``log pi_ref``, turned into ``r_hat = P(c | pi_ref) @ M`` ``(N, V)``; the best classifier's held-out reward
    of ``argmax_y r_hat``. Returns ``{"reward", "r_hat", "classifier", "by_classifier"}``.

    The kNN neighbourhoods are shares of the prompts, not fixed counts: a learned reference's outputs are an
    (almost surely injective) function of the prompt, so a kNN with a fixed k on ever more prompts resolves
    single prompts and "learns" any latent from the outputs' last digits (measured on the Mess3 x RRXOR model:
    k = 10 earns 0.64 / 0.69 / 0.72 on 2,000 / 10,000 / 20,000 prompts). A fixed share keeps the resolution
    in output space fixed, so the ceiling does not drift with the sample size."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    classes, y = torch.unique(latent, return_inverse=True)
    if len(classes) == 1:  # one latent class: the reward is a fixed function of y, known without looking
        r_hat = matrix[classes[0]].expand_as(table).clone()
        return {
            "reward": float(table.gather(1, r_hat.argmax(1, keepdim=True)).mean()),
            "r_hat": r_hat,
            "classifier": "constant",
            "by_classifier": {},
        }
    X = pi_ref.clamp_min(1e-12).log().numpy()
    n_folds = int(min(5, np.bincount(y.numpy()).min())) if np.bincount(y.numpy()).min() >= 2 else 2
    cv = StratifiedKFold(n_splits=max(2, n_folds), shuffle=True, random_state=seed)
    candidates = {"logistic": LogisticRegression(C=100.0, max_iter=5000)}
    n_fit = len(X) - len(X) // max(2, n_folds)  # prompts a fold's classifier is fitted on
    candidates |= {f"knn{share:.1%}": KNeighborsClassifier(max(1, round(share * n_fit))) for share in knn_shares}
    best, by = None, {}
    for name, clf in candidates.items():
        proba = torch.as_tensor(cross_val_predict(clf, X, y.numpy(), cv=cv, method="predict_proba"))
        r_hat = proba @ matrix[classes]
        reward = float(table.gather(1, r_hat.argmax(1, keepdim=True)).mean())
        by[name] = reward
        if best is None or reward > best["reward"]:
            best = {"reward": reward, "r_hat": r_hat, "classifier": name}
    return best | {"by_classifier": by}


def behaviour_report(
    pi_ref: torch.Tensor,
    pi: torch.Tensor,
    reward: LatentReward,
    beliefs: torch.Tensor,
    knn_shares=(0.005, 0.015, 0.05),
    seed: int = 0,
) -> dict:
    """The behavioural half of the report for one-token policies ``pi_ref``, ``pi`` ``(N, V)`` (see module docstring)."""
    table = reward.table(beliefs)
    latent = reward.latent(beliefs)
    kl_move = _kl(pi, pi_ref).mean()
    out_only = output_only_reward(pi_ref, latent, reward.matrix, table, knn_shares, seed)
    s_out = per_prompt_tilt(pi, pi_ref, out_only["r_hat"])
    kl_out = _kl(pi, tilt(pi_ref, out_only["r_hat"], s_out)).mean()
    s_true = per_prompt_tilt(pi, pi_ref, table)
    reward_pre, reward_post = float((pi_ref * table).sum(-1).mean()), float((pi * table).sum(-1).mean())
    return {
        "reward_pre": reward_pre,
        "reward_post": reward_post,
        "reward_gain": reward_post - reward_pre,
        "reward_max": float(table.max(-1).values.mean()),
        "kl_post_to_pre": float(kl_move),
        "optimum_true_reward": best_global_tilt(pi, pi_ref, table),
        "kl_to_per_prompt_true_reweighting": float(_kl(pi, tilt(pi_ref, table, s_true)).mean()),
        "reward_output_only": out_only["reward"],
        "output_only_classifier": out_only["classifier"],
        "output_only_by_classifier": out_only["by_classifier"],
        "excess_reward": reward_post - out_only["reward"],
        "kl_to_output_reweighting": float(kl_out),
        "explained_kl": float(1 - kl_out / kl_move) if kl_move > 1e-12 else float("nan"),
        "latent_balance": torch.bincount(latent, minlength=reward.matrix.shape[0]).double().div(len(latent)).tolist(),
    }


# --------------------------------------------------------------------------- verdict and report


def verdict(behaviour: dict, representation: dict, cfg: DetectorConfig) -> tuple[str, str]:
    """``("reweighting" | "composition" | "inconclusive", reason)`` from the thresholds of ``cfg``."""
    gain, excess = behaviour["reward_gain"], behaviour["excess_reward"]
    explained = behaviour["explained_kl"]
    latent_gain = representation["latent_gain_output_site" if cfg.latent_site == "output" else "latent_gain"]
    if gain < cfg.min_reward_gain:
        return (
            "inconclusive",
            f"reward gain {gain:.3f} < {cfg.min_reward_gain}: RL did not move the policy enough to judge",
        )
    if excess >= cfg.excess_reward_threshold and latent_gain >= cfg.latent_gain_threshold:
        return "composition", (
            f"excess reward {excess:.3f} >= {cfg.excess_reward_threshold} beyond what the reference's outputs "
            f"allow, and the reward latent's read-out ({cfg.latent_site} site) rose by {latent_gain:.3f} >= {cfg.latent_gain_threshold}"
        )
    if excess < cfg.excess_reward_threshold and explained >= cfg.explained_kl_threshold:
        return "reweighting", (
            f"excess reward {excess:.3f} < {cfg.excess_reward_threshold} and a reweighting by the reference's "
            f"own predictions explains {explained:.0%} >= {cfg.explained_kl_threshold:.0%} of the policy's KL move"
        )
    return "inconclusive", (
        f"signatures disagree: excess reward {excess:.3f}, latent read-out gain ({cfg.latent_site} site) {latent_gain:.3f}, "
        f"explained KL {explained:.2f}"
    )


def composition_report(
    pre_model,
    post_model,
    process: Process,
    reward: LatentReward,
    prompts: torch.Tensor,
    beliefs: torch.Tensor,
    cfg: DetectorConfig,
    seed: int = 0,
) -> dict:
    """The full report for one (pre-RL, post-RL) pair on ``prompts (N, L)`` with exact ``beliefs (N, S)``."""
    V = process.vocab_size
    behaviour = behaviour_report(
        policy_probs(pre_model, prompts, V), policy_probs(post_model, prompts, V), reward, beliefs, cfg.knn_shares, seed
    )
    representation = representation_report(
        last_position_activations(pre_model, prompts),
        last_position_activations(post_model, prompts),
        process,
        reward,
        beliefs,
        cfg.probe_alpha,
        cfg.test_fraction,
        seed,
        d_model=post_model.config.hidden_size,
    )
    v, why = verdict(behaviour, representation, cfg)
    return {
        "verdict": v,
        "reason": why,
        "behaviour": behaviour,
        "representation": representation,
        "thresholds": cfg.thresholds(),
        "reward": reward.__name__,
        "process": process.name,
        "n_prompts": len(prompts),
    }


def _report_md(r: dict) -> str:
    b, rep = r["behaviour"], r["representation"]
    opt = b["optimum_true_reward"]
    lines = [
        f"# Composition report: {r['reward']} on {r['process']}",
        "",
        f"**Verdict: {r['verdict']}** -- {r['reason']}.",
        "",
        f"Thresholds: {r['thresholds']}. {r['n_prompts']} held-out prompts; KL in nats.",
        "",
        "| behaviour | value |",
        "|---|---|",
        f"| reward pre -> post (max possible) | {b['reward_pre']:.4f} -> {b['reward_post']:.4f} ({b['reward_max']:.2f}) |",
        f"| reward of the best output-only policy ({b['output_only_classifier']}) | {b['reward_output_only']:.4f} |",
        f"| excess reward (post - output-only) | {b['excess_reward']:.4f} |",
        f"| KL(post || pre) | {b['kl_post_to_pre']:.4f} |",
        f"| KL(post || pi_ref e^(r/beta)/Z), best beta = {opt['beta_hat']:.3g} (its reward {opt['reward']:.3f}) | {opt['kl']:.4f} |",
        f"| KL(post || per-prompt reweighting by the true reward) | {b['kl_to_per_prompt_true_reweighting']:.4f} |",
        f"| KL(post || per-prompt reweighting by the output-only reward) | {b['kl_to_output_reweighting']:.4f} |",
        f"| share of KL(post || pre) explained by the output-only reweighting | {b['explained_kl']:.3f} |",
        "",
        "| representation | value |",
        "|---|---|",
        f"| reward latent, balanced accuracy pre -> post (chance {rep['latent_chance']:.2f}), all sites | "
        f"{rep['latent_accuracy']['pre']:.3f} -> {rep['latent_accuracy']['post']:.3f} |",
        f"| same, output site (the unembedding's input) | "
        f"{rep['latent_accuracy'].get('pre_output_site', float('nan')):.3f} -> {rep['latent_accuracy'].get('post_output_site', float('nan')):.3f} |",
        f"| same, read from the pre-RL factor subspaces only (dim {rep['factor_subspace_dim']} of {rep['d_total']}) | "
        f"{rep['latent_accuracy']['pre_in_factor_subspaces']:.3f} -> {rep['latent_accuracy']['post_in_factor_subspaces']:.3f} |",
        f"| share of the post-RL latent read-out inside the factor subspaces | {rep['latent_share_in_factor_subspaces']:.3f} |",
        f"| share of the activation change inside the factor subspaces (random subspace: {rep['change_share_random_subspace']:.3f}) | "
        f"{rep['change_share_in_factor_subspaces']:.3f} |",
        f"| size of the change, ||h_post - h_pre|| / ||h_pre|| | {rep['change_norm_ratio']:.3f} |",
    ]
    for t in rep["probe_transfer"]:
        lines.append(
            f"| factor {t['factor']} probe MSE: pre on pre / pre on post / refit on post | "
            f"{t['mse_pre_probe_on_pre']:.2e} / {t['mse_pre_probe_on_post']:.2e} / {t['mse_refit_on_post']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, report: dict, cfg: DetectorConfig) -> None:
    """``composition_report.json`` and ``composition_report.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composition_report.json").write_text(json.dumps(report | {"detector": asdict(cfg)}, indent=1))
    (out / "composition_report.md").write_text(_report_md(report))


# --------------------------------------------------------------------------- several seeds


def supervised_control(
    pre_model,
    process: Process,
    reward: LatentReward,
    prompts: torch.Tensor,
    beliefs: torch.Tensor,
    train_modules: list[str],
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
):
    """Control whose answer is known: a copy of ``pre_model`` fine-tuned by cross-entropy onto the reward's
    optimum ``pi_ref(y|x) 1[r(x, y) = max_y' r(x, y')] / Z`` -- the KL-regularised optimum as beta -> 0:
    ``pi_ref`` restricted to the top-reward tokens, keeping its odds among them -- training the same
    ``train_modules`` as GRPO. It earns the reward through whatever the reward needs, by construction: for a
    composition reward, the latent the reference's outputs lack (a policy known to compose); for a
    reweighting reward, a sharpening of pi_ref (known to reweight). Returns the model."""
    model = copy.deepcopy(pre_model)
    freeze_except(model, train_modules)
    table = reward.table(beliefs)
    top = (table == table.max(1, keepdim=True).values).double()
    target = policy_probs(pre_model, prompts, process.vocab_size).clamp_min(1e-12) * top
    target = (target / target.sum(1, keepdim=True)).float()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    V = process.vocab_size
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen)
        logits = model(input_ids=prompts[idx].to(device)).logits[:, -1, :V]
        loss = torch.nn.functional.cross_entropy(logits, target[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model
