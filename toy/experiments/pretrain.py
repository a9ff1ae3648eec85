"""Pre-train a toy GPT-2 on fresh samples of a ``toy`` process, with the exact validation loss beside the floor.

    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml
    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml --max_steps 500 --output_dir runs/mess3_short
    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml --resume_from_checkpoint last      # continue a stopped run
    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml --overwrite true        # start the folder again

Ctrl-C or SIGTERM (``timeout``, ``kill``, Slurm) saves a checkpoint after the step in flight and exits 130 / 143.
The output folder records its config: another config, or a fresh start over this run's checkpoints, refuses
without ``--overwrite true``; a resume refuses a changed config (``toy.train.RERUN_KEYS`` may change).

    # one GPU / several GPUs (DDP; the batch per step is batch_size x processes), same flags:
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.pretrain --config configs/toy/mess3_gpu.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 -m toy.experiments.pretrain --config ...
    # 2 CPU processes (gloo); `accelerate launch --cpu --num_processes 2` would silently run ONE process:
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m toy.experiments.pretrain --config ... --use_cpu true
    torchrun --nproc_per_node 2 -m toy.experiments.pretrain --config ... --use_cpu true

The trainer and its conventions (data seeding, loss positions, exact validation, checkpoints) are ``toy.train``'s.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from plumbing.config import ConfigParser
from plumbing.runs import Stopped
from plumbing.trainers import end_processes
from toy.config import ProcessConfig, TrainConfig
from toy.model import ToyModelConfig, build_model
from toy.train import TrainResult, set_cpu_threads, train


def make_parser() -> ConfigParser:
    return ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> TrainResult:
    data_cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    set_cpu_threads(train_cfg)
    process = data_cfg.build()
    if train_cfg.init_from:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(train_cfg.init_from)
    else:
        model = build_model(model_cfg, process.vocab_size, data_cfg.context_length, seed=train_cfg.seed)
    info = {"data": asdict(data_cfg), "model": model_cfg.to_dict(), "train": train_cfg.record()}
    try:
        result = train(process, model, train_cfg, data_cfg.context_length, run_info=info)
    except Stopped as stop:  # the checkpoint is saved and the resume line printed
        end_processes()  # every rank stopped at the same step: leave the process group together
        sys.exit(stop.exit_code)
    from accelerate import PartialState

    end_processes()
    if PartialState().is_main_process:
        print(
            f"{process.name}: step {result.step}, val loss {result.val_loss:.6f} nats, floor {result.floor:.6f} "
            f"(gap {result.val_loss - result.floor:.2e}), {result.tokens_per_s:,.0f} tokens/s, checkpoint {result.checkpoint_dir}"
        )
    return result


if __name__ == "__main__":
    main()
