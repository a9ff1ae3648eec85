"""The ladder of reweighting references (``toy.ladder``) on an RL family's post-RL policies, and its calibration.

    # the ladder table over GRPO seeds (post-RL models in <runs_dir>/seed<s>/model, from toy.experiments.rl):
    python -m toy.experiments.ladder --config configs/toy/rl_compose.yaml --runs_dir runs/toy_rl/compose --seeds 0 1 2
    # the calibration table: controls whose answer is known, on the family's reference, over 5 prompt sets:
    python -m toy.experiments.ladder --config configs/toy/rl_compose.yaml --runs_dir runs/toy_rl/compose --calibrate_seeds 0 1 2 3 4

Seed ``s`` is judged on its own held-out prompt set ``B_s`` (``n_eval_prompts`` prompts drawn with
``prompt_seed + 1 + 7919 s``; ``B_0`` is the set toy.experiments.rl reports on), with ceilings cross-fitted there
(fold seed ``s``). The calibration builds seed ``s``'s controls from the next set ``B_{s+1}`` (cyclic): its fitted
learners and its ceilings, so no control saw the prompts it is judged on. Thresholds come from ``--thresholds``
(``configs/toy/detector_thresholds.yaml``, committed before the confirmatory runs). Writes ``ladder.json`` and
``ladder.md`` (or ``calibration.json`` / ``calibration.md``) to ``--ladder_dir`` (default ``<runs_dir>/ladder``), and
each set's ceilings to ``ceilings_B<s>.json`` there, reused by a later call with the same fitting choices (judging
needs only the ceilings; the calibration refits, since its controls need the reference's features).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess
from plumbing.stats import mean_ci
from toy.composition import supervised_control
from toy.grpo import RLTaskConfig, ToyGRPOConfig, build_reward, policy_probs, pretrained_model, task_prompts
from toy.ladder import RUNGS, LadderConfig, calibration_controls, ceilings, ladder_verdict, rung_features


@dataclass
class LadderRunConfig:
    """Which post-RL models, which seeds, which thresholds."""

    runs_dir: str = field(
        default="runs/toy_rl/compose", metadata={"help": "Folder with seed<s>/model (toy.experiments.rl's output)."}
    )
    seeds: list[int] = field(
        default_factory=list, metadata={"help": "GRPO seeds to judge (each on its own prompt set B_s)."}
    )
    calibrate_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "Prompt sets of the calibration (>= 2; controls of s come from s+1, cyclic)."},
    )
    thresholds: str = field(
        default="configs/toy/detector_thresholds.yaml", metadata={"help": "The pre-registered LadderConfig YAML."}
    )
    ladder_dir: str | None = field(default=None, metadata={"help": "Output folder (default <runs_dir>/ladder)."})
    supervised_steps: int = field(
        default=1000,
        metadata={
            "help": "Calibration: cross-entropy steps of the supervised composed "
            "control, one per prompt set (0 leaves it out)."
        },
    )

    def __post_init__(self):
        if len(self.calibrate_seeds) == 1:
            raise ValueError("calibrate_seeds needs >= 2 prompt sets: seed s's controls are built on set s+1")
        if self.supervised_steps < 0:
            raise ValueError(
                f"supervised_steps must be >= 0 (0 leaves the supervised control out); got {self.supervised_steps}"
            )


def _fmt(v: dict) -> str:
    """``plumbing.stats.mean_ci``'s mean [95% t-interval], the mean alone for one seed."""
    (lo, hi) = v["ci"]
    return f"{v['mean']:.3f}" if math.isnan(lo) else f"{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


class _Sets:
    """Prompt set ``B_s``, its beliefs, the reference's rung features and its ladder, computed once each."""

    def __init__(self, task, process, reward, pre, cfg, out: Path):
        self.task, self.process, self.reward, self.pre, self.cfg, self.out = task, process, reward, pre, cfg, out
        self.cache = {}

    def __call__(self, s: int, features: bool = False) -> dict:
        if s in self.cache and (self.cache[s]["features"] is not None or not features):
            return self.cache[s]
        prompts, beliefs = task_prompts(
            self.task, self.process, self.task.n_eval_prompts, self.task.prompt_seed + 1 + 7919 * s
        )
        latent, table = self.reward.latent(beliefs), self.reward.table(beliefs)
        fit = {k: v for k, v in asdict(self.cfg).items() if k not in ("margins", "min_reward_gain")}
        path = self.out / f"ceilings_B{s}.json"
        feats = None
        if not features and path.is_file() and json.loads(path.read_text())["fit"] == fit:
            lad = {"rungs": {int(k): v for k, v in json.loads(path.read_text())["rungs"].items()}}
        else:
            feats = rung_features(self.pre, prompts, self.process.vocab_size)
            lad = ceilings(feats, latent, self.reward.matrix, table, self.cfg, seed=s)
            path.write_text(
                json.dumps(
                    {
                        "fit": fit,
                        "n_prompts": len(prompts),
                        "rungs": {
                            k: {kk: vv for kk, vv in r.items() if kk != "r_hat"} for k, r in lad["rungs"].items()
                        },
                    },
                    indent=1,
                )
            )
        self.cache[s] = {
            "prompts": prompts,
            "features": feats,
            "latent": latent,
            "table": table,
            "ladder": lad,
            "pi_ref": policy_probs(self.pre, prompts, self.process.vocab_size),
        }
        return self.cache[s]


def judge_seeds(sets: _Sets, runs_dir: Path, seeds: list[int], cfg: LadderConfig) -> dict:
    """Every seed's ladder report, and the table over seeds."""
    per_seed = []
    for s in seeds:
        b = sets(s)
        post = GPT2LMHeadModel.from_pretrained(runs_dir / f"seed{s}" / "model")
        r_pre = float((b["pi_ref"] * b["table"]).sum(1).mean())
        r_post = float((policy_probs(post, b["prompts"], sets.process.vocab_size) * b["table"]).sum(1).mean())
        v = ladder_verdict(r_pre, r_post, b["ladder"], cfg)
        per_seed.append(
            {
                "seed": s,
                "reward_pre": r_pre,
                "reward_post": r_post,
                "reward_max": float(b["table"].max(1).values.mean()),
                "ceilings": {
                    k: {kk: vv for kk, vv in r.items() if kk != "r_hat"} for k, r in b["ladder"]["rungs"].items()
                },
                **v,
            }
        )
        print(
            f"seed {s}: reward {r_pre:.3f} -> {r_post:.3f}; ceilings "
            f"{[round(r['reward'], 3) for r in b['ladder']['rungs'].values()]}; {v['verdict']}",
            flush=True,
        )
    return {"per_seed": per_seed}


def _ladder_md(name: str, result: dict, cfg: LadderConfig, command: str) -> str:
    ps = result["per_seed"]
    lines = [
        f"# Ladder of reweighting references: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Margins (pre-registered): {cfg.margins}; min reward gain {cfg.min_reward_gain}. "
        f"{len(ps)} seed(s); mean [95% t-interval over seeds].",
        "",
        f"Reward pre -> post: {_fmt(mean_ci([p['reward_pre'] for p in ps]))} -> {_fmt(mean_ci([p['reward_post'] for p in ps]))} "
        f"(max possible {ps[0]['reward_max']:.3f})",
        "",
        "| rung | information a reweighting at this rung uses | ceiling (cross-fitted reward, nested) | this rung's own learners | "
        "best learner (seed 0) | excess of post-RL | beaten |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in RUNGS:
        ceil = mean_ci([p["ceilings"][k]["reward"] for p in ps])
        own = mean_ci([p["ceilings"][k]["own_reward"] for p in ps])
        exc = mean_ci([p["excess"][k] for p in ps])
        lines.append(
            f"| {k} | {RUNGS[k]} | {_fmt(ceil)} | {_fmt(own)} | {ps[0]['ceilings'][k]['learner']} | {_fmt(exc)} | "
            f"{sum(p['beaten'][k] for p in ps)}/{len(ps)} |"
        )
    lines += ["", "| seed | reward post | verdict |", "|---|---|---|"]
    lines += [f"| {p['seed']} | {p['reward_post']:.3f} | {p['verdict']} |" for p in ps]
    return "\n".join(lines) + "\n"


def calibrate(sets: _Sets, seeds: list[int], cfg: LadderConfig, supervised_steps: int = 1000) -> dict:
    """Calibration controls on every prompt set (``toy.ladder.calibration_controls``; with ``supervised_steps``, also
    ``toy.composition.supervised_control`` trained on the RL training prompts with seed s) and false-positive /
    false-negative rates per rung."""
    rows = []
    if supervised_steps:  # the control's training prompts: the RL training set, disjoint from every B_s
        train = task_prompts(sets.task, sets.process, sets.task.n_train_prompts, sets.task.prompt_seed)
    for i, s in enumerate(seeds):
        b, o = sets(s, features=True), sets(seeds[(i + 1) % len(seeds)], features=True)
        supervised = None
        if supervised_steps:
            model = supervised_control(
                sets.pre, sets.process, sets.reward, *train, sets.task.train_modules, steps=supervised_steps, seed=s
            )
            V = sets.process.vocab_size
            supervised = (
                policy_probs(model, b["prompts"], V),
                float((policy_probs(model, o["prompts"], V) * o["table"]).sum(1).mean()),
            )
        for row in calibration_controls(
            b["pi_ref"],
            b["table"],
            b["ladder"],
            o["ladder"],
            o["features"],
            o["latent"],
            b["features"],
            sets.reward.matrix,
            cfg,
            supervised=supervised,
        ):
            rows.append(row | {"seed": s, "ceilings": {k: r["reward"] for k, r in b["ladder"]["rungs"].items()}})
    rates = {}
    for k in RUNGS:
        neg = [r for r in rows if r["known"][k] is False]
        pos = [r for r in rows if r["known"][k] is True]
        rates[k] = {
            "negatives": len(neg),
            "false_positives": sum(r["beaten"][k] for r in neg),
            "positives": len(pos),
            "false_negatives": sum(not r["beaten"][k] for r in pos),
            "max_negative_excess": max((r["reward"] - r["ceilings"][k] for r in neg), default=float("nan")),
            "min_positive_excess": min((r["reward"] - r["ceilings"][k] for r in pos), default=float("nan")),
        }
    return {"rows": rows, "rates": rates}


def _calibration_md(name: str, cal: dict, cfg: LadderConfig, command: str, n_sets: int) -> str:
    lines = [
        f"# Calibration of the ladder: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"Margins: {cfg.margins}. {n_sets} prompt sets; every control is built on the next set, judged on its own.",
        "",
        "| rung | negatives (known: not beyond) | false positives | largest negative excess | positives (known: beyond) | "
        "false negatives | smallest positive excess |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in cal["rates"].items():
        lines.append(
            f"| {k} | {r['negatives']} | {r['false_positives']} ({r['false_positives'] / max(r['negatives'], 1):.0%}) | "
            f"{r['max_negative_excess']:.3f} | {r['positives']} | {r['false_negatives']} "
            f"({r['false_negatives'] / max(r['positives'], 1):.0%}) | {r['min_positive_excess']:.3f} |"
        )
    names = list(dict.fromkeys(r["control"] for r in cal["rows"]))
    lines += ["", "| control | reward (mean over sets) | verdicts |", "|---|---|---|"]
    for n in names:
        rs = [r for r in cal["rows"] if r["control"] == n]
        verdicts = {v: sum(r["verdict"] == v for r in rs) for v in dict.fromkeys(r["verdict"] for r in rs)}
        lines.append(f"| {n} | {sum(r['reward'] for r in rs) / len(rs):.3f} | {verdicts} |")
    ceil = {k: mean_ci([r["ceilings"][k] for r in cal["rows"] if r["control"] == "reference"]) for k in RUNGS}
    lines += [
        "",
        "Reference ceilings over the prompt sets: " + "; ".join(f"rung {k} {_fmt(v)}" for k, v in ceil.items()),
    ]
    return "\n".join(lines) + "\n"


def make_parser() -> ConfigParser:
    return ConfigParser((RLTaskConfig, ToyGRPOConfig, LadderRunConfig), description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess("toy.experiments.ladder", "it fits the ladder's learners in one process")
    torch.set_num_threads(int(os.environ.get("TOY_RL_THREADS", torch.get_num_threads())))
    task, _, which = make_parser().parse_args_and_config(argv)
    (cfg,) = ConfigParser((LadderConfig,)).parse_args_and_config(["--config", which.thresholds])
    process = task.build_process()
    reward = build_reward(task, process)
    pre, pre_path = pretrained_model(task, process, 0)
    runs_dir = Path(which.runs_dir)
    out = Path(which.ladder_dir or runs_dir / "ladder")
    out.mkdir(parents=True, exist_ok=True)
    sets = _Sets(task, process, reward, pre.eval(), cfg, out)
    command = "python -m toy.experiments.ladder " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"thresholds": asdict(cfg), "reference": str(pre_path), "reward": reward.__name__, "process": process.name}
    if which.calibrate_seeds:
        cal = calibrate(sets, which.calibrate_seeds, cfg, which.supervised_steps)
        (out / "calibration.json").write_text(json.dumps(result | cal, indent=1, default=str))
        (out / "calibration.md").write_text(
            _calibration_md(reward.__name__, cal, cfg, command, len(which.calibrate_seeds))
        )
        print((out / "calibration.md").read_text())
        result["calibration"] = cal
    if which.seeds:
        judged = judge_seeds(sets, runs_dir, which.seeds, cfg)
        (out / "ladder.json").write_text(json.dumps(result | judged, indent=1, default=str))
        (out / "ladder.md").write_text(_ladder_md(f"{reward.__name__} on {process.name}", judged, cfg, command))
        print((out / "ladder.md").read_text())
        result |= judged
    return result


if __name__ == "__main__":
    main()
