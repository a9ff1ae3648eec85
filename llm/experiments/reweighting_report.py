"""``llm.experiments.reweighting``'s output files: ``report.json``, ``samples.jsonl`` (every decoded reply with its score),
``verdict_data.json`` (per-prompt correct counts and the log-likelihoods of the correct post-RL replies: all any
verdict reads), ``passk.png`` and ``report.md`` -- a pure function of the report dict -- and every verdict re-derived
from a ``verdict_data.json``, without sampling again:

    python -m llm.experiments.reweighting_report runs/reweighting_llm/report_smollm2_add_k256 [more report folders]
    python -m llm.experiments.reweighting_report docs/reweighting/verdict_data_smollm2_*.json   # the committed reports
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm.tasks import TaskName, chance_p, score
from probes.passk import (
    PassKConfig,
    informative_k,
    null_controls,
    outside_support,
    pass_at_k,
    pass_at_k_exact,
    passk_verdict,
    plot_pass_at_k,
    summary,
    wider_verdict,
)


def write_report(r: dict, decoded: dict, answers: list[int], data: dict, out: Path) -> None:
    """Write the report of ``llm.experiments.reweighting.report`` (``r``), the decoded replies and ``verdict_data`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / "verdict_data.json").write_text(json.dumps(data) + "\n")
    with (out / "samples.jsonl").open("w") as f:
        for name, per_prompt in decoded.items():
            for j, (rows, a) in enumerate(zip(per_prompt, answers)):
                for reply, s in zip(rows, score(rows, [a] * len(rows))):
                    f.write(json.dumps({"model": name, "prompt": j, "answer": a, "reply": reply, "correct": s}) + "\n")
    cfg = r["config"]
    plot_pass_at_k(
        r["curves"],
        out / "passk.png",
        title=f"{cfg['task'] or 'eval_file'}: {r['n_prompts']} prompts x {r['n_samples']} samples",
    )
    v, c = r["verdict"], r["curves"]
    lines = (
        [
            "# Reweighting report",
            "",
            f"reference `{cfg['reference_model']}`, post-RL `{cfg['post_model'] or cfg['reference_model']}`"
            + (f" + adapter `{cfg['post_adapter']}`" if cfg["post_adapter"] else "")
            + f"; task `{cfg['task'] or cfg['eval_file']}`, {r['n_prompts']} prompts x {r['n_samples']} samples, "
            f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, top-p {cfg['top_p']}.",
            "",
            f"**{r['summary']}**",
            "",
            f"- sharper: {v['verdict']} -- {v['why']}.",
            f"- wider: {r['wider']['verdict']} -- {r['wider']['why']}.",
            f"- outside support: {r['outside_support']['verdict']} -- {r['outside_support']['why']}.",
        ]
        + (
            [
                f"- against the reference with {cfg['shots']} worked examples in context: {r['vs_fewshot']['verdict']} -- {r['vs_fewshot']['why']}."
            ]
            if r["vs_fewshot"]
            else []
        )
        + [
            "",
            "Only the outside-support verdict can show new support: a reweighting pi_ref exp(beta r) / Z raises pass@k at every finite k, so it can be sharper and wider.",
            "",
            f"Verdict k: {r['k_verdict']} ({r['k_verdict_why']}; fixed before sampling).",
            "",
            "| k | " + " | ".join(c) + " |",
            "|---" * (len(c) + 1) + "|",
        ]
    )
    for j, k in enumerate(r["ks"]):
        lines.append(
            f"| {k} | "
            + " | ".join(f"{cv['mean'][j]:.3f} [{cv['lo'][j]:.3f}, {cv['hi'][j]:.3f}]" for cv in c.values())
            + " |"
        )
    cov = r["coverage_k_max"]
    if r["k_verdict"] is not None and r["k_verdict"] != r["ks"][-1]:
        cv = r["coverage_k_verdict"]
        lines += [
            "",
            f"Coverage at k_verdict = {r['k_verdict']}: both {cv['both']:.3f}, post-RL only {cv['only_a']:.3f}, "
            f"reference only {cv['only_b']:.3f}, neither {cv['neither']:.3f}.",
        ]
    lines += [
        "",
        f"Coverage at k = {r['ks'][-1]}: both {cov['both']:.3f}, post-RL only {cov['only_a']:.3f}, reference only "
        f"{cov['only_b']:.3f}, neither {cov['neither']:.3f} (at k = 1: post only {r['coverage_k1']['only_a']:.3f}, "
        f"reference only {r['coverage_k1']['only_b']:.3f}). Crossover k (up to k_verdict): {v['crossover_k']}. Chance at k_verdict: {'n/a' if v['chance_k_max'] is None else round(v['chance_k_max'], 3)}.",
    ]
    for name, nc in r.get("null_controls", {}).items():
        lines += [
            "",
            f"Null control ({name}: its {2 * nc['half']} replies per prompt split at random into two halves, compared at k = {nc['k']}): "
            f"gap {nc['gap']:+.3f} [{nc['gap_ci'][0]:+.3f}, {nc['gap_ci'][1]:+.3f}], the gap rule calls it sharper: "
            f"{'YES (the verdict is not calibrated here)' if nc['calls_sharper'] else 'no'}; share solved by one half only "
            f"{nc['only_first']:.3f} (what a one-sided coverage rule would read).",
        ]
    ll = r["likelihood"]
    lines += [
        "",
        f"Log-likelihood per token under the reference: post-RL replies {ll['ref_ll_per_token_of_post_replies']:.3f} nats, "
        f"its own replies {ll['ref_ll_per_token_of_ref_replies']:.3f} (5th percentile {ll['ref_ll_per_token_p5_of_ref_replies']:.3f}; "
        f"{ll['share_post_below_ref_p5']:.3f} of post-RL replies fall below it). Post-RL replies under the post-RL model: "
        f"{ll['post_ll_per_token_of_post_replies']:.3f}. Mean reply tokens: "
        + ", ".join(f"{k} {x:.1f}" for k, x in ll["mean_reply_tokens"].items())
        + ".",
    ]
    if "ref_ll_per_reply_of_post_replies" in ll:
        lines.append(
            f"Per reply under the reference: post-RL replies {ll['ref_ll_per_reply_of_post_replies']:.2f} nats, its own "
            f"{ll['ref_ll_per_reply_of_ref_replies']:.2f}."
        )
    if r["kl"]:
        lines.append(
            f"KL(post || ref), Monte-Carlo over the post-RL replies: {r['kl']['kl_post_ref_per_reply']:.3f} "
            f"+- {r['kl']['se']:.3f} nats per reply ({r['kl']['kl_post_ref_per_token']:.4f} per token)."
        )
    b = r["belief"]
    if b:
        m = b["models"]
        lines += [
            "",
            f"Belief side: ridge probe of the latent from the last prompt position, {b['n']} prompts, {b['folds']}-fold "
            f"cross-fitted with folds grouped by operands ({b['n_groups']} groups), alpha {b['alpha']}; readable = R^2 > 0 and MSE <= {cfg['readable_ratio']} x random-init control's.",
            "",
            "| site | R^2 reference | R^2 post-RL | MSE / random-init (ref) | MSE / random-init (post) |",
            "|---|---|---|---|---|",
        ]
        for s, x in m["reference"]["sites"].items():
            y = m["post"]["sites"][s]
            lines.append(
                f"| {s} | {x['r2']:.3f} | {y['r2']:.3f} | {x['ratio_to_random_init']:.3f} | {y['ratio_to_random_init']:.3f} |"
            )
        lines += [
            "",
            f"Readable before RL: {b['readable_before_rl']} ({len(m['reference']['readable_sites'])} sites; best "
            f"{m['reference']['best_site']} R^2 {m['reference']['best_r2']:.3f}); post-RL: {len(m['post']['readable_sites'])} sites, best "
            f"{m['post']['best_site']} R^2 {m['post']['best_r2']:.3f}. Output-side sites ({', '.join(b['output_side_sites'])}) mean R^2: "
            f"reference {b['output_side_mean_r2']['reference']:.3f}, post-RL {b['output_side_mean_r2']['post']:.3f} "
            f"(gain {b['output_side_r2_gain']:+.3f}). Sites whose activations RL left unchanged: {len(b['unchanged_sites'])}.",
        ]
    lines += ["", "Times (s): " + ", ".join(f"{k} {x}" for k, x in r["timings_s"].items()) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def judge(
    counts: dict[str, torch.Tensor],
    n: int,
    ks: list[int],
    k_verdict: int | None,
    task: str | None,
    log_w: list[torch.Tensor] | None = None,
) -> dict:
    """The report's verdicts from per-prompt correct counts out of ``n`` (``counts``: "reference", "post" and, with
    the few-shot baseline, "reference_fewshot" -> (prompts,)): pass@k tables over ``ks``, the chance table (uniform
    guessing over ``task``'s answers; None for an eval file), "sharper at k" at ``k_verdict`` (the whole curve when
    None: guessing left no k, and the verdict says "uninformative"), "wider at k" at the largest k, "outside the
    reference's support" from ``log_w`` (per prompt, ``log pi_ref - log pi_post`` of each correct post-RL reply; None:
    not run), the post-RL policy against the few-shot reference at ``k_verdict``, and the split-half null controls."""
    tables = {m: torch.stack([pass_at_k(n, c, k) for k in ks], dim=1) for m, c in counts.items()}
    n_prompts = len(counts["post"])
    chance = pass_at_k_exact(torch.full((n_prompts,), chance_p(task)), ks) if task else None
    j = ks.index(k_verdict) + 1 if k_verdict is not None else len(ks)
    pcfg = PassKConfig(ks=ks[:j])
    cut = lambda t: None if t is None else t[:, :j]  # noqa: E731
    out = {
        "tables": tables,
        "chance": chance,
        "j": j,
        "verdict": passk_verdict(tables["reference"][:, :j], tables["post"][:, :j], pcfg, cut(chance)),
        "wider": wider_verdict(
            tables["reference"][:, -1], tables["post"][:, -1], ks[-1], pcfg, None if chance is None else chance[:, -1]
        ),
        "outside_support": None
        if log_w is None
        else outside_support(n, counts["post"], counts["reference"], log_w, pcfg),
        "vs_fewshot": passk_verdict(tables["reference_fewshot"][:, :j], tables["post"][:, :j], pcfg, cut(chance))
        if "reference_fewshot" in counts
        else None,
        "nulls": null_controls({m: counts[m] for m in ("reference", "post")}, n, ks[j - 1], pcfg),
    }
    elicited = counts["reference_fewshot"] > 0 if "reference_fewshot" in counts else None
    out["summary"] = summary(out["verdict"], out["wider"], out["outside_support"], elicited)
    return out


def verdict_data(
    task: str | None,
    n: int,
    ks: list[int],
    k_verdict: int | None,
    shots: int,
    counts: dict[str, torch.Tensor],
    ll_ref: list[list[float]],
    ll_post: list[list[float]],
) -> dict:
    """What re-derives every verdict (``verdict_data.json``): per-prompt correct counts of each model and, for every
    correct post-RL reply, its log-likelihood (nats, whole reply) under the reference and under the post-RL model."""
    return {
        "task": task,
        "n_samples": n,
        "ks": ks,
        "k_verdict": k_verdict,
        "shots": shots,
        "counts": {m: [int(x) for x in c] for m, c in counts.items()},
        "post_correct_ll_ref": ll_ref,
        "post_correct_ll_post": ll_post,
    }


def _solved_at_n(d: dict) -> dict:
    """Verdicts from a report written before per-prompt counts were kept: only which prompts each model solved within
    its ``n`` replies (pass@n is 0/1, so the report's coverage table at k = n gives them exactly) and the mean pass@1
    of its table (all the pass@1 gate reads). "sharper at k" is re-derivable only when ``k_verdict`` is ``n``."""
    n, k_verdict = d["n_samples"], d["k_verdict"]
    solved = {m: torch.tensor(v, dtype=torch.float64) for m, v in d["solved_at_n"].items()}
    chance = pass_at_k_exact(torch.full((len(solved["post"]),), chance_p(d["task"])), [1, n]) if d["task"] else None
    pcfg = PassKConfig(ks=[1, n])
    two = {m: torch.stack([torch.full_like(s, d["pass_at_1"][m]), s], 1) for m, s in solved.items()}
    sharper = (
        passk_verdict(two["reference"], two["post"], pcfg, chance)
        if k_verdict == n
        else {
            "verdict": f"not re-derivable at k={k_verdict}",
            "why": f"only pass@{n} (solved within n) per prompt was committed",
        }
    )
    wider = wider_verdict(solved["reference"], solved["post"], n, pcfg, None if chance is None else chance[:, -1])
    return {
        "verdict": sharper,
        "wider": wider,
        "outside_support": None,
        "vs_fewshot": None,
        "nulls": {},
        "summary": summary(sharper, wider, None),
    }


def rejudge(path: str | Path) -> dict:
    """Every verdict of a report re-derived from its ``verdict_data.json`` (a report folder, or the file itself;
    ``verdict_data*.json`` -> ``rejudged*.json`` beside it)."""
    f = Path(path)
    f = f / "verdict_data.json" if f.is_dir() else f
    d = json.loads(f.read_text())
    if "solved_at_n" in d:
        j = _solved_at_n(d)
    else:
        counts = {m: torch.tensor(c, dtype=torch.long) for m, c in d["counts"].items()}
        log_w = (
            [
                torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
                for a, b in zip(d["post_correct_ll_ref"], d["post_correct_ll_post"])
            ]
            if "post_correct_ll_ref" in d and d.get("ll_are_importance_weights", True)
            else None
        )
        j = judge(counts, d["n_samples"], d["ks"], d["k_verdict"], d["task"], log_w)
    out = {
        "data": str(f),
        "source": d.get("source", "written by llm.experiments.reweighting"),
        "summary": j["summary"],
        "sharper": j["verdict"],
        "wider": j["wider"],
        "outside_support": j["outside_support"],
        "vs_fewshot": j["vs_fewshot"],
        "null_controls": j["nulls"],
    }
    f.with_name(f.name.replace("verdict_data", "rejudged")).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str]) -> None:
    for path in argv:
        o = rejudge(path)
        print(f"{path}: {o['summary']}")
        for name in ("sharper", "wider", "outside_support", "vs_fewshot"):
            if o[name]:
                print(f"  {name}: {o[name]['verdict']} -- {o[name]['why']}")
        for m, x in o["null_controls"].items():
            print(
                f"  null ({m} halves at k = {x['k']}): gap {x['gap']:+.3f} [{x['gap_ci'][0]:+.3f}, {x['gap_ci'][1]:+.3f}], "
                f"sharper {'YES' if x['calls_sharper'] else 'no'} (one-half-only share {x['only_first']:.3f})"
            )


if __name__ == "__main__":
    main(sys.argv[1:])


def verdict_k(task: TaskName | None, pcfg: PassKConfig) -> tuple[int | None, str]:
    """The k the verdict is taken at, and why: the largest k of ``pcfg.ks`` at which uniform guessing over the task's
    answers (``llm.tasks.chance_p``) solves less than ``pcfg.max_chance`` of the prompts; the largest k for an eval
    file (``task`` None: no answer set known); None when guessing reaches it at k = 1. Fixed from the task and the budget alone."""
    if task is None:
        return pcfg.ks[-1], "eval_file prompts: no answer set to guess from, so the largest k"
    p = chance_p(task)
    k = informative_k(p, pcfg.ks, pcfg.max_chance)
    if k is None:
        return (
            None,
            f"uniform guessing over {task}'s {round(1 / p)} answers reaches {pcfg.max_chance} already at k = 1: uninformative",
        )
    at = float(pass_at_k_exact(torch.tensor(p), k))
    why = f"the largest k whose chance pass@k (uniform guessing over {task}'s {round(1 / p)} answers) is below {pcfg.max_chance}: {at:.3f} at k = {k}"
    if k < pcfg.ks[-1]:
        nxt = pcfg.ks[pcfg.ks.index(k) + 1]
        why += (
            f", {float(pass_at_k_exact(torch.tensor(p), nxt)):.3f} at k = {nxt}; the curves go on to k = {pcfg.ks[-1]}"
        )
    return k, why
