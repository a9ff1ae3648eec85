"""GRPO post-training of a pre-trained toy GPT-2 with exact-belief rewards, and the composition report on it.

    python -m toy.experiments.rl --config configs/toy/rl_reweight.yaml      # (a) sharpen one factor's prediction
    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml       # (b) XOR of two factors' latent states
    python -m toy.experiments.rl --config configs/toy/rl_gates.yaml         # (c) IMPLIES of the NOT and AND gates' bits
    python -m toy.experiments.rl --config configs/toy/rl_rare.yaml          # reach the rare factor
    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml --seed 1 --max_steps 100 --output_dir runs/x
    # N seeds of pre-train -> GRPO -> report, then the verdicts and 95% CIs over seeds (+ a supervised control each):
    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml --seeds 0 1 2 --supervised_control true
    # the report on one given (pre-RL, post-RL) pair; the config supplies the process and the reward:
    python -m toy.experiments.rl --config configs/toy/rl_compose.yaml --pre runs/toy_rl/pretrain/seed0/checkpoint-3000 \
        --post runs/toy_rl/compose/seed0/model --output_dir runs/toy_rl/compose/report_seed0

    # one GPU (or several: DDP; the completions per step are per_device_train_batch_size x processes):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.rl --config configs/toy/rl_compose.yaml
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m toy.experiments.rl --config ... --use_cpu true
    # --seeds and --pre/--post run as one process (a multi-process launch of them is refused before any work)

Ctrl-C or SIGTERM finishes the GRPO step in flight, saves it as ``<output_dir>/checkpoint-<step>`` beside the
pre-RL model and exits 130 / 143; ``--resume_from_checkpoint last`` continues from there. The output folder
records its config (``plumbing.runs.claim_trainer_run``): another config refuses unless ``--overwrite true``.

One run = (1) a pre-trained model: ``pretrained_path``, or else pre-training with ``toy.train`` from
``pretrain_config`` (cached in ``pretrain_dir/seed<seed>``; see ``toy.grpo.pretrained_model``); (2) GRPO through
``toy.grpo.ToyGRPOTrainer`` on prompts sampled from the process (``prompt_length`` tokens written as the words
``"0" .. "V-1"``), with the prompt's exact belief in the dataset column ``belief`` that the reward callables
read; (3) for latent-class rewards, ``toy.composition``'s report on the (pre, post) pair. The RL configs use
MaxRL advantages (``advantage: maxrl``): with TRL's std-scaled ones the XOR reward (b) stalls below the
composition (0.70-0.82 over 6 runs; ``toy.experiments.rl_objectives`` compares the objectives exactly).

Writes to ``output_dir``: ``model/`` (post-RL model + tokenizer; load the tokenizer with
``PreTrainedTokenizerFast.from_pretrained``, never ``AutoTokenizer``), ``metrics.json``,
``reward_curve.png``, ``summary.md`` (and the report's files, see ``toy.composition``). With ``--seeds``: one
such folder per seed (``seed<s>/``, with ``control/`` under ``--supervised_control``) and ``metrics.json``,
``summary.md``, ``reward_curves.png`` over the seeds.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from plumbing.config import ConfigParser
from plumbing.lora import assert_trainable
from plumbing.runs import (
    DivergenceGuard,
    Stopped,
    claim_output_dir,
    claim_trainer_run,
    config_record,
    refuse_multiprocess,
    train_until_stopped,
    world_size,
)
from plumbing.stats import mean_ci
from plumbing.trainers import ZeroAdvantageCallback, end_processes
from toy.composition import DetectorConfig, composition_report, rare_decodability, supervised_control, write_report
from toy.grpo import (
    GRPO_RERUN_KEYS,
    ExactRewardCallback,
    RLTaskConfig,
    ToyGRPOConfig,
    ToyGRPOTrainer,
    build_reward,
    freeze_except,
    policy_probs,
    pretrained_model,
    sample_completions,
    task_prompts,
    tokens_to_text,
    word_tokenizer,
)
from toy.rewards import LatentReward, RareEmissionReward

# --------------------------------------------------------------------------- one run


def _plot_rewards(
    path: Path, log_history: list[dict], exact: list[tuple[int, float]], zero: list[tuple[int, float]], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in log_history if "reward" in h]
    rewards = [h["reward"] for h in log_history if "reward" in h]
    if rewards:
        w = max(1, len(rewards) // 30)
        smooth = [
            sum(rewards[max(0, i - w + 1) : i + 1]) / len(rewards[max(0, i - w + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(steps, rewards, color="0.8", lw=0.8, label="sampled (per step)")
        ax.plot(steps, smooth, color="C0", label=f"sampled ({w}-step mean)")
    if exact:
        ax.plot(*zip(*exact), "o-", color="C3", ms=3, label="exact, eval prompts")
    ax.set(xlabel="GRPO step", ylabel="reward", title=title)
    ax.legend(fontsize=8)
    if zero:
        ax2.plot(*zip(*zero), color="C2")
    ax2.set(xlabel="GRPO step", ylabel="share of groups", title="zero-advantage groups", ylim=(-0.02, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(task: RLTaskConfig, args: ToyGRPOConfig, detector=None) -> dict:
    """Pre-trained model -> GRPO -> (report); returns the metrics written to ``<output_dir>/metrics.json``."""
    from datasets import Dataset

    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    resume = claim_trainer_run(args, task, detector or DetectorConfig(), rerun_keys=GRPO_RERUN_KEYS)
    process = task.build_process()
    reward = build_reward(task, process)
    V = process.vocab_size
    tok = word_tokenizer(V)
    pre_model, pre_path = pretrained_model(task, process, args.seed)
    if pre_model.config.vocab_size < V + 2:
        raise ValueError(
            f"the pre-trained model's vocab ({pre_model.config.vocab_size}) has no room for <eos> and <pad> after the "
            f"{V} process tokens; pre-train with vocab_size = V + 2 (toy.grpo.pretrained_model does)"
        )
    if task.prompt_length + (args.max_completion_length or 0) > pre_model.config.n_positions:
        raise ValueError(
            f"prompt_length {task.prompt_length} + max_completion_length {args.max_completion_length} exceeds the "
            f"model's context ({pre_model.config.n_positions}); shorten the prompts or pre-train with a longer context_length"
        )
    one_token_latent = isinstance(reward, LatentReward) and args.max_completion_length == 1
    if isinstance(reward, LatentReward) and not one_token_latent:
        raise ValueError("latent-class rewards score the first token only: use max_completion_length: 1")
    if args.generation_kwargs is None:
        args.generation_kwargs = {"suppress_tokens": [tok.eos_token_id, tok.pad_token_id]}
    model = GPT2LMHeadModel.from_pretrained(pre_path)  # the policy; pre_model stays the frozen pre-RL copy
    freeze_except(model, task.train_modules)
    n_trainable = assert_trainable(model)

    train_prompts, train_beliefs = task_prompts(task, process, task.n_train_prompts, task.prompt_seed)
    eval_prompts, eval_beliefs = task_prompts(task, process, task.n_eval_prompts, task.prompt_seed + 1)
    dataset = Dataset.from_dict({"prompt": tokens_to_text(train_prompts), "belief": train_beliefs.tolist()})

    zero_cb = ZeroAdvantageCallback(task.zero_std_warn)
    callbacks = [zero_cb, DivergenceGuard()]  # a NaN policy stops before any checkpoint of it is saved
    exact_cb = None
    if one_token_latent:
        n = min(task.n_curve_prompts, len(eval_prompts))
        exact_cb = ExactRewardCallback(
            eval_prompts[:n],
            reward.table(eval_beliefs[:n]),
            task.exact_eval_every,
            path=out / "exact_reward_curve.jsonl",
        )
        callbacks.append(exact_cb)
    trainer = ToyGRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tok, callbacks=callbacks
    )
    t0 = time.perf_counter()
    try:
        train_until_stopped(trainer, resume)
    except Stopped as stop:
        if trainer.is_world_process_zero():
            print(
                f"GRPO stopped by {stop.signal_name} at step {trainer.state.global_step}: the pre-RL model is in {pre_path}, "
                f"the partial policy (a resumable checkpoint) in {stop.checkpoint}; rerun the same command with "
                "--resume_from_checkpoint last to continue",
                file=sys.stderr,
            )
        raise
    train_s = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return {}  # the model, the report and the files are the main process's
    post = trainer.model
    post.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")

    metrics = {
        "task": asdict(task),
        "grpo": {
            k: getattr(args, k)
            for k in (
                "learning_rate",
                "beta",
                "num_generations",
                "per_device_train_batch_size",
                "max_completion_length",
                "max_steps",
                "temperature",
                "loss_type",
                "scale_rewards",
                "advantage",
                "seed",
                "lr_scheduler_type",
                "logging_steps",
                "num_iterations",
                "steps_per_generation",
                "one_token_path",
            )
        },
        "torch_threads": torch.get_num_threads(),
        "process": process.name,
        "reward_name": reward.__name__,
        "pretrained_path": str(pre_path),
        "post_path": str(out / "model"),
        "n_trainable_parameters": n_trainable,
        "train_seconds": train_s,
        "zero_advantage": zero_cb.summary(),
        "log_history": trainer.state.log_history,
    }
    sampled = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    k = max(1, min(20, len(sampled) // 5))
    metrics["sampled_reward_first_steps"] = sum(sampled[:k]) / k if sampled else float("nan")
    metrics["sampled_reward_last_steps"] = sum(sampled[-k:]) / k if sampled else float("nan")
    if exact_cb is not None:
        metrics["exact_reward_curve"] = exact_cb.history  # on the first n_curve_prompts eval prompts
        metrics["exact_reward_seconds"] = exact_cb.seconds  # training seconds at each point, evaluations excluded
    else:
        metrics.update(_rare_metrics(reward, pre_model, post, eval_prompts, eval_beliefs, args, process, task))
    _plot_rewards(
        out / "reward_curve.png",
        trainer.state.log_history,
        exact_cb.history if exact_cb else [],
        zero_cb.history,
        f"{reward.__name__} ({process.name})",
    )

    if one_token_latent and task.report:
        detector = detector or DetectorConfig()
        report = composition_report(
            pre_model, post, process, reward, eval_prompts, eval_beliefs, detector, seed=args.seed
        )
        write_report(out, report, detector)
        metrics["report"] = report
        # the report's exact rewards are on every eval prompt: the same numbers, not computed twice
        metrics["reward_before"], metrics["reward_after"] = (
            report["behaviour"]["reward_pre"],
            report["behaviour"]["reward_post"],
        )
    elif one_token_latent:
        table = reward.table(eval_beliefs)
        metrics["reward_before"], metrics["reward_after"] = (
            float((policy_probs(m, eval_prompts, V) * table).sum(1).mean()) for m in (pre_model, post)
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    (out / "summary.md").write_text(_summary(metrics))
    return metrics


def _rare_metrics(reward: RareEmissionReward, pre, post, prompts, beliefs, args, process, task) -> dict:
    """Rare-token frequency before/after (sampled completions on the eval prompts) and the rare factor's
    linear decodability on each policy's own sequences (see ``toy.composition.rare_decodability``)."""
    out = {}
    for name, model in (("before", pre), ("after", post)):
        comp = sample_completions(model, prompts, process.vocab_size, args.max_completion_length, seed=args.seed)
        out[f"rare_token_frequency_{name}"] = float(reward.is_rare[comp].double().mean())
        out[f"valid_completion_share_{name}"] = float(reward.valid(beliefs, comp).double().mean())
        out[f"reward_{name}"] = float(reward.score(beliefs, comp).mean())
        out[f"rare_decodability_{name}"] = rare_decodability(
            model,
            process,
            torch.cat([prompts, comp], 1),
            task.prompt_length,
            reward.valid(beliefs, comp),
            seed=args.seed,
        )
    out["rare_token_frequency_process"] = float(reward.is_rare.double() @ (process.stationary @ process.T.sum(-1).T))
    return out


def _summary(m: dict) -> str:
    lines = [
        f"# GRPO: {m['reward_name']} on {m['process']}",
        "",
        f"- pre-trained model: `{m['pretrained_path']}`; post-RL model: `{m['post_path']}`",
        f"- {m['grpo']['max_steps']} steps, lr {m['grpo']['learning_rate']}, beta {m['grpo']['beta']}, "
        f"{m['grpo']['num_generations']} completions per prompt, {m['grpo']['per_device_train_batch_size']} completions per step; "
        f"{m['train_seconds']:.0f} s of training",
        f"- reward (exact, eval prompts): {m.get('reward_before', float('nan')):.4f} before -> {m.get('reward_after', float('nan')):.4f} after"
        if "reward_before" in m and "rare_token_frequency_before" not in m
        else f"- reward (sampled completions, eval prompts): {m['reward_before']:.4f} before -> {m['reward_after']:.4f} after",
        f"- sampled training reward: {m['sampled_reward_first_steps']:.4f} (first steps) -> {m['sampled_reward_last_steps']:.4f} (last steps)",
        f"- zero-advantage groups: mean {m['zero_advantage']['mean']:.1%}, max {m['zero_advantage']['max']:.1%} "
        f"(warning threshold {m['zero_advantage']['threshold']:.0%})",
        "",
        "![reward curve](reward_curve.png)",
    ]
    if "rare_token_frequency_before" in m:
        lines += [
            "",
            "## Rare capability",
            f"- rare-emission frequency per completion token: {m['rare_token_frequency_before']:.4f} before -> "
            f"{m['rare_token_frequency_after']:.4f} after (the process itself: {m['rare_token_frequency_process']:.4f}); "
            f"completions the process can produce: {m['valid_completion_share_before']:.1%} before -> {m['valid_completion_share_after']:.1%} after",
            f"- rare factor belief, held-out R^2 of a linear probe on the policy's own sequences: "
            f"{m['rare_decodability_before']['r2']:.3f} before -> {m['rare_decodability_after']['r2']:.3f} after",
        ]
    if "report" in m:
        lines += ["", "See `composition_report.md` for the composition report of this (pre, post) pair."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- several seeds


SUMMARY_KEYS = {
    "reward_pre": ("behaviour", "reward_pre"),
    "reward_post": ("behaviour", "reward_post"),
    "reward_output_only": ("behaviour", "reward_output_only"),
    "excess_reward": ("behaviour", "excess_reward"),
    "kl_post_to_pre": ("behaviour", "kl_post_to_pre"),
    "kl_to_true_optimum": ("behaviour", "optimum_true_reward", "kl"),
    "kl_to_output_reweighting": ("behaviour", "kl_to_output_reweighting"),
    "explained_kl": ("behaviour", "explained_kl"),
    "latent_acc_pre": ("representation", "latent_accuracy", "pre"),
    "latent_acc_post": ("representation", "latent_accuracy", "post"),
    "latent_gain": ("representation", "latent_gain"),
    "latent_acc_output_site_pre": ("representation", "latent_accuracy", "pre_output_site"),
    "latent_acc_output_site_post": ("representation", "latent_accuracy", "post_output_site"),
    "latent_gain_output_site": ("representation", "latent_gain_output_site"),
    "latent_share_in_factor_subspaces": ("representation", "latent_share_in_factor_subspaces"),
    "change_share_in_factor_subspaces": ("representation", "change_share_in_factor_subspaces"),
    "change_share_random_subspace": ("representation", "change_share_random_subspace"),
}


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


def aggregate(reports: list[dict]) -> dict:
    """Verdict counts and mean/95% CI of the headline numbers over seeds."""
    verdicts = [r["verdict"] for r in reports]
    return {
        "verdicts": verdicts,
        "verdict_counts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
        "stats": {k: mean_ci([float(_get(r, p)) for r in reports]) for k, p in SUMMARY_KEYS.items()},
        "transfer_mse": {
            key: mean_ci(
                [
                    sum(t[key] for t in r["representation"]["probe_transfer"])
                    / len(r["representation"]["probe_transfer"])
                    for r in reports
                ]
            )
            for key in ("mse_pre_probe_on_pre", "mse_pre_probe_on_post", "mse_refit_on_post")
        },
    }


def _plot_seeds(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, m in enumerate(runs):
        if "exact_reward_curve" in m:
            ax.plot(*zip(*m["exact_reward_curve"]), "o-", ms=2, color=f"C{i}", label=f"seed {m['grpo']['seed']}")
        if "report" in m:
            ax.axhline(m["report"]["behaviour"]["reward_output_only"], color=f"C{i}", ls=":", lw=1)
    ax.set(
        xlabel="GRPO step",
        ylabel="exact expected reward (eval prompts)",
        title=f"{runs[0]['reward_name']}\n(dotted: output-only ceiling)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seeds_table(agg: dict, runs: list[dict], cfg: DetectorConfig, report_key: str = "report") -> list[str]:
    """Verdicts, mean / CI of the headline numbers and one row per seed, for the reports under ``report_key``."""
    lines = [
        f"Verdicts: {agg['verdicts']} ({agg['verdict_counts']}). Thresholds: {cfg.thresholds()}.",
        "",
        "| quantity | mean | 95% CI (t, over seeds) |",
        "|---|---|---|",
    ]
    for k, s in agg["stats"].items():
        lines.append(f"| {k} | {s['mean']:.4f} | [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}] |")
    for k, s in agg["transfer_mse"].items():
        lines.append(f"| factor-probe {k} | {s['mean']:.2e} | [{s['ci'][0]:.2e}, {s['ci'][1]:.2e}] |")
    lines += ["", "| seed | reward pre -> post | output-only | verdict | reason |", "|---|---|---|---|---|"]
    for m in runs:
        r = m[report_key]
        lines.append(
            f"| {m['grpo']['seed']} | {r['behaviour']['reward_pre']:.3f} -> {r['behaviour']['reward_post']:.3f} | "
            f"{r['behaviour']['reward_output_only']:.3f} | {r['verdict']} | {r['reason']} |"
        )
    return lines


def _seeds_md(
    name: str, agg: dict, runs: list[dict], cfg: DetectorConfig, commands: str, control_steps: int | None = None
) -> str:
    lines = [f"# Composition detector over {len(runs)} seeds: {name}", "", f"Command: `{commands}`", ""]
    lines += _seeds_table(agg, runs, cfg) + ["", "![reward curves](reward_curves.png)"]
    if control_steps is not None:
        lines += [
            "",
            f"## Supervised control ({control_steps} cross-entropy steps onto pi_ref restricted to the "
            "top-reward tokens, same trainable parameters)",
            "",
        ]
        lines += _seeds_table(agg["control"], runs, cfg, report_key="control_report")
    return "\n".join(lines) + "\n"


@dataclass
class SeedsConfig:
    """One run, several seeds end to end, or a report on a given (pre, post) pair."""

    seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Seeds of pre-train -> GRPO -> report into <output_dir>/seed<s>, aggregated over seeds; "
            "empty: one run at --seed into output_dir."
        },
    )
    pre: str | None = field(
        default=None, metadata={"help": "Pre-RL model folder (with --post: report on this pair only)."}
    )
    post: str | None = field(default=None, metadata={"help": "Post-RL model folder."})
    supervised_control: bool = field(
        default=False,
        metadata={
            "help": "Per seed, also report on a supervised control whose answer is known (see supervised_control)."
        },
    )
    control_steps: int = field(default=1000, metadata={"help": "Fine-tuning steps of the supervised control."})

    def __post_init__(self):
        if (self.pre is None) != (self.post is None):
            raise ValueError("give both --pre and --post, or neither (then --seeds runs end to end)")
        if self.supervised_control and not self.seeds:
            raise ValueError("supervised_control runs per seed: give --seeds too")


def _control(task, args, cfg: DetectorConfig, pretrained_path: str, steps: int) -> dict:
    """Train the supervised control for one seed and write its report to ``<output_dir>/control``."""
    process = task.build_process()
    reward = build_reward(task, process)
    pre = GPT2LMHeadModel.from_pretrained(pretrained_path)
    train_prompts, train_beliefs = task_prompts(task, process, task.n_train_prompts, task.prompt_seed)
    control = supervised_control(
        pre, process, reward, train_prompts, train_beliefs, task.train_modules, steps=steps, seed=args.seed
    )
    prompts, beliefs = task_prompts(task, process, task.n_eval_prompts, task.prompt_seed + 1)
    report = composition_report(pre, control, process, reward, prompts, beliefs, cfg, seed=args.seed)
    write_report(Path(args.output_dir) / "control", report, cfg)
    return report


def make_parser() -> ConfigParser:
    return ConfigParser((RLTaskConfig, ToyGRPOConfig, DetectorConfig, SeedsConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    if world_size() > 1:
        # before the full parse: ToyGRPOConfig joins the process group, already work for a mode that runs alone
        mode = ConfigParser((SeedsConfig,)).parse_args_and_config(
            argv, return_remaining_strings=True, fail_with_unknown_args=False
        )[0]
        if mode.pre is not None or mode.seeds:
            refuse_multiprocess(
                "toy.experiments.rl --seeds / --pre --post",
                "one GRPO run (no --seeds) trains under DDP: launch "
                "one per seed with --seed S --output_dir <dir>/seedS",
            )
    torch.set_num_threads(int(os.environ.get("TOY_RL_THREADS", torch.get_num_threads())))
    task, args, cfg, which = make_parser().parse_args_and_config(argv)
    if which.pre is not None:
        return _report_pair(task, args, cfg, which)
    if not which.seeds:
        try:
            metrics = run(task, args, cfg)
        except Stopped as stop:
            sys.exit(stop.exit_code)
        end_processes()
        if not metrics:  # not the main process
            return metrics
        line = f"{metrics['reward_name']}: reward {metrics.get('reward_before', float('nan')):.4f} -> {metrics.get('reward_after', float('nan')):.4f}"
        if "report" in metrics:
            line += f"; verdict {metrics['report']['verdict']}"
        if "rare_token_frequency_before" in metrics:
            line += f"; rare-token frequency {metrics['rare_token_frequency_before']:.4f} -> {metrics['rare_token_frequency_after']:.4f}"
        print(line + f" ({args.output_dir})")
        return metrics
    out = claim_output_dir(
        args.output_dir, config_record(task, cfg, which, args), overwrite=args.overwrite, ignore=GRPO_RERUN_KEYS
    )
    runs = []
    for seed in which.seeds:
        seed_args = copy.deepcopy(args)
        seed_args.seed, seed_args.output_dir = seed, str(out / f"seed{seed}")
        try:
            m = run(task, seed_args, cfg)
        except Stopped as stop:
            print(
                f"rerun with --resume_from_checkpoint last: seeds already done are redone, seed {seed} resumes",
                file=sys.stderr,
            )
            sys.exit(stop.exit_code)
        print(
            f"seed {seed}: reward {m['reward_before']:.4f} -> {m['reward_after']:.4f}, verdict {m['report']['verdict']}"
        )
        if which.supervised_control:
            m["control_report"] = _control(task, seed_args, cfg, m["pretrained_path"], which.control_steps)
            print(f"seed {seed}: supervised control verdict {m['control_report']['verdict']}")
        runs.append(m)
    agg = aggregate([m["report"] for m in runs])
    if which.supervised_control:
        agg["control"] = aggregate([m["control_report"] for m in runs])
    command = "python -m toy.experiments.rl " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "aggregate": agg,
                "detector": asdict(cfg),
                "seeds": which.seeds,
                "per_seed_metrics": [str(out / f"seed{s}" / "metrics.json") for s in which.seeds],
            },
            indent=1,
        )
    )
    _plot_seeds(out / "reward_curves.png", runs)
    (out / "summary.md").write_text(
        _seeds_md(
            runs[0]["reward_name"], agg, runs, cfg, command, which.control_steps if which.supervised_control else None
        )
    )
    print(
        f"verdicts {agg['verdicts']}; excess reward {agg['stats']['excess_reward']['mean']:.3f} "
        f"{[round(c, 3) for c in agg['stats']['excess_reward']['ci']]}; summary in {out / 'summary.md'}"
    )
    return agg


def _report_pair(task: RLTaskConfig, args: ToyGRPOConfig, cfg: DetectorConfig, which: SeedsConfig) -> dict:
    """The composition report on the given (pre, post) pair, written to ``output_dir``."""
    process = task.build_process()
    reward = build_reward(task, process)
    if not isinstance(reward, LatentReward):
        raise ValueError("the composition report needs a latent-class reward (reward: reweight or compose)")
    claim_output_dir(
        args.output_dir,
        config_record(task, cfg, which, {"ToyGRPOConfig": {"seed": args.seed}}),
        overwrite=args.overwrite,
    )
    prompts, beliefs = task_prompts(task, process, task.n_eval_prompts, task.prompt_seed + 1)
    report = composition_report(
        GPT2LMHeadModel.from_pretrained(which.pre),
        GPT2LMHeadModel.from_pretrained(which.post),
        process,
        reward,
        prompts,
        beliefs,
        cfg,
        seed=args.seed,
    )
    write_report(args.output_dir, report, cfg)
    print(f"{report['reward']}: verdict {report['verdict']} -- {report['reason']} ({args.output_dir})")
    return report


if __name__ == "__main__":
    main()
