"""The optimisation recipe of toy pre-training (``toy.train``): the optimizer ``cfg.optim`` names, the learning-rate
multiplier per step (linear warm-up, then cosine down to ``min_lr_ratio`` or constant), and the ``transformers.Trainer``
that runs the steps (its loss and its per-step data)."""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer

from toy.config import TrainConfig
from toy.train_checkpoint import restore_rng, rng_state


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


class StepBatches(IterableDataset):
    """Training batches from step ``start`` on, one item per optimizer step: ``{"input_ids": batch_of(step)}``. The
    batch is a function of the step alone (``toy.datasets.SequenceStream`` or a ``data_fn``), so a resume rebuilds
    the stream at its step instead of drawing and skipping the consumed batches."""

    def __init__(self, batch_of: Callable[[int], torch.Tensor], start: int):
        self.batch_of, self.start = batch_of, start

    def __iter__(self):
        step = self.start
        while True:
            yield {"input_ids": self.batch_of(step)}
            step += 1


class ToyTrainer(Trainer):
    """``transformers.Trainer`` on a ``StepBatches`` with toy pre-training's loss: mean next-token cross-entropy over
    positions 2..n of each window, or with ``loss_weights_fn`` (tokens -> (batch, length - 1) weights)
    ``sum(w * ce) / sum(w)``. ``loss_sum`` adds up the step losses between two reads (on the device: no sync)."""

    def __init__(self, *args, loss_weights_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights_fn = loss_weights_fn
        self.loss_sum = torch.zeros((), device=self.args.device)

    def get_train_dataloader(self) -> DataLoader:
        # every rank draws its own stream (seeded by its rank): accelerate's loader would split one stream over them.
        # The loader's own generator: its worker seed would otherwise be a draw from the global RNG.
        return DataLoader(self.train_dataset, batch_size=None, generator=torch.Generator())

    def floating_point_ops(self, inputs) -> int:
        # the Trainer's per-step FLOP count walks every parameter (about 1% of a CPU step of the main job's model);
        # toy.train reports tokens, not FLOPs
        return 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs["input_ids"]
        logits = model(input_ids=tokens).logits
        V = logits.shape[-1]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
        if self.loss_weights_fn is None:
            loss = ce.mean()
        else:
            w = self.loss_weights_fn(tokens).to(ce.dtype).reshape(-1)
            if w.shape != ce.shape:
                raise ValueError(f"loss_weights_fn must return (batch, {tokens.shape[1] - 1}) weights")
            loss = (w * ce).sum() / w.sum().clamp_min(1e-12)
        self.loss_sum += loss.detach()
        return (loss, logits) if return_outputs else loss


def make_trainer(model, optimizer, scheduler, cfg: TrainConfig, data, loss_weights_fn, start: int, after_step):
    """The ``ToyTrainer`` that runs ``cfg``'s steps ``start`` .. ``max_steps`` of ``model`` on ``data`` with the given
    optimizer and scheduler (a resume loaded both); ``after_step(state)`` does the run's bookkeeping at every step end.
    The Trainer itself logs, evaluates and saves nothing: ``toy.train`` keeps its own history and checkpoints."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    class Bookkeeping(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state.global_step = start  # the loaded schedule and the stream at ``start`` continue from here

        def on_step_end(self, args, state, control, **kwargs):
            after_step(state)

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=1,  # one item of ``data`` is a whole step's batch
        max_grad_norm=cfg.max_grad_norm or 0.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=cfg.disable_tqdm,
        use_cpu=cfg.use_cpu,
        bf16=cfg.bf16,
        torch_compile=cfg.torch_compile,
        seed=cfg.seed,
        logging_nan_inf_filter=False,  # a NaN loss must reach the guard, and the filter would sync every step
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
    )
    # the Trainer seeds the global RNGs when built; the run's RNGs stay as the caller left them (or the checkpoint's)
    torch_rng, py_rng = rng_state(), random.getstate()
    trainer = ToyTrainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(optimizer, scheduler),
        callbacks=[Bookkeeping()],
        loss_weights_fn=loss_weights_fn,
    )
    restore_rng(torch_rng)
    random.setstate(py_rng)
    trainer.remove_callback(PrinterCallback)  # it would print the Trainer's end-of-run metrics as a dict
    return trainer
