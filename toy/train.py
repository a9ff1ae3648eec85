"""Pre-train a toy GPT-2 on fresh samples of a ``toy`` process, with the exact validation loss beside the floor.

    python -m toy.train --config configs/toy/mess3.yaml
    python -m toy.train --config configs/toy/mess3.yaml --steps 500 --output_dir runs/mess3_short
    python -m toy.train --config configs/toy/mess3.yaml --resume_from last      # continue a killed run

    # one GPU / several GPUs (DDP; the batch per step is batch_size x processes), same flags:
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.train --config configs/toy/mess3_gpu.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 -m toy.train --config ...
    # 2 CPU processes (gloo); `accelerate launch --cpu --num_processes 2` would silently run ONE process:
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m toy.train --config ... --use_cpu true
    torchrun --nproc_per_node 2 -m toy.train --config ... --use_cpu true

Conventions:
- Every step each rank draws ``batch_size`` fresh windows of ``context_length`` tokens on its own device
  from a generator seeded by ``(seed, step, rank)`` (with ``sample_chunk`` K > 1: ``(seed, step // K,
  rank)`` draws K steps at once): the data do not depend on how the run was interrupted, so a resumed
  run ends with the same weights as an uninterrupted one.
- Loss = mean next-token cross-entropy (nats) over positions 2..n of each window (tokens 1..n-1 predicted
  from their prefixes), the positions ``toy.beliefs.loss_floor`` averages.
- Validation is exact when ``vocab ** (context_length - 1) <= val_max_sequences``: every prefix, weighted
  by its probability, scored against the exact next-token distribution (which equals the probability-
  weighted loss over all windows; see ``ValidationSet``). Otherwise ``val_samples`` sampled prefixes
  (seeded, uniform weights). The reported floor is the exact predictive's own loss on the same set:
  ``loss_floor`` when enumerated; on a sampled set an unbiased estimate, and the paired difference
  ``val_loss - floor`` has little sampling noise.
- Checkpoints: ``<output_dir>/checkpoint-<step>/`` holds the model (``save_pretrained``, safetensors),
  ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` and ``trainer_state.json`` (step, history). One is
  written every ``save_every`` steps, at the end, on Ctrl-C (after the step in flight) and on a crash.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from toy import processes as P
from toy.beliefs import enumerate_sequences, next_token_distributions
from toy.data import sample
from toy.model import ToyModelConfig, build_model
from toy.processes import Process

# --------------------------------------------------------------------------- processes by name

# name -> constructor. Keyword values that are process specs ({"name": ..., **kwargs}) or lists of them
# are built first, so factored processes nest: see ``make_process``.
PROCESSES: dict[str, Callable[..., Process]] = {
    "mess3": P.mess3,
    "rrxor": P.rrxor,
    "zero_one_random": P.zero_one_random,
    "even": P.even,
    "golden_mean": P.golden_mean,
    "noisy_gate": P.noisy_gate,
    "noisy_not": P.noisy_not,
    "noisy_and": P.noisy_and,
    "noisy_implies": P.noisy_implies,
    "product": lambda factors: P.product(*factors),
    "chained": P.chained,
    "correlated": P.correlated,
    "rare_factor": P.rare_factor,
    "capability_tag": P.capability_tag,
}


def make_process(name: str, **kwargs) -> Process:
    """Build a ``toy.processes`` process from its name and keyword arguments (as a config holds them).

    Factored processes take nested specs, a spec being ``{"name": <process>, **its kwargs}``::

        make_process("mess3", x=0.15, a=0.6)
        make_process("product", factors=[{"name": "mess3"}, {"name": "mess3", "x": 0.15, "a": 0.6}])
        make_process("correlated", first={"name": "mess3"}, second={"name": "mess3"}, rho=0.5)
        make_process("chained", first={"name": "even"}, conditioned=[{"name": "mess3"}, {"name": "mess3", "a": 0.6}])
        make_process("rare_factor", common={"name": "mess3"}, rare={"name": "rrxor"}, trigger_token=0)
        make_process("capability_tag", capability={"name": "mess3"}, switch_prob=0.05, tag_noise=0.1)

    In YAML: ``process: product`` and ``process_kwargs: {factors: [{name: mess3}, {name: mess3}]}``.
    """
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; use one of {sorted(PROCESSES)}")

    def build(value):
        if isinstance(value, dict) and "name" in value:
            spec = dict(value)
            return make_process(spec.pop("name"), **spec)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) and "name" in v for v in value):
            return [build(v) for v in value]
        return value

    try:
        return PROCESSES[name](**{k: build(v) for k, v in kwargs.items()})
    except TypeError as err:  # a wrong keyword: say which process and what it takes
        raise ValueError(f"process {name!r} does not accept kwargs {sorted(kwargs)}: {err}") from None


# --------------------------------------------------------------------------- configs


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
class DataConfig:
    """Which process to learn and the window length."""

    process: str = field(default="mess3", metadata={"help": f"Process name: one of {sorted(PROCESSES)}."})
    process_kwargs: JsonDict = field(
        default_factory=JsonDict,
        metadata={"help": 'Keyword arguments of the process as JSON, e.g. \'{"x": 0.15, "a": 0.6}\' (see toy.train.make_process).'},
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


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    output_dir: str = field(default="runs/mess3", metadata={"help": "Run folder: checkpoints, logs (and the pipeline's outputs)."})
    steps: int = field(default=3000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=256, metadata={"help": "Windows per step per process (rank)."})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "adamw, or sgd (the anchor's)."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "LR after warm-up."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Cosine ends at lr * min_lr_ratio."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global grad norm (0: no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init and of every step's data."})
    eval_every: int = field(default=500, metadata={"help": "Steps between validation losses (0: only at the end)."})
    log_every: int = field(default=50, metadata={"help": "Steps between train-loss log entries."})
    save_every: int = field(default=1000, metadata={"help": "Steps between checkpoints (0: only at the end)."})
    sample_chunk: int = field(
        default=1,
        metadata={"help": "Default sampler: draw this many steps' data in one call (fewer launches and host syncs on GPU)."},
    )
    val_max_sequences: int = field(
        default=200_000, metadata={"help": "Enumerate validation prefixes when vocab**(context_length-1) <= this."}
    )
    val_samples: int = field(default=20_000, metadata={"help": "Sampled validation sequences otherwise."})
    resume_from: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'last' (newest in output_dir; fresh start if none)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from this saved model (fine-tuning) instead of a random init."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    cpu_threads: int = field(
        default=1,
        metadata={"help": "torch threads of the entry points on CPU (0: torch's default). The toy model's small "
                  "matmuls gain little from more, and 2 threads on a busy 2-core machine thrash (5 s/step vs 0.5)."},
    )
    mixed_precision: Literal["no", "bf16"] = field(
        default="no", metadata={"help": "Autocast; 'no' (float32) is needed to get within 1e-4 nats of the floor."}
    )
    tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on CUDA while training (evaluation is full float32)."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training forward (GPU)."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    def __post_init__(self):
        for name in ("steps", "batch_size", "sample_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads={self.cpu_threads} must be >= 0 (0: torch's default)")
        if self.log_every < 1:
            raise ValueError(f"log_every={self.log_every} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


def parse_config(dataclass_types: tuple, argv: list[str] | None = None, description: str | None = None) -> tuple:
    """``--config file.yaml`` plus command-line overrides into instances of ``dataclass_types``.

    The YAML's keys must be fields of the given dataclasses (unknown keys are an error, as are unknown
    flags); command-line flags win over the file.
    """
    import yaml
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.add_argument("--config", default=None, help="YAML file of field values; flags override it.")
    if known.config:
        with open(known.config) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{known.config}: expected a mapping of field names to values")
        allowed = {f.name for cls in dataclass_types for f in fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")
        parser.set_defaults(**values)
    out = parser.parse_args_into_dataclasses(args=rest)
    return tuple(o for o in out if not isinstance(o, argparse.Namespace))


# --------------------------------------------------------------------------- validation


@dataclass
class ValidationSet:
    """Prefixes ``tokens (N, L - 1)`` with ``weights (N,)`` summing to 1, the exact next-token distributions
    ``targets (N, L - 1, V)`` after each prefix, and the floor on this set (nats).

    The loss of a window of ``L`` tokens at positions 2..L depends on its last token only through the
    target token of the last position, so summing that token out replaces it by the exact predictive
    distribution: the soft-target loss on the ``L - 1``-token prefixes equals the hard-target loss on all
    ``L``-token windows (``window_loss``) and needs a third of the forward passes for Mess3.
    ``exact``: every prefix of positive probability, weighted by its probability (then
    ``floor == toy.beliefs.loss_floor(process, L)``); otherwise seeded samples with uniform weights.
    """

    tokens: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    floor: float
    exact: bool


def window_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Probability-weighted mean next-token cross-entropy (nats) of whole windows, 0-dim float64.

    ``logits (N, L, V)`` (entry t predicts token t + 1; log-probabilities work too), ``tokens (N, L)``,
    ``weights (N,)`` (default uniform). Each window contributes the mean CE over positions 2..L (targets
    ``tokens[:, 1:]``); windows are averaged with ``weights / weights.sum()``. The training loss.
    """
    N, L, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), tokens[:, 1:].reshape(-1), reduction="none")
    per_seq = ce.view(N, L - 1).mean(1)
    if weights is None:
        return per_seq.mean()
    w = weights.to(per_seq)
    return (w * per_seq).sum() / w.sum()


def soft_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n mean_t sum_x targets[n, t, x] * -log_softmax(logits)[n, t, x]`` / ``sum w``: 0-dim float64.

    ``logits``/``targets (N, T, V)``, ``weights (N,)``. Zero-probability targets contribute nothing."""
    logp = torch.log_softmax(logits.double(), -1)
    ce = -(targets.double() * torch.where(targets > 0, logp, torch.zeros_like(logp))).sum(-1).mean(1)
    w = weights.to(ce)
    return (w * ce).sum() / w.sum()


def validation_set(process: Process, context_length: int, max_sequences: int = 200_000, n_samples: int = 20_000, seed: int = 12345) -> ValidationSet:
    """Every prefix of ``context_length - 1`` tokens with its probability when ``vocab ** (context_length - 1)
    <= max_sequences``, else ``n_samples`` sampled prefixes; their exact next-token distributions; the floor."""
    n = context_length - 1
    exact = process.vocab_size**n <= max_sequences
    if exact:
        tokens, probs = enumerate_sequences(process, n, max_sequences=max_sequences)
        weights = probs / probs.sum()
    else:
        tokens = sample(process, n_samples, n, seed=seed).tokens
        weights = torch.full((n_samples,), 1.0 / n_samples, dtype=torch.float64)
    targets = next_token_distributions(process, tokens)
    floor = soft_loss(targets.clamp_min(1e-300).log(), targets, weights).item()
    return ValidationSet(tokens, weights, targets, floor, exact)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ValidationSet, batch_size: int = 8192) -> float:
    """Exact next-token loss of ``model`` on ``val`` (nats; see ``ValidationSet``), in chunks of
    ``batch_size`` prefixes on the model's device."""
    device = next(model.parameters()).device
    was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
    model.eval()
    # full float32 matmuls: TF32's 10-bit mantissa would blur a gap measured in 1e-4 nats
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(val.tokens), batch_size):
            rows = slice(start, start + batch_size)
            w = val.weights[rows].to(device)
            logits = model(input_ids=val.tokens[rows].to(device)).logits.float()
            targets = val.targets[rows].to(device)
            # a vocabulary wider than the process's (e.g. toy.rl's <eos>/<pad>): the extra tokens are never
            # targets, and the mass the model puts on them counts as loss through the softmax
            targets = torch.nn.functional.pad(targets, (0, logits.shape[-1] - targets.shape[-1]))
            total += soft_loss(logits, targets, w) * w.sum()
    finally:
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return (total / val.weights.sum()).item()


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What ``train`` returns. ``history``: one dict per log/eval point (step, train_loss, val_loss, floor,
    lr, tokens, elapsed_s). Losses in nats; ``tokens_per_s`` counts training tokens of all ranks."""

    model: torch.nn.Module
    history: list[dict]
    val_loss: float
    floor: float
    step: int
    tokens_seen: int
    elapsed_s: float
    tokens_per_s: float
    checkpoint_dir: Path | None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The data generator of one (step, rank): independent streams, identical on every replay."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    # the fused kernel updates every tensor in one launch: the toy model's steps are launch-bound on GPU
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay, fused=fused)


def find_checkpoint(output_dir: str | Path, resume_from: str) -> Path | None:
    """Resolve ``resume_from``: ``"last"`` -> newest ``checkpoint-<step>`` in ``output_dir`` (None if none)."""
    if resume_from == "last":
        found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from={resume_from!r} is not a checkpoint folder (no trainer_state.json)")
    return path


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict], extra: dict) -> Path:
    """Write a resumable checkpoint (see the module docstring); call on the main process only."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / "rng.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "history": history, **extra}, indent=1))
    return path


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors", device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the untied lm_head is saved; only a tied copy may legitimately be absent
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")


class _StopFlag:
    """Ctrl-C sets a flag instead of raising, so the step in flight finishes and a checkpoint is written;
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    process: Process,
    model: torch.nn.Module,
    cfg: TrainConfig,
    context_length: int | None = None,
    val: ValidationSet | None = None,
    data_fn: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    loss_weights_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    accelerator=None,
    run_info: dict | None = None,
) -> TrainResult:
    """Train ``model`` (a causal LM, e.g. ``toy.model.build_model(...)`` or a loaded checkpoint to fine-tune).

    Args:
        process: the process the data come from and the validation set is built for.
        context_length: window length (default: the model's ``n_positions``).
        val: validation set (default: ``validation_set(process, context_length, ...)`` from ``cfg``).
        data_fn: ``(step, generator) -> tokens (batch, context_length)`` long on the generator's device;
            overrides sampling from ``process`` (narrow or filtered data, mixtures). Must be a function of
            its arguments only, or resuming is no longer exact.
        loss_weights_fn: ``tokens (B, L) -> weights (B, L - 1)``: per-target-token loss weights (a mask
            is 0/1 weights); the step loss is ``sum(w * ce) / sum(w)``.
        accelerator: an ``accelerate.Accelerator`` (default: a new one from ``cfg``).
        run_info: extra JSON-able facts stored in every checkpoint's trainer_state.json.

    Returns a ``TrainResult`` whose ``model`` is the unwrapped trained model (on the training device).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    context_length = context_length or model.config.n_positions
    if context_length > model.config.n_positions:
        raise ValueError(f"context_length={context_length} exceeds the model's n_positions={model.config.n_positions}")
    if process.vocab_size > model.config.vocab_size:
        raise ValueError(f"{process.name} has {process.vocab_size} tokens but the model's vocab is {model.config.vocab_size}")
    accelerator = accelerator or Accelerator(cpu=cfg.use_cpu, mixed_precision=cfg.mixed_precision)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    tf32 = torch.backends.cuda.matmul.allow_tf32  # restored at the end: probes and evaluation want full float32
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(cfg.output_dir)
    raw = model.to(device)
    if val is None and accelerator.is_main_process:
        val = validation_set(process, context_length, cfg.val_max_sequences, cfg.val_samples)
    optimizer = make_optimizer(raw, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start, history = 0, []
    ckpt = find_checkpoint(out_dir, cfg.resume_from) if cfg.resume_from else None
    if ckpt is not None:
        _load_weights(raw, ckpt)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start, history = state["step"], state["history"]
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        accelerator.print(f"resumed from {ckpt} at step {start}")
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it once
    # per process), so only the model and optimizer go through prepare.
    fwd = torch.compile(raw) if cfg.compile else raw
    fwd, optimizer = accelerator.prepare(fwd, optimizer)
    fwd.train()
    extra = {"run_info": run_info or {}, "world_size": world, "context_length": context_length, "process": process.name}

    def save(step: int) -> Path | None:
        if not accelerator.is_main_process:
            return None
        return save_checkpoint(out_dir / f"checkpoint-{step}", raw, optimizer, scheduler, step, history, extra)

    def evaluate(step: int, train_loss: float | None, elapsed: float) -> None:
        entry = {"step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                 "tokens": step * cfg.batch_size * world * context_length, "elapsed_s": elapsed}
        if val is not None and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            entry.update(val_loss=validation_loss(raw, val), floor=val.floor)
        history.append(entry)

    step, last_ckpt, cached = start, None, None
    t0, t_prev = time.perf_counter(), history[-1]["elapsed_s"] if history else 0.0
    loss_sum = torch.zeros((), device=device)
    n_loss = 0
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
    try:
        with _StopFlag() as flag:
            while step < cfg.steps:
                if data_fn is not None:
                    tokens = data_fn(step, step_generator(cfg.seed, step, rank, device))
                else:
                    # chunk c holds steps c*K .. c*K+K-1 and is seeded by (seed, c, rank): replays exactly on resume
                    chunk, offset = divmod(step, cfg.sample_chunk)
                    if cached is None or cached[0] != chunk:
                        gen = step_generator(cfg.seed, chunk, rank, device)
                        cached = (chunk, sample(process, cfg.batch_size * cfg.sample_chunk, context_length, generator=gen, device=device).tokens)
                    tokens = cached[1][offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
                if tokens.shape[1] != context_length:
                    raise ValueError(f"data_fn returned windows of {tokens.shape[1]} tokens; expected {context_length}")
                tokens = tokens.to(device)
                with accelerator.autocast():
                    logits = fwd(input_ids=tokens).logits
                V = logits.shape[-1]
                ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
                if loss_weights_fn is None:
                    loss = ce.mean()
                else:
                    w = loss_weights_fn(tokens).to(ce.dtype).reshape(-1)
                    if w.shape != ce.shape:
                        raise ValueError(f"loss_weights_fn must return (batch, {context_length - 1}) weights")
                    loss = (w * ce).sum() / w.sum().clamp_min(1e-12)
                accelerator.backward(loss)
                if cfg.grad_clip:
                    accelerator.clip_grad_norm_(fwd.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.detach()
                n_loss += 1
                bar.update(1)
                log_now = step % cfg.log_every == 0 or step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
                if log_now:
                    train_loss = (loss_sum / n_loss).item()  # the only host sync of the loop
                    loss_sum.zero_()
                    n_loss = 0
                    if accelerator.is_main_process:
                        evaluate(step, train_loss, t_prev + time.perf_counter() - t0)
                        post = {"loss": f"{train_loss:.5f}"}
                        if "val_loss" in history[-1]:
                            post["val-floor"] = f"{history[-1]['val_loss'] - history[-1]['floor']:.2e}"
                        bar.set_postfix(post)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    last_ckpt = save(step) or last_ckpt
                # every rank must stop at the same step: with several ranks the Ctrl-C flag is agreed on
                # collectively at log points (a per-step collective would cost a host sync every step)
                stop = flag.stop
                if world > 1:
                    stop = log_now and accelerator.reduce(torch.tensor([float(stop)], device=device), reduction="sum").item() > 0
                if stop and step < cfg.steps:
                    save(step)
                    accelerator.print(f"\ninterrupted: checkpoint at step {step} in {out_dir}; rerun with --resume_from last")
                    raise KeyboardInterrupt
    except Exception:
        # a crash leaves the last completed step on disk (main process only: no collective may run here)
        if accelerator.is_main_process and step > start:
            save(step)
            print(f"training failed at step {step + 1}; checkpoint of step {step} in {out_dir}", file=sys.stderr)
        raise
    finally:
        bar.close()
        torch.backends.cuda.matmul.allow_tf32 = tf32
    elapsed = t_prev + time.perf_counter() - t0
    if accelerator.is_main_process and (not history or history[-1]["step"] != step):
        evaluate(step, None, elapsed)  # only when there was nothing left to train
    last_ckpt = save(step) or last_ckpt
    accelerator.wait_for_everyone()
    final = history[-1] if history else {}
    run_tokens = (step - start) * cfg.batch_size * world * context_length
    return TrainResult(
        model=raw,
        history=history,
        val_loss=final.get("val_loss", float("nan")),
        floor=final.get("floor", float("nan")),
        step=step,
        tokens_seen=step * cfg.batch_size * world * context_length,
        elapsed_s=elapsed,
        tokens_per_s=run_tokens / max(time.perf_counter() - t0, 1e-9),
        checkpoint_dir=last_ckpt,
    )


# --------------------------------------------------------------------------- entry point


def set_cpu_threads(cfg: TrainConfig) -> None:
    """Entry points call this (library code never changes the thread count)."""
    if cfg.cpu_threads and (cfg.use_cpu or not torch.cuda.is_available()):
        torch.set_num_threads(cfg.cpu_threads)


def main(argv: list[str] | None = None) -> TrainResult:
    data_cfg, model_cfg, train_cfg = parse_config((DataConfig, ToyModelConfig, TrainConfig), argv, __doc__)
    set_cpu_threads(train_cfg)
    process = data_cfg.build()
    if train_cfg.init_from:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(train_cfg.init_from)
    else:
        model = build_model(model_cfg, process.vocab_size, data_cfg.context_length, seed=train_cfg.seed)
    info = {"data": asdict(data_cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)}
    result = train(process, model, train_cfg, data_cfg.context_length, run_info=info)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"{process.name}: step {result.step}, val loss {result.val_loss:.6f} nats, floor {result.floor:.6f} "
            f"(gap {result.val_loss - result.floor:.2e}), {result.tokens_per_s:,.0f} tokens/s, checkpoint {result.checkpoint_dir}"
        )
    return result


if __name__ == "__main__":
    main()
