"""GPU recipe: Mess3 trained to the floor and probed, inside a fixed time budget on one GPU.

    python bench/toy_gpu_recipe.py --out $OUT                 # one H100: ~2.5 minutes wall, all included
    python bench/toy_gpu_recipe.py --out /tmp/smoke --smoke   # CPU end-to-end check in about a minute

Target (configs/toy/mess3_gpu.yaml): exact validation loss within 2e-4 nats of the 0.80352 floor and
last-block probe test MSE <= 3.9e-4 (the belief-geometry paper's number), training + probing <= 5 minutes.

Measured on one H100 (bench/README.md, bench/results/): 6,367 steps of 4,096 windows (3.7M tokens/s) in 71 s,
exact loss gap 1.6e-5 nats, last-block probe MSE 6.4e-5 (held-out), 97 s wall in all. The default CPU run (3,000
steps x 256 windows = 7.7e6 tokens) already reaches gap 2.0e-4 and last-block probe MSE 1.5e-4.

How: first ``calibration_steps`` steps of the real trainer are timed (after warm-up), then ``steps`` is
set so that training fills ``--train_seconds``, and ``toy.experiments.pipeline.run_pipeline`` trains (cosine schedule
over exactly those steps), probes every window on the GPU and writes the run folder in ``--work``.
The small files (metrics.json, summary.md, the three PNGs, probe_final.json, recipe.json) are copied
to ``--out`` (default ``$OUT``, else runs/mess3_gpu_recipe); the last lines printed are the numbers.

Imports: torch, transformers, accelerate, numpy, safetensors, matplotlib, pyyaml, tqdm (all on the GPU
image) and trl for the config parser. nnsight is optional: without it ``probes.activations`` reads the
residual stream with forward hooks (same sites).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from probes.activations import reader  # noqa: E402
from toy.experiments.pipeline import make_parser, run_pipeline  # noqa: E402
from toy.model import build_model  # noqa: E402
from toy.train import set_cpu_threads, train  # noqa: E402

# tiny CPU settings; context 6 keeps the validation and probe sets enumerated, as on the GPU
SMOKE = [
    "--preset",
    "mess3_small",
    "--context_length",
    "6",
    "--per_device_train_batch_size",
    "64",
    "--sample_chunk",
    "4",
    "--warmup_steps",
    "5",
    "--eval_steps",
    "0",
    "--logging_steps",
    "10",
    "--target_mse",
    "1",
    "--use_cpu",
    "true",
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/toy/mess3_gpu.yaml"))
    ap.add_argument(
        "--out", default=os.environ.get("OUT") or "runs/mess3_gpu_recipe", help="Folder for the small result files."
    )
    ap.add_argument("--work", default="/tmp/toy_gpu_recipe", help="Run folder (checkpoint and all outputs).")
    ap.add_argument("--train_seconds", type=float, default=75.0, help="Wall-clock budget of the training loop.")
    ap.add_argument("--calibration_steps", type=int, default=200, help="Timed steps that set the step count.")
    ap.add_argument("--smoke", action="store_true", help="Tiny CPU settings: checks the script end to end.")
    args, overrides = ap.parse_known_args(argv)
    if args.smoke:
        overrides = SMOKE + overrides
        args.train_seconds, args.calibration_steps = min(args.train_seconds, 10.0), 20
    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data_cfg, model_cfg, train_cfg, probe_cfg = make_parser().parse_args_and_config(
        ["--config", args.config, *overrides]
    )
    set_cpu_threads(train_cfg)
    print(
        f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() and not train_cfg.use_cpu else 'cpu'}; "
        f"reader: {reader()}; start-up {time.perf_counter() - T_START:.1f} s",
        flush=True,
    )

    # 1. calibrate: the real trainer, same batch and sampler, timed between two log points after warm-up
    calib = replace(
        train_cfg,
        max_steps=args.calibration_steps,
        logging_steps=args.calibration_steps // 2,
        eval_steps=0,
        save_steps=0,
        disable_tqdm=True,
        output_dir=str(work / "calibration"),
        resume_from_checkpoint=None,
    )
    process = data_cfg.build()
    model = build_model(model_cfg, process.vocab_size, data_cfg.context_length, seed=train_cfg.seed)
    hist = train(process, model, calib, data_cfg.context_length).history
    step_s = (hist[1]["elapsed_s"] - hist[0]["elapsed_s"]) / (hist[1]["step"] - hist[0]["step"])
    steps = max(args.calibration_steps, int(0.95 * args.train_seconds / step_s))
    n_evals = steps // train_cfg.eval_steps if train_cfg.eval_steps else 1
    print(
        f"calibration: {step_s * 1e3:.2f} ms/step at batch {train_cfg.per_device_train_batch_size} "
        f"({train_cfg.per_device_train_batch_size * data_cfg.context_length / step_s:,.0f} tokens/s) -> {steps} steps, {n_evals} evals",
        flush=True,
    )
    shutil.rmtree(work / "calibration", ignore_errors=True)

    # 2. the run
    train_cfg.max_steps, train_cfg.output_dir = steps, str(work)
    train_cfg.warmup_steps = min(train_cfg.warmup_steps, steps // 10)
    metrics = run_pipeline(data_cfg, model_cfg, train_cfg, probe_cfg)
    total = time.perf_counter() - T_START
    h = metrics["probe_headline"]
    recipe = {
        "total_wall_s": total,
        "calibration_ms_per_step": step_s * 1e3,
        "steps": steps,
        "batch_size": train_cfg.per_device_train_batch_size,
        "tokens": metrics["training"]["tokens"],
        "train_s": metrics["training"]["elapsed_s"],
        "tokens_per_s": metrics["training"]["tokens_per_s"],
        "probe_s": metrics["probe_data"]["elapsed_s"],
        "val_loss": metrics["val_loss"],
        "floor": metrics["floor"],
        "gap": metrics["gap"],
        "final_layer_test_mse": h["final_layer_test_mse"],
        "final_layer_ratio_to_random_init": h["final_layer_ratio_to_random_init"],
        "checks": metrics["checks"],
        "device": metrics["training"]["device"],
        "reader": metrics["probe_data"]["reader"],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "metrics.json",
        "summary.md",
        "belief_simplex.png",
        "probe_mse_by_layer.png",
        "val_loss.png",
        "probe_final.json",
    ):
        shutil.copy(work / name, out / name)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    print(
        f"RESULT device={recipe['device']} steps={steps} tokens={recipe['tokens']:,} train={recipe['train_s']:.0f}s "
        f"probe={recipe['probe_s']:.0f}s total_wall={total:.0f}s"
    )
    print(
        f"RESULT val_loss={metrics['val_loss']:.6f} floor={metrics['floor']:.6f} gap={metrics['gap']:.2e} "
        f"final_layer_probe_test_mse={h['final_layer_test_mse']:.3e} ratio_to_random_init={h['final_layer_ratio_to_random_init']:.4f}"
    )
    print(
        "RESULT checks: "
        + ", ".join(f"{k}={'PASS' if ok else 'FAIL'}" for k, (ok, _) in metrics["checks"].items())
        + f", within_5_minutes={'PASS' if total <= 300 else 'FAIL'}"
    )
    return recipe


if __name__ == "__main__":
    main()
