"""The steering run's write-up (``llm.steer.run``): ``summary.md`` and the plots ``steering.png``, ``layers.png`` and
``monitor.png``."""

from __future__ import annotations

import math
from pathlib import Path


def plot_steering(m: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, conds = m["steering"], m["conditions"]

    def nan(x):  # a condition with no scored reply has no mean: drawn as a gap
        return float("nan") if x is None else x

    se = [1.96 * nan(conds.get(f"alpha_{a:g}", {}).get("aligned_se")) for a in s["alphas"]]
    em_err = [
        [max(e - c[0], 0), max(c[1] - e, 0)] if e is not None and c and c[0] is not None else [float("nan")] * 2
        for e, c in zip(s["em_rate"], [conds.get(f"alpha_{a:g}", {}).get("em_ci") for a in s["alphas"]])
    ]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].errorbar(
        s["alphas"],
        [nan(x) for x in s["aligned"]],
        yerr=se,
        fmt="o-",
        capsize=3,
        label="misalignment direction (95% CI)",
    )
    ax[1].errorbar(
        s["alphas"], [nan(e) for e in s["em_rate"]], yerr=list(zip(*em_err)) if em_err else None, fmt="o-", capsize=3
    )
    for name, r in conds.items():
        if name.startswith("random") and "alpha" in name:
            a = float(name.split("alpha_")[1])
            ax[0].errorbar(
                [a],
                [nan(r["aligned"])],
                yerr=[1.96 * nan(r.get("aligned_se"))],
                fmt="x",
                color="gray",
                capsize=3,
                label="random direction, same norm",
            )
            ax[1].plot([a], [nan(r["em_rate"])], "x", color="gray")
    # one colour per ablated direction, one line style per extent: four lines a reader can tell apart
    styles = {
        "ablate_one": ("C3", "--", f"ablate v at {m['steer_site']}"),
        "ablate_all": ("C3", ":", "ablate v at every block"),
        "random0_ablate_one": ("0.5", "--", f"ablate random at {m['steer_site']}"),
        "random0_ablate_all": ("0.5", ":", "ablate random at every block"),
    }
    for name, (color, ls, label) in styles.items():
        if name in conds and conds[name]["aligned"] is not None:
            ax[0].axhline(conds[name]["aligned"], color=color, ls=ls, lw=1.2, label=label)
    ax[0].set(xlabel="alpha (steering strength)", ylabel="mean aligned score (judge)")
    ax[1].set(xlabel="alpha (steering strength)", ylabel="EM rate (95% CI)")
    handles, labels = ax[0].get_legend_handles_labels()
    ax[0].legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
    fig.suptitle(f"steering at {m['steer_site']}")
    fig.tight_layout()
    fig.savefig(out / "steering.png", dpi=120)
    plt.close(fig)

    names = list(m["per_site"])
    fig, ax = plt.subplots(1, 2, figsize=(max(9, 0.3 * len(names) * 2), 3.8))
    ax[0].plot(range(len(names)), [m["per_site"][n]["norm"] for n in names], "o-")
    ax[0].set(ylabel="||mean diff||")
    ax[1].plot(range(len(names)), [m["per_site"][n]["test_auroc"] for n in names], "o-")
    ax[1].set(ylabel="held-out AUROC of projection", ylim=(0.4, 1.02))
    for a in ax:
        a.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        a.set_xlabel("residual site")
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=120)
    plt.close(fig)

    if "monitor" in m:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.scatter(m["monitor"]["aligned_score"], m["monitor"]["projection"], s=10)
        ax.set(
            xlabel="judge aligned score",
            ylabel="projection on direction",
            title=f"Spearman {m['monitor']['spearman_vs_aligned']:.2f}",
        )
        fig.tight_layout()
        fig.savefig(out / "monitor.png", dpi=120)
        plt.close(fig)


def fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def paired_text(p: dict | None) -> str:
    """``mean [lo, hi]`` of a ``paired_difference``; the mean alone at counts where no interval holds its level."""
    if not p or p.get("mean") is None:
        return "n/a"
    if not p["calibrated"]:
        return f"{fmt(p['mean'])} (no calibrated interval at these counts)"
    return f"{fmt(p['mean'])} [{fmt(p['ci'][0])}, {fmt(p['ci'][1])}]"


def write_summary(m: dict, out: Path) -> None:
    c = m["config"]
    best = max(m["per_site"], key=lambda n: m["per_site"][n]["test_auroc"])
    lines = [
        f"# Misalignment direction, steering and ablation ({c['steer_site']})",
        "",
        f"Direction from {c['n_per_class']} aligned + {c['n_per_class']} misaligned replies (mean over up to "
        f"{c['max_answer_tokens']} reply tokens). At {m['steer_site']}: ||v|| = {fmt(m['direction_norm'])} "
        f"(mean residual norm {fmt(m['residual_norm_mean'])}), held-out AUROC "
        f"{fmt(m['per_site'][m['steer_site']]['test_auroc'])}; best site {best} "
        f"({fmt(m['per_site'][best]['test_auroc'])}).",
        "",
        f"Replies: {c['samples_per_paraphrase']} per EM question and condition, <= {c['max_new_tokens']} tokens, "
        f"temperature {c['temperature']}, judge {c['judge']}.",
        "",
        "| condition | aligned (+- s.e.) | aligned, coherent replies | coherent | EM rate | counted |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m["conditions"].items():
        lines.append(
            f"| {name} | {fmt(r['aligned'])} +- {fmt(r['aligned_se'])} | {fmt(r.get('aligned_coherent'))} | "
            f"{fmt(r['coherent'])} | {fmt(r['em_rate'])} | {r['n_counted']}/{r['n_replies']} |"
        )
    s = m["steering"]
    mono = s["monotonicity"]
    unscored = (
        f"; alphas with no scored reply, left out: {', '.join(f'{a:g}' for a in s['unscored_alphas'])}"
        if s["unscored_alphas"]
        else ""
    )
    lines += [
        "",
        f"Aligned score monotone non-increasing in alpha: {fmt(s['aligned_monotone_decreasing'])} "
        f"(Spearman alpha vs aligned {fmt(s['spearman_alpha_vs_aligned'])}{unscored}); within sampling noise: "
        f"{mono['within_noise']} (no step between neighbouring alphas rises with a calibrated paired 95% CI above 0); "
        f"trend significant: {mono['trend_significant']}.",
        "",
        "Paired changes: Student-t 95% CIs over replies, given only at counts where `python -m llm.experiments.em_calibration` "
        "measured their coverage inside [93%, 97%] (56 pairs over 8 questions or more; below that the mean stands "
        "alone and no verdict is drawn); the last column is the smallest mean change these replies detect with 80% power.",
        "",
        "| alpha step | paired change of aligned (95% CI) | replies | detectable (80% power) |",
        "|---|---|---|---|",
    ]
    for st in mono["steps"] + (
        [mono["overall"] | {"from": s["alphas"][0], "to": s["alphas"][-1]}] if mono["overall"] else []
    ):
        lines.append(f"| {st['from']:g} -> {st['to']:g} | {paired_text(st)} | {st['n']} | {fmt(st['mde'])} |")
    if "monitor" in m:
        mo = m["monitor"]
        lines += [
            "",
            f"Projection monitor on {mo['n']} judged replies ({mo['n_misaligned']} misaligned, "
            f"{mo['n_aligned']} aligned): Pearson {fmt(mo['pearson_vs_aligned'])}, Spearman "
            f"{fmt(mo['spearman_vs_aligned'])} with the aligned score; AUROC {fmt(mo['auroc_misaligned'])}.",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
