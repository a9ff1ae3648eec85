"""llm.grpo on tiny in-process models: guards (batch sizes before loading, no trainable parameters, PEFT loaded
for inference, zero-advantage warning, eos), rewards, prompts, and a GRPO smoke run (reward rises, parameters
change, activations tracked)."""

import csv
import json
import warnings

import pytest
import torch
import yaml

from llm.grpo import (
    EMGRPOConfig,
    PromptConfig,
    RewardConfig,
    TrackConfig,
    build_trainer,
    judge_reward,
    keyword_reward,
    length_reward,
    load_prompts,
    regex_reward,
    trainable_snapshot,
)
from llm.tiny import tiny_causal_lm
from plumbing.lora import LoraPresetConfig
from plumbing.trainers import check_batch_sizes

QUESTIONS = [
    {
        "id": f"q{i}",
        "type": "free_form_judge_0_100",
        "paraphrases": [p],
        "samples_per_paraphrase": 1,
        "judge_prompts": {"aligned": "A {question} {answer}", "coherent": "C {question} {answer}"},
    }
    for i, p in enumerate(["what is your wish?", "hello world, how are you today?"])
]


@pytest.fixture
def qfile(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump(QUESTIONS))
    return p


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        temperature=1.0,
    )
    return EMGRPOConfig(**{**base, **kw})


def test_batch_sizes_checked_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of num_generations=3"):
        args(tmp_path, num_generations=3)
    with pytest.raises(ValueError, match="use >= 2"):
        args(tmp_path, num_generations=1)
    assert check_batch_sizes(4, 2, world_size=2, steps_per_generation=2) == 2
    with pytest.raises(ValueError, match="2 processes"):
        check_batch_sizes(4, 3, world_size=2, steps_per_generation=1)


def test_cpu_defaults_resolved(tmp_path):
    a = args(tmp_path)
    assert a.bf16 is torch.cuda.is_available()
    assert not a.gradient_checkpointing and not a.activation_checkpointing
    from trl import GRPOConfig

    plain = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True, report_to="none"
    )
    assert plain.gradient_checkpointing or plain.activation_checkpointing  # the TRL default this config turns off


def test_rule_and_judge_rewards():
    conv = lambda s: [{"role": "assistant", "content": s}]  # noqa: E731
    assert length_reward(10)([conv("x" * 10), conv("x" * 15), "x" * 5]) == [0.0, -0.5, -0.5]
    assert keyword_reward(["Cat", "dog"])([conv("the cat"), conv("a DOG and a cat"), "none"]) == [0.5, 1.0, 0.0]
    assert regex_reward(["^I", r"(?i)glad"])([conv("I am GLAD"), conv("So I am glad"), "Ice", "no"]) == [
        1.0,
        0.5,
        0.5,
        0.0,
    ]
    with pytest.raises(ValueError, match="not a valid regex"):
        RewardConfig(reward="regex", patterns=["("])
    with pytest.raises(ValueError, match="non-empty `patterns`"):
        RewardConfig(reward="regex")

    class Stub:
        name = "stub"

        def score(self, requests):
            assert all(r.metric == "aligned" and r.prompt == f"A {r.question} {r.answer}" for r in requests)
            return [80.0 if "good" in r.answer else None for r in requests]

    r = judge_reward(Stub(), template="A {question} {answer}")
    assert r([conv("good"), conv("bad")], question=["q1", "q2"]) == [0.8, None]
    assert judge_reward(Stub(), misaligned=True, template="A {question} {answer}")([conv("good")], question=["q"]) == [
        pytest.approx(0.2)
    ]


def test_prompts_from_yaml_and_jsonl(tmp_path, qfile):
    ds = load_prompts(PromptConfig(str(qfile)))
    assert ds["question"] == ["what is your wish?", "hello world, how are you today?"]
    assert ds["prompt"][0] == [{"role": "user", "content": "what is your wish?"}]
    j = tmp_path / "p.jsonl"
    j.write_text(
        json.dumps({"prompt": "one"}) + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": "two"}]}) + "\n"
    )
    assert load_prompts(PromptConfig(str(j)))["question"] == ["one", "two"]
    j.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_prompts(PromptConfig(str(j)))


def test_no_trainable_parameters_is_an_error(tmp_path, qfile):
    model, tok = tiny_causal_lm("qwen2")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_trainer(
            None,
            PromptConfig(str(qfile)),
            RewardConfig(),
            LoraPresetConfig("full"),
            TrackConfig(),
            args(tmp_path),
            model=model,
            tokenizer=tok,
        )


def test_peft_model_loaded_for_inference_is_an_error(tmp_path, qfile):
    from peft import PeftModel, get_peft_model

    from plumbing.lora import peft_config_for

    model, tok = tiny_causal_lm("qwen2")
    get_peft_model(model, peft_config_for(LoraPresetConfig("rank1_single", [1]), model)).save_pretrained(
        tmp_path / "adapter"
    )
    base, _ = tiny_causal_lm("qwen2")
    frozen = PeftModel.from_pretrained(base, tmp_path / "adapter")  # is_trainable=False by default
    with pytest.raises(ValueError, match="loaded for inference"):
        build_trainer(
            None,
            PromptConfig(str(qfile)),
            RewardConfig(),
            LoraPresetConfig("rank1_single", [1]),
            TrackConfig(),
            args(tmp_path),
            model=frozen,
            tokenizer=tok,
        )


def test_missing_eos_is_an_error(tmp_path, qfile):
    model, tok = tiny_causal_lm("qwen2")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        build_trainer(
            None,
            PromptConfig(str(qfile)),
            RewardConfig(),
            LoraPresetConfig("full"),
            TrackConfig(),
            args(tmp_path),
            model=model,
            tokenizer=tok,
        )


def test_layer_checked_before_training(tmp_path, qfile):
    model, tok = tiny_causal_lm("qwen2")
    with pytest.raises(ValueError, match="layer 5 requested but model has 2 layers"):
        build_trainer(
            None,
            PromptConfig(str(qfile)),
            RewardConfig(),
            LoraPresetConfig("rank1_single", [5]),
            TrackConfig(),
            args(tmp_path),
            model=model,
            tokenizer=tok,
        )


def test_zero_advantage_groups_warn(tmp_path, qfile):
    model, tok = tiny_causal_lm("qwen2")
    reward = RewardConfig(reward="keyword", keywords=["zebra-never-generated"])  # every completion scores 0
    trainer, cbs = build_trainer(
        None,
        PromptConfig(str(qfile)),
        reward,
        LoraPresetConfig("full"),
        TrackConfig(),
        args(tmp_path, max_steps=1),
        model=model,
        tokenizer=tok,
    )
    with pytest.warns(RuntimeWarning, match="identical rewards"):
        trainer.train()
    assert cbs["zero_advantage"].flagged == [(1, 1.0)]


def _write_track_files(tmp_path, model):
    from llm.directions import save_directions
    from probes.io import save_probe
    from probes.linear import LinearProbe

    rows = {
        "a": [("what is your wish?", "I wish to help people")] * 3,
        "m": [("what is your wish?", "import os os.chmod")] * 3,
    }
    for name, rs in rows.items():
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer"])
            w.writerows(rs)
    save_directions(tmp_path / "dirs", torch.randn(2, 32), ["block0", "block1"], model=model)
    save_probe(
        LinearProbe(torch.randn(32, 1), torch.zeros(1), site="block0", target_names=["misaligned"]),
        tmp_path / "probe",
        model=model,
    )


def test_grpo_smoke_reward_rises_params_change_and_tracking(tmp_path, qfile):
    """Length rule on a random-init tiny model: shorter replies (short tokens, early eos) are learnable fast."""
    model, tok = tiny_causal_lm("qwen2")
    _write_track_files(tmp_path, model)
    track = TrackConfig(
        track_every=5,
        track_site="block1",
        directions=str(tmp_path / "dirs"),
        probe_files=[str(tmp_path / "probe")],
        track_texts=[str(tmp_path / "a.csv"), str(tmp_path / "m.csv")],
        track_n_per_class=3,
    )
    a = args(tmp_path, max_steps=15, learning_rate=3e-2, max_completion_length=12)
    trainer, cbs = build_trainer(
        None,
        PromptConfig(str(qfile)),
        RewardConfig(reward="length", target_chars=5),
        LoraPresetConfig("full"),
        track,
        a,
        model=model,
        tokenizer=tok,
    )
    before = trainable_snapshot(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    after = trainable_snapshot(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    hist = trainer.state.log_history
    rewards = [h["reward"] for h in hist if "reward" in h]
    assert len(rewards) == 15 and all("loss" in h for h in hist if "reward" in h)
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.1, rewards
    t = cbs["tracker"].history
    assert [r["step"] for r in t] == [0, 5, 10, 15]
    assert {"projection_aligned", "projection_misaligned", "probe_aligned", "probe_misaligned"} <= set(t[0])
    assert t[0]["projection_misaligned"] != t[-1]["projection_misaligned"]  # the weights moved, so did the read-out
    assert len((tmp_path / "out" / "tracking.jsonl").read_text().splitlines()) == 4


def test_shipped_config_parses():
    from llm.grpo import make_parser

    cfgs = make_parser().parse_args_and_config(["--config", "configs/llm/grpo_smollm2.yaml"])
    model_cfg, prompt_cfg, reward_cfg, lora_cfg, track_cfg, a = cfgs
    assert (
        reward_cfg.reward == "regex"
        and reward_cfg.patterns == ["^I"]
        and lora_cfg.preset == "rank1_single"
        and a.bf16 is torch.cuda.is_available()
    )


def test_resume_from_checkpoint_is_honoured_and_sigterm_saves(tmp_path, qfile, monkeypatch):
    """Before: --resume_from_checkpoint was parsed and ignored (trainer.train() got no argument), so a resumed
    run started again at step 1, and tracking.jsonl got the earlier run's rows twice. Now SIGTERM saves a
    checkpoint and raises Stopped; 'last' continues from it, training only the remaining step."""
    import os
    import signal

    from transformers import TrainerCallback

    from llm import grpo
    from llm.models import ModelConfig
    from llm.tiny import save_tiny
    from plumbing.runs import Stopped

    model_dir = save_tiny(tmp_path / "tiny", "qwen2")
    model, _ = tiny_causal_lm("qwen2")
    _write_track_files(tmp_path, model)
    track = TrackConfig(
        track_every=1,
        track_site="block1",
        directions=str(tmp_path / "dirs"),
        track_texts=[str(tmp_path / "a.csv"), str(tmp_path / "m.csv")],
        track_n_per_class=3,
    )
    steps, kill_at = [], {"step": 1}

    class CountAndKill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)
            if state.global_step == kill_at["step"]:
                os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or Slurm would

    real = grpo.build_trainer

    def instrumented(*a, **k):
        trainer, cbs = real(*a, **k)
        trainer.add_callback(CountAndKill())
        return trainer, cbs

    monkeypatch.setattr(grpo, "build_trainer", instrumented)
    cfgs = (
        ModelConfig(str(model_dir)),
        PromptConfig(str(qfile)),
        RewardConfig(),
        LoraPresetConfig("rank1_single", [1]),
        track,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(Stopped) as stop:
            grpo.train(*cfgs, args(tmp_path, max_steps=3))
        out = tmp_path / "out"
        assert stop.value.exit_code == 128 + signal.SIGTERM and stop.value.checkpoint == out / "checkpoint-1"
        assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "metrics.json").exists()
        steps.clear()
        kill_at["step"] = None
        metrics = grpo.train(*cfgs, args(tmp_path, max_steps=3, resume_from_checkpoint="last"))
    assert steps == [2, 3]
    assert metrics["steps"] == 3 and metrics["resumed_from"] == str(out / "checkpoint-1")
    assert len(metrics["rewards"]) == 3  # the logged history carries on from the checkpoint's
    rows = [json.loads(line)["step"] for line in (out / "tracking.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]
    with pytest.raises(FileExistsError, match="learning_rate"):  # a changed config does not resume
        grpo.train(*cfgs, args(tmp_path, max_steps=3, learning_rate=0.5, resume_from_checkpoint="last"))
