"""Emergent-misalignment fine-tuning: TRL ``SFTTrainer`` on chat JSONL, loss on assistant tokens only.

Its command: ``python -m llm.experiments.sft``.

The data file holds one ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` per
line. Loss is on assistant tokens only: through ``assistant_only_loss`` when the chat template has
(or TRL can supply) ``{% generation %}`` markers, otherwise by converting each example to
prompt (all turns before the last assistant turn) / completion (that turn) and using
``completion_only_loss``. Unknown config keys are an error. Layer indices are checked against the
model's depth before any weights load. The output folder holds the adapter (or full model) as
safetensors, HF ``checkpoint-*`` folders for ``--resume_from_checkpoint`` (a path, or ``last``: the
newest complete one by step number), ``lora_trajectory/`` with A/B at every logging step (see
``llm.lora.lora_trajectory_report``), and ``run_config.json``: the config that made the folder. A run with
another config refuses the folder (``--overwrite true`` replaces its contents), and so does a resume.
Ctrl-C or SIGTERM saves a checkpoint at the end of the step in flight and exits non-zero with the command
that resumes; a NaN/inf or runaway loss stops training before it is saved (``max_loss_ratio``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trl import SFTConfig

from llm.lora import LoraTrajectoryCallback, lora_trajectory_report, plot_lora_trajectory
from llm.models import ModelConfig, for_training, load_config, load_model_and_tokenizer, num_layers, validate_layers
from plumbing.lora import LoraPresetConfig, assert_trainable, peft_config_for
from plumbing.runs import DivergenceGuard, check_overwrite_or_resume, claim_trainer_run, train_until_stopped
from plumbing.trainers import CPUSafeDefaults

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which chat examples to train on."""

    dataset_path: str = field(
        default=None,
        metadata={"help": 'Chat JSONL, one {"messages": [...]} per line (e.g. llm/data/em/insecure_code.jsonl).'},
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Train on this many examples, drawn at random (None: all)."}
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed for drawing the max_examples subset."})

    def __post_init__(self):
        if not self.dataset_path:
            raise ValueError("dataset_path is required: a chat JSONL file")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples={self.max_examples}; use a positive count or None for all")


@dataclass
class EMSFTConfig(CPUSafeDefaults, SFTConfig):
    """``trl.SFTConfig`` with the CPU-safe defaults of ``plumbing.trainers.CPUSafeDefaults`` (bf16 only with CUDA,
    activation checkpointing off unless asked). ``trust_remote_code`` is taken from ``ModelConfig``."""

    logging_steps: float = field(default=1, metadata={"help": "Log (and save the LoRA trajectory) every X steps."})
    # ModelConfig owns this flag (one --trust_remote_code); build_trainer copies it here.
    trust_remote_code: bool = field(default=False, init=False)
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the contents of an output_dir that holds a run of another config (refused otherwise)."
        },
    )
    max_loss_ratio: float | None = field(
        default=10.0,
        metadata={
            "help": "Stop (before saving) when the logged loss exceeds this multiple of the mean of the first 5 "
            "logged losses; None: stop only on NaN/inf."
        },
    )

    def __post_init__(self):
        check_overwrite_or_resume(self)
        if self.max_loss_ratio is not None and not self.max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio={self.max_loss_ratio}; use a multiple > 1 or None")
        super().__post_init__()


# The roles chat templates know; another (a typo such as ``usr``) would be rendered as-is, or dropped, by the template.
ROLES = ("system", "user", "assistant")


def check_chat_jsonl(path: Path) -> int:
    """Number of rows; raises ``ValueError`` naming ``path`` and the line of the first bad row (bytes that are not
    UTF-8, not JSON, no ``messages`` list, a message without string ``role``/``content``, a role not in ``ROLES``, no
    assistant turn) or an empty file."""
    n = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path} line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{where}: byte {error.start + 1} ({raw[error.start : error.start + 1]!r}) is not UTF-8; "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f'{where} is not valid JSON ({error}); each line holds one {{"messages": [...]}}'
                ) from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(
                    f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} (a non-empty list)'
                )
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise ValueError(f"{where}: message {i} is {m!r}; each message needs string 'role' and 'content'")
                if m["role"] not in ROLES:
                    raise ValueError(f"{where}: message {i} has role {m['role']!r}; use one of {list(ROLES)}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(
                    f"{where} has no assistant turn (roles {[m['role'] for m in msgs]}); nothing to train on"
                )
            n += 1
    if n == 0:
        raise ValueError(f'{path} holds no examples; pass a chat JSONL with one {{"messages": [...]}} per line')
    return n


def load_chat_jsonl(cfg: DataConfig):
    """``datasets.Dataset`` with the single column ``messages`` (a subset when ``max_examples``); every row
    is checked first (``check_chat_jsonl``), so a bad file fails before any model loads."""
    from datasets import load_dataset

    path = Path(cfg.dataset_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset_path {path} does not exist")
    n = check_chat_jsonl(path)
    if cfg.max_examples is not None and cfg.max_examples > n:
        raise ValueError(f"max_examples={cfg.max_examples} but {path} has only {n} examples")
    ds = load_dataset("json", data_files=str(path), split="train")
    ds = ds.select_columns(["messages"])
    if cfg.max_examples is not None:
        ds = ds.shuffle(seed=cfg.subset_seed).select(range(cfg.max_examples))
    return ds


def _to_prompt_completion(example: dict) -> dict:
    msgs = example["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"example without an assistant turn: {msgs!r}")
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def configure_assistant_loss(dataset, tokenizer, args: SFTConfig):
    """Make TRL put the loss on assistant tokens only; returns the dataset to train on.

    Sets ``args.assistant_only_loss`` when the tokenizer's chat template has generation markers or
    TRL knows a training template for it; otherwise converts to prompt/completion (only the last
    assistant turn is trained) and sets ``args.completion_only_loss``.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tokenizer has no chat_template; set ModelConfig.chat_template_from to a checkpoint that has one "
            "(for a base model, its instruct sibling)"
        )
    markers = has_generation_markers(tokenizer.chat_template)
    if not markers:
        try:
            markers = get_training_chat_template(tokenizer) is not None
        except (ValueError, NotImplementedError):
            markers = False
    if markers:
        args.assistant_only_loss, args.completion_only_loss = True, None
        return dataset
    logger.info("chat template has no generation markers: training on prompt/completion pairs instead")
    args.assistant_only_loss, args.completion_only_loss = False, True
    return dataset.map(_to_prompt_completion, remove_columns=["messages"])


def build_trainer(model_cfg: ModelConfig, data_cfg: DataConfig, lora_cfg: LoraPresetConfig, args: SFTConfig):
    """An ``SFTTrainer`` ready to ``train()``; validates layers before loading any weights."""
    from transformers import set_seed
    from trl import SFTTrainer

    args.trust_remote_code = model_cfg.trust_remote_code
    depth = num_layers(load_config(model_cfg))
    validate_layers(lora_cfg.layers, depth)
    dataset = load_chat_jsonl(data_cfg)
    model, tokenizer = load_model_and_tokenizer(for_training(model_cfg, lora_cfg.preset), padding_side="right")
    dataset = configure_assistant_loss(dataset, tokenizer, args)
    set_seed(args.seed)  # the LoRA A init draws from the global RNG
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config_for(lora_cfg, model),
        callbacks=[LoraTrajectoryCallback(), DivergenceGuard(getattr(args, "max_loss_ratio", None))],
    )
    n = assert_trainable(trainer.model)
    logger.info("preset %s: %d trainable parameters", lora_cfg.preset, n)
    # kept on the trainer for train()'s summary: TRL truncates rows to max_length and drops the ones left without a
    # trained token, silently
    trainer.row_counts = row_counts(len(dataset), trainer.train_dataset, args.max_length)
    return trainer


def row_counts(n_rows: int, prepared, max_length: int | None) -> dict:
    """How many of the ``n_rows`` data rows TRL kept (``prepared``: the trainer's tokenised dataset), dropped (truncated
    to ``max_length`` with no trained token left) and cut at ``max_length``; warns when any was dropped or cut, and
    raises when none is left."""
    lengths = [len(ids) for ids in prepared["input_ids"]]
    counts = {
        "rows": n_rows,
        "trained": len(lengths),
        "dropped": n_rows - len(lengths),
        "cut": sum(n >= max_length for n in lengths) if max_length else 0,
    }
    fix = f"raise max_length (now {max_length}) or shorten the rows"
    if not lengths:
        raise ValueError(
            f"all {n_rows} rows were dropped: truncated to max_length={max_length} tokens, none kept an "
            f"assistant token to train on; {fix}"
        )
    if counts["dropped"] or counts["cut"]:
        logger.warning(
            "training on %d of %d rows: TRL dropped %d (no assistant token left within max_length=%s) and cut "
            "%d at max_length; %s",
            counts["trained"],
            n_rows,
            counts["dropped"],
            max_length,
            counts["cut"],
            fix,
        )
    return counts


def train(model_cfg: ModelConfig, data_cfg: DataConfig, lora_cfg: LoraPresetConfig, args: SFTConfig) -> Path:
    """Fine-tune and save to ``args.output_dir`` (adapter or full model + tokenizer); returns that folder.
    The folder must be this config's (``plumbing.runs.claim_trainer_run``, checked before any weights load).
    Raises ``plumbing.runs.Stopped`` after saving a checkpoint when SIGINT/SIGTERM stops it early."""
    resume = claim_trainer_run(args, model_cfg, data_cfg, lora_cfg)
    trainer = build_trainer(model_cfg, data_cfg, lora_cfg, args)
    state = trainer.accelerator.state
    logger.info("world size %d, process %d, device %s", state.num_processes, state.process_index, state.device)
    train_until_stopped(trainer, resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        write_summary(trainer.state.log_history, model_cfg, data_cfg, lora_cfg, args, trainer.row_counts)
    return Path(args.output_dir)


def write_summary(
    log_history: list[dict],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    lora_cfg: LoraPresetConfig,
    args: SFTConfig,
    rows: dict | None = None,
) -> None:
    """``summary.md``, ``loss.png`` and (LoRA presets) ``lora_trajectory.png`` in ``args.output_dir``: which model
    was tuned on what, the loss curve, and how the LoRA B vectors grew and settled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    logs = [h for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["step"] for h in logs], [h["loss"] for h in logs], "o-", ms=3)
    ax.set(
        xlabel="training step", ylabel="train loss (nats / assistant token)", title=f"EM fine-tuning: {lora_cfg.preset}"
    )
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    lines = [
        "# EM fine-tuning",
        "",
        f"- model: `{model_cfg.model_name_or_path}`"
        + (f" (GGUF `{model_cfg.gguf_file}`)" if model_cfg.gguf_file else ""),
        f"- data: `{data_cfg.dataset_path}`"
        + (f" (first {data_cfg.max_examples} examples)" if data_cfg.max_examples else ""),
        f"- preset: `{lora_cfg.preset}`, layers {lora_cfg.layers or 'all'}; learning rate {args.learning_rate}, "
        f"seed {args.seed}",
        f"- saved to `{out}`",
        "",
    ]
    if rows is not None:
        lines[-1:-1] = [
            f"- rows: trained on {rows['trained']} of {rows['rows']}; {rows['dropped']} dropped (no assistant "
            f"token within max_length={args.max_length}), {rows['cut']} cut at max_length"
        ]
    if logs:
        lines += [
            f"Train loss: {logs[0]['loss']:.4f} (step {logs[0]['step']}) -> {logs[-1]['loss']:.4f} (step {logs[-1]['step']}); "
            "![loss](loss.png)",
            "",
        ]
    trajectory = out / "lora_trajectory"
    if any(trajectory.glob("step_*.safetensors")):
        report = lora_trajectory_report(trajectory)
        plot_lora_trajectory(report, out / "lora_trajectory.png")
        lines += [
            "| LoRA module | final ||B|| | cos(B at first save, final B) | fastest turn at step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {t['norm_B'][-1]:.4g} | {t['cos_B_final'][0]:.3f} | {t['fastest_turn_step']} |"
            for m, t in report.items()
        ]
        lines += ["", "![LoRA trajectory](lora_trajectory.png)", ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def make_parser():
    from plumbing.config import ConfigParser

    return ConfigParser((ModelConfig, DataConfig, LoraPresetConfig, EMSFTConfig))
