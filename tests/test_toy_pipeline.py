"""toy.experiments.pipeline and toy.collect: probe rows and their beliefs, probing a tiny model,
and (slow) the whole job end to end on a tiny config, plus the GPU recipe script in --smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toy.beliefs import belief_states, sequence_probabilities
from toy.collect import distinct_prefix_rows, probe_windows, read_residual
from toy.experiments.pipeline import ProbeConfig, exact_probe_curve, headline, main, probe_model
from toy.model import build_model
from toy.processes import make_process

REPO = Path(__file__).resolve().parents[1]


def test_probe_windows_enumerated_rows_carry_beliefs_and_window_probabilities():
    process = make_process("rrxor")
    data = probe_windows(process, 6, max_sequences=100)
    assert data.enumerated
    n, L = data.tokens.shape
    assert data.beliefs.shape == (n * L, 5) and data.weights.shape == data.groups.shape == (n * L,)
    # row n * L + t is window n after token t (the belief convention of toy.beliefs)
    assert torch.equal(data.beliefs.view(n, L, 5), belief_states(process, data.tokens))
    assert torch.allclose(data.weights.view(n, L)[:, 0], sequence_probabilities(process, data.tokens))
    assert data.weights.view(n, L)[:, 0].sum().item() == pytest.approx(1.0)
    assert torch.equal(data.groups.view(n, L)[:, 3], torch.arange(n))
    sampled = probe_windows(process, 6, n_samples=50, max_sequences=10)
    assert not sampled.enumerated and sampled.beliefs.shape == (300, 5) and bool((sampled.weights == 1).all())


def test_probe_model_reports_every_site_with_controls(tiny_toy, tmp_path):
    process = make_process("mess3")
    data = probe_windows(process, 5, max_sequences=20_000)
    model, control = build_model(tiny_toy, 3, 5, seed=0), build_model(tiny_toy, 3, 5, seed=1)
    report, acts = probe_model(model, control, data, ProbeConfig(), process)
    assert list(report["sites"]) == ["embed", "block0", "block1", "final_norm"] and "concat" in report
    assert acts["block1"].shape == (len(data.beliefs), 16)
    for entry in report["sites"].values():
        assert {"test", "random_init", "shuffled", "ratio_to_random_init"} <= set(entry)
        # any real probe beats predicting from shuffled targets
        assert entry["test"]["mse"] < entry["shuffled"]["test"]["mse"]
    head = headline(report, 2)
    assert head["final_layer_site"] == "block1"
    assert head["final_layer_ratio_to_random_init"] == pytest.approx(
        report["sites"]["block1"]["test"]["mse"] / report["sites"]["block1"]["random_init"]["test"]["mse"]
    )
    # a model and its own copy as "control" give ratio 1: the control really is read from the control model
    same, _ = probe_model(model, build_model(tiny_toy, 3, 5, seed=0), data, ProbeConfig(), process)
    assert same["sites"]["block1"]["ratio_to_random_init"] == pytest.approx(1.0)


def test_distinct_prefixes_carry_their_own_probabilities():
    process = make_process("mess3")
    data = probe_windows(process, 4, max_sequences=100)
    index, weights = distinct_prefix_rows(data)
    assert len(index) == 3 + 9 + 27 + 81  # every prefix of length 1..4 once
    n, L = data.tokens.shape
    t, window = index % L, index // L
    for length in range(1, L + 1):
        rows = index[t == length - 1]
        prefixes = data.tokens[window[t == length - 1], :length]
        assert torch.allclose(weights[t == length - 1], sequence_probabilities(process, prefixes))
        assert torch.allclose(data.beliefs[rows], belief_states(process, prefixes)[:, -1], atol=1e-12)


def test_exact_probe_mse_equals_an_all_rows_numpy_fit(tiny_toy):
    """The pipeline's exact metric (distinct prefixes, population report) against numpy's weighted least squares
    over every (window, position) row, duplicates and all."""
    import numpy as np

    process = make_process("mess3")
    data = probe_windows(process, 5, max_sequences=20_000)
    model, control = build_model(tiny_toy, 3, 5, seed=0), build_model(tiny_toy, 3, 5, seed=1)
    report, acts = probe_model(model, control, data, ProbeConfig(), process)
    X, Y, w = acts["block1"].double().numpy(), data.beliefs.numpy(), data.weights.numpy()
    design = np.hstack([X, np.ones((len(X), 1))])
    coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], Y * np.sqrt(w)[:, None], rcond=None)
    expected = (w[:, None] * (design @ coef - Y) ** 2).sum(0).mean() / w.sum()
    assert report["config"]["evaluation"] == "population"
    assert report["sites"]["block1"]["test"]["mse"] == pytest.approx(expected, rel=1e-6)
    assert exact_probe_curve(data, ProbeConfig())(model)["probe_mse/block1"] == pytest.approx(expected, rel=1e-6)
    assert headline(report, 2)["probe_evaluation"] == "population"


def test_sampled_windows_report_the_spread_over_splits(tiny_toy):
    process = make_process("mess3")
    data = probe_windows(process, 5, n_samples=300, seed=0, max_sequences=10)
    model, control = build_model(tiny_toy, 3, 5, seed=0), build_model(tiny_toy, 3, 5, seed=1)
    report, _ = probe_model(model, control, data, ProbeConfig(probe_split_seeds=3), process)
    head = headline(report, 2)
    assert head["probe_evaluation"] == "held_out" and len(head["final_layer_test_mse_split_seeds"]) == 3
    assert len(set(head["final_layer_test_mse_split_seeds"])) == 3 and head["final_layer_test_mse_split_std"] > 0
    assert set(read_residual(model, data.tokens[:2])) == set(report["sites"])
    # enumerated windows scored on held-out windows when asked (a design wider than the distinct prefixes)
    enumerated = probe_windows(process, 5, max_sequences=20_000)
    held, _ = probe_model(model, control, enumerated, ProbeConfig(probe_exact=False, probe_split_seeds=2), process)
    assert headline(held, 2)["probe_evaluation"] == "held_out" and len(held["split_seeds"]["block1"]) == 2


def test_probe_site_out_of_range_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown residual site 'block4' for a model with 4 blocks"):
        main(["--probe_site", "block4", "--max_steps", "1", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path):
    out = tmp_path / "run"
    metrics = main(
        [
            "--config",
            str(REPO / "configs/toy/mess3.yaml"),
            "--preset",
            "mess3_small",
            "--context_length",
            "6",
            "--max_steps",
            "150",
            "--per_device_train_batch_size",
            "64",
            "--learning_rate",
            "0.01",
            "--eval_steps",
            "50",
            "--save_steps",
            "0",
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
            "--target_gap",
            "0.05",
        ]
    )
    for name in (
        "metrics.json",
        "summary.md",
        "belief_simplex.png",
        "probe_mse_by_layer.png",
        "val_loss.png",
        "probe_mse_emergence.png",
        "probe_final.json",
        "probe_final.safetensors",
        "checkpoint-150/model.safetensors",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    evals = [h for h in saved["training"]["history"] if "val_loss" in h]
    assert saved["training"]["steps"] == 150 and [h["step"] for h in evals] == [0, 50, 100, 150]
    # the emergence curve: every site's exact probe MSE at every evaluation, the last one the reported number
    assert all(f"probe_mse/{s}" in h for h in evals for s in ("embed", "block0", "block1", "final_norm"))
    assert evals[-1]["probe_mse/block1"] == pytest.approx(metrics["probe_headline"]["final_layer_test_mse"], rel=1e-6)
    assert evals[-1]["probe_mse/block1"] < evals[0]["probe_mse/block1"]
    head = metrics["probe_headline"]
    # even 150 steps teach the model more belief geometry than a random init holds
    assert head["final_layer_ratio_to_random_init"] < 1.0
    assert metrics["gap"] < 0.05 and metrics["checks"]["val_loss_within_target_of_floor"][0]
    from transformers import GPT2LMHeadModel

    from probes.io import load_probe

    probe = load_probe(out / "probe_final", GPT2LMHeadModel.from_pretrained(out / "checkpoint-150"))
    assert probe.site == "block1" and probe.n_targets == 3


@pytest.mark.slow
def test_gpu_recipe_script_smoke_without_nnsight(tmp_path):
    """The GPU recipe end to end on CPU, with nnsight made unimportable as on the GPU image."""
    script = REPO / "bench/toy_gpu_recipe.py"
    argv = [
        str(script),
        "--smoke",
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
        "--train_seconds",
        "5",
    ]
    code = f"import sys, runpy; sys.modules['nnsight'] = None; sys.argv = {argv!r}; runpy.run_path({str(script)!r}, run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT val_loss=" in proc.stdout and "reader: hooks" in proc.stdout
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["steps"] >= 20 and recipe["gap"] > 0 and recipe["reader"] == "hooks"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["probe_data"]["enumerated"] and metrics["validation_exact"]
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back
