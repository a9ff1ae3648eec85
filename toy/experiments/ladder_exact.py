"""Exact rung-1/2 ceilings of an RL family against its optimum, and the ladder's calibration there: the reference is
the Bayes-optimal one (the process's own next-token distribution after every prefix, ``toy.ladder.exact_output_features``),
so no training is involved and the headroom a family leaves above rung 2 is known before any GRPO run.

    python -m toy.experiments.ladder_exact --config configs/toy/rl_headroom.yaml
    python -m toy.experiments.ladder_exact --config configs/toy/rl_compose.yaml   # (b): rung 2 sits near the optimum

On two prompt sets ``B_0``, ``B_1`` (``n_prompts`` each, drawn with ``prompt_seed + 1 + 7919 s`` as the ladder's):
the rung-1/2 ceilings (``toy.ladder.ceilings``: cross-fitted, the best of several learners), the optimum (the exact
latent's reward, ``max_y r``), the reference's reward, and whether optimum - ceiling_2 exceeds rung 2's margin
(``--thresholds``). Calibration (``toy.ladder.calibration_controls`` on ``B_0``, built from ``B_1``): reweightings
by each rung's learner (must beat no rung at or above theirs), latent mixtures capped below / lifted above each
ceiling, the optimum: a positive control that beats rung 2 must exist for a GRPO verdict above rung 2 to mean
anything. Rungs 3-4 read a trained reference's activations and are not part of this exact check.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from plumbing.config import ConfigParser
from toy.data import sample
from toy.grpo import RLTaskConfig, ToyGRPOConfig, build_reward
from toy.ladder import LadderConfig, calibration_controls, ceilings, exact_output_features


def exact_set(task: RLTaskConfig, process, reward, n: int, s: int, cfg: LadderConfig) -> dict:
    """Prompt set ``B_s``: exact features, latent, rewards, the Bayes-optimal reference policy and its ladder."""
    batch = sample(process, n, task.prompt_length, seed=task.prompt_seed + 1 + 7919 * s, return_beliefs=True)
    last = batch.beliefs[:, -1]
    feats = exact_output_features(process, batch.beliefs)
    table, latent = reward.table(last), reward.latent(last)
    pi_ref = feats[1].double().exp()
    pi_ref = pi_ref / pi_ref.sum(1, keepdim=True)
    return {
        "features": feats,
        "latent": latent,
        "table": table,
        "pi_ref": pi_ref,
        "ladder": ceilings(feats, latent, reward.matrix, table, cfg, seed=s),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="an RL family's YAML (configs/toy/rl_*.yaml)")
    ap.add_argument(
        "--thresholds", default="configs/toy/detector_thresholds.yaml", help="the ladder's pre-registered LadderConfig"
    )
    ap.add_argument("--n_prompts", type=int, default=4000, help="prompts per set")
    ap.add_argument("--out", default=None, help="JSON of the result")
    a = ap.parse_args(argv)
    t0 = time.time()
    task, _ = ConfigParser((RLTaskConfig, ToyGRPOConfig)).parse_args_and_config(
        ["--config", a.config, "--output_dir", "/tmp/unused"]
    )
    (cfg,) = ConfigParser((LadderConfig,)).parse_args_and_config(["--config", a.thresholds])
    process = task.build_process()
    reward = build_reward(task, process)
    sets = [exact_set(task, process, reward, a.n_prompts, s, cfg) for s in (0, 1)]
    out = {
        "config": a.config,
        "family": f"{reward.__name__} on {process.name}",
        "n_prompts": a.n_prompts,
        "margins": cfg.margins,
        "sets": [],
    }
    for s, b in enumerate(sets):
        r = {
            "set": s,
            "reward_ref": float((b["pi_ref"] * b["table"]).sum(1).mean()),
            "optimum": float(b["table"].max(1).values.mean()),
            "ceilings": {
                k: {"reward": v["reward"], "learner": v["learner"], "by_learner": v["by_learner"]}
                for k, v in b["ladder"]["rungs"].items()
            },
            "latent_share": float(b["latent"].double().mean()),
        }
        r["headroom_above_rung2"] = r["optimum"] - r["ceilings"][2]["reward"]
        r["headroom_exceeds_margin"] = r["headroom_above_rung2"] > cfg.margins[1]
        out["sets"].append(r)
        print(
            f"B{s}: reference {r['reward_ref']:.3f}, rung 1 {r['ceilings'][1]['reward']:.3f} ({r['ceilings'][1]['learner']}), rung 2 "
            f"{r['ceilings'][2]['reward']:.3f} ({r['ceilings'][2]['learner']}), optimum {r['optimum']:.3f}: headroom above rung 2 "
            f"{r['headroom_above_rung2']:+.3f} ({'>' if r['headroom_exceeds_margin'] else '<='} margin {cfg.margins[1]})",
            flush=True,
        )
    b0, b1 = sets
    rows = calibration_controls(
        b0["pi_ref"],
        b0["table"],
        b0["ladder"],
        b1["ladder"],
        b1["features"],
        b1["latent"],
        b0["features"],
        reward.matrix,
        cfg,
    )
    out["calibration"] = rows
    print(
        "\n| control (on B0, built from B1) | reward | known beyond rung 1 / 2 | beaten rung 1 / 2 | ladder verdict (rungs 1-2 only) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        kn = " / ".join({True: "yes", False: "no", None: "?"}[r["known"][k]] for k in (1, 2))
        bt = " / ".join("yes" if r["beaten"][k] else "no" for k in (1, 2))
        print(f"| {r['control']} | {r['reward']:.3f} | {kn} | {bt} | {r['verdict']} |")
    wrong = [
        r["control"] for r in rows for k in (1, 2) if r["known"][k] is not None and r["known"][k] != r["beaten"][k]
    ]
    out["calibration_errors"] = wrong
    out["positive_beyond_rung2"] = [r["control"] for r in rows if r["known"][2] is True and r["beaten"][2]]
    out["wall_s"] = round(time.time() - t0, 1)
    print(
        f"\ncalibration errors (known answer != ladder's): {wrong or 'none'}; positive controls that beat rung 2: "
        f"{out['positive_beyond_rung2'] or 'none'}; {out['wall_s']} s"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
