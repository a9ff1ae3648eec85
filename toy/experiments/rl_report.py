"""The files ``toy.experiments.rl`` writes about its runs: one run's ``summary.md`` and ``reward_curve.png``, and over
several seeds the verdict counts, the headline numbers' mean and 95% t-CI (``aggregate``), ``summary.md`` and
``reward_curves.png``."""

from __future__ import annotations

from pathlib import Path

from plumbing.stats import mean_ci
from toy.composition import DetectorConfig

# --------------------------------------------------------------------------- one run


def plot_rewards(
    path: Path, log_history: list[dict], exact: list[tuple[int, float]], zero: list[tuple[int, float]], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in log_history if "reward" in h]
    rewards = [h["reward"] for h in log_history if "reward" in h]
    if rewards:
        w = max(1, len(rewards) // 30)
        smooth = [
            sum(rewards[max(0, i - w + 1) : i + 1]) / len(rewards[max(0, i - w + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(steps, rewards, color="0.8", lw=0.8, label="sampled (per step)")
        ax.plot(steps, smooth, color="C0", label=f"sampled ({w}-step mean)")
    if exact:
        ax.plot(*zip(*exact), "o-", color="C3", ms=3, label="exact, eval prompts")
    ax.set(xlabel="GRPO step", ylabel="reward", title=title)
    ax.legend(fontsize=8)
    if zero:
        ax2.plot(*zip(*zero), color="C2")
    ax2.set(xlabel="GRPO step", ylabel="share of groups", title="zero-advantage groups", ylim=(-0.02, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_summary(m: dict) -> str:
    lines = [
        f"# GRPO: {m['reward_name']} on {m['process']}",
        "",
        f"- pre-trained model: `{m['pretrained_path']}`; post-RL model: `{m['post_path']}`",
        f"- {m['grpo']['max_steps']} steps, lr {m['grpo']['learning_rate']}, beta {m['grpo']['beta']}, "
        f"{m['grpo']['num_generations']} completions per prompt, {m['grpo']['per_device_train_batch_size']} completions per step; "
        f"{m['train_seconds']:.0f} s of training",
        f"- reward (exact, eval prompts): {m.get('reward_before', float('nan')):.4f} before -> {m.get('reward_after', float('nan')):.4f} after"
        if "reward_before" in m and "rare_token_frequency_before" not in m
        else f"- reward (sampled completions, eval prompts): {m['reward_before']:.4f} before -> {m['reward_after']:.4f} after",
        f"- sampled training reward: {m['sampled_reward_first_steps']:.4f} (first steps) -> {m['sampled_reward_last_steps']:.4f} (last steps)",
        f"- zero-advantage groups: mean {m['zero_advantage']['mean']:.1%}, max {m['zero_advantage']['max']:.1%} "
        f"(warning threshold {m['zero_advantage']['threshold']:.0%})",
        "",
        "![reward curve](reward_curve.png)",
    ]
    if "rare_token_frequency_before" in m:
        lines += [
            "",
            "## Rare capability",
            f"- rare-emission frequency per completion token: {m['rare_token_frequency_before']:.4f} before -> "
            f"{m['rare_token_frequency_after']:.4f} after (the process itself: {m['rare_token_frequency_process']:.4f}); "
            f"completions the process can produce: {m['valid_completion_share_before']:.1%} before -> {m['valid_completion_share_after']:.1%} after",
            f"- rare factor belief, held-out R^2 of a linear probe on the policy's own sequences: "
            f"{m['rare_decodability_before']['r2']:.3f} before -> {m['rare_decodability_after']['r2']:.3f} after",
        ]
    if "report" in m:
        lines += ["", "See `composition_report.md` for the composition report of this (pre, post) pair."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- several seeds


SUMMARY_KEYS = {
    "reward_pre": ("behaviour", "reward_pre"),
    "reward_post": ("behaviour", "reward_post"),
    "reward_output_only": ("behaviour", "reward_output_only"),
    "excess_reward": ("behaviour", "excess_reward"),
    "kl_post_to_pre": ("behaviour", "kl_post_to_pre"),
    "kl_to_true_optimum": ("behaviour", "optimum_true_reward", "kl"),
    "kl_to_output_reweighting": ("behaviour", "kl_to_output_reweighting"),
    "explained_kl": ("behaviour", "explained_kl"),
    "latent_acc_pre": ("representation", "latent_accuracy", "pre"),
    "latent_acc_post": ("representation", "latent_accuracy", "post"),
    "latent_gain": ("representation", "latent_gain"),
    "latent_acc_output_site_pre": ("representation", "latent_accuracy", "pre_output_site"),
    "latent_acc_output_site_post": ("representation", "latent_accuracy", "post_output_site"),
    "latent_gain_output_site": ("representation", "latent_gain_output_site"),
    "latent_share_in_factor_subspaces": ("representation", "latent_share_in_factor_subspaces"),
    "change_share_in_factor_subspaces": ("representation", "change_share_in_factor_subspaces"),
    "change_share_random_subspace": ("representation", "change_share_random_subspace"),
}


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


def aggregate(reports: list[dict]) -> dict:
    """Verdict counts and mean/95% CI of the headline numbers over seeds."""
    verdicts = [r["verdict"] for r in reports]
    return {
        "verdicts": verdicts,
        "verdict_counts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
        "stats": {k: mean_ci([float(_get(r, p)) for r in reports]) for k, p in SUMMARY_KEYS.items()},
        "transfer_mse": {
            key: mean_ci(
                [
                    sum(t[key] for t in r["representation"]["probe_transfer"])
                    / len(r["representation"]["probe_transfer"])
                    for r in reports
                ]
            )
            for key in ("mse_pre_probe_on_pre", "mse_pre_probe_on_post", "mse_refit_on_post")
        },
    }


def plot_seeds(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, m in enumerate(runs):
        if "exact_reward_curve" in m:
            ax.plot(*zip(*m["exact_reward_curve"]), "o-", ms=2, color=f"C{i}", label=f"seed {m['grpo']['seed']}")
        if "report" in m:
            ax.axhline(m["report"]["behaviour"]["reward_output_only"], color=f"C{i}", ls=":", lw=1)
    ax.set(
        xlabel="GRPO step",
        ylabel="exact expected reward (eval prompts)",
        title=f"{runs[0]['reward_name']}\n(dotted: output-only ceiling)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seeds_table(agg: dict, runs: list[dict], cfg: DetectorConfig, report_key: str = "report") -> list[str]:
    """Verdicts, mean / CI of the headline numbers and one row per seed, for the reports under ``report_key``."""
    lines = [
        f"Verdicts: {agg['verdicts']} ({agg['verdict_counts']}). Thresholds: {cfg.thresholds()}.",
        "",
        "| quantity | mean | 95% CI (t, over seeds) |",
        "|---|---|---|",
    ]
    for k, s in agg["stats"].items():
        lines.append(f"| {k} | {s['mean']:.4f} | [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}] |")
    for k, s in agg["transfer_mse"].items():
        lines.append(f"| factor-probe {k} | {s['mean']:.2e} | [{s['ci'][0]:.2e}, {s['ci'][1]:.2e}] |")
    lines += ["", "| seed | reward pre -> post | output-only | verdict | reason |", "|---|---|---|---|---|"]
    for m in runs:
        r = m[report_key]
        lines.append(
            f"| {m['grpo']['seed']} | {r['behaviour']['reward_pre']:.3f} -> {r['behaviour']['reward_post']:.3f} | "
            f"{r['behaviour']['reward_output_only']:.3f} | {r['verdict']} | {r['reason']} |"
        )
    return lines


def seeds_md(
    name: str, agg: dict, runs: list[dict], cfg: DetectorConfig, commands: str, control_steps: int | None = None
) -> str:
    lines = [f"# Composition detector over {len(runs)} seeds: {name}", "", f"Command: `{commands}`", ""]
    lines += _seeds_table(agg, runs, cfg) + ["", "![reward curves](reward_curves.png)"]
    if control_steps is not None:
        lines += [
            "",
            f"## Supervised control ({control_steps} cross-entropy steps onto pi_ref restricted to the "
            "top-reward tokens, same trainable parameters)",
            "",
        ]
        lines += _seeds_table(agg["control"], runs, cfg, report_key="control_report")
    return "\n".join(lines) + "\n"
