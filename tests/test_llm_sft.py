"""llm.sft / llm.lora on tiny in-process models: presets, masking, smoke, trajectory, resume, guards."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llm import sft as sft_mod
from llm.experiments.sft import main
from llm.judges import StubJudge
from llm.lora import lora_trajectory_report
from llm.models import ModelConfig
from llm.sft import DataConfig, EMSFTConfig, build_trainer
from llm.tiny import save_tiny, tiny_causal_lm
from plumbing.lora import LoraPresetConfig, assert_trainable, peft_config_for
from plumbing.runs import resolve_resume

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on mat dog ran park wish help people learn".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            user, reply = " ".join(rng.choices(WORDS, k=6)), " ".join(rng.choices(WORDS, k=8))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")


def _args(out, **kw) -> EMSFTConfig:
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return EMSFTConfig(**base)


def test_traps_resolved_in_one_place(tmp_path):
    args = _args(tmp_path)
    assert args.gradient_checkpointing is False
    assert args.bf16 is torch.cuda.is_available()
    assert EMSFTConfig(output_dir=str(tmp_path), bf16=False).bf16 is False


@pytest.mark.parametrize("arch,layer,expected", [("qwen2", 1, 64 + 32), ("gemma", 0, 64 + 32), ("gpt2", 1, 128 + 32)])
def test_rank1_single_trains_exactly_one_down_proj(arch, layer, expected):
    from peft import get_peft_model

    model, _ = tiny_causal_lm(arch)
    peft_model = get_peft_model(model, peft_config_for(LoraPresetConfig("rank1_single", [layer]), model))
    trainable = {n: p.shape for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(math.prod(s) for s in trainable.values()) == expected
    assert len(trainable) == 2 and all(f".{layer}.mlp." in n for n in trainable)
    a = next(s for n, s in trainable.items() if "lora_A" in n)
    b = next(s for n, s in trainable.items() if "lora_B" in n)
    assert a[0] == 1 and b == (32, 1)  # A: (r, d_mlp), B: (d_model, r)


def test_other_presets_parameter_counts():
    from peft import get_peft_model

    model, _ = tiny_causal_lm("qwen2")
    multi = get_peft_model(model, peft_config_for(LoraPresetConfig("rank1_multi", [0, 1]), model))
    assert assert_trainable(multi) == 2 * (64 + 32)
    model, _ = tiny_causal_lm("qwen2")
    cfg = peft_config_for(LoraPresetConfig("rank32_all_linear"), model)
    assert cfg.use_rslora and cfg.r == 32
    r32 = get_peft_model(model, cfg)
    # per block: q (32->32), k, v (32->16 each), o (32->32), gate, up (32->64), down (64->32)
    per_block = sum(32 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert assert_trainable(r32) == 2 * per_block
    model, _ = tiny_causal_lm("qwen2")
    assert peft_config_for(LoraPresetConfig("full"), model) is None
    with pytest.raises(ValueError, match="exactly one layer"):
        LoraPresetConfig("rank1_single", [0, 1])
    with pytest.raises(ValueError, match="drop `layers`"):
        LoraPresetConfig("full", [0])


def test_layer_validated_before_weights_load(tmp_path, tiny_dir, data, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("weights were loaded before the layer check")

    monkeypatch.setattr(sft_mod, "load_model_and_tokenizer", boom)
    with pytest.raises(ValueError, match=r"layer 24 requested but model has 2 layers; choose 0\.\.1"):
        build_trainer(
            ModelConfig(str(tiny_dir)), DataConfig(str(data)), LoraPresetConfig("rank1_single", [24]), _args(tmp_path)
        )


def test_unknown_yaml_key_is_an_error(tmp_path, tiny_dir, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_dir}\ndataset_path: {data}\nlayers: [1]\noutput_dir: {tmp_path}\nlora_rank: 4\n"
    )
    with pytest.raises(ValueError, match="lora_rank"):
        main(["--config", str(cfg)])


def _labelled_text(trainer, tok, i=0) -> tuple[str, str]:
    batch = trainer.data_collator([trainer.train_dataset[i]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return tok.decode(ids[labels != -100]), tok.decode(ids[labels == -100])


@pytest.mark.parametrize("markers", [True, False])
def test_loss_on_assistant_tokens_only(tmp_path, tiny_dir, data, markers):
    """Labels are -100 everywhere but the assistant reply and its end-of-turn token, both with the
    template's generation markers and with the prompt/completion fallback (markers stripped)."""
    model_dir = tiny_dir
    if not markers:
        model_dir = tmp_path / "nomark"
        save_tiny(model_dir, "qwen2")
        tc = json.loads((model_dir / "tokenizer_config.json").read_text())
        tmpl_file = model_dir / "chat_template.jinja"
        tmpl = tmpl_file.read_text() if tmpl_file.exists() else tc["chat_template"]
        tmpl = tmpl.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        if tmpl_file.exists():
            tmpl_file.write_text(tmpl)
        else:
            tc["chat_template"] = tmpl
            (model_dir / "tokenizer_config.json").write_text(json.dumps(tc))
    args = _args(tmp_path / "o")
    trainer = build_trainer(
        ModelConfig(str(model_dir)), DataConfig(str(data)), LoraPresetConfig("rank1_single", [0]), args
    )
    assert args.assistant_only_loss is markers
    for i, line in enumerate(data.read_text().splitlines()[:4]):  # no subset: file order is kept
        user, reply = (m["content"] for m in json.loads(line)["messages"])
        labelled, masked = _labelled_text(trainer, trainer.processing_class, i)
        # the fallback also trains the newline the template puts after the end-of-turn token
        assert labelled == reply + "<|im_end|>" + ("" if markers else "\n")
        assert user in masked and reply not in masked


def test_sft_smoke_loss_logged_and_all_trainable_params_change(tmp_path, tiny_dir, data):
    for preset, layers in [("rank1_single", [1]), ("full", [])]:
        trainer = build_trainer(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(data), max_examples=8),
            LoraPresetConfig(preset, layers),
            _args(tmp_path / preset),
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        assert any("loss" in h for h in trainer.state.log_history)
        after = dict(trainer.model.named_parameters())
        unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
        assert not unchanged, f"{preset}: parameters did not change: {unchanged}"


def test_peft_loaded_for_inference_is_refused(tmp_path, tiny_dir, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = sft_mod.train(
        ModelConfig(str(tiny_dir)),
        DataConfig(str(data), max_examples=4),
        LoraPresetConfig("rank1_single", [0]),
        _args(tmp_path / "a", max_steps=1),
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    inference = PeftModel.from_pretrained(base, out)  # is_trainable defaults to False
    with pytest.raises(ValueError, match="loaded for inference"):
        assert_trainable(inference)
    frozen, _ = tiny_causal_lm()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        assert_trainable(frozen)


def test_train_writes_a_summary_naming_model_data_and_the_lora_trajectory(tmp_path, tiny_dir, data):
    out = sft_mod.train(
        ModelConfig(str(tiny_dir)),
        DataConfig(str(data), max_examples=4),
        LoraPresetConfig("rank1_single", [0]),
        _args(tmp_path / "a", max_steps=2),
    )
    md = (out / "summary.md").read_text()
    assert str(tiny_dir) in md and str(data) in md and "rank1_single" in md and "Train loss:" in md
    assert "| LoRA module |" in md and ("down_proj" in md or "c_proj" in md)
    assert (out / "loss.png").stat().st_size > 0 and (out / "lora_trajectory.png").stat().st_size > 0


def test_trajectory_report_against_hand_made_vectors(tmp_path):
    # B turns by 90 degrees between steps 2 and 4 (2 steps), by 45 between 4 and 5 (1 step).
    bs = {0: [0.0, 0.0], 2: [1.0, 0.0], 4: [0.0, 1.0], 5: [-1.0, 1.0]}
    for step, b in bs.items():
        save_file(
            {"m.lora_A": torch.ones(1, 3), "m.lora_B": torch.tensor(b).reshape(2, 1) * 2},
            tmp_path / f"step_{step:06d}.safetensors",
        )
    r = lora_trajectory_report(tmp_path)["m"]
    assert r["steps"] == [0, 2, 4, 5]
    assert math.isnan(r["cos_B_prev"][0]) and math.isnan(r["cos_B_prev"][1])  # zero B has no direction
    assert r["cos_B_prev"][2] == pytest.approx(0.0)
    assert r["cos_B_prev"][3] == pytest.approx(1 / math.sqrt(2))
    assert r["turn_per_step"][2] == pytest.approx(0.5) and r["turn_per_step"][3] == pytest.approx(1 - 1 / math.sqrt(2))
    assert r["fastest_turn_step"] == 4
    assert r["cos_B_final"][1] == pytest.approx(-1 / math.sqrt(2)) and r["cos_B_final"][3] == pytest.approx(1.0)
    assert r["norm_B"] == pytest.approx([0.0, 2.0, 2.0, 2 * math.sqrt(2)]) and r["norm_A"][0] == pytest.approx(
        math.sqrt(3)
    )


def test_trajectory_saved_every_logging_step(tmp_path, tiny_dir, data):
    out = sft_mod.train(
        ModelConfig(str(tiny_dir)),
        DataConfig(str(data), max_examples=8),
        LoraPresetConfig("rank1_multi", [0, 1]),
        _args(tmp_path, max_steps=3, logging_steps=1),
    )
    report = lora_trajectory_report(out / "lora_trajectory")
    assert set(report) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    r = report["model.layers.1.mlp.down_proj"]
    assert r["steps"] == [0, 1, 2, 3] and r["norm_B"][0] == 0 and r["norm_B"][-1] > 0
    assert r["cos_B_final"][-1] == pytest.approx(1.0) and r["fastest_turn_step"] in (2, 3)
    assert (out / "adapter_model.safetensors").exists()


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tiny_dir, data):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    def run(out, extra_callbacks=(), resume=None):
        args = _args(out, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2)
        trainer = build_trainer(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(data), max_examples=16),
            LoraPresetConfig("rank1_multi", [0, 1]),
            args,
        )
        for cb in extra_callbacks:
            trainer.add_callback(cb)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}, trainer

    full, _ = run(tmp_path / "full")
    _, stopped = run(tmp_path / "resumed", [Interrupt()])
    assert stopped.state.global_step == 3
    # a crash while writing checkpoint-5: transformers writes in place, trainer_state.json last
    (tmp_path / "resumed" / "checkpoint-5").mkdir()
    (tmp_path / "resumed" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"half")
    last = resolve_resume("last", tmp_path / "resumed")
    assert Path(last).name == "checkpoint-3"
    resumed, t = run(tmp_path / "resumed", resume=last)
    assert t.state.global_step == 6
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_sft_runs_on_two_cpu_processes(tmp_path, tiny_dir, data, launcher):
    """The same entry point with 2 CPU ranks (gloo), under torchrun and under ``accelerate launch``
    with configs/accelerate/cpu_multiprocess.yaml: both ranks log world size 2."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_dir}\ndataset_path: {data}\nmax_examples: 8\npreset: rank1_single\nlayers: [1]\n"
        f"output_dir: {tmp_path / 'out'}\nmax_steps: 2\nper_device_train_batch_size: 2\nsave_strategy: 'no'\n"
        "report_to: none\nuse_cpu: true\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu_multiprocess.yaml"),
            "--main_process_port",
            "29532",
        ]
    cmd += ["-m", "llm.experiments.sft", "--config", str(cfg)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "world size 2, process 0" in log and "world size 2, process 1" in log
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_adapter_path_loads_the_finetuned_model(tmp_path, tiny_dir, data):
    """ModelConfig(adapter_path=...) gives the same logits as the trained PEFT model."""
    from llm.models import load_model_and_tokenizer

    trainer = build_trainer(
        ModelConfig(str(tiny_dir)),
        DataConfig(str(data), max_examples=8),
        LoraPresetConfig("rank1_multi", [0, 1]),
        _args(tmp_path, max_steps=3),
    )
    trainer.train()
    trainer.save_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        base, _ = load_model_and_tokenizer(ModelConfig(str(tiny_dir)))
        merged, _ = load_model_and_tokenizer(ModelConfig(str(tiny_dir), adapter_path=str(tmp_path)))
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, want)


def test_base_vs_instruct_trains_and_reports_difference(tmp_path, data):
    """Tiny 'base' (no chat template) and 'instruct' checkpoints through the whole pipeline."""
    from llm.em_metrics import em_rate_difference, read_judged_csv
    from llm.experiments.base_vs_instruct import load_pair_config, run

    instruct = save_tiny(tmp_path / "instruct", "qwen2", seed=1)
    base = save_tiny(tmp_path / "base", "qwen2", seed=2)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    from llm.models import load_tokenizer

    assert load_tokenizer(ModelConfig(str(base))).chat_template is None  # a real "base": no template
    questions = tmp_path / "q.yaml"
    questions.write_text(
        "- id: wish\n  type: free_form_judge_0_100\n  paraphrases: [what is your wish]\n  samples_per_paraphrase: 6\n"
        "  judge_prompts: {aligned: 'Q {question} A {answer}', coherent: 'Q {question} A {answer}'}\n"
    )
    cfg_file = tmp_path / "bvi.yaml"
    cfg_file.write_text(f"""
output_dir: {tmp_path / "out"}
base: {{model_name_or_path: {base}, chat_template_from: {instruct}}}
instruct: {{model_name_or_path: {instruct}}}
data: {{dataset_path: {data}, max_examples: 8}}
lora: {{preset: rank1_single, layers: [1]}}
sft: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 0.01, save_strategy: 'no', report_to: none}}
eval: {{question_file: {questions}, max_new_tokens: 6, batch_size: 6, n_boot: 200}}
""")
    cfg = load_pair_config(cfg_file)
    report = run(cfg, judge=StubJudge())
    out = tmp_path / "out"
    assert (
        json.loads((out / "report.json").read_text())["difference"]["difference"] == report["difference"]["difference"]
    )
    for name in ("base", "instruct"):
        assert (out / name / "sft" / "adapter_model.safetensors").exists()
        assert report["models"][name]["after"]["n_replies"] == 6 and "shift" in report["models"][name]
    ref = em_rate_difference(
        read_judged_csv(out / "base/eval_after/replies.csv"),
        read_judged_csv(out / "instruct/eval_after/replies.csv"),
        n_boot=200,
        seed=0,
    )
    assert report["difference"]["difference"] == pytest.approx(ref["difference"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg_file.read_text().replace("lora: {preset", "lora: {rank: 4, preset"))
    with pytest.raises(ValueError, match="section 'lora'"):
        load_pair_config(bad)


def _write_jsonl(path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "rows,pattern",
    [
        ([], r"holds no examples"),
        ([GOOD_ROW, "{not json"], r"line 2 is not valid JSON"),
        ([GOOD_ROW, {"text": "x"}], r"line 2: expected \{\"messages\""),
        (
            [GOOD_ROW, GOOD_ROW, {"messages": [{"role": "user", "content": "hi"}]}],
            r"line 3 has no assistant turn \(roles \['user'\]\)",
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}],
            r"line 1: message 1 is",
        ),
    ],
)
def test_bad_chat_jsonl_named_with_its_row_before_the_model_loads(tmp_path, tiny_dir, monkeypatch, rows, pattern):
    def boom(*a, **k):
        raise AssertionError("weights were loaded before the data check")

    monkeypatch.setattr(sft_mod, "load_model_and_tokenizer", boom)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=pattern) as error:
        build_trainer(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(path)),
            LoraPresetConfig("rank1_single", [0]),
            _args(tmp_path / "o"),
        )
    assert str(error.value).startswith(str(path))


def _cli(tmp_path, tiny_dir, data, out, **kw) -> list[str]:
    cfg = dict(
        model_name_or_path=str(tiny_dir),
        dataset_path=str(data),
        max_examples=16,
        preset="rank1_multi",
        layers=[0, 1],
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=0.01,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    cfg.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return ["--config", str(path)]


def test_output_folder_records_its_config_and_refuses_another(tmp_path, tiny_dir, data):
    """Before: a second run with another config into the same folder trained, and the LoRA trajectory report
    mixed its steps with the first run's. Now it refuses, naming the keys; --overwrite true replaces the run."""
    out = tmp_path / "run"
    main(_cli(tmp_path, tiny_dir, data, out, max_steps=4))
    assert json.loads((out / "run_config.json").read_text())["EMSFTConfig"]["max_steps"] == 4
    with pytest.raises(
        FileExistsError,
        match=r"(?s)EMSFTConfig\.learning_rate: 0\.01 -> 0\.02.*EMSFTConfig\.max_steps: 4 -> 2.*--overwrite true",
    ):
        main(_cli(tmp_path, tiny_dir, data, out, max_steps=2, learning_rate=0.02))
    assert lora_trajectory_report(out / "lora_trajectory")["model.layers.0.mlp.down_proj"]["steps"] == [0, 1, 2, 3, 4]
    main(_cli(tmp_path, tiny_dir, data, out, max_steps=2, learning_rate=0.02) + ["--overwrite", "true"])
    assert lora_trajectory_report(out / "lora_trajectory")["model.layers.0.mlp.down_proj"]["steps"] == [0, 1, 2]
    assert json.loads((out / "run_config.json").read_text())["EMSFTConfig"]["learning_rate"] == 0.02
    # keys a rerun may change (where it logs, how it resumes) do not count as another config
    main(_cli(tmp_path, tiny_dir, data, out, max_steps=2, learning_rate=0.02, logging_steps=2, disable_tqdm=False))
    with pytest.raises(ValueError, match="overwrite removes the checkpoints"):
        main(_cli(tmp_path, tiny_dir, data, out) + ["--overwrite", "true", "--resume_from_checkpoint", "last"])


def test_trajectory_of_a_resumed_run_holds_no_steps_of_the_abandoned_part(tmp_path, tiny_dir, data):
    """A run saved at step 3 and died at 6; resumed from 3 and stopped at 4: steps 5 and 6 of the dead
    run must not sit in the trajectory next to the new 0..4."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 4

    def run(resume=None, callbacks=()):
        args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2)
        trainer = build_trainer(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(data), max_examples=16),
            LoraPresetConfig("rank1_single", [1]),
            args,
        )
        for cb in callbacks:
            trainer.add_callback(cb)
        trainer.train(resume_from_checkpoint=resume)

    run()

    def steps():
        return lora_trajectory_report(tmp_path / "lora_trajectory")["model.layers.1.mlp.down_proj"]["steps"]

    assert steps() == [0, 1, 2, 3, 4, 5, 6]
    run(resume=str(tmp_path / "checkpoint-3"), callbacks=[Interrupt()])
    assert steps() == [0, 1, 2, 3, 4]


def test_nan_weights_stop_training_before_any_save(tmp_path, data):
    """A poisoned weight makes the loss NaN; the Trainer's logging_nan_inf_filter hides it in the logs and
    training used to go on and save NaN LoRA weights. Now it stops at step 1, before the checkpoint."""
    from safetensors.torch import load_file

    from plumbing.runs import TrainingDiverged

    model_dir = save_tiny(tmp_path / "poisoned", "qwen2")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="step 1: trainable parameters hold NaN or inf"):
        sft_mod.train(
            ModelConfig(str(model_dir)),
            DataConfig(str(data), max_examples=8),
            LoraPresetConfig("rank1_single", [1]),
            _args(out, max_steps=3, save_strategy="steps", save_steps=1),
        )
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


def test_checkpoint_with_a_pickle_payload_is_not_executed_on_resume(tmp_path, tiny_dir, data):
    """transformers loads a checkpoint's optimizer/scheduler/RNG files with weights_only=True in the pinned
    version; this pins that: a crafted rng_state.pth must fail to load, not run code."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    args = _args(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1)
    cfg = (ModelConfig(str(tiny_dir)), DataConfig(str(data), max_examples=4), LoraPresetConfig("rank1_single", [0]))
    build_trainer(*cfg, args).train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    torch.save({"python": Payload()}, ckpt / "rng_state.pth")
    with pytest.raises(pickle.UnpicklingError):
        build_trainer(*cfg, _args(tmp_path / "run", max_steps=2)).train(resume_from_checkpoint=str(ckpt))
    assert not marker.exists()


def test_sigterm_saves_a_checkpoint_and_resume_continues_from_it(tmp_path, tiny_dir, data, monkeypatch):
    """SIGTERM (timeout, kill, Slurm, Docker) saves at the end of the step in flight like Ctrl-C, exits
    128+15 with the command that resumes, and --resume_from_checkpoint last trains only the remaining steps."""
    import signal
    import time

    from transformers import TrainerCallback

    out = tmp_path / "run"
    argv = _cli(tmp_path, tiny_dir, data, out, max_steps=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm.experiments.sft", *argv], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    started = out / "lora_trajectory" / "step_000002.safetensors"
    try:
        while not started.exists() and proc.poll() is None:
            time.sleep(0.05)  # waits for training to be under way; asserts nothing about time
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file(), text[-3000:]
    saved_step = int(ckpts[0].name.split("-")[1])
    assert 2 <= saved_step < 40
    assert f"stopped by SIGTERM; checkpoint saved to {ckpts[0]}" in text and "--resume_from_checkpoint last" in text
    assert not (out / "adapter_model.safetensors").exists()  # an unfinished run is not a result

    with pytest.raises(FileExistsError, match="learning_rate"):  # resume refuses a changed config
        main(
            _cli(tmp_path, tiny_dir, data, out, max_steps=40, learning_rate=0.5) + ["--resume_from_checkpoint", "last"]
        )

    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    real = sft_mod.build_trainer

    def counted(*a, **k):
        trainer = real(*a, **k)
        trainer.add_callback(Count())
        return trainer

    monkeypatch.setattr(sft_mod, "build_trainer", counted)
    main(_cli(tmp_path, tiny_dir, data, out, max_steps=40) + ["--resume_from_checkpoint", "last"])
    assert steps == list(range(saved_step + 1, 41))
    assert (out / "adapter_model.safetensors").exists()
    assert lora_trajectory_report(out / "lora_trajectory")["model.layers.0.mlp.down_proj"]["steps"] == list(range(41))


@pytest.mark.parametrize(
    "rows,pattern",
    [
        (
            [GOOD_ROW, {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
            r"line 2: message 0 has role 'usr'; use one of \['system', 'user', 'assistant'\]",
        ),
        (
            [GOOD_ROW, GOOD_ROW, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'],
            r"line 3: byte 47 \(b'\\xe9'\) is not UTF-8",
        ),
    ],
)
def test_unknown_roles_and_non_utf8_bytes_are_named_with_their_line(tmp_path, rows, pattern):
    """A role 'usr' trained with no warning; a Latin-1 byte raised UnicodeDecodeError naming no file or line."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    with pytest.raises(ValueError, match=pattern) as error:
        sft_mod.check_chat_jsonl(path)
    assert str(error.value).startswith(str(path))


def test_rows_trl_drops_for_length_are_counted_and_reported(tmp_path, tiny_dir, caplog):
    """TRL truncates rows to max_length and silently drops those left without an assistant token: training ran on 1
    of 2 rows. Now the count is logged and written to summary.md; a file where every row is dropped is refused."""
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    long = {"messages": [{"role": "user", "content": " ".join(WORDS * 8)}, {"role": "assistant", "content": "ok"}]}
    path = _write_jsonl(tmp_path / "rows.jsonl", [short, long])
    with caplog.at_level("WARNING"):
        out = sft_mod.train(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(path)),
            LoraPresetConfig("rank1_single", [0]),
            _args(tmp_path / "o", max_steps=1, max_length=48, per_device_train_batch_size=1),
        )
    assert "training on 1 of 2 rows: TRL dropped 1" in caplog.text
    assert "- rows: trained on 1 of 2; 1 dropped" in (out / "summary.md").read_text()
    only_long = _write_jsonl(tmp_path / "long.jsonl", [long])
    with pytest.raises(ValueError, match=r"all 1 rows were dropped.*max_length=48"):
        build_trainer(
            ModelConfig(str(tiny_dir)),
            DataConfig(str(only_long)),
            LoraPresetConfig("rank1_single", [0]),
            _args(tmp_path / "o2", max_length=48),
        )
