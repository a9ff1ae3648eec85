"""plumbing.grid: positions from --shard and the launcher, every cell run exactly once, atomic results, resume,
rank 0's wait with a named timeout."""

import json
import os

import pytest

from plumbing.grid import (
    LAUNCH_ENV,
    Position,
    launch_cells,
    leave_launch,
    mine,
    parse_shard,
    present,
    run_cells,
    wait_for_cells,
    wait_for_record,
)
from plumbing.runs import claim_output_dir


@pytest.fixture
def no_launch(monkeypatch):
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)


def test_leave_launch_reads_the_rank_and_removes_the_launchers_variables(no_launch):
    assert leave_launch("1/3") == Position(index=1, count=3, shard=1)
    no_launch.setenv("WORLD_SIZE", "2")
    no_launch.setenv("RANK", "1")
    no_launch.setenv("LOCAL_RANK", "1")
    no_launch.setenv("MASTER_PORT", "29500")
    pos = leave_launch("2/3")  # shard 2 of 3, rank 1 of 2: position 2 * 2 + 1 of 6
    assert (pos.index, pos.count, pos.launch_rank, pos.launch_size, pos.main) == (5, 6, 1, 2, False)
    assert not any(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"))
    # so accelerate below sees one plain process
    from accelerate.state import PartialState

    PartialState._reset_state()
    try:
        assert PartialState(cpu=True).num_processes == 1
    finally:
        PartialState._reset_state()


@pytest.mark.parametrize("shards,ranks", [(1, 1), (3, 1), (1, 4), (2, 3)])
def test_every_cell_runs_exactly_once_and_rank0_waits_for_its_launch(shards, ranks):
    names = [f"c{j}" for j in range(11)]
    positions = [Position(i * ranks + r, shards * ranks, r, ranks, i) for i in range(shards) for r in range(ranks)]
    runs = [n for p in positions for n in mine(names, p)]
    assert sorted(runs) == sorted(names)
    for i in range(shards):
        ranks_of_shard = [p for p in positions if p.shard == i]
        assert sorted(launch_cells(names, ranks_of_shard[0])) == sorted(
            n for p in ranks_of_shard for n in mine(names, p)
        )


def test_run_cells_writes_each_result_once_and_resumes(tmp_path):
    names, calls = ["a", "b", "c"], []

    def run(name, cell_dir):
        calls.append(name)
        assert cell_dir == tmp_path / name
        if name == "c" and calls.count("c") == 1:
            raise RuntimeError("crash mid-cell")
        return {"name": name, "x": float("nan")}

    with pytest.raises(RuntimeError):
        run_cells(names, run, tmp_path, Position(0, 1))
    assert list(present(tmp_path, names)) == ["a", "b"] and not (tmp_path / "c" / "result.json").exists()
    assert [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []
    assert run_cells(names, run, tmp_path, Position(0, 1)) == ["c"]  # the rerun runs only the missing cell
    assert calls == ["a", "b", "c", "c"]
    assert json.loads((tmp_path / "c" / "result.json").read_text())["name"] == "c"


def test_wait_for_cells_names_the_missing_ones(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text("{}")
    wait_for_cells(tmp_path, ["a"], timeout_s=0)
    with pytest.raises(TimeoutError, match=r"1 of 2 cells still missing.*: b\..*--summarize_only"):
        wait_for_cells(tmp_path, ["a", "b"], timeout_s=0.05, poll_s=0.01)


def test_wait_for_record_waits_for_this_config(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TimeoutError, match="rank 0"):
        wait_for_record(out, {"a": 1}, (), timeout_s=0.05, poll_s=0.01)
    claim_output_dir(out, {"a": 1, "shard": "0/2"})
    assert wait_for_record(out, {"a": 1, "shard": "1/2"}, ("shard",), timeout_s=0) == out
    with pytest.raises(TimeoutError):
        wait_for_record(out, {"a": 2}, ("shard",), timeout_s=0.05, poll_s=0.01)
