"""Factor steering against the mean-difference baseline along both coupling axes of the alignment world, over seeds.

    python -m toy.experiments.steering_knob --config configs/toy/factor_steering_knob.yaml
    python -m toy.experiments.steering_knob --config configs/toy/factor_steering_knob.yaml --settings coupling=1.0 --n_seeds 1 --max_steps 200
    # one GPU (one process):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.steering_knob --config configs/toy/factor_steering_knob.yaml

A *setting* is one point on one of two axes along which the alignment tag stops being one clean factor:

- ``rho=r``: ``toy.processes.tagged(capability, r)``, one tag whose steps are coupled with the capability's: the
  (tag, capability) belief stops being a product (the axis ``toy.experiments.factor_steering`` sweeps);
- ``coupling=c``: ``toy.alignment.persona_world(capability, slices, c)``, a tag per capability slice whose refreshes
  are shared with probability ``c``: 1 = one persona, 0 = independent slices. The (tags, capability) belief is a
  product at every ``c``; what changes is the inside of the alignment factor.

They meet at one point: ``rho=0`` and ``coupling=1`` are the same process (equal sequence probabilities; the
test pins it). For each setting and seed a toy GPT-2 is trained, a ridge probe residual -> joint belief is fitted,
and ``n_contexts`` fresh windows of ``context_length - 1`` tokens are steered at their last position (the last
position training predicts from) towards the exact tag belief of a window on
the other side (``toy.steering.steer_factor``) with two edits, each beside an equal-norm random edit:
``covariance`` ("factorize with the product step S, steer the tag factor, map back", least Mahalanobis norm) and ``mean_diff``
(the class-mean difference of the residual, misaligned-leaning contexts minus the rest, scaled so that the
probe's misaligned reading moves to the target's). Every reference distribution is exact (``toy.beliefs``).

Metrics (nats, mean over contexts, then mean and t-CI over seeds): tag KL (target || model, the copy marginal),
capability KL against the unedited model and against the exact process; beside the rule, the tag KL per next
capability token (``tag_kl_by_token``: per slice, which the copy marginal averages away when coupling < 1). Rule, declared in the config before the confirmatory
run (``ci_level``): with paired CIs over seeds of ``mean_diff - covariance`` (same model, same contexts), an edit
*wins* at a setting when the CI of the exact-process cap KL difference excludes 0 in its favour and the CI of
the tag KL difference does not exclude 0 against it; *trade-off* when both exclude 0 in opposite directions;
*tie* otherwise. The same rule is also applied to the cap KL against the unedited model.

Writes ``<output_dir>/``: ``metrics.json`` (cells with wall times, aggregates, verdicts), ``knob.png``,
``summary.md`` and ``models/<setting>_seed<k>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess
from plumbing.stats import mean_ci
from toy.alignment import pairwise_tag_mi, persona_world
from toy.collect import default_site
from toy.config import JsonDict, TrainConfig
from toy.model import ToyModelConfig
from toy.processes import Process, make_process, tagged
from toy.steering import mean_difference, steer_factor, steering_metrics, steering_probe
from toy.train import claim_experiment_dir, set_cpu_threads, train_on

KINDS = ("covariance", "mean_diff")
AXES = ("rho", "coupling")


def parse_setting(s: str) -> tuple[str, float]:
    """``"rho=0.5"`` / ``"coupling=1.0"`` -> ``(axis, value)``; raises with the accepted form."""
    axis, _, value = s.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if axis not in AXES or not 0 <= v <= 1:
        raise ValueError(f"setting {s!r}: write rho=<0..1> or coupling=<0..1>")
    return axis, v


@dataclass
class KnobConfig:
    """The two worlds, the settings, the probe, the contexts and the declared comparison rule."""

    capability: JsonDict = field(
        default_factory=lambda: JsonDict({"name": "mess3", "x": 0.05, "a": 0.85}),
        metadata={"help": "Capability process spec (toy.processes.make_process); JSON on the command line."},
    )
    slices: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Slice id of each capability token (coupling settings)."}
    )
    settings: list[str] = field(
        default_factory=lambda: ["rho=0.5", "rho=0.0", "coupling=1.0", "coupling=0.5", "coupling=0.0"],
        metadata={"help": "Knob settings, each rho=<r> (tagged) or coupling=<c> (persona_world)."},
    )
    switch_prob: float = field(default=0.05, metadata={"help": "Each tag's flip probability per step."})
    tag_noise: float = field(default=0.1, metadata={"help": "Probability that a token shows the other tag's copy."})
    n_seeds: int = field(default=3, metadata={"help": "Models per setting (seeds seed .. seed + n_seeds - 1)."})
    context_length: int = field(
        default=10,
        metadata={
            "help": "Tokens per training window; probing and steering use one fewer (the last trained position)."
        },
    )
    site: str | None = field(
        default=None, metadata={"help": "Residual site probed and edited (default: the last block's output)."}
    )
    probe_sequences: int = field(
        default=1000, metadata={"help": "Sequences for the probe, the covariance and the mean difference."}
    )
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the probe."})
    n_contexts: int = field(default=1000, metadata={"help": "Held-out windows steered at their last position."})
    ci_level: float = field(
        default=0.95, metadata={"help": "Level of the t-CIs over seeds that the comparison rule uses."}
    )

    def __post_init__(self):
        self.capability = dict(JsonDict(self.capability))
        if "name" not in self.capability:
            raise ValueError("capability must be a process spec with a 'name' key")
        if not self.settings:
            raise ValueError("settings must name at least one rho=<r> or coupling=<c>")
        for s in self.settings:
            parse_setting(s)
        if (
            self.n_seeds < 1
            or self.n_contexts < 4
            or self.probe_sequences < 10
            or not 0 < self.ci_level < 1
            or self.context_length < 3
        ):
            raise ValueError(
                "need n_seeds >= 1, n_contexts >= 4, probe_sequences >= 10, 0 < ci_level < 1, context_length >= 3"
            )


def make_world(cfg: KnobConfig, setting: str) -> Process:
    axis, v = parse_setting(setting)
    capability = make_process(cfg.capability["name"], **{k: x for k, x in cfg.capability.items() if k != "name"})
    if axis == "rho":
        return tagged(capability, v, cfg.switch_prob, cfg.tag_noise)
    return persona_world(capability, cfg.slices, v, cfg.switch_prob, cfg.tag_noise)


def run_cell(
    cfg: KnobConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, setting: str, seed: int, out_dir: Path
) -> dict:
    """Train, probe, steer one (setting, seed); returns the metrics with the cell's wall time."""
    t0 = time.time()
    process = make_world(cfg, setting)
    model = train_on(
        process, model_cfg, train_cfg, cfg.context_length, out_dir / "models" / f"{setting}_seed{seed}", seed
    )
    site = cfg.site or default_site(model)
    # probe and steer windows one token shorter than training's: the last training position has no label, so its
    # position embedding is never trained and its prediction is off (KL to the exact one ~0.1 nats against ~0.005
    # one position earlier, measured); the steered position is then the last one the model learned to predict from
    length = cfg.context_length - 1
    sp = steering_probe(model, process, site, length, cfg.probe_sequences, cfg.n_contexts, cfg.probe_alpha, seed)
    data, probe, probe_r2 = sp["data"], sp["probe"], sp["probe_r2"]
    out = steer_factor(
        model,
        process,
        probe,
        sp["tokens"],
        site,
        sp["cov"],
        mean_difference(data.X, data.beliefs, process),
        kinds=KINDS,
        seed=seed,
    )
    axis, _ = parse_setting(setting)
    return {
        "setting": setting,
        "seed": seed,
        "process": process.name,
        "site": site,
        "steered_position": length - 1,
        "probe_test_r2": probe_r2,
        "tag_mi_nats": pairwise_tag_mi(process) if axis == "coupling" else None,
        **steering_metrics(process, out),
        "wall_s": time.time() - t0,
    }


# --------------------------------------------------------------------------- aggregation and the declared rule

# (name, path into a cell's metrics): what the table and the plot show, per setting
SERIES = (
    [(n, (n,)) for n in ("tag_kl_unsteered", "tag_kl_by_token_unsteered", "cap_kl_exact_unsteered")]
    + [
        (f"{k}.{m}.{w}", (k, m, w))
        for k in KINDS
        for m in ("tag_kl", "tag_kl_by_token", "cap_kl", "cap_kl_exact")
        for w in ("steered", "random")
    ]
    + [(f"{k}.edit_norm_over_resid_norm", (k, "edit_norm_over_resid_norm")) for k in KINDS]
    + [
        ("probe_test_r2", ("probe_test_r2",)),
        ("exact_product_residual", ("exact_product_residual",)),
        ("wall_s", ("wall_s",)),
    ]
)


def _get(cell: dict, path: tuple[str, ...]) -> float:
    for p in path:
        cell = cell[p]
    return cell


def verdict(diff_cap: dict, diff_tag: dict) -> str:
    """The declared rule on paired CIs of ``mean_diff - covariance`` (cap KL and tag KL): ``covariance wins``,
    ``mean_diff wins``, ``trade-off`` or ``tie``."""

    def sign(d):  # +1: the CI is above 0 (mean_diff larger), -1: below, 0: it contains 0 (or there is no CI)
        lo, hi = d["ci"]
        return 1 if lo > 0 else -1 if hi < 0 else 0

    cap, tag = sign(diff_cap), sign(diff_tag)
    if cap == 0:
        return "tie"
    # cap > 0: mean_diff disturbs the capability more, so covariance wins unless its tag KL is significantly worse
    # (tag < 0); cap < 0: the mirror image
    return "trade-off" if tag == -cap else f"{'covariance' if cap > 0 else 'mean_diff'} wins"


def aggregate(cells: list[dict], cfg: KnobConfig) -> dict:
    """Per setting: mean/CI over seeds of every series, paired differences mean_diff - covariance, verdicts."""
    agg = {}
    for s in cfg.settings:
        cs = sorted((c for c in cells if c["setting"] == s), key=lambda c: c["seed"])
        if not cs:
            continue
        a = {name: mean_ci([_get(c, path) for c in cs], cfg.ci_level) for name, path in SERIES}
        if cs[0]["tag_mi_nats"] is not None:
            a["tag_mi_nats"] = cs[0]["tag_mi_nats"]
        for m in ("tag_kl", "tag_kl_by_token", "cap_kl", "cap_kl_exact"):
            a[f"diff.{m}"] = mean_ci(
                [c["mean_diff"][m]["steered"] - c["covariance"][m]["steered"] for c in cs], cfg.ci_level
            )
        a["verdict_exact"] = verdict(a["diff.cap_kl_exact"], a["diff.tag_kl"])
        a["verdict_model"] = verdict(a["diff.cap_kl"], a["diff.tag_kl"])
        a["steers"] = {
            k: a[f"{k}.tag_kl.steered"]["mean"] < min(a[f"{k}.tag_kl.random"]["mean"], a["tag_kl_unsteered"]["mean"])
            for k in KINDS
        }
        agg[s] = a
    return agg


def _ci(m: dict, fmt: str = ".2e") -> str:
    lo, hi = m["ci"]
    return f"{m['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if hi == hi else f"{m['mean']:{fmt}}"


def _summary(metrics: dict, cfg: KnobConfig) -> str:
    agg = metrics["aggregate"]
    n = {s: a["wall_s"]["n"] for s, a in agg.items()}
    lines = [
        "# Factor steering along the knob: covariance (S-step) edit vs mean-difference edit",
        "",
        f"Mean over contexts ({cfg.n_contexts} per model), then mean [{cfg.ci_level:.0%} t-CI] over seeds "
        f"(seeds per setting: {n}). KLs in nats. `random` = an equal-norm random direction, per edit. "
        "`rho=0` and `coupling=1` are the same process.",
        "",
        "## Tag: KL(target copy marginal || model's)",
        "",
        "| setting | exact product residual | tag MI | probe R^2 | unsteered | covariance | mean_diff | random (cov norm) "
        "| random (md norm) | edit/resid norm cov, md |",
        "|" + "---|" * 10,
    ]
    for s, a in agg.items():
        mi = f"{max(a['tag_mi_nats'], 0.0):.3f}" if "tag_mi_nats" in a else "-"
        lines.append(
            f"| {s} | {a['exact_product_residual']['mean']:.3f} | {mi} | {a['probe_test_r2']['mean']:.3f} | "
            f"{_ci(a['tag_kl_unsteered'], '.3f')} | {_ci(a['covariance.tag_kl.steered'], '.4f')} | "
            f"{_ci(a['mean_diff.tag_kl.steered'], '.4f')} | {_ci(a['covariance.tag_kl.random'], '.3f')} | "
            f"{_ci(a['mean_diff.tag_kl.random'], '.3f')} | {a['covariance.edit_norm_over_resid_norm']['mean']:.2f}, "
            f"{a['mean_diff.edit_norm_over_resid_norm']['mean']:.2f} |"
        )
    lines += [
        "",
        "## Tag per next capability token: E_x KL(target(copy | x) || model's) (per slice; not in the rule)",
        "",
        "| setting | unsteered | covariance | mean_diff | random (cov norm) | random (md norm) | mean_diff - covariance |",
        "|" + "---|" * 7,
    ]
    for s, a in agg.items():
        lines.append(
            f"| {s} | {_ci(a['tag_kl_by_token_unsteered'], '.3f')} | {_ci(a['covariance.tag_kl_by_token.steered'], '.4f')} | "
            f"{_ci(a['mean_diff.tag_kl_by_token.steered'], '.4f')} | {_ci(a['covariance.tag_kl_by_token.random'], '.3f')} | "
            f"{_ci(a['mean_diff.tag_kl_by_token.random'], '.3f')} | {_ci(a['diff.tag_kl_by_token'])} |"
        )
    for m, title in (
        ("cap_kl_exact", "Capability: KL(exact process's capability marginal || edited model's)"),
        ("cap_kl", "Capability: KL(unedited model's capability marginal || edited model's)"),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| setting | "
            + ("unsteered (model's own error) | " if m == "cap_kl_exact" else "")
            + "covariance | mean_diff | random (cov norm) | random (md norm) | mean_diff - covariance | verdict |",
            "|" + "---|" * (8 if m == "cap_kl_exact" else 7),
        ]
        for s, a in agg.items():
            own = f"{_ci(a['cap_kl_exact_unsteered'])} | " if m == "cap_kl_exact" else ""
            v = a["verdict_exact" if m == "cap_kl_exact" else "verdict_model"]
            lines.append(
                f"| {s} | {own}{_ci(a[f'covariance.{m}.steered'])} | {_ci(a[f'mean_diff.{m}.steered'])} | "
                f"{_ci(a[f'covariance.{m}.random'])} | {_ci(a[f'mean_diff.{m}.random'])} | {_ci(a[f'diff.{m}'])} | {v} |"
            )
    lines += [
        "",
        "Paired tag KL difference mean_diff - covariance per setting: "
        + "; ".join(f"{s} {_ci(a['diff.tag_kl'])}" for s, a in agg.items())
        + ".",
        "Both edits steer (tag KL below the random control's and the unsteered one) at: "
        + "; ".join(f"{s} " + ", ".join(k for k, ok in a["steers"].items() if ok) for s, a in agg.items())
        + ".",
        "",
        "Rule (declared in the config before the confirmatory run): with paired CIs over seeds of mean_diff - "
        "covariance, an edit wins at a setting when the cap KL difference's CI excludes 0 in its favour and the tag KL "
        "difference's CI does not exclude 0 against it; trade-off when both exclude 0 in opposite directions; tie "
        "otherwise.",
        "",
        "Wall time per setting (all seeds, s): "
        + "; ".join(f"{s} {a['wall_s']['mean'] * a['wall_s']['n']:.0f}" for s, a in agg.items())
        + ". Plot: `knob.png`.",
        "",
    ]
    return "\n".join(lines)


def _plot(agg: dict, cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(agg)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, m, title in zip(
        axes,
        ("tag_kl", "cap_kl", "cap_kl_exact"),
        ("tag KL(target || edited)", "cap KL(unedited model || edited)", "cap KL(exact process || edited)"),
    ):
        curves = [(f"{k} edit", (k, m, "steered"), f"C{i}", "-") for i, k in enumerate(KINDS)]
        curves += [(f"random, {k} norm", (k, m, "random"), f"C{i}", ":") for i, k in enumerate(KINDS)]
        if m != "cap_kl":
            curves.append(("unsteered (for cap: the model's own error)", (f"{m}_unsteered",), "k", "--"))
        for j, (label, path_, color, ls) in enumerate(curves):
            key = ".".join(path_)
            ax.plot(range(len(settings)), [agg[s][key]["mean"] for s in settings], ls, color=color, label=label)
            # one dot per seed: CIs of 3-5 seeds on a log axis would mostly reach below zero
            for i, s in enumerate(settings):
                ys = [_get(c, path_) for c in cells if c["setting"] == s]
                ax.scatter([i + 0.04 * (j - 2)] * len(ys), ys, s=6, color=color, alpha=0.6)
        ax.axvline(sum(s.startswith("rho") for s in settings) - 0.5, color="grey", lw=0.6)
        ax.set_xticks(range(len(settings)), settings, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set(ylabel="nats", title=title)
        ax.legend(fontsize=7)
    fig.suptitle(
        "factor steering along the knob (rho: one tag coupled to the capability | coupling: one persona -> a tag "
        "per slice; rho=0 = coupling=1); lines = mean over seeds, dots = seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_parser() -> ConfigParser:
    return ConfigParser((KnobConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "toy.experiments.steering_knob",
        "it trains one small model per cell in turn; on one GPU use configs/accelerate/single_gpu.yaml",
    )
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    set_cpu_threads(train_cfg)  # one thread per process: two threads thrash on a busy 2-core machine
    out_dir = claim_experiment_dir(cfg, model_cfg, train_cfg)
    metrics: dict = {
        "config": {"knob": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)},
        "cells": [],
    }
    for setting in cfg.settings:
        for k in range(cfg.n_seeds):
            c = run_cell(cfg, model_cfg, train_cfg, setting, train_cfg.seed + k, out_dir)
            metrics["cells"].append(c)
            print(
                f"{setting} seed {c['seed']}: tag KL unsteered {c['tag_kl_unsteered']:.3f} | "
                + " | ".join(
                    f"{k}: tag {c[k]['tag_kl']['steered']:.4f} (random {c[k]['tag_kl']['random']:.3f}), cap exact "
                    f"{c[k]['cap_kl_exact']['steered']:.2e}, cap model {c[k]['cap_kl']['steered']:.2e}"
                    for k in KINDS
                )
                + f" | {c['wall_s']:.0f} s",
                flush=True,
            )
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["aggregate"] = aggregate(metrics["cells"], cfg)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plot(metrics["aggregate"], metrics["cells"], out_dir / "knob.png")
    (out_dir / "summary.md").write_text(_summary(metrics, cfg))
    print(f"wrote {out_dir}/metrics.json, summary.md, knob.png")
    return metrics


if __name__ == "__main__":
    main()
