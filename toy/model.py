"""The toy transformer: a Hugging Face ``GPT2LMHeadModel`` built from a ``GPT2Config`` (never re-implemented).

Presets (``ToyModelConfig(preset=...)``; any field set explicitly overrides the preset's value):

* ``"mess3"`` -- the belief-geometry paper's Mess3 model: 4 layers, d_model 64, 1 head, MLP 256, ReLU,
  LayerNorm, learned positions. The paper's single head has size 8 (TransformerLens allows
  ``d_head != d_model / n_heads``); GPT-2 ties the head size to ``d_model / n_heads``, so the one head
  here has size 64. That is the choice closest to the paper's model that GPT-2 can express: same depth,
  width, MLP and head count, a wider attention head (more attention parameters, same residual width).
* ``"rrxor"`` -- the paper's RRXOR model: 4 layers, d_model 128, 4 heads of 32 (the paper: 4 of 16), MLP 512.
* ``"mess3_small"`` -- 2 layers, d_model 32, 1 head, MLP 128: a fast model for smoke runs and tests.

Dropout is 0 everywhere (the data are fresh samples every step; dropout would only blur the belief
geometry), and the unembedding is untied from the embedding (as in the paper's TransformerLens model:
with a vocabulary of 3 a tied unembedding would be a strong constraint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from transformers import GPT2Config, GPT2LMHeadModel

# (n_layers, d_model, n_heads, d_mlp)
_PRESETS = {
    "mess3": (4, 64, 1, 256),
    "rrxor": (4, 128, 4, 512),
    "mess3_small": (2, 32, 1, 128),
}


@dataclass
class ToyModelConfig:
    """Architecture of the toy GPT-2. Fields left ``None`` take the preset's value."""

    preset: Literal["mess3", "rrxor", "mess3_small"] = field(
        default="mess3", metadata={"help": "Architecture preset (see toy/model.py); explicit fields override it."}
    )
    n_layers: int | None = field(default=None, metadata={"help": "Number of transformer blocks."})
    d_model: int | None = field(default=None, metadata={"help": "Residual stream width."})
    n_heads: int | None = field(default=None, metadata={"help": "Attention heads; must divide d_model."})
    d_mlp: int | None = field(default=None, metadata={"help": "MLP hidden width."})
    activation: Literal["relu", "gelu_new", "gelu"] = field(default="relu", metadata={"help": "MLP activation."})

    def __post_init__(self):
        if self.preset not in _PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; use one of {sorted(_PRESETS)}")
        for name, value in zip(("n_layers", "d_model", "n_heads", "d_mlp"), _PRESETS[self.preset]):
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; GPT-2's head size is d_model / n_heads"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def gpt2_config(cfg: ToyModelConfig, vocab_size: int, context_length: int) -> GPT2Config:
    """The ``GPT2Config`` of a toy model reading windows of ``context_length`` tokens over ``vocab_size``."""
    if vocab_size < 2 or context_length < 2:
        raise ValueError(f"vocab_size and context_length must be >= 2; got {vocab_size}, {context_length}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=context_length,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        activation_function=cfg.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        use_cache=False,
        # no special tokens: every id is a process token (GPT-2's defaults point at id 50256)
        bos_token_id=None,
        eos_token_id=None,
    )


def build_model(cfg: ToyModelConfig, vocab_size: int, context_length: int, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised float32 ``GPT2LMHeadModel`` (on CPU); the same ``seed`` gives the same weights.

    The seed drives a private generator state (the global RNG is restored afterwards), so building a
    model never changes the randomness of the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(cfg, vocab_size, context_length))
    return model


def rank1_lora(model: GPT2LMHeadModel, layer: int, alpha: float = 1.0, seed: int = 0):
    """``model`` wrapped by peft with ``plumbing.lora``'s rank-1 preset on block ``layer``'s ``mlp.c_proj``.

    GPT-2's ``c_proj`` is a ``Conv1D`` (weight ``(d_in, d_out)``), so peft needs ``fan_in_fan_out=True``; peft draws
    A's init from the global RNG, so it is drawn under ``seed`` without touching the caller's RNG."""
    from peft import get_peft_model

    from plumbing.lora import LoraPresetConfig, assert_trainable, peft_config_for

    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"lora layer {layer} is not a block of this {n_layers}-layer model; use 0..{n_layers - 1}")
    peft_cfg = peft_config_for(LoraPresetConfig(preset="rank1_single", layers=[layer], lora_alpha=alpha), model)
    peft_cfg.fan_in_fan_out = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = get_peft_model(model, peft_cfg)
    assert_trainable(lora)
    return lora
