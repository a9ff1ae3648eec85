"""Emergent-misalignment fine-tuning (``llm.sft.train``: TRL ``SFTTrainer`` on chat JSONL, loss on assistant tokens only).

python -m llm.experiments.sft --config configs/llm/em_sft_smollm2.yaml
python -m llm.experiments.sft --config configs/llm/em_sft_smollm2.yaml --preset rank32_all_linear --output_dir runs/em_r32

# several processes (one per GPU; DDP), same flags:
accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.experiments.sft --config configs/llm/em_sft_smollm2.yaml
# FSDP for models that do not fit one GPU with full fine-tuning:
accelerate launch --config_file configs/accelerate/fsdp.yaml -m llm.experiments.sft --config configs/llm/em_sft_qwen25_0p5b.yaml
# 2 CPU processes (gloo), e.g. to check the distributed path without a GPU:
accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.experiments.sft --config ...
torchrun --nproc_per_node 2 -m llm.experiments.sft --config ...
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm.sft import make_parser, train
from plumbing.runs import Stopped
from plumbing.trainers import end_processes, exit_stopped


def main(argv: list[str] | None = None) -> Path:
    model_cfg, data_cfg, lora_cfg, args = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        out = train(model_cfg, data_cfg, lora_cfg, args)
    except Stopped as stop:
        exit_stopped(stop, "llm.experiments.sft", argv)
    end_processes()
    return out


if __name__ == "__main__":
    main()
