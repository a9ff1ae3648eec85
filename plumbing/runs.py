"""Run folders you can trust: every output folder records the config that made it, the newest complete
checkpoint is chosen by step number, checkpoints are written atomically, and a polite stop (Ctrl-C or
SIGTERM from ``timeout``, ``kill``, Slurm, Docker) saves before exiting.

One rule for every entry point (toy and LLM alike):

- ``claim_output_dir(out, config)`` writes ``out/run_config.json`` on first use; a later run into the same
  folder with another config refuses, naming the keys that differ, unless ``overwrite=True`` (then the
  folder's old contents are removed first). ``overwrite`` removes only a folder this project wrote (one whose
  ``run_config.json`` it can read), and never the working directory or a folder above it, a folder holding a
  ``.git``, or a folder outside the working directory whose path was not typed on the command line (a YAML's
  ``output_dir: ../x`` is not enough). A folder that holds files but no record is refused, with or without
  ``overwrite``: its contents came from something this run cannot vouch for.
- The folder is locked for the run's life (``plumbing.locks``): a second run into it refuses, naming the holder;
  the lock of a dead run is taken over. Hidden temporaries of a killed save are removed when a run claims the folder.
- Checkpoints (``plumbing.checkpoints``): ``latest_checkpoint(out)`` -> the newest ``checkpoint-<step>`` by step
  *number* whose ``trainer_state.json`` parses (damaged newer ones are skipped, named); ``atomic_dir(path)`` writes
  one so that a reader never sees half of it.
- Stops and guards (``plumbing.stops``): SIGTERM saves like Ctrl-C, every rank stops at the same step, a diverged
  run saves nothing of itself. Their names are importable from here too (``__all__``).
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
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from plumbing.checkpoints import (
    atomic_dir,
    checkpoint_step,
    checkpoints,
    clean_temporaries,
    latest_checkpoint,
    read_state,
    resolve_resume,
    write_json_atomic,
)
from plumbing.config import last_parse
from plumbing.locks import LOCK_FILE, RunLocked, lock_run_dir, release_run_dir
from plumbing.stops import (
    DivergenceGuard,
    StopOnSignal,
    Stopped,
    TrainingDiverged,
    any_rank,
    any_ranks,
    polite_stop,
    resume_command,
    stop_flag,
    train_until_stopped,
)

# the run-folder API in one place: entry points import from here what the split modules define
__all__ = [
    "RUN_CONFIG",
    "STAGE_FILE",
    "stage_record",
    "TRAINER_RERUN_KEYS",
    "DivergenceGuard",
    "RunLocked",
    "Stage",
    "StopOnSignal",
    "Stopped",
    "TrainingDiverged",
    "any_rank",
    "any_ranks",
    "atomic_dir",
    "check_overwrite_or_resume",
    "check_resume",
    "checkpoint_step",
    "checkpoints",
    "claim_output_dir",
    "claim_trainer_run",
    "config_diff",
    "config_record",
    "fingerprint",
    "latest_checkpoint",
    "lock_run_dir",
    "polite_stop",
    "read_state",
    "refuse_multiprocess",
    "release_run_dir",
    "removal_refusal",
    "resolve_resume",
    "resume_command",
    "stop_flag",
    "train_until_stopped",
    "world_size",
]

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
# Never written into a run record: records sit next to results and get shared.
SECRET_KEYS = frozenset({"hub_token"})
# ``transformers.TrainingArguments`` fields that a rerun or resume of the same run may change: where and how
# often it logs and saves, where it reports, how it resumes. None of them changes the weights it trains.
TRAINER_RERUN_KEYS = (
    "resume_from_checkpoint",
    "overwrite",
    "output_dir",
    "logging_dir",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "logging_nan_inf_filter",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "report_to",
    "disable_tqdm",
    "run_name",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_on_each_node",
    "save_only_model",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
    "dataloader_num_workers",
    "local_rank",
    "max_loss_ratio",
)
STAGE_FILE = "stage.json"
# Bookkeeping files, not outputs: a folder holding only these holds no results of an earlier run.
_RECORDS = frozenset({RUN_CONFIG, STAGE_FILE, LOCK_FILE})


def _bookkeeping(path: Path) -> bool:
    """A record, the run lock, or a record being written (``write_json_atomic``'s temporary: another rank may be
    writing it while this one checks the folder)."""
    return path.name in _RECORDS or (path.name.startswith(".") and ".tmp-" in path.name)


def config_record(*configs: Any) -> dict:
    """A JSON-able dict of one or more configs (dataclasses or mappings), keyed by class name.

    Values that JSON cannot hold are written with ``str``; keys in ``SECRET_KEYS`` are left out. The
    record is what ``run_config.json`` stores.
    """
    record: dict[str, Any] = {}
    for cfg in configs:
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            name, value = type(cfg).__name__, dataclasses.asdict(cfg)
        elif isinstance(cfg, Mapping):
            name, value = None, dict(cfg)
        else:
            raise TypeError(f"config_record takes dataclass instances or mappings, not {type(cfg).__name__}")
        value = {k: v for k, v in value.items() if k not in SECRET_KEYS}
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
    whole dotted name is in ``ignore`` are skipped (fields a rerun may change, e.g. ``resume_from_checkpoint``)."""
    ignore = set(ignore)
    a, b = _flatten(saved), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or key.rsplit(".", 1)[-1] in ignore:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def _named_by(path: Path, tokens: Iterable[str]) -> bool:
    """True when one of ``tokens`` (or the value of a ``--flag=value`` token) names ``path``."""
    target = path.resolve()
    for arg in tokens:
        for candidate in (arg, arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else None):
            if candidate and not candidate.startswith("-"):
                try:
                    if Path(candidate).expanduser().resolve() == target:
                        return True
                except (OSError, RuntimeError, ValueError):
                    continue
    return False


def _holds_git(out: Path) -> Path | None:
    """The first ``.git`` (folder or file: a worktree, a submodule) anywhere under ``out``, else None."""
    for root, dirs, files in os.walk(out):
        if ".git" in dirs or ".git" in files:
            return Path(root) / ".git"
    return None


def removal_refusal(out: str | Path) -> str | None:
    """Why ``--overwrite`` may not remove ``out``'s contents (None when it may): the guard every removal of a
    run folder goes through. The folder's own record is checked by the caller; this checks where it lies: never
    the working directory or above, the home folder, a folder holding a ``.git``; and, when this process parsed a
    ``--config`` file (``plumbing.config.last_parse``), nothing outside both the working directory and that
    file's project unless the path was typed on the command line. A path passed from Python is typed."""
    out = Path(out)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return f"it is the working directory{' or a folder above it' if resolved != cwd else ''} ({resolved})"
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        return f"it is {'the home folder' if resolved == Path.home().resolve() else 'the file-system root'}"
    git = _holds_git(out)
    if git is not None:
        return f"it holds a git repository ({git})"
    parsed = last_parse()
    anchor = parsed["anchor"]
    if anchor is not None and not (resolved.is_relative_to(cwd) or resolved.is_relative_to(Path(anchor).resolve())):
        if not _named_by(out, parsed["args"] or ()):
            return (
                f"it lies outside the working directory ({cwd}) and outside the project of the --config file "
                f"({anchor}), and its path was not typed on the command line (a config file alone may not "
                "remove a folder elsewhere)"
            )
    return None


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
        overwrite: remove the folder's contents when it holds a run of another config of this project (a
            readable ``run_config.json``), subject to ``removal_refusal``. Never removes a folder without a record.
        ignore: keys that may differ between runs into the same folder (resume flags, logging cadence).
        write: write the record (pass False on non-main ranks: they only check).
    Raises:
        FileExistsError: the folder holds another config's run and ``overwrite`` is False (the message lists the
            differing keys), the folder holds files but no readable record, or ``overwrite`` would remove a
            folder ``removal_refusal`` protects. Nothing is removed when it raises.
        RunLocked: (``write``) another live run holds the folder (``plumbing.locks``); the message names it.

    With ``write`` the folder's lock is taken first and held until the process ends (``release_run_dir`` gives it up
    sooner), so the check and the write below cannot interleave with another run's; temporaries a killed save left
    there are removed once the folder is this run's.
    """
    out = Path(output_dir)
    if not write:
        return _check_and_record(out, config, overwrite, ignore, write=False)
    existed = out.is_dir()
    taken = lock_run_dir(out)
    try:
        _check_and_record(out, config, overwrite, ignore, write=True)
    except BaseException:
        if taken:
            release_run_dir(out)
            if not existed and not any(out.iterdir()):
                out.rmdir()
        raise
    clean_temporaries(out)
    return out


def _check_and_record(out: Path, config: Mapping, overwrite: bool, ignore: Iterable[str], write: bool) -> Path:
    record_path = out / RUN_CONFIG
    if record_path.is_file():
        try:
            saved = json.loads(record_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FileExistsError(
                f"{record_path} cannot be read ({type(err).__name__}: {err}), so {out} cannot be vouched for as a run "
                "of this project: use another output folder, or repair or move that file yourself."
            ) from None
        diff = config_diff(saved, config, ignore)
        only_record = all(_bookkeeping(p) for p in out.iterdir())
        if diff and only_record:
            overwrite = True  # nothing but the old record to replace
        if diff and not overwrite:
            raise FileExistsError(
                f"{out} holds a run of another config ({RUN_CONFIG}); differing keys:\n  "
                + "\n  ".join(diff)
                + "\nUse another output folder, restore those values, or pass --overwrite true to replace the old run."
            )
        if not diff:
            return out
        why = None if only_record else removal_refusal(out)
        if why is not None:
            raise FileExistsError(
                f"--overwrite refuses to empty {out}: {why}. Nothing was removed; use another output folder"
                + (
                    " (type its path on the command line to replace a run outside the working directory)."
                    if "outside the working directory" in why
                    else "."
                )
            )
    elif out.is_dir() and not all(_bookkeeping(p) for p in out.iterdir()):
        raise FileExistsError(
            f"{out} already holds files but no {RUN_CONFIG}, so they were not written by a run of this project"
            f"{' and --overwrite will not remove them' if overwrite else ''}: use another (new or empty) output folder."
        )
    if write:
        if out.is_dir() and overwrite:
            logger.warning("overwrite: removing the previous run in %s", out)
            for p in out.iterdir():
                if p.name in (STAGE_FILE, LOCK_FILE):  # the enclosing Stage's record and this run's lock
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record_path, config)
    return out


def check_resume(checkpoint: str | Path, config: Mapping, ignore: Iterable[str] = ()) -> None:
    """Refuse to resume from ``checkpoint`` when the run folder it sits in recorded another config.

    ``claim_output_dir`` checks the output folder; this covers a checkpoint passed by path from another
    folder. A folder without a record (an older run) is accepted: there is nothing to compare.
    """
    record_path = Path(checkpoint).parent / RUN_CONFIG
    if not record_path.is_file():
        return
    diff = config_diff(json.loads(record_path.read_text()), config, ignore)
    if diff:
        raise ValueError(
            f"cannot resume from {checkpoint}: its run ({record_path}) was made with another config; differing keys:\n  "
            + "\n  ".join(diff)
            + "\nRestore those values to resume, or start a fresh run without --resume_from_checkpoint."
        )


def check_overwrite_or_resume(args) -> None:
    """Refuse a config (``args``: its ``overwrite`` and ``resume_from_checkpoint``) that asks for both: the one removes
    the checkpoints the other would read. Config classes call this from ``__post_init__``."""
    if args.overwrite and args.resume_from_checkpoint:
        raise ValueError("overwrite removes the checkpoints that resume_from_checkpoint would read; pass one of them")


def claim_trainer_run(args, *configs: Any, rerun_keys: Iterable[str] = TRAINER_RERUN_KEYS) -> str | None:
    """The run-folder rule for a ``transformers``/TRL trainer script, before any weights load: record (main
    process) or check ``args.output_dir`` for the config ``configs`` + ``args`` (``args.overwrite``
    replaces another config's run), resolve ``args.resume_from_checkpoint`` (a path or ``last``) and refuse
    a checkpoint of another config. A fresh start over this run's own checkpoints refuses too (the trainer
    would overwrite them one by one) unless ``overwrite``, which removes them. ``rerun_keys``: the fields a
    rerun may change. Returns the checkpoint to pass to ``trainer.train`` (or None)."""
    record = config_record(*configs, args)
    main = os.environ.get("RANK", "0") == "0"
    overwrite = getattr(args, "overwrite", False)
    out = Path(args.output_dir)
    if args.resume_from_checkpoint and checkpoints(out) and not (out / RUN_CONFIG).is_file():
        # A run from before run records: its config cannot be checked, but refusing would leave the user
        # only --overwrite, which deletes the checkpoints they asked to resume from.
        logger.warning(
            "%s has no %s (an older run): resuming without a config check; recording this config", out, RUN_CONFIG
        )
        if main:
            write_json_atomic(out / RUN_CONFIG, record)
    claim_output_dir(out, record, overwrite=overwrite, ignore=rerun_keys, write=main)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume is not None:
        check_resume(resume, record, ignore=rerun_keys)
        logger.info("resuming from %s", resume)
    old = checkpoints(out)
    if resume is None and old:
        if not overwrite:
            raise FileExistsError(
                f"{out} holds checkpoints of a stopped run of this config (up to {old[-1].name}): pass "
                "--resume_from_checkpoint last to continue it, --overwrite true to start again, or another --output_dir"
            )
        if main:
            for path in old:
                shutil.rmtree(path)
    return resume


def stage_record(folder: str | Path) -> dict | None:
    """What the stage in ``folder`` recorded in its ``stage.json`` (its key, ``complete``, and the facts and cost
    ``Stage.finish`` stored), or None when it holds none: how a report or a cost model reads a run folder back."""
    path = Path(folder) / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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
        return stage_record(self.dir)

    def done(self) -> bool:
        saved = self._saved()
        return bool(saved and saved.get("complete") and saved.get("key") == self.key)

    def start(self) -> Path:
        saved = self._saved()
        if self.dir.is_dir() and any(self.dir.iterdir()):
            if saved is None or saved.get("key") != self.key:
                why = (
                    "no stage record"
                    if saved is None
                    else "its config changed:\n  " + "\n  ".join(config_diff(saved.get("key", {}), self.key))
                )
                refusal = removal_refusal(self.dir)
                if refusal is not None:
                    raise FileExistsError(
                        f"stage {self.dir} would be cleared ({why}) but {refusal}: nothing was removed"
                    )
                logger.warning("stage %s: clearing earlier outputs (%s)", self.dir, why)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / STAGE_FILE, {"key": self.key, "complete": False})
        return self.dir

    def finish(self, **facts: Any) -> None:
        write_json_atomic(self.dir / STAGE_FILE, {"key": self.key, "complete": True, **facts})


def world_size() -> int:
    """Processes in this launch as the launcher announces them (torchrun and accelerate set ``WORLD_SIZE``,
    MPI its own), read before any process group exists: 1 for a plain ``python -m``. The environment, not
    ``PartialState()``: without ``cpu=True`` that reports one process under a multi-process CPU launch."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").strip():
            return int(os.environ[key])
    return 1


def refuse_multiprocess(entry: str, instead: str = "") -> None:
    """For an entry point that runs whole in one process: exit before any work when launched with several,
    since every rank would otherwise redo the whole run into the same folder. ``instead`` names what to run."""
    n = world_size()
    if n > 1:
        raise SystemExit(
            f"{entry} runs as one process, but this launch started {n} (WORLD_SIZE={n}): every process would run "
            f"the whole job into the same folder. Run `python -m {entry} ...` without accelerate launch / torchrun "
            f"(one GPU: accelerate launch --num_processes 1 -m {entry} ...){'; ' + instead if instead else ''}."
        )
