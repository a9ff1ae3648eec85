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
from plumbing.trainers import ZeroAdvantageCallback, end_processes
from toy.composition import DetectorConfig, composition_report, supervised_control, write_report
from toy.experiments.rl_report import aggregate, plot_rewards, plot_seeds, run_summary, seeds_md
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
from toy.representation import rare_decodability
from toy.rewards import LatentReward, RareEmissionReward

# --------------------------------------------------------------------------- one run


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
    plot_rewards(
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
    (out / "summary.md").write_text(run_summary(metrics))
    return metrics


def _rare_metrics(reward: RareEmissionReward, pre, post, prompts, beliefs, args, process, task) -> dict:
    """Rare-token frequency before/after (sampled completions on the eval prompts) and the rare factor's
    linear decodability on each policy's own sequences (see ``toy.representation.rare_decodability``)."""
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
    plot_seeds(out / "reward_curves.png", runs)
    (out / "summary.md").write_text(
        seeds_md(
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
