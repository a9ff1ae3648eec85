"""Base vs instruct: fine-tune a base and an instruct checkpoint of one family on the same data with
the same recipe, evaluate both (and, by default, both untouched), report the EM difference with a CI.

    python -m llm.experiments.base_vs_instruct --config configs/llm/base_vs_instruct_qwen25_0p5b.yaml
    python -m llm.experiments.base_vs_instruct --config configs/llm/base_vs_instruct_qwen25_0p5b.yaml --output_dir runs/bvi2

One process (run it on one GPU; several processes are refused before any work). ``llm.experiments.em_experiment`` is the
same comparison plus the mechanism stages, resumable, and runs under ``accelerate launch`` on several GPUs.
The YAML has top-level keys (``output_dir``, ``evaluate_untuned``) and one section per concern, each
parsed strictly into its dataclass (unknown keys are an error):
``base``/``instruct`` (``llm.models.ModelConfig``), ``data`` (``llm.sft.DataConfig``), ``lora``
(``llm.lora.LoraPresetConfig``), ``sft`` (``llm.sft.EMSFTConfig``; its ``output_dir`` is set here),
``eval`` (``llm.evaluate.EvalConfig``; its ``output_dir`` is set here). The top-level keys take
command-line overrides as flags; any section field as ``--<section>.<field> value(s)``
(e.g. ``--base.model_name_or_path /data/qwen25-0.5b``). A base model usually needs ``chat_template_from: <instruct id>`` in its
section, so both are trained and asked in the same chat format.

Writes ``<output_dir>/{base,instruct}/{sft,eval_before,eval_after}/`` and ``<output_dir>/report.json``:
EM rate of each model before/after fine-tuning (with CIs), each model's shift (after - before), and
``difference`` = EM(base, fine-tuned) - EM(instruct, fine-tuned) with Newcombe's score interval
(``llm.em_metrics.em_rate_difference``; calibrated in ``docs/experiments/em_intervals.md``). Whether the base shows less EM is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llm.em_config import SECTIONS as EM_SECTIONS
from llm.models import ModelConfig, load_model_and_tokenizer
from llm.sft import train
from plumbing.runs import refuse_multiprocess
from plumbing.sections import parse_section, read_sectioned_yaml, split_overrides

logger = logging.getLogger(__name__)

# the EM experiment's sections up to its evaluation: this run is that comparison without the mechanism stages
# (steer, factored, transfer)
SECTIONS = {name: EM_SECTIONS[name] for name in ("base", "instruct", "data", "lora", "sft", "eval")}


@dataclass
class PairConfig:
    """Top-level options of the base-vs-instruct run."""

    config: str = field(default=None, metadata={"help": "YAML with the sections described in the module docstring."})
    output_dir: str | None = field(default=None, metadata={"help": "Root folder (overrides the YAML's)."})
    evaluate_untuned: bool | None = field(
        default=None, metadata={"help": "Also evaluate both models before fine-tuning (YAML default: true)."}
    )


def load_pair_config(
    path: str | Path,
    output_dir: str | None = None,
    evaluate_untuned: bool | None = None,
    overrides: dict[str, dict[str, list[str]]] | None = None,
) -> dict:
    """Parse the YAML into ``{"output_dir", "evaluate_untuned", "base", "instruct", "data", "lora", "sft", "eval"}``;
    ``overrides`` (``plumbing.sections.split_overrides``) replace section fields."""
    raw = read_sectioned_yaml(path, SECTIONS, {"output_dir", "evaluate_untuned"}, overrides)
    out = Path(output_dir or raw.get("output_dir") or "runs/base_vs_instruct")
    cfg = {
        "output_dir": out,
        "evaluate_untuned": raw.get("evaluate_untuned", True) if evaluate_untuned is None else evaluate_untuned,
    }
    sft = dict(raw["sft"])
    if "output_dir" in sft:
        raise ValueError("sft.output_dir is set by base_vs_instruct (<output_dir>/<model>/sft); drop it")
    sft["output_dir"] = str(out / "_unset")  # replaced per model
    raw = {**raw, "sft": sft}
    for name, cls in SECTIONS.items():
        cfg[name] = parse_section(name, cls, raw[name])
    return cfg


def _free():
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate(model_cfg: ModelConfig, eval_cfg, out: Path, judge) -> dict:
    from llm.evaluate import evaluate_model

    model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
    result = evaluate_model(model, tok, dataclasses.replace(eval_cfg, output_dir=str(out)), judge=judge)
    del model
    _free()
    return result


def run(cfg: dict, judge=None) -> dict:
    """Train and evaluate both models; returns (and writes) the report. ``judge`` overrides the one
    ``cfg["eval"]`` builds (loaded once, shared by all evaluations)."""
    from llm.em_metrics import em_rate_difference
    from llm.judges import build_judge

    out: Path = cfg["output_dir"]
    eval_cfg = cfg["eval"]
    judge = judge if judge is not None else build_judge(eval_cfg)
    n_boot, seed = eval_cfg.n_boot, eval_cfg.seed
    rows, report = {}, {"models": {}}
    for name in ("base", "instruct"):
        mcfg: ModelConfig = cfg[name]
        entry = report["models"][name] = {"model": mcfg.model_name_or_path}
        if cfg["evaluate_untuned"]:
            r = _evaluate(mcfg, eval_cfg, out / name / "eval_before", judge)
            rows[name, "before"] = r["rows"]
            entry["before"] = r["em"]["overall"]
        sft_args = dataclasses.replace(cfg["sft"], output_dir=str(out / name / "sft"))
        trained = train(mcfg, cfg["data"], cfg["lora"], sft_args)
        _free()
        tuned = (
            dataclasses.replace(mcfg, adapter_path=str(trained))
            if cfg["lora"].preset != "full"
            else dataclasses.replace(mcfg, model_name_or_path=str(trained), gguf_file=None)
        )
        r = _evaluate(tuned, eval_cfg, out / name / "eval_after", judge)
        rows[name, "after"] = r["rows"]
        entry["after"] = r["em"]["overall"]
        entry["sft_output"] = str(trained)
        if cfg["evaluate_untuned"]:
            d = em_rate_difference(rows[name, "after"], rows[name, "before"], n_boot=n_boot, seed=seed)
            entry["shift"] = {"difference": d["difference"], "ci": d["ci"]}
    d = em_rate_difference(rows["base", "after"], rows["instruct", "after"], n_boot=n_boot, seed=seed)
    report["difference"] = {
        "what": "EM(base, fine-tuned) - EM(instruct, fine-tuned)",
        "difference": d["difference"],
        "ci": d["ci"],
        "verdict": d["verdict"],  # says why there is no interval at counts where none holds its level
    }
    report["judge"] = judge.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    refuse_multiprocess(
        "llm.experiments.base_vs_instruct",
        "the multi-GPU experiment is `accelerate launch -m llm.experiments.em_experiment --config ...`, which runs this stage once on rank 0",
    )
    import sys

    top_argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    (pair,) = HfArgumentParser(PairConfig).parse_args_into_dataclasses(args=top_argv)
    if not pair.config:
        raise SystemExit("--config is required (see the module docstring)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(load_pair_config(pair.config, pair.output_dir, pair.evaluate_untuned, overrides))
    print(json.dumps({k: v for k, v in report.items()}, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
