"""Run-folder bookkeeping shared by every entry point: config records, checkpoint order, atomic writes,
polite stops, resumable stages."""

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from plumbing.runs import (
    RUN_CONFIG,
    DivergenceGuard,
    Stage,
    Stopped,
    TrainingDiverged,
    atomic_dir,
    check_resume,
    claim_output_dir,
    claim_trainer_run,
    config_diff,
    config_record,
    latest_checkpoint,
    polite_stop,
    resolve_resume,
    resume_command,
    stop_flag,
)


@dataclass
class A:
    seed: int = 0
    lr: float = 1e-3


def test_config_record_keys_dataclasses_by_class_name():
    rec = config_record(A(seed=3), {"extra": [1, 2]})
    assert rec == {"A": {"seed": 3, "lr": 1e-3}, "extra": [1, 2]}
    assert config_diff(rec, config_record(A(seed=4), {"extra": [1, 2]})) == ["A.seed: 3 -> 4"]
    assert config_diff(rec, config_record(A(seed=4), {"extra": [1, 2]}), ignore=["seed"]) == []


def test_claim_output_dir_records_then_refuses_another_config(tmp_path):
    out = tmp_path / "run"
    claim_output_dir(out, config_record(A()))
    assert json.loads((out / RUN_CONFIG).read_text()) == {"A": {"seed": 0, "lr": 1e-3}}
    (out / "checkpoint-10").mkdir()
    claim_output_dir(out, config_record(A()))  # same config: fine
    with pytest.raises(FileExistsError, match=r"(?s)A\.seed: 0 -> 1.*--overwrite"):
        claim_output_dir(out, config_record(A(seed=1)))
    assert (out / "checkpoint-10").is_dir()  # refusing removed nothing
    claim_output_dir(out, config_record(A(seed=1)), overwrite=True)
    assert not (out / "checkpoint-10").exists()
    assert json.loads((out / RUN_CONFIG).read_text())["A"]["seed"] == 1


def test_config_record_leaves_secrets_out():
    assert config_record({"hub_token": "hf_secret", "seed": 1}) == {"seed": 1}


def test_a_folder_holding_only_its_record_is_taken_over(tmp_path):
    """A run that failed before writing anything (bad data file, typo) must not lock its folder."""
    claim_output_dir(tmp_path, config_record(A()))
    claim_output_dir(tmp_path, config_record(A(seed=2)))
    assert json.loads((tmp_path / RUN_CONFIG).read_text())["A"]["seed"] == 2


def test_resume_checks(tmp_path):
    run = tmp_path / "run"
    claim_output_dir(run, config_record(A()))
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-12").mkdir()  # no trainer_state.json: a crash mid-save
    assert resolve_resume("last", run) == str(run / "checkpoint-3")
    assert resolve_resume(None, run) is None and resolve_resume("last", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no trainer_state.json.*'last'"):
        resolve_resume(str(run / "checkpoint-12"), run)
    check_resume(run / "checkpoint-3", config_record(A()))
    with pytest.raises(ValueError, match=r"(?s)another config.*A\.lr"):
        check_resume(run / "checkpoint-3", config_record(A(lr=1.0)))


def test_stopped_says_how_to_resume():
    stop = Stopped("SIGTERM", "out/checkpoint-4")
    assert stop.exit_code == 128 + signal.SIGTERM
    text = stop.describe(
        resume_command("llm.experiments.sft", ["--config", "a b.yaml", "--resume_from_checkpoint", "x"])
    )
    assert (
        "out/checkpoint-4" in text
        and "python -m llm.experiments.sft --config 'a b.yaml' --resume_from_checkpoint last" in text
    )


class _State:
    global_step = 7


def test_divergence_guard_raises_on_non_finite_and_runaway_loss():
    import torch

    guard = DivergenceGuard(max_loss_ratio=5, reference_logs=2)
    layer = torch.nn.Linear(2, 2)
    guard.on_step_end(None, _State(), None, model=layer)
    guard.on_log(None, _State(), None, logs={"loss": 0.1, "grad_norm": 1.0})
    guard.on_log(None, _State(), None, logs={"loss": 3.9})  # the yardstick is the mean, 2.0
    guard.on_log(None, _State(), None, logs={"loss": 9.0})
    with pytest.raises(
        TrainingDiverged,
        match=r"step 7: loss 11 exceeds max_loss_ratio=5 x the mean of the first 2 logged losses \(2\)",
    ):
        guard.on_log(None, _State(), None, logs={"loss": 11.0})
    with pytest.raises(TrainingDiverged, match="grad_norm is nan"):
        DivergenceGuard().on_log(None, _State(), None, logs={"loss": 1.0, "grad_norm": float("nan")})
    with torch.no_grad():
        layer.bias[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="NaN or inf.*before saving"):
        guard.on_step_end(None, _State(), None, model=layer)
    layer.bias.requires_grad_(False)  # frozen weights are not this guard's business
    guard.on_step_end(None, _State(), None, model=layer)


def test_claim_output_dir_refuses_unrecorded_files(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no run_config.json"):
        claim_output_dir(tmp_path, {"x": 1})
    claim_output_dir(tmp_path / "fresh", {"x": 1})  # a new folder is fine


def test_latest_checkpoint_by_step_number_skips_incomplete(tmp_path, caplog):
    for step in (20, 100, 300):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (20, 100):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-100"  # not checkpoint-20 (text order), not 300
    assert "incomplete" in caplog.text
    assert latest_checkpoint(tmp_path / "missing") is None


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "checkpoint-5"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]  # no temporary left behind
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_polite_stop_turns_sigterm_into_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with polite_stop():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stop_flag_records_the_signal_without_raising():
    with stop_flag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stage_done_only_for_the_same_key_and_clears_stale_outputs(tmp_path):
    st = Stage(tmp_path / "eval", {"model": "a", "n": 8})
    assert not st.done()
    st.start()
    (st.dir / "replies.csv").write_text("partial")
    assert not st.done()
    Stage(tmp_path / "eval", {"model": "a", "n": 8}).start()  # same key, unfinished: partial outputs kept
    assert (st.dir / "replies.csv").read_text() == "partial"
    st.finish(rows=8)
    assert Stage(tmp_path / "eval", {"model": "a", "n": 8}).done()
    changed = Stage(tmp_path / "eval", {"model": "a", "n": 16})
    assert not changed.done()
    changed.start()
    assert not (changed.dir / "replies.csv").exists()
    assert st.fingerprint != changed.fingerprint


@dataclass
class Args:
    output_dir: str
    resume_from_checkpoint: str | None = None
    seed: int = 0


def test_resuming_a_run_from_before_run_records_keeps_its_checkpoints(tmp_path, caplog):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no run_config.json"):  # a fresh run may not take it over
        claim_trainer_run(Args(str(tmp_path)))
    assert claim_trainer_run(Args(str(tmp_path), "last")) == str(tmp_path / "checkpoint-4")
    assert "older run" in caplog.text and (tmp_path / RUN_CONFIG).is_file()
    with pytest.raises(FileExistsError, match="Args.seed: 0 -> 1"):  # from now on it is checked
        claim_trainer_run(Args(str(tmp_path), "last", seed=1))


def test_a_stage_folder_is_claimable_by_the_run_inside_it(tmp_path):
    """A Stage writes stage.json first; the evaluation it runs then claims the same folder: the stage record
    is bookkeeping, not an earlier run's output (and --overwrite leaves it to the stage)."""
    st = Stage(tmp_path / "eval_before", {"model": "a"})
    st.start()
    claim_output_dir(st.dir, {"x": 1})
    (st.dir / "replies.csv").write_text("r")
    claim_output_dir(st.dir, {"x": 2}, overwrite=True)
    assert sorted(p.name for p in st.dir.iterdir()) == [
        ".run.lock",
        RUN_CONFIG,
        "stage.json",
    ]  # the lock: held till exit


def test_a_record_being_written_by_another_rank_is_not_an_unknown_file(tmp_path):
    """Rank 0 writes run_config.json through a temporary file while rank 1 checks the folder (write=False):
    the temporary must not read as 'files but no record' (a 2-rank CI run failed on exactly that)."""
    (tmp_path / f".{RUN_CONFIG}.tmp-1234").write_text("{")
    claim_output_dir(tmp_path, {"x": 1}, write=False)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no run_config.json"):
        claim_output_dir(tmp_path, {"x": 1}, write=False)


# --overwrite removes only what a run of this project wrote (a folder with a readable run_config.json), never the
# working directory, a folder holding a .git, or a folder outside the working directory named only in a config.


def test_overwrite_never_removes_a_folder_without_a_record(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="no run_config.json") as err:
        claim_output_dir(tmp_path, {"x": 1}, overwrite=True)
    assert "--overwrite true" not in str(err.value)  # the refusal no longer suggests deleting
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_empties_the_working_directory_or_a_repository(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "README.md").write_text("code")
    (clone / RUN_CONFIG).write_text(json.dumps({"x": 0}))  # even a folder that looks like a run
    monkeypatch.chdir(clone)
    with pytest.raises(FileExistsError, match="working directory.*Nothing was removed"):
        claim_output_dir(".", {"x": 1}, overwrite=True)
    sub = clone / "runs" / "a"
    sub.mkdir(parents=True)
    (sub / RUN_CONFIG).write_text(json.dumps({"x": 0}))
    (sub / "notes").mkdir()
    (sub / "notes" / ".git").write_text("gitdir: elsewhere")  # a worktree's .git file counts too
    with pytest.raises(FileExistsError, match="git repository"):
        claim_output_dir(sub, {"x": 1}, overwrite=True)
    with pytest.raises(FileExistsError, match="working directory"):
        claim_output_dir(clone / "runs" / "..", {"x": 1}, overwrite=True)
    assert (clone / ".git").is_dir() and (clone / "README.md").is_file() and (sub / "notes").is_dir()


def test_overwrite_outside_the_project_needs_the_path_on_the_command_line(tmp_path, monkeypatch):
    """A YAML holding ``output_dir: ../x`` and ``overwrite: true`` emptied a folder outside the project with no
    flag typed. Now a folder named only by a config file, outside the working directory and the config's project,
    is refused; typing its path on the command line is how the user says they mean it."""
    from plumbing.config import ConfigParser

    @dataclass
    class Out:
        output_dir: str = "runs/a"
        overwrite: bool = False

    project, outside = tmp_path / "project", tmp_path / "x"
    (project / "configs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    (project / "configs" / "c.yaml").write_text("output_dir: ../x\noverwrite: true\n")
    outside.mkdir()
    (outside / RUN_CONFIG).write_text(json.dumps({"x": 0}))
    (outside / "weights.bin").write_text("w")
    monkeypatch.chdir(project)
    (cfg,) = ConfigParser((Out,)).parse_args_and_config(["--config", "configs/c.yaml"])
    assert Path(cfg.output_dir).resolve() == outside and cfg.overwrite
    with pytest.raises(FileExistsError, match="outside the working directory.*command line"):
        claim_output_dir(cfg.output_dir, {"x": 1}, overwrite=cfg.overwrite)
    assert (outside / "weights.bin").is_file()
    (cfg,) = ConfigParser((Out,)).parse_args_and_config(["--config", "configs/c.yaml", "--output_dir=../x"])
    claim_output_dir(cfg.output_dir, {"x": 1}, overwrite=cfg.overwrite)  # typed: the user means it
    assert not (outside / "weights.bin").exists()


def test_an_unreadable_record_is_refused_not_parsed_into_a_traceback(tmp_path):
    (tmp_path / RUN_CONFIG).write_text("{ truncated")
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileExistsError, match="cannot be read.*JSONDecodeError"):
        claim_output_dir(tmp_path, {"x": 1}, overwrite=True)
    assert (tmp_path / "checkpoint-2").is_dir()


def test_overwrite_inside_the_working_directory_still_replaces_a_project_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    claim_output_dir("runs/a", {"x": 0})
    (tmp_path / "runs" / "a" / "checkpoint-4").mkdir()
    claim_output_dir("runs/a", {"x": 1}, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "runs" / "a").iterdir()) == [".run.lock", RUN_CONFIG]


# --------------------------------------------------------------------------- the run lock, damaged checkpoints, leftovers


def _holder(tmp_path, out):
    """A separate process that holds ``out``'s run lock and keeps running (until killed)."""
    import subprocess
    import sys

    # plumbing.locks alone (what claim_output_dir takes first): no torch / transformers import to wait for
    code = (
        "import time\nfrom plumbing.locks import lock_run_dir\n"
        f"lock_run_dir({str(out)!r})\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, caplog):
    """Two runs into one folder both went ahead (check, then write). Now the second refuses while the first lives,
    naming its pid and host; once the first is killed (-9: no clean-up ran), its lock is stale and taken over."""
    import socket

    out = tmp_path / "run"
    holder = _holder(tmp_path, out)
    try:
        with pytest.raises(
            FileExistsError, match=rf"in use by another run: pid {holder.pid} on host {socket.gethostname()}"
        ):
            claim_output_dir(out, {"x": 1})
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(out, {"x": 1})
    assert f"stale lock of pid {holder.pid}" in caplog.text


def test_a_lock_recorded_on_another_host_is_refused(tmp_path):
    """flock may not reach across the hosts of a network file system: only that host can tell whether its pid lives."""
    (tmp_path / ".run.lock").write_text(
        json.dumps({"pid": 1, "host": "node-elsewhere", "started": "t", "command": "c"})
    )
    with pytest.raises(FileExistsError, match=r"another machine: pid 1 on host node-elsewhere.*remove .*\.run\.lock"):
        claim_output_dir(tmp_path, {"x": 1})


def _checkpoint(out, step, state):
    (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / f"checkpoint-{step}" / "trainer_state.json").write_text(state)


def test_resume_skips_an_empty_or_cut_off_trainer_state_naming_it_and_the_one_taken(tmp_path, caplog):
    """A full disk during a save left a 0-byte or truncated trainer_state.json; resume took that checkpoint (only
    existence was checked) and died with a JSONDecodeError naming no file. Now both are skipped, named, and the
    warning names the checkpoint resumed from instead."""
    _checkpoint(tmp_path, 2, json.dumps({"global_step": 2}))
    _checkpoint(tmp_path, 4, '{"global_step": 4, "log_hist')
    _checkpoint(tmp_path, 6, "")
    assert claim_trainer_run(Args(str(tmp_path), "last")) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-6: trainer_state.json is empty" in caplog.text
    assert "checkpoint-4: trainer_state.json is not whole JSON" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-2'}, the newest complete checkpoint" in caplog.text


def test_resuming_from_a_damaged_checkpoint_by_path_names_the_file(tmp_path):
    _checkpoint(tmp_path, 4, '{"global_st')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'checkpoint-4' / 'trainer_state.json'}"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)


def test_a_killed_saves_temporaries_are_removed_when_the_next_run_claims_the_folder(tmp_path):
    """atomic_dir writes into .<name>.tmp-<pid>; a save killed mid-way left it behind for good. Now the next run
    removes those of dead pids (here one of a finished process) and leaves a live process's alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    claim_output_dir(tmp_path, {"x": 1})
    (tmp_path / f".checkpoint-4.tmp-{dead_pid}").mkdir()
    (tmp_path / f".checkpoint-4.tmp-{dead_pid}" / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / f".{RUN_CONFIG}.tmp-{dead_pid}").write_text("{")
    (tmp_path / f".checkpoint-6.tmp-{live_pid}").mkdir()
    claim_output_dir(tmp_path, {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint-6.tmp-{live_pid}", ".run.lock", RUN_CONFIG]
