"""The safety arms' summary and report (``llm.experiments.safety_arms``): EM differences against the ``none`` arm,
the smallest difference the counts detect, the verdicts on the claims stated before any result, and
``report.md`` / ``report.json`` (the run's ``report`` stage). ``cfg`` is the run's ``ArmsConfig``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

from llm.em_metrics import em_rate_difference, read_judged_csv
from llm.evaluate import EvalConfig
from llm.safety import STAGES


def em_difference(rows_a: list[dict], rows_b: list[dict], eval_cfg: EvalConfig) -> dict:
    """EM rate of ``rows_a`` minus ``rows_b`` with its CI: the one call into ``llm.em_metrics`` for a difference
    (both sets share questions, paraphrases and sampling seeds)."""
    return em_rate_difference(rows_a, rows_b, n_boot=eval_cfg.n_boot, seed=eval_cfg.seed, protocol=eval_cfg.em_protocol)


def detectable_difference(p0: float, n_a: int, n_b: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest increase d over a rate ``p0`` that a two-sided test at ``1 - level`` detects with ``power``, for
    ``n_a`` and ``n_b`` replies (normal approximation, unpooled variance): the d solving
    ``d = (z_{(1+level)/2} + z_power) sqrt(p0 (1-p0) / n_a + p1 (1-p1) / n_b)``, p1 = p0 + d, by bisection on
    (0, 1 - p0]; NaN when even p1 = 1 is not detectable (or a count is 0)."""
    if min(n_a, n_b) < 1:
        return math.nan  # nothing counted on one side: no increase is detectable
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)

    def short(d):  # > 0 while d is too small to detect
        p1 = p0 + d
        return z * math.sqrt(p0 * (1 - p0) / n_a + p1 * (1 - p1) / n_b) - d

    lo, hi = 0.0, 1.0 - p0
    if short(hi) > 0:
        return math.nan  # not even the largest possible increase is detectable
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
    return hi


def decide(ci: list, detectable: float, margin: float, claim: str) -> str:
    """The verdict on one claim from the 95% CI of an EM difference, the smallest increase the counts detect
    (``detectable_difference``) and the margin. ``claim="raises"``: the difference is positive (supported when the
    CI lies above 0); ``claim="no_em"``: the difference is negligible (supported when the CI lies below ``margin``).
    A verdict that rests on the absence of an effect (raises: contradicted; no_em: supported) also needs the counts
    to detect an effect of ``margin`` (``detectable <= margin``); otherwise it is undecided and says so."""
    lo, hi = ci
    if lo is None or hi is None:
        return "undecided (no interval: nothing scored, or no interval holds its level at these counts)"
    powered = not math.isnan(detectable) and detectable <= margin
    absent = hi < margin
    if claim == "raises":
        if lo > 0:
            return "supported"
        found = "contradicted" if absent and powered else None
    elif claim == "no_em":
        if lo >= margin:
            return "contradicted"
        found = "supported" if absent and powered else None
    else:
        raise ValueError(f"claim={claim!r}; use raises or no_em")
    if found:
        return found
    return (
        f"undecided (underpowered: smallest detectable {_pct(detectable)} > margin {_pct(margin)})"
        if absent
        else "undecided"
    )


def summarise(cfg, arms: dict) -> dict:
    """The side-by-side numbers, the paired differences vs ``none`` and the verdicts (see the module docstring)."""
    ev, margin = cfg.eval, cfg.em_margin
    rows = {
        a: {s: read_judged_csv(Path(r["dirs"][s]) / "replies.csv") for s in ("eval_before", "eval_after")}
        for a, r in arms.items()
    }
    table = {}
    for a, r in arms.items():
        lora = r.get("lora", {}).get("modules", {})
        table[a] = {
            "aligned_before": r["eval_before"]["mean_scores"].get("aligned"),
            "em_before": r["eval_before"]["em"],
            "em_after": r["eval_after"]["em"],
            "drift": r["drift"]["drift"],
            "direction_auroc": r["direction"]["auroc"],
            "lora": lora,
            "safety": r.get("safety"),
        }
    none_after = table["none"]["em_after"]
    p0 = none_after["em_rate"] or 0.0
    lines, diffs = [], {}
    for a in arms:
        if a == "none":
            continue
        d = em_difference(rows[a]["eval_after"], rows["none"]["eval_after"], ev)
        mde = detectable_difference(p0, none_after["n_counted"], table[a]["em_after"]["n_counted"])
        diffs[a] = {"difference": d["difference"], "ci": d["ci"], "detectable": mde}
        if a in STAGES:
            v = decide(d["ci"], mde, margin, "raises")
            lines.append(
                f"a safety stage raises EM transfer [{a}]: EM after, {a} - none = {_pct(d['difference'])} "
                f"(95% CI {_pct(d['ci'][0])} to {_pct(d['ci'][1])}) -> {v}; smallest detectable increase {_pct(mde)}"
            )
    within = em_difference(rows["none"]["eval_after"], rows["none"]["eval_before"], ev)
    before = table["none"]["em_before"]
    mde = detectable_difference(before["em_rate"] or 0.0, before["n_counted"], none_after["n_counted"])
    ci = within["ci"]
    v = decide(ci, mde, margin, "no_em")
    lines.append(
        f"(ii) no EM without safety [none]: EM after - before = {_pct(within['difference'])} (95% CI {_pct(ci[0])} to "
        f"{_pct(ci[1])}, margin {_pct(margin)}) -> {v}; smallest detectable increase {_pct(mde)}"
    )
    controlled = [table[a]["aligned_before"] for a in arms if a in STAGES and table[a]["aligned_before"] is not None]
    spread = max(controlled) - min(controlled) if len(controlled) > 1 else 0.0
    matched = (
        f"safety arms matched: judged mean aligned before the EM fine-tune within {spread:.1f} points (<= {cfg.matched_within:g})"
        if spread <= cfg.matched_within
        else f"safety arms NOT matched: mean aligned before the EM fine-tune spans {spread:.1f} points (> {cfg.matched_within:g}); "
        "differences between them mix the stage with the alignment it reached"
    )
    return {
        "arms": table,
        "vs_none": diffs,
        "none_after_minus_before": {**within, "detectable": mde},
        "verdicts": lines,
        "matched": matched,
        "em_margin": margin,
        "protocol": ev.em_protocol,
    }


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def write_report(out: Path, cfg, summary: dict, judge_name: str) -> None:
    """``report.md`` and ``report.json`` (the summary) in ``out``."""
    ev = cfg.eval
    md = [
        "# Safety arms: one base, with and without a safety stage",
        "",
        f"- base: `{cfg.base.model_name_or_path}`"
        + (f" (asked in `{Path(cfg.base.chat_template_from).name}`)" if cfg.base.chat_template_from else ""),
        f"- arms: {', '.join(cfg.arms)}; judge `{judge_name}`; EM protocol `{ev.em_protocol}`; "
        f"{ev.samples_per_paraphrase or 'file'} samples per paraphrase, seed {ev.seed} (same questions and seeds in every arm)",
        f"- EM fine-tune: `{cfg.data.dataset_path}`, preset `{cfg.lora.preset}` layers {cfg.lora.layers}, "
        f"{cfg.sft.max_steps} steps",
        "",
        "| arm | mean aligned before | EM before (95% CI) | drift code (nats/token) | drift prose | EM after (95% CI) | "
        "EM after - none (95% CI) | smallest detectable | direction AUROC | EM LoRA cos(B, direction) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a, t in summary["arms"].items():
        d = summary["vs_none"].get(a)
        cos = [m["cos_B_direction"] for m in t["lora"].values()]
        md.append(
            f"| {a} | {_num(t['aligned_before'], '.1f')} | {_pct(t['em_before']['em_rate'])} ({_pct(t['em_before']['ci'][0])}-"
            f"{_pct(t['em_before']['ci'][1])}, n={t['em_before']['n_counted']}) | "
            f"{_num(t['drift'].get('code', {}).get('kl_per_token'))} | {_num(t['drift'].get('prose', {}).get('kl_per_token'))} | "
            f"{_pct(t['em_after']['em_rate'])} ({_pct(t['em_after']['ci'][0])}-{_pct(t['em_after']['ci'][1])}, "
            f"n={t['em_after']['n_counted']}) | "
            + (
                f"{_pct(d['difference'])} ({_pct(d['ci'][0])} to {_pct(d['ci'][1])}) | {_pct(d['detectable'])}"
                if d
                else "- | -"
            )
            + f" | {_num(t['direction_auroc'], '.2f')} | {', '.join(_num(c) for c in cos) or '-'} |"
        )
    md += [
        "",
        "## Verdicts",
        "",
        *[f"- {v}" for v in summary["verdicts"]],
        f"- {summary['matched']}",
        "",
        "The instruct arm (when run) differs from the base by the vendor's whole post-training, not a safety stage alone: it "
        "is reported beside the controlled arms and enters no verdict. Differences vs none use the same questions, "
        "paraphrases and sampling seeds. 'Smallest detectable' is the EM increase over the none arm's rate that these "
        "counts detect with 80% power (two-sided 5%); a CI that straddles 0 with a smallest detectable increase above "
        "the effects of interest is a null of this scale, not evidence of no effect.",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
