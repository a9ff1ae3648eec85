"""Reusable probes (``llm.probe_transfer.run``): fit on one checkpoint, save as files, load onto another, compare the read-outs.

python -m llm.experiments.probe_transfer --config configs/llm/probe_transfer_smollm2.yaml
# before vs after EM fine-tuning (an llm.sft LoRA, merged into the target on load):
python -m llm.experiments.probe_transfer --config configs/llm/probe_transfer_smollm2.yaml --target_adapter_path runs/em_sft_smollm2
# base vs instruct: --model_name_or_path <base> --target_model_name_or_path <instruct>
# probes from elsewhere (e.g. llm.factored's probes/ folder) ride along:
python -m llm.experiments.probe_transfer --config ... --probe_files runs/factored_smollm2/probes/topic_block15
"""

from __future__ import annotations

import logging
from pathlib import Path

from llm.models import ModelConfig
from llm.probe_transfer import TransferConfig, run
from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "llm.experiments.probe_transfer",
        "the multi-GPU experiment is `accelerate launch -m llm.experiments.em_experiment --config ...`, which runs this stage once on rank 0",
    )
    source_cfg, cfg = ConfigParser((ModelConfig, TransferConfig)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    metrics = run(source_cfg, cfg)
    print((Path(cfg.output_dir) / "summary.md").read_text())
    return metrics


if __name__ == "__main__":
    main()
