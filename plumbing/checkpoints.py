"""Checkpoint folders: ``checkpoint-<step>`` chosen by step *number*, read only after their state file parses, and
written atomically.

- ``latest_checkpoint(out)`` -> the newest checkpoint whose state file (``trainer_state.json``) is a whole JSON object
  (with ``keys``, when given): one without it (a crash while writing), or with a 0-byte or truncated one (a full disk),
  is skipped with a warning naming it, and the warning names the one the resume takes instead.
- ``read_state(ckpt)`` parses a checkpoint's state file, raising ``ValueError`` naming the file when it is damaged:
  a checkpoint passed by path is checked before anything loads from it.
- ``atomic_dir(path)`` yields a temporary sibling folder (``.<name>.tmp-<pid>``) renamed onto ``path`` only when the
  block finishes, so a reader never sees half a checkpoint. A save killed mid-way leaves that hidden folder behind;
  ``clean_temporaries(folder)`` removes those of processes that are no longer running (``atomic_dir`` does it in the
  folder it writes to, ``plumbing.runs.claim_output_dir`` in the run folder it claims).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from plumbing.locks import pid_alive

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# atomic_dir's temporary and moved-aside folders, write_json_atomic's temporary files
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """The step number of a ``checkpoint-<step>`` folder name, else None."""
    m = _CHECKPOINT.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder in ``output_dir``, sorted by step number."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def state_problem(file: Path, keys: Iterable[str] = ()) -> str | None:
    """Why ``file`` is not a usable checkpoint state (missing, empty, not a JSON object, lacking one of ``keys``),
    or None when it is."""
    if not file.is_file():
        return f"no {file.name}"
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return f"{file.name} cannot be read ({type(err).__name__}: {err})"
    if not text.strip():
        return f"{file.name} is empty ({file.stat().st_size} bytes: a save cut short, e.g. a full disk)"
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        return f"{file.name} is not whole JSON ({err}; {len(text)} bytes: a save cut short?)"
    if not isinstance(state, dict):
        return f"{file.name} holds a {type(state).__name__}, not a JSON object"
    missing = [k for k in keys if k not in state]
    return f"{file.name} lacks {missing}" if missing else None


def read_state(checkpoint: str | Path, marker: str = TRAINER_STATE, keys: Iterable[str] = ()) -> dict:
    """The parsed state file of ``checkpoint``; ``ValueError`` naming the file when it is missing or damaged."""
    file = Path(checkpoint) / marker
    why = state_problem(file, keys)
    if why is not None:
        raise ValueError(
            f"cannot resume from {checkpoint}: {why} ({file}). Pass an earlier checkpoint-<step> folder, or "
            "'last' to take the newest complete one"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def latest_checkpoint(output_dir: str | Path, marker: str = TRAINER_STATE, keys: Iterable[str] = ()) -> Path | None:
    """The checkpoint with the largest step number whose ``marker`` file parses (None if none); newer ones that do
    not (see the module docstring) are skipped, each with a warning, and the one taken instead is named."""
    skipped = []
    for path in reversed(checkpoints(output_dir)):
        why = state_problem(path / marker, keys)
        if why is None:
            if skipped:
                logger.warning(
                    "resuming from %s, the newest complete checkpoint (skipped: %s)",
                    path,
                    ", ".join(p.name for p in skipped),
                )
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, why)
        skipped.append(path)
    return None


def clean_temporaries(folder: str | Path) -> list[Path]:
    """Remove the hidden temporaries (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) that a killed save left in
    ``folder``, those of processes no longer running on this machine; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        logger.warning(
            "removed %d temporary file(s) left by a killed save in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed),
        )
    return removed


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename (an existing
    ``path`` is moved aside first and removed after), on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and one rename: readers see the old or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """``--resume_from_checkpoint`` as the Trainer wants it: ``last`` (or True) -> the newest complete
    checkpoint in ``output_dir`` by step number (None, with a log line, when there is none); a path must hold a
    state file that parses (``read_state``); None/False -> None."""
    if value in (None, False, ""):
        return None
    if value is True or value == "last":
        last = latest_checkpoint(output_dir)
        if last is None:
            logger.info("resume_from_checkpoint=last but no complete checkpoint in %s: starting fresh", output_dir)
            return None
        return str(last)
    path = Path(value)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={value}: no {TRAINER_STATE} there; pass a checkpoint-<step> folder "
            f"or 'last' (the newest complete checkpoint in {output_dir})"
        )
    read_state(path)
    return str(path)
