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
    argv = [
        "--config",
        "configs/toy/em_chain.yaml",
        "--output_dir",
        str(out),
        "--couplings",
        "1.0",
        "--n_seeds",
        "1",
        "--max_steps",
        "20",
        "--sft_steps",
        "4",
        "--grpo_steps",
        "2",
        "--finetune_steps",
        "4",
        "--eval_prompts",
        "60",
        "--probe_sequences",
        "30",
        "--knob_windows",
        "50",
        "--per_device_train_batch_size",
        "16",
        "--val_samples",
        "40",
    ]
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


TINY = [
    "--config",
    "configs/toy/em_chain.yaml",
    "--max_steps",
    "20",
    "--sft_steps",
    "4",
    "--grpo_steps",
    "2",
    "--finetune_steps",
    "4",
    "--eval_prompts",
    "60",
    "--probe_sequences",
    "30",
    "--knob_windows",
    "50",
    "--per_device_train_batch_size",
    "16",
    "--val_samples",
    "40",
    "--switch_probs",
    "0.05",
    "--n_seeds",
    "1",
    "--use_cpu",
    "true",
]
# one persona cell and one cell of the subset world (capability subsets x one tag, their correlation the knob)
TWO_CELLS = [*TINY, "--couplings", "1.0", "--subset_correlations", "1.0"]
NAMES = ["coupling_1.0_switch_0.05_seed_0", "subsets_1.0_switch_0.05_seed_0"]


def _flat(x, path=""):
    """Every leaf of a cell result by its path, wall and CPU times left out."""
    if isinstance(x, dict):
        return {
            k: v
            for key, val in x.items()
            if key not in ("wall_s", "cpu_s")
            for k, v in _flat(val, f"{path}.{key}").items()
        }
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
    assert (sharded / "transfer_vs_subset_correlation.png").is_file() and (
        sharded / "transfer_vs_coupling.png"
    ).is_file()
    assert any(v.startswith("(subsets)") for v in again["verdicts"])
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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29563",
        str(script),
        *TWO_CELLS,
        "--output_dir",
        str(out),
        "--wait_timeout_s",
        "600",
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["summary"] for r in ranks] == [True, False] and all(r["env_left"] == [] for r in ranks)
    assert "position 0 of 2" in proc.stdout and "position 1 of 2" in proc.stdout
    assert "Cells present: 2 of 2" in (out / "summary.md").read_text()
    _assert_same_cells(out, tmp_path / "one")


# --------------------------------------------------------------------------- pre-training with and without the factor


def _naive_visit_T(cap, slices, sp, noise):
    """visit_world's matrix by loops over every (copy, token, state, next state): the reference for the einsum."""
    V, S, K = cap.vocab_size, cap.n_states, max(slices) + 1
    T = torch.zeros(2 * V, 2 * K * S, 2 * K * S, dtype=torch.float64)
    for c in range(2):
        for x in range(V):
            for a in range(2):
                for prev in range(K):
                    for i in range(S):
                        for b in range(2):
                            for j in range(S):
                                keep = (1 - sp if a == b else sp) if slices[x] == prev else 0.5
                                shows = 1 - noise if c == b else noise
                                T[c * V + x, (a * K + prev) * S + i, (b * K + slices[x]) * S + j] = (
                                    cap.T[x, i, j] * keep * shows
                                )
    return T


def _h(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_worlds_without_the_shared_factor_exact():
    from toy.alignment import bayes_transfer, copy_mi, tagless_world, visit_world
    from toy.data import sample

    cap, slices, sp, noise = mess3(), [0, 1, 1], 0.05, 0.1
    v = visit_world(cap, slices, sp, noise)
    assert torch.allclose(v.T, _naive_visit_T(cap, slices, sp, noise), atol=1e-15, rtol=0)
    # consecutive tokens of one slice: same tag unless it flipped (sp), each copy shows it through the noise; the copy
    # marginal is 50/50, so MI = ln 2 - H(P(copies equal)). Across slices the visit world carries nothing, the
    # shared persona as much as within
    eq = (1 - sp) * ((1 - noise) ** 2 + noise**2) + sp * 2 * noise * (1 - noise)
    mi = copy_mi(v, slices)
    assert mi["same_slice"] == pytest.approx(math.log(2) - _h(eq), abs=1e-12) and mi["other_slice"] == pytest.approx(
        0, abs=1e-12
    )
    shared = copy_mi(persona_world(mess3(), [0, 1, 2], 1.0, sp, noise), [0, 1, 2])
    assert shared["other_slice"] == pytest.approx(math.log(2) - _h(eq), abs=1e-12)
    # the world's own in-context transfer: 0 without a latent across slices, 1 with one shared persona
    narrow = narrow_windows(v, 200, 10, 5, slices, 0, 0)
    b = bayes_transfer(v, slices, 0, narrow)
    assert b["narrow_effect"] > 0.05 and b["broad_effect"] == pytest.approx(0, abs=1e-12)
    p1 = persona_world(mess3(), [0, 1, 2], 1.0)
    assert bayes_transfer(p1, [0, 1, 2], 0, narrow_windows(p1, 200, 10, 5, [0, 1, 2], 0, 0))[
        "transfer"
    ] == pytest.approx(1, abs=1e-9)
    # no tag at all: the misaligned copy never occurs, the narrow data is impossible, no posterior to condition
    t = tagless_world(cap)
    assert (factor_tokens(t, sample(t, 50, 10, seed=0).tokens)[..., 0] == 0).all()
    assert copy_mi(t, slices) == {"same_slice": 0.0, "other_slice": 0.0}
    assert math.isnan(bayes_transfer(t, slices, 0, narrow_windows(t, 20, 10, 5, slices, 0, 0))["transfer"])


def test_at_shifts_interpolates_the_first_crossing():
    from toy.em_dose import at_shifts

    r = at_shifts([0.0, 0.2, 0.6, 1.0], [0.1, 0.1, 0.3, 0.5], [0.25, 0.5])
    # u = 0.25 lies 1/8 of the way from index 1 to 2: broad 0.1 + 0.2 / 8 = 0.125, rise 0.025 over 0.25
    assert r["0.25"]["transfer"] == pytest.approx(0.1) and r["0.25"]["t"] == pytest.approx(1.125)
    assert r["0.5"]["transfer"] == pytest.approx(0.15 / 0.5)
    # the shift is a share of the room 1 - narrow_0: from 0.5 to 0.75 is u = 0.5
    assert at_shifts([0.5, 0.75], [0.2, 0.3], [0.5])["0.5"]["transfer"] == pytest.approx(0.1 / 0.25)
    assert math.isnan(at_shifts([0.0, 0.1, 0.05], [0.0, 0.5, 0.5], [0.25])["0.25"]["transfer"])  # never reached


def test_capability_kl_reads_the_capability_marginal():
    from toy.em_dose import capability_kl

    p = torch.tensor(
        [[0.1, 0.2, 0.3, 0.2, 0.1, 0.1, 0.0]], dtype=torch.float64
    )  # 2 copies x 3 tokens + 1 special token
    q = torch.tensor(
        [[0.3, 0.0, 0.0, 0.0, 0.3, 0.4, 0.0]], dtype=torch.float64
    )  # other copies, same capability marginal 0.3 / 0.3 / 0.4
    assert capability_kl(p, q, 2, 3) == pytest.approx(0, abs=1e-12)
    r = torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ref = 0.3 * math.log(0.3 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.4 * math.log(0.4 / 0.25)
    assert capability_kl(p, r, 2, 3) == pytest.approx(ref, rel=1e-12)


def _cells(world, arms):
    """Synthetic cells: ``arms`` maps (stage, method) to one transfer per seed at shift 0.5."""
    seeds = range(len(next(iter(arms.values()))))
    cells = []
    for k in seeds:
        safety = {}
        for (stage, method), vals in arms.items():
            safety.setdefault(stage, {"shifts": {}})["shifts"][method] = {"0.5": {"transfer": vals[k]}}
        cells.append({"world_id": world, "seed": k, "safety": safety, "bayes": {"transfer": 0.0}})
    return cells


def test_rules_decide_by_the_declared_conditions_and_controls_can_fail():
    from toy.em_dose import check_claims, decide, judge

    narrow = {
        "test": "transfer",
        "world": "w",
        "stage": "none",
        "method": "full",
        "shift": 0.5,
        "supported": "ci_high <= 0.2",
        "contradicted": "ci_low >= 0.5",
    }
    assert decide({"mean": 0.1, "ci": [0.0, 0.15], "n": 5}, narrow) == "supported"
    assert decide({"mean": 0.7, "ci": [0.6, 0.8], "n": 5}, narrow) == "contradicted"
    assert decide({"mean": 0.3, "ci": [0.1, 0.5], "n": 5}, narrow) == "undecided"
    assert decide({"mean": 0.1, "ci": [float("nan")] * 2, "n": 1}, narrow) == "undecided"
    with pytest.raises(ValueError, match="overlap"):
        decide({"mean": 0.3, "ci": [0.3, 0.3], "n": 5}, {**narrow, "supported": "mean > 0", "contradicted": "mean < 1"})
    with pytest.raises(ValueError, match="each term"):
        check_claims({"bad": {**narrow, "supported": "ci_hi <= 0.2"}})
    with pytest.raises(ValueError, match="base"):
        check_claims({"bad": {**narrow, "test": "difference"}})
    raise_ = {
        "test": "difference",
        "base": {"stage": "none", "method": "same"},
        "world": "w",
        "stage": "sft",
        "method": "full",
        "shift": 0.5,
        "supported": "ci_low > 0.05",
        "contradicted": "ci_high < 0.05",
        "expect": "not supported",
    }
    cells = _cells("w", {("none", "full"): [0.1, 0.2, 0.15, 0.1, 0.2], ("sft", "full"): [0.5, 0.62, 0.55, 0.48, 0.6]})
    [row] = judge(cells, {"raise": raise_})
    # paired differences 0.4, 0.42, 0.4, 0.38, 0.4: a raise, so the control expecting none fails
    assert row["stat"]["mean"] == pytest.approx(0.4) and row["verdict"] == "supported" and row["control_ok"] is False
    same = _cells("w", {("none", "full"): [0.1, 0.2, 0.15, 0.1, 0.2], ("sft", "full"): [0.1, 0.2, 0.15, 0.1, 0.2]})
    assert judge(same, {"raise": raise_})[0]["control_ok"] is True
    tracked = {
        **raise_,
        "base": {"stage": "same", "method": "bayes"},
        "supported": "ci_low >= -0.1 and ci_high <= 0.1",
        "contradicted": "ci_high < -0.1 or ci_low > 0.1",
        "requires_matched": True,
    }
    assert judge(cells, {"t": tracked}, {"w": True})[0]["verdict"] == "contradicted"  # 0.55 vs the world's 0
    assert judge(cells, {"t": tracked}, {"w": False})[0]["verdict"] == "undecided (stages not matched)"


def test_factor_grid_tiny_end_to_end(tmp_path):
    """The with/without-factor config on one visit-world cell: trajectories start at the stage's rates and end at
    the endpoint's, stage measures and controls are stored, the claims are judged, and a rerun resumes."""
    import yaml

    from toy.experiments.em_chain import main

    out, config = tmp_path / "factor", tmp_path / "visit_only.yaml"
    cfg = yaml.safe_load(Path("configs/toy/em_chain_factor.yaml").read_text())
    config.write_text(yaml.safe_dump({**cfg, "couplings": []}))  # the shipped rules, the visit world alone
    argv = [
        "--config",
        str(config),
        "--output_dir",
        str(out),
        "--baseline_worlds",
        "visit",
        "--safety",
        "none",
        "sft",
        "--n_seeds",
        "1",
        "--max_steps",
        "20",
        "--sft_steps",
        "4",
        "--finetune_steps",
        "4",
        "--eval_prompts",
        "40",
        "--per_device_train_batch_size",
        "16",
        "--val_samples",
        "20",
        "--steer_scales",
        "1",
        "4",
    ]
    m = main(argv)
    cell = m["cells"][0]
    assert cell["world_id"] == "visit" and cell["copy_mi"]["other_slice"] == pytest.approx(0, abs=1e-12)
    none = cell["safety"]["none"]
    assert (
        set(none["trajectory"]) == {"full", "lora", "replicate", "taught", "steer"}
        and "trajectory" in cell["safety"]["sft"]
    )
    assert "replicate" not in cell["safety"]["sft"]["trajectory"]  # controls run from the stage-none model only
    for method in ("full", "lora"):
        t = none["trajectory"][method]
        assert [r["step"] for r in t] == [0, 1, 2, 3, 4]
        assert t[0]["narrow"] == pytest.approx(none["before"]["narrow"], abs=1e-6)
        assert t[-1]["broad"] == pytest.approx(none["after"][method]["broad"], abs=1e-6)
    assert (
        none["stage_info"]["capability_kl"] == pytest.approx(0, abs=1e-9)
        and cell["safety"]["sft"]["stage_info"]["capability_kl"] > 0
    )
    assert {r["claim"] for r in m["factor"]["claims"]} >= {"no_broad_em_without_safety", "control_taught_not_broad"}
    assert "Pre-registered claims" in (out / "summary.md").read_text()
    assert main(argv)["cells"][0]["wall_s"] == cell["wall_s"]
    # a claim's prose may be reworded over the same cells; its rule may not
    claims = cfg["claims"]
    reworded = {**claims, "control_taught_not_broad": {**claims["control_taught_not_broad"], "says": "reworded"}}
    config.write_text(yaml.safe_dump({**cfg, "couplings": [], "claims": reworded}))
    again = main([*argv, "--summarize_only", "true"])
    assert {r["says"] for r in again["factor"]["claims"] if r["claim"] == "control_taught_not_broad"} == {"reworded"}
    ruled = {**claims, "control_taught_not_broad": {**claims["control_taught_not_broad"], "shift": 0.25}}
    config.write_text(yaml.safe_dump({**cfg, "couplings": [], "claims": ruled}))
    with pytest.raises(FileExistsError):
        main([*argv, "--summarize_only", "true"])
