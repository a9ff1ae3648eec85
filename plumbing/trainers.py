"""TRL glue shared by ``toy`` and ``llm``: CPU-safe config defaults, the GRPO batch check, the zero-advantage
callback, process-group teardown and the exit of a stopped run."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import NoReturn

import torch
from transformers import TrainerCallback

from plumbing.stops import Stopped, resume_command


@dataclass
class CPUSafeDefaults:
    """Mix in before a TRL config class (``class MyConfig(CPUSafeDefaults, GRPOConfig)``): ``bf16`` None -> on only
    when CUDA is available (TRL turns it on even on CPU), and activation (gradient) checkpointing off unless asked
    with ``activation_checkpointing`` (TRL turns it on; it costs ~20% speed and small models do not need it)."""

    # None (not False) so transformers' deprecated-alias resolution stays silent; it then resolves
    # activation_checkpointing None -> False.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (default off)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = on when CUDA is available, off on CPU."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and not self.fp16 and not self.use_cpu
        super().__post_init__()


def check_batch_sizes(
    num_generations: int,
    per_device_batch: int,
    world_size: int,
    steps_per_generation: int,
    generation_batch_size: int | None = None,
) -> int:
    """Number of prompts per generation round; raises, naming the flags, when the completions of one round
    (``generation_batch_size``, default per-device batch x processes x steps per generation) do not split into
    whole groups of ``num_generations``, or a group has fewer than 2 completions (no advantage to compute)."""
    if num_generations is None or num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: GRPO compares completions within a group; use >= 2")
    total = generation_batch_size or per_device_batch * world_size * steps_per_generation
    if total % num_generations:
        raise ValueError(
            f"{total} completions per generation round (per_device_train_batch_size {per_device_batch} x {world_size} processes x "
            f"{steps_per_generation} steps per generation) is not a multiple of num_generations={num_generations}; "
            "change per_device_train_batch_size, gradient_accumulation_steps or num_generations"
        )
    return total // num_generations


def check_grpo_config_batch_sizes(args) -> int:
    """``check_batch_sizes`` of a ``trl.GRPOConfig``'s own fields (call it from ``__post_init__``, before TRL's own
    check, which names no flag to change); the number of processes is the launcher's ``WORLD_SIZE``."""
    return check_batch_sizes(
        args.num_generations,
        args.per_device_train_batch_size,
        int(os.environ.get("WORLD_SIZE", 1)),
        args.steps_per_generation or args.gradient_accumulation_steps,
        args.generation_batch_size,
    )


class ZeroAdvantageCallback(TrainerCallback):
    """Watches TRL's logged ``frac_reward_zero_std``, the share of GRPO groups whose rewards are all equal (they
    get zero advantage and teach nothing), and warns when it crosses ``threshold`` from below, so a run that
    silently stalls says so once per episode. ``history``: ``(step, share)`` per log; ``flagged``: the logs above
    ``threshold``."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.history: list[tuple[int, float]] = []
        self.flagged: list[tuple[int, float]] = []
        self._above = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        share = (logs or {}).get("frac_reward_zero_std")
        if share is None:
            return
        share = float(share)
        self.history.append((state.global_step, share))
        above = share > self.threshold
        if above:
            self.flagged.append((state.global_step, share))
        if above and not self._above:
            warnings.warn(
                f"step {state.global_step}: {share:.0%} of GRPO groups have all-equal rewards (identical rewards: zero "
                f"advantage, no gradient; threshold {self.threshold:.0%}). Raise num_generations or temperature, or use "
                "a reward that varies within a group",
                RuntimeWarning,
                stacklevel=2,
            )
        self._above = above

    def summary(self) -> dict:
        shares = [s for _, s in self.history]
        return {
            "mean": sum(shares) / len(shares) if shares else float("nan"),
            "max": max(shares, default=float("nan")),
            "last": shares[-1] if shares else float("nan"),
            "steps_above_threshold": len(self.flagged),
            "threshold": self.threshold,
        }


def end_processes() -> None:
    """Under a multi-process launch, wait for every rank and destroy the process group before exit: a gloo
    rank that exits with the group alive can abort in teardown ("terminate called without an active
    exception", seen once in CI after a finished 2-rank run). A no-op in a single process."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def exit_stopped(stop: Stopped, module: str, argv: list[str] | None) -> NoReturn:
    """End a trainer entry point whose run was stopped (Ctrl-C / SIGTERM; its checkpoint is saved): leave the process
    group, print the stop and the command that resumes it (``argv`` None: this process's own arguments), and exit
    with the stop's code."""
    end_processes()
    print(stop.describe(resume_command(module, sys.argv[1:] if argv is None else argv)), file=sys.stderr)
    raise SystemExit(stop.exit_code) from None
