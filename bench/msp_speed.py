"""Mixed-state presentation (MSP) speed on Mess3(0.05, 0.85), one thread: the level-at-a-time numpy builder
(``toy.msp.mixed_state_presentation``) against the previous sort-based torch one, which
``tests/test_beliefs.py`` keeps as ``reference_mixed_state_presentation``, side by side in one run.

    python bench/msp_speed.py                          # depths 10, 12, 14 (old one up to 12), ~1 minute
    python bench/msp_speed.py --rounds 7 --old_max_depth 14

It prints the load average at the start and the end (the cores may be shared) and, at depths 10 and 12, whether
the new builder meets simplexity's quoted time, both as seconds on this machine and as a ratio to the old
builder timed in the same run (the quoted old time over simplexity's: 8.3x at depth 12, 11.7x at depth 10).

Per depth and implementation (both float64, equal beliefs merged at tol 1e-12, transitions kept):
  cpu s     median over ``--rounds`` interleaved rounds (old, new, old, new, ...) after one warm-up each, of
            this process's CPU time for one build: with one thread, the wall time on a free core;
  wall s    the same in wall-clock seconds (above cpu s when other jobs share the cores);
  peak MB   rise of the peak RSS over its value before the build, in a fresh child process per build;
  old/new   ratio of the medians of cpu s.
Peers (simplexity's compiled JAX tree builder, epsilon-transformers) are not timed: neither is installed on
this project's machines (JAX is not a dependency) and their builders' calls are not pinned here; the script
says whether each is importable and prints their figures as quoted, labelled as such.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load BLAS
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from toy.msp import mixed_state_presentation  # noqa: E402
from toy.processes import mess3  # noqa: E402

# Quoted, not measured here: one thread, median of 3, Mess3(0.05, 0.85).
SIMPLEXITY, OLD_QUOTED = {10: 0.0035, 12: 0.047}, {10: 0.041, 12: 0.39}
PEERS = [  # (label, importable module or None, figures)
    ("simplexity (JAX, compiled, f32, no merging/transitions)", "simplexity", SIMPLEXITY),
    ("epsilon-transformers", "epsilon_transformers", "26-27x slower than the project MSP before this builder"),
    ("the project MSP before this builder (the 'old' rows)", None, OLD_QUOTED),
]


def reference():
    """The previous implementation, from the test module that keeps it (loaded by path: ``tests`` is no package)."""
    spec = importlib.util.spec_from_file_location("msp_reference", REPO / "tests" / "test_beliefs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in it look their module up here
    spec.loader.exec_module(module)
    return module.reference_mixed_state_presentation


def builders() -> dict:
    return {"old": reference(), "new": mixed_state_presentation}


def _status_kib(field: str) -> int:
    return next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field)
    )


def child(impl: str, depth: int) -> None:
    """One build in this (fresh) process; prints nodes and the rise of the peak RSS in MB as JSON.

    The peak is reset to the current RSS first (Linux ``clear_refs``): importing torch peaks above what a small
    build adds, so the lifetime peak (``ru_maxrss``) would hide it."""
    build = builders()[impl]
    process = mess3(0.05, 0.85)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS:")
    n = build(process, depth).n_nodes
    print(json.dumps({"nodes": n, "peak_mb": (_status_kib("VmHWM:") - before) / 1024}))


def peak_mb(impl: str, depth: int) -> float:
    cmd = [sys.executable, __file__, "--child", impl, str(depth)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def blas_note() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(
        f"{i['internal_api']} {i.get('architecture', '')} threads={i['num_threads']}" for i in threadpool_info()
    )


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 12, 14])
    ap.add_argument("--rounds", type=int, default=5, help="Interleaved timed rounds per depth (median of these).")
    ap.add_argument(
        "--old_max_depth",
        type=int,
        default=12,
        help="Deepest depth the old implementation runs at (depth 14 has 9x the nodes of 12: seconds and GBs a build).",
    )
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DEPTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))
    if args.rounds < 3:
        raise SystemExit("--rounds must be >= 3 (a median of fewer is one noisy sample)")
    torch.set_num_threads(1)
    process, build = mess3(0.05, 0.85), builders()
    print(f"Mess3(0.05, 0.85), one thread; {blas_note()}; load average {load()} at the start")
    rows = []
    for depth in args.depths:
        impls = [k for k in build if k == "new" or depth <= args.old_max_depth]
        times = {k: ([], []) for k in impls}
        nodes = {k: build[k](process, depth).n_nodes for k in impls}  # warm-up
        for _ in range(args.rounds):
            for k in impls:
                c, w = time.process_time(), time.perf_counter()
                build[k](process, depth)
                times[k][0].append(time.process_time() - c)
                times[k][1].append(time.perf_counter() - w)
        for k in impls:
            rows.append(
                {
                    "depth": depth,
                    "impl": k,
                    "nodes": nodes[k],
                    "cpu_s": statistics.median(times[k][0]),
                    "wall_s": statistics.median(times[k][1]),
                    "peak_mb": peak_mb(k, depth),
                }
            )
        if "old" not in impls:
            rows.append({"depth": depth, "impl": "old", "skipped": f"depth > --old_max_depth {args.old_max_depth}"})
    print(f"\n| depth | implementation | nodes | cpu s (median of {args.rounds}) | wall s | peak MB | old/new |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['depth']} | {r['impl']} | | skipped: {r['skipped']} | | | |")
            continue
        old = next((o for o in rows if o["depth"] == r["depth"] and o["impl"] == "old" and "cpu_s" in o), None)
        ratio = f"{old['cpu_s'] / r['cpu_s']:.1f}x" if r["impl"] == "new" and old else ""
        print(
            f"| {r['depth']} | {r['impl']} | {r['nodes']:,} | {r['cpu_s']:.4f} | {r['wall_s']:.4f} | {r['peak_mb']:.0f} | {ratio} |"
        )
    print(f"load average {load()} at the end (this machine's cores are shared: compare the ratios)")
    print("\nTargets: simplexity's quoted time, and the same as a ratio to the old builder timed in this run")
    print("(the quoted old time over simplexity's, which does not depend on how fast or loaded this machine is):")
    for depth, target in SIMPLEXITY.items():
        new = next((r for r in rows if r["depth"] == depth and r["impl"] == "new"), None)
        old = next((r for r in rows if r["depth"] == depth and r["impl"] == "old" and "cpu_s" in r), None)
        if new is None or old is None:
            continue
        ratio, need = old["cpu_s"] / new["cpu_s"], OLD_QUOTED[depth] / target
        print(
            f"  depth {depth}: new {new['cpu_s']:.4f} s ({'met' if new['cpu_s'] <= target else 'NOT met'}: <= {target} s);"
            f" {ratio:.1f}x the old builder ({'met' if ratio >= need else 'NOT met'}: >= {need:.1f}x ="
            f" {OLD_QUOTED[depth]} / {target})"
        )
    print("\nReference figures as quoted (measured by someone else, one thread, median of 3; not by this script):")
    for name, module, fig in PEERS:
        text = fig if isinstance(fig, str) else ", ".join(f"depth {d}: {s} s" for d, s in fig.items())
        installed = (
            ""
            if module is None
            else f" [{module} {'importable' if importlib.util.find_spec(module) else 'not installed'} here]"
        )
        print(f"  {name}: {text}{installed}")
    return rows


if __name__ == "__main__":
    main()
