"""The factored-subspaces run's write-up (``llm.factored.run``): ``summary.md`` and the plots of probes, subspace
overlap, factor steering and the LoRA update's shares."""

from __future__ import annotations

import math
from pathlib import Path


def plot_factored(m: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = m["steering"]
    names = list(s)
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.5))
    ax[0].bar(names, [s[n].get("alignment_shift", float("nan")) for n in names])
    ax[0].set(ylabel="alignment read-out shift")
    ax[1].bar(names, [s[n].get("topic_shift", float("nan")) for n in names])
    ax[1].set(ylabel="true-topic read-out shift")
    ax[2].bar(names, [float("nan") if s[n]["judge_aligned"] is None else s[n]["judge_aligned"] for n in names])
    ax[2].set(ylabel="judge aligned score")
    for a in ax:
        a.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "factor_steering.png", dpi=120)
    plt.close(fig)

    groups = {
        "direction": m["direction_shares"],
        **{k.split(".")[-3] + "." + k.split(".")[-1]: v for k, v in m.get("lora", {}).items()},
    }
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (g, sh) in enumerate(groups.items()):
        for j, sub in enumerate(("alignment", "topic")):
            x = i * 3 + j
            ax.bar(x, sh[sub]["share"], color=f"C{j}", label=sub if i == 0 else None)
            ax.plot(
                [x - 0.4, x + 0.4],
                [sh[sub]["random_q95"]] * 2,
                "k--",
                lw=1,
                label="random q95" if i == j == 0 else None,
            )
        ax.text(i * 3 + 0.5, -0.08, g, ha="center", fontsize=7, transform=ax.get_xaxis_transform())
    ax.set(ylabel="share of squared norm in subspace", xticks=[])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "subspaces.png", dpi=120)
    plt.close(fig)


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def write_summary(m: dict, out: Path) -> None:
    c, p, o = m["config"], m["probes"], m["overlap"]
    lines = [
        f"# Factored subspaces at {c['site']}: topic x alignment",
        "",
        f"{m['n_texts']} replies ({c['n_per_cell']} per cell; topics {', '.join(c['topics'])}); ridge alpha {c['ridge_alpha']}, "
        f"{c['n_folds']}-fold held-out metrics.",
        "",
        "| probe | R^2 | accuracy | shuffled acc. | random-init acc. | MSE / random-init MSE |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in p.items():
        lines.append(
            f"| {name} | {_f(r['test']['r2'])} | {_f(r['accuracy'])} | {_f(r['shuffled_accuracy'])} | "
            f"{_f(r.get('random_init_accuracy'))} | {_f(r.get('ratio_to_random_init'))} |"
        )
    ds = m["direction_shares"]
    lines += [
        "",
        f"Subspace overlap (alignment dim {o['dim_a']}, topic dim {o['dim_b']}): mean cos^2 {_f(o['mean_cos2'])} "
        f"(random {_f(o['random_mean_cos2'])}), angles {', '.join(f'{a:.1f}' for a in o['angles_deg'])} deg.",
        f"Misalignment direction: share in alignment subspace {_f(ds['alignment']['share'])} (random q95 "
        f"{_f(ds['alignment']['random_q95'])}), in topic subspace {_f(ds['topic']['share'])} (random q95 {_f(ds['topic']['random_q95'])}); "
        f"cosine with the alignment probe {_f(m['cos_direction_alignment_probe'])}.",
        "",
        "| steering | ||dx|| | alignment shift | true-topic shift | topic acc. | judge aligned |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in m["steering"].items():
        lines.append(
            f"| {name} | {_f(r['edit_norm'])} | {_f(r.get('alignment_shift'))} | {_f(r.get('topic_shift'))} | "
            f"{_f(r['topic_accuracy'])} | {_f(r['judge_aligned'])} |"
        )
    for name, r in m.get("lora", {}).items():
        lines += [
            "",
            f"LoRA B of {name} (writes after {r['layer_site']}, probes at {r['probe_site']}): share in alignment "
            f"{_f(r['alignment']['share'])} (random mean {_f(r['alignment']['random_mean'])}, q95 {_f(r['alignment']['random_q95'])}), "
            f"in topic {_f(r['topic']['share'])} (random mean {_f(r['topic']['random_mean'])}, q95 {_f(r['topic']['random_q95'])}); "
            f"cosine with the misalignment direction {_f(r['cos_direction'])}.",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
