"""A grid of independent cells split over processes: each process runs every N-th cell, writes each cell's
result to its own folder in one atomic rename, skips cells already complete (so a rerun resumes), and one
process builds the summary from the cell files.

Two ways to get N processes, which combine:

- a launcher (``torchrun``, ``accelerate launch``, MPI) starting ``W`` processes: ``leave_launch`` reads this
  process's rank from the launcher's environment and then *removes* those variables, so every library below
  (accelerate, trl) runs the process as a plain single one on its own GPU -- the cells share no process group,
  no gradients and no state. Rank 0 waits for the other ranks' cell files (``wait_for_cells``) and summarises;
- ``--shard i/N`` for schedulers without a launcher (a SLURM array, N shells): shard ``i`` runs every N-th cell.

Under both, cell ``j`` belongs to position ``j mod (N * W)`` with position ``i * W + rank``. Nothing here
knows what a cell computes: a cell is a name and a function ``(name, cell_dir) -> JSON-able dict``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from plumbing.runs import RUN_CONFIG, config_diff, world_size

RESULT = "result.json"
# What torchrun / accelerate launch / MPI tell a process about its launch; accelerate and trl start a process
# group when they see any of these (``accelerate.state.PartialState._prepare_backend``).
LAUNCH_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_SIZE",
    "PMI_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_RANK",
    "MPI_LOCALRANKID",
)


@dataclass(frozen=True)
class Position:
    """Where this process stands: it runs cells ``index, index + count, ...``; ``launch_rank`` / ``launch_size``
    are its rank and the process count of its launcher (0 / 1 for a plain ``python -m``), ``shard`` its
    ``--shard`` index."""

    index: int
    count: int
    launch_rank: int = 0
    launch_size: int = 1
    shard: int = 0

    @property
    def main(self) -> bool:
        """The process of its launch that waits for the launch's cells and writes the summary."""
        return self.launch_rank == 0


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)``; a clear error for anything else."""
    i, _, n = str(shard).partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ValueError(f"shard must be i/N with 0 <= i < N (e.g. 0/4), got {shard!r}")
    return int(i), int(n)


def _env_int(keys: Iterable[str], default: int) -> int:
    for key in keys:
        if os.environ.get(key, "").strip():
            return int(os.environ[key])
    return default


def leave_launch(shard: str = "0/1") -> Position:
    """This process's ``Position`` from ``shard`` and the launcher's environment; then the launcher's variables
    are removed (every cell runs as one plain process) and, with CUDA, this process is pinned to GPU
    ``local_rank`` (accelerate's single-process device is ``cuda``, i.e. the current one).

    Call before anything creates an ``accelerate`` state or touches a process group."""
    i, n = parse_shard(shard)
    size = world_size()
    rank = _env_int(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"), 0)
    local = _env_int(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), rank)
    if not 0 <= rank < size:
        raise ValueError(f"launcher rank {rank} outside its world size {size}: check RANK / WORLD_SIZE")
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    if size > 1:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
    return Position(index=i * size + rank, count=n * size, launch_rank=rank, launch_size=size, shard=i)


def mine(names: list[str], pos: Position) -> list[str]:
    """The cells ``pos`` runs: ``names[pos.index :: pos.count]``."""
    return names[pos.index :: pos.count]


def launch_cells(names: list[str], pos: Position) -> list[str]:
    """The cells run by every process of ``pos``'s launch (its shard): those ``launch_rank 0`` waits for."""
    return [n for j, n in enumerate(names) if (j % pos.count) // pos.launch_size == pos.shard]


def result_path(cells_dir: str | Path, name: str) -> Path:
    return Path(cells_dir) / name / RESULT


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and one rename: a reader (another process
    polling for it) sees the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cells(
    names: list[str], run: Callable[[str, Path], Mapping[str, Any]], cells_dir: str | Path, pos: Position
) -> list[str]:
    """Run ``run(name, cells_dir / name)`` for each of ``pos``'s cells without a result yet and write its
    result to ``cells_dir / name / result.json`` (atomically, last: its presence means the cell is complete).
    Returns the names run now (cells found complete are skipped: the caller's run record vouches for them)."""
    done = []
    for name in mine(names, pos):
        path = result_path(cells_dir, name)
        if path.is_file():
            continue
        result = run(name, path.parent)
        write_atomic(path, json.dumps(result, indent=1))
        done.append(name)
    return done


def present(cells_dir: str | Path, names: list[str]) -> dict[str, dict]:
    """The results written so far, by name, in grid order."""
    return {n: json.loads(p.read_text()) for n in names if (p := result_path(cells_dir, n)).is_file()}


def wait_for_cells(cells_dir: str | Path, names: list[str], timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until every cell in ``names`` has a result file; after ``timeout_s`` seconds raise
    ``TimeoutError`` naming the missing cells (a crashed rank's, usually) and how to finish them."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [n for n in names if not result_path(cells_dir, n).is_file()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{len(missing)} of {len(names)} cells still missing in {cells_dir} after {timeout_s:.0f} s: "
                + ", ".join(missing)
                + ". Another process may have failed (see its log); rerun the same command to run only the missing "
                "cells, or summarise what is there with --summarize_only true."
            )
        time.sleep(poll_s)


def wait_for_record(
    out_dir: str | Path, record: Mapping, ignore: Iterable[str], timeout_s: float, poll_s: float = 0.5
) -> Path:
    """For ranks other than the main one: wait until the main rank has claimed ``out_dir`` for ``record``
    (``plumbing.runs.claim_output_dir``), so no rank writes a cell into a folder that is about to be cleared."""
    path, deadline = Path(out_dir) / RUN_CONFIG, time.monotonic() + timeout_s
    while True:
        # the record is written by one rename (claim_output_dir), so a file that exists is whole
        if path.is_file() and not config_diff(json.loads(path.read_text()), record, ignore):
            return Path(out_dir)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{path} did not record this run's config within {timeout_s:.0f} s: did rank 0 fail to start?"
            )
        time.sleep(poll_s)
