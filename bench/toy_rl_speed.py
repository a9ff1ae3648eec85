"""Reward reached per second: two GRPO recipes from the same pre-trained model, side by side.

    python bench/toy_rl_speed.py --budget_s 2700           # rl_compose, seed 0, level 0.80: TRL's path vs one-token path
    python bench/toy_rl_speed.py --seed 1 --budget_s 2700 --out runs/bench/toy_rl_speed_seed1 \
        --new "--max_steps 1000 --per_device_train_batch_size 64 --learning_rate 0.001 --one_token_path generate"

By default both recipes are today's (configs/toy/rl_compose.yaml: 1000 steps of 64 prompts x 4, lr 1e-3): ``--old``
through TRL's own sampling and scoring (``--one_token_path generate``: HF generate and full-sequence forwards over
every copy of a prompt), ``--new`` through ``ToyGRPOTrainer``'s one-token path (``--one_token_path forward``, the
configs' default: the same algorithm, one forward per distinct prompt), so the ratio is the wall-clock saving alone.

Each recipe is one ``python -m toy.experiments.rl`` run (the composition report off) with its own overrides
(``--old``, ``--new``) on top of ``--config``; both start at the same moment as two processes with one torch
thread each, so on a shared machine both see the same load. Their clocks are ``toy.grpo.ExactRewardCallback``'s
(training wall-clock seconds, the exact-reward evaluations themselves excluded: a measurement, not the recipe).
Printed: for each recipe the seconds per step, the seconds to reach ``--level`` exact expected reward on the
fixed eval prompts (linear between evaluation points), the reward each had at the other's finishing time, and
the final exact reward on all ``n_eval_prompts``; then the ratio of times to the level (old / new). Pick the
level before running. Nothing is asserted: the numbers depend on the machine and its load.

``--budget_s`` stops a recipe still running after that many wall seconds (a busy machine can make today's
recipe take hours); its curve so far is read from ``exact_reward_curve.jsonl``, it has no final reward, and if
it had not reached the level its time to it is reported as "more than its last time stamp" (the ratio is then
a lower bound). When one recipe finishes first the other gets more of the CPU from then on, which favours the
slower recipe: the ratio is conservative.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# today's recipe (configs/toy/rl_compose.yaml): 1000 steps of 64 prompts x 4, lr 1e-3, through TRL's own path
OLD = (
    "--max_steps 1000 --per_device_train_batch_size 256 --num_generations 4 --learning_rate 0.001 "
    "--lr_scheduler_type linear --logging_steps 1 --exact_eval_every 25 --one_token_path generate"
)
# the same recipe through ToyGRPOTrainer's one-token path (the same draws and loss, fewer forwards; README "RL speed")
NEW = OLD.replace("--one_token_path generate", "--one_token_path forward")


def time_to_level(seconds: list[float], curve: list[list[float]], level: float) -> float:
    """First time the exact reward reaches ``level``, linear between evaluation points; inf if never."""
    rewards = [r for _, r in curve]
    for i, r in enumerate(rewards):
        if r >= level:
            if i == 0:
                return 0.0
            t0, t1, r0 = seconds[i - 1], seconds[i], rewards[i - 1]
            return t0 + (t1 - t0) * (level - r0) / (r - r0)
    return float("inf")


def reward_at(seconds: list[float], curve: list[list[float]], t: float) -> float:
    """The exact reward of the last evaluation at or before ``t`` seconds."""
    return [r for s, (_, r) in zip(seconds, curve) if s <= t][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy/rl_compose.yaml")
    parser.add_argument(
        "--pretrained",
        default="runs/toy_rl/pretrain_mess3_rrxor/seed0/checkpoint-3000",
        help="the pre-trained model both recipes start from (never pre-trained here)",
    )
    parser.add_argument("--seed", type=int, default=0, help="GRPO seed of both recipes")
    parser.add_argument("--level", type=float, default=0.80, help="exact reward level whose time to reach is compared")
    parser.add_argument("--old", default=OLD, help="overrides of the reference recipe")
    parser.add_argument("--new", default=NEW, help="overrides of the faster recipe")
    parser.add_argument("--out", default="runs/bench/toy_rl_speed")
    parser.add_argument(
        "--budget_s", type=float, default=None, help="stop a recipe still running after this many wall seconds"
    )
    args = parser.parse_args(argv)
    if not (Path(args.pretrained) / "model.safetensors").is_file():
        sys.exit(
            f"{args.pretrained} holds no model.safetensors: run `python -m toy.experiments.rl --config {args.config}` once "
            "(it pre-trains the RL vocabulary's model, process tokens + <eos> + <pad>, into the config's pretrain_dir), "
            "or pass --pretrained <that checkpoint>"
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOY_RL_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    for name, extra in (("old", args.old), ("new", args.new)):
        out = Path(args.out) / name
        cmd = [
            sys.executable,
            "-m",
            "toy.experiments.rl",
            "--config",
            args.config,
            "--pretrained_path",
            args.pretrained,
            "--seed",
            str(args.seed),
            "--report",
            "false",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out),
            *shlex.split(extra),
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        log = open(out.parent / f"{name}.log", "w")  # beside the run folder, which the run claims (plumbing.runs)
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), cmd, log)
    t0 = time.perf_counter()
    while any(p.poll() is None for p, _, _ in procs.values()):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            for p, _, _ in procs.values():
                if p.poll() is None:
                    p.terminate()
                    p.wait()
            break
        time.sleep(2)
    wall = time.perf_counter() - t0
    rows, m = {}, {}
    for name, (p, cmd, _) in procs.items():
        out = Path(args.out) / name
        finished = p.returncode == 0 and (out / "metrics.json").is_file()
        if p.returncode not in (0, -15):  # -15: stopped at the budget
            sys.exit(f"recipe {name} failed (exit {p.returncode}); see {out.parent / f'{name}.log'}")
        points = [json.loads(line) for line in (out / "exact_reward_curve.jsonl").read_text().splitlines()]
        m[name] = {
            "seconds": [q["seconds"] for q in points],
            "curve": [[q["step"], q["reward"]] for q in points],
            "final": json.loads((out / "metrics.json").read_text())["reward_after"] if finished else None,
            "cmd": cmd,
            "finished": finished,
        }
    end = {name: r["seconds"][-1] for name, r in m.items()}
    reach = {name: time_to_level(r["seconds"], r["curve"], args.level) for name, r in m.items()}
    # not reached: at least the run's last time stamp (a lower bound on the time, an upper bound on the speed)
    bound = {name: reach[name] if reach[name] != float("inf") else end[name] for name in m}
    other = {"old": "new", "new": "old"}
    for name, r in m.items():
        sec, curve = r["seconds"], r["curve"]
        rows[name] = {
            "command": " ".join(r["cmd"][1:]),
            "finished": r["finished"],
            "last_step": curve[-1][0],
            "train_seconds": end[name],
            "seconds_per_step": end[name] / max(1, curve[-1][0]),
            "seconds_to_level": reach[name],
            "reached_level": reach[name] != float("inf"),
            "reward_gain_per_second_to_level": (args.level - curve[0][1]) / bound[name]
            if bound[name] > 0
            else float("nan"),
            f"reward_at_{other[name]}_end": reward_at(sec, curve, end[other[name]]),
            "reward_start": curve[0][1],
            "reward_last_curve": curve[-1][1],
            "reward_final_all_eval_prompts": r["final"],
        }
    if not rows["new"]["reached_level"]:
        ratio, ratio_kind = float("nan"), "none (the new recipe never reached the level)"
    else:
        ratio = bound["old"] / reach["new"]
        ratio_kind = (
            "measured"
            if rows["old"]["reached_level"]
            else "lower bound (the old recipe had not reached the level when stopped)"
        )
    result = {
        "config": args.config,
        "seed": args.seed,
        "level": args.level,
        "wall_seconds": wall,
        "budget_s": args.budget_s,
        "recipes": rows,
        "time_to_level_ratio_old_over_new": ratio,
        "ratio_kind": ratio_kind,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{args.config}, GRPO seed {args.seed}, both recipes side by side ({wall:.0f} s wall); level {args.level}")
    fmt = lambda x: "not finished" if x is None else f"{x:.4f}"  # noqa: E731
    for name, r in rows.items():
        reached = f"{r['seconds_to_level']:.0f} s" if r["reached_level"] else f"not within {r['train_seconds']:.0f} s"
        print(
            f"  {name}: {r['last_step']} steps{'' if r['finished'] else ' (stopped at the budget)'}, {r['seconds_per_step']:.3f} s/step, "
            f"{r['train_seconds']:.0f} s of training; reaches {args.level}: {reached} "
            f"({r['reward_gain_per_second_to_level']:.2e} reward/s); exact reward at the {other[name]} recipe's last time stamp "
            f"{r[f'reward_at_{other[name]}_end']:.3f}; last curve point {r['reward_last_curve']:.3f}; "
            f"final exact reward (all eval prompts) {fmt(r['reward_final_all_eval_prompts'])}"
        )
        print(f"     {r['command']}")
    print(
        f"RESULT time to reward {args.level}: old / new = {ratio:.2f}x ({ratio_kind}); final reward old "
        f"{fmt(rows['old']['reward_final_all_eval_prompts'])}, new {fmt(rows['new']['reward_final_all_eval_prompts'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
