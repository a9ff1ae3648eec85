"""Recompute a pipeline run's last-block probe MSE independently and compare it with the reported one.

    python bench/check_exact_probe.py --run runs/mess3          # after `make run`

Shares nothing with the pipeline's probe code (``toy.collect``, ``probes``): the windows and their probabilities
come from ``toy.beliefs.enumerate_sequences`` and ``belief_states`` (the world itself), the last block's output
from a plain forward hook on the saved checkpoint, and the probe from numpy's weighted least squares over every
(window, position) row -- 177,147 rows for Mess3 at context 10, duplicated prefixes and all. Prints both numbers
and their relative difference; exits 1 when they differ by more than ``--tolerance`` (default 5%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from toy.beliefs import belief_states, enumerate_sequences
from toy.processes import make_process


def weighted_mse(X: np.ndarray, Y: np.ndarray, w: np.ndarray, fit: np.ndarray, score: np.ndarray) -> float:
    """Weighted least squares with intercept fitted on the rows ``fit`` (bool), its weighted MSE per coordinate on ``score``."""
    design = np.hstack([X, np.ones((len(X), 1))])
    root = np.sqrt(w[fit])[:, None]
    coef, *_ = np.linalg.lstsq(design[fit] * root, Y[fit] * root, rcond=None)
    resid = design[score] @ coef - Y[score]
    return float((w[score][:, None] * resid**2).sum(0).mean() / w[score].sum())


def last_block_rows(model: GPT2LMHeadModel, block: int, tokens: torch.Tensor) -> np.ndarray:
    """``(N * L, d_model)`` float64: block ``block``'s output at every position, row ``n * L + t``."""
    captured = []
    handle = model.transformer.h[block].register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for i in range(0, len(tokens), 4096):
            model(input_ids=tokens[i : i + 4096])
    handle.remove()
    return torch.cat(captured).double().numpy().reshape(-1, model.config.n_embd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/mess3", help="the pipeline's output_dir (metrics.json, the checkpoint)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference that passes")
    parser.add_argument(
        "--split_seeds",
        type=int,
        default=5,
        help="also print the old metric (fit on 80%% of windows, score the other 20%%) for this many split seeds",
    )
    args = parser.parse_args(argv)
    metrics = json.loads((Path(args.run) / "metrics.json").read_text())
    data = metrics["config"]["data"]
    process = make_process(data["process"], **data["process_kwargs"])
    length = data["context_length"] - 1  # the pipeline probes the positions whose outputs are trained
    tokens, probs = enumerate_sequences(process, length, max_sequences=10**6)
    beliefs = belief_states(process, tokens).numpy()
    model = GPT2LMHeadModel.from_pretrained(metrics["training"]["checkpoint"]).eval()
    head = metrics["probe_headline"]
    block = int(head["final_layer_site"].removeprefix("block"))
    X = last_block_rows(model, block, tokens)
    Y, w = beliefs.reshape(len(X), -1), np.repeat(probs.numpy(), length)
    every = np.ones(len(X), dtype=bool)
    mine = weighted_mse(X, Y, w, every, every)
    for seed in range(args.split_seeds):  # whole windows on one side, as the old pipeline split them
        test = np.repeat(np.random.default_rng(seed).random(len(tokens)) < 0.2, length)
        print(f"  old metric, split seed {seed}: held-out 20% of windows {weighted_mse(X, Y, w, ~test, test):.3e}")
    reported = head["final_layer_test_mse"]
    rel = abs(reported - mine) / mine
    print(
        f"{head['final_layer_site']} probe MSE: reported by the pipeline ({head.get('probe_evaluation', 'held_out')}) "
        f"{reported:.6e}; independent numpy population fit over {len(tokens):,} windows x {length} positions {mine:.6e}; "
        f"relative difference {rel:.2%} ({'PASS' if rel <= args.tolerance else 'FAIL'} at {args.tolerance:.0%})"
    )
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
