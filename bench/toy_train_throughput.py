"""Training throughput of the toy recipe next to the belief-geometry paper's recipe, same machine, same run.

    python bench/toy_train_throughput.py                        # CPU (1 thread), Mess3 model
    python bench/toy_train_throughput.py --device cuda --recipe_batch 4096 --steps 300

Both train the same Mess3 model (configs/toy/mess3.yaml's architecture) with ``toy.train.train``:
* recipe: AdamW, warm-up + cosine, ``--recipe_batch`` windows per step (default 256, the CPU default);
* paper: SGD lr 0.01, batch 64, constant (the belief-geometry paper's settings).
Printed per recipe: training tokens/s (the training loop only, evaluation excluded) and, because
tokens/s alone hides how much each token teaches, the exact validation gap to the floor after the
same number of steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from toy.config import TrainConfig  # noqa: E402
from toy.model import ToyModelConfig, build_model  # noqa: E402
from toy.processes import make_process  # noqa: E402
from toy.train import train  # noqa: E402
from toy.validation import validation_set  # noqa: E402


def run(name: str, cfg: TrainConfig, process, val) -> dict:
    model = build_model(ToyModelConfig(preset="mess3"), process.vocab_size, 10, seed=0)
    result = train(process, model, cfg, 10, val=val)
    h = result.history
    # tokens/s between the first and last log points: excludes start-up and the final evaluation
    rate = (h[-1]["tokens"] - h[0]["tokens"]) / (h[-1]["elapsed_s"] - h[0]["elapsed_s"])
    return {
        "name": name,
        "batch": cfg.per_device_train_batch_size,
        "steps": cfg.max_steps,
        "tokens_per_s": rate,
        "tokens": result.tokens_seen,
        "gap": result.val_loss - result.floor,
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=200, help="Steps of each recipe.")
    ap.add_argument("--recipe_batch", type=int, default=256)
    ap.add_argument("--recipe_lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared machine).")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    process = make_process("mess3")
    val = validation_set(process, 10)
    common = dict(
        max_steps=args.steps,
        logging_steps=max(1, args.steps // 4),
        eval_steps=0,
        save_steps=0,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        sample_chunk=1 if args.device == "cpu" else 32,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = TrainConfig(
            output_dir=f"{tmp}/recipe",
            per_device_train_batch_size=args.recipe_batch,
            optim="adamw_torch",
            learning_rate=args.recipe_lr,
            warmup_steps=min(100, args.steps // 10),
            lr_scheduler_type="cosine",
            **common,
        )
        paper = TrainConfig(
            output_dir=f"{tmp}/paper",
            per_device_train_batch_size=64,
            optim="sgd",
            learning_rate=0.01,
            warmup_steps=0,
            lr_scheduler_type="constant_with_warmup",
            max_grad_norm=0.0,
            **common,
        )
        for name, cfg in (("recipe (AdamW, cosine)", recipe), ("paper (SGD lr 0.01)", paper)):
            rows.append(run(name, cfg, process, val))
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"Mess3 model (4 layers, d_model 64), context 10, {args.steps} steps each, {where}")
    print(f"{'recipe':<24} {'batch':>6} {'tokens/s':>12} {'tokens':>10} {'val gap (nats)':>15}")
    for r in rows:
        print(f"{r['name']:<24} {r['batch']:>6} {r['tokens_per_s']:>12,.0f} {r['tokens']:>10,} {r['gap']:>15.2e}")
    print(f"throughput ratio recipe/paper: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.1f}x")
    return rows


if __name__ == "__main__":
    main()
