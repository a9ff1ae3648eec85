"""GPU pre-flight of the base-vs-instruct experiment in one command (about 8 minutes on one H100 / H200): the gpu test
tier, the full-width rehearsal of the Qwen2.5-1.5B pair (then gemma-2-2b's, if the budget leaves room) at reduced
counts and lengths, and llm.fastgen against plain ``generate`` at batch 64 and at the eval batch (256). Writes
``bench/results/<date>_<gpu>.md``: per-stage time and memory at full width, and the predicted wall time and peak
memory of the real runs (llm.experiments.rehearse's cost model, which scales the reduced counts and lengths back up).

    python bench/gpu_check.py                                  # on your GPU node, from the repository root
    python bench/gpu_check.py --device cpu --width tiny        # CPU dry run of every step (tiny models)

On a lent GPU machine with no network (its image lacks trl, nnsight, gguf and datasets): first, here,
``bash /work/shared/tools/device-wheels.sh`` (wheels into .whl/), then run there, carrying ``.whl``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu_check.py --results_dir $OUT

The offline judge's embedder (a 90 MB wheel) is not on such a machine either, so the rehearsals use the stub judge:
judging time is left out of the predictions (seconds per stage on a GPU). Each step runs in its own process with a
timeout; a failing step is reported and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = {
    "qwen25_1p5b": "configs/llm/em_experiment_qwen25_1p5b.yaml",
    "gemma2_2b": "configs/llm/em_experiment_gemma2_2b.yaml",
}


def step(cmd: list[str], timeout: float, env: dict) -> dict:
    """Run ``cmd`` from the repository root; ``{"ok", "wall_s", "tail"}`` (the output's last lines)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        ok, out = res.returncode == 0, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    print(f"[{'ok' if ok else 'FAILED'} {wall:.0f} s] {' '.join(cmd)}", flush=True)
    return {"ok": ok, "wall_s": round(wall, 1), "tail": "\n".join(str(out).strip().splitlines()[-15:])}


def generation(device: str, tiny: bool, eval_batch: int) -> dict:
    """bench/llm_throughput.py's generation runs (Qwen2.5-1.5B-shaped, 64-token prompts, 128 new tokens) at batch 64
    and at the eval batch: plain ``generate`` and ``llm.fastgen`` at each."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from llm_throughput import Setup, gen_runs

    out = {}
    for b in (64, eval_batch):
        new, prompt = (8, 8) if tiny else (128, 64)
        out.update(gen_runs(Setup(torch.device(device), tiny, 0, 0, 0, 0, b, b, prompt, new)))
    return out


def report(info: dict, tier: dict, pairs: dict, gen: dict, eval_batch: int) -> str:
    lines = [
        f"# GPU pre-flight on {info['device']} ({info['date']})",
        "",
        f"`python bench/gpu_check.py {' '.join(info['argv'])}`: torch {info['torch']}, transformers {info['transformers']}, "
        f"{info['total_s']:.0f} s in all.",
        "",
        "## Predicted real runs (published counts, this machine)",
        "",
        "| pair | predicted wall time | peak memory | model weights on disk | rehearsal |",
        "|---|---:|---:|---:|---|",
    ]
    for name, p in pairs.items():
        if p.get("cost"):
            c = p["cost"]
            lines.append(
                f"| {name} | {c['predicted_s'] / 60:.1f} min | {c['peak_gb']} GB | "
                f"{sum(c['disk_gb']['models'].values()):.1f} GB | {c['width']} width, {p['wall_s']} s |"
            )
        else:
            lines.append(f"| {name} | - | - | - | {p.get('skipped') or 'FAILED'} |")
    lines += [
        "",
        f"## gpu test tier: {'passed' if tier['ok'] else 'FAILED'} ({tier['wall_s']} s)",
        "",
        "```",
        tier["tail"],
        "```",
    ]
    shape = "tiny Qwen2 (d_model 64), 8 new tokens" if info["device"] == "cpu" else "Qwen2.5-1.5B shape, 128 new tokens"
    gen_lines = [
        "",
        f"## Generation: llm.fastgen vs plain generate ({shape}, random weights)",
        "",
        "| run | new tok/s | x plain at the same batch |",
        "|---|---:|---:|",
    ]
    for k, r in gen.items():
        if "new_tokens_per_s" not in r:
            gen_lines.append(f"| {k} | {r.get('error', 'failed')} | |")
            continue
        plain = gen.get(f"plain_b{k.split('_b')[1]}", {}).get("new_tokens_per_s")
        gen_lines.append(
            f"| {k} | {r['new_tokens_per_s']:.0f} | {r['new_tokens_per_s'] / plain:.2f} |"
            if plain
            else f"| {k} | {r['new_tokens_per_s']:.0f} | - |"
        )
    lines += gen_lines + ["", f"(eval batch: {eval_batch}, the configs' eval.batch_size)"]
    for name, p in pairs.items():
        lines += ["", f"## Rehearsal: {name}", ""]
        lines += [p["cost_md"]] if p.get("cost_md") else ["```", p.get("tail", p.get("skipped", "")), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    import torch
    import transformers
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run (no GPU tier, tiny models)"
    )
    ap.add_argument("--width", choices=["full", "tiny"], default="full")
    ap.add_argument("--scale", type=float, default=0.05, help="llm.experiments.rehearse --scale")
    ap.add_argument(
        "--new_tokens",
        type=int,
        nargs=3,
        default=[128, 32, 32],
        metavar=("EVAL", "STEER", "FACTORED"),
        help="reply lengths in the rehearsals (the cost model scales them back to the configs')",
    )
    ap.add_argument(
        "--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS), help="the pairs to rehearse, in order"
    )
    ap.add_argument(
        "--budget_s",
        type=float,
        default=330,
        help="seconds for everything but the generation runs: a later pair is rehearsed only if it should end by then",
    )
    ap.add_argument("--results_dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--work_dir", default=str(REPO / "runs" / "gpu_check"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU node, or --device cpu --width tiny for a dry run")
    t_all = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsals must not find a GPU in a dry run
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    info = {
        "device": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "argv": sys.argv[1:] if argv is None else argv,
    }

    # On a CPU the tier is only collected (its dry run of the same logic is GPU_TIER_DEVICE=cpu, minutes).
    tier = step(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-x", "-p", "no:cacheprovider"]
        + ([] if args.device == "cuda" else ["--collect-only"]),
        240,
        env,
    )
    pairs, first_s = {}, None
    for name in args.pairs:
        config = PAIRS[name]
        left = args.budget_s - (time.perf_counter() - t_all)
        if first_s is not None and 1.5 * first_s > left:
            pairs[name] = {
                "skipped": f"not rehearsed: {left:.0f} s of the budget left, the first pair took {first_s:.0f} s"
            }
            continue
        out = Path(args.work_dir) / Path(config).stem
        ev, st, fa = args.new_tokens
        cmd = [
            sys.executable,
            "-m",
            "llm.experiments.rehearse",
            "--config",
            config,
            "--width",
            args.width,
            "--scale",
            str(args.scale),
            "--judge",
            "stub",
            "--output_dir",
            str(out),
            "--overwrite",
            "true",
            "--eval.max_new_tokens",
            str(ev),
            "--steer.max_new_tokens",
            str(st),
            "--factored.max_new_tokens",
            str(fa),
        ]
        res = step(cmd, max(left, 120), env)
        first_s = first_s or res["wall_s"]
        if res["ok"]:
            res["cost"] = json.loads((out / "cost.json").read_text())
            res["cost_md"] = (out / "cost.md").read_text()
        pairs[name] = res
    eval_batch = yaml.safe_load((REPO / PAIRS["qwen25_1p5b"]).read_text())["eval"]["batch_size"]
    try:
        gen = generation(args.device, args.device == "cpu", eval_batch)
    except Exception as e:  # the report still records the rest
        gen = {"generation": {"error": f"{type(e).__name__}: {e}"[:500]}}
    info["total_s"] = time.perf_counter() - t_all
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = Path(args.results_dir) / f"{info['date']}_{slug}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report(info, tier, pairs, gen, eval_batch))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
