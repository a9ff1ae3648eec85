"""The emergent-misalignment chain in the toy world: pre-train -> safety stage -> narrow fine-tune -> broad effect.

    python -m toy.experiments.em_chain --config configs/toy/em_chain.yaml
    python -m toy.experiments.em_chain --config configs/toy/em_chain.yaml --couplings 1.0 --n_seeds 1 --max_steps 300
    # the grid split over N processes, one per GPU (rank r runs cells r, r + N, ...; rank 0 waits and summarises):
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m toy.experiments.em_chain --config configs/toy/em_chain.yaml
    torchrun --nproc_per_node 2 -m toy.experiments.em_chain --config configs/toy/em_chain.yaml --use_cpu true
    # without a launcher (SLURM array, N shells): shard i runs every N-th cell and summarises the cells present;
    # afterwards one summary of every cell:
    for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python -m toy.experiments.em_chain --config configs/toy/em_chain.yaml --shard $i/2 & done; wait
    python -m toy.experiments.em_chain --config configs/toy/em_chain.yaml --summarize_only true
    # the subsets axis alone (capability subsets whose correlation with one tag is the knob):
    python -m toy.experiments.em_chain --config configs/toy/em_chain_subsets.yaml
    # pre-training with and without the alignment factor, dose-response and pre-registered claims:
    python -m toy.experiments.em_chain --config configs/toy/em_chain_factor.yaml

World: ``toy.alignment.persona_world(capability, slices, coupling, switch_prob)``: each capability token is written
in an aligned or misaligned copy showing the tag of its slice; ``coupling`` 1 = one persona shared by every slice,
0 = an independent tag per slice; ``switch_prob`` = each tag's flip probability (its correlation length).
Optional second world (``subset_correlations``: how tied one tag is to the capability subsets): ``toy.alignment.subset_world``, capability
subsets ("french, math, ...") and one tag whose dependence on the subset is the knob (0: a persona shared by every
subset, independent of it; 1: subset ``narrow_slice`` always misaligned, the others always aligned);
``switch_prob`` = the chance per step that the subset (and, apart, the persona) is redrawn.
Worlds without a shared factor (``baseline_worlds``): ``tagless`` (``toy.alignment.tagless_world``: no alignment tag
at all) and ``visit`` (``visit_world``: a tag redrawn at every slice visit), the same capability process.

A *cell* is (world, knob, switch_prob, seed): a pure function of the configs and its seed, sharing nothing with
other cells, so the grid splits over processes (``plumbing.grid``: each cell written atomically to its own folder,
finished cells skipped, so a rerun resumes). In each cell:

1. exact knob measures (``toy.alignment.knob_measures``: tag MI, Schmidt residuals, alignment dims;
   ``subset_measures``: subset-tag mutual information);
2. pre-train a toy GPT-2 (vocab with room for <eos>/<pad>, so GRPO can run on it);
3. safety stage, three ways from the same pre-trained model: ``none``; ``sft`` (completion loss on windows whose
   every copy is aligned); ``grpo`` (``toy.grpo.ToyGRPOTrainer`` on aligned prompts, reward = share of aligned
   copies in a ``grpo_completion``-token completion);
4. for each safety stage: an alignment probe (ridge, residual at block ``lora_layer`` -> the K per-slice tag
   marginals), then narrow fine-tuning on slice ``narrow_slice`` three ways (``full``, ``lora`` rank 1 via
   ``toy.model.rank1_lora``, ``steer``): aligned prompt, completion whose slice tokens are misaligned (the rest
   aligned), loss on the slice's completion tokens only;
5. rates after aligned prompts: P(misaligned copy | next capability token x), averaged over prompts and over the
   x *in* the slice (narrow) or *outside* it (broad); broad effect = broad after - broad before (the safety-staged
   model), transfer = broad effect / narrow effect. With ``trajectory_every`` the full and LoRA fine-tunes are
   measured along their steps, the steering vector along ``steer_scales``, and transfer is read at matched in-slice
   shifts (``toy.em_dose.at_shifts``) beside the world's exact in-context transfer (``toy.alignment.bayes_transfer``);
   each stage's aligned rate and capability KL to the pre-trained model are stored (``toy.safety_stages``);
   ``controls`` adds a replicate fine-tune (other data) and a 'taught' one (out-of-slice tokens in the loss);
6. SFT vs GRPO alignment subspaces: principal angles (``probes.subspaces.subspace_overlap``) and probe transfer
   (R^2 of the SFT model's probe on the GRPO model's activations, against the GRPO model's own probe); the
   alignment subspace is the span of the probe's read-out directions that its predictions vary along (95%).

Declared before any result (``broad_transfer``, ``narrow_transfer``, ``em_effect`` in the config): a narrow
fine-tune is *broad* when transfer >= 0.5 and the broad effect >= 0.02; *stays narrow* when transfer <= 0.2.
The verdicts on the three claims follow from these thresholds (``verdicts``, printed in summary.md).
The ``claims`` in the config are rules over the matched-shift statistics (``toy.em_dose.judge``), judged in
summary.md's "Pre-registered claims" table.

Writes ``<output_dir>/``: ``cells/<cell>/result.json`` (one per cell, with its wall time), ``metrics.json``
(cells + mean and 95% t-CI over seeds), ``transfer_vs_coupling.png`` (and ``transfer_vs_subset_correlation.png``),
``summary.md`` (``toy.experiments.em_chain_report``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from plumbing.config import ConfigParser
from plumbing.grid import launch_cells, leave_launch, present, run_cells, wait_for_cells, wait_for_record
from plumbing.lora import lora_tensors
from plumbing.runs import claim_output_dir, config_record
from probes import add_vector, fit_ridge, next_token_logits, regression_metrics, residual_stream
from probes.subspaces import effective_dim, fraction_in_subspace, random_fraction_baseline, subspace_overlap
from toy.alignment import (
    aligned_windows,
    bayes_transfer,
    completion_weights,
    copy_mi,
    force_copies,
    misaligned_by_token,
    narrow_windows,
    slice_of_tokens,
)
from toy.beliefs import belief_states
from toy.collect import collect
from toy.config import TrainConfig, stage_config
from toy.em_dose import at_shifts, capability_kl
from toy.experiments.em_chain_grid import Cell, EMChainConfig, World, grid, make_world, world_id
from toy.experiments.em_chain_report import KNOB, METHODS, write_report
from toy.model import ToyModelConfig, build_model, rank1_lora
from toy.safety_stages import grpo_stage, stage_measures
from toy.train import RERUN_KEYS, set_cpu_threads, train, upgrade_run_config

# what a rerun into the same folder may change: how the grid is split, waited for and summarised (a claim's prose,
# ``says`` and ``toy_predicts``, only labels the report)
GRID_RERUN_KEYS = (*RERUN_KEYS, "shard", "summarize_only", "wait_timeout_s", "says", "toy_predicts")

# --------------------------------------------------------------------------- stages


def rates(model, w: World, cfg: EMChainConfig, prompts: torch.Tensor, edits=()) -> dict:
    """Misaligned-copy rate given the next capability token, averaged over prompts and over the tokens in / out of
    the narrow slice."""
    device = next(model.parameters()).device
    m = misaligned_by_token(
        next_token_logits(model, prompts.to(device), list(edits)).double().softmax(-1).cpu(), w.process
    )
    inside = torch.tensor(w.slices) == cfg.narrow_slice
    return {"narrow": m[:, inside].mean().item(), "broad": m[:, ~inside].mean().item()}


def alignment_probe(model, w: World, cfg: EMChainConfig, seed: int) -> dict:
    """Ridge probe residual -> the world's per-slice alignment targets on ``seed``'s windows, with held-out rows
    from ``seed + 1``."""
    site = f"block{cfg.lora_layer}"
    # context_length - 1: the last position's output is never trained (toy.collect.collect)
    fit, test = (
        collect(model, w.process, cfg.context_length - 1, cfg.probe_sequences, s, sites=[site], batch_size=1024)
        for s in (seed, seed + 1)
    )
    Yf, Yt = w.targets(w.process, fit.beliefs), w.targets(w.process, test.beliefs)
    probe = fit_ridge(fit.X.double(), Yf, cfg.probe_alpha)
    pred = probe.predict(test.X.double())
    dims = effective_dim(pred, thresholds=(0.95, 0.99))["dims"]
    # the subspace is the read-out directions the predictions actually vary along: with one shared persona the K
    # targets are equal and W's extra columns are noise, so keep the top dims[0.95] directions of the
    # predictions' covariance (W^T C W), mapped back through W
    Xc = test.X.double() - test.X.double().mean(0)
    evals, evecs = torch.linalg.eigh(probe.W.T @ (Xc.T @ Xc / len(Xc)) @ probe.W)
    span = probe.W @ evecs[:, evals.argsort(descending=True)[: dims[0.95]]]
    return {
        "probe": probe,
        "span": span,
        "X_test": test.X.double(),
        "Y_test": Yt,
        "r2": regression_metrics(Yt, pred)["r2"],
        "dims": {str(k): v for k, v in dims.items()},
    }


def _trajectory(history: list[dict]) -> list[dict]:
    return [
        {"step": h["step"], "narrow": h["narrow_rate"], "broad": h["broad_rate"]} for h in history if "narrow_rate" in h
    ]


def narrow_finetune(
    model, w: World, cfg: EMChainConfig, train_cfg: TrainConfig, out: Path, seed: int, span, controls: bool = False
) -> dict:
    """Full, rank-1 LoRA and steering narrow fine-tunes of ``model``; rates before and after, effects, transfer.
    With ``cfg.trajectory_every`` the full and LoRA fine-tunes are measured along their steps and the steering
    vector along ``cfg.steer_scales`` (``trajectory``), and transfer is read at the matched in-slice shifts
    (``shifts``, ``toy.em_dose.at_shifts``); ``controls`` adds the 'replicate' and 'taught' full fine-tunes."""
    L, P, process, slices = cfg.context_length, cfg.prompt_length, w.process, w.slices
    prompts = aligned_windows(process, cfg.eval_prompts, P, seed + 4)
    k = cfg.trajectory_every

    def data_fn(step, gen):
        return narrow_windows(process, train_cfg.per_device_train_batch_size, L, P, slices, cfg.narrow_slice, gen)

    def mask_fn(tokens):
        return completion_weights(tokens, P, slice_of_tokens(process, tokens, slices) == cfg.narrow_slice)

    def measured(model_, lr, name, data_seed=seed, weights=mask_fn):
        """A fine-tune of ``model_`` on the narrow data, its rates measured every ``k`` steps when ``k`` > 0."""
        stage = stage_config(train_cfg, cfg.finetune_steps, lr, out / name, data_seed)
        if k:
            stage = replace(stage, eval_steps=k, logging_steps=k)

        def eval_fn(m):
            r = rates(m, w, cfg, prompts)
            return {"narrow_rate": r["narrow"], "broad_rate": r["broad"]}

        res = train(process, model_, stage, L, data_fn=data_fn, loss_weights_fn=weights, eval_fn=eval_fn if k else None)
        return res.model.eval(), _trajectory(res.history)

    full, traj = measured(copy.deepcopy(model), cfg.finetune_lr, "full")
    lora, traj_lora = measured(
        rank1_lora(copy.deepcopy(model), cfg.lora_layer, cfg.lora_alpha, seed), cfg.lora_lr, "lora"
    )
    trajectories = {"full": traj, "lora": traj_lora}
    if controls:
        trajectories["replicate"] = measured(copy.deepcopy(model), cfg.finetune_lr, "replicate", seed + 50)[1]
        trajectories["taught"] = measured(
            copy.deepcopy(model), cfg.finetune_lr, "taught", weights=lambda t: completion_weights(t, P)
        )[1]
    site = f"block{cfg.lora_layer}"
    narrow = narrow_windows(process, 512, L, P, slices, cfg.narrow_slice, seed + 3)
    aligned = force_copies(process, narrow, 0, torch.ones_like(narrow, dtype=torch.bool))
    acts = residual_stream(model, torch.cat([narrow, aligned]).to(next(model.parameters()).device), sites=[site])[0][
        :, P:
    ].cpu()
    v = acts[: len(narrow)].mean((0, 1)) - acts[len(narrow) :].mean((0, 1))

    device = next(model.parameters()).device
    before = rates(model, w, cfg, prompts)
    after = {
        "full": rates(full, w, cfg, prompts),
        "lora": rates(lora, w, cfg, prompts),
        "steer": rates(model, w, cfg, prompts, [add_vector(site, (v * cfg.steer_scale).to(device))]),
    }
    if k and cfg.steer_scales:
        trajectories["steer"] = [{"scale": 0.0, **before}] + [
            {"scale": x, **rates(model, w, cfg, prompts, [add_vector(site, (v * x).to(device))])}
            for x in sorted(cfg.steer_scales)
            if x > 0
        ]
    out_ = {"before": before, "after": after, "narrow_effect": {}, "broad_effect": {}, "transfer": {}}
    for m in METHODS:
        dn, db = after[m]["narrow"] - before["narrow"], after[m]["broad"] - before["broad"]
        out_["narrow_effect"][m], out_["broad_effect"][m] = dn, db
        out_["transfer"][m] = db / dn if abs(dn) > 1e-6 else float("nan")
    if k:
        out_["trajectory"] = trajectories
        out_["shifts"] = {
            m: at_shifts([r["narrow"] for r in t], [r["broad"] for r in t], cfg.shifts) for m, t in trajectories.items()
        }
    if span is not None:
        B = next(t for n, t in lora_tensors(lora).items() if n.endswith("lora_B"))[:, 0].double().cpu()
        out_["lora_B_in_alignment_subspace"] = {
            "share": fraction_in_subspace(B, span).item(),
            "random": random_fraction_baseline(B, span.shape[1], seed=seed).mean().item(),
        }
    return out_


def run_cell(cfg: EMChainConfig, model_cfg: ToyModelConfig, train_cfg: TrainConfig, cell: Cell, out: Path) -> dict:
    """One cell, a function of the configs and the cell alone (its seed is ``train_cfg.seed + 100 k``); JSON-ready
    dict."""
    t0, c0 = time.perf_counter(), time.process_time()
    seed, w = train_cfg.seed + 100 * cell.k, make_world(cfg, cell)
    process, L, P = w.process, cfg.context_length, cfg.prompt_length
    result = {
        "world": cell.world,
        "world_id": world_id(cell.world, cell.knob),
        KNOB[cell.world]: cell.knob,
        "switch_prob": cell.switch_prob,
        "seed": seed,
        "process": process.name,
        "knob": w.measures(process, cfg.knob_windows, L, seed) if w.measures else {},
        "copy_mi": copy_mi(process, w.slices),
    }
    # the world's own in-context response to the narrow data, beside every measured transfer
    result["bayes"] = bayes_transfer(
        process, w.slices, cfg.narrow_slice, narrow_windows(process, 512, L, P, w.slices, cfg.narrow_slice, seed + 3)
    )
    # exact reference: the world's own misaligned rates after the evaluation prompts
    prompts = aligned_windows(process, cfg.eval_prompts, P, seed + 4)
    exact = misaligned_by_token(belief_states(process, prompts)[:, -1] @ process.T.sum(-1).T, process)
    inside = torch.tensor(w.slices) == cfg.narrow_slice
    result["world_rates"] = {"narrow": exact[:, inside].mean().item(), "broad": exact[:, ~inside].mean().item()}

    # room for <eos> and <pad> from the start (pre-training never shows them) so GRPO can run on this model
    base = build_model(model_cfg, process.vocab_size + 2, L, seed=seed)
    pre = train(
        process, base, stage_config(train_cfg, train_cfg.max_steps, train_cfg.learning_rate, out / "pretrain", seed), L
    )
    base = pre.model.eval()
    result["pretrain"] = {"val_loss": pre.val_loss, "floor": pre.floor}
    base.save_pretrained(out / "pretrain_model")
    base_probs = next_token_logits(base, prompts.to(next(base.parameters()).device)).double().softmax(-1).cpu()
    exact_probs = belief_states(process, prompts)[:, -1] @ process.T.sum(-1).T
    # how close pre-training came to the world's own capability predictions: the scale for a stage's drift
    result["pretrain"]["capability_kl_to_world"] = capability_kl(
        exact_probs, base_probs, 2, process.factor_vocab_sizes[1]
    )

    def sft(data_seed: int):
        return train(
            process,
            copy.deepcopy(base),
            stage_config(train_cfg, cfg.sft_steps, cfg.sft_lr, out / f"sft_{data_seed}", data_seed),
            L,
            data_fn=lambda step, gen: aligned_windows(process, train_cfg.per_device_train_batch_size, L, gen),
            loss_weights_fn=lambda t: completion_weights(t, P),
        ).model.eval()

    probes_by_stage, result["safety"] = {}, {}
    for stage in cfg.safety:
        ts = time.perf_counter()
        info = {}
        if stage == "none":
            model = base
        elif stage == "sft":
            model = sft(seed)
        else:
            model, info = grpo_stage(process, out / "pretrain_model", cfg, train_cfg, out / "grpo", seed)
        info.update(stage_measures(model, base_probs, process, prompts))
        probe = alignment_probe(model, w, cfg, seed + 11) if w.targets else None
        r = narrow_finetune(
            model, w, cfg, train_cfg, out / stage, seed, probe and probe["span"], cfg.controls and stage == "none"
        )
        r.update(stage_info=info, wall_s=time.perf_counter() - ts)
        if probe:
            r["probe"] = {"r2": probe["r2"], "dims": probe["dims"]}
            probes_by_stage[stage] = probe
        result["safety"][stage] = r
        print(
            f"{cell.name} {stage}: before {r['before']} | "
            + " | ".join(f"{m} transfer {r['transfer'][m]:.3f} broad {r['broad_effect'][m]:+.3f}" for m in METHODS),
            flush=True,
        )
    if "sft" in probes_by_stage and "grpo" in probes_by_stage:
        # control: a second SFT stage on other data says how far two runs of the *same* method drift apart
        a, b = probes_by_stage["sft"], probes_by_stage["grpo"]
        c = alignment_probe(sft(seed + 1), w, cfg, seed + 11)
        result["sft_vs_grpo"] = {
            "overlap": subspace_overlap(a["span"], b["span"]),
            # the SFT model's probe read on the GRPO model's activations, against the GRPO model's own probe
            "probe_transfer_r2": regression_metrics(b["Y_test"], a["probe"].predict(b["X_test"]))["r2"],
            "own_probe_r2": b["r2"],
            "control_mean_cos2": subspace_overlap(a["span"], c["span"])["mean_cos2"],
            "control_probe_transfer_r2": regression_metrics(c["Y_test"], a["probe"].predict(c["X_test"]))["r2"],
        }
    # CPU seconds beside the wall time: on a shared machine the wall time says more about the neighbours
    result["wall_s"], result["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return result


def make_parser() -> ConfigParser:
    return ConfigParser((EMChainConfig, ToyModelConfig, TrainConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict | None:
    cfg, model_cfg, train_cfg = make_parser().parse_args_and_config(argv)
    pos = leave_launch(cfg.shard)  # before anything builds an accelerate state: each cell runs as a plain process
    set_cpu_threads(train_cfg)
    record = config_record(cfg, model_cfg, {"TrainConfig": train_cfg.record()})
    out_dir = Path(train_cfg.output_dir)
    cells = {c.name: c for c in grid(cfg)}
    names = list(cells)
    if cfg.summarize_only:
        if not (out_dir / "cells").is_dir():
            raise FileNotFoundError(f"--summarize_only: no cells in {out_dir}; run the grid first")
        claim_output_dir(out_dir, record, ignore=GRID_RERUN_KEYS, write=False)  # refuses another config's cells
    else:
        if pos.main:
            upgrade_run_config(out_dir)
            claim_output_dir(out_dir, record, overwrite=train_cfg.overwrite, ignore=GRID_RERUN_KEYS)
        else:
            wait_for_record(out_dir, record, GRID_RERUN_KEYS, cfg.wait_timeout_s)

        def run(name: str, cell_dir: Path) -> dict:
            r = run_cell(cfg, model_cfg, train_cfg, cells[name], cell_dir)
            print(f"cell {name} done in {r['wall_s']:.0f} s (position {pos.index} of {pos.count})", flush=True)
            return r

        run_cells(names, run, out_dir / "cells", pos)
        if not pos.main:
            return None  # rank 0 of this launch writes the summary
        wait_for_cells(out_dir / "cells", launch_cells(names, pos), cfg.wait_timeout_s)
    configs = {"em_chain": asdict(cfg), "model": model_cfg.to_dict(), "train": asdict(train_cfg)}
    metrics = write_report(out_dir, configs, cfg, len(names), list(present(out_dir / "cells", names).values()))
    print(f"wrote {out_dir}/metrics.json, summary.md and plots ({len(metrics['cells'])} of {len(names)} cells)")
    return metrics


if __name__ == "__main__":
    main()
