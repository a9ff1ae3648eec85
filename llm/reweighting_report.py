"""``llm.reweighting``'s output files: ``report.json``, ``samples.jsonl`` (every decoded reply with its score),
``passk.png`` and ``report.md`` -- a pure function of the report dict -- and the verdict re-derived from a written
report's samples, without sampling again (for reports written under an earlier verdict rule):

    python -m llm.reweighting_report runs/reweighting_llm/report_smollm2_add_k256 [more report folders]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm.tasks import chance_p, score
from probes.passk import PassKConfig, null_controls, pass_at_k, pass_at_k_exact, passk_verdict, plot_pass_at_k


def write_report(r: dict, decoded: dict, answers: list[int], out: Path) -> None:
    """Write the report of ``llm.reweighting.report`` (``r``) and the decoded replies to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(r, indent=1) + "\n")
    with (out / "samples.jsonl").open("w") as f:
        for name, per_prompt in decoded.items():
            for j, (rows, a) in enumerate(zip(per_prompt, answers)):
                for reply, s in zip(rows, score(rows, [a] * len(rows))):
                    f.write(json.dumps({"model": name, "prompt": j, "answer": a, "reply": reply, "correct": s}) + "\n")
    cfg = r["config"]
    plot_pass_at_k(r["curves"], out / "passk.png", title=f"{cfg['task'] or 'eval_file'}: {r['n_prompts']} prompts x {r['n_samples']} samples")
    v, c = r["verdict"], r["curves"]
    lines = [
        "# Reweighting report", "",
        f"reference `{cfg['reference_model']}`, post-RL `{cfg['post_model'] or cfg['reference_model']}`"
        + (f" + adapter `{cfg['post_adapter']}`" if cfg["post_adapter"] else "")
        + f"; task `{cfg['task'] or cfg['eval_file']}`, {r['n_prompts']} prompts x {r['n_samples']} samples, "
        f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, top-p {cfg['top_p']}.", "",
        f"**Verdict: {v['verdict']}** -- {v['why']}.", "",
        f"Verdict k: {r['k_verdict']} ({r['k_verdict_why']}; fixed before sampling).", "",
        "| k | " + " | ".join(c) + " |", "|---" * (len(c) + 1) + "|",
    ]
    for j, k in enumerate(r["ks"]):
        lines.append(f"| {k} | " + " | ".join(f"{cv['mean'][j]:.3f} [{cv['lo'][j]:.3f}, {cv['hi'][j]:.3f}]" for cv in c.values()) + " |")
    cov = r["coverage_k_max"]
    if r["k_verdict"] is not None and r["k_verdict"] != r["ks"][-1]:
        cv = r["coverage_k_verdict"]
        lines += ["", f"Coverage at k_verdict = {r['k_verdict']}: both {cv['both']:.3f}, post-RL only {cv['only_a']:.3f}, "
                  f"reference only {cv['only_b']:.3f}, neither {cv['neither']:.3f}."]
    lines += ["", f"Coverage at k = {r['ks'][-1]}: both {cov['both']:.3f}, post-RL only {cov['only_a']:.3f}, reference only "
              f"{cov['only_b']:.3f}, neither {cov['neither']:.3f} (at k = 1: post only {r['coverage_k1']['only_a']:.3f}, "
              f"reference only {r['coverage_k1']['only_b']:.3f}). Crossover k (up to k_verdict): {v['crossover_k']}. Chance at k_verdict: {'n/a' if v['chance_k_max'] is None else round(v['chance_k_max'], 3)}."]
    for name, nc in r.get("null_controls", {}).items():
        lines += ["", f"Null control ({name}: its {2 * nc['half']} replies per prompt split into two halves, compared at k = {nc['k']}): "
                  f"gap {nc['gap']:+.3f} [{nc['gap_ci'][0]:+.3f}, {nc['gap_ci'][1]:+.3f}], the rule calls it new coverage: "
                  f"{'YES (the verdict is not calibrated here)' if nc['calls_new_coverage'] else 'no'}; share solved by one half only "
                  f"{nc['only_first']:.3f} (what a one-sided coverage rule would read)."]
    ll = r["likelihood"]
    lines += ["", f"Log-likelihood per token under the reference: post-RL replies {ll['ref_ll_per_token_of_post_replies']:.3f} nats, "
              f"its own replies {ll['ref_ll_per_token_of_ref_replies']:.3f} (5th percentile {ll['ref_ll_per_token_p5_of_ref_replies']:.3f}; "
              f"{ll['share_post_below_ref_p5']:.3f} of post-RL replies fall below it). Post-RL replies under the post-RL model: "
              f"{ll['post_ll_per_token_of_post_replies']:.3f}. Mean reply tokens: " + ", ".join(f"{k} {x:.1f}" for k, x in ll["mean_reply_tokens"].items()) + "."]
    if "ref_ll_per_reply_of_post_replies" in ll:
        lines.append(f"Per reply under the reference: post-RL replies {ll['ref_ll_per_reply_of_post_replies']:.2f} nats, its own "
                     f"{ll['ref_ll_per_reply_of_ref_replies']:.2f}.")
    if r["kl"]:
        lines.append(f"KL(post || ref), Monte-Carlo over the post-RL replies: {r['kl']['kl_post_ref_per_reply']:.3f} "
                     f"+- {r['kl']['se']:.3f} nats per reply ({r['kl']['kl_post_ref_per_token']:.4f} per token).")
    b = r["belief"]
    if b:
        m = b["models"]
        lines += ["", f"Belief side: ridge probe of the latent from the last prompt position, {b['n']} prompts, {b['folds']}-fold "
                  f"cross-fitted with folds grouped by operands ({b['n_groups']} groups), alpha {b['alpha']}; readable = R^2 > 0 and MSE <= {cfg['readable_ratio']} x random-init control's.", "",
                  "| site | R^2 reference | R^2 post-RL | MSE / random-init (ref) | MSE / random-init (post) |", "|---|---|---|---|---|"]
        for s, x in m["reference"]["sites"].items():
            y = m["post"]["sites"][s]
            lines.append(f"| {s} | {x['r2']:.3f} | {y['r2']:.3f} | {x['ratio_to_random_init']:.3f} | {y['ratio_to_random_init']:.3f} |")
        lines += ["", f"Readable before RL: {b['readable_before_rl']} ({len(m['reference']['readable_sites'])} sites; best "
                  f"{m['reference']['best_site']} R^2 {m['reference']['best_r2']:.3f}); post-RL: {len(m['post']['readable_sites'])} sites, best "
                  f"{m['post']['best_site']} R^2 {m['post']['best_r2']:.3f}. Output-side sites ({', '.join(b['output_side_sites'])}) mean R^2: "
                  f"reference {b['output_side_mean_r2']['reference']:.3f}, post-RL {b['output_side_mean_r2']['post']:.3f} "
                  f"(gain {b['output_side_r2_gain']:+.3f}). Sites whose activations RL left unchanged: {len(b['unchanged_sites'])}."]
    lines += ["", "Times (s): " + ", ".join(f"{k} {x}" for k, x in r["timings_s"].items()) + "."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def judge(hits: dict[str, torch.Tensor], ks: list[int], k_verdict: int | None, task: str | None) -> dict:
    """The report's verdict step from per-reply scores (``hits``: "reference" / "post" -> (prompts, n) 0/1): pass@k
    tables over ``ks``, the chance table (uniform guessing over ``task``'s answers; None for an eval file), the
    ``passk_verdict`` on the tables cut at ``k_verdict`` (the whole curve when None: guessing left no k, and the
    verdict says "uninformative"), and the split-half null controls at that k."""
    tables = {m: torch.stack([pass_at_k(h.shape[1], h.sum(1), k) for k in ks], dim=1) for m, h in hits.items()}
    n_prompts = len(next(iter(hits.values())))
    chance = pass_at_k_exact(torch.full((n_prompts,), chance_p(task)), ks) if task else None
    j = ks.index(k_verdict) + 1 if k_verdict is not None else len(ks)
    pcfg = PassKConfig(ks=ks[:j])
    verdict = passk_verdict(tables["reference"][:, :j], tables["post"][:, :j], pcfg, None if chance is None else chance[:, :j])
    return {"tables": tables, "chance": chance, "j": j, "verdict": verdict, "nulls": null_controls(hits, ks[j - 1], pcfg)}


def rejudge(report_dir: str | Path) -> dict:
    """The current ``passk_verdict`` and split-half null controls of a written report, from its ``samples.jsonl``
    (the scores there, at the report's own ``k_verdict``); written to ``rejudged.json`` beside it."""
    d = Path(report_dir)
    r = json.loads((d / "report.json").read_text())
    scores: dict[str, list[list[float]]] = {m: [[] for _ in range(r["n_prompts"])] for m in ("reference", "post")}
    for line in (d / "samples.jsonl").read_text().splitlines():
        x = json.loads(line)
        scores[x["model"]][x["prompt"]].append(x["correct"])
    hits = {m: torch.tensor(rows, dtype=torch.float64) for m, rows in scores.items()}
    j = judge(hits, r["ks"], r.get("k_verdict"), r["config"].get("task"))
    out = {"report": str(d), "k_verdict": r["ks"][j["j"] - 1], "verdict": j["verdict"], "verdict_as_written": r["verdict"]["verdict"],
           "null_controls": j["nulls"]}
    (d / "rejudged.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        o = rejudge(folder)
        nulls = "; ".join(f"{m} halves at k = {x['k']}: gap {x['gap']:+.3f} [{x['gap_ci'][0]:+.3f}, {x['gap_ci'][1]:+.3f}], "
                          f"new coverage {'YES' if x['calls_new_coverage'] else 'no'} (one-half-only share {x['only_first']:.3f})"
                          for m, x in o["null_controls"].items())
        print(f"{folder}: as written {o['verdict_as_written']!r} -> {o['verdict']['verdict']!r} ({o['verdict']['why']}); null: {nulls}")

