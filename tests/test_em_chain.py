"""toy.experiments.em_chain: the whole chain on one tiny cell (outputs exist, exact numbers right, every stage trained)."""

import json
import math

import pytest
import torch

from toy.alignment import completion_weights, narrow_windows, persona_world
from toy.experiments.em_chain import EMChainConfig, mean_ci
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


def test_shards_split_the_grid_and_launchers_are_refused(tmp_path, monkeypatch):
    from toy.experiments.em_chain import main

    argv = ["--config", "configs/toy/em_chain.yaml", "--output_dir", str(tmp_path / "run"), "--couplings", "1.0",
            "--switch_probs", "0.05", "--n_seeds", "1", "--shard", "1/2"]
    metrics = main(argv)  # the one cell is shard 0's: this shard trains nothing and summarises what is present
    assert metrics["n_cells"] == 1 and metrics["cells"] == []
    assert not (tmp_path / "run" / "cells").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--shard"):
        main(argv)
