"""LoRA presets and the trainability guard, shared by ``llm`` (EM fine-tuning, GRPO) and ``toy`` (toy EM).

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

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

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
        metadata={
            "help": "Block indices (0-based): exactly one for rank1_single, >=1 for rank1_multi, optional for rank32."
        },
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
    for name, _ in model.named_modules():
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
        r=cfg.rank,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers_to_transform,
        use_rslora=True,
        bias="none",
        task_type="CAUSAL_LM",
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
