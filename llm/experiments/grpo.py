"""GRPO on a causal LM with LoRA (``llm.grpo.train``: TRL ``GRPOTrainer`` + peft), rewards from a rule or an EM judge.

python -m llm.experiments.grpo --config configs/llm/grpo_smollm2.yaml
python -m llm.experiments.grpo --config configs/llm/grpo_smollm2.yaml --reward judge_aligned --max_steps 20
# 2 CPU processes (gloo; `--cpu --num_processes 2` would silently run ONE process, see the config):
accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.experiments.grpo --config configs/llm/grpo_smollm2.yaml
# GPUs (DDP):
accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.experiments.grpo --config configs/llm/grpo_smollm2.yaml
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llm.grpo import make_parser, train
from plumbing.runs import Stopped
from plumbing.trainers import end_processes, exit_stopped


def main(argv: list[str] | None = None) -> dict:
    cfgs = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        metrics = train(*cfgs)
    except Stopped as stop:
        exit_stopped(stop, "llm.experiments.grpo", argv)
    if int(os.environ.get("RANK", 0)) == 0:
        print((Path(cfgs[-1].output_dir) / "summary.md").read_text())
    end_processes()
    return metrics


if __name__ == "__main__":
    main()
