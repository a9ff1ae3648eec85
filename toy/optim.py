"""The optimisation recipe of toy pre-training (``toy.train``): the optimizer ``cfg.optim`` names and the learning-rate
multiplier per step (linear warm-up, then cosine down to ``min_lr_ratio`` or constant)."""

from __future__ import annotations

import math

import torch

from toy.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.learning_rate`` at ``step``: linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler_type == "constant_with_warmup":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate)
    # the fused kernel updates every tensor in one launch: the toy model's steps are launch-bound on GPU
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay, fused=fused
    )
