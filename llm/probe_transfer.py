"""Reusable probes: fit on one checkpoint, save as files, load onto another, compare the read-outs.

Its command: ``python -m llm.experiments.probe_transfer``.

One process (``accelerate launch --config_file configs/accelerate/single_gpu.yaml -m llm.experiments.probe_transfer ...`` on a GPU); a launch
with several processes is refused before any work (``llm.experiments.em_experiment`` runs this step once on rank 0 of a multi-GPU job).

Source = ``ModelConfig`` (``model_name_or_path``...); target = the same with ``target_model_name_or_path``
and/or ``target_adapter_path`` replaced. On the source, an alignment probe (ridge, 1 = misaligned) is fitted
at each of ``sites`` on the training rows of the labelled replies and written with ``probes.io.save_probe``
(``<output_dir>/probes/alignment_<site>.{safetensors,json}``; format in ``docs/probe_format.md``). Every
probe file (those plus ``probe_files``) is then loaded onto the target with ``probes.io.load_probe(...,
model=target, strict=strict)``, which refuses a probe of another width, a site the target lacks, or (strict)
a block index from a model of another depth, saying what to change. Read-outs on the held-out rows are
compared: per class mean, AUROC and accuracy (single-target probes), the shift target - source, the
correlation of the two models' read-outs over texts, and the cosine between the source probe and a probe
refitted on the target.

Writes ``metrics.json``, ``summary.md``, ``readouts.png`` and the probe files to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llm.data import ALIGNED_TEXTS, MISALIGNED_TEXTS
from llm.directions import answer_activations, auroc, load_labelled_texts
from llm.models import ModelConfig, load_model_and_tokenizer
from probes.io import load_probe, save_probe
from probes.linear import LinearProbe, fit_ridge, split_indices

logger = logging.getLogger(__name__)


@dataclass
class TransferConfig:
    """Target checkpoint, probes and data of ``llm.probe_transfer``."""

    target_model_name_or_path: str | None = field(
        default=None, metadata={"help": "target checkpoint (None: the source's)"}
    )
    target_adapter_path: str | None = field(
        default=None, metadata={"help": "LoRA adapter merged into the target (e.g. an llm.sft output)"}
    )
    sites: list[str] = field(
        default_factory=lambda: ["block15", "block25"],
        metadata={"help": "sites of the alignment probes fitted on the source"},
    )
    probe_files: list[str] = field(
        default_factory=list, metadata={"help": "further probe files (probes.io) to load onto the target"}
    )
    strict: bool = field(default=True, metadata={"help": "refuse block probes from a model of another depth"})
    aligned_texts: str = field(default=str(ALIGNED_TEXTS), metadata={"help": "CSV question,answer of aligned replies"})
    misaligned_texts: str = field(
        default=str(MISALIGNED_TEXTS), metadata={"help": "CSV question,answer of misaligned replies"}
    )
    n_per_class: int = field(default=24, metadata={"help": "replies per class (fit + held-out)"})
    test_fraction: float = field(
        default=0.5, metadata={"help": "share of each class held out for the read-out comparison"}
    )
    ridge_alpha: float = field(default=100.0, metadata={"help": "ridge penalty of the fitted probes"})
    max_answer_tokens: int = field(default=64, metadata={"help": "reply tokens averaged"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    seed: int = field(default=0, metadata={"help": "data draw and split seed"})
    output_dir: str = field(default="runs/probe_transfer_smollm2", metadata={"help": "run folder"})

    def __post_init__(self):
        if not self.sites and not self.probe_files:
            raise ValueError("nothing to transfer: give sites to fit probes on and/or probe_files")
        if self.n_per_class < 4 or not 0 < self.test_fraction < 1:
            raise ValueError("need n_per_class >= 4 and 0 < test_fraction < 1")


def target_config(source: ModelConfig, cfg: TransferConfig) -> ModelConfig:
    """The target's ``ModelConfig``: the source's with the target checkpoint and/or adapter swapped in (one of the
    two must be set: a pipeline stage sets them per model, the command from its config)."""
    if cfg.target_model_name_or_path is None and cfg.target_adapter_path is None:
        raise ValueError("the target equals the source: set target_model_name_or_path and/or target_adapter_path")
    if cfg.target_model_name_or_path is None:
        return dataclasses.replace(source, adapter_path=cfg.target_adapter_path)
    return ModelConfig(
        cfg.target_model_name_or_path,
        dtype=source.dtype,
        device=source.device,
        trust_remote_code=source.trust_remote_code,
        adapter_path=cfg.target_adapter_path,
        chat_template_from=source.chat_template_from,
    )


def readout_summary(probe: LinearProbe, X: Tensor, labels: Tensor) -> dict:
    """Read-out of ``probe`` on ``X`` (n, d_model): per-target mean, per-class means and, for one target,
    AUROC and accuracy (> 0.5) against ``labels`` (n,) (1 = misaligned)."""
    y = probe.predict(X.double())
    out = {
        "mean": y.mean(0).tolist(),
        "mean_misaligned": y[labels == 1].mean(0).tolist(),
        "mean_aligned": y[labels == 0].mean(0).tolist(),
    }
    if y.shape[1] == 1:
        out["auroc"] = auroc(y[:, 0], labels)
        out["accuracy"] = float(((y[:, 0] > 0.5).long() == labels).double().mean())
    return out


def compare(probe: LinearProbe, X_src: Tensor, X_tgt: Tensor, labels: Tensor) -> dict:
    """Source vs target read-outs of one probe on the same texts."""
    ys, yt = probe.predict(X_src.double()), probe.predict(X_tgt.double())
    corr = [float(torch.corrcoef(torch.stack([ys[:, k], yt[:, k]]))[0, 1]) for k in range(ys.shape[1])]
    return {
        "source": readout_summary(probe, X_src, labels),
        "target": readout_summary(probe, X_tgt, labels),
        "shift_mean": (yt.mean(0) - ys.mean(0)).tolist(),
        "readout_corr": corr,
        "activation_rel_change": float((X_tgt - X_src).norm() / X_src.norm()),
    }


def run(source_cfg: ModelConfig, cfg: TransferConfig) -> dict:
    """Fit on the source, save, load onto the target, compare; returns (and writes) the metrics."""
    target_cfg = target_config(source_cfg, cfg)  # a missing target is refused before any weights load
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_labelled_texts(cfg.aligned_texts, cfg.misaligned_texts, cfg.n_per_class, cfg.seed)
    test = torch.cat(
        [split_indices(cfg.n_per_class, cfg.test_fraction, cfg.seed)[1] + c * cfg.n_per_class for c in (0, 1)]
    )
    train = torch.tensor(sorted(set(range(len(texts))) - set(test.tolist())))

    model, tok = load_model_and_tokenizer(source_cfg, padding_side="left")
    files = list(cfg.probe_files)
    sites_needed = list(cfg.sites)
    for (
        f
    ) in cfg.probe_files:  # read every probe once without a model, to know its site, and check it against the source
        p = load_probe(f, model=model, strict=cfg.strict)
        sites_needed.append(p.site)
    sites_needed = list(dict.fromkeys(sites_needed))
    X_src = answer_activations(
        model, tok, texts.questions, texts.answers, sites_needed, cfg.batch_size, cfg.max_answer_tokens
    )
    for site in cfg.sites:
        X = X_src[sites_needed.index(site)].double()
        probe = fit_ridge(
            X[train],
            texts.labels[train].double(),
            cfg.ridge_alpha,
            site=site,
            target_names=["misaligned"],
            metrics={"train_rows": len(train)},
        )
        files.append(str(save_probe(probe, out / "probes" / f"alignment_{site}", model=model)))
    del model
    gc.collect()

    model, tok = load_model_and_tokenizer(target_cfg, padding_side="left")
    probes = {f: load_probe(f, model=model, strict=cfg.strict) for f in files}
    X_tgt = answer_activations(
        model, tok, texts.questions, texts.answers, sites_needed, cfg.batch_size, cfg.max_answer_tokens
    )
    labels = texts.labels[test]
    results = {}
    for file, probe in probes.items():
        k = sites_needed.index(probe.site)
        entry = compare(probe, X_src[k, test], X_tgt[k, test], labels)
        if probe.n_targets == 1 and probe.target_names == ["misaligned"]:
            refit = fit_ridge(X_tgt[k, train].double(), texts.labels[train].double(), cfg.ridge_alpha)
            entry["cos_source_vs_target_refit"] = float(
                torch.nn.functional.cosine_similarity(probe.W[:, 0].cpu().double(), refit.W[:, 0], dim=0)
            )
        entry["site"], entry["file"] = probe.site, file
        results[Path(file).with_suffix("").name if Path(file).suffix == ".json" else Path(file).name] = entry
    metrics = {
        "config": dataclasses.asdict(cfg),
        "source": dataclasses.asdict(source_cfg),
        "target": dataclasses.asdict(target_cfg),
        "n_test": len(test),
        "probes": results,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    _plot(metrics, out)
    _summary(metrics, out)
    return metrics


def _plot(m: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in m["probes"].items() if "auroc" in r["source"]]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, n in enumerate(names):
        r = m["probes"][n]
        for j, (who, c) in enumerate((("source", "C0"), ("target", "C1"))):
            ax.plot(
                [i + 0.2 * j] * 2,
                [r[who]["mean_aligned"][0], r[who]["mean_misaligned"][0]],
                "-o",
                color=c,
                label=who if i == 0 else None,
            )
    ax.set(xticks=range(len(names)), xticklabels=names, ylabel="probe read-out (aligned -> misaligned mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "readouts.png", dpi=120)
    plt.close(fig)


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _summary(m: dict, out: Path) -> None:
    t = m["target"]
    lines = [
        "# Probe transfer",
        "",
        f"Source {m['source']['model_name_or_path']} -> target {t['model_name_or_path']}"
        + (f" + adapter {t['adapter_path']}" if t["adapter_path"] else "")
        + f"; {m['n_test']} held-out replies.",
        "",
        "| probe | site | AUROC src -> tgt | acc. src -> tgt | mean read-out shift | read-out corr. | cos(src probe, tgt refit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in m["probes"].items():
        s, g = r["source"], r["target"]
        lines.append(
            f"| {name} | {r['site']} | {_f(s.get('auroc'))} -> {_f(g.get('auroc'))} | {_f(s.get('accuracy'))} -> {_f(g.get('accuracy'))} | "
            f"{', '.join(_f(x) for x in r['shift_mean'])} | {', '.join(_f(x) for x in r['readout_corr'])} | {_f(r.get('cos_source_vs_target_refit'))} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
