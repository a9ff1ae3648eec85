"""The configs every toy entry point shares: which process and window (``ProcessConfig``) and how to train
(``TrainConfig``), parsed with ``plumbing.config.ConfigParser`` (YAML plus flag overrides)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from plumbing.config import last_parse
from plumbing.runs import check_overwrite_or_resume
from toy.processes import PROCESSES, Process, make_process


class JsonDict(dict):
    """A dict field type for ``HfArgumentParser``: built from a mapping (YAML) or a JSON string (command line)."""

    def __init__(self, value=None):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"expected a JSON object, got {value!r}: {err}") from None
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {type(value).__name__}")
        super().__init__(value or {})


@dataclass
class ProcessConfig:
    """Which process to learn and the window length."""

    process: str = field(default="mess3", metadata={"help": f"Process name: one of {sorted(PROCESSES)}."})
    process_kwargs: JsonDict = field(
        default_factory=JsonDict,
        metadata={
            "help": 'Keyword arguments of the process as JSON, e.g. \'{"x": 0.15, "a": 0.6}\' (see toy.processes.make_process).'
        },
    )
    context_length: int = field(default=10, metadata={"help": "Tokens per training window (the model's n_positions)."})

    def __post_init__(self):
        self.process_kwargs = dict(JsonDict(self.process_kwargs))
        if self.process not in PROCESSES:
            raise ValueError(f"unknown process {self.process!r}; use one of {sorted(PROCESSES)}")
        if self.context_length < 2:
            raise ValueError(f"context_length={self.context_length}; a window needs >= 2 tokens")

    def build(self) -> Process:
        return make_process(self.process, **self.process_kwargs)


# the name before ProcessConfig (llm.sft has a DataConfig of its own: a JSONL data set), kept for one release
DataConfig = ProcessConfig


# TrainConfig's names before it spoke ``transformers.TrainingArguments``' (left) and the new ones; the old names
# still parse, with a deprecation warning, until the next release. ``progress``, ``optimizer``, ``schedule`` and
# ``mixed_precision`` take their old values (``OLD_VALUES`` translates them).
OLD_NAMES = {
    "steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "lr": "learning_rate",
    "grad_clip": "max_grad_norm",
    "eval_every": "eval_steps",
    "log_every": "logging_steps",
    "save_every": "save_steps",
    "compile": "torch_compile",
    "progress": "disable_tqdm",
    "optimizer": "optim",
    "schedule": "lr_scheduler_type",
    "mixed_precision": "bf16",
    "resume_from": "resume_from_checkpoint",
}
OLD_VALUES = {
    "progress": lambda v: not v,
    "optimizer": {"adamw": "adamw_torch", "sgd": "sgd"}.__getitem__,
    "schedule": {"cosine": "cosine", "constant": "constant_with_warmup"}.__getitem__,
    "mixed_precision": {"no": False, "bf16": True}.__getitem__,
}


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing, under ``transformers.TrainingArguments``' names where it has one."""

    output_dir: str = field(
        default="runs/mess3", metadata={"help": "Run folder: checkpoints, logs (and the pipeline's outputs)."}
    )
    max_steps: int = field(default=3000, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Windows per step per process (rank)."})
    optim: Literal["adamw_torch", "sgd"] = field(
        default="adamw_torch", metadata={"help": "adamw_torch (fused on CUDA), or sgd (plain SGD without momentum)."}
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    lr_scheduler_type: Literal["cosine", "constant_with_warmup"] = field(
        default="cosine", metadata={"help": "LR after warm-up: cosine (down to min_lr_ratio) or constant."}
    )
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine ends at learning_rate * min_lr_ratio."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Max global grad norm (0: no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init and of every step's data."})
    eval_steps: int = field(default=500, metadata={"help": "Steps between validation losses (0: only at the end)."})
    logging_steps: int = field(default=50, metadata={"help": "Steps between train-loss log entries."})
    save_steps: int = field(default=1000, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    sample_chunk: int = field(
        default=1,
        metadata={
            "help": "Default sampler: draw this many steps' data in one call (fewer launches and host syncs on GPU)."
        },
    )
    val_max_sequences: int = field(
        default=200_000, metadata={"help": "Enumerate validation prefixes when vocab**(context_length-1) <= this."}
    )
    val_samples: int = field(default=20_000, metadata={"help": "Sampled validation sequences otherwise."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'last' (newest in output_dir; fresh start if none)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from this saved model (fine-tuning) instead of a random init."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    cpu_threads: int = field(
        default=1,
        metadata={
            "help": "torch threads of the entry points on CPU (0: torch's default). The toy model's small "
            "matmuls gain little from more, and 2 threads on a busy 2-core machine thrash (5 s/step vs 0.5)."
        },
    )
    bf16: bool = field(
        default=False,
        metadata={"help": "bf16 autocast; float32 (the default) is needed to get within 1e-4 nats of the floor."},
    )
    tf32: bool = field(
        default=True, metadata={"help": "Allow TF32 matmuls on CUDA while training (evaluation is full float32)."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the training forward (GPU)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the tqdm progress bar."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace what output_dir holds (a run of another config, or this run's checkpoints) instead of refusing."
        },
    )
    max_loss_ratio: float = field(
        default=10.0,
        metadata={
            "help": "Stop, before saving, when a logged train loss exceeds this multiple of the mean of the first "
            "logged ones (a diverging run; 0: off). A NaN or inf loss always stops (plumbing.runs.DivergenceGuard)."
        },
    )
    report_to: Literal["tensorboard", "none"] = field(
        default="tensorboard",
        metadata={
            "help": "Tracker for losses and evaluation metrics (<output_dir>/runs); skipped with a note when not installed."
        },
    )
    # the old names (OLD_NAMES), kept for one release: None unless given
    steps: int | None = field(default=None, metadata={"help": "Deprecated: use --max_steps."})
    batch_size: int | None = field(default=None, metadata={"help": "Deprecated: use --per_device_train_batch_size."})
    lr: float | None = field(default=None, metadata={"help": "Deprecated: use --learning_rate."})
    grad_clip: float | None = field(default=None, metadata={"help": "Deprecated: use --max_grad_norm."})
    eval_every: int | None = field(default=None, metadata={"help": "Deprecated: use --eval_steps."})
    log_every: int | None = field(default=None, metadata={"help": "Deprecated: use --logging_steps."})
    save_every: int | None = field(default=None, metadata={"help": "Deprecated: use --save_steps."})
    compile: bool | None = field(default=None, metadata={"help": "Deprecated: use --torch_compile."})
    progress: bool | None = field(default=None, metadata={"help": "Deprecated: use --disable_tqdm (its negation)."})
    optimizer: Literal["adamw", "sgd"] | None = field(
        default=None, metadata={"help": "Deprecated: use --optim adamw_torch / sgd."}
    )
    schedule: Literal["cosine", "constant"] | None = field(
        default=None, metadata={"help": "Deprecated: use --lr_scheduler_type cosine / constant_with_warmup."}
    )
    mixed_precision: Literal["no", "bf16"] | None = field(
        default=None, metadata={"help": "Deprecated: use --bf16 true / false."}
    )
    resume_from: str | None = field(default=None, metadata={"help": "Deprecated: use --resume_from_checkpoint."})

    def __post_init__(self):
        self._take_old_names()
        for name in ("max_steps", "per_device_train_batch_size", "sample_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_steps", "save_steps", "weight_decay", "max_grad_norm", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads={self.cpu_threads} must be >= 0 (0: torch's default)")
        if self.logging_steps < 1:
            raise ValueError(f"logging_steps={self.logging_steps} must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not (self.max_loss_ratio == 0 or self.max_loss_ratio > 1):
            raise ValueError(
                f"max_loss_ratio={self.max_loss_ratio}: use a multiple > 1 of the first logged losses, or 0 (off)"
            )
        check_overwrite_or_resume(self)

    def _take_old_names(self) -> None:
        """Move every old name that was given (not None) onto its new name, with one warning listing them. An old and
        a new name that disagree: the one typed on the command line wins over the config file's (``--steps 40`` over
        a YAML's ``max_steps: 1500``, ``--max_steps 9`` over an old YAML's ``steps: 5``); otherwise an error."""
        typed = {tok.split("=")[0] for tok in last_parse()["args"] or () if tok.startswith("--")}
        given = {old: getattr(self, old) for old in OLD_NAMES if getattr(self, old) is not None}
        for old, value in given.items():
            new, value = OLD_NAMES[old], OLD_VALUES.get(old, lambda v: v)(value)
            setattr(self, old, None)
            if f"--{new}" in typed and f"--{old}" not in typed:
                continue  # the command line's new name over the config file's old one
            default = type(self).__dataclass_fields__[new].default
            old_typed_alone = f"--{old}" in typed and f"--{new}" not in typed
            if getattr(self, new) not in (default, value) and not old_typed_alone:
                raise ValueError(
                    f"{old}={given[old]!r} and {new}={getattr(self, new)!r} disagree; pass --{new} alone "
                    f"({old} is its deprecated name)"
                )
            setattr(self, new, value)
        if given:
            warnings.warn(
                "deprecated TrainConfig names, to be removed in the next release: "
                + ", ".join(f"{old} -> {OLD_NAMES[old]}" for old in given)
                + " (the names of transformers.TrainingArguments, which llm.sft, llm.grpo and toy.experiments.rl take)",
                FutureWarning,
                stacklevel=4,  # the caller of TrainConfig(...), past __init__ and __post_init__
            )

    def record(self) -> dict:
        """The fields a run folder records (``run_config.json``): the deprecated names, always None here, left out."""
        return {k: v for k, v in asdict(self).items() if k not in OLD_NAMES}


def stage_config(train_cfg: TrainConfig, steps: int, lr: float, output_dir: str | Path, seed: int) -> TrainConfig:
    """The ``TrainConfig`` of one training stage an experiment runs inside its own folder (a pre-training or a
    fine-tune): ``steps`` steps at learning rate ``lr`` with at most a tenth of them warm-up, ``seed`` for the data,
    no checkpoints or validation, nothing resumed or started from, and what an earlier run left in ``output_dir``
    replaced (the experiment's own folder record vouches for it)."""
    return replace(
        train_cfg,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=min(train_cfg.warmup_steps, steps // 10),
        output_dir=str(output_dir),
        seed=seed,
        resume_from_checkpoint=None,
        init_from=None,
        save_steps=0,
        eval_steps=0,
        overwrite=True,
    )


def upgrade_record(saved: dict) -> dict:
    """A ``run_config.json`` written before the rename, its train config (``TrainConfig``, and ``run.info.train`` where
    an entry point stored it again) under the new names, values translated, so a run folder of the older release
    resumes; a record without old names comes back unchanged."""

    def upgrade(train: dict) -> dict:
        new = {}
        for key, value in train.items():
            if key in OLD_NAMES:
                if OLD_NAMES[key] in train:  # resume_from beside resume_from_checkpoint: the new name's value stands
                    continue
                key, value = OLD_NAMES[key], value if value is None else OLD_VALUES.get(key, lambda v: v)(value)
            new[key] = value
        return new

    out = dict(saved)
    if isinstance(out.get("TrainConfig"), dict):
        out["TrainConfig"] = upgrade(out["TrainConfig"])
    info = out.get("run", {}).get("info", {}) if isinstance(out.get("run"), dict) else {}
    if isinstance(info.get("train"), dict):
        out["run"] = {**out["run"], "info": {**info, "train": upgrade(info["train"])}}
    return out


def window_memory(
    context_length: int,
    batch_size: int,
    *,
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_mlp: int,
    vocab: int,
    sample_chunk: int = 1,
    val_sequences: int = 0,
    quadratic_attention: bool = False,
) -> dict:
    """Bytes a toy training run needs at least, by part: ``step`` (per rank, on the training device: float32
    activations kept for the backward pass, ~16 d_model + 4 d_mlp values per token and layer as measured with sdpa on
    CPU, the logits, the sampled tokens; ``quadratic_attention`` adds the eager attention's context_length**2 weights
    per head) and ``validation`` (host: the validation prefixes and their exact next-token distributions, float64)."""
    tokens = batch_size * context_length
    step = n_layers * tokens * (16 * d_model + 4 * d_mlp) * 4 + tokens * vocab * 4 * 4 + tokens * sample_chunk * 8 * 2
    if quadratic_attention:
        step += n_layers * batch_size * n_heads * context_length**2 * 4 * 2
    return {"step": step, "validation": val_sequences * (context_length - 1) * (8 + 8 * vocab)}


def available_memory(device: str = "cpu") -> int | None:
    """Free bytes on ``device``: a CUDA device's free memory, or the host's ``MemAvailable`` capped by this process's
    cgroup limit; None where neither can be read."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free = min(free, int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return free


def check_window_memory(context_length: int, batch_size: int, device: str = "cpu", **dims) -> None:
    """Refuse, before anything is allocated, a window whose ``window_memory`` (``dims``: its other keywords) exceeds the
    free memory of ``device`` (the step) or the host (the validation set; both on a CPU run), naming the key to change
    and the largest ``context_length`` that fits."""

    def needs(length: int) -> dict[str, int]:
        n = window_memory(length, batch_size, **dims)
        return {"cpu": n["step"] + n["validation"]} if device == "cpu" else {device: n["step"], "cpu": n["validation"]}

    free = {pool: available_memory(pool) for pool in needs(2)}

    def over(length: int) -> list[str]:
        return [pool for pool, need in needs(length).items() if free[pool] is not None and need > free[pool]]

    if not over(context_length):
        return
    lo, hi = 1, context_length  # the largest window that fits, by bisection (the need grows with the window)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if not over(mid) else (lo, mid)
    pool = over(context_length)[0]
    raise ValueError(
        f"context_length={context_length} (batch_size={batch_size}) needs about {needs(context_length)[pool] / 2**30:,.1f} "
        f"GiB on {pool} for the training step's activations and the validation set, estimated from the model config, "
        f"but {free[pool] / 2**30:,.1f} GiB are free: use "
        + (f"context_length <= {lo}" if lo >= 2 else "a smaller batch_size")
        + " (or a smaller batch_size / val_samples). Nothing was allocated."
    )


def check_run_memory(
    model_config, process: Process, cfg: TrainConfig, context_length: int, device, build_val: bool
) -> None:
    """``check_window_memory`` for ``toy.train.train``: the dimensions from the model's config, the validation set
    that ``cfg`` asks for (enumerated or sampled; none when the caller passes one: ``build_val`` False)."""
    mc = model_config
    exact = (context_length - 1) * math.log(process.vocab_size) <= math.log(cfg.val_max_sequences)
    check_window_memory(
        context_length,
        cfg.per_device_train_batch_size,
        "cpu" if device.type == "cpu" else str(device),
        n_layers=mc.num_hidden_layers,
        n_heads=mc.num_attention_heads,
        d_model=mc.hidden_size,
        d_mlp=getattr(mc, "n_inner", None) or getattr(mc, "intermediate_size", None) or 4 * mc.hidden_size,
        vocab=mc.vocab_size,
        sample_chunk=cfg.sample_chunk,
        quadratic_attention=mc._attn_implementation == "eager",
        val_sequences=0 if not build_val else process.vocab_size ** (context_length - 1) if exact else cfg.val_samples,
    )
