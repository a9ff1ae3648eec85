"""The base-vs-instruct emergent-misalignment experiment in one command: behaviour (EM rate) and mechanism (direction,
factored probes, LoRA geometry) for both models of a pair, same data, recipe and seeds.

    python -m llm.experiments.em_experiment --config configs/llm/em_experiment_qwen25_1p5b.yaml
    python -m llm.experiments.em_experiment --config configs/llm/em_experiment_gemma2_2b.yaml --lora.preset rank32_all_linear \\
        --lora.layers --output_dir runs/em_gemma2_r32
    # any section field from the command line: --<section>.<field> value(s); --help lists them all
    python -m llm.experiments.em_experiment --config ... --base.model_name_or_path /data/qwen25-1.5b --eval.samples_per_paraphrase 10
    # several GPUs (DDP training, generation sharded across ranks, analysis stages once on rank 0):
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.experiments.em_experiment --config ...
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.experiments.em_experiment --config ...
    # (FSDP is refused with a LoRA preset: the trajectory callback would save each rank's shard of A and B)

For each model (``base``, then ``instruct``), stages under ``<output_dir>/<model>/``:

``eval_before`` (EM questions, judged; all ranks) -> ``sft`` (EM fine-tuning with the ``lora`` preset; all
ranks, DDP) -> ``eval_after`` (all ranks) -> ``steer`` (``llm.steer`` on the untuned model: misalignment
direction from the labelled texts, steering and ablation against same-norm random directions; rank 0) ->
``factored_before`` / ``factored_after`` (``llm.factored``: alignment x topic probes, their subspace overlap,
factor steering; on the untuned and the fine-tuned model; rank 0) -> ``transfer`` (``llm.probe_transfer``:
the untuned model's probes read on the fine-tuned one; rank 0) -> ``lora`` (the update's share in the
alignment / topic subspaces and its cosine with the direction at every saved training step; rank 0).
Then the ``report`` stage: ``<output_dir>/report/`` with ``report.md``, ``report.json`` and plots (``llm.em_report``),
redrawn whenever a stage it reads was redone (to redraw it otherwise, delete ``report/`` and rerun).

Resumable: each stage folder holds ``stage.json`` with the key (its config and the fingerprints of the stages
it reads) that made it (``plumbing.runs.Stage``); a rerun skips finished stages with the same key and redoes
a stage whose key changed, and with it every stage downstream. An interrupted ``sft`` resumes from its last
checkpoint. ``run_config.json`` claims the folder for one pair and framing (``claim_output_dir``): another
pair is refused; other section changes are what the stage keys are for.

Before any weights load: the judge is built, every layer and site is checked against each model's depth,
the data files must exist, the pair's tokenizers must match (``same_tokenizer``), and each model must have
a chat template once ``base_framing`` is applied.
"""

from __future__ import annotations

import logging

from llm.em_config import parse_args
from llm.em_pipeline import run
from plumbing.trainers import end_processes


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(cfg)
    if report:
        print((cfg.out / "report" / "report.md").read_text())
    end_processes()
    return report


if __name__ == "__main__":
    main()
