"""Run folders you can trust: every output folder records the config that made it, the newest complete
checkpoint is chosen by step number, checkpoints are written atomically, and a polite stop (Ctrl-C or
SIGTERM from ``timeout``, ``kill``, Slurm, Docker) saves before exiting.

One rule for every entry point (toy and LLM alike):

- ``claim_output_dir(out, config)`` writes ``out/run_config.json`` on first use; a later run into the same
  folder with another config refuses, naming the keys that differ, unless ``overwrite=True`` (then the
  folder's old contents are removed first). A folder that holds files but no record is refused too
  (its contents came from something this run cannot vouch for).
- ``latest_checkpoint(out)`` -> the ``checkpoint-<step>`` folder with the largest step *number*
  (``checkpoint-100`` beats ``checkpoint-20``), skipping, with a warning, any whose completion marker
  is missing (a crash while writing it).
- ``atomic_dir(path)`` yields a temporary sibling folder and renames it onto ``path`` only when the
  block finishes, so a reader never sees half a checkpoint.
- ``polite_stop()`` turns SIGTERM into the same ``KeyboardInterrupt`` as Ctrl-C, so one ``except
  KeyboardInterrupt`` path saves for both; ``StopOnSignal`` is the Trainer-callback form (the trainer
  saves a checkpoint at the end of the step in flight and stops; every rank stops at the same step).
- ``Stage(dir, key)`` marks one stage of a multi-stage experiment done together with the key (config
  and upstream fingerprints) that made it; a rerun skips a done stage with the same key and clears a
  stage whose key changed, so a changed config never reuses stale downstream outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
STAGE_FILE = "stage.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def config_record(*configs: Any) -> dict:
    """A JSON-able dict of one or more configs (dataclasses or mappings), keyed by class name.

    Values that JSON cannot hold are written with ``str``; the record is what ``run_config.json`` stores.
    """
    record: dict[str, Any] = {}
    for cfg in configs:
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            name, value = type(cfg).__name__, dataclasses.asdict(cfg)
        elif isinstance(cfg, Mapping):
            name, value = None, dict(cfg)
        else:
            raise TypeError(f"config_record takes dataclass instances or mappings, not {type(cfg).__name__}")
        if name is None:
            record.update(value)
        else:
            record[name] = value
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def fingerprint(record: Any) -> str:
    """A short stable hash of a JSON-able value (sorted keys), for stage keys and file names."""
    text = json.dumps(record, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_diff(saved: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """Lines ``key: saved -> new`` for every (dotted) key whose value differs; keys whose last part or
    whole dotted name is in ``ignore`` are skipped (fields a rerun may change, e.g. ``resume_from``)."""
    ignore = set(ignore)
    a, b = _flatten(saved), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or key.rsplit(".", 1)[-1] in ignore:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def claim_output_dir(
    output_dir: str | Path,
    config: Mapping,
    *,
    overwrite: bool = False,
    ignore: Iterable[str] = (),
    write: bool = True,
) -> Path:
    """Make ``output_dir`` a folder of runs of ``config`` (see the module docstring) and return it.

    Args:
        config: the run's config record (``config_record(...)``).
        overwrite: remove the folder's contents when it holds another config's run (or unknown files).
        ignore: keys that may differ between runs into the same folder (resume flags, logging cadence).
        write: write the record (pass False on non-main ranks: they only check).
    Raises:
        FileExistsError: the folder holds another config's run, or files without a record, and
            ``overwrite`` is False. The message lists the differing keys and what to pass instead.
    """
    out = Path(output_dir)
    record_path = out / RUN_CONFIG
    if record_path.is_file():
        saved = json.loads(record_path.read_text())
        diff = config_diff(saved, config, ignore)
        if diff and not overwrite:
            raise FileExistsError(
                f"{out} holds a run of another config ({RUN_CONFIG}); differing keys:\n  "
                + "\n  ".join(diff)
                + "\nUse another output folder, restore those values, or pass --overwrite true to replace the old run."
            )
        if not diff:
            return out
    elif out.is_dir() and any(p.name != RUN_CONFIG for p in out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds files but no {RUN_CONFIG} (a run from an older version, or other files): "
            "use another output folder, or pass --overwrite true to remove its contents."
        )
    if write:
        if out.is_dir() and overwrite:
            logger.warning("overwrite: removing the previous contents of %s", out)
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(record_path, config)
    return out


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


def latest_checkpoint(output_dir: str | Path, marker: str = "trainer_state.json") -> Path | None:
    """The complete checkpoint with the largest step number (None if none); incomplete ones (no
    ``marker`` file, e.g. a crash mid-write) are skipped with a warning."""
    for path in reversed(checkpoints(output_dir)):
        if (path / marker).is_file():
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s): resuming from the one before", path, marker)
    return None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename (an existing
    ``path`` is moved aside first and removed after), on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def polite_stop() -> Iterator[None]:
    """Within the block SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C, so one handler saves for both.
    A no-op outside the main thread (Python delivers signals to the main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_flag() -> Iterator[dict]:
    """Within the block SIGINT and SIGTERM set ``flag["signal"]`` instead of raising, so the step in
    flight finishes and the caller saves at a step boundary. A second Ctrl-C raises at once."""
    flag: dict[str, Any] = {"signal": None}

    def handle(signum, frame):
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    try:
        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (a no-op without an initialised process group),
    so all ranks stop at the same step and a collective save cannot deadlock."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopOnSignal(TrainerCallback):
    """A ``transformers`` Trainer callback: on SIGINT or SIGTERM the step in flight finishes, the
    trainer saves a checkpoint (``save_strategy`` permitting none is fine: it forces one) and stops.

    Use with ``stop_flag()`` around ``trainer.train()`` and pass the flag in; after ``train()`` returns,
    ``callback.stopped`` names the signal (or is None) so the caller can exit non-zero and say how to resume.
    """

    def __init__(self, flag: dict):
        self.flag = flag
        self.stopped: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.flag.get("signal") is not None):
            self.stopped = self.flag.get("signal") or "signal on another rank"
            control.should_save = True
            control.should_training_stop = True
        return control


@dataclasses.dataclass
class Stage:
    """One resumable stage of a multi-stage experiment, stored in ``dir`` with ``stage.json``.

    ``key`` is everything the stage's outputs depend on: its own config and the fingerprints of the
    stages it reads. ``done()`` is True only for a finished stage with the same key; ``start()`` clears
    outputs left by another key (with a log line) so stale files are never mixed into the new ones.
    """

    dir: Path
    key: dict

    def __post_init__(self):
        self.dir = Path(self.dir)
        self.key = json.loads(json.dumps(self.key, sort_keys=True, default=str))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def _saved(self) -> dict | None:
        path = self.dir / STAGE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def done(self) -> bool:
        saved = self._saved()
        return bool(saved and saved.get("complete") and saved.get("key") == self.key)

    def start(self) -> Path:
        saved = self._saved()
        if self.dir.is_dir() and any(self.dir.iterdir()):
            if saved is None or saved.get("key") != self.key:
                why = "no stage record" if saved is None else "its config changed:\n  " + "\n  ".join(
                    config_diff(saved.get("key", {}), self.key)
                )
                logger.warning("stage %s: clearing earlier outputs (%s)", self.dir, why)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.dir / STAGE_FILE, {"key": self.key, "complete": False})
        return self.dir

    def finish(self, **facts: Any) -> None:
        _write_json_atomic(self.dir / STAGE_FILE, {"key": self.key, "complete": True, **facts})


def world_size() -> int:
    """Processes in this launch as torchrun / ``accelerate launch`` announce them (``WORLD_SIZE``), before
    any process group exists: 1 for a plain ``python -m``."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def refuse_multiprocess(entry: str, instead: str = "") -> None:
    """For an entry point that runs whole in one process: exit before any work when launched with several,
    since every rank would otherwise redo the whole run into the same folder. ``instead`` names what to run."""
    n = world_size()
    if n > 1:
        raise SystemExit(
            f"{entry} runs in one process, but this launch started {n} (WORLD_SIZE={n}): every rank would repeat "
            f"the whole run into one folder. Run `python -m {entry} ...` (one GPU: accelerate launch --num_processes 1 "
            f"-m {entry} ...){'; ' + instead if instead else ''}."
        )
