"""Factor steering: change the tag factor of a toy model's belief through its residual stream, keep the capability.

    python -m toy.experiments.factor_steering --config configs/toy/factor_steering.yaml
    python -m toy.experiments.factor_steering --config configs/toy/factor_steering.yaml --rhos 0.0 --steps 300
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
   ``eta'`` exactly (``steering_edit``): ``pinv``, ``dx = (eta' - eta_hat) W^+`` -- the minimal Euclidean-norm
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

import torch

from plumbing.config import ConfigParser
from plumbing.runs import claim_output_dir, config_record, refuse_multiprocess
from probes import add_vector, fit_ridge, next_token_logits, regression_metrics, residual_stream, split_indices
from toy.beliefs import belief_states
from toy.collect import collect, default_site
from toy.config import JsonDict, TrainConfig
from toy.data import sample
from toy.factors import factor_marginals, product_approximation, product_belief
from toy.model import ToyModelConfig
from toy.processes import Process, make_process, tagged
from toy.train import RERUN_KEYS, train_on


def steering_edit(probe, eta_hat: torch.Tensor, eta_target: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
    """Residual edits ``(n, d_model)`` that move the probe's reading from ``eta_hat`` to ``eta_target`` (both (n, S)).

    ``cov=None``: ``dx = (eta_target - eta_hat) @ pinv(W)`` with ``W`` (d_model, S) -- the least Euclidean-norm
    ``dx`` with ``dx @ W = eta_target - eta_hat``; it lies in the span of ``W``'s columns (the probe's row
    space). ``cov`` (d_model, d_model), the activations' covariance: ``dx = delta @ pinv(W^T C W) @ W^T C`` --
    the least Mahalanobis-norm (``dx C^+ dx^T``) edit with the same reading, i.e. a move along directions
    in which the activations actually vary (a probe's own directions can be ones the model barely uses).
    Exact when the change lies in the probe's output range (belief changes summing to zero do, for a probe
    fitted on beliefs); otherwise least squares.
    """
    W = probe.W.to(eta_hat.device, torch.float64)
    delta = eta_target.double() - eta_hat.double()
    if cov is None:
        return delta @ torch.linalg.pinv(W)
    CW = cov.to(W) @ W
    return delta @ torch.linalg.pinv(W.T @ CW, hermitian=True) @ CW.T


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats along the last axis (0 log 0 = 0); ``q`` clamped at 1e-12."""
    p, q = p.double(), q.double()
    return (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-12).log())).sum(-1)


def _opposite_donors(tag: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, a random other row whose most likely tag differs: ``(n,)`` indices."""
    side = tag.argmax(-1)
    donors = torch.empty_like(side)
    for s in (0, 1):
        pool = (side != s).nonzero().squeeze(1)
        rows = (side == s).nonzero().squeeze(1)
        if len(rows) and not len(pool):
            raise ValueError("every context has the same most likely tag; sample more contexts")
        donors[rows] = pool[torch.randint(len(pool), (len(rows),), generator=generator)]
    return donors


EDITS = ("pinv", "covariance")


def steer_factor(model, process: Process, probe, tokens: torch.Tensor, site: str, cov: torch.Tensor, seed: int = 0) -> dict:
    """Steps 2-5 on windows ``tokens (n, L)`` of a two-factor (tag, capability) process, for both edits of
    ``steering_edit`` (``"pinv"`` and ``"covariance"`` with the activations' covariance ``cov``), each beside a
    random edit of the same norm per row. Returns per-context CPU float64 tensors: ``p0`` (n, V) unmodified
    prediction, ``target`` (n, V) the prediction the target belief implies, ``resid_norm`` (n,), the S-step
    residuals, and per edit kind ``{"steered", "random"}`` predictions, ``edit_norm`` and ``probe_after``."""
    if process.factor_state_sizes is None or len(process.factor_state_sizes) != 2:
        raise ValueError(f"{process.name}: factor steering needs a two-factor process (tag, capability)")
    gen = torch.Generator().manual_seed(seed)
    n, L = tokens.shape
    x = residual_stream(model, tokens, sites=[site])[0][:, -1].cpu().double()  # (n, d_model)
    eta_hat = probe.predict(x)
    _, v_cap, resid = product_approximation(eta_hat, process.factor_state_sizes)
    exact = belief_states(process, tokens)[:, -1]
    exact_tag = factor_marginals(process, exact)[0]
    target_tag = exact_tag[_opposite_donors(exact_tag, gen)]
    eta_target = product_belief([target_tag, v_cap])
    _, _, exact_resid = product_approximation(exact, process.factor_state_sizes)

    def predict(edit):
        edits = [] if edit is None else [add_vector(site, edit.float(), positions=[L - 1])]
        return next_token_logits(model, tokens, edits).double().softmax(-1).cpu()

    out = {
        "p0": predict(None), "target": eta_target @ process.T.sum(-1).T, "eta_target": eta_target,
        "resid_norm": x.norm(dim=-1), "s_residual": resid.norm(dim=-1) / eta_hat.norm(dim=-1),
        "exact_product_residual": exact_resid.norm(dim=-1) / exact.norm(dim=-1),
    }
    for kind in EDITS:
        dx = steering_edit(probe, eta_hat, eta_target, cov if kind == "covariance" else None)
        rand = torch.randn(dx.shape, generator=gen, dtype=torch.float64)
        rand = rand / rand.norm(dim=-1, keepdim=True) * dx.norm(dim=-1, keepdim=True)
        out[kind] = {"steered": predict(dx), "random": predict(rand), "edit_norm": dx.norm(dim=-1),
                     "probe_after": probe.predict(x + dx)}
    return out


def steering_metrics(process: Process, out: dict) -> dict:
    """Mean KLs (nats), win rates (share of contexts where the steered KL is below the random one) and
    P(misaligned copy) from ``steer_factor``'s output, per edit kind; plain floats."""
    Vt, Vc = process.factor_vocab_sizes

    def marg(p):  # (n, V) -> tag (n, Vt), capability (n, Vc)
        p = p.reshape(-1, Vt, Vc)
        return p.sum(-1), p.sum(-2)

    (tag_t, _), (tag0, cap0) = marg(out["target"]), marg(out["p0"])
    metrics = {
        "tag_kl_unsteered": kl(tag_t, tag0).mean().item(),
        "s_residual": out["s_residual"].mean().item(),
        "exact_product_residual": out["exact_product_residual"].mean().item(),
        "p_misaligned": {"target": tag_t[:, 1].mean().item(), "unsteered": tag0[:, 1].mean().item()},
    }
    for kind in EDITS:
        o = out[kind]
        (tag_s, cap_s), (tag_r, cap_r) = marg(o["steered"]), marg(o["random"])
        tkl = {"steered": kl(tag_t, tag_s), "random": kl(tag_t, tag_r)}
        ckl = {"steered": kl(cap0, cap_s), "random": kl(cap0, cap_r)}
        metrics[kind] = {
            "tag_kl": {k: v.mean().item() for k, v in tkl.items()},
            "cap_kl": {k: v.mean().item() for k, v in ckl.items()},
            "tag_kl_win_rate": (tkl["steered"] < tkl["random"]).double().mean().item(),
            "cap_kl_win_rate": (ckl["steered"] < ckl["random"]).double().mean().item(),
            "edit_norm_over_resid_norm": (o["edit_norm"] / out["resid_norm"]).mean().item(),
            "probe_after_error": (o["probe_after"] - out["eta_target"]).abs().max().item(),
            "p_misaligned": {"steered": tag_s[:, 1].mean().item(), "random": tag_r[:, 1].mean().item()},
        }
    return metrics


@dataclass
class SteeringConfig:
    """The process, the probe and the evaluation contexts (training: ``toy.config.TrainConfig``)."""

    capability: JsonDict = field(default_factory=lambda: JsonDict({"name": "mess3", "x": 0.05, "a": 0.85}),
                                   metadata={"help": "Capability process spec (toy.processes.make_process); JSON on the command line."})
    switch_prob: float = field(default=0.05, metadata={"help": "Tag flip probability per step."})
    tag_noise: float = field(default=0.1, metadata={"help": "Probability that a token shows the other tag's copy."})
    rhos: list[float] = field(default_factory=lambda: [0.0, 0.5], metadata={"help": "Tag-capability correlation of each trained model."})
    context_length: int = field(default=10, metadata={"help": "Tokens per window, in training, probing and steering."})
    site: str | None = field(default=None, metadata={"help": "Residual site probed and edited (default: the last block's output)."})
    probe_sequences: int = field(default=1000, metadata={"help": "Sequences for fitting the joint-belief probe (all positions)."})
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the probe."})
    n_contexts: int = field(default=1000, metadata={"help": "Held-out windows steered at their last position."})

    def __post_init__(self):
        self.capability = dict(JsonDict(self.capability))
        if "name" not in self.capability:
            raise ValueError("capability must be a process spec with a 'name' key")
        if not self.rhos or any(not 0 <= r <= 1 for r in self.rhos):
            raise ValueError(f"rhos must be a non-empty list in [0, 1], got {self.rhos}")
        if self.n_contexts < 4 or self.probe_sequences < 10:
            raise ValueError("need n_contexts >= 4 and probe_sequences >= 10")


def run_rho(rho: float, cfg: SteeringConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, out_dir: Path, seed: int):
    """Train on ``tagged(capability, rho)``, fit the probe, steer; returns (metrics, per-context outputs)."""
    capability = make_process(cfg.capability["name"], **{k: v for k, v in cfg.capability.items() if k != "name"})
    process = tagged(capability, rho, cfg.switch_prob, cfg.tag_noise)
    model = train_on(process, model_cfg, train_cfg, cfg.context_length, out_dir / "models" / f"rho_{rho}", seed)
    site = cfg.site or default_site(model)
    data = collect(model, process, cfg.context_length, cfg.probe_sequences, seed + 1, sites=[site], batch_size=1024)
    train_rows, test_rows = split_indices(data.X.shape[0], 0.2, seed, data.groups)
    held_out = fit_ridge(data.X[train_rows], data.beliefs[train_rows], cfg.probe_alpha)
    probe_r2 = regression_metrics(data.beliefs[test_rows], held_out.predict(data.X[test_rows].double()))["r2"]
    probe = fit_ridge(data.X, data.beliefs, cfg.probe_alpha)  # all rows: the steering contexts are fresh samples
    tokens = sample(process, cfg.n_contexts, cfg.context_length, seed=seed + 2).tokens
    Xc = data.X.double() - data.X.double().mean(0)
    out = steer_factor(model, process, probe, tokens, site, Xc.T @ Xc / len(Xc), seed)
    return {"process": process.name, "site": site, "probe_test_r2": probe_r2, **steering_metrics(process, out)}, out


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
        a.bar(pos, [x["tag_kl_unsteered"] if kind is None else x[kind]["tag_kl"][which] for x in m], w, label=label, color=f"C{k}")
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
    lines = ["# Factor steering", "",
             "Edits at the probed site, last position: `pinv` = `(eta' - eta_hat) pinv(W)` (minimal Euclidean norm, in the "
             "probe's row space), `covariance` = `(eta' - eta_hat) pinv(W^T C W) W^T C` (minimal Mahalanobis norm under the "
             "activations' covariance C). Control: a random direction of the same norm. KLs in nats, means over contexts; "
             "win rate = share of contexts where the steered KL is below the control's.", "",
             "| rho | probe R^2 | edit | tag KL unsteered | tag KL steered | tag KL random | cap KL steered | cap KL random "
             "| win rate tag / cap | edit / resid norm | S residual (probe) | exact product residual |",
             "|" + "---|" * 12]
    for r, m in metrics["rhos"].items():
        for kind in EDITS:
            e = m[kind]
            t, c = e["tag_kl"], e["cap_kl"]
            lines.append(f"| {r} | {m['probe_test_r2']:.3f} | {kind} | {m['tag_kl_unsteered']:.4f} | {t['steered']:.4f} | "
                         f"{t['random']:.4f} | {c['steered']:.2e} | {c['random']:.2e} | {e['tag_kl_win_rate']:.2f} / "
                         f"{e['cap_kl_win_rate']:.2f} | {e['edit_norm_over_resid_norm']:.2f} | {m['s_residual']:.3f} | "
                         f"{m['exact_product_residual']:.3f} |")
    lines += ["", "The S step is exact when the exact product residual is 0 (independent factors, rho = 0); for rho > 0 "
              "the true beliefs are not products and the steered belief drops that residual.",
              "Both edits make the probe read the target belief exactly (`probe_after_error` in metrics.json); whether the "
              "model's prediction follows is what the tag KL measures.",
              "Plots: `kl.png`, `tag_scatter.png` (target vs model P(misaligned copy) per context).", ""]
    return "\n".join(lines)


def make_parser() -> ConfigParser:
    return ConfigParser((SteeringConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess("toy.experiments.factor_steering", "it trains one small model per rho in turn; on one GPU use configs/accelerate/single_gpu.yaml")
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    # the folder records this config: another config's results are refused (or replaced with --overwrite true)
    out_dir = claim_output_dir(train_cfg.output_dir, config_record(cfg, model_cfg, train_cfg), overwrite=train_cfg.overwrite,
                               ignore=RERUN_KEYS)
    metrics = {"config": {"steering": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)}, "rhos": {}}
    outs = {}
    for k, rho in enumerate(cfg.rhos):
        metrics["rhos"][str(rho)], outs[str(rho)] = run_rho(rho, cfg, model_cfg, train_cfg, out_dir, train_cfg.seed + k)
        m = metrics["rhos"][str(rho)]
        print(f"rho={rho}: tag KL unsteered {m['tag_kl_unsteered']:.4f} | " + " | ".join(
            f"{k}: tag KL steered {m[k]['tag_kl']['steered']:.4f} random {m[k]['tag_kl']['random']:.4f}, cap KL steered "
            f"{m[k]['cap_kl']['steered']:.2e} random {m[k]['cap_kl']['random']:.2e}" for k in EDITS)
            + f" | exact product residual {m['exact_product_residual']:.3f}", flush=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plots(metrics, outs, out_dir)
    (out_dir / "summary.md").write_text(_summary(metrics))
    print(f"wrote {out_dir}/metrics.json, summary.md and plots")
    return metrics


if __name__ == "__main__":
    main()
