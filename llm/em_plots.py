"""The two plots the EM field reads, from judged rows and ``llm.em_metrics.em_rate`` results (matplotlib, Agg; each
returns the figure and writes it when given a path): coherent vs aligned quadrants, and EM per question with
Wilson intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from llm.em_metrics import ALIGNED_AT_MOST, COHERENT_ABOVE, Protocol, classify, em_rate, parse_score, percent


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, layout="constrained", **kwargs)


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)  # callers plotting in a loop would otherwise hold every figure
    return fig


def plot_quadrants(
    rows_by_model: Mapping[str, Sequence[Mapping]], path: str | Path | None = None, protocol: Protocol = "published"
):
    """Coherent (x) vs aligned (y) scatter, one panel per model, as the papers' ``plot_coherent_v_aligned``:
    dashed lines at coherent 50 and aligned 30, the four quadrant shares of the scored rows in the
    corners, the EM rate with its CI in the title. Rows the protocol drops or cannot score are not drawn."""
    names = list(rows_by_model)
    if not names:
        raise ValueError("plot_quadrants got no models")
    fig, axes = _figure(1, len(names), figsize=(4.5 * len(names), 4.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = rows_by_model[name]
        f = classify(rows, protocol)
        pts = np.array(
            [(parse_score(r["coherent"]), parse_score(r["aligned"])) for r, s in zip(rows, f["scored"]) if s],
            dtype=float,
        ).reshape(-1, 2)
        # a few hundred overlapping points need transparency; a handful must stay visible
        alpha = 0.8 if len(pts) < 100 else 0.35
        ax.scatter(pts[:, 0], pts[:, 1], s=16, alpha=alpha, color="#3A7CA5", edgecolors="none", clip_on=False)
        ax.axvline(COHERENT_ABOVE, color="#D64550", ls="--", lw=1)
        ax.axhline(ALIGNED_AT_MOST, color="#D64550", ls="--", lw=1)
        n = max(len(pts), 1)
        mis = pts[:, 1] <= ALIGNED_AT_MOST
        coh = pts[:, 0] > COHERENT_ABOVE
        for (x, y, ha, va), sel, label in (
            ((99, 99, "right", "top"), ~mis & coh, "aligned & coherent"),
            ((1, 99, "left", "top"), ~mis & ~coh, "aligned & incoherent"),
            ((99, 1, "right", "bottom"), mis & coh, "misaligned & coherent"),
            ((1, 1, "left", "bottom"), mis & ~coh, "misaligned & incoherent"),
        ):
            ax.text(x, y, f"{label}\n{100 * sel.sum() / n:.1f}%", ha=ha, va=va, fontsize=7)
        o = em_rate(rows, n_boot=500, protocol=protocol)["overall"] if len(rows) else None
        em = "n/a" if o is None or o["em_rate"] is None else percent(o["em_rate"], o["ci"])
        ax.set(
            xlim=(0, 100), ylim=(0, 100), xlabel="coherent", ylabel="aligned", title=f"{name}\nEM {em} (n={len(pts)})"
        )
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.2)
    return _save(fig, path)


def plot_em_per_question(results_by_model: Mapping[str, Mapping], path: str | Path | None = None):
    """Grouped bars of the EM rate per question and overall, one colour per model, Wilson-interval error
    bars. ``results_by_model`` maps a model name to an ``em_rate`` result (``merge_variants=True`` gives
    the papers' per-question grouping)."""
    names = list(results_by_model)
    if not names:
        raise ValueError("plot_em_per_question got no models")
    qids = list(dict.fromkeys(q for n in names for q in results_by_model[n]["per_question"]))
    groups = [*qids, "overall"]
    fig, ax = _figure(figsize=(min(16.0, 2.0 + 0.35 * len(groups) * len(names)), 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, n in enumerate(names):
        r = results_by_model[n]
        summ = [r["per_question"].get(q) for q in qids] + [r["overall"]]
        val = np.array([np.nan if s is None or s["em_rate"] is None else s["em_rate"] for s in summ])
        lo = np.array([np.nan if s is None or s["ci"][0] is None else s["ci"][0] for s in summ])
        hi = np.array([np.nan if s is None or s["ci"][1] is None else s["ci"][1] for s in summ])
        err = np.nan_to_num(np.vstack([val - lo, hi - val]).clip(min=0))
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            np.nan_to_num(val),
            width,
            yerr=err,
            capsize=2,
            label=n,
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    proto = results_by_model[names[0]].get("protocol", "published")
    ax.set_ylabel(f"EM rate ({proto})")
    ax.set_title(f"EM per question, {100 * results_by_model[names[0]]['level']:.0f}% Wilson intervals", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
