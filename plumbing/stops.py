"""Polite stops and divergence guards shared by every training loop.

- ``polite_stop()`` turns SIGTERM into the same ``KeyboardInterrupt`` as Ctrl-C, so one ``except KeyboardInterrupt``
  path saves for both; ``stop_flag()`` sets a flag instead, so the step in flight finishes first.
- ``any_ranks(flags)`` agrees on flags across ranks (True everywhere when True on any): one small CPU all-reduce, cheap
  enough to run every step, so every rank stops at the same step whatever the logging interval.
- ``StopOnSignal`` is the Trainer-callback form (the trainer saves a checkpoint at the end of the step in flight and
  stops); ``train_until_stopped(trainer)`` wires it up and raises ``Stopped`` with the shell's exit code.
- ``DivergenceGuard`` is a Trainer callback that raises ``TrainingDiverged`` as soon as the trainable parameters, the
  logged loss or the gradient norm stop being finite (or the loss runs away), before the trainer saves that step, so a
  diverged run never leaves NaN weights behind as if they were a result.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from transformers import TrainerCallback

from plumbing.checkpoints import latest_checkpoint


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def polite_stop() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C, so one handler saves for both.
    A no-op outside the main thread (Python delivers signals to the main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_flag() -> Iterator[dict]:
    """Within the block SIGINT and SIGTERM set ``flag["signal"]`` instead of raising, so the step in
    flight finishes and the caller saves at a step boundary. A second Ctrl-C raises at once."""
    flag: dict[str, Any] = {"signal": None}

    def handle(signum, frame):
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    try:
        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_FLAG_GROUPS: dict[int, Any] = {}


def _flag_group():
    """The process group stop flags travel in: the default one under gloo; under NCCL a gloo group made once, at the
    first call (every rank makes it at the same step), so a per-step flag is a CPU all-reduce, never a device sync."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _FLAG_GROUPS:
        _FLAG_GROUPS[key] = dist.new_group(backend="gloo")
    return _FLAG_GROUPS[key]


def any_ranks(flags: Sequence[bool]) -> list[bool]:
    """Each of ``flags``, True on every rank if True on any (unchanged without an initialised process group), so all
    ranks stop at the same step and a collective save cannot deadlock."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group())
    return [bool(v) for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """``flag``, True on every rank if True on any (``any_ranks`` of one flag)."""
    return any_ranks([flag])[0]


class StopOnSignal(TrainerCallback):
    """A ``transformers`` Trainer callback: on SIGINT or SIGTERM the step in flight finishes, the
    trainer saves a checkpoint (``save_strategy`` permitting none is fine: it forces one) and stops.

    Use with ``stop_flag()`` around ``trainer.train()`` and pass the flag in; after ``train()`` returns,
    ``callback.stopped`` names the signal (or is None) so the caller can exit non-zero and say how to resume.
    """

    def __init__(self, flag: dict):
        self.flag = flag
        self.stopped: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.flag.get("signal") is not None):
            self.stopped = self.flag.get("signal") or "signal on another rank"
            control.should_save = True
            control.should_training_stop = True
        return control


def train_until_stopped(trainer, resume: str | None = None) -> None:
    """``trainer.train(resume_from_checkpoint=resume)`` where Ctrl-C or SIGTERM finishes the step in flight,
    saves a checkpoint and raises ``Stopped`` (the caller exits with ``exit_code``); a signal during the
    last step lets the run finish normally."""
    with stop_flag() as flag:
        stop = StopOnSignal(flag)
        trainer.add_callback(stop)
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            trainer.remove_callback(stop)
    if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
        raise Stopped(stop.stopped, latest_checkpoint(trainer.args.output_dir), "--resume_from_checkpoint last")


class Stopped(KeyboardInterrupt):
    """Training stopped early on Ctrl-C or SIGTERM (after saving ``checkpoint``, if not None). ``exit_code`` is
    the shell's 128 + signal number; ``describe(resume_hint)`` is the line to print before exiting. A
    ``KeyboardInterrupt``, so ``except Exception`` crash handlers (which save the last step) leave it alone."""

    def __init__(self, signal_name: str, checkpoint: str | Path | None, resume_hint: str | None = None):
        self.signal_name, self.checkpoint = signal_name, checkpoint
        signum = getattr(signal.Signals, signal_name, None) if isinstance(signal_name, str) else None
        self.exit_code = 128 + int(signum) if signum is not None else 1
        hint = f"; rerun the same command with {resume_hint}" if resume_hint else ""
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint}{hint}")

    def describe(self, resume_hint: str) -> str:
        if self.checkpoint is None:
            return f"stopped by {self.signal_name} before any checkpoint was saved"
        return f"stopped by {self.signal_name}; checkpoint saved to {self.checkpoint}. Resume with:\n  {resume_hint}"


def resume_command(module: str, argv: list[str]) -> str:
    """The command that resumes a stopped run: the same arguments plus ``--resume_from_checkpoint last``."""
    import shlex

    args = list(argv)
    if "--resume_from_checkpoint" in args:
        i = args.index("--resume_from_checkpoint")
        del args[i : i + 2]
    args = [a for a in args if not a.startswith("--resume_from_checkpoint=")]
    return " ".join(["python", "-m", module, *map(shlex.quote, args), "--resume_from_checkpoint", "last"])


class TrainingDiverged(FloatingPointError):
    """The run produced non-finite numbers or a runaway loss (``DivergenceGuard``, ``toy.train``); nothing
    of the diverged steps was saved."""


class DivergenceGuard(TrainerCallback):
    """A ``transformers`` Trainer callback that stops a diverged run before it saves.

    At every step end (which the Trainer runs before its save) the trainable parameters are checked for
    NaN/inf: the Trainer's ``logging_nan_inf_filter`` (on by default) replaces a NaN loss in the logs with
    the running mean, so the logs alone would not show it. At every log, a non-finite ``loss`` or
    ``grad_norm``, or (``max_loss_ratio``) a loss above that multiple of the mean of the first
    ``reference_logs`` logged losses (a mean, so one easy first batch does not set a tiny yardstick),
    raises too. Every rank raises at the same step (``any_rank``), so none waits forever in a collective.
    """

    def __init__(self, max_loss_ratio: float | None = None, reference_logs: int = 5):
        if max_loss_ratio is not None and not max_loss_ratio > 1:
            raise ValueError(f"max_loss_ratio={max_loss_ratio}; use a multiple > 1 of the first losses, or None")
        self.max_loss_ratio, self.reference_logs = max_loss_ratio, reference_logs
        self.first_losses: list[float] = []

    def _raise(self, state, why: str):
        raise TrainingDiverged(
            f"step {state.global_step}: {why}; training stopped before saving this step. Lower learning_rate "
            "(or raise warmup), check the data and the starting weights for NaN/inf, or resume from an earlier "
            "checkpoint with --resume_from_checkpoint <output_dir>/checkpoint-<step>."
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        bad = False
        if model is not None:
            params = [p.detach() for p in model.parameters() if p.requires_grad and p.numel()]
            if params:
                # one reduction and one host sync per step, not one per tensor
                bad = not bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if any_rank(bad):
            self._raise(state, "trainable parameters hold NaN or inf after the update")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        logs = logs or {}
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                self._raise(state, f"logged {key} is {value}")
        loss = logs.get("loss")
        if loss is not None and self.max_loss_ratio is not None:
            if len(self.first_losses) < self.reference_logs:
                self.first_losses.append(loss)
                return control
            reference = sum(self.first_losses) / len(self.first_losses)
            if reference > 0 and loss > self.max_loss_ratio * reference:
                self._raise(
                    state,
                    f"loss {loss:.4g} exceeds max_loss_ratio={self.max_loss_ratio} x the mean of the first "
                    f"{len(self.first_losses)} logged losses ({reference:.4g}): diverging",
                )
        return control
