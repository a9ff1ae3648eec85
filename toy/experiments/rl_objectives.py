"""Which policy-gradient objective can learn a composition? A fast lab beside ``toy.experiments.rl``'s TRL runs.

    python -m toy.experiments.rl_objectives --config configs/toy/rl_compose.yaml                 # all four objectives
    python -m toy.experiments.rl_objectives --config configs/toy/rl_compose.yaml --objectives expected log_pass --seed 1

For one-token completions the policy is a softmax over the process tokens at the prompt's last position, so
one forward pass per prompt gives every completion's log-probability: no generation, no reference copy of
each prompt per completion. That makes a 1000-step run ~1 minute on one CPU thread (TRL: 4-10), which is
what it takes to ask *why* a TRL recipe stalls. Same model, prompts, trainable parameters
(``train_modules``), optimiser (AdamW, linear decay), prompts per step (``per_device_train_batch_size /
num_generations``) and KL estimator as ``toy.experiments.rl``; the objectives:

- ``expected``: the exact expected reward ``E_x sum_y pi(y|x) r(x, y)`` -- the population objective of
  REINFORCE and GRPO, without sampling noise. Its gradient on a prompt is ``sum_y pi(y) (r - E r) grad
  log pi(y)``, which vanishes as the policy grows confident, right *or wrong*.
- ``log_pass``: the exact ``E_x log sum_y pi(y|x) r(x, y)`` (maximum likelihood of success): the same
  gradient divided by the prompt's pass rate ``p``, so confidently wrong prompts keep theirs.
- ``grpo``: ``num_generations`` sampled completions per prompt, advantage ``(r - mean) / (std + 1e-4)`` per
  group (TRL's default), loss averaged over completions (TRL's ``dapo`` for one-token completions), plus
  ``beta`` times TRL's k3 KL estimate to the pre-RL policy.
- ``maxrl``: as ``grpo`` with advantage ``(r - mean) / mean`` (``toy.grpo.maxrl_advantages``), an estimator of
  the ``log_pass`` gradient (MaxRL: "Maximum Likelihood Reinforcement Learning", arXiv:2602.02710).

Measured on the Mess3 x RRXOR XOR reward (configs/toy/rl_compose.yaml's settings: 1000 steps, 64 prompts x 4
completions, lr 1e-3, beta 0.04, last block + head; seeds 0 / 1 / 2; output-only ceiling 0.68): ``expected`` 0.744 /
0.769 / 0.732, ``grpo`` 0.725 / 0.728 / 0.722 (TRL's GRPO on the same settings: 0.767 / 0.821 / 0.752), ``maxrl``
0.847 / 0.819 / 0.857 (TRL: 0.844 / 0.885 / 0.907), ``log_pass`` 0.902 / 0.918 / 0.912. The exact expected-reward
gradient, with no sampling at all, stalls where GRPO does: the stall is the objective's, not the sampler's.
Writes ``objectives.json`` and ``objectives.png`` to ``output_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plumbing.config import ConfigParser
from plumbing.runs import claim_output_dir, config_record, refuse_multiprocess
from toy.grpo import (
    GRPO_RERUN_KEYS,
    RLTaskConfig,
    ToyGRPOConfig,
    build_reward,
    freeze_except,
    maxrl_advantages,
    policy_probs,
    pretrained_model,
    task_prompts,
)
from toy.rewards import LatentReward

OBJECTIVES = ("expected", "log_pass", "grpo", "maxrl")


@dataclass
class ObjectivesConfig:
    objectives: list[str] = field(
        default_factory=lambda: list(OBJECTIVES), metadata={"help": f"Any of {list(OBJECTIVES)}."}
    )
    eval_every: int = field(default=100, metadata={"help": "Steps between exact expected rewards on the eval prompts."})

    def __post_init__(self):
        unknown = sorted(set(self.objectives) - set(OBJECTIVES))
        if unknown or not self.objectives:
            raise ValueError(f"objectives={self.objectives}: use one or more of {list(OBJECTIVES)}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")


def objective_loss(
    name: str,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    table: torch.Tensor,
    G: int,
    beta: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Loss of one step on ``P`` prompts: ``logits``, ``ref_logits`` ``(P, V)``, exact rewards ``table`` ``(P, V)``.
    Returns the loss and, for sampled objectives, the share of groups with all-equal rewards (else nan)."""
    logp = logits.log_softmax(-1)
    if name == "expected":
        return -(logp.exp() * table).sum(1).mean(), float("nan")
    if name == "log_pass":
        return -(logp.exp() * table).sum(1).clamp_min(1e-12).log().mean(), float("nan")
    y = torch.multinomial(logp.detach().exp(), G, replacement=True, generator=generator)  # (P, G)
    r = table.gather(1, y)
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
    adv = (r - mean) / (std + 1e-4) if name == "grpo" else maxrl_advantages(r - mean, mean.expand_as(r))
    lp = logp.gather(1, y)
    ref = ref_logits.log_softmax(-1).gather(1, y)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    loss = (-adv * torch.exp(lp - lp.detach()) + beta * k3).mean()
    return loss, float((std == 0).float().mean())


def train_objective(
    name: str,
    pre_model,
    prompts: torch.Tensor,
    table: torch.Tensor,
    eval_prompts: torch.Tensor,
    eval_table: torch.Tensor,
    args: ToyGRPOConfig,
    train_modules: list[str],
    eval_every: int,
) -> dict:
    """One run of objective ``name`` from ``pre_model``; ``{"curve": [(step, exact reward)], "zero_advantage", "seconds"}``."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(pre_model)
    freeze_except(model, train_modules)
    ref = pre_model.eval()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.max_steps)
    gen = torch.Generator().manual_seed(args.seed)
    V, G = table.shape[1], args.num_generations
    P = max(1, args.per_device_train_batch_size // G)
    curve, zero, t0 = [], [], time.perf_counter()

    def record(step):
        curve.append((step, float((policy_probs(model, eval_prompts, V) * eval_table).sum(1).mean())))

    record(0)
    for step in range(1, args.max_steps + 1):
        idx = torch.randint(len(prompts), (P,), generator=gen)
        model.train()
        logits = model(input_ids=prompts[idx]).logits[:, -1, :V]
        with torch.no_grad():
            ref_logits = ref(input_ids=prompts[idx]).logits[:, -1, :V]
        loss, z = objective_loss(name, logits, ref_logits, table[idx], G, args.beta, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        zero.append(z)
        if step % eval_every == 0 or step == args.max_steps:
            record(step)
    zs = [z for z in zero if z == z]
    return {"curve": curve, "zero_advantage": sum(zs) / len(zs) if zs else None, "seconds": time.perf_counter() - t0}


def _plot(path: Path, results: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        steps, rewards = zip(*r["curve"])
        ax.plot(steps, rewards, label=name)
    ax.set(xlabel="step", ylabel="exact expected reward (eval prompts)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_parser() -> ConfigParser:
    return ConfigParser((RLTaskConfig, ToyGRPOConfig, ObjectivesConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess("toy.experiments.rl_objectives", "it trains the objectives one after another in one process")
    torch.set_num_threads(int(os.environ.get("TOY_RL_THREADS", torch.get_num_threads())))
    task, args, which = make_parser().parse_args_and_config(argv)
    out = claim_output_dir(
        args.output_dir, config_record(task, which, args), overwrite=args.overwrite, ignore=GRPO_RERUN_KEYS
    )
    process = task.build_process()
    reward = build_reward(task, process)
    if not isinstance(reward, LatentReward):
        raise ValueError("toy.experiments.rl_objectives needs a one-token latent reward (reward: reweight or compose)")
    pre_model, pre_path = pretrained_model(task, process, args.seed)
    prompts, beliefs = task_prompts(task, process, task.n_train_prompts, task.prompt_seed)
    eval_prompts, eval_beliefs = task_prompts(task, process, task.n_curve_prompts, task.prompt_seed + 1)
    table, eval_table = reward.table(beliefs).float(), reward.table(eval_beliefs)
    results = {}
    for name in which.objectives:
        results[name] = train_objective(
            name, pre_model, prompts, table, eval_prompts, eval_table, args, task.train_modules, which.eval_every
        )
        print(
            f"{name}: exact reward {results[name]['curve'][0][1]:.3f} -> {results[name]['curve'][-1][1]:.3f} "
            f"({results[name]['seconds']:.0f} s)",
            flush=True,
        )
    summary = {
        "reward": reward.__name__,
        "process": process.name,
        "pretrained_path": str(pre_path),
        "steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "num_generations": args.num_generations,
        "prompts_per_step": max(1, args.per_device_train_batch_size // args.num_generations),
        "seed": args.seed,
        "results": results,
    }
    (out / "objectives.json").write_text(json.dumps(summary, indent=1))
    _plot(out / "objectives.png", results, f"{reward.__name__} ({process.name})")
    return summary


if __name__ == "__main__":
    main()
