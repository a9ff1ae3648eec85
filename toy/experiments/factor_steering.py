"""Factor steering: change the tag factor of a toy model's belief through its residual stream, keep the capability.

    python -m toy.experiments.factor_steering --config configs/toy/factor_steering.yaml
    python -m toy.experiments.factor_steering --config configs/toy/factor_steering.yaml --rhos 0.0 --max_steps 300
    # one GPU (one process):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.factor_steering --config configs/toy/factor_steering.yaml

For each ``rho`` a toy GPT-2 is pre-trained on ``toy.processes.tagged(capability, rho)`` (factors: tag, capability),
then, at the probed residual site and the last position of ``n_contexts`` held-out windows:

1. ``L``: a ridge probe residual -> joint belief, ``eta_hat = x W + b`` (``W`` (d_model, S)).
2. ``S``: ``toy.factors.product_approximation(eta_hat)`` -> ``(v_tag, v_cap)`` and a residual. Exact on
   product beliefs (independent factors, rho = 0); for rho > 0 the true beliefs are not products and
   ``exact_product_residual`` (relative Frobenius norm of the residual on the *exact* beliefs) says how far.
3. Steer: ``v_tag`` -> a target: the exact tag belief of a donor window whose most likely tag is the other
   one (an on-manifold target, e.g. confidently misaligned for an aligned context).
4. Back to the residual stream: ``eta' = v_tag' (x) v_cap`` and two edits that both make the probe read
   ``eta'`` exactly (``toy.steering.steering_edit``): ``pinv``, ``dx = (eta' - eta_hat) W^+`` -- the minimal Euclidean-norm
   change, in the span of ``W``'s columns (the probe's row space: the inverse of step 1); and ``covariance``,
   ``dx = (eta' - eta_hat) (W^T C W)^+ W^T C`` -- the minimal change in the metric of the activations'
   covariance ``C``, i.e. along directions in which the residual actually varies with the belief.
5. Apply ``dx`` with an nnsight edit at the probed site and last position (``probes.activations``), read
   the next-token distribution, and compare with the unmodified model and with a control edit of the
   same norm in a uniformly random direction.

Metrics (nats, means over contexts): ``tag_kl`` = KL(target tag marginal || model's tag marginal), where
the target is the next-token distribution ``eta'`` implies (``eta' @ T.sum(-1).T``) summed over capability
tokens, for the unmodified model, the steered one and the random control; ``cap_kl`` = KL(capability
marginal before || after) for the steered edit and the control. Steering works when its ``tag_kl`` is
far below the unmodified one and both of its KLs are below the control's. (Measured: the ``pinv`` edit
moves the probe's reading but hardly the model's prediction -- the probe's most sensitive directions are
low-variance ones the model does not read; the ``covariance`` edit steers the tag. See the README.)

Writes ``<output_dir>/``: ``metrics.json``, ``kl.png``, ``tag_scatter.png``, ``summary.md`` and
``models/rho_<rho>/checkpoint-*/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess
from toy.collect import default_site
from toy.config import JsonDict, TrainConfig
from toy.model import ToyModelConfig
from toy.processes import make_process, tagged
from toy.steering import steer_factor, steering_metrics, steering_probe
from toy.train import claim_experiment_dir, set_cpu_threads, train_on

EDITS = (
    "pinv",
    "covariance",
)  # the mean-difference baseline is compared along the knob in toy.experiments.steering_knob


@dataclass
class SteeringConfig:
    """The process, the probe and the evaluation contexts (training: ``toy.config.TrainConfig``)."""

    capability: JsonDict = field(
        default_factory=lambda: JsonDict({"name": "mess3", "x": 0.05, "a": 0.85}),
        metadata={"help": "Capability process spec (toy.processes.make_process); JSON on the command line."},
    )
    switch_prob: float = field(default=0.05, metadata={"help": "Tag flip probability per step."})
    tag_noise: float = field(default=0.1, metadata={"help": "Probability that a token shows the other tag's copy."})
    rhos: list[float] = field(
        default_factory=lambda: [0.0, 0.5], metadata={"help": "Tag-capability correlation of each trained model."}
    )
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
        default=1000, metadata={"help": "Sequences for fitting the joint-belief probe (all positions)."}
    )
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the probe."})
    n_contexts: int = field(default=1000, metadata={"help": "Held-out windows steered at their last position."})

    def __post_init__(self):
        self.capability = dict(JsonDict(self.capability))
        if "name" not in self.capability:
            raise ValueError("capability must be a process spec with a 'name' key")
        if not self.rhos or any(not 0 <= r <= 1 for r in self.rhos):
            raise ValueError(f"rhos must be a non-empty list in [0, 1], got {self.rhos}")
        if self.n_contexts < 4 or self.probe_sequences < 10 or self.context_length < 3:
            raise ValueError("need n_contexts >= 4, probe_sequences >= 10 and context_length >= 3")


def run_rho(
    rho: float, cfg: SteeringConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, out_dir: Path, seed: int
):
    """Train on ``tagged(capability, rho)``, fit the probe, steer; returns (metrics, per-context outputs)."""
    capability = make_process(cfg.capability["name"], **{k: v for k, v in cfg.capability.items() if k != "name"})
    process = tagged(capability, rho, cfg.switch_prob, cfg.tag_noise)
    model = train_on(process, model_cfg, train_cfg, cfg.context_length, out_dir / "models" / f"rho_{rho}", seed)
    site = cfg.site or default_site(model)
    # one token short of training's windows: the last training position has no label, so its prediction is untrained
    # (see toy.experiments.steering_knob); the steered position is the last one the model learned to predict from
    sp = steering_probe(
        model, process, site, cfg.context_length - 1, cfg.probe_sequences, cfg.n_contexts, cfg.probe_alpha, seed
    )
    out = steer_factor(model, process, sp["probe"], sp["tokens"], site, sp["cov"], kinds=EDITS, seed=seed)
    return {
        "process": process.name,
        "site": site,
        "probe_test_r2": sp["probe_r2"],
        **steering_metrics(process, out),
    }, out


def _plots(metrics: dict, outs: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos = list(metrics["rhos"])
    bars = [("unsteered", None, None)] + [(f"{k} {w}", k, w) for k in EDITS for w in ("steered", "random")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / len(bars)
    for k, (label, kind, which) in enumerate(bars):
        pos = [i + (k - len(bars) / 2 + 0.5) * w for i in range(len(rhos))]
        m = [metrics["rhos"][r] for r in rhos]
        a.bar(
            pos,
            [x["tag_kl_unsteered"] if kind is None else x[kind]["tag_kl"][which] for x in m],
            w,
            label=label,
            color=f"C{k}",
        )
        if kind is not None:
            b.bar(pos, [x[kind]["cap_kl"][which] for x in m], w, label=label, color=f"C{k}")
    for ax, title in [(a, "KL(target tag marginal || model's)"), (b, "KL(capability marginal before || after)")]:
        ax.set_xticks(range(len(rhos)), [f"rho={r}" for r in rhos])
        ax.set_yscale("log")
        ax.set_ylabel("nats")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "kl.png", dpi=120)
    plt.close(fig)

    def mis(p):  # P(next token is a misaligned copy): tag token 1, any capability token
        return p.reshape(len(p), 2, -1)[:, 1].sum(-1)

    fig, axes = plt.subplots(len(EDITS), len(rhos), figsize=(4.2 * len(rhos), 4 * len(EDITS)), squeeze=False)
    for row, kind in zip(axes, EDITS):
        for ax, r in zip(row, rhos):
            o = outs[r]
            t = mis(o["target"])
            ax.scatter(t, mis(o["p0"]), s=4, alpha=0.4, label="unsteered")
            ax.scatter(t, mis(o[kind]["random"]), s=4, alpha=0.4, label="random edit, same norm")
            ax.scatter(t, mis(o[kind]["steered"]), s=4, alpha=0.6, label="factor steered")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xlabel("target P(next token is a misaligned copy)")
            ax.set_ylabel("model P(misaligned copy)")
            ax.set_title(f"{kind} edit, rho={r}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "tag_scatter.png", dpi=120)
    plt.close(fig)


def _summary(metrics: dict) -> str:
    lines = [
        "# Factor steering",
        "",
        "Edits at the probed site, last position: `pinv` = `(eta' - eta_hat) pinv(W)` (minimal Euclidean norm, in the "
        "probe's row space), `covariance` = `(eta' - eta_hat) pinv(W^T C W) W^T C` (minimal Mahalanobis norm under the "
        "activations' covariance C). Control: a random direction of the same norm. KLs in nats, means over contexts; "
        "win rate = share of contexts where the steered KL is below the control's.",
        "",
        "| rho | probe R^2 | edit | tag KL unsteered | tag KL steered | tag KL random | cap KL steered | cap KL random "
        "| win rate tag / cap | edit / resid norm | S residual (probe) | exact product residual |",
        "|" + "---|" * 12,
    ]
    for r, m in metrics["rhos"].items():
        for kind in EDITS:
            e = m[kind]
            t, c = e["tag_kl"], e["cap_kl"]
            lines.append(
                f"| {r} | {m['probe_test_r2']:.3f} | {kind} | {m['tag_kl_unsteered']:.4f} | {t['steered']:.4f} | "
                f"{t['random']:.4f} | {c['steered']:.2e} | {c['random']:.2e} | {e['tag_kl_win_rate']:.2f} / "
                f"{e['cap_kl_win_rate']:.2f} | {e['edit_norm_over_resid_norm']:.2f} | {m['s_residual']:.3f} | "
                f"{m['exact_product_residual']:.3f} |"
            )
    lines += [
        "",
        "The S step is exact when the exact product residual is 0 (independent factors, rho = 0); for rho > 0 "
        "the true beliefs are not products and the steered belief drops that residual.",
        "Both edits make the probe read the target belief exactly (`probe_after_error` in metrics.json); whether the "
        "model's prediction follows is what the tag KL measures.",
        "Plots: `kl.png`, `tag_scatter.png` (target vs model P(misaligned copy) per context).",
        "",
    ]
    return "\n".join(lines)


def make_parser() -> ConfigParser:
    return ConfigParser((SteeringConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "toy.experiments.factor_steering",
        "it trains one small model per rho in turn; on one GPU use configs/accelerate/single_gpu.yaml",
    )
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    set_cpu_threads(train_cfg)  # one thread per process: two threads thrash on a busy 2-core machine
    out_dir = claim_experiment_dir(cfg, model_cfg, train_cfg)
    metrics = {
        "config": {"steering": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)},
        "rhos": {},
    }
    outs = {}
    for k, rho in enumerate(cfg.rhos):
        metrics["rhos"][str(rho)], outs[str(rho)] = run_rho(rho, cfg, model_cfg, train_cfg, out_dir, train_cfg.seed + k)
        m = metrics["rhos"][str(rho)]
        print(
            f"rho={rho}: tag KL unsteered {m['tag_kl_unsteered']:.4f} | "
            + " | ".join(
                f"{k}: tag KL steered {m[k]['tag_kl']['steered']:.4f} random {m[k]['tag_kl']['random']:.4f}, cap KL steered "
                f"{m[k]['cap_kl']['steered']:.2e} random {m[k]['cap_kl']['random']:.2e}"
                for k in EDITS
            )
            + f" | exact product residual {m['exact_product_residual']:.3f}",
            flush=True,
        )
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plots(metrics, outs, out_dir)
    (out_dir / "summary.md").write_text(_summary(metrics))
    print(f"wrote {out_dir}/metrics.json, summary.md and plots")
    return metrics


if __name__ == "__main__":
    main()
