"""Factored belief states in trained toy transformers: per-factor probes, subspace angles, dimension.

    python -m toy.experiments.factored --config configs/toy/factored.yaml
    python -m toy.experiments.factored --config configs/toy/factored.yaml --max_steps 300 --output_dir runs/factored_smoke
    # one GPU (one process: the models are trained one after another, then probed):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.factored --config configs/toy/factored.yaml

For every process in ``processes`` and every ``rho`` of the correlated sweep (``rho_process`` with
``rho`` filled in) a toy GPT-2 is pre-trained with ``toy.train.train`` and probed at one residual site:

* per-factor probes: ridge probes residual -> each factor's marginal belief (held-out R^2, with the
  random-init model of the same architecture as control, ``probes.linear.fit_probe_report``);
* subspace overlap between the factors' probe subspaces (principal angles, ``probes.subspaces``);
* the effective dimension of the belief-predictive subspace, two ways on held-out rows: PCA of the
  joint-belief probe's predictions (components for 95% / 99% of their variance) and the rank a
  reduced-rank probe needs to reach 95% / 99% of the full probe's explained variance.

The two hypotheses are ``factored = sum_k (S_k - 1)`` (2K for K Mess3 factors) and ``joint = prod_k S_k - 1``
(3^K - 1). Both are also measured on *exact* beliefs, which is the yardstick for the model's numbers:
``exact_joint`` is the PCA dimension of the true joint beliefs (what a model that holds the joint belief
linearly would show) and ``exact_factored`` that of the best linear prediction of the joint belief from
the factor marginals (what a model that holds only the factor beliefs, side by side, would show).
``factored_r2_ceiling`` is that prediction's R^2: a joint-belief probe whose R^2 beats it reads more
than the factor marginals.

Writes ``<output_dir>/``: ``metrics.json``, ``dims.png``, ``rho_sweep.png``, ``factors.png``,
``summary.md`` and ``models/<name>/checkpoint-*/`` (every trained model, loadable with
``GPT2LMHeadModel.from_pretrained``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from plumbing.config import ConfigParser
from plumbing.runs import latest_checkpoint, refuse_multiprocess
from probes import (
    effective_dim,
    fit_probe_report,
    fit_ridge,
    reduced_rank_curve,
    regression_metrics,
    split_indices,
    subspace_overlap,
)
from toy.collect import ProbeRows, collect, default_site
from toy.config import JsonDict, TrainConfig
from toy.factors import factor_marginals, schmidt_spectrum
from toy.model import ToyModelConfig, build_model
from toy.processes import Process, make_process
from toy.train import claim_experiment_dir, set_cpu_threads, train_on

# --------------------------------------------------------------------------- processes


def hypotheses(process: Process) -> dict:
    """Affine dimension of the factor beliefs side by side (``factored``) and of the joint belief (``joint``)."""
    sizes = process.factor_state_sizes
    if sizes is None:
        raise ValueError(f"{process.name} is not a factored process")
    return {"factored": sum(s - 1 for s in sizes), "joint": math.prod(sizes) - 1}


# --------------------------------------------------------------------------- geometry


def _rank_for(curve: dict[int, float], mse0: float, q: float) -> int:
    """Smallest rank whose held-out MSE explains ``q`` of what the full-rank probe explains over ``mse0``."""
    full = curve[max(curve)]
    return min(r for r, m in curve.items() if mse0 - m >= q * (mse0 - full))


def factor_geometry(
    process: Process,
    data: ProbeRows,
    random_init: ProbeRows | None = None,
    alpha: float = 0.0,
    thresholds: tuple[float, ...] = (0.95, 0.99),
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Per-factor probes, their subspace overlaps and the dimension of the belief-predictive subspace.

    Every number is held out (one grouped split by sequence). Returns a JSON-ready dict with keys
    ``hypotheses``, ``factors`` (per factor: name, states, test R^2, random-init R^2, MSE ratio to it),
    ``overlaps`` ("i-j" -> ``probes.subspace_overlap``), ``joint`` (joint-belief probe R^2, random-init
    R^2, ``factored_r2_ceiling``), ``dims`` (``probe_pca``, ``reduced_rank``, ``random_init_probe_pca``,
    ``exact_joint``, ``exact_factored``: threshold -> components) and ``reduced_rank_mse`` (rank -> MSE).
    For two factors also ``schmidt_residual``: mean share of the squared Schmidt spectrum outside its
    first value (0 for product beliefs).
    """
    X, Y = data.X.double(), data.beliefs
    train_rows, test_rows = split_indices(X.shape[0], test_fraction, seed, data.groups)
    marginals = factor_marginals(process, Y)
    names = process.factor_names or tuple(f"factor{k}" for k in range(len(marginals)))
    ctrl = None if random_init is None else {"x": random_init.X}
    out = {"hypotheses": hypotheses(process), "factors": [], "overlaps": {}}
    factor_probes = []
    for name, m in zip(names, marginals):
        rep = fit_probe_report(
            {"x": X}, m, ctrl, alpha=alpha, test_fraction=test_fraction, seed=seed, groups=data.groups, concat=False
        )["sites"]["x"]
        out["factors"].append(
            {
                "name": name,
                "states": m.shape[-1],
                "test_r2": rep["test"]["r2"],
                "random_init_r2": rep["random_init"]["test"]["r2"] if ctrl else None,
                "ratio_to_random_init": rep.get("ratio_to_random_init"),
            }
        )
        factor_probes.append(fit_ridge(X[train_rows], m[train_rows], alpha))
    for i in range(len(factor_probes)):
        for j in range(i + 1, len(factor_probes)):
            out["overlaps"][f"{i}-{j}"] = subspace_overlap(factor_probes[i], factor_probes[j])

    def joint_probe(Xd):
        probe = fit_ridge(Xd[train_rows], Y[train_rows], alpha)
        pred = probe.predict(Xd[test_rows])
        return pred, regression_metrics(Y[test_rows], pred)["r2"]

    pred, r2 = joint_probe(X)
    # What a model holding only the factor beliefs side by side could read out linearly.
    M = torch.cat(marginals, dim=-1)
    from_marginals = fit_ridge(M[train_rows], Y[train_rows]).predict(M[test_rows])
    out["joint"] = {"test_r2": r2, "factored_r2_ceiling": regression_metrics(Y[test_rows], from_marginals)["r2"]}
    # The part of the joint belief that is NOT linear in the marginals (v_a (x) v_b minus its best linear fit
    # from v_a, v_b): a linearly factored representation cannot read it, a joint one reads all of it.
    interaction = Y - fit_ridge(M[train_rows], Y[train_rows]).predict(M)

    def interaction_r2(Xd):
        probe = fit_ridge(Xd[train_rows], interaction[train_rows], alpha)
        return regression_metrics(interaction[test_rows], probe.predict(Xd[test_rows]))["r2"]

    out["joint"]["interaction_r2"] = interaction_r2(X)

    def pca(points):  # threshold keys as strings, the same in memory and in metrics.json
        return {str(q): n for q, n in effective_dim(points, thresholds)["dims"].items()}

    dims = {"probe_pca": pca(pred), "exact_joint": pca(Y[test_rows]), "exact_factored": pca(from_marginals)}
    # the model's own representation: components of the residual stream itself
    dims["activations_pca"] = pca(X[test_rows])
    if random_init is not None:
        pred_r, out["joint"]["random_init_r2"] = joint_probe(random_init.X.double())
        out["joint"]["random_init_interaction_r2"] = interaction_r2(random_init.X.double())
        dims["random_init_probe_pca"] = pca(pred_r)
    curve = reduced_rank_curve(X, Y, alpha=alpha, test_fraction=test_fraction, seed=seed, groups=data.groups)
    mse0 = regression_metrics(Y[test_rows], Y[train_rows].mean(0).expand_as(Y[test_rows]))["mse"]
    dims["reduced_rank"] = {str(q): _rank_for(curve, mse0, q) for q in thresholds}
    out["dims"] = dims
    out["reduced_rank_mse"] = curve
    if len(process.factor_state_sizes) == 2:
        s2 = schmidt_spectrum(Y, process.factor_state_sizes) ** 2
        out["schmidt_residual"] = (1 - s2[:, 0] / s2.sum(-1)).mean().item()
    return out


# --------------------------------------------------------------------------- experiment


@dataclass
class FactoredProbesConfig:
    """What to train and how to probe it (training itself: ``toy.config.TrainConfig``, model: ``ToyModelConfig``)."""

    processes: JsonDict = field(
        default_factory=lambda: JsonDict(
            {
                "mess3x2": {
                    "name": "product",
                    "factors": [{"name": "mess3", "x": 0.05, "a": 0.85}, {"name": "mess3", "x": 0.15, "a": 0.6}],
                },
            }
        ),
        metadata={
            "help": "name -> process spec {name: <process>, **kwargs} (toy.processes.make_process); JSON on the command line."
        },
    )
    rho_process: JsonDict = field(
        default_factory=lambda: JsonDict(
            {
                "name": "correlated",
                "first": {"name": "mess3", "x": 0.05, "a": 0.85},
                "second": {"name": "mess3", "x": 0.15, "a": 0.6},
            }
        ),
        metadata={"help": "Spec of the correlated sweep's process without its 'rho' (filled in from rhos)."},
    )
    rhos: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0], metadata={"help": "rho values of the sweep (empty: no sweep)."}
    )
    context_length: int = field(default=10, metadata={"help": "Tokens per window, in training and probing."})
    site: str | None = field(
        default=None, metadata={"help": "Residual site to probe (default: the last block's output)."}
    )
    probe_sequences: int = field(default=1000, metadata={"help": "Sequences sampled for probing (all positions used)."})
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of every probe."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out share of sequences for every probe metric."})
    thresholds: list[float] = field(
        default_factory=lambda: [0.95, 0.99], metadata={"help": "Variance shares for the dimensions."}
    )

    def __post_init__(self):
        self.processes = dict(JsonDict(self.processes))
        self.rho_process = dict(JsonDict(self.rho_process))
        for name, spec in self.processes.items():
            if not isinstance(spec, dict) or "name" not in spec:
                raise ValueError(f"processes[{name!r}] must be a spec with a 'name' key, got {spec!r}")
        if self.rhos and ("name" not in self.rho_process or "rho" in self.rho_process):
            raise ValueError("rho_process must be a spec with a 'name' and without 'rho' (the sweep fills it in)")
        if any(not 0 <= r <= 1 for r in self.rhos):
            raise ValueError(f"rhos must lie in [0, 1], got {self.rhos}")
        if not self.processes and not self.rhos:
            raise ValueError("nothing to do: give processes or rhos")
        if not 0 < self.test_fraction < 1 or self.probe_sequences < 10:
            raise ValueError("need 0 < test_fraction < 1 and probe_sequences >= 10")
        if any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must lie in (0, 1], got {self.thresholds}")


# the name before FactoredProbesConfig (llm.factored has a FactoredConfig of its own), kept for one release
FactoredConfig = FactoredProbesConfig


def run_one(
    process: Process,
    name: str,
    cfg: FactoredProbesConfig,
    model_cfg: ToyModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    seed: int,
) -> dict:
    """Train on ``process``, probe the trained and a random-init model; ``factor_geometry`` plus losses."""
    model = train_on(process, model_cfg, train_cfg, cfg.context_length, out_dir / "models" / name, seed)
    site = cfg.site or default_site(model)
    # windows one token short of training's: the last position's output is never in the loss (toy.collect.collect)
    data = collect(model, process, cfg.context_length - 1, cfg.probe_sequences, seed + 1, sites=[site], batch_size=1024)
    random_model = build_model(model_cfg, process.vocab_size, cfg.context_length, seed=seed + 10_000).to(
        next(model.parameters()).device
    )
    random_init = collect(
        random_model, process, cfg.context_length - 1, sites=[site], tokens=data.tokens, batch_size=1024
    )
    geo = factor_geometry(process, data, random_init, cfg.probe_alpha, tuple(cfg.thresholds), cfg.test_fraction, seed)
    state = json.loads((latest_checkpoint(out_dir / "models" / name) / "trainer_state.json").read_text())
    last = state["history"][-1]
    return {"process": process.name, "site": site, "val_loss": last.get("val_loss"), "floor": last.get("floor"), **geo}


def _plots(metrics: dict, out_dir: Path, thresholds: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q0, q1 = (str(t) for t in thresholds[:2]) if len(thresholds) > 1 else (str(thresholds[0]),) * 2
    runs = metrics["processes"]
    if runs:
        names = list(runs)
        keys = [
            ("exact_factored", q0, "exact factored"),
            ("exact_joint", q0, "exact joint"),
            ("probe_pca", q0, f"probe PCA {q0}"),
            ("probe_pca", q1, f"probe PCA {q1}"),
            ("reduced_rank", q0, f"reduced rank {q0}"),
            ("random_init_probe_pca", q0, f"random-init PCA {q0}"),
        ]
        fig, ax = plt.subplots(figsize=(2.2 * len(names) + 3, 4))
        w = 0.8 / len(keys)
        for k, (key, q, label) in enumerate(keys):
            vals = [runs[n]["dims"][key][q] for n in names]
            ax.bar([i + (k - len(keys) / 2 + 0.5) * w for i in range(len(names))], vals, w, label=label)
        for i, n in enumerate(names):
            h = runs[n]["hypotheses"]
            ax.hlines(
                h["factored"],
                i - 0.45,
                i + 0.45,
                colors="k",
                linestyles="--",
                label="factored hyp." if i == 0 else None,
            )
            ax.hlines(
                h["joint"], i - 0.45, i + 0.45, colors="k", linestyles=":", label="joint hyp." if i == 0 else None
            )
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("dimensions")
        ax.set_title("belief-predictive dimension vs factored (sum S_k-1) and joint (prod S_k - 1)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / "dims.png", dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(2.2 * len(names) + 3, 4))
        labels, trained, rand = [], [], []
        for n in names:
            for f in runs[n]["factors"]:
                labels.append(f"{n}\n{f['name'][:14]}")
                trained.append(f["test_r2"])
                rand.append(f["random_init_r2"])
        ax.bar([i - 0.2 for i in range(len(labels))], trained, 0.4, label="trained")
        ax.bar([i + 0.2 for i in range(len(labels))], rand, 0.4, label="random init")
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_ylabel("held-out R^2 of the factor's marginal belief")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "factors.png", dpi=120)
        plt.close(fig)

    sweep = metrics["rho_sweep"]
    if sweep:
        rhos = [float(r) for r in sweep]
        rs = list(sweep.values())
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for key, q, label, style in [
            ("probe_pca", q0, f"probe PCA {q0}", "o-"),
            ("probe_pca", q1, f"probe PCA {q1}", "s-"),
            ("reduced_rank", q0, f"reduced rank {q0}", "^-"),
            ("exact_joint", q0, f"exact joint {q0}", "k:"),
            ("exact_factored", q0, "exact factored", "k--"),
        ]:
            a.plot(rhos, [r["dims"][key][q] for r in rs], style, label=label)
        h = rs[0]["hypotheses"]
        a.axhline(h["factored"], color="gray", lw=0.8)
        a.axhline(h["joint"], color="gray", lw=0.8)
        a.set_xlabel("rho")
        a.set_ylabel("dimensions")
        a.set_title(f"factored = {h['factored']}, joint = {h['joint']}")
        a.legend(fontsize=7)
        b.plot(rhos, [r["joint"]["test_r2"] for r in rs], "o-", label="joint-belief probe R^2")
        b.plot(rhos, [r["joint"]["factored_r2_ceiling"] for r in rs], "k--", label="factored ceiling R^2")
        b.plot(rhos, [r["schmidt_residual"] for r in rs], "r^-", label="Schmidt residual of exact beliefs")
        b.set_xlabel("rho")
        b.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "rho_sweep.png", dpi=120)
        plt.close(fig)


def _summary(metrics: dict, thresholds: list[float]) -> str:
    qs = [str(t) for t in thresholds]
    lines = [
        "# Factored belief states",
        "",
        "Dimensions of the belief-predictive subspace (held out) against the factored (sum S_k - 1) and "
        "joint (prod S_k - 1) hypotheses; `exact_*` are the same PCA on exact beliefs (joint) and on their "
        "best linear prediction from the factor marginals (factored). `activations PCA` counts components of the "
        "residual stream itself; `interaction R^2` is the held-out R^2 of the part of the joint belief that is not "
        "linear in the marginals (0 for a linearly factored representation, 1 for a joint one).",
        "",
        "| model | val - floor (nats) | factored | joint | probe PCA "
        + " / ".join(qs)
        + " | reduced rank "
        + " / ".join(qs)
        + " | exact factored | exact joint | random-init PCA | activations PCA "
        + " / ".join(qs)
        + " | joint R^2 | factored ceiling | interaction R^2 (random init) | factor R^2 (random init) | min angle (deg) |",
        "|" + "---|" * 15,
    ]
    rows = list(metrics["processes"].items()) + [(f"rho={r}", v) for r, v in metrics["rho_sweep"].items()]
    for name, r in rows:
        d, h = r["dims"], r["hypotheses"]
        angles = [min(o["angles_deg"]) for o in r["overlaps"].values()]
        fr2 = ", ".join(f"{f['test_r2']:.3f} ({f['random_init_r2']:.3f})" for f in r["factors"])
        gap = (r["val_loss"] - r["floor"]) if r["val_loss"] is not None else float("nan")
        lines.append(
            f"| {name} | {gap:.4f} | {h['factored']} | {h['joint']} | "
            + " / ".join(str(d["probe_pca"][q]) for q in qs)
            + " | "
            + " / ".join(str(d["reduced_rank"][q]) for q in qs)
            + f" | {d['exact_factored'][qs[0]]} | {d['exact_joint'][qs[0]]} | {d['random_init_probe_pca'][qs[0]]} | "
            + " / ".join(str(d["activations_pca"][q]) for q in qs)
            + f" | {r['joint']['test_r2']:.3f} | {r['joint']['factored_r2_ceiling']:.3f} | {r['joint']['interaction_r2']:.3f} "
            + f"({r['joint']['random_init_interaction_r2']:.3f}) | {fr2} | "
            + ", ".join(f"{a:.0f}" for a in angles)
            + " |"
        )
    lines += [
        "",
        "Plots: `dims.png` (dimensions per model), `rho_sweep.png` (dimension and R^2 vs rho), "
        "`factors.png` (per-factor probe R^2, trained vs random init).",
        "",
    ]
    return "\n".join(lines)


def make_parser() -> ConfigParser:
    return ConfigParser((FactoredProbesConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "toy.experiments.factored",
        "it trains several small models in turn; on one GPU use configs/accelerate/single_gpu.yaml",
    )
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    set_cpu_threads(train_cfg)  # one thread per process: two threads thrash on a busy 2-core machine
    out_dir = claim_experiment_dir(cfg, model_cfg, train_cfg)
    metrics = {
        "config": {"factored": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)},
        "processes": {},
        "rho_sweep": {},
    }
    rho_spec = {k: v for k, v in cfg.rho_process.items() if k != "name"}
    jobs = [
        ("processes", name, make_process(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
        for name, spec in cfg.processes.items()
    ]
    jobs += [("rho_sweep", str(rho), make_process(cfg.rho_process["name"], rho=rho, **rho_spec)) for rho in cfg.rhos]
    for k, (group, name, process) in enumerate(jobs):
        folder = name if group == "processes" else f"rho_{name}"
        result = run_one(process, folder, cfg, model_cfg, train_cfg, out_dir, train_cfg.seed + k)
        metrics[group][name] = result
        d = result["dims"]
        print(
            f"{name}: {process.name}: factored {result['hypotheses']['factored']} joint {result['hypotheses']['joint']} | "
            f"probe PCA {d['probe_pca']} reduced rank {d['reduced_rank']} exact joint {d['exact_joint']} "
            f"exact factored {d['exact_factored']} | joint R2 {result['joint']['test_r2']:.3f} "
            f"(factored ceiling {result['joint']['factored_r2_ceiling']:.3f})",
            flush=True,
        )
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plots(metrics, out_dir, cfg.thresholds)
    (out_dir / "summary.md").write_text(_summary(metrics, cfg.thresholds))
    print(f"wrote {out_dir}/metrics.json, summary.md and plots")
    return metrics


if __name__ == "__main__":
    main()
