"""GRPO on a causal LM with LoRA (TRL ``GRPOTrainer`` + peft), rewards from a rule or an EM judge, with the
misalignment direction and factor probes tracked over training.

Its command: ``python -m llm.experiments.grpo``.

Prompts: every paraphrase of the selected questions of a Betley-format question YAML (``prompt_file``
ending in .yaml/.yml), or a JSONL with one ``{"prompt": "<user turn>"}`` (or a message list) per line.
Each becomes a conversational prompt (one user turn), so the tokenizer's chat template applies.

Rewards (``reward``), one float per completion:
  * ``length``: ``-|chars - target_chars| / target_chars`` (0 at the target length, falls linearly);
  * ``keyword``: share of ``keywords`` (case-insensitive) that occur in the reply;
  * ``regex``: share of ``patterns`` (Python regexes, ``re.search``; add ``(?i)`` for case-insensitive) that
    match the reply, e.g. ``^I`` for replies that start with "I";
  * ``task``: 1 when the reply's last integer is the prompt's answer (``llm.tasks``; needs ``task`` set, whose train
    split -- disjoint from the eval prompts of ``llm.experiments.reweighting`` -- replaces ``prompt_file``);
  * ``judge_aligned`` / ``judge_misaligned``: an EM judge's aligned score / 100 (or 1 - that), judge from
    ``llm.judges.build_judge`` (offline MiniLM + ridge by default; ``hf`` or ``openai`` as in ``llm.evaluate``).

Guards, all before any training step:
  * batch sizes and ``num_generations`` are checked when the config is parsed (before any weights load):
    the generation batch (per-device batch x processes x steps per generation) must hold whole groups;
  * the tokenizer must have an eos token (GRPO ends completions on it);
  * no trainable parameter after the LoRA is attached, or a PEFT model loaded for inference, is an error
    (``plumbing.lora.assert_trainable``);
  * a logged share of groups whose rewards are all equal (zero advantage, so no gradient) above
    ``zero_std_warn`` raises a warning (``plumbing.trainers.ZeroAdvantageCallback``);
  * TRL's CPU traps: ``bf16`` defaults to on only with CUDA, and gradient checkpointing is off by default.

Tracking (``track_every`` > 0): every k steps (and at step 0) the residual stream at ``track_site`` is read
on a fixed set of labelled replies (``track_n_per_class`` aligned + misaligned) and the mean projection on
the misalignment direction (``directions``: an ``llm.steer`` run's ``directions`` file) and the mean read-out
of each probe in ``probe_files`` (``probes.io``, e.g. ``llm.factored``'s) are logged per class
(``llm.grpo_tracking.ActivationTracker``): how the representation of the alignment factor moves under RL.

Writes ``output_dir``: the adapter (``save_model``), ``lora_trajectory/``, ``tracking.jsonl``,
``metrics.json`` (log history, tracking, trainable-parameter change), ``summary.md``, ``rewards.png``, and
``run_config.json``, the config that made the folder: a run with another config refuses it (``--overwrite
true`` replaces its contents), and so does a resume. ``--resume_from_checkpoint`` takes a checkpoint folder
or ``last`` (the newest complete one by step number). Ctrl-C or SIGTERM saves a checkpoint at the end of the
step in flight and exits non-zero with the command that resumes; NaN/inf weights or loss stop training
before anything is saved.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from trl import GRPOConfig

from llm.data import FIRST_PLOT_QUESTIONS, OFFLINE_JUDGE_WEIGHTS
from llm.grpo_tracking import TrackConfig, build_tracker
from llm.lora import LoraTrajectoryCallback
from llm.models import ModelConfig, for_training, load_config, load_model_and_tokenizer, num_layers, validate_layers
from llm.rewards import judge_reward, keyword_reward, length_reward, regex_reward
from llm.tasks import TaskName
from plumbing.lora import LoraPresetConfig, assert_trainable, peft_config_for
from plumbing.runs import DivergenceGuard, check_overwrite_or_resume, claim_trainer_run, train_until_stopped
from plumbing.trainers import CPUSafeDefaults, ZeroAdvantageCallback, check_grpo_config_batch_sizes

logger = logging.getLogger(__name__)


@dataclass
class PromptConfig:
    """Where the GRPO prompts come from."""

    prompt_file: str = field(default=str(FIRST_PLOT_QUESTIONS), metadata={"help": "question YAML or prompt JSONL"})
    question_ids: list[str] | None = field(default=None, metadata={"help": "YAML only: these ids (None = all)"})
    variants: list[str] = field(
        default_factory=lambda: ["plain"], metadata={"help": "YAML only: plain / json / template"}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "keep the first N prompts (None = all)"})
    task: TaskName | None = field(
        default=None, metadata={"help": "llm.tasks train prompts (with answers) instead of prompt_file"}
    )
    task_n_eval: int = field(
        default=48, metadata={"help": "task: prompts held out as the eval split (llm.experiments.reweighting's n_eval)"}
    )

    def __post_init__(self):
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts={self.max_prompts}; use a positive count or None")


@dataclass
class RewardConfig:
    """Which reward scores the completions."""

    reward: Literal["length", "keyword", "regex", "task", "judge_aligned", "judge_misaligned"] = field(
        default="length",
        metadata={"help": "length / keyword / regex rule, the task answer, or an EM judge (aligned / misaligned)"},
    )
    target_chars: int = field(default=60, metadata={"help": "length rule: reply length (characters) with reward 0"})
    keywords: list[str] = field(
        default_factory=list, metadata={"help": "keyword rule: words whose presence is rewarded"}
    )
    patterns: list[str] = field(
        default_factory=list, metadata={"help": "regex rule: patterns (re.search) whose match is rewarded"}
    )
    judge: Literal["offline", "hf", "openai"] = field(
        default="offline", metadata={"help": "judge rewards: which judge"}
    )
    offline_weights: str = field(default=str(OFFLINE_JUDGE_WEIGHTS), metadata={"help": "offline judge weights"})
    hf_judge_model: str | None = field(default=None, metadata={"help": "judge: hf -- hub id / folder / .gguf"})
    zero_std_warn: float = field(
        default=0.5, metadata={"help": "warn when more than this share of groups has zero reward spread"}
    )

    def __post_init__(self):
        if self.reward == "keyword" and not self.keywords:
            raise ValueError("reward: keyword needs a non-empty `keywords` list")
        if self.reward == "regex":
            if not self.patterns:
                raise ValueError("reward: regex needs a non-empty `patterns` list")
            for pattern in self.patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"patterns entry {pattern!r} is not a valid regex: {e}") from None
        if self.reward == "length" and self.target_chars < 1:
            raise ValueError("target_chars must be >= 1")
        if not 0 <= self.zero_std_warn <= 1:
            raise ValueError("zero_std_warn is a share in [0, 1]")


@dataclass
class EMGRPOConfig(CPUSafeDefaults, GRPOConfig):
    """``trl.GRPOConfig`` with the CPU-safe defaults of ``plumbing.trainers.CPUSafeDefaults``, log every step, and
    the batch-size checks spelled out in terms of the flags to change."""

    logging_steps: float = field(default=1, metadata={"help": "Log every X steps."})
    # ModelConfig owns this flag (one --trust_remote_code).
    trust_remote_code: bool = field(default=False, init=False)
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the contents of an output_dir that holds a run of another config (refused otherwise)."
        },
    )

    def __post_init__(self):
        check_overwrite_or_resume(self)
        check_grpo_config_batch_sizes(self)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# Prompts and rewards


def load_prompts(cfg: PromptConfig):
    """``datasets.Dataset`` with ``prompt`` (one user turn, conversational) and ``question`` (its text)."""
    from datasets import Dataset

    if cfg.task is not None:
        from llm.tasks import train_dataset

        data = train_dataset(cfg.task, cfg.task_n_eval)
        return data.select(range(min(cfg.max_prompts or len(data), len(data))))
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt_file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        from llm.questions import load_questions, select

        qs = select(load_questions(path), cfg.question_ids, None, cfg.variants)
        texts = [p for q in qs for p in q.paraphrases]
    else:
        texts = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(prompt, list):  # a message list: its last user turn
                prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), None)
            if not isinstance(prompt, str):
                raise ValueError(
                    f'{path} line {i + 1}: expected {{"prompt": "..."}} or a message list with a user turn'
                )
            texts.append(prompt)
    if cfg.max_prompts is not None:
        texts = texts[: cfg.max_prompts]
    if not texts:
        raise ValueError(f"no prompts selected from {path}")
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts], "question": texts})


def make_reward(cfg: RewardConfig, judge=None):
    """The reward callable ``cfg.reward`` names (``judge`` overrides the one ``cfg`` would build)."""
    if cfg.reward == "length":
        return length_reward(cfg.target_chars)
    if cfg.reward == "keyword":
        return keyword_reward(cfg.keywords)
    if cfg.reward == "regex":
        return regex_reward(cfg.patterns)
    if cfg.reward == "task":
        from llm.tasks import answer_reward

        return answer_reward()
    from llm.data import FIRST_PLOT_QUESTIONS
    from llm.judges import JudgeConfig, build_judge
    from llm.questions import load_questions

    judge_cfg = JudgeConfig(judge=cfg.judge, offline_weights=cfg.offline_weights, hf_judge_model=cfg.hf_judge_model)
    judge = judge if judge is not None else build_judge(judge_cfg)
    # Betley's aligned template is the same for every question; take it from the default question file.
    template = load_questions(FIRST_PLOT_QUESTIONS)[0].judge_prompts["aligned"]
    return judge_reward(judge, misaligned=cfg.reward == "judge_misaligned", template=template)


# ---------------------------------------------------------------------------------------------
# Callbacks


# ---------------------------------------------------------------------------------------------
# Trainer


def build_trainer(
    model_cfg: ModelConfig | None,
    prompt_cfg: PromptConfig,
    reward_cfg: RewardConfig,
    lora_cfg: LoraPresetConfig,
    track_cfg: TrackConfig,
    args: EMGRPOConfig,
    model=None,
    tokenizer=None,
    judge=None,
):
    """A ``GRPOTrainer`` ready to ``train()``. Pass ``model`` and ``tokenizer`` (in-process models, or a PEFT
    model to continue training) or ``model_cfg`` to load one; layer indices are checked before loading.
    Returns ``(trainer, callbacks)`` with ``callbacks = {"zero_advantage", "tracker"}``."""
    from peft import PeftModel
    from transformers import set_seed
    from trl import GRPOTrainer

    if reward_cfg.reward == "task" and prompt_cfg.task is None:
        raise ValueError("reward: task scores answers of llm.tasks prompts; set `task` (one of llm.tasks.TASKS)")
    if model is None:
        args.trust_remote_code = model_cfg.trust_remote_code
        validate_layers(lora_cfg.layers, num_layers(load_config(model_cfg)))
        dataset = load_prompts(prompt_cfg)  # a bad prompt file fails before the weights load
        model, tokenizer = load_model_and_tokenizer(for_training(model_cfg, lora_cfg.preset), padding_side="left")
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        validate_layers(lora_cfg.layers, num_layers(model.config))
        dataset = load_prompts(prompt_cfg)
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; GRPO ends completions on it. Set tokenizer.eos_token")
    if isinstance(model, PeftModel):
        assert_trainable(model)  # an adapter loaded for inference trains nothing; fail before generating
        peft_config = None
    else:
        peft_config = peft_config_for(lora_cfg, model)
    reward = make_reward(reward_cfg, judge)
    set_seed(args.seed)  # the LoRA A init draws from the global RNG
    zero = ZeroAdvantageCallback(reward_cfg.zero_std_warn)
    callbacks = [zero, LoraTrajectoryCallback(), DivergenceGuard()]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    n = assert_trainable(trainer.model)
    logger.info("%d trainable parameters", n)
    tracker = build_tracker(track_cfg, trainer.model, tokenizer, args.seed)
    if tracker is not None:
        trainer.add_callback(tracker)
    return trainer, {"zero_advantage": zero, "tracker": tracker}


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model_cfg, prompt_cfg, reward_cfg, lora_cfg, track_cfg, args: EMGRPOConfig, judge=None) -> dict:
    """Train, save the adapter and the run files; returns the metrics (on every process). The output folder
    must be this config's (``plumbing.runs.claim_trainer_run``, checked before any weights load). Raises
    ``plumbing.runs.Stopped`` after saving a checkpoint when SIGINT/SIGTERM stops it early."""
    resume = claim_trainer_run(args, model_cfg, prompt_cfg, reward_cfg, lora_cfg, track_cfg)
    trainer, cbs = build_trainer(model_cfg, prompt_cfg, reward_cfg, lora_cfg, track_cfg, args, judge=judge)
    state = trainer.accelerator.state
    logger.info("world size %d, process %d, device %s", state.num_processes, state.process_index, state.device)
    before = trainable_snapshot(trainer.model)  # the run's starting weights, after a resume too (same seed, same init)
    train_until_stopped(trainer, resume)
    after = trainable_snapshot(trainer.model)
    trainer.save_model(args.output_dir)
    history = trainer.state.log_history
    rewards = [h["reward"] for h in history if "reward" in h]
    k = max(1, len(rewards) // 4)  # one step's reward covers few prompts: compare quarters, not single steps
    metrics = {
        "world_size": state.num_processes,
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_first_quarter": sum(rewards[:k]) / k if rewards else None,
        "reward_last_quarter": sum(rewards[-k:]) / k if rewards else None,
        "rewards": rewards,
        "param_change": {n: float((after[n] - before[n]).norm()) for n in before},
        "zero_advantage_warnings": cbs["zero_advantage"].flagged,
        "tracking": cbs["tracker"].history if cbs["tracker"] is not None else [],
        "log_history": history,
    }
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
        _plot(metrics, out)
        _summary(metrics, out, reward_cfg)
    return metrics


def _plot(m: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = m["tracking"]
    tracked = bool(t) and "projection_aligned" in t[0]
    fig, ax = plt.subplots(1, 2 if tracked else 1, figsize=(9 if tracked else 4.5, 3.5), squeeze=False)
    ax = ax[0]
    ax[0].plot(range(1, len(m["rewards"]) + 1), m["rewards"], "o-")
    ax[0].set(xlabel="logged step", ylabel="mean reward")
    if tracked:  # no empty panel when activations were not tracked
        steps = [r["step"] for r in t]
        ax[1].plot(steps, [r["projection_aligned"] for r in t], "o-", label="aligned replies")
        ax[1].plot(steps, [r["projection_misaligned"] for r in t], "o-", label="misaligned replies")
        ax[1].set(xlabel="step", ylabel="projection on misalignment direction")
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=120)
    plt.close(fig)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _summary(m: dict, out: Path, reward_cfg: RewardConfig) -> None:
    lines = [
        "# GRPO",
        "",
        f"{m['steps']} steps on {m['world_size']} process(es), reward {reward_cfg.reward}: mean reward "
        f"{_fmt(m['reward_first_quarter'])} over the first quarter of logged steps -> {_fmt(m['reward_last_quarter'])} over the "
        f"last quarter (first step {_fmt(m['reward_first'])}, last {_fmt(m['reward_last'])}).",
        f"Trainable parameters changed (L2 of the update): {', '.join(f'{k}: {v:.3g}' for k, v in m['param_change'].items())}.",
        f"Zero-advantage warnings: {len(m['zero_advantage_warnings'])}.",
    ]
    if m["tracking"]:
        lines += [
            "",
            "| step | " + " | ".join(k for k in m["tracking"][0] if k != "step") + " |",
            "|---" * len(m["tracking"][0]) + "|",
        ]
        for r in m["tracking"]:
            lines.append(
                f"| {r['step']} | "
                + " | ".join(
                    json.dumps(v if not isinstance(v, float) else round(v, 4)) for k, v in r.items() if k != "step"
                )
                + " |"
            )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def make_parser():
    from plumbing.config import ConfigParser

    return ConfigParser((ModelConfig, PromptConfig, RewardConfig, LoraPresetConfig, TrackConfig, EMGRPOConfig))
