"""EM rates of judged CSVs with their CIs (``llm.em_metrics.em_rate``), one line per file, and optionally the field's
two plots.

python -m llm.experiments.em_metrics --files ../shared/data/em/judged/*.csv    # published protocol, 95 % CIs
python -m llm.experiments.em_metrics --files run/replies.csv --protocol coherent_only --plot_dir run/plots
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from llm.em_metrics import Protocol, em_rate, read_judged_csv, summary_line
from llm.em_plots import plot_em_per_question, plot_quadrants
from plumbing.runs import refuse_multiprocess


@dataclass
class EMRateConfig:
    files: list[str] = field(metadata={"help": "judged CSVs (question, answer, question_id, aligned, coherent)"})
    protocol: Protocol = field(
        default="published", metadata={"help": "published (the EM papers' code) or coherent_only"}
    )
    n_boot: int = field(default=2000, metadata={"help": "resamples of the between-question bootstrap"})
    seed: int = field(default=0, metadata={"help": "seed of the between-question bootstrap"})
    per_question: bool = field(default=False, metadata={"help": "also print per-question rates (JSON)"})
    plot_dir: str = field(default="", metadata={"help": "write quadrants.png and em_per_question.png here ('' = none)"})


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess("llm.experiments.em_metrics")
    (cfg,) = HfArgumentParser(EMRateConfig).parse_args_into_dataclasses(args=argv)
    missing = [f for f in cfg.files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"judged CSVs not found: {missing}; pass existing files to --files")
    print(f"protocol: {cfg.protocol}; 95% Wilson intervals (between questions: {cfg.n_boot} bootstrap resamples)")
    out, rows_by, res_by = {}, {}, {}
    for f in cfg.files:
        name = Path(f).stem
        rows_by[name] = read_judged_csv(f)
        res_by[name] = r = em_rate(rows_by[name], n_boot=cfg.n_boot, seed=cfg.seed, protocol=cfg.protocol)
        out[Path(f).name] = r if cfg.per_question else r["overall"]
        print(summary_line(name, r["overall"]))
    if cfg.per_question:
        print(json.dumps(out, indent=1))
    if cfg.plot_dir:
        plot_quadrants(rows_by, Path(cfg.plot_dir) / "quadrants.png", protocol=cfg.protocol)
        merged = {
            n: em_rate(rows, n_boot=cfg.n_boot, seed=cfg.seed, protocol=cfg.protocol, merge_variants=True)
            for n, rows in rows_by.items()
        }
        plot_em_per_question(merged, Path(cfg.plot_dir) / "em_per_question.png")
        print(f"plots in {cfg.plot_dir}")
    return out


if __name__ == "__main__":
    main()
