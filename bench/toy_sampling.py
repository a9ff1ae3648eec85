"""Throughput of toy sampling and exact beliefs: vectorized code vs a naive per-token reference, and the
depth-12 Mess3 mixed-state presentation.

    python bench/toy_sampling.py                  # 1 and 2 threads side by side, ~30 s on a quiet 2-core machine
    python bench/toy_sampling.py --threads 1 --repeats 7

Rows (Mess3(0.05, 0.85), all on CPU):
  sample+beliefs f32 / f64   ``toy.data.sample(..., return_beliefs=True, belief_dtype=...)``, batch x length
  sample tokens f32          the same without storing beliefs
  belief_states f64          ``toy.beliefs.belief_states`` of given tokens (the exact filter)
  naive sample+beliefs       per-sequence, per-token Python/numpy loop (the reference implementations' way), small batch
  naive belief filter        per-sequence, per-token numpy filter, small batch
Each number is the median of ``--repeats`` runs, in tokens per wall-clock second and tokens per CPU-second
of this process (all its threads). With 1 thread on an idle core the two agree; when other jobs share the
cores the wall figure drops and tokens per CPU-second estimates what one free core would do.
On a shared, oversubscribed machine 2 threads can be several times slower than 1 (threads wait on each
other at every step's barrier), so both settings are run.
Targets: >= 1e7 tokens/s for Mess3 sampling with beliefs; MSP depth 12 < 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from toy.beliefs import belief_states, mixed_state_presentation
from toy.data import sample
from toy.processes import mess3


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def naive_sample(T: np.ndarray, pi: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    """One sequence and one token at a time: P(x) = eta T[x] 1, draw, eta <- eta T[x] / P(x)."""
    emit = T.sum(-1).T  # (S, V)
    tokens = np.empty((batch, length), dtype=np.int64)
    beliefs = np.empty((batch, length, T.shape[1]))
    for b in range(batch):
        eta = pi.copy()
        for t in range(length):
            px = eta @ emit
            x = min(int(np.searchsorted(np.cumsum(px), rng.random() * px.sum(), side="right")), len(px) - 1)
            v = eta @ T[x]
            eta = v / v.sum()
            tokens[b, t], beliefs[b, t] = x, eta
    return tokens, beliefs


def naive_filter(T: np.ndarray, pi: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    beliefs = np.empty((*tokens.shape, T.shape[1]))
    for b in range(tokens.shape[0]):
        eta = pi.copy()
        for t in range(tokens.shape[1]):
            v = eta @ T[tokens[b, t]]
            eta = v / v.sum()
            beliefs[b, t] = eta
    return beliefs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts to run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (median reported)")
    parser.add_argument("--batch", type=int, default=16384, help="vectorized batch size")
    parser.add_argument("--length", type=int, default=64, help="sequence length")
    parser.add_argument("--naive-batch", type=int, default=64, help="batch of the naive reference")
    args = parser.parse_args()
    for threads in [int(t) for t in args.threads.split(",")]:
        run(threads, args)
        print()


def run(threads: int, args) -> None:
    torch.set_num_threads(threads)
    p = mess3(0.05, 0.85)
    B, L, nb = args.batch, args.length, args.naive_batch
    tokens = sample(p, B, L, seed=0).tokens
    T, pi = p.T.numpy(), p.stationary.numpy()
    rng = np.random.default_rng(0)
    naive_tokens = tokens[:nb].numpy()

    rows = [
        ("sample+beliefs f32", B * L, lambda: sample(p, B, L, seed=1, return_beliefs=True, belief_dtype=torch.float32)),
        ("sample+beliefs f64", B * L, lambda: sample(p, B, L, seed=1, return_beliefs=True)),
        ("sample tokens f32", B * L, lambda: sample(p, B, L, seed=1, belief_dtype=torch.float32)),
        ("belief_states f64", B * L, lambda: belief_states(p, tokens)),
        ("naive sample+beliefs", nb * L, lambda: naive_sample(T, pi, nb, L, rng)),
        ("naive belief filter", nb * L, lambda: naive_filter(T, pi, naive_tokens)),
    ]
    print(
        f"Mess3(0.05, 0.85) on CPU, torch {torch.__version__}, {threads} thread(s) of {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; vectorized batch {B} x {L}, naive {nb} x {L}; "
        f"median of {args.repeats}"
    )
    print(f"{'':22s} {'tokens/s (wall)':>16s} {'tokens/CPU-s':>16s}")
    speed = {}
    for name, n_tokens, fn in rows:
        wall, cpu = timed(fn, args.repeats)
        speed[name] = (n_tokens / wall, n_tokens / max(cpu, 1e-9))
        print(f"{name:22s} {speed[name][0]:16.3e} {speed[name][1]:16.3e}")
    for fast, slow in [
        ("sample+beliefs f32", "naive sample+beliefs"),
        ("sample+beliefs f64", "naive sample+beliefs"),
        ("belief_states f64", "naive belief filter"),
    ]:
        print(
            f"ratio {fast} / {slow}: x{speed[fast][0] / speed[slow][0]:,.0f} (wall), "
            f"x{speed[fast][1] / speed[slow][1]:,.0f} (CPU)"
        )
    wall, cpu = timed(lambda: mixed_state_presentation(p, 12), max(3, args.repeats // 2))
    n = mixed_state_presentation(p, 12).n_nodes
    print(f"MSP depth 12: {n:,} nodes in {wall:.2f} s wall ({cpu:.2f} CPU-s); target < 2 s")
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(
        f"targets: >= 1e7 tokens/s sampling with beliefs (f32, wall) {met(speed['sample+beliefs f32'][0] >= 1e7)}; "
        f"(f64, wall) {met(speed['sample+beliefs f64'][0] >= 1e7)}; MSP < 2 s {met(wall < 2)}"
    )


if __name__ == "__main__":
    main()
