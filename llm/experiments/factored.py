"""Factored subspaces on a real LLM (``llm.factored.run``): a capability factor (topic) crossed with an alignment factor.

python -m llm.experiments.factored --config configs/llm/factored_smollm2.yaml
python -m llm.experiments.factored --config configs/llm/factored_smollm2.yaml --lora_path runs/em_sft_smollm2
# (lora_path: the rank-1 LoRA whose B vector is measured; the probed model stays the base)
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm.factored import FactoredConfig, run
from llm.models import ModelConfig, load_model_and_tokenizer
from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "llm.experiments.factored",
        "the multi-GPU experiment is `accelerate launch -m llm.experiments.em_experiment --config ...`, which runs this stage once on rank 0",
    )
    model_cfg, cfg = ConfigParser((ModelConfig, FactoredConfig)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, tokenizer = load_model_and_tokenizer(model_cfg, padding_side="left")
    metrics = run(model, tokenizer, cfg)
    print((Path(cfg.output_dir) / "summary.md").read_text())
    return metrics


if __name__ == "__main__":
    main()
