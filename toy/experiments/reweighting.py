"""The pass@k reweighting report (``toy.reweighting``) on an RL family's seeds, its known-answer controls, and the
agreement table of the report against the ladder (``toy.ladder``, read from the family's ``ladder.json``).

    python -m toy.experiments.reweighting --config configs/toy/rl_compose.yaml --runs_dir runs/toy_rl/compose --seeds 0 1 2
    python -m toy.experiments.reweighting --config configs/toy/rl_segments.yaml --runs_dir runs/toy_rl/segments --seeds 0 1 2

Seed ``s`` is judged on the ladder's prompt set ``B_s`` (``n_eval_prompts`` prompts drawn with ``prompt_seed + 1 +
7919 s``), so its pass@k verdict and its ladder verdict see the same prompts; its reference is
``toy.grpo.pretrained_model`` for that seed (an existing pre-training only: a missing one is an error, never a
retraining), its post-RL policy ``<runs_dir>/seed<s>/model`` (a seed without ``model.safetensors`` is skipped and
said so). Controls (``--controls true``) are built on set ``B_c`` (``--control_set c``) from the reference alone:
the reference itself, the reference sharpened to ``sharpen_temperature`` (same support: known reweighting), and
``toy.ladder.control_policies`` built from the next set ``B_{c+1}`` (reweightings by each rung's learner, latent
mixtures capped below / lifted above each rung's ceiling, the exact-latent optimum), each judged by the ladder too
(ceilings from ``<ladder_dir>/ceilings_B<c>.json`` when the ladder wrote them with the same fitting choices, else
fitted here). The pass@k thresholds are ``probes.passk.PassKConfig``'s defaults (pre-registered, not options here).

Writes ``report.json``, ``report.md`` and ``passk_seed<s>.png`` / ``passk_control_<name>.png`` to ``--out_dir``
(default ``<runs_dir>/passk``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from plumbing.config import ConfigParser
from plumbing.runs import refuse_multiprocess
from probes.passk import PassKConfig, plot_pass_at_k
from toy.grpo import RLTaskConfig, ToyGRPOConfig, build_reward, policy_probs, pretrained_model, task_prompts
from toy.ladder import LadderConfig, ceilings, control_policies, ladder_verdict, rung_features
from toy.reweighting import (
    ExactReweightingConfig,
    agreement,
    behaviour_report,
    reweighting_report,
    verdict_class,
    with_temperature,
)


@dataclass
class ReweightingRunConfig:
    """Which post-RL models, which controls, where the ladder's verdicts are."""

    runs_dir: str = field(
        default="runs/toy_rl/compose", metadata={"help": "Folder with seed<s>/model (toy.experiments.rl's output)."}
    )
    seeds: list[int] = field(
        default_factory=list, metadata={"help": "GRPO seeds to report (each on the ladder's prompt set B_s)."}
    )
    controls: bool = field(
        default=True, metadata={"help": "Also report the known-answer controls built on the reference."}
    )
    control_set: int = field(
        default=0, metadata={"help": "Prompt set B_c of the controls (built from B_{c+1}); its reference is seed c's."}
    )
    thresholds: str = field(
        default="configs/toy/detector_thresholds.yaml",
        metadata={"help": "The ladder's pre-registered LadderConfig YAML (judges the controls)."},
    )
    ladder_dir: str | None = field(
        default=None,
        metadata={"help": "The family's ladder folder (ladder.json, ceilings_B<s>.json); default <runs_dir>/ladder."},
    )
    out_dir: str | None = field(default=None, metadata={"help": "Output folder (default <runs_dir>/passk)."})


def reference(task: RLTaskConfig, process, seed: int, cache: dict):
    """Seed ``seed``'s pre-trained reference and its folder, only if it exists (``pretrained_model`` would otherwise
    train one); loaded once per pre-training seed into ``cache`` (the RL configs share one across GRPO seeds)."""
    pre_seed = seed if task.pretrain_seed is None else task.pretrain_seed
    if not task.pretrained_path:
        folder = Path(task.pretrain_dir) / f"seed{pre_seed}"
        if not any(folder.glob("checkpoint-*/model.safetensors")):
            raise FileNotFoundError(
                f"no pre-trained reference in {folder}: this report never trains one; run toy.experiments.rl first"
            )
    key = (task.pretrained_path, task.pretrain_dir, pre_seed)
    if key not in cache:
        cache[key] = pretrained_model(task, process, seed)
    return cache[key]


def prompt_set(task, process, reward, s: int) -> dict:
    prompts, beliefs = task_prompts(task, process, task.n_eval_prompts, task.prompt_seed + 1 + 7919 * s)
    return {"prompts": prompts, "beliefs": beliefs, "latent": reward.latent(beliefs), "table": reward.table(beliefs)}


def set_ladder(b: dict, pre, ladder_dir: Path, s: int, reward, lcfg: LadderConfig) -> tuple[dict, dict]:
    """Set ``B_s``'s rung features and ladder ceilings: the ladder's saved ceilings when fitted with these choices."""
    feats = rung_features(pre, b["prompts"], reward.matrix.shape[1])
    fit = {k: v for k, v in asdict(lcfg).items() if k not in ("margins", "min_reward_gain")}
    path = ladder_dir / f"ceilings_B{s}.json"
    if path.is_file() and json.loads(path.read_text())["fit"] == fit:
        return feats, {"rungs": {int(k): v for k, v in json.loads(path.read_text())["rungs"].items()}}
    print(f"no saved ceilings for B{s} in {ladder_dir}: fitting them (minutes)", flush=True)
    return feats, ceilings(feats, b["latent"], reward.matrix, b["table"], lcfg, seed=s)


def _known(name: str, known: dict | None) -> str:
    """What a control is known to be, in words."""
    if name == "reference":
        return "no change (pass@1 gain 0: inconclusive)"
    if name == "sharpened":
        return "reweighting: support within the reference's in both decodings; reads only pi_ref(.|x)"
    if name.startswith("reweight_rung"):
        return f"reweighting of pi_ref by rung-{name[-1]} information (not beyond rung {name[-1]}); full support within the reference's"
    beyond = [k for k, v in (known or {}).items() if v is True]
    within = [k for k, v in (known or {}).items() if v is False]
    if name.startswith("capped_rung"):
        return f"reads the latent, capped: not beyond rung {min(within)}"
    if name.startswith("above_rung"):
        return (
            f"reads the latent: beyond rung {max(beyond)}"
            if beyond
            else "reads the latent (no room above the ceiling: unknown)"
        )
    return "reads the latent (exact optimum: pi_ref restricted to the rewarded answers)" + (
        f"; beyond rung {max(beyond)}" if beyond else ""
    )


def controls(
    task, process, reward, cfg: ExactReweightingConfig, lcfg: LadderConfig, ladder_dir: Path, c: int, refs: dict
) -> list[dict]:
    pre, _ = reference(task, process, c, refs)
    b, o = prompt_set(task, process, reward, c), prompt_set(task, process, reward, c + 1)
    feats, lad = set_ladder(b, pre, ladder_dir, c, reward, lcfg)
    o_feats, o_lad = set_ladder(o, pre, ladder_dir, c + 1, reward, lcfg)
    pi_ref = policy_probs(pre, b["prompts"], reward.matrix.shape[1])
    policies = [("sharpened", with_temperature(pi_ref, cfg.sharpen_temperature), None)]
    policies += control_policies(pi_ref, b["table"], o_lad, o_feats, o["latent"], feats, reward.matrix, lcfg)
    r_ref = float((pi_ref * b["table"]).sum(1).mean())
    rows = []
    for name, pi, known in policies:
        beh = behaviour_report(pi_ref, pi, b["table"], cfg, seed=c)
        lv = ladder_verdict(r_ref, beh["reward_post"], lad, lcfg)
        rows.append(
            {
                "name": name,
                "set": c,
                "known": _known(name, known),
                "known_rungs": known,
                "behaviour": beh,
                "ladder_verdict": lv["verdict"],
            }
        )
        print(
            f"control {name}: reward {r_ref:.3f} -> {beh['reward_post']:.3f}; pass@k {beh['full']['verdict']} / "
            f"top-p {beh['truncated']['verdict']}; ladder {lv['verdict']}",
            flush=True,
        )
    return rows


def _row(name: str, beh: dict, ladder: str | None, known: str) -> str:
    f, t = beh["full"], beh["truncated"]
    return (
        f"| {name} | {beh['reward_ref']:.3f} -> {beh['reward_post']:.3f} | {f['gain_k1']:+.3f} | {f['verdict']} "
        f"(only post {f['only_post']:.3f}, chance@{f['k_max']} {f['chance_k_max']:.2f}) | {t['verdict']} (gap "
        f"{t['gap_k_max']:+.3f}, only post {t['only_post']:.3f}, ref unsolvable {t['ref_unsolvable']:.3f}; {t['outside_support']}) | {ladder or 'not run'} | "
        f"{agreement(f['verdict'], ladder)} | {agreement(t['verdict'], ladder)} | {known} |"
    )


def _ci(curve: dict, j: int) -> str:
    return f"{curve['mean'][j]:.3f} [{curve['lo'][j]:.3f}, {curve['hi'][j]:.3f}]"


def report_md(name: str, result: dict, command: str) -> str:
    pk, dec = result["passk_thresholds"], result["config"]
    lines = [
        f"# pass@k reweighting report: {name}",
        "",
        f"Command: `{command}`",
        "",
        f"pass@k thresholds (probes.passk.PassKConfig defaults, pre-registered): {pk}. Truncated decoding: temperature "
        f"{dec['decode_temperature']}, top-p {dec['decode_top_p']}. Every number is exact over the prompts (one-token policies); "
        "'chance' is uniform guessing over the V answers.",
        "",
        "## Agreement table (pass@k verdict vs ladder verdict)",
        "",
        "| policy | reward ref -> post | pass@1 gain | pass@k, full support | pass@k, truncated | ladder | agree (full) | "
        "agree (truncated) | known answer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["seeds"]:
        lines.append(_row(f"seed {s['seed']}", s["report"], s["ladder_verdict"], "not known (GRPO)"))
    for c in result.get("controls", []):
        lines.append(_row(f"control: {c['name']} (B{c['set']})", c["behaviour"], c["ladder_verdict"], c["known"]))
    lines += [
        "",
        "'agree': both verdicts take a side (outside the reference's support ~ composition beyond some rung; not sharper ~ reweighting "
        "within rung 1) and it is the same one; n/a when either is inconclusive or uninformative.",
        "",
        "## Seeds: likelihood, KL, belief side",
        "",
        "| seed | E_post log pi_ref | E_ref log pi_ref | post mass outside ref's top-p support | KL(post||ref) | KL(ref||post) | "
        "latent read-out pre: all sites / output site | post: all / output | gain at output site |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["seeds"]:
        r, a = s["report"], s["report"]["readability"]["balanced_accuracy"]
        lines.append(
            f"| {s['seed']} | {r['loglik_post_under_ref']:.3f} | {r['loglik_ref_under_ref']:.3f} | "
            f"{r['post_mass_outside_ref_support']:.3f} | {r['kl_post_ref']:.3f} | {r['kl_ref_post']:.3f} | "
            f"{a['pre_all_sites']:.3f} / {a['pre_output_site']:.3f} | {a['post_all_sites']:.3f} / {a['post_output_site']:.3f} | "
            f"{s['report']['readability']['gain_output_site']:+.3f} |"
        )
    k_max = pk["ks"][-1]
    lines += [
        "",
        f"pass@1 and pass@{k_max}, mean [95% bootstrap CI over prompts]:",
        "",
        f"| seed | decoding | pass@1 ref | pass@1 post | pass@{k_max} ref | pass@{k_max} post | pass@{k_max} chance | crossover k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["seeds"]:
        for dec_name, sec in (
            ("full", s["report"]["full"]),
            (f"top-p {dec['decode_top_p']}", s["report"]["truncated"]),
        ):
            c = sec["curves"]
            lines.append(
                f"| {s['seed']} | {dec_name} | {_ci(c['reference'], 0)} | {_ci(c['post-RL'], 0)} | {_ci(c['reference'], -1)} | "
                f"{_ci(c['post-RL'], -1)} | {_ci(c['chance'], -1) if 'chance' in c else '--'} | {sec['crossover_k'] or '--'} |"
            )
    if result["skipped"]:
        lines += ["", "Skipped (no post-RL model): " + ", ".join(map(str, result["skipped"]))]
    lines += ["", f"Wall time: {result['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _plot(beh: dict, path: Path, title: str) -> None:
    top_p = beh["decoding"]["top_p"]
    curves = dict(beh["full"]["curves"]) | {f"{k} (top-p {top_p})": v for k, v in beh["truncated"]["curves"].items()}
    plot_pass_at_k(curves, path, title)


def make_parser() -> ConfigParser:
    return ConfigParser(
        (RLTaskConfig, ToyGRPOConfig, ExactReweightingConfig, ReweightingRunConfig), description=__doc__
    )


def main(argv: list[str] | None = None) -> dict:
    refuse_multiprocess("toy.experiments.reweighting", "it reports exact policies in one process")
    torch.set_num_threads(int(os.environ.get("TOY_RL_THREADS", torch.get_num_threads())))
    t0 = time.perf_counter()
    task, _, cfg, which = make_parser().parse_args_and_config(argv)
    (lcfg,) = ConfigParser((LadderConfig,)).parse_args_and_config(["--config", which.thresholds])
    process = task.build_process()
    reward = build_reward(task, process)
    runs_dir = Path(which.runs_dir)
    ladder_dir = Path(which.ladder_dir or runs_dir / "ladder")
    out = Path(which.out_dir or runs_dir / "passk")
    out.mkdir(parents=True, exist_ok=True)
    ladder_file = ladder_dir / "ladder.json"
    ladder = (
        {p["seed"]: p["verdict"] for p in json.loads(ladder_file.read_text())["per_seed"]}
        if ladder_file.is_file()
        else {}
    )
    command = "python -m toy.experiments.reweighting " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "family": f"{reward.__name__} on {process.name}",
        "passk_thresholds": asdict(PassKConfig()),
        "config": asdict(cfg),
        "ladder_json": str(ladder_file) if ladder else None,
        "command": command,
        "seeds": [],
        "skipped": [],
    }
    refs = {}
    for s in which.seeds:
        if not (runs_dir / f"seed{s}" / "model" / "model.safetensors").is_file():
            print(f"seed {s}: no post-RL model in {runs_dir / f'seed{s}' / 'model'}: skipped", flush=True)
            result["skipped"].append(s)
            continue
        pre, pre_path = reference(task, process, s, refs)
        post = GPT2LMHeadModel.from_pretrained(runs_dir / f"seed{s}" / "model")
        b = prompt_set(task, process, reward, s)
        rep = reweighting_report(pre, post, reward, b["prompts"], b["beliefs"], cfg, seed=s)
        result["seeds"].append(
            {
                "seed": s,
                "reference": str(pre_path),
                "report": rep,
                "ladder_verdict": ladder.get(s),
                "ladder_class": verdict_class(ladder[s]) if s in ladder else None,
            }
        )
        _plot(rep, out / f"passk_seed{s}.png", f"{reward.__name__}, seed {s}")
        print(
            f"seed {s}: reward {rep['reward_ref']:.3f} -> {rep['reward_post']:.3f}; pass@k {rep['full']['verdict']} / top-p "
            f"{rep['truncated']['verdict']}; ladder {ladder.get(s)}",
            flush=True,
        )
    if which.controls:
        result["controls"] = controls(task, process, reward, cfg, lcfg, ladder_dir, which.control_set, refs)
        for c in result["controls"]:
            _plot(c["behaviour"], out / f"passk_control_{c['name']}.png", f"{reward.__name__}, control {c['name']}")
    result["wall_s"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report_md(result["family"], result, command))
    print((out / "report.md").read_text())
    return result


if __name__ == "__main__":
    main()
