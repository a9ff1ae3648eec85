"""toy.experiments.em_chain: the whole chain on one tiny cell (outputs exist, exact numbers right, every stage trained)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumbing.stats import mean_ci
from toy.alignment import completion_weights, narrow_windows, persona_world
from toy.experiments.em_chain import EMChainConfig
from toy.factors import factor_tokens
from toy.processes import mess3


def test_narrow_windows_and_weights():
    cfg = EMChainConfig(couplings=[1.0], slices=[0, 1, 1])
    p = persona_world(mess3(), cfg.slices, 1.0)
    t = narrow_windows(p, 64, cfg.context_length, cfg.prompt_length, cfg.slices, 0, 0)
    f = factor_tokens(p, t)
    in_slice = f[..., 1] == 0
    comp = torch.arange(cfg.context_length) >= cfg.prompt_length
    assert (f[:, ~comp, 0] == 0).all()  # aligned prompts
    assert (f[..., 0] == (in_slice & comp).long()).all()  # misaligned exactly on the slice's completion tokens
    w = completion_weights(t, cfg.prompt_length, in_slice)
    assert torch.equal(w.bool(), (in_slice & comp)[:, 1:])


def test_mean_ci():
    r = mean_ci([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["ci"][0] == pytest.approx(2 - 4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([1.0])["ci"][0]) and mean_ci([float("nan"), 1.0])["n"] == 1


def test_em_chain_tiny_grid(tmp_path):
    from toy.experiments.em_chain import main

    out = tmp_path / "run"
    argv = ["--config", "configs/toy/em_chain.yaml", "--output_dir", str(out), "--couplings", "1.0", "--n_seeds", "1",
            "--steps", "20", "--sft_steps", "4", "--grpo_steps", "2", "--finetune_steps", "4", "--eval_prompts", "60",
            "--probe_sequences", "30", "--knob_windows", "50", "--batch_size", "16", "--val_samples", "40"]
    metrics = main(argv)
    for name in ("metrics.json", "summary.md", "transfer_vs_coupling.png"):
        assert (out / name).is_file()
    cell = json.loads((out / "cells" / "coupling_1.0_switch_0.05_seed_0" / "result.json").read_text())
    assert cell["knob"]["tag_mi_nats"] == pytest.approx(math.log(2), abs=1e-9)  # one shared persona at coupling 1
    assert cell["knob"]["predictive_residual"] < 1e-20 and cell["knob"]["alignment_dims"]["0.99"] == 1
    assert set(cell["safety"]) == {"none", "sft", "grpo"}
    for stage, r in cell["safety"].items():
        for m in ("full", "lora", "steer"):
            assert r["after"][m]["narrow"] != r["before"]["narrow"], (stage, m)  # every intervention changed the model
        assert r["lora_B_in_alignment_subspace"]["share"] > 0  # the LoRA trained (B starts at zero)
    assert cell["safety"]["none"]["before"] != cell["safety"]["sft"]["before"]  # the SFT stage changed the model
    assert cell["safety"]["grpo"]["stage_info"]["reward_first"] is not None
    assert 0 <= cell["sft_vs_grpo"]["overlap"]["mean_cos2"] <= 1 and 0 <= cell["sft_vs_grpo"]["control_mean_cos2"] <= 1
    assert (out / "cells" / "coupling_1.0_switch_0.05_seed_0" / "grpo" / "model" / "model.safetensors").is_file()
    assert metrics["verdicts"] and "## Verdicts" in (out / "summary.md").read_text()
    # a rerun of the same config reuses the finished cell and rewrites the summary
    again = main(argv)
    assert again["cells"][0]["wall_s"] == cell["wall_s"]


TINY = ["--config", "configs/toy/em_chain.yaml", "--steps", "20", "--sft_steps", "4", "--grpo_steps", "2", "--finetune_steps", "4",
        "--eval_prompts", "60", "--probe_sequences", "30", "--knob_windows", "50", "--batch_size", "16", "--val_samples", "40",
        "--switch_probs", "0.05", "--n_seeds", "1", "--use_cpu", "true"]
# one persona cell and one cell of the seed's 9.2 world (capability subsets x one tag)
TWO_CELLS = [*TINY, "--couplings", "1.0", "--subset_correlations", "1.0"]
NAMES = ["coupling_1.0_switch_0.05_seed_0", "subsets_1.0_switch_0.05_seed_0"]


def _flat(x, path=""):
    """Every leaf of a cell result by its path, wall and CPU times left out."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() if key not in ("wall_s", "cpu_s") for k, v in _flat(val, f"{path}.{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _flat(val, f"{path}[{i}]").items()}
    return {path: x}


def _assert_same_cells(a, b):
    """Same cell results up to float64 round-off: the exact (LAPACK) measures differ in the last bits between
    processes (1e-16 relative, 1e-12 absolute on near-zero beliefs); anything trained that saw other state would
    differ at 1e-3 or more."""
    for n in NAMES:
        x, y = (_flat(json.loads((out / "cells" / n / "result.json").read_text())) for out in (a, b))
        assert x.keys() == y.keys()
        nums = [k for k, v in x.items() if isinstance(v, float)]
        assert {k: x[k] for k in x if k not in nums} == {k: y[k] for k in y if k not in nums}
        assert [y[k] for k in nums] == pytest.approx([x[k] for k in nums], rel=1e-9, abs=1e-10, nan_ok=True), n


def test_shards_give_the_cells_of_one_process_and_resume(tmp_path):
    """Each cell is a function of its config and seed alone: the grid as 2 shards (run in the other order, after other
    work in this process) gives the same cell results as 1 process; --summarize_only rebuilds the summary."""
    from toy.experiments.em_chain import main

    one = main([*TWO_CELLS, "--output_dir", str(tmp_path / "one")])
    assert [c["world"] for c in one["cells"]] == ["persona", "subsets"] and len(one["aggregate"]) == 2
    sharded = tmp_path / "sharded"
    m1 = main([*TWO_CELLS, "--output_dir", str(sharded), "--shard", "1/2"])  # cell 1 only; its summary has 1 of 2
    assert [c["world"] for c in m1["cells"]] == ["subsets"] and m1["n_cells"] == 2
    assert not (sharded / "cells" / NAMES[0]).exists()
    main([*TWO_CELLS, "--output_dir", str(sharded), "--shard", "0/2"])
    _assert_same_cells(sharded, tmp_path / "one")
    again = main([*TWO_CELLS, "--output_dir", str(sharded), "--summarize_only", "true"])
    assert len(again["cells"]) == 2 and "Cells present: 2 of 2" in (sharded / "summary.md").read_text()
    assert (sharded / "transfer_vs_subset_correlation.png").is_file() and (sharded / "transfer_vs_coupling.png").is_file()
    assert any(v.startswith("(9.2)") for v in again["verdicts"])
    # the subset world's knob: at correlation 1 the tag is a function of the subset, MI = H(1/3) exactly
    k = again["cells"][1]["knob"]
    assert k["subset_tag_mi_nats"] == pytest.approx(-(math.log(1 / 3) / 3 + 2 / 3 * math.log(2 / 3)), abs=1e-9)
    # a rerun resumes: finished cells are read, not retrained (the wall time is the first run's)
    assert main([*TWO_CELLS, "--output_dir", str(sharded)])["cells"][0]["wall_s"] == again["cells"][0]["wall_s"]
    with pytest.raises(FileExistsError, match="subset_correlations"):  # --summarize_only refuses another config's cells
        main([*TINY, "--couplings", "1.0", "--output_dir", str(sharded), "--summarize_only", "true"])


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_cells_and_rank0_summarises(tmp_path):
    """torchrun with 2 CPU processes: each rank runs its own cell as a plain process (no process group: the cells
    would otherwise all-reduce each other's gradients), rank 0 waits for rank 1's cell and writes one summary, and
    the cells equal a 1-process run's."""
    from toy.experiments.em_chain import main

    repo = Path(__file__).resolve().parents[1]
    main([*TWO_CELLS, "--output_dir", str(tmp_path / "one")])
    script = tmp_path / "launch.py"
    script.write_text(
        "import json, os, sys\n"
        "rank = os.environ['RANK']  # read before main() removes the launcher's variables\n"
        "from toy.experiments.em_chain import main\n"
        "m = main(sys.argv[1:])\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "json.dump({'summary': m is not None, 'env_left': [k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK') if k in os.environ]},\n"
        "          open(f'{out}/../rank{rank}.json', 'w'))\n"
    )
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563", str(script),
           *TWO_CELLS, "--output_dir", str(out), "--wait_timeout_s", "600"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["summary"] for r in ranks] == [True, False] and all(r["env_left"] == [] for r in ranks)
    assert "position 0 of 2" in proc.stdout and "position 1 of 2" in proc.stdout
    assert "Cells present: 2 of 2" in (out / "summary.md").read_text()
    _assert_same_cells(out, tmp_path / "one")
