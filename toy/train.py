"""The toy trainer: a causal LM trained on fresh samples of a ``toy`` process, with the exact validation loss
beside the floor (``toy.validation``). The command line is ``toy.experiments.pretrain``.

Conventions:
- Every step each rank draws ``per_device_train_batch_size`` fresh windows of ``context_length`` tokens on its own device
  from a generator seeded by ``(seed, step, rank)`` (with ``sample_chunk`` K > 1: ``(seed, step // K,
  rank)`` draws K steps at once): the data do not depend on how the run was interrupted, so a resumed
  run ends with the same weights as an uninterrupted one.
- The steps run on ``transformers.Trainer`` (``toy.optim.ToyTrainer``: the loss below, one item of its data a whole
  step's batch); the Trainer itself logs, evaluates and saves nothing. The run's history, validation, checkpoints,
  signal stops and divergence guard are this module's, done at each step end by a callback.
- Loss = mean next-token cross-entropy (nats) over positions 2..n of each window (tokens 1..n-1 predicted
  from their prefixes), the positions ``toy.beliefs.loss_floor`` averages.
- Validation is exact when ``vocab ** (context_length - 1) <= val_max_sequences``: every prefix, weighted
  by its probability, scored against the exact next-token distribution (which equals the probability-
  weighted loss over all windows; see ``ValidationSet``). Otherwise ``val_samples`` sampled prefixes
  (seeded, uniform weights). The reported floor is the exact predictive's own loss on the same set:
  ``loss_floor`` when enumerated; on a sampled set an unbiased estimate, and the paired difference
  ``val_loss - floor`` has little sampling noise.
- Checkpoints: ``<output_dir>/checkpoint-<step>/`` holds the model (``save_pretrained``, safetensors),
  ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (tensors and plain values only: every file loads with
  ``weights_only=True``, so a checkpoint cannot run code) and ``trainer_state.json`` (step, history). One is
  written every ``save_steps`` steps, at the end, on Ctrl-C or SIGTERM to any rank (all ranks agree every step, and
  stop after the step in flight) and on a crash, always into a temporary folder renamed into place (``atomic_dir``).
- The run folder follows ``plumbing.runs``: it is locked while training; ``run_config.json`` records the config;
  another config refuses the folder, and so does a fresh start over this run's checkpoints, unless ``overwrite``
  (``RERUN_KEYS`` may differ). ``resume_from_checkpoint="last"`` takes the newest checkpoint by step number whose
  trainer_state.json parses. A window too long for the free memory is refused before anything is allocated.
- A NaN, inf or runaway (``max_loss_ratio``) train loss stops the run with ``TrainingDiverged`` before
  anything of it is saved; the checkpoints written before stay.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from plumbing.checkpoints import write_json_atomic
from plumbing.runs import (
    RUN_CONFIG,
    DivergenceGuard,
    Stopped,
    TrainingDiverged,
    any_ranks,
    check_resume,
    checkpoints,
    claim_output_dir,
    config_record,
    lock_run_dir,
    read_state,
    release_run_dir,
    resolve_resume,
    stop_flag,
    world_size,
)
from toy.config import TrainConfig, check_run_memory, upgrade_record
from toy.datasets import SequenceStream, seed_for_step
from toy.model import ToyModelConfig, build_model
from toy.optim import StepBatches, lr_factor, make_optimizer, make_trainer
from toy.processes import Process
from toy.train_checkpoint import load_weights, save_checkpoint, set_rng_state
from toy.validation import ValidationSet, validation_loss, validation_set

logger = logging.getLogger(__name__)

# TrainConfig fields a rerun or resume of the same run may change: where and how often it reports and saves,
# where it runs, its guard. None changes what a step computes. ``max_steps`` is not one of them (the cosine
# schedule depends on it): to train further, start a new folder with ``init_from``.
RERUN_KEYS = (
    "output_dir",
    "resume_from_checkpoint",
    "overwrite",
    "disable_tqdm",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "cpu_threads",
    "use_cpu",
    "torch_compile",
    "max_loss_ratio",
    "report_to",
)
# What a checkpoint's trainer_state.json must hold to resume from it (a 0-byte or cut-off file holds nothing).
STATE_KEYS = ("step", "history")


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


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The data generator of one (step, rank) (``toy.datasets.seed_for_step``): independent streams, identical on
    every replay."""
    return torch.Generator(device=device).manual_seed(seed_for_step(seed, step, rank))


def upgrade_run_config(out_dir: str | Path) -> None:
    """Rewrite ``<out_dir>/run_config.json`` of the release before TrainingArguments' names under the new names
    (``toy.config.upgrade_record``: the same config), so the folder's run resumes or reruns; call on the main process
    before claiming the folder. A record without old names, or no record, is left alone."""
    saved = Path(out_dir) / RUN_CONFIG
    if saved.is_file():
        old = json.loads(saved.read_text())
        if upgrade_record(old) != old:
            write_json_atomic(saved, upgrade_record(old))


def claim_experiment_dir(experiment_cfg, model_cfg: ToyModelConfig, train_cfg: TrainConfig) -> Path:
    """Claim ``train_cfg.output_dir`` for an experiment that trains its models one after another in one process:
    the folder records the three configs (``plumbing.runs.claim_output_dir``), and another config's results are
    refused, or replaced with ``--overwrite true`` (``RERUN_KEYS`` may differ). Returns the folder."""
    upgrade_run_config(train_cfg.output_dir)
    return claim_output_dir(
        train_cfg.output_dir,
        config_record(experiment_cfg, model_cfg, {"TrainConfig": train_cfg.record()}),
        overwrite=train_cfg.overwrite,
        ignore=RERUN_KEYS,
    )


def _claim(out_dir: Path, cfg: TrainConfig, record: dict, main: bool) -> Path | None:
    """The run-folder rule of the module docstring, before any training; returns the checkpoint to resume from."""
    saved = out_dir / RUN_CONFIG
    if main:
        upgrade_run_config(out_dir)
    if cfg.resume_from_checkpoint == "last" and checkpoints(out_dir) and not saved.is_file():
        # a run from before run records: refusing would leave only --overwrite, which deletes what to resume
        logger.warning(
            "%s has no %s (an older run): resuming without a config check; recording this config", out_dir, RUN_CONFIG
        )
        if main:
            write_json_atomic(saved, record)
    claim_output_dir(out_dir, record, overwrite=cfg.overwrite, ignore=RERUN_KEYS, write=main)
    ckpt = resolve_resume(cfg.resume_from_checkpoint, out_dir)
    if ckpt is not None:
        read_state(ckpt, keys=STATE_KEYS)  # before anything loads from it
        check_resume(ckpt, record, ignore=RERUN_KEYS)
        return Path(ckpt)
    old = checkpoints(out_dir)
    if cfg.resume_from_checkpoint is None and old:
        if not cfg.overwrite:
            raise FileExistsError(
                f"{out_dir} already holds checkpoints of this run (up to {old[-1].name}); pass --resume_from_checkpoint last to "
                "continue it, --overwrite true to train it again from scratch, or another --output_dir"
            )
        if main:
            logger.warning("overwrite: removing the checkpoints in %s", out_dir)
            for path in old:
                shutil.rmtree(path)
    return None


def make_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` with ``cfg``'s device and precision. accelerate keeps one state per process, fixed by the
    first trainer of the process; a TRL trainer before (bf16 on a GPU: the next seed of ``toy.experiments.rl``)
    would make ``mixed_precision="no"`` an error, and a ``use_cpu`` stage before would keep a GPU run on the CPU. So
    that state is dropped first, except the process group of a multi-process launch (a launch fixes the device)."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=not (dist.is_available() and dist.is_initialized()))
    return Accelerator(cpu=cfg.use_cpu, mixed_precision="bf16" if cfg.bf16 else "no")


def _params_finite(model: torch.nn.Module) -> bool:
    params = [p.detach() for p in model.parameters() if p.numel()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one host sync


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
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
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
        accelerator: an ``accelerate.Accelerator`` giving the run's device and ranks (default: a new one from
            ``cfg``); the Trainer's own accelerator shares its process state, so its device and precision must be
            ``cfg``'s.
        run_info: extra JSON-able facts stored in every checkpoint's trainer_state.json.
        eval_fn: ``model -> {name: float}``, called on the main process at step 0 of a fresh run and at every
            validation point; its entries join the history entry (e.g. the exact probe MSE per site: the
            emergence curve of the belief geometry). It must leave the model as it found it.

    Returns a ``TrainResult`` whose ``model`` is the unwrapped trained model (on the training device).
    """
    context_length = context_length or model.config.n_positions
    if context_length > model.config.n_positions:
        raise ValueError(f"context_length={context_length} exceeds the model's n_positions={model.config.n_positions}")
    if process.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{process.name} has {process.vocab_size} tokens but the model's vocab is {model.config.vocab_size}"
        )
    accelerator = accelerator or make_accelerator(cfg)
    world = accelerator.num_processes
    if world_size() > world:
        raise ValueError(
            f"the launcher started {world_size()} processes but the accelerator sees {world}: each would train "
            "alone into the same folder. On CPU pass --use_cpu true (configs/accelerate/cpu_multiprocess.yaml needs it)."
        )
    check_run_memory(model.config, process, cfg, context_length, accelerator.device, build_val=val is None)
    out_dir = Path(cfg.output_dir)
    # the folder is this run's (plumbing.locks) from before the claim to the end of training, then free for the next
    # run of this process or another
    taken = lock_run_dir(out_dir) if accelerator.is_main_process else False
    try:
        return _fit(process, model, cfg, context_length, val, data_fn, loss_weights_fn, accelerator, run_info, eval_fn)
    finally:
        if taken:
            release_run_dir(out_dir)


def _fit(
    process: Process,
    model: torch.nn.Module,
    cfg: TrainConfig,
    context_length: int,
    val: ValidationSet | None,
    data_fn,
    loss_weights_fn,
    accelerator,
    run_info: dict | None,
    eval_fn,
) -> TrainResult:
    """``train`` once the launch and the memory are checked and the folder is locked."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    tf32 = torch.backends.cuda.matmul.allow_tf32  # restored at the end: probes and evaluation want full float32
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(cfg.output_dir)
    run = {"process": process.name, "context_length": context_length, "world_size": world, "info": run_info or {}}
    record = config_record({"TrainConfig": cfg.record()}, {"run": run})
    ckpt = _claim(out_dir, cfg, record, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # no rank starts before the folder is claimed (and cleared on overwrite)
    raw = model.to(device)
    optimizer = make_optimizer(raw, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start, history = 0, []
    if ckpt is not None:
        # a multi-process CPU launch gives the device as cpu:0, and torch.load cannot map a storage onto an indexed CPU
        where = torch.device("cpu") if device.type == "cpu" else device
        load_weights(raw, ckpt, where)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=where, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        state = read_state(ckpt, keys=STATE_KEYS)
        start, history = state["step"], state["history"]
        accelerator.print(f"resumed from {ckpt} at step {start}")
    if val is None and accelerator.is_main_process and start < cfg.max_steps:  # a finished run is only reloaded
        val = validation_set(process, context_length, cfg.val_max_sequences, cfg.val_samples)
    extra = {"run_info": run_info or {}, "world_size": world, "context_length": context_length, "process": process.name}

    # every step's windows come from one stream (float64 draws, as toy.data.sample's default): batch c of it is
    # steps c*K .. c*K+K-1 (K = sample_chunk)
    batch = cfg.per_device_train_batch_size
    stream = SequenceStream(
        process,
        batch * cfg.sample_chunk,
        context_length,
        cfg.seed,
        rank=rank,
        belief_dtype=torch.float64,
        device=device,
    )
    cached = None

    def batch_of(step: int) -> torch.Tensor:
        nonlocal cached
        if data_fn is not None:
            tokens = data_fn(step, step_generator(cfg.seed, step, rank, device))
        else:
            # chunk c holds steps c*K .. c*K+K-1, the stream's batch c: replays exactly on resume
            chunk, offset = divmod(step, cfg.sample_chunk)
            if cached is None or cached[0] != chunk:
                cached = (chunk, stream.batch(chunk)["input_ids"])
            tokens = cached[1][offset * batch : (offset + 1) * batch]
        if tokens.shape[1] != context_length:
            raise ValueError(f"data_fn returned windows of {tokens.shape[1]} tokens; expected {context_length}")
        return tokens

    def unsaved(step: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"step {step}: the parameters hold NaN or inf; training stopped without saving them (last checkpoint: "
            f"{last_ckpt or 'none of this run'}). Lower learning_rate (or raise warmup_steps, set max_grad_norm), check "
            "data_fn / loss_weights_fn and the starting weights for NaN/inf, or resume from an earlier checkpoint."
        )

    def save(step: int) -> Path | None:
        # every rank checks (DDP keeps the parameters equal), so all raise together and none waits in a collective
        if not _params_finite(raw):
            raise unsaved(step)
        if not accelerator.is_main_process:
            return None
        return save_checkpoint(out_dir / f"checkpoint-{step}", raw, optimizer, scheduler, step, history, extra)

    tracker = _tracker(cfg.report_to, out_dir) if accelerator.is_main_process else None

    def evaluate(step: int, train_loss: float | None, elapsed: float) -> None:
        entry = {
            "step": step,
            "train_loss": train_loss,
            "lr": scheduler.get_last_lr()[0],
            "tokens": step * batch * world * context_length,
            "elapsed_s": elapsed,
        }
        if val is not None and (step == 0 or step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
            entry.update(val_loss=validation_loss(raw, val), floor=val.floor)
            if eval_fn is not None:
                was_training = raw.training
                entry.update(eval_fn(raw.eval()))
                raw.train(was_training)
        history.append(entry)
        if tracker is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "tokens"):
                    tracker.add_scalar(key, value, step)
            tracker.flush()

    if start == 0 and eval_fn is not None and accelerator.is_main_process:
        evaluate(0, None, 0.0)  # the curve starts at the random init

    step, last_ckpt, n_loss = start, None, 0
    # the project's divergence test, fed the logged losses at log points (registered as a Trainer callback it would
    # check every parameter and all-reduce a flag every step); a resume refills its yardstick
    guard = DivergenceGuard(cfg.max_loss_ratio or None)
    guard.first_losses = [h["train_loss"] for h in history if h.get("train_loss") is not None][: guard.reference_logs]

    def after_step(state) -> None:
        """The run's bookkeeping after each optimizer step: log, guard, validate, save, stop on a signal."""
        nonlocal step, n_loss, last_ckpt
        step = state.global_step
        n_loss += 1
        log_now = (
            step % cfg.logging_steps == 0 or step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)
        )
        stop, bad = flag["signal"] is not None, ""
        if log_now:
            train_loss = (trainer.loss_sum / n_loss).item()  # the only device sync of the step
            trainer.loss_sum.zero_()
            n_loss = 0
            try:
                guard.on_log(None, state, None, logs={"loss": train_loss})
            except TrainingDiverged as err:
                bad = str(err)
        if world > 1:
            # every rank stops at the same step, and a signal to any rank stops all at the end of this step
            # (launchers give 30 s before SIGKILL, whatever logging_steps is): a CPU all-reduce of two flags
            stop, other_bad = any_ranks([stop, bool(bad)])
            bad = bad or (f"step {step}: another rank's train loss diverged" if other_bad else "")
        if bad:
            raise TrainingDiverged(f"{bad} (last checkpoint: {last_ckpt or 'none of this run'})")
        if log_now and accelerator.is_main_process:
            evaluate(step, train_loss, t_prev + time.perf_counter() - t0)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
            last_ckpt = save(step) or last_ckpt
        if stop and step < cfg.max_steps:
            saved = save(step)
            accelerator.wait_for_everyone()  # no rank exits (and makes the launcher kill the rest) mid-save
            name = flag["signal"] or "a signal to another rank"
            accelerator.print(
                f"\n{name}: checkpoint at step {step} in {out_dir}; rerun with --resume_from_checkpoint last"
            )
            raise Stopped(name, saved, "--resume_from_checkpoint last")

    trainer = make_trainer(
        raw, optimizer, scheduler, cfg, StepBatches(batch_of, start), loss_weights_fn, start, after_step
    )
    if ckpt is not None:
        set_rng_state(ckpt / "rng.pt")
    t0, t_prev = time.perf_counter(), history[-1]["elapsed_s"] if history else 0.0
    try:
        with stop_flag() as flag:
            if step < cfg.max_steps:
                trainer.train()
    except Exception as err:
        # a crash leaves the last completed step on disk (main process only: no collective may run here);
        # diverged weights are never saved
        if (
            not isinstance(err, TrainingDiverged)
            and accelerator.is_main_process
            and step > start
            and _params_finite(raw)
        ):
            save(step)
            print(f"training failed at step {step + 1}; checkpoint of step {step} in {out_dir}", file=sys.stderr)
        raise
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if tracker is not None:
            tracker.close()
    elapsed = t_prev + time.perf_counter() - t0
    if accelerator.is_main_process and (not history or history[-1]["step"] != step):
        evaluate(step, None, elapsed)  # only when there was nothing left to train
    if step > start or ckpt is None:
        last_ckpt = save(step) or last_ckpt
    else:
        last_ckpt = ckpt if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    final = history[-1] if history else {}
    run_tokens = (step - start) * batch * world * context_length
    return TrainResult(
        model=raw,
        history=history,
        val_loss=final.get("val_loss", float("nan")),
        floor=final.get("floor", float("nan")),
        step=step,
        tokens_seen=step * batch * world * context_length,
        elapsed_s=elapsed,
        tokens_per_s=run_tokens / max(time.perf_counter() - t0, 1e-9),
        checkpoint_dir=last_ckpt,
    )


def _tracker(report_to: str, out_dir: Path):
    """A TensorBoard ``SummaryWriter`` under ``<out_dir>/runs`` when ``report_to`` names it and it is installed;
    otherwise None (one line says why, so a missing optional tracker never stops a run)."""
    if report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("report_to=tensorboard: tensorboard is not installed; not logging to it (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(out_dir / "runs"))


def set_cpu_threads(cfg: TrainConfig) -> None:
    """Entry points call this (library code never changes the thread count)."""
    if cfg.cpu_threads and (cfg.use_cpu or not torch.cuda.is_available()):
        torch.set_num_threads(cfg.cpu_threads)


def train_on(
    process: Process,
    model_cfg: ToyModelConfig,
    train_cfg: TrainConfig,
    context_length: int,
    output_dir: str | Path,
    seed: int,
) -> torch.nn.Module:
    """Pre-train a fresh toy GPT-2 on ``process`` with ``train``; checkpoints go to ``output_dir``.

    ``seed`` replaces ``train_cfg.seed`` (model init and data). ``output_dir`` belongs to the caller's experiment,
    whose own folder record vouches for it: what an earlier run left there is replaced. Returns the trained
    model in eval mode.
    """
    cfg = replace(
        train_cfg, output_dir=str(output_dir), seed=seed, resume_from_checkpoint=None, init_from=None, overwrite=True
    )
    model = build_model(model_cfg, process.vocab_size, context_length, seed=seed)
    result = train(process, model, cfg, context_length)
    return result.model.eval()
