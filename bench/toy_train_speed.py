"""Toy pre-training as ``toy.train.train`` runs it (``transformers.Trainer`` through ``toy.optim.ToyTrainer``, with
the run's bookkeeping callback: history, guard, signal checks) against a bare ``transformers.Trainer``, side by side
in one run on the main job's config (configs/toy/mess3.yaml: Mess3 model, AdamW, warm-up + cosine, batch 256).

    python bench/toy_train_speed.py                       # 300 steps each, one thread, two rounds
    python bench/toy_train_speed.py --steps 500 --rounds 3

Both train the same initial weights on the same data stream (``toy.datasets.SequenceStream``: step k's windows
are ``toy.data.sample`` seeded by (seed, k, rank)) with the same optimizer (``toy.optim.make_optimizer``), learning
rate schedule (``toy.optim.lr_factor``), gradient clipping and loss (mean next-token cross-entropy); the Trainer
gets them through its public seams (``optimizers=``, a ``compute_loss`` override, a batch-per-item data loader).
Validation, saving and logging to trackers are off in both, so only the training step is timed.

Printed per trainer and round: tokens/s on the process's CPU clock (one thread: the work done, robust to other
jobs on a shared machine) and on the wall clock, each from step ``steps // 5`` to the end (start-up excluded),
then the bare Trainer / toy.train ratios and whether the final weights are ``torch.equal``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from plumbing.config import ConfigParser  # noqa: E402
from toy.config import ProcessConfig, TrainConfig  # noqa: E402
from toy.datasets import SequenceStream  # noqa: E402
from toy.model import ToyModelConfig, build_model  # noqa: E402
from toy.optim import lr_factor, make_optimizer  # noqa: E402
from toy.train import train  # noqa: E402
from toy.validation import validation_set  # noqa: E402

F64 = torch.float64  # toy.data.sample's draws, which toy.train's stream keeps


class Clock:
    """CPU and wall seconds at the steps it is told about."""

    def __init__(self):
        self.at: dict[int, tuple[float, float]] = {}

    def mark(self, step: int) -> None:
        self.at[step] = (time.process_time(), time.perf_counter())

    def rates(self, first: int, last: int, tokens_per_step: int) -> tuple[float, float]:
        (c0, w0), (c1, w1) = self.at[first], self.at[last]
        n = (last - first) * tokens_per_step
        return n / (c1 - c0), n / (w1 - w0)


def toy_train(process, model_cfg, cfg: TrainConfig, length: int, val, first: int):
    """``toy.train.train`` with a clock on its data: step k's batch (the stream's, as the default sampler draws it)
    is asked for right after step k - 1 ends, so marks at ``first`` and ``max_steps - 1`` time the steps between."""
    clock, stream = (
        Clock(),
        SequenceStream(process, cfg.per_device_train_batch_size, length, cfg.seed, belief_dtype=F64),
    )

    def data(step: int, generator) -> torch.Tensor:
        if step in (first, cfg.max_steps - 1):
            clock.mark(step)
        return stream.batch(step)["input_ids"]

    model = build_model(model_cfg, process.vocab_size, length, seed=cfg.seed)
    result = train(process, model, cfg, length, val=val, data_fn=data)
    return result.model, clock, cfg.max_steps - 1


def trainer_loop(process, model_cfg, cfg: TrainConfig, length: int, first: int):
    """``transformers.Trainer`` on the same stream, optimizer, schedule, clipping and loss."""
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Batches(IterableDataset):
        """One item = one step's whole batch (the loader's batch size is 1 and the collator unwraps it)."""

        def __iter__(self):
            step = 0
            while True:
                yield stream.batch(step)
                step += 1

    class Loss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens = inputs["input_ids"]
            logits = model(input_ids=tokens).logits
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1))
            return (loss, logits) if return_outputs else loss

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (first, cfg.max_steps):
                clock.mark(state.global_step)

    clock, stream = (
        Clock(),
        SequenceStream(process, cfg.per_device_train_batch_size, length, cfg.seed, belief_dtype=F64),
    )
    model = build_model(model_cfg, process.vocab_size, length, seed=cfg.seed)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    args = TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=1,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = Loss(
        model=model,
        args=args,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        optimizers=(optimizer, scheduler),
        callbacks=[Mark()],
    )
    trainer.train()
    return trainer.model, clock, cfg.max_steps


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy/mess3.yaml", help="The main job's config.")
    ap.add_argument("--steps", type=int, default=300, help="Training steps of each trainer per round.")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds, each running both (the order alternates).")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data_cfg, model_cfg, cfg = ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(
        ["--config", args.config, "--max_steps", str(args.steps)]
    )
    process, length = data_cfg.build(), data_cfg.context_length
    first, tokens = args.steps // 5, cfg.per_device_train_batch_size * length
    val = validation_set(process, length, cfg.val_max_sequences, cfg.val_samples)
    rows, weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("toy.train", "bare Trainer") if r % 2 == 0 else ("bare Trainer", "toy.train"):
                run_cfg = replace(
                    cfg,
                    output_dir=f"{tmp}/{name.replace(' ', '_')}{r}",
                    eval_steps=0,
                    save_steps=0,
                    logging_steps=args.steps,
                    disable_tqdm=True,
                    report_to="none",
                    use_cpu=True,
                )
                if name == "toy.train":
                    model, clock, last = toy_train(process, model_cfg, run_cfg, length, val, first)
                else:
                    model, clock, last = trainer_loop(process, model_cfg, run_cfg, length, first)
                cpu, wall = clock.rates(first, last, tokens)
                rows.append({"round": r, "trainer": name, "cpu_tokens_per_s": cpu, "wall_tokens_per_s": wall})
                weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                print(f"round {r} {name:12s}: {cpu:10,.0f} tokens/s (CPU clock)  {wall:10,.0f} tokens/s (wall clock)")
            same = all(torch.equal(weights["toy.train"][k], weights["bare Trainer"][k]) for k in weights["toy.train"])
            print(f"round {r}: final weights torch.equal: {same}")
    for clock_name in ("cpu", "wall"):
        key = f"{clock_name}_tokens_per_s"
        ours = [x[key] for x in rows if x["trainer"] == "toy.train"]
        trainer = [x[key] for x in rows if x["trainer"] == "bare Trainer"]
        ratios = [t / h for t, h in zip(trainer, ours)]
        print(
            f"{clock_name:4s} clock: toy.train {max(ours):,.0f}, bare Trainer {max(trainer):,.0f} tokens/s (best round); "
            f"bare Trainer / toy.train per round: {', '.join(f'{x:.3f}' for x in ratios)}"
        )
    return rows


if __name__ == "__main__":
    main()
