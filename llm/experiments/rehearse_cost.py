"""The rehearsal's cost model: each ``llm.experiments.em_experiment`` stage's wall time and peak memory at the published counts,
predicted from a rehearsal at scaled counts on the same machine (``llm.experiments.rehearse``).

Clock: on a GPU, wall seconds (the device works asynchronously and the run holds the node); on a CPU, the
process's CPU seconds (``cpu_s`` of ``stage.json``): a shared CPU's load stretched wall times by up to 3x between
two runs of the same work, while the CPU seconds of that work stay put. A CPU prediction is therefore the time on
free cores, one thread (the entry points' default).

Per stage, ``seconds = fixed + variable``: ``fixed`` is what a stage pays whatever the counts (``LOADS`` model loads, and
on CUDA the compile of the fast generation path, both measured once by the rehearsal), ``variable`` grows linearly
with the stage's work (``units``: new tokens decoded, examples trained, texts read), so

    predicted = fixed + (seconds - fixed) x published work / rehearsed work.

Generation work is the decode time the rehearsal's own step costs give (``decode_seconds``: a per-step overhead plus a
per-row cost, each generation path measured once, so both the overhead-bound regime of a tiny model on a CPU and the
memory-bound one of a GPU are followed); lengths count too (``max_new_tokens``), so a rehearsal with shorter replies
still predicts the published ones.
Peak memory does not grow with the counts (training batches are fixed, generation batches are at most the batch
size), so the prediction is the rehearsal's peak: CUDA's peak allocation per stage on a GPU, else the process's peak
RSS so far (cumulative across stages on a CPU); a rehearsal with fewer eval rows than the batch size, or shorter
replies, has a smaller KV cache than the published run. A random model never stops before ``max_new_tokens``, so
generation times are upper bounds for a trained model that stops earlier. A prediction against a finished run:

    python -m llm.experiments.rehearse_cost --cost runs/rehearse/<name>/cost.json --run runs/em_experiment/<name>
"""

from __future__ import annotations

import platform
from pathlib import Path

from llm.em_config import STAGES, EMConfig
from plumbing.runs import stage_record

# Model loads per stage (transfer reads the untuned and the fine-tuned model); compiles: the evaluations' fast path.
LOADS = {
    "eval_before": 1,
    "sft": 1,
    "eval_after": 1,
    "steer": 1,
    "factored_before": 1,
    "factored_after": 1,
    "transfer": 2,
    "lora": 0,
}
COMPILES = {"eval_before": 1, "eval_after": 1}
DRIVERS = {
    "eval_before": "eval decode",
    "eval_after": "eval decode",
    "sft": "data.max_examples",
    "steer": "steer decode",
    "factored_before": "factored decode",
    "factored_after": "factored decode",
    "transfer": "transfer.n_per_class",
    "lora": None,
}


def decode_seconds(rows: int, batch: int, new_tokens: int, step: dict) -> float:
    """Seconds to sample ``new_tokens`` for ``rows`` prompts in generate calls of at most ``batch`` prompts, one
    decode step costing ``step["a"] + step["b"] x rows`` (per-step overhead + per-row work, measured by
    ``llm.experiments.rehearse.calibrate``)."""
    sizes = [min(batch, rows - start) for start in range(0, rows, batch)]
    return sum(new_tokens * (step["a"] + step["b"] * r) for r in sizes)


def units(cfg: EMConfig, stage: str, rows_per_sample: float, steps: dict) -> float:
    """The work that stage ``stage`` of a run with config ``cfg`` grows with (``DRIVERS``). Generation is costed by
    ``decode_seconds`` with the measured step costs of its path (``steps["fast"]`` or ``["hf"]`` for the evaluation,
    ``["edits"]`` for steering, which generates each condition's replies in ``gen_batch_size`` chunks, and for the
    factored stage, which generates one batch per condition); ``rows_per_sample``: evaluation prompts per sample."""
    if stage in ("eval_before", "eval_after"):
        e = cfg.eval
        return decode_seconds(
            round(rows_per_sample * e.samples_per_paraphrase), e.batch_size, e.max_new_tokens, steps[e.generation]
        )
    if stage == "sft":
        return cfg.data.max_examples
    if stage == "steer":
        s = cfg.steer
        return decode_seconds(
            round(rows_per_sample * s.samples_per_paraphrase), s.gen_batch_size, s.max_new_tokens, steps["edits"]
        )
    if stage.startswith("factored"):
        f = cfg.factored
        rows = len(f.topics) * f.samples_per_topic
        return decode_seconds(rows, rows, f.max_new_tokens, steps["edits"])
    if stage == "transfer":
        return cfg.transfer.n_per_class
    return 1.0


def _gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**30, 3)


def device_name() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def clock_of(cuda: bool) -> str:
    """The clock a rehearsal on this device is measured and predicted in: ``wall`` on CUDA, ``cpu`` otherwise."""
    return "wall" if cuda else "cpu"


def clock_fn(clock: str):
    import time

    return time.perf_counter if clock == "wall" else time.process_time


def _seconds(cost: dict, clock: str) -> float:
    """A stage's seconds on ``clock`` (records from before ``cpu_s`` existed have wall seconds only)."""
    return cost.get(f"{clock}_s", cost["wall_s"])


def predict(
    run_dir: Path, used: dict, full: dict, fixed: dict, *, width: str, judge: str, model_folders: dict, counts: dict
) -> dict:
    """The cost dict from the ``stage.json`` files under ``run_dir`` (``<model>/<stage>/``), each stage's work
    ``units`` in the rehearsal (``used``) and in the published run (``full``), the measured ``fixed`` costs
    (``load_s``, ``compile_s``) and the counts (``{"section.field": [rehearsed, published]}``, for the record)."""
    rows = []
    clock = None
    for model in sorted(p.name for p in Path(run_dir).iterdir() if (p / "sft").is_dir()):
        for stage in STAGES:
            record = stage_record(Path(run_dir) / model / stage)
            if record is None:
                continue
            cost = record["cost"]
            clock = clock or ("wall" if "cuda_peak_gb" in cost or "cpu_s" not in cost else "cpu")
            secs = _seconds(cost, clock)
            ratio = full[stage] / used[stage]
            fixed_s = min(LOADS[stage] * fixed["load_s"] + COMPILES.get(stage, 0) * fixed["compile_s"], secs)
            memory = "cuda" if "cuda_peak_gb" in cost else "rss"
            rows.append(
                {
                    "stage": f"{model}/{stage}",
                    "seconds": secs,
                    "wall_s": cost["wall_s"],
                    "fixed_s": round(fixed_s, 1),
                    "driver": DRIVERS[stage],
                    "units": [used[stage], full[stage]],
                    "ratio": round(ratio, 3),
                    "predicted_s": round(fixed_s + (secs - fixed_s) * ratio, 1),
                    "peak_gb": cost.get("cuda_peak_gb", cost["process_peak_rss_gb"]),
                    "memory": memory,
                }
            )
    return {
        "device": device_name(),
        "clock": clock or "wall",
        "width": width,
        "judge": judge,
        "fixed": fixed,
        "counts": counts,
        "stages": rows,
        "measured_s": round(sum(r["seconds"] for r in rows), 1),
        "predicted_s": round(sum(r["predicted_s"] for r in rows), 1),
        "peak_gb": max((r["peak_gb"] for r in rows), default=None),
        "disk_gb": {"models": {k: _gb(v) for k, v in model_folders.items()}, "run": _gb(run_dir)},
    }


def table(cost: dict) -> str:
    """``cost`` as Markdown: one row per stage, then the totals."""
    counts = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in cost["counts"].items())
    lines = [
        f"# Rehearsal cost ({cost['width']} width, judge {cost['judge']}) on {cost['device']}",
        "",
        f"Counts rehearsed -> published: {counts}.",
        f"Fixed per stage: model load {cost['fixed']['load_s']} s, fast-generation compile {cost['fixed']['compile_s']} s; "
        f"decode step s (overhead a + b per row): {cost['fixed']['steps']}.",
        "",
        f"Seconds are {cost.get('clock', 'wall')} seconds"
        + (
            " (this process's CPU time: the work on free cores, whatever the machine's load)."
            if cost.get("clock") == "cpu"
            else "."
        ),
        "",
        f"| stage | grows with | work (rehearsed -> published) | {cost.get('clock', 'wall')} s | fixed s | predicted s | peak GB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in cost["stages"]:
        work = f"{r['units'][0]:g} -> {r['units'][1]:g}" if r["driver"] else "-"
        lines.append(
            f"| {r['stage']} | {r['driver'] or '-'} | {work} | {r.get('seconds', r['wall_s'])} | {r['fixed_s']} | {r['predicted_s']} | "
            f"{r['peak_gb']} ({r['memory']}) |"
        )
    disk = cost["disk_gb"]
    lines += [
        "",
        f"Measured {cost['measured_s']} s; predicted at the published counts: **{cost['predicted_s']} s "
        f"({cost['predicted_s'] / 3600:.2f} h)**, peak memory {cost['peak_gb']} GB.",
        f"Disk: models {disk['models']} GB, run folder {disk['run']} GB (at the rehearsed counts).",
    ]
    return "\n".join(lines) + "\n"


def compare(cost: dict, run_dir: Path) -> str:
    """Markdown: each stage's predicted time (``cost``, on its clock) beside the one measured on the same clock in the
    run folder ``run_dir`` (``<model>/<stage>/stage.json``: the real run, or a rehearsal at other counts), and the totals."""
    clock = cost.get("clock", "wall")
    lines = [f"| stage | predicted {clock} s | measured {clock} s | predicted / measured |", "|---|---:|---:|---:|"]
    pred = meas = 0.0
    for r in cost["stages"]:
        record = stage_record(Path(run_dir) / r["stage"])
        if record is None:
            continue
        wall = _seconds(record["cost"], clock)
        pred, meas = pred + r["predicted_s"], meas + wall
        lines.append(
            f"| {r['stage']} | {r['predicted_s']} | {wall} | {r['predicted_s'] / wall:.2f} |"
            if wall
            else f"| {r['stage']} | {r['predicted_s']} | {wall} | - |"
        )
    if meas == 0:
        raise FileNotFoundError(f"{run_dir} holds no <model>/<stage>/stage.json of the predicted stages")
    lines.append(f"| **total** | {pred:.1f} | {meas:.1f} | {pred / meas:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """python -m llm.experiments.rehearse_cost --cost runs/rehearse/<name>/cost.json --run runs/em_experiment/<name>"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="a rehearsal's predicted stage times beside a run's measured ones")
    ap.add_argument("--cost", required=True, help="cost.json written by llm.experiments.rehearse")
    ap.add_argument(
        "--run",
        required=True,
        help="an llm.experiments.em_experiment run folder (the real run, or another rehearsal's experiment/)",
    )
    args = ap.parse_args(argv)
    out = compare(json.loads(Path(args.cost).read_text()), Path(args.run))
    print(out)
    return out


if __name__ == "__main__":
    main()
