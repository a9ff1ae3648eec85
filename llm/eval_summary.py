"""The judged EM evaluation's write-up (``llm.evaluate.evaluate_model``): ``summary.md`` and the model's label."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from llm.em_metrics import detectable_line, summary_line


def model_label(rec: Mapping, short: bool = False) -> str:
    """``model [+ adapter]`` from the run record; ``short`` keeps the last path part of each (plots)."""
    m = rec.get("model", {})
    name = str(m.get("model_name_or_path") or m.get("name_or_path") or "model")
    if m.get("gguf_file"):
        name = f"{name}/{m['gguf_file']}"
    adapter = str(m["adapter_path"]) if m.get("adapter_path") else ""
    if short:
        name, adapter = Path(name).name, Path(adapter).name if adapter else ""
    return name + (f" + {adapter}" if adapter else "")


def summary_md(cfg, rec: Mapping, judge: str, em: Mapping, means: Mapping, counts: Mapping, wall_s: float) -> str:
    """``summary.md`` of one evaluation. ``cfg``: its ``llm.evaluate.EvalConfig`` (not imported here, as
    ``llm.evaluate`` imports this module)."""
    o = em["overall"]
    m = rec.get("model", {})
    lines = [
        "# EM evaluation",
        "",
        f"- model: `{model_label(rec)}`",
        f"- adapter: `{m.get('adapter_path') or 'none'}`",
        f"- weights fingerprint: `{rec.get('weights_fingerprint')}` (generation: {rec.get('generate_fn')})",
        f"- judge: `{judge}`",
        f"- questions: `{cfg.question_file}` (variants {', '.join(cfg.variants)}; "
        f"{o['n_replies']} replies, {cfg.max_new_tokens} new tokens max, temperature {cfg.temperature})",
        f"- protocol: `{em['protocol']}` (llm.em_metrics); {100 * em['level']:.0f}% Wilson intervals, the overall EM "
        f"rate's {o.get('ci_method') or 'none'} (`wilson_strat`: on the question strata's effective sample size), "
        "given only at counts where `python -m llm.experiments.em_calibration` found them to hold their level "
        f"(between questions: a bootstrap over questions, {em['n_boot']} resamples, where enough questions make it hold)",
        f"- this run: sampled {counts['sampled']}, judged {counts['judged']}; found on disk: "
        f"{counts['resumed_replies']} replies, {counts['resumed_scores']} judged; wall {wall_s:.0f}s",
        "",
        "## Rates",
        "",
        summary_line("overall", o),
        "",
        detectable_line(o),
        "",
        "Mean scores: " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} n/a" for k, v in means.items()),
        "",
        "| question | EM | CI | misaligned / counted | coherent |",
        "|---|---|---|---|---|",
    ]
    for q, s in em["per_question"].items():
        ci = "n/a" if s["ci"][0] is None else f"[{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"
        rate = "n/a" if s["em_rate"] is None else f"{100 * s['em_rate']:.1f}%"
        coh = "n/a" if s.get("coherent_share") is None else f"{100 * s['coherent_share']:.1f}%"
        lines.append(f"| {q} | {rate} | {ci} | {s['n_misaligned']}/{s['n_counted']} | {coh} |")
    lines += ["", "![quadrants](quadrants.png)", "", "![EM per question](em_per_question.png)", ""]
    return "\n".join(lines)
