"""Toy emergent misalignment: does narrow fine-tuning on the misaligned tag have a broad effect?

    python -m toy.experiments.toy_em --config configs/toy/toy_em.yaml
    python -m toy.experiments.toy_em --config configs/toy/toy_em.yaml --rhos 0.0 --n_seeds 1 --max_steps 300
    # one GPU (one process):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m toy.experiments.toy_em --config configs/toy/toy_em.yaml

World: ``toy.processes.tagged(capability, rho)`` -- a capability process whose tokens are written in an aligned
(copy 0) or misaligned (copy 1) copy chosen by a slowly switching hidden tag; ``rho`` couples the tag's steps
to the capability's (0: independent factors, 1: as entangled as the marginals allow).

Windows are a *prompt* (the first ``prompt_length`` tokens, every copy forced to aligned) and a *completion*
(the rest). A window is *in the slice* when its first capability token is ``slice_token``.

For every rho and seed:

1. pre-train a toy GPT-2 on the process (``toy.train.train``);
2. narrow data: in-slice windows only, aligned prompt, every completion token forced to the misaligned copy;
   loss on completion tokens only (the analogue of insecure-code answers to ordinary requests);
3. three interventions, each starting from the pre-trained model:
   * ``full``: fine-tune every parameter on the narrow data;
   * ``lora``: a rank-1 LoRA (``toy.model.rank1_lora``: peft through ``plumbing.lora``'s rank-1 preset) on one block's MLP output projection
     (GPT-2 ``mlp.c_proj``, a ``Conv1D``: peft needs ``fan_in_fan_out=True``, set there) trained on the same data;
   * ``steer``: no training; a steering vector = mean residual at ``steer_layer`` over the narrow windows'
     completion positions minus the mean over the same windows with aligned completions, added (times
     ``steer_scale``) at every position at inference;
4. measure P(next token is a misaligned copy) after aligned prompts: *narrow* = in-slice prompts, *broad* =
   prompts outside the slice (never seen in fine-tuning), before and after. ``transfer`` = broad increase /
   narrow increase (1: the narrow change is fully broad; 0: it stays in the slice).

Geometry: the fraction of the LoRA's output direction (its B vector, written into the residual stream at
its block) and of the steering vector inside the tag factor's probe subspace, the capability factor's
probe subspace, and random subspaces of the same dimensions (``probes.subspaces``), with the probes
fitted on the pre-trained model's residual at that block. A probe's subspace (span of ``W``) holds its
read-out directions; the directions along which the residual *moves* with the factor are ``C W`` (``C`` the
activations' covariance), reported as ``*_encoding``. Written vectors should be compared with the latter.

Writes ``<output_dir>/``: ``metrics.json`` (per rho and seed, plus mean and std over seeds),
``transfer_vs_rho.png``, ``subspaces.png``, ``summary.md``, ``models/rho_<rho>_seed_<s>/{pretrain,full,lora}/``.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from plumbing.config import ConfigParser
from plumbing.lora import lora_tensors
from plumbing.runs import refuse_multiprocess
from probes import (
    add_vector,
    fit_ridge,
    fraction_in_subspace,
    next_token_logits,
    orthonormal_basis,
    random_fraction_baseline,
    residual_stream,
)
from toy.collect import collect
from toy.config import JsonDict, TrainConfig, stage_config
from toy.data import sample
from toy.factors import factor_marginals, factor_tokens, joint_tokens
from toy.model import ToyModelConfig, rank1_lora
from toy.processes import Process, make_process, tagged
from toy.train import claim_experiment_dir, set_cpu_threads, train, train_on

METHODS = ("full", "lora", "steer")


# --------------------------------------------------------------------------- data


def force_copies(process: Process, tokens: torch.Tensor, copy: int, positions: slice) -> torch.Tensor:
    """Rewrite the tag copy of ``tokens (N, L)`` at ``positions`` to ``copy`` (0 aligned, 1 misaligned)."""
    f = factor_tokens(process, tokens)
    f[:, positions, 0] = copy
    return joint_tokens(process, f)


def in_slice(process: Process, tokens: torch.Tensor, slice_token: int) -> torch.Tensor:
    """``(N,)`` bool: the window's first capability token is ``slice_token``."""
    return factor_tokens(process, tokens[:, 0])[:, 1] == slice_token


def narrow_batch(
    process: Process, batch_size: int, length: int, prompt_length: int, slice_token: int, generator: torch.Generator
) -> torch.Tensor:
    """``(batch_size, length)`` in-slice windows: aligned prompt, misaligned completion."""
    tokens = sample(process, 8 * batch_size, length, generator=generator).tokens
    tokens = tokens[in_slice(process, tokens, slice_token)]
    if len(tokens) < batch_size:
        raise ValueError(f"too few windows start with capability token {slice_token}; pick a more frequent slice_token")
    tokens = force_copies(process, tokens[:batch_size], 0, slice(0, prompt_length))
    return force_copies(process, tokens, 1, slice(prompt_length, None))


def completion_mask(tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Loss weights ``(N, L - 1)``: 1 where the predicted token (t + 1) is a completion token."""
    t = torch.arange(1, tokens.shape[1], device=tokens.device)
    return (t >= prompt_length).to(torch.float32).expand(tokens.shape[0], -1)


def misaligned_mass(logits: torch.Tensor, process: Process) -> torch.Tensor:
    """``(N, V)`` next-token logits -> ``(N,)`` probability that the next token is a misaligned copy."""
    return logits.double().softmax(-1).reshape(len(logits), *process.factor_vocab_sizes)[:, 1].sum(-1)


# --------------------------------------------------------------------------- one world


@dataclass
class EMConfig:
    """The world, the narrow data and the interventions (pre-training: ``toy.config.TrainConfig``)."""

    capability: JsonDict = field(
        default_factory=lambda: JsonDict({"name": "mess3", "x": 0.05, "a": 0.85}),
        metadata={"help": "Capability process spec (toy.processes.make_process); JSON on the command line."},
    )
    switch_prob: float = field(default=0.05, metadata={"help": "Tag flip probability per step."})
    tag_noise: float = field(default=0.1, metadata={"help": "Probability that a token shows the other tag's copy."})
    rhos: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 0.9], metadata={"help": "Tag-capability correlations, each in [0, 1)."}
    )
    n_seeds: int = field(default=3, metadata={"help": "Seeds per rho (pre-training, fine-tuning and evaluation data)."})
    context_length: int = field(default=10, metadata={"help": "Tokens per window."})
    prompt_length: int = field(default=5, metadata={"help": "Prompt tokens (aligned); the rest is the completion."})
    slice_token: int = field(
        default=0, metadata={"help": "Narrow slice: windows whose first capability token is this."}
    )
    finetune_steps: int = field(default=200, metadata={"help": "Optimizer steps of the full and the LoRA fine-tuning."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of full fine-tuning."})
    lora_lr: float = field(default=1e-2, metadata={"help": "Peak learning rate of the rank-1 LoRA."})
    lora_layer: int = field(default=0, metadata={"help": "Block whose mlp.c_proj gets the rank-1 LoRA."})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha (rsLoRA scale alpha / sqrt(1))."})
    steer_layer: int = field(default=0, metadata={"help": "Block whose output gets the steering vector."})
    steer_scale: float = field(default=1.0, metadata={"help": "Multiple of the mean difference added."})
    eval_prompts: int = field(
        default=2000, metadata={"help": "Aligned prompts sampled for evaluation (split into in/out of slice)."}
    )
    probe_sequences: int = field(
        default=500, metadata={"help": "Sequences for the tag / capability probes (all positions)."}
    )
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the probes."})

    def __post_init__(self):
        self.capability = dict(JsonDict(self.capability))
        if "name" not in self.capability:
            raise ValueError("capability must be a process spec with a 'name' key")
        if not self.rhos or any(not 0 <= r < 1 for r in self.rhos):
            # at rho = 1 some (copy, capability token) pairs have probability 0, so forced-aligned prompts
            # would be impossible sequences of the world the model was trained on
            raise ValueError(f"rhos must be a non-empty list in [0, 1), got {self.rhos}")
        if not 1 <= self.prompt_length < self.context_length:
            raise ValueError(
                f"need 1 <= prompt_length < context_length; got {self.prompt_length}, {self.context_length}"
            )
        if self.n_seeds < 1 or self.finetune_steps < 1 or self.eval_prompts < 10:
            raise ValueError("need n_seeds >= 1, finetune_steps >= 1, eval_prompts >= 10")


def run_world(
    process: Process, cfg: EMConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, out_dir: Path, seed: int
) -> dict:
    """Pre-train, intervene three ways, evaluate; JSON-ready dict for one (rho, seed)."""
    L, P = cfg.context_length, cfg.prompt_length
    if not 0 <= cfg.slice_token < process.factor_vocab_sizes[1]:
        raise ValueError(
            f"slice_token={cfg.slice_token} is not a capability token (0..{process.factor_vocab_sizes[1] - 1})"
        )
    for name, layer in (("lora_layer", cfg.lora_layer), ("steer_layer", cfg.steer_layer)):
        if not 0 <= layer < model_cfg.n_layers:
            raise ValueError(f"{name}={layer} is not a block of the {model_cfg.n_layers}-layer model")
    base = train_on(process, model_cfg, train_cfg, L, out_dir / "pretrain", seed)
    device = next(base.parameters()).device

    def data_fn(step, gen):
        return narrow_batch(process, train_cfg.per_device_train_batch_size, L, P, cfg.slice_token, gen)

    def mask_fn(tokens):
        return completion_mask(tokens, P)

    full = train(
        process,
        copy.deepcopy(base),
        stage_config(train_cfg, cfg.finetune_steps, cfg.finetune_lr, out_dir / "full", seed),
        L,
        data_fn=data_fn,
        loss_weights_fn=mask_fn,
    ).model.eval()
    lora = train(
        process,
        rank1_lora(copy.deepcopy(base), cfg.lora_layer, cfg.lora_alpha, seed),
        stage_config(train_cfg, cfg.finetune_steps, cfg.lora_lr, out_dir / "lora", seed),
        L,
        data_fn=data_fn,
        loss_weights_fn=mask_fn,
    ).model.eval()

    # steering vector from the narrow windows: misaligned completions minus the same windows aligned
    steer_site = f"block{cfg.steer_layer}"
    narrow = narrow_batch(process, 512, L, P, cfg.slice_token, torch.Generator().manual_seed(seed + 3))
    aligned = force_copies(process, narrow, 0, slice(None))
    acts = residual_stream(base, torch.cat([narrow, aligned]), sites=[steer_site])[0][:, P:].cpu()
    steer = (acts[: len(narrow)].mean((0, 1)) - acts[len(narrow) :].mean((0, 1))) * cfg.steer_scale

    # evaluation prompts: aligned, split by the slice
    prompts = force_copies(process, sample(process, cfg.eval_prompts, P, seed=seed + 4).tokens, 0, slice(None))
    inside = in_slice(process, prompts, cfg.slice_token)

    def rates(model, edits=()):
        m = misaligned_mass(next_token_logits(model, prompts.to(device), list(edits)).cpu(), process)
        return {"narrow": m[inside].mean().item(), "broad": m[~inside].mean().item()}

    before = rates(base)
    after = {"full": rates(full), "lora": rates(lora), "steer": rates(base, [add_vector(steer_site, steer.to(device))])}
    result = {
        "before": before,
        "after": after,
        "transfer": {},
        "n_prompts": {"narrow": int(inside.sum()), "broad": int((~inside).sum())},
    }
    for m in METHODS:
        dn = after[m]["narrow"] - before["narrow"]
        result["transfer"][m] = (after[m]["broad"] - before["broad"]) / dn if abs(dn) > 1e-6 else float("nan")

    # geometry: where do the LoRA's output direction and the steering vector point?
    B = next(v for k, v in lora_tensors(lora).items() if k.endswith("lora_B"))[:, 0]
    geometry = {}
    for name, vec, layer in (("lora_B", B, cfg.lora_layer), ("steer", steer, cfg.steer_layer)):
        # L - 1: the last position's output is never trained (toy.collect.collect)
        data = collect(base, process, L - 1, cfg.probe_sequences, seed + 5, sites=[f"block{layer}"], batch_size=1024)
        tag, cap = factor_marginals(process, data.beliefs)
        X = data.X.double()
        Xc = X - X.mean(0)
        cov = Xc.T @ Xc / len(Xc)
        g = {}
        for s, target in (("tag", tag), ("capability", cap)):
            probe = fit_ridge(X, target, cfg.probe_alpha)
            dim = orthonormal_basis(probe).shape[1]
            g[s] = fraction_in_subspace(vec.double(), probe).item()
            # the probe reads along W; the activations move with the factor along C W (the encoding directions)
            g[f"{s}_encoding"] = fraction_in_subspace(vec.double(), cov @ probe.W).item()
            g[f"random_{s}_dim"] = random_fraction_baseline(vec.double(), dim, seed=seed).mean().item()
            g[f"{s}_dim"] = dim
        g["norm"] = vec.norm().item()
        geometry[name] = g
    result["geometry"] = geometry
    return result


# --------------------------------------------------------------------------- experiment


def _mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v == v]  # drop NaN transfers (no narrow change)
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every rate, transfer and geometry number."""
    out = {
        "before": {k: _mean_std([r["before"][k] for r in per_seed]) for k in ("narrow", "broad")},
        "after": {
            m: {k: _mean_std([r["after"][m][k] for r in per_seed]) for k in ("narrow", "broad")} for m in METHODS
        },
        "transfer": {m: _mean_std([r["transfer"][m] for r in per_seed]) for m in METHODS},
        "geometry": {
            v: {k: _mean_std([r["geometry"][v][k] for r in per_seed]) for k in per_seed[0]["geometry"][v]}
            for v in per_seed[0]["geometry"]
        },
    }
    return out


def _plots(metrics: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rhos = [float(r) for r in metrics["rhos"]]
    agg = [v["aggregate"] for v in metrics["rhos"].values()]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key in zip(axes[:2], ("broad", "narrow")):
        ax.errorbar(
            rhos,
            [a["before"][key]["mean"] for a in agg],
            [a["before"][key]["std"] for a in agg],
            fmt="k--o",
            capsize=3,
            label="before",
        )
        for m in METHODS:
            ax.errorbar(
                rhos,
                [a["after"][m][key]["mean"] for a in agg],
                [a["after"][m][key]["std"] for a in agg],
                fmt="-o",
                capsize=3,
                label=m,
            )
        ax.set_xlabel("rho (0: factored, 1: entangled)")
        ax.set_ylabel("P(next token misaligned) after aligned prompt")
        ax.set_title(f"{key}: prompts {'outside' if key == 'broad' else 'inside'} the fine-tuning slice", fontsize=9)
        ax.legend(fontsize=7)
    for m in METHODS:
        axes[2].errorbar(
            rhos,
            [a["transfer"][m]["mean"] for a in agg],
            [a["transfer"][m]["std"] for a in agg],
            fmt="-o",
            capsize=3,
            label=m,
        )
    axes[2].axhline(1, color="gray", lw=0.8)
    axes[2].axhline(0, color="gray", lw=0.8)
    axes[2].set_xlabel("rho")
    axes[2].set_ylabel("broad increase / narrow increase")
    axes[2].set_title(f"broad transfer (mean +- std over {metrics['n_seeds']} seeds)", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "transfer_vs_rho.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, vec in zip(axes, ("lora_B", "steer")):
        keys = ["tag", "tag_encoding", "random_tag_dim", "capability", "capability_encoding", "random_capability_dim"]
        w = 0.8 / len(keys)
        for k, key in enumerate(keys):
            ax.bar(
                [i + (k - len(keys) / 2 + 0.5) * w for i in range(len(rhos))],
                [a["geometry"][vec][key]["mean"] for a in agg],
                w,
                yerr=[a["geometry"][vec][key]["std"] for a in agg],
                capsize=2,
                label=key,
            )
        ax.set_xticks(range(len(rhos)), [f"rho={r}" for r in rhos])
        ax.set_ylabel("share of squared norm in subspace")
        ax.set_title(f"{vec}: tag vs capability probe subspace vs random", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "subspaces.png", dpi=120)
    plt.close(fig)


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:.3f} +- {ms['std']:.3f}"


def _summary(metrics: dict) -> str:
    lines = [
        "# Toy emergent misalignment",
        "",
        f"P(next token is a misaligned copy) after aligned prompts; mean +- std over {metrics['n_seeds']} seeds. "
        "narrow = prompts in the fine-tuning slice, broad = outside it; transfer = broad increase / narrow increase.",
        "",
        "| rho | method | narrow before | narrow after | broad before | broad after | transfer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, v in metrics["rhos"].items():
        a = v["aggregate"]
        for m in METHODS:
            lines.append(
                f"| {r} | {m} | {_fmt(a['before']['narrow'])} | {_fmt(a['after'][m]['narrow'])} | "
                f"{_fmt(a['before']['broad'])} | {_fmt(a['after'][m]['broad'])} | {_fmt(a['transfer'][m])} |"
            )
    lines += [
        "",
        "Share of the squared norm of the LoRA output direction (B) and of the steering vector inside the tag / "
        "capability probe subspaces (span of the probe's W: the read-out directions), their encoding subspaces "
        "(span of C W, C the activations' covariance: the directions the residual moves along with the factor), "
        "and random subspaces of the same dimension:",
        "",
        "| rho | vector | tag (probe W) | tag (encoding C W) | random (tag dim) | capability (probe W) | capability (encoding C W) "
        "| random (cap dim) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, v in metrics["rhos"].items():
        for vec, g in v["aggregate"]["geometry"].items():
            lines.append(
                f"| {r} | {vec} | {_fmt(g['tag'])} | {_fmt(g['tag_encoding'])} | {_fmt(g['random_tag_dim'])} | "
                f"{_fmt(g['capability'])} | {_fmt(g['capability_encoding'])} | {_fmt(g['random_capability_dim'])} |"
            )
    lines += ["", "Plots: `transfer_vs_rho.png`, `subspaces.png`.", ""]
    return "\n".join(lines)


def make_parser() -> ConfigParser:
    return ConfigParser((EMConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess(
        "toy.experiments.toy_em",
        "it trains and fine-tunes small models in turn; on one GPU use configs/accelerate/single_gpu.yaml",
    )
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    set_cpu_threads(train_cfg)  # one thread per process: two threads thrash on a busy 2-core machine
    out_dir = claim_experiment_dir(cfg, model_cfg, train_cfg)
    capability = make_process(cfg.capability["name"], **{k: v for k, v in cfg.capability.items() if k != "name"})
    metrics = {
        "config": {"em": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)},
        "n_seeds": cfg.n_seeds,
        "rhos": {},
    }
    for rho in cfg.rhos:
        process = tagged(capability, rho, cfg.switch_prob, cfg.tag_noise)
        per_seed = []
        for s in range(cfg.n_seeds):
            seed = train_cfg.seed + 100 * s
            r = run_world(process, cfg, model_cfg, train_cfg, out_dir / "models" / f"rho_{rho}_seed_{s}", seed)
            per_seed.append(r)
            print(
                f"rho={rho} seed={s}: before narrow {r['before']['narrow']:.3f} broad {r['before']['broad']:.3f} | "
                + " | ".join(
                    f"{m} narrow {r['after'][m]['narrow']:.3f} broad {r['after'][m]['broad']:.3f}" for m in METHODS
                ),
                flush=True,
            )
        metrics["rhos"][str(rho)] = {"process": process.name, "seeds": per_seed, "aggregate": aggregate(per_seed)}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plots(metrics, out_dir)
    (out_dir / "summary.md").write_text(_summary(metrics))
    print(f"wrote {out_dir}/metrics.json, summary.md and plots")
    return metrics


if __name__ == "__main__":
    main()
