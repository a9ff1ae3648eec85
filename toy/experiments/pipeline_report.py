"""The main job's figures and ``summary.md`` (``toy.experiments.pipeline`` writes them into its run folder): the
belief simplex (true against probed), probe MSE by site, the emergence of the geometry during training and the
validation loss against the floor."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _project(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """2-D coordinates: the 2-simplex drawn as a triangle for 3 states; else the top-2 principal axes of
    ``reference`` (the true beliefs), applied to ``points``."""
    if reference.shape[1] == 3:
        corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=points.dtype)
        return points @ corners
    mu = reference.mean(0)
    axes = torch.linalg.svd(reference - mu, full_matrices=False).Vh[:2].T
    return (points - mu) @ axes


def plot_simplex(
    beliefs: torch.Tensor, predicted: torch.Tensor, path: Path, title: str, max_points: int, weights=None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beliefs, predicted = beliefs.double().cpu(), predicted.double().cpu()
    if len(beliefs) > max_points:  # the most probable rows: the dense part of the fractal
        keep = (
            torch.argsort(weights.cpu(), descending=True)[:max_points]
            if weights is not None
            else torch.arange(max_points)
        )
        beliefs, predicted = beliefs[keep], predicted[keep]
    colors = beliefs[:, :3].clamp(0, 1)
    colors = (colors / colors.max(1, keepdim=True).values.clamp_min(1e-12)).numpy()  # RGB = belief, brightest = 1
    true2, pred2 = _project(beliefs, beliefs), _project(predicted, beliefs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    for ax, pts, name in zip(axes, (true2, pred2), ("true belief states", "linear probe's prediction")):
        ax.scatter(pts[:, 0], pts[:, 1], c=colors, s=0.5, linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if beliefs.shape[1] == 3:
            tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 0.0]])
            ax.plot(tri[:, 0], tri[:, 1], color="0.6", lw=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_probe_mse(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sites"]) + (["concat"] if "concat" in report else [])
    entry = lambda n: report["concat"] if n == "concat" else report["sites"][n]  # noqa: E731
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, [entry(n)["test"]["mse"] for n in names], "o-", label="trained model")
    ax.plot(x, [entry(n)["random_init"]["test"]["mse"] for n in names], "s--", label="random-init control")
    ax.plot(x, [entry(n)["shuffled"]["test"]["mse"] for n in names], "^:", label="shuffled-target control")
    ax.set_xticks(list(x), names, rotation=30)
    ax.set_yscale("log")
    exact = report["config"].get("evaluation") == "population"
    ax.set_ylabel("exact population MSE per coordinate" if exact else "held-out MSE per coordinate")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_val_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [h for h in history if "val_loss" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = [h["tokens"] for h in ev]
    a.plot(tokens, [h["val_loss"] for h in ev], "o-", label="exact validation loss")
    if ev:
        a.axhline(ev[-1]["floor"], color="k", ls="--", label=f"floor {ev[-1]['floor']:.5f}")
    tr = [h for h in history if h.get("train_loss") is not None]
    a.plot([h["tokens"] for h in tr], [h["train_loss"] for h in tr], color="0.6", lw=0.8, label="train loss")
    a.set_xlabel("training tokens")
    a.set_ylabel("nats")
    a.legend()
    b.plot(tokens, [max(h["val_loss"] - h["floor"], 1e-7) for h in ev], "o-")
    b.set_yscale("log")
    b.set_xlabel("training tokens")
    b.set_ylabel("validation loss - floor (nats)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_probe_emergence(history: list[dict], path: Path, title: str) -> None:
    """Every site's exact probe MSE over training (the ``probe_mse/<site>`` entries of the history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [h for h in history if any(k.startswith("probe_mse/") for k in h)]
    sites = [k.split("/", 1)[1] for k in ev[0] if k.startswith("probe_mse/")] if ev else []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for site in sites:
        ax.plot([h["step"] for h in ev], [h[f"probe_mse/{site}"] for h in ev], "o-", ms=3, label=site)
    ax.set(xlabel="training step", ylabel="probe MSE per coordinate", yscale="log", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_summary(path: Path, metrics: dict) -> None:
    m, h, t = metrics, metrics["probe_headline"], metrics["training"]
    lines = [
        f"# {m['process']} -- toy pre-training and belief probes",
        "",
        f"Model: GPT-2 {m['model']['n_layers']} layers, d_model {m['model']['d_model']}, {m['model']['n_heads']} head(s), "
        f"MLP {m['model']['d_mlp']}; context {m['context_length']}. Trained {t['steps']} steps "
        f"({t['tokens']:,} tokens) in {t['elapsed_s']:.0f} s ({t['tokens_per_s']:,.0f} tokens/s) on {t['device']}.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| exact validation loss (nats) | {m['val_loss']:.6f} |",
        f"| floor (nats) | {m['floor']:.6f} |",
        f"| gap | {m['val_loss'] - m['floor']:.2e} |",
        f"| last-block probe MSE, {h['probe_evaluation']} ({h['final_layer_site']}) | {h['final_layer_test_mse']:.3e} (R^2 {h['final_layer_test_r2']:.4f})"
        + (
            f", std over {len(h['final_layer_test_mse_split_seeds'])} splits {h['final_layer_test_mse_split_std']:.1e}"
            if "final_layer_test_mse_split_seeds" in h
            else ""
        )
        + " |",
        f"| random-init control test MSE | {h['final_layer_random_init_mse']:.3e} |",
        f"| shuffled-target control test MSE | {h['final_layer_shuffled_mse']:.3e} |",
        f"| ratio to random-init control | {h['final_layer_ratio_to_random_init']:.3f} |",
        f"| best single site | {h['best_single_site']}: {h['best_single_site_test_mse']:.3e} |",
    ]
    if "concat_test_mse" in h:
        lines.append(
            f"| all sites concatenated | {h['concat_test_mse']:.3e} (beats every single site: {h['concat_beats_every_single_site']}) |"
        )
    lines += ["", "Checks:", ""]
    lines += [f"- {name}: {'PASS' if ok else 'FAIL'} ({detail})" for name, (ok, detail) in m["checks"].items()]
    lines += [
        "",
        "Plots: `belief_simplex.png`, `probe_mse_by_layer.png`, `probe_mse_emergence.png`, `val_loss.png`. "
        "Probe: `probe_final.json`.",
        "",
    ]
    path.write_text("\n".join(lines))
