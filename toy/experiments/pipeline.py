"""The main job: train a toy GPT-2 on a process, probe its residual stream for the exact belief states, report.

    python -m toy.experiments.pipeline                                       # default Mess3 run on CPU -> runs/mess3/
    python -m toy.experiments.pipeline --config configs/toy/rrxor.yaml       # RRXOR: all layers concatenated vs each layer
    python -m toy.experiments.pipeline --config configs/toy/mess3_gpu.yaml   # the GPU recipe (one H100, a few minutes)
    python -m toy.experiments.pipeline --config configs/toy/mess3.yaml --max_steps 200 --output_dir runs/mess3_short

    # training under accelerate (several GPUs, DDP); probing runs on the main process:
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 -m toy.experiments.pipeline --config ...

The run folder (``output_dir``) gets ``checkpoint-<step>/`` (the trained model, resumable),
``probe_final.{safetensors,json}`` (the probe at ``probe_site``, default the last block, ``probes.io`` format), ``metrics.json``,
``belief_simplex.png`` (true beliefs next to the probe's predictions, coloured by the true belief),
``probe_mse_by_layer.png`` (held-out probe MSE per residual site with the random-init and shuffled
controls), ``val_loss.png`` (exact validation loss against the floor over training) and ``summary.md``.

Probe data: the positions whose outputs are trained, 0..context_length-2 (the last position's output
predicts a token past the window, is never in the loss, and holds a much worse belief read-out: Mess3
block3 MSE 1.3e-2 there vs ~4e-4 elsewhere), i.e. every position of the windows of
``context_length - 1`` tokens. Targets are the exact beliefs after each position's token.

Metrics are exact wherever the windows can be enumerated (``vocab ** (context_length - 1) <=
probe_max_sequences``; Mess3 at context 10: 19,683 windows, 29,523 distinct prefixes): every prefix
weighted by its probability, each probe fitted and scored on that whole population
(``probes.linear.population_probe_report``), so the reported MSE is the population MSE of the best linear
read-out -- no split and no split seed (a held-out 20% of windows weighted by probability is a few dozen
effective windows, and its MSE moved +-25% with the split seed). The random-init control is scored the same
way; the shuffled control is the independent pairing (the targets' variance). The same exact per-site MSE is
recorded at every validation point during training (the emergence curve, ``probe_mse_emergence.png``, and
the ``report_to`` tracker). Otherwise (``probe_samples`` sampled windows, or ``probe_exact: false``) held-out
windows (``probe_test_fraction``), repeated over ``probe_split_seeds`` splits whose spread is reported: RRXOR's
610 distinct prefixes are fewer than its concatenated design's 768 columns, which would interpolate them. Activations come
from ``probes.activations.residual_stream`` (nnsight); where nnsight is not installed (the GPU image) the
same sites are read with forward hooks (``probes.activations.reader``), and ``metrics.json`` records which ran.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from plumbing.config import ConfigParser
from plumbing.trainers import end_processes
from probes.activations import reader, site_layer
from probes.io import save_probe
from probes.linear import fit_probe_report, fit_ridge, population_probe_report
from toy.collect import ProbeRows, distinct_prefix_rows, probe_windows, read_residual
from toy.config import ProcessConfig, TrainConfig
from toy.experiments.pipeline_report import (
    plot_probe_emergence,
    plot_probe_mse,
    plot_simplex,
    plot_val_loss,
    write_summary,
)
from toy.model import ToyModelConfig, build_model
from toy.processes import Process
from toy.train import TrainResult, set_cpu_threads, train


@dataclass
class ProbeConfig:
    """How the belief probes are fitted and what the run must show."""

    probe_alpha: float = field(default=0.0, metadata={"help": "Ridge strength of the probes (0: least squares)."})
    probe_site: str | None = field(
        default=None,
        metadata={
            "help": "Site of the saved probe and the simplex plot: 'embed', 'block<i>', 'final_norm' (None: last block)."
        },
    )
    probe_test_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Sampled windows only: held-out share of the probe rows (enumerated windows are scored exactly)."
        },
    )
    probe_exact: bool = field(
        default=True,
        metadata={
            "help": "Enumerated windows: exact population metrics. false: held-out windows (a design wider than the number of "
            "distinct prefixes interpolates the population, so a comparison of such designs needs held-out rows)."
        },
    )
    probe_split_seeds: int = field(
        default=3, metadata={"help": "Sampled windows only: train/test splits whose spread of probe MSE is reported."}
    )
    probe_max_sequences: int = field(
        default=20_000, metadata={"help": "Enumerate every probe window when vocab**(context_length-1) <= this."}
    )
    probe_samples: int = field(default=12_000, metadata={"help": "Sampled windows otherwise."})
    probe_batch_size: int = field(default=4096, metadata={"help": "Windows per activation forward pass."})
    control_seed: int = field(default=1_000, metadata={"help": "Init seed of the random-init control model."})
    max_plot_points: int = field(default=60_000, metadata={"help": "Most points drawn in the simplex plot."})
    target_gap: float | None = field(
        default=2e-3, metadata={"help": "Pass mark: final val loss - floor (nats) must be <= this."}
    )
    target_ratio: float | None = field(
        default=0.25, metadata={"help": "Pass mark: last block's probe test MSE / random-init control's <= this."}
    )
    target_mse: float | None = field(default=None, metadata={"help": "Pass mark: last block's probe test MSE <= this."})

    def __post_init__(self):
        if not 0 < self.probe_test_fraction < 1:
            raise ValueError(f"probe_test_fraction={self.probe_test_fraction} must be in (0, 1)")
        if self.probe_alpha < 0:
            raise ValueError(f"probe_alpha={self.probe_alpha} must be >= 0")
        if self.probe_split_seeds < 1:
            raise ValueError(f"probe_split_seeds={self.probe_split_seeds} must be >= 1")


# --------------------------------------------------------------------------- probing


def probe_model(
    model: torch.nn.Module, control: torch.nn.Module, data: ProbeRows, cfg: ProbeConfig, process: Process
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Probe report of the beliefs from every residual site (and all concatenated), with ``control`` (a
    random-init model of the same architecture) and shuffled targets as controls: exact
    (``population_probe_report`` on the distinct prefixes) for enumerated windows, else held-out
    (``fit_probe_report``) on each of ``probe_split_seeds`` splits, the first split's report with the
    per-site MSE of every split in ``report["split_seeds"]``. Returns the report and the trained model's
    activations (every row)."""
    model.eval()
    control.eval()
    acts = read_residual(model, data.tokens, batch_size=cfg.probe_batch_size)
    control_acts = read_residual(control, data.tokens, batch_size=cfg.probe_batch_size)
    names = [f"state{i}" for i in range(process.n_states)]
    if data.enumerated and cfg.probe_exact:
        index, weights = distinct_prefix_rows(data)
        pick = lambda a: {s: x[index.to(x.device)] for s, x in a.items()}  # noqa: E731
        report = population_probe_report(
            pick(acts),
            data.beliefs[index],
            weights,
            random_init_activations=pick(control_acts),
            alpha=cfg.probe_alpha,
            target_names=names,
        )
        return report, acts
    reports = [
        fit_probe_report(
            acts,
            data.beliefs,
            random_init_activations=control_acts,
            weights=data.weights,
            alpha=cfg.probe_alpha,
            test_fraction=cfg.probe_test_fraction,
            seed=seed,
            groups=data.groups,
            target_names=names,
        )
        for seed in range(cfg.probe_split_seeds)
    ]
    report = reports[0]
    report["split_seeds"] = {site: [r["sites"][site]["test"]["mse"] for r in reports] for site in report["sites"]}
    return report, acts


def exact_probe_curve(data: ProbeRows, cfg: ProbeConfig) -> Callable[[torch.nn.Module], dict]:
    """``model -> {"probe_mse/<site>": MSE}`` for ``toy.train.train``'s ``eval_fn``: every site's probe MSE at one
    point of training, exact (population) for enumerated windows, else held out on split seed 0."""
    index, weights = distinct_prefix_rows(data) if data.enumerated and cfg.probe_exact else (None, None)

    def curve(model: torch.nn.Module) -> dict:
        with torch.no_grad():
            if index is not None:
                acts = read_residual(model, data.tokens, batch_size=cfg.probe_batch_size)
                acts = {s: x[index.to(x.device)] for s, x in acts.items()}
                rep = population_probe_report(acts, data.beliefs[index], weights, alpha=cfg.probe_alpha, concat=False)
            else:
                acts = read_residual(model, data.tokens, batch_size=cfg.probe_batch_size)
                rep = fit_probe_report(
                    acts,
                    data.beliefs,
                    weights=data.weights,
                    alpha=cfg.probe_alpha,
                    test_fraction=cfg.probe_test_fraction,
                    groups=data.groups,
                    concat=False,
                )
        return {f"probe_mse/{site}": entry["test"]["mse"] for site, entry in rep["sites"].items()}

    return curve


def headline(report: dict, n_layers: int) -> dict:
    """The numbers the summary leads with: last block, best single site, concatenated sites."""
    last = report["sites"][f"block{n_layers - 1}"]
    best = report["best_site"]
    out = {
        "final_layer_site": f"block{n_layers - 1}",
        "final_layer_test_mse": last["test"]["mse"],
        "final_layer_test_r2": last["test"]["r2"],
        "final_layer_random_init_mse": last["random_init"]["test"]["mse"],
        "final_layer_shuffled_mse": last["shuffled"]["test"]["mse"],
        "final_layer_ratio_to_random_init": last["ratio_to_random_init"],
        "best_single_site": best,
        "best_single_site_test_mse": report["sites"][best]["test"]["mse"],
        # "population": exact (fitted and scored on every probability-weighted prefix); "held_out": sampled windows
        "probe_evaluation": report["config"].get("evaluation", "held_out"),
    }
    if "split_seeds" in report:  # sampled windows: the spread of the held-out MSE over splits
        seeds = torch.tensor(report["split_seeds"][out["final_layer_site"]], dtype=torch.float64)
        out["final_layer_test_mse_split_seeds"] = seeds.tolist()
        out["final_layer_test_mse_split_std"] = float(seeds.std()) if len(seeds) > 1 else float("nan")
    if "concat" in report:
        out["concat_test_mse"] = report["concat"]["test"]["mse"]
        out["concat_beats_every_single_site"] = report["concat"]["test"]["mse"] < out["best_single_site_test_mse"]
    return out


# --------------------------------------------------------------------------- the job


def run_pipeline(
    data_cfg: ProcessConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, probe_cfg: ProbeConfig
) -> dict:
    """Train (``toy.train.train``), probe, plot and write the run folder; returns the metrics dict
    (main process; other ranks return ``{}`` after training)."""
    from accelerate import PartialState

    process = data_cfg.build()
    L = data_cfg.context_length
    if probe_cfg.probe_site is not None:  # fail before training, not after
        site_layer(probe_cfg.probe_site, model_cfg.n_layers)
    if train_cfg.init_from:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(train_cfg.init_from)
    else:
        model = build_model(model_cfg, process.vocab_size, L, seed=train_cfg.seed)
    info = {
        "data": asdict(data_cfg),
        "model": model_cfg.to_dict(),
        "train": asdict(train_cfg),
        "probe": asdict(probe_cfg),
    }
    data = probe_windows(process, L - 1, probe_cfg.probe_samples, seed=777, max_sequences=probe_cfg.probe_max_sequences)
    curve = exact_probe_curve(data, probe_cfg) if PartialState().is_main_process else None
    result: TrainResult = train(process, model, train_cfg, L, run_info=info, eval_fn=curve)
    end_processes()  # probing below is the main process's alone
    if not PartialState().is_main_process:
        return {}
    out = Path(train_cfg.output_dir)
    t0 = time.perf_counter()
    model = result.model.eval()
    control = build_model(model_cfg, process.vocab_size, L, seed=probe_cfg.control_seed).to(
        next(model.parameters()).device
    )
    report, acts = probe_model(model, control, data, probe_cfg, process)
    n_layers = model.config.n_layer
    head = headline(report, n_layers)
    last_site = probe_cfg.probe_site or head["final_layer_site"]
    # the saved probe is fitted on every row (for enumerated windows: the report's population fit itself)
    probe = fit_ridge(
        acts[last_site],
        data.beliefs,
        alpha=probe_cfg.probe_alpha,
        weights=data.weights,
        site=last_site,
        target_names=report["config"]["target_names"],
        metrics=report["sites"][last_site],
    )
    probe.source = str(result.checkpoint_dir)
    save_probe(probe, out / "probe_final", model)
    probe_s = time.perf_counter() - t0

    gap = result.val_loss - result.floor
    checks = {}
    if probe_cfg.target_gap is not None:
        checks["val_loss_within_target_of_floor"] = (
            gap <= probe_cfg.target_gap,
            f"gap {gap:.2e} <= {probe_cfg.target_gap:g}",
        )
    if probe_cfg.target_ratio is not None:
        r = head["final_layer_ratio_to_random_init"]
        checks["final_layer_ratio_to_random_init"] = (
            r <= probe_cfg.target_ratio,
            f"{r:.3f} <= {probe_cfg.target_ratio:g}",
        )
    if probe_cfg.target_mse is not None:
        v = head["final_layer_test_mse"]
        checks["final_layer_test_mse"] = (v <= probe_cfg.target_mse, f"{v:.2e} <= {probe_cfg.target_mse:g}")
    device = next(model.parameters()).device
    metrics = {
        "process": process.name,
        "context_length": L,
        "model": model_cfg.to_dict(),
        "val_loss": result.val_loss,
        "floor": result.floor,
        "gap": gap,
        "validation_exact": process.vocab_size ** (L - 1) <= train_cfg.val_max_sequences,
        "training": {
            "steps": result.step,
            "tokens": result.tokens_seen,
            "elapsed_s": result.elapsed_s,
            "tokens_per_s": result.tokens_per_s,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "history": result.history,
            "checkpoint": str(result.checkpoint_dir),
        },
        "probe_headline": head,
        "probe": report,
        "probe_data": {
            "rows": len(data.beliefs),
            "enumerated": data.enumerated,
            "reader": reader(),
            "elapsed_s": probe_s,
        },
        "checks": checks,
        "config": info,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    title = f"{process.name}, {result.step} steps"
    predicted = probe.predict(acts[last_site].double())
    plot_simplex(
        data.beliefs,
        predicted,
        out / "belief_simplex.png",
        f"{title}, probe at {last_site}",
        probe_cfg.max_plot_points,
        data.weights,
    )
    plot_probe_mse(report, out / "probe_mse_by_layer.png", f"{title}: belief probes ({head['probe_evaluation']})")
    plot_probe_emergence(result.history, out / "probe_mse_emergence.png", f"{title}: emergence of the belief geometry")
    plot_val_loss(result.history, out / "val_loss.png", title)
    write_summary(out / "summary.md", metrics)
    print(
        f"{process.name}: val loss {result.val_loss:.6f} (floor {result.floor:.6f}, gap {gap:.2e}); {head['final_layer_site']} probe MSE "
        f"({head['probe_evaluation']}) "
        f"{head['final_layer_test_mse']:.3e} vs random-init {head['final_layer_random_init_mse']:.3e} "
        f"(ratio {head['final_layer_ratio_to_random_init']:.3f})"
        + (
            f"; concat {head['concat_test_mse']:.3e} vs best single {head['best_single_site']} {head['best_single_site_test_mse']:.3e}"
            if "concat_test_mse" in head
            else ""
        )
        + f"; train {result.elapsed_s:.0f} s, probe {probe_s:.0f} s -> {out}"
    )
    for name, (ok, detail) in checks.items():
        print(f"  {name}: {'PASS' if ok else 'FAIL'} ({detail})")
    return metrics


def make_parser() -> ConfigParser:
    return ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig, ProbeConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    cfgs = make_parser().parse_args_and_config(argv)
    set_cpu_threads(cfgs[2])
    return run_pipeline(*cfgs)


if __name__ == "__main__":
    main()
