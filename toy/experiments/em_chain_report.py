"""The EM chain's report: cells -> mean and 95% CI over seeds, the verdicts on the claims by the thresholds
declared in the config, ``summary.md`` and the plots. Pure functions of the cell results (``metrics.json``'s
``cells``), so ``--summarize_only`` rebuilds them from whatever cells are present. ``cfg`` is
``toy.experiments.em_chain.EMChainConfig`` (not imported: the experiment imports this module)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from plumbing.grid import write_atomic
from plumbing.stats import mean_ci
from toy.em_dose import judge

METHODS = ("full", "lora", "steer")
# a cell's world -> the result key of its knob, and the knob's name in tables and plots
KNOB = {"persona": "coupling", "subsets": "subset_correlation", "tagless": "knob_value", "visit": "knob_value"}
LABEL = {"persona": "coupling", "subsets": "subset corr", "tagless": "tagless", "visit": "visit"}
PREFIX = {"persona": "coupling", "subsets": "subsets", "tagless": "tagless", "visit": "visit"}


def aggregate(cells: list[dict], cfg) -> dict:
    """Group the cells by (world, knob value, switch_prob): knob numbers (seed 0's), and mean/CI over seeds of
    every rate. Keys ``coupling_<c>_switch_<s>`` (persona world) and ``subsets_<rho>_switch_<s>``."""
    groups = {}
    for c in cells:
        groups.setdefault((c["world"], c[KNOB[c["world"]]], c["switch_prob"]), []).append(c)
    out = {}
    for (world, x, sp), cs in sorted(groups.items()):
        g = {
            "world": world,
            KNOB[world]: x,
            "x": x,
            "switch_prob": sp,
            "n_seeds": len(cs),
            "knob": cs[0]["knob"],
            "wall_s": mean_ci([c["wall_s"] for c in cs]),
            "cpu_s": mean_ci([c.get("cpu_s", float("nan")) for c in cs]),
            "safety": {},
        }
        for stage in cfg.safety:
            rs = [c["safety"][stage] for c in cs if stage in c["safety"]]
            g["safety"][stage] = {
                "before": {k: mean_ci([r["before"][k] for r in rs]) for k in ("narrow", "broad")},
                **{
                    key: {m: mean_ci([r[key][m] for r in rs]) for m in METHODS}
                    for key in ("narrow_effect", "broad_effect", "transfer")
                },
                "probe_dims_95": mean_ci([r["probe"]["dims"]["0.95"] for r in rs if "probe" in r]),
                "probe_r2": mean_ci([r["probe"]["r2"] for r in rs if "probe" in r]),
            }
        if all("sft_vs_grpo" in c for c in cs):
            g["sft_vs_grpo"] = {
                "mean_cos2": mean_ci([c["sft_vs_grpo"]["overlap"]["mean_cos2"] for c in cs]),
                "random_mean_cos2": cs[0]["sft_vs_grpo"]["overlap"]["random_mean_cos2"],
                "probe_transfer_r2": mean_ci([c["sft_vs_grpo"]["probe_transfer_r2"] for c in cs]),
                "own_probe_r2": mean_ci([c["sft_vs_grpo"]["own_probe_r2"] for c in cs]),
                **{
                    k: mean_ci([c["sft_vs_grpo"].get(k, float("nan")) for c in cs])
                    for k in ("control_mean_cos2", "control_probe_transfer_r2")
                },
            }
        out[f"{PREFIX[world]}_{x}_switch_{sp}"] = g
    return out


def of_world(agg: dict, world: str) -> list[dict]:
    return [g for g in agg.values() if g["world"] == world]


def is_broad(s: dict, m: str, cfg) -> str:
    """'no effect' / 'broad' / 'narrow' / 'partial' for method ``m`` of an aggregated safety stage, by the declared
    thresholds ('no effect': the narrow rate rose by less than ``em_effect``, so a transfer ratio means nothing)."""
    t, e = s["transfer"][m]["mean"], s["broad_effect"][m]["mean"]
    if not s["narrow_effect"][m]["mean"] >= cfg.em_effect:
        return "no effect"
    if t >= cfg.broad_transfer and e >= cfg.em_effect:
        return "broad"
    return "narrow" if t <= cfg.narrow_transfer or e < cfg.em_effect else "partial"


def verdicts(agg: dict, cfg) -> list[str]:
    """The three claims judged by the thresholds declared in the config (full and LoRA fine-tunes; the
    steering vector is added at every position and so transfers by construction)."""
    lines = []
    persona = of_world(agg, "persona")
    for sp in sorted({g["switch_prob"] for g in persona}):
        gs = sorted((g for g in persona if g["switch_prob"] == sp), key=lambda g: g["coupling"])
        lo, hi = gs[0], gs[-1]
        stage = "sft" if "sft" in cfg.safety else cfg.safety[0]
        for m in ("full", "lora"):
            if lo is hi:
                lines.append(f"(i) switch {sp}, {m}: one coupling only; no contrast")
                continue
            d = hi["safety"][stage]["transfer"][m]["mean"] - lo["safety"][stage]["transfer"][m]["mean"]
            v = (
                "supported"
                if d >= 0.3 and is_broad(hi["safety"][stage], m, cfg) == "broad"
                else "not supported"
                if d < 0.1
                else "inconclusive"
            )
            lines.append(
                f"(i) narrow FT broad when shared [{stage}, {m}, switch {sp}]: transfer {hi['coupling']} - {lo['coupling']} = "
                f"{d:+.3f}; at coupling {hi['coupling']}: {is_broad(hi['safety'][stage], m, cfg)} -> {v}"
            )
        if "none" in cfg.safety and len(cfg.safety) > 1:
            for g in gs:
                for m in ("full", "lora"):
                    base = is_broad(g["safety"]["none"], m, cfg)
                    others = {s: is_broad(g["safety"][s], m, cfg) for s in cfg.safety if s != "none"}
                    v = (
                        "supported"
                        if base != "broad" and "broad" in others.values()
                        else "contradicted"
                        if base == "broad"
                        else "not testable (no stage is broad)"
                    )
                    if base == "no effect":
                        v = "not testable (the fine-tune did not move the slice)"
                    lines.append(
                        f"(ii) no EM without safety [coupling {g['coupling']}, switch {sp}, {m}]: none {base}, "
                        + ", ".join(f"{s} {b}" for s, b in others.items())
                        + f" -> {v}"
                    )
        if "sft" in cfg.safety and "grpo" in cfg.safety:
            for g in gs:
                dt = {
                    m: g["safety"]["grpo"]["transfer"][m]["mean"] - g["safety"]["sft"]["transfer"][m]["mean"]
                    for m in ("full", "lora")
                }
                ov = g.get("sft_vs_grpo", {})
                cos2 = ov.get("mean_cos2", {}).get("mean", float("nan"))
                close = all(abs(v) < 0.2 for v in dt.values()) and cos2 > max(0.5, 2 * ov.get("random_mean_cos2", 1))
                far = any(abs(v) > 0.3 for v in dt.values())
                v = "supported" if close else "contradicted" if far else "inconclusive"
                lines.append(
                    f"(iii) GRPO acts like SFT [coupling {g['coupling']}, switch {sp}]: transfer grpo - sft "
                    + ", ".join(f"{m} {d:+.3f}" for m, d in dt.items())
                    + f"; subspace mean cos^2 {cos2:.3f} (random {ov.get('random_mean_cos2', float('nan')):.3f}) -> {v}"
                )
    # the subsets axis: no claim was declared for it, so this line only reports both ends by the thresholds
    subsets = of_world(agg, "subsets")
    stage = "sft" if "sft" in cfg.safety else cfg.safety[0]
    for sp in sorted({g["switch_prob"] for g in subsets}):
        gs = sorted((g for g in subsets if g["switch_prob"] == sp), key=lambda g: g["x"])
        for m in ("full", "lora"):
            ends = " -> ".join(
                f"{g['x']}: transfer {_fmt(g['safety'][stage]['transfer'][m])} ({is_broad(g['safety'][stage], m, cfg)})"
                for g in (gs[0], gs[-1])[: 1 + (len(gs) > 1)]
            )
            lines.append(f"(subsets) transfer vs subset-tag correlation [{stage}, {m}, switch {sp}]: {ends}")
    return lines


def _fmt(ms: dict) -> str:
    lo, hi = ms["ci"]
    return f"{ms['mean']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo == lo else "")


def _summary(metrics: dict, cfg) -> str:
    agg = metrics["aggregate"]
    persona, subsets = of_world(agg, "persona"), of_world(agg, "subsets")
    lines = [
        "# Toy EM chain: pre-train -> safety stage -> narrow fine-tune",
        "",
        f"Cells present: {len(metrics['cells'])} of {metrics['n_cells']} (mean and 95% t-CI over seeds; one seed: no CI).",
        "",
    ]
    if persona:
        lines += [
            "## The knob (exact): persona world",
            "",
            "| coupling | switch | tag MI (nats) | tags x cap residual | slice0 x rest residual | predictive residual | alignment dims 95/99 |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in persona:
            k = g["knob"]
            lines.append(
                f"| {g['coupling']} | {g['switch_prob']} | {k['tag_mi_nats']:.4f} | {k['tags_x_capability_residual']:.2e} | "
                f"{k['slice0_x_rest_residual']:.4f} | {k['predictive_residual']:.4f} | {k['alignment_dims']['0.95']}/{k['alignment_dims']['0.99']} |"
            )
    if subsets:
        lines += [
            "",
            "## The knob (exact): capability subsets x one tag (subset %d is the one tied to the tag)"
            % cfg.narrow_slice,
            "",
            "| subset corr | switch | subset-tag MI (nats) | subset-copy MI (nats) | P(misaligned \\| subset) | alignment dims 95/99 |",
            "|---|---|---|---|---|---|",
        ]
        for g in subsets:
            k = g["knob"]
            lines.append(
                f"| {g['x']} | {g['switch_prob']} | {k['subset_tag_mi_nats']:.4f} | {k['subset_copy_mi_nats']:.4f} | "
                + ", ".join(f"{v:.3f}" for v in k["misaligned_by_subset"])
                + f" | {k['alignment_dims']['0.95']}/{k['alignment_dims']['0.99']} |"
            )
    lines += [
        "",
        "## Narrow fine-tune on slice %d: misaligned rate after aligned prompts" % cfg.narrow_slice,
        "",
        "| world | knob | switch | safety | method | narrow before | broad before | narrow effect | broad effect | transfer | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in agg.values():
        for stage, s in g["safety"].items():
            for m in METHODS:
                lines.append(
                    f"| {g['world']} | {LABEL[g['world']]} {g['x']} | {g['switch_prob']} | {stage} | {m} | {_fmt(s['before']['narrow'])} | "
                    f"{_fmt(s['before']['broad'])} | {_fmt(s['narrow_effect'][m])} | {_fmt(s['broad_effect'][m])} | {_fmt(s['transfer'][m])} | "
                    f"{is_broad(s, m, cfg)} |"
                )
    lines += [
        "",
        "## Alignment subspaces (probe residual -> per-slice tag marginals; subsets: P(subset and misaligned))",
        "",
        "| knob | switch | safety | probe R^2 | model alignment dims (95%) |",
        "|---|---|---|---|---|",
    ]
    for g in agg.values():
        for stage, s in g["safety"].items():
            if s["probe_r2"]["n"]:
                lines.append(
                    f"| {LABEL[g['world']]} {g['x']} | {g['switch_prob']} | {stage} | {_fmt(s['probe_r2'])} | {_fmt(s['probe_dims_95'])} |"
                )
    if any("sft_vs_grpo" in g for g in agg.values()):
        lines += [
            "",
            "Control: SFT vs a second SFT on other data (NaN in cells run before the control existed).",
            "",
            "| knob | switch | SFT vs GRPO mean cos^2 | SFT vs SFT | random | SFT probe on GRPO acts R^2 | on SFT-2 acts | "
            "GRPO own probe R^2 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in agg.values():
            if "sft_vs_grpo" in g:
                o = g["sft_vs_grpo"]
                lines.append(
                    f"| {LABEL[g['world']]} {g['x']} | {g['switch_prob']} | {_fmt(o['mean_cos2'])} | {_fmt(o['control_mean_cos2'])} | "
                    f"{o['random_mean_cos2']:.3f} | {_fmt(o['probe_transfer_r2'])} | {_fmt(o['control_probe_transfer_r2'])} | "
                    f"{_fmt(o['own_probe_r2'])} |"
                )
    lines += ["", "## Time per cell (s): wall, and CPU of the process (one thread)", ""] + [
        f"- {LABEL[g['world']]} {g['x']}, switch {g['switch_prob']}: wall {_fmt(g['wall_s'])}, CPU {_fmt(g['cpu_s'])}"
        for g in agg.values()
    ]
    if "factor" in metrics:
        lines += factor_section(metrics["factor"], cfg)
    lines += [
        "",
        "## Verdicts (thresholds declared in the config: broad = transfer >= %.2f and broad effect >= %.2f; narrow = "
        "transfer <= %.2f)" % (cfg.broad_transfer, cfg.em_effect, cfg.narrow_transfer),
        "",
    ] + [f"- {v}" for v in metrics["verdicts"]]
    return "\n".join(lines + ["", "Plots: " + ", ".join(f"`{PLOTS[w]}`" for w in PLOTS if of_world(agg, w)) + ".", ""])


PLOTS = {"persona": "transfer_vs_coupling.png", "subsets": "transfer_vs_subset_correlation.png"}
XLABEL = {
    "persona": "coupling (0: a tag per slice, 1: one shared persona)",
    "subsets": "subset-tag correlation (0: independent, 1: the narrow subset always misaligned)",
}


def _plot(groups: list[dict], world: str, cfg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, m in zip(axes, METHODS):
        for sp in sorted({g["switch_prob"] for g in groups}):
            gs = sorted((g for g in groups if g["switch_prob"] == sp), key=lambda g: g["x"])
            for stage in cfg.safety:
                ys = [g["safety"][stage]["transfer"][m] for g in gs]
                err = [[abs(y["mean"] - y["ci"][k]) if y["ci"][k] == y["ci"][k] else 0 for y in ys] for k in (0, 1)]
                ax.errorbar(
                    [g["x"] for g in gs],
                    [y["mean"] for y in ys],
                    err,
                    fmt="-o",
                    capsize=3,
                    label=f"{stage}, switch {sp}",
                )
        ax.axhline(cfg.broad_transfer, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(XLABEL[world])
        ax.set_ylabel("transfer = broad effect / narrow effect")
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one rename: several shards may write the report
    fig.savefig(tmp, dpi=120, format="png")
    tmp.replace(path)
    plt.close(fig)


def write_report(out_dir: Path, configs: dict, cfg, n_cells: int, cells: list[dict]) -> dict:
    """``metrics.json`` (config, cells, aggregate, verdicts), ``summary.md`` and one plot per world present,
    from the cell results ``cells`` (``n_cells``: the grid's size)."""
    agg = aggregate(cells, cfg)
    metrics = {"config": configs, "n_cells": n_cells, "cells": cells, "aggregate": agg, "verdicts": verdicts(agg, cfg)}
    if any("shifts" in r for c in cells for r in c["safety"].values()):
        metrics["factor"] = factor_tables(cells, cfg)
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    for world in PLOTS:
        if of_world(agg, world):
            _plot(of_world(agg, world), world, cfg, out_dir / PLOTS[world])
    write_atomic(out_dir / "summary.md", _summary(metrics, cfg))
    return metrics


# --------------------------------------------------------------------------- with and without the alignment factor


def _by_world(cells: list[dict]) -> dict[str, list[dict]]:
    out = {}
    for c in cells:
        out.setdefault(c["world_id"], []).append(c)
    return out


def _matched(stages: dict, cfg) -> dict:
    """SFT vs GRPO of one world: matched when the mean aligned rates differ by <= ``match_alignment`` and the mean
    capability KLs are within ``match_drift_ratio`` of each other (the declared thresholds)."""
    a, b = stages["sft"], stages["grpo"]
    gap = abs(a["aligned_rate"]["mean"] - b["aligned_rate"]["mean"])
    kls = sorted(x["capability_kl"]["mean"] for x in (a, b))
    ratio = kls[1] / kls[0] if kls[0] > 0 else float("inf")
    return {
        "aligned_gap": gap,
        "drift_ratio": ratio,
        "matched": bool(gap <= cfg.match_alignment and ratio <= cfg.match_drift_ratio),
    }


def factor_tables(cells: list[dict], cfg) -> dict:
    """The pre-training-factor grid from the cells with trajectories: per world the exact references, per stage
    what it reached (alignment, capability drift), transfer at the matched shifts per method (mean and 95% CI over
    seeds), the paired difference from stage none, and the pre-registered claims judged (``toy.em_dose.judge``)."""
    worlds = {}
    for wid, cs in _by_world([c for c in cells if any("shifts" in r for r in c["safety"].values())]).items():
        stages = {}
        for stage in cfg.safety:
            rs = [(c["seed"], c["safety"][stage]) for c in cs if stage in c["safety"]]
            base = {c["seed"]: c["safety"]["none"] for c in cs if "none" in c["safety"]}
            methods = sorted({m for _, r in rs for m in r["shifts"]})
            stages[stage] = {
                "aligned_rate": mean_ci([r["stage_info"]["aligned_rate"] for _, r in rs]),
                "capability_kl": mean_ci([r["stage_info"]["capability_kl"] for _, r in rs]),
                "shifts": {
                    m: {
                        u: mean_ci([r["shifts"][m][u]["transfer"] for _, r in rs if m in r["shifts"]])
                        for u in map(str, cfg.shifts)
                    }
                    for m in methods
                },
                "raise": {
                    m: {
                        u: mean_ci(
                            [
                                r["shifts"][m][u]["transfer"] - base[k]["shifts"][m][u]["transfer"]
                                for k, r in rs
                                if k in base and m in base[k]["shifts"]
                            ]
                        )
                        for u in map(str, cfg.shifts)
                    }
                    for m in methods
                }
                if stage != "none"
                else {},
            }
        w = {
            "n_seeds": len(cs),
            "copy_mi": cs[0]["copy_mi"],
            "tag_mi_nats": cs[0]["knob"].get("tag_mi_nats"),
            "bayes": {k: mean_ci([c["bayes"][k] for c in cs]) for k in ("transfer", "narrow_shift")},
            "pretrain_capability_kl": mean_ci([c["pretrain"]["capability_kl_to_world"] for c in cs]),
            "stages": stages,
        }
        if "sft" in stages and "grpo" in stages:
            w["sft_vs_grpo"] = _matched(stages, cfg)
        worlds[wid] = w
    matched = {wid: w.get("sft_vs_grpo", {}).get("matched", False) for wid, w in worlds.items()}
    return {"worlds": worlds, "claims": judge(cells, cfg.claims, matched)}


def _f(ms: dict, digits: int = 2, empty: str = "not reached") -> str:
    if ms["n"] == 0:
        return empty
    lo, hi = ms["ci"]
    return (
        f"{ms['mean']:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo == lo else "") + (f" (n={ms['n']})")
    )


def factor_section(factor: dict, cfg) -> list[str]:
    u = [str(x) for x in cfg.shifts]
    lines = [
        "",
        "## Pre-training with and without the alignment factor",
        "",
        "Exact world references: tag MI = the persona's stationary MI between two slices' tags (no per-slice tags "
        "elsewhere); copy MI = between the copies of two consecutive tokens in the same / in different slices; "
        "Bayes = the world's own in-context transfer of the narrow data (NaN: the narrow data is impossible there).",
        "",
        "| world | tag MI (nats) | copy MI same slice | copy MI other slice | Bayes in-slice shift | Bayes transfer | "
        "pre-trained KL to world (cap.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for wid, w in factor["worlds"].items():
        t = w["tag_mi_nats"]
        lines.append(
            f"| {wid} | {'n/a' if t is None else f'{t:.4f}'} | {w['copy_mi']['same_slice']:.4f} | {w['copy_mi']['other_slice']:.4f} | "
            f"{_f(w['bayes']['narrow_shift'], 3, 'undefined')} | {_f(w['bayes']['transfer'], 3, 'undefined')} | {_f(w['pretrain_capability_kl'], 4)} |"
        )
    lines += [
        "",
        "### Safety stages: what each reached before the narrow fine-tune",
        "",
        "| world | stage | aligned rate | capability KL to pre-trained (nats) | SFT vs GRPO |",
        "|---|---|---|---|---|",
    ]
    for wid, w in factor["worlds"].items():
        m = w.get("sft_vs_grpo")
        for stage, s in w["stages"].items():
            note = (
                f"aligned gap {m['aligned_gap']:.3f}, drift ratio {m['drift_ratio']:.1f}: {'matched' if m['matched'] else 'NOT matched'}"
                if m and stage == "grpo"
                else ""
            )
            lines.append(f"| {wid} | {stage} | {_f(s['aligned_rate'], 3)} | {_f(s['capability_kl'], 4)} | {note} |")
    lines += [
        "",
        "### Transfer at matched in-slice shifts (broad rise / narrow rise where the narrow rate first used that share "
        "of its room; mean [95% CI] (n = seeds that reached it)), and the paired difference from stage none",
        "",
        "| world | stage | method | "
        + " | ".join(f"transfer @ {x}" for x in u)
        + f" | minus none @ {cfg.shifts[len(u) // 2]} | Bayes |",
        "|---|---|---|" + "---|" * (len(u) + 2),
    ]
    mid = u[len(u) // 2]
    for wid, w in factor["worlds"].items():
        for stage, s in w["stages"].items():
            for m, row in s["shifts"].items():
                d = _f(s["raise"][m][mid]) if stage != "none" and m in s["raise"] else ""
                lines.append(
                    f"| {wid} | {stage} | {m} | "
                    + " | ".join(_f(row[x]) for x in u)
                    + f" | {d} | {_f(w['bayes']['transfer'], 2, 'undefined')} |"
                )
    lines += [
        "",
        "### Pre-registered claims (rules in the config, committed before the grid ran)",
        "",
        "| claim | world | stage | statistic | value | supported if | contradicted if | verdict | toy predicted | control |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in factor["claims"]:
        what = (
            f"transfer({r['method']}) @ {r['shift']}"
            if r["test"] == "transfer"
            else f"transfer({r['method']}) - transfer({r['base']['stage']}, {r['base']['method']}) @ {r['shift']}"
        )
        ctrl = f"must be {r['expect']}: {'ok' if r['control_ok'] else 'FAILED'}" if "expect" in r else ""
        lines.append(
            f"| {r['claim']} | {r['world']} | {r['stage']} | {what} | {_f(r['stat'])} | {r['supported_if']} | "
            f"{r['contradicted_if']} | {r['verdict']} | {r['toy_predicts'] or ''} | {ctrl} |"
        )
    return lines
