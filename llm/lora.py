"""LoRA trajectories of EM fine-tuning: A/B saved at every logging step and their report.

The presets and the trainability guard live in ``plumbing.lora`` (``toy`` uses them too).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from plumbing.lora import lora_tensors


class LoraTrajectoryCallback(TrainerCallback):
    """Saves every LoRA A/B at the start and at each logging step to
    ``<output_dir>/lora_trajectory/step_<global_step:06d>.safetensors`` (main process only).

    Under FSDP the parameters are sharded; this callback then saves each rank's view only on rank 0,
    so use it with single-device or DDP runs. At the start of training, files past the starting step are
    removed: they come from an earlier run (or the abandoned part of a resumed one) and would otherwise be
    mixed into this run's trajectory.
    """

    def _save(self, args, state, model):
        if not state.is_world_process_zero or model is None:
            return
        from safetensors.torch import save_file

        model = getattr(model, "module", model)  # DDP wrapper
        tensors = lora_tensors(model)
        if not tensors:
            return
        out = Path(args.output_dir) / "lora_trajectory"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out / f"step_{state.global_step:06d}.safetensors")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            for old in (Path(args.output_dir) / "lora_trajectory").glob("step_*.safetensors"):
                if int(old.stem.split("_")[1]) > state.global_step:
                    old.unlink()
        self._save(args, state, model)

    def on_log(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan  # B starts at zero: no direction yet
    return float((a.flatten() @ b.flatten()) / (na * nb))


def lora_trajectory_report(directory: str | Path) -> dict[str, dict]:
    """Trajectory of each LoRA module from the ``step_*.safetensors`` files in ``directory``.

    Returns ``{module: {...}}`` with lists over the saved steps (ascending): ``steps``,
    ``norm_A``, ``norm_B`` (Frobenius), ``cos_B_final`` (cosine of the flattened B to the last
    saved B), ``cos_B_prev`` (to the previous saved B; NaN at the first step or while B is zero),
    ``turn_per_step`` = (1 - cos_B_prev) / steps elapsed, and the scalar ``fastest_turn_step``: the
    step ending the interval where B turns fastest (None when no interval is defined).
    """
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no step_*.safetensors in {directory}; was LoraTrajectoryCallback attached?")
    steps = [int(p.stem.split("_")[1]) for p in files]
    snaps = [load_file(p) for p in files]
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in snaps[-1]})
    report = {}
    for mod in modules:
        As = [s[f"{mod}.lora_A"] for s in snaps]
        Bs = [s[f"{mod}.lora_B"] for s in snaps]
        cos_prev = [math.nan] + [_cos(Bs[i], Bs[i - 1]) for i in range(1, len(Bs))]
        turn = [math.nan] + [(1 - cos_prev[i]) / (steps[i] - steps[i - 1]) for i in range(1, len(Bs))]
        valid = [i for i, t in enumerate(turn) if not math.isnan(t)]
        report[mod] = {
            "steps": steps,
            "norm_A": [float(a.norm()) for a in As],
            "norm_B": [float(b.norm()) for b in Bs],
            "cos_B_final": [_cos(b, Bs[-1]) for b in Bs],
            "cos_B_prev": cos_prev,
            "turn_per_step": turn,
            "fastest_turn_step": steps[max(valid, key=lambda i: turn[i])] if valid else None,
        }
    return report


def plot_lora_trajectory(report: dict[str, dict], path: str | Path) -> None:
    """``lora_trajectory_report``'s modules over the saved steps: |B| (left; the update's size, since A is
    near its init) and cos(B, final B) (right; when the update's direction settles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, (mod, t) in enumerate(report.items()):
        label = ".".join(mod.split(".")[-4:])
        ax[0].plot(t["steps"], t["norm_B"], "o-", ms=3, color=f"C{i % 10}", label=label)
        ax[1].plot(t["steps"], t["cos_B_final"], "o-", ms=3, color=f"C{i % 10}", label=label)
    ax[0].set(xlabel="training step", ylabel="||B|| (Frobenius)", title="LoRA B norm")
    ax[1].set(xlabel="training step", ylabel="cos(B, final B)", title="LoRA B direction", ylim=(-1.05, 1.05))
    for a in ax:
        if len(report) <= 12:
            a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
