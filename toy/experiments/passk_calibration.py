"""The verdicts' confusion table where the truth is known (``toy.passk_calibration``): every control kind on the toy
families' exact references and on LLM-shaped references, sampled at the committed reports' prompt and sample counts.

    python -m toy.experiments.passk_calibration --runs 100 --out docs/reweighting/calibration.json
    python -m toy.experiments.passk_calibration --summarize docs/reweighting/calibration.json   # its table, condensed

Rows: (reference, counts, control). Columns: share of simulated reports whose sampled prompts hold a truly-outside
one (truth), called "sharper at k_verdict", "wider at k_max", "outside the reference's support at K" (any prompt
flagged), the prompts flagged that are not truly outside (false flags, summed over runs: the target is 0), and the
share of truly-outside prompts flagged. The targets: 0 same-support controls called outside; >= 90% of the runs
holding a truly-outside prompt called outside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from plumbing.config import ConfigParser
from probes.passk import PassKConfig, log2_ks
from toy.grpo import RLTaskConfig, ToyGRPOConfig, build_reward, task_prompts
from toy.passk_calibration import confusion, controls, llm_like
from toy.reweighting import decode

FAMILIES = {
    "(a) rl_reweight": "configs/toy/rl_reweight.yaml",
    "(b) rl_compose": "configs/toy/rl_compose.yaml",
    "(c) rl_gates": "configs/toy/rl_gates.yaml",
}
# (prompts, replies per prompt, k_verdict): the committed LLM reports' counts
COUNTS = {
    "48 x 16 (add, add_mul)": (48, 16, 16),
    "48 x 256 (add k256)": (48, 256, 32),
    "96 x 256 (mul10_add)": (96, 256, 256),
}


def toy_reference(
    config: str, n_pool: int, top_p: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A toy family's exact reference on ``n_pool`` prompts: the process's next-token distribution after each prompt
    (from the exact belief), top-p truncated; with the untruncated one and the correct (rewarded) one-token replies."""
    task, _ = ConfigParser((RLTaskConfig, ToyGRPOConfig)).parse_args_and_config(
        ["--config", config, "--output_dir", "/tmp/unused"]
    )
    process = task.build_process()
    reward = build_reward(task, process)
    _, beliefs = task_prompts(task, process, n_pool, seed)
    full = beliefs.double() @ process.T.sum(-1).T.double()
    full = full / full.sum(1, keepdim=True)
    return decode(full, 1.0, top_p), full, reward.table(beliefs) > 0.5


def summarize(out: dict) -> str:
    """The condensed table (one row per reference and control, one column per count: share of runs called sharper /
    wider / **outside** (share holding a truly-outside prompt; false flags)) and the targets' figures."""
    rows = out["rows"]
    counts = list(dict.fromkeys(r["counts"] for r in rows))
    lines = ["| reference | control | " + " | ".join(counts) + " |", "|---|---|" + "---|" * len(counts)]
    for ref, ctl in dict.fromkeys((r["reference"], r["control"]) for r in rows):
        cell = {r["counts"]: r for r in rows if r["reference"] == ref and r["control"] == ctl}
        lines.append(
            f"| {ref} | {ctl} | "
            + " | ".join(
                f"{c['sharper']:.2f} / {c['wider']:.2f} / **{c['outside']:.2f}** "
                f"({c['truly_outside']:.2f}; ff {c['false_flags']})"
                for c in map(cell.get, counts)
            )
            + " |"
        )
    same = [r for r in rows if r["truly_outside"] == 0]
    pos = [r for r in rows if r["truly_outside"] > 0 and not r["control"].startswith("format")]
    rw = [r for r in rows if r["control"].startswith("reweight")]
    lines += [
        "",
        f"same-support rows (no truly-outside prompt in any run): {len(same)}, called outside in any run: "
        f"{sum(r['outside'] > 0 for r in same)}; false flags over all {len(rows)} rows x {out['runs']} runs: "
        f"{sum(r['false_flags'] for r in rows)}; new-capability / latent-optimum rows: {len(pos)}, smallest share of the "
        f"runs holding a truly-outside prompt called outside: {min(r['outside'] / r['truly_outside'] for r in pos):.2f}, smallest "
        f"per-prompt recall: {min(r['prompt_recall'] for r in pos):.2f}; reweight rows: {len(rw)}, called sharper in >= 0.9 of "
        f"runs: {sum(r['sharper'] >= 0.9 for r in rw)}, wider in >= 0.9: {sum(r['wider'] >= 0.9 for r in rw)}, outside in any: "
        f"{sum(r['outside'] > 0 for r in rw)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="simulated reports per row")
    ap.add_argument(
        "--pool", type=int, default=4096, help="prompts each reference is built on (a report draws from them)"
    )
    ap.add_argument("--top_p", type=float, default=0.95, help="the toy references' nucleus")
    ap.add_argument(
        "--n_boot", type=int, default=2000, help="bootstrap resamples of the gap CIs (calls, not CI ends, are counted)"
    )
    ap.add_argument("--out", default=None, help="JSON of the table")
    ap.add_argument("--summarize", default=None, help="print the condensed table of a written JSON and stop")
    a = ap.parse_args(argv)
    if a.summarize:
        out = json.loads(Path(a.summarize).read_text())
        print(summarize(out))
        return out
    t0 = time.time()
    pk = PassKConfig(n_boot=a.n_boot)
    refs = {name: toy_reference(path, a.pool, a.top_p) for name, path in FAMILIES.items()}
    refs = {name: (r, c, full) for name, (r, full, c) in refs.items()}
    refs["LLM-like, success 1e-3..0.6"] = (*llm_like(a.pool, 1e-3, 0.6), "llm")
    refs["LLM-like, success 2e-5..1e-2"] = (*llm_like(a.pool, 2e-5, 1e-2, seed=1), "llm")
    rows = []
    print(
        "| reference | prompts x replies (k_verdict) | control | truly outside | sharper | wider | outside support | false flags | prompt recall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rname, (pi_ref, correct, full) in refs.items():
        for cname, (n_prompts, n, kv) in COUNTS.items():
            kw = {"formats": 4} if isinstance(full, str) else {"full": full}
            for ctl, control in controls(pi_ref, correct, **kw).items():
                r = confusion(control, n_prompts, n, log2_ks(n), kv, pk, a.runs)
                rows.append({"reference": rname, "counts": cname, "control": ctl, **r})
                rec = "n/a" if r["prompt_recall"] is None else f"{r['prompt_recall']:.2f}"
                print(
                    f"| {rname} | {cname} | {ctl} | {r['truly_outside']:.2f} | {r['sharper']:.2f} | {r['wider']:.2f} | "
                    f"{r['outside']:.2f} | {r['false_flags']} | {rec} |",
                    flush=True,
                )
    same = [r for r in rows if r["truly_outside"] == 0]
    pos = [r for r in rows if r["truly_outside"] > 0]
    out = {
        "runs": a.runs,
        "pool": a.pool,
        "support_k": pk.support_k,
        "support_level": pk.support_level,
        "rows": rows,
        "same_support_rows_called_outside": sum(r["outside"] > 0 for r in same),
        "same_support_rows": len(same),
        "false_flags_total": sum(r["false_flags"] for r in rows),
        "min_found_share_where_truly_outside": min((r["outside"] / r["truly_outside"] for r in pos), default=None),
        "wall_s": round(time.time() - t0, 1),
    }
    print(
        f"\nrows with no truly-outside prompt: {out['same_support_rows']}, of which called outside in any run: "
        f"{out['same_support_rows_called_outside']}; false flags over all rows: {out['false_flags_total']}; rows with truly-outside "
        f"prompts: {len(pos)}, smallest share of their runs called outside (over runs holding one): "
        f"{out['min_found_share_where_truly_outside']}; {out['wall_s']} s"
    )
    print("\n" + summarize(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
