"""Misalignment direction of a real LLM (``llm.steer.run``): find it, steer with it, ablate it, monitor with it.

python -m llm.experiments.steer --config configs/llm/directions_smollm2.yaml
python -m llm.experiments.steer --config configs/llm/directions_smollm2.yaml --alphas -4 0 4 --output_dir runs/steer_short
# the EM-fine-tuned model (an llm.sft adapter, merged on load):
python -m llm.experiments.steer --config configs/llm/directions_smollm2.yaml --adapter_path runs/em_sft_smollm2
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm.models import ModelConfig, load_model_and_tokenizer
from llm.steer import SteerConfig, run
from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "llm.experiments.steer",
        "the multi-GPU experiment is `accelerate launch -m llm.experiments.em_experiment --config ...`, which runs this stage once on rank 0",
    )
    model_cfg, cfg = ConfigParser((ModelConfig, SteerConfig)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, tokenizer = load_model_and_tokenizer(model_cfg, padding_side="left")
    metrics = run(model, tokenizer, cfg)
    print((Path(cfg.output_dir) / "summary.md").read_text())
    return metrics


if __name__ == "__main__":
    main()
