"""LoRA presets for emergent-misalignment fine-tuning, a trainability guard, and LoRA trajectories.

Presets (``LoraPresetConfig.preset``):

- ``rank1_single``: one rank-1 LoRA on the MLP down-projection of one layer (the minimal EM
  intervention; ``layers=[k]``).
- ``rank1_multi``: rank-1 LoRAs on the MLP down-projections of several layers.
- ``rank32_all_linear``: rank 32 on every linear layer of the blocks, rsLoRA scaling
  (``alpha / sqrt(r)``); ``layers`` optionally restricts it to some blocks.
- ``full``: no adapter, every parameter trains.

Conventions: for a base weight ``W: (d_out, d_in)`` LoRA adds ``scale * B @ A`` with
``A: (r, d_in)`` (random init) and ``B: (d_out, r)`` (zero init). For rank 1 on ``down_proj``,
``B`` is a d_model vector written into the residual stream and ``A`` a d_mlp read-out vector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

Preset = Literal["rank1_single", "rank1_multi", "rank32_all_linear", "full"]

# The MLP's output projection (d_mlp -> d_model) under the names transformers' families use.
DOWN_PROJ_SUFFIXES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_DEFAULT_ALPHA = {"rank1_single": 512.0, "rank1_multi": 512.0, "rank32_all_linear": 64.0}


@dataclass
class LoraPresetConfig:
    """Which parameters train. Parsed by ``HfArgumentParser``/``TrlParser``."""

    preset: Preset = field(
        default="rank1_single",
        metadata={"help": "rank1_single, rank1_multi, rank32_all_linear (rsLoRA) or full fine-tuning."},
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={"help": "Block indices (0-based): exactly one for rank1_single, >=1 for rank1_multi, optional for rank32."},
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA alpha (rsLoRA scale = alpha/sqrt(r)); None = 512 for rank 1, 64 for rank 32."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})

    def __post_init__(self):
        self.layers = [int(x) for x in self.layers]
        n = len(self.layers)
        if self.preset == "rank1_single" and n != 1:
            raise ValueError(f"preset rank1_single needs exactly one layer in `layers`, got {self.layers}")
        if self.preset == "rank1_multi" and n < 1:
            raise ValueError("preset rank1_multi needs at least one layer in `layers`")
        if self.preset == "full" and (n or self.lora_alpha is not None):
            raise ValueError("preset full trains every parameter; drop `layers` and `lora_alpha`")
        if len(set(self.layers)) != n:
            raise ValueError(f"duplicate layer indices in {self.layers}")

    @property
    def rank(self) -> int | None:
        return {"rank1_single": 1, "rank1_multi": 1, "rank32_all_linear": 32}.get(self.preset)


def _layer_of(name: str) -> int | None:
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def down_proj_modules(model: torch.nn.Module, layers: list[int]) -> list[str]:
    """Full module names of the MLP down-projection of each block in ``layers`` (in that order)."""
    found = {}
    for name, module in model.named_modules():
        if name.endswith(DOWN_PROJ_SUFFIXES) and _layer_of(name) in layers:
            found[_layer_of(name)] = name
    missing = [k for k in layers if k not in found]
    if missing:
        raise ValueError(
            f"no MLP down-projection ({', '.join(DOWN_PROJ_SUFFIXES)}) found for layers {missing} "
            f"in {type(model).__name__}"
        )
    return [found[k] for k in layers]


def peft_config_for(cfg: LoraPresetConfig, model: torch.nn.Module):
    """A ``peft.LoraConfig`` for ``cfg`` on ``model`` (exact module names), or None for ``full``.

    Validate ``cfg.layers`` against the depth first (``llm.models.validate_layers``); this function
    only resolves names on an already-loaded model.
    """
    from peft import LoraConfig

    if cfg.preset == "full":
        return None
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else _DEFAULT_ALPHA[cfg.preset]
    if cfg.preset in ("rank1_single", "rank1_multi"):
        targets: list[str] | str = down_proj_modules(model, cfg.layers)
        layers_to_transform = None
    else:
        targets = "all-linear"  # peft excludes the output head
        layers_to_transform = cfg.layers or None
    return LoraConfig(
        r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        layers_to_transform=layers_to_transform, use_rslora=True, bias="none", task_type="CAUSAL_LM",
    )


def assert_trainable(model: torch.nn.Module) -> int:
    """Number of trainable parameters; raises when there are none.

    Catches the silent failure where a PEFT adapter is loaded for inference
    (``PeftModel.from_pretrained`` defaults to ``is_trainable=False``) and training then changes nothing.
    """
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise ValueError(
                "PEFT model has no trainable parameters: it was loaded for inference. Load the adapter with "
                "PeftModel.from_pretrained(..., is_trainable=True) or build it with get_peft_model."
            )
        raise ValueError("model has no trainable parameters (all requires_grad=False); nothing would train")
    return n


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r)}`` for the active adapter, float32 CPU copies."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "active_adapters"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    base = name.removeprefix("base_model.model.")
                    out[f"{base}.lora_A"] = module.lora_A[adapter].weight.detach().float().cpu().clone()
                    out[f"{base}.lora_B"] = module.lora_B[adapter].weight.detach().float().cpu().clone()
    return out


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
