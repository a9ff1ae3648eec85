"""toy.train / toy.model / toy.experiments.pretrain: trainer smoke test, the global RNGs left as found, exact validation loss against the floor, exact resume,
config errors, and (slow) two synchronized ranks under torchrun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing.config import ConfigParser
from toy.beliefs import enumerate_sequences, loss_floor, next_token_distributions
from toy.config import ProcessConfig, TrainConfig
from toy.experiments.pretrain import main
from toy.model import ToyModelConfig, build_model
from toy.processes import make_process
from toy.train import train
from toy.validation import soft_loss, validation_loss, validation_set, window_loss

REPO = Path(__file__).resolve().parents[1]


def test_presets_build_real_gpt2():
    m = build_model(ToyModelConfig(), vocab_size=3, context_length=10, seed=0)
    c = m.config
    assert type(m).__name__ == "GPT2LMHeadModel"
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.activation_function, c.n_positions) == (
        4,
        64,
        1,
        256,
        "relu",
        10,
    )
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    r = ToyModelConfig(preset="rrxor")
    assert (r.n_layers, r.d_model, r.n_heads, r.d_mlp) == (4, 128, 4, 512)
    same = build_model(ToyModelConfig(), 3, 10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), same.parameters()))
    other = build_model(ToyModelConfig(), 3, 10, seed=1)
    assert not torch.equal(m.transformer.wte.weight, other.transformer.wte.weight)


def test_training_logs_loss_and_changes_every_parameter(tiny_toy, tiny_train_cfg, tmp_path):
    process = make_process("mess3")
    model = build_model(tiny_toy, 3, 6, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(process, model, tiny_train_cfg(tmp_path / "run"))
    assert [h["step"] for h in result.history] == [3, 6, 9, 12]
    assert all(h["train_loss"] is not None and h["train_loss"] > 0 for h in result.history)
    assert "val_loss" in result.history[1] and "val_loss" in result.history[-1]
    assert result.val_loss < 1.2 and result.floor == pytest.approx(loss_floor(process, 6), abs=1e-10)
    unchanged = [n for n, p in result.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert (result.checkpoint_dir / "model.safetensors").is_file()
    assert json.loads((result.checkpoint_dir / "trainer_state.json").read_text())["step"] == 12


@pytest.mark.parametrize(
    "name,kwargs,length", [("mess3", {}, 6), ("mess3", {"x": 0.15, "a": 0.6}, 5), ("rrxor", {}, 7)]
)
def test_exact_validation_loss_of_the_exact_predictor_is_the_floor(name, kwargs, length):
    """The validation loss (soft targets on prefixes) of the exact predictive distribution equals
    toy.beliefs.loss_floor, and so does the hard-target loss over every whole window."""
    process = make_process(name, **kwargs)
    val = validation_set(process, length)
    assert val.exact
    logits = val.targets.double().clamp_min(1e-300).log()
    assert soft_loss(logits, val.targets, val.weights).item() == pytest.approx(loss_floor(process, length), abs=1e-9)
    assert val.floor == pytest.approx(loss_floor(process, length), abs=1e-9)
    windows, probs = enumerate_sequences(process, length)
    hard = window_loss(next_token_distributions(process, windows).clamp_min(1e-300).log(), windows, probs)
    assert hard.item() == pytest.approx(loss_floor(process, length), abs=1e-9)


@pytest.mark.parametrize("vocab", [3, 5])
def test_validation_loss_equals_probability_weighted_loss_over_all_windows(tiny_toy, vocab):
    """vocab 5: toy.grpo's models carry <eos>/<pad> after the process tokens, never targets; their mass is loss."""
    process = make_process("mess3")
    model = build_model(tiny_toy, vocab, 6, seed=3)
    windows, probs = enumerate_sequences(process, 6)
    with torch.no_grad():
        reference = window_loss(model(input_ids=windows).logits, windows, probs).item()
    assert validation_loss(model, validation_set(process, 6), batch_size=50) == pytest.approx(reference, abs=1e-6)
    assert reference > loss_floor(process, 6) + 0.01  # an untrained model is well above the floor


def test_sampled_validation_set_when_enumeration_is_too_big():
    process = make_process("product", factors=[{"name": "mess3"}, {"name": "rrxor"}])
    val = validation_set(process, 8, max_sequences=1000, n_samples=3000)
    assert not val.exact and val.tokens.shape == (3000, 7)
    assert val.floor == pytest.approx(loss_floor(process, 8), abs=0.02)


@pytest.mark.parametrize("chunk", [1, 5])
def test_resume_after_kill_equals_uninterrupted_run(tiny_toy, tiny_train_cfg, tmp_path, chunk):
    """A real Ctrl-C during step 8 (mid-chunk for chunk 5), then resume: the same weights as an
    uninterrupted run (the default sampler's data depend only on seed, step and rank)."""
    process = make_process("mess3")
    calls = []

    def ones(tokens, kill_at=None):
        calls.append(1)
        if len(calls) == kill_at:  # the step in flight completes, then training stops and saves
            os.kill(os.getpid(), signal.SIGINT)
        return torch.ones(tokens.shape[0], tokens.shape[1] - 1)

    full = train(
        process,
        build_model(tiny_toy, 3, 6, seed=0),
        tiny_train_cfg(tmp_path / "a" / "run", sample_chunk=chunk),
        loss_weights_fn=ones,
    )
    calls.clear()
    cfg = tiny_train_cfg(tmp_path / "b" / "run", sample_chunk=chunk)
    with pytest.raises(KeyboardInterrupt):
        train(process, build_model(tiny_toy, 3, 6, seed=0), cfg, loss_weights_fn=lambda t: ones(t, kill_at=8))
    assert sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint-*")) == ["checkpoint-8"]
    cfg.resume_from_checkpoint = "last"
    # a different random init: every weight must come from the checkpoint
    resumed = train(process, build_model(tiny_toy, 3, 6, seed=99), cfg, loss_weights_fn=ones)
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]


def test_crash_leaves_a_resumable_checkpoint(tiny_toy, tiny_train_cfg, tmp_path):
    process = make_process("mess3")

    def data_fn(step, generator):
        if step == 5:
            raise RuntimeError("boom")
        from toy.data import sample

        return sample(process, 16, 6, generator=generator).tokens

    with pytest.raises(RuntimeError, match="boom"):
        train(process, build_model(tiny_toy, 3, 6, seed=0), tiny_train_cfg(tmp_path / "run"), data_fn=data_fn)
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5


def test_training_leaves_the_global_rngs_as_it_found_them(tiny_toy, tiny_train_cfg, tmp_path):
    """The steps run on transformers.Trainer, which seeds torch's, numpy's and Python's global RNGs with the run's seed
    when built; toy.train puts the caller's states back (the hand loop before it never touched them), so the caller's
    next draws are the ones it would have made without training."""
    import random

    import numpy as np

    def seed_and_draw(run=None):
        torch.manual_seed(1234), np.random.seed(7), random.seed(3)
        if run is not None:
            run()
        return torch.rand(3), np.random.rand(), random.random()

    expected = seed_and_draw()
    process, model = make_process("mess3"), build_model(tiny_toy, 3, 6, seed=0)
    got = seed_and_draw(lambda: train(process, model, tiny_train_cfg(tmp_path / "run", max_steps=3, eval_steps=0)))
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_loss_weights_fn_masks_targets(tiny_toy, tiny_train_cfg, tmp_path):
    """Weights zero on every target except token 0 after token 0: the model learns only that transition."""
    process = make_process("mess3")

    def weights(tokens):
        return (tokens[:, :-1] == 0).float()

    result = train(
        process,
        build_model(tiny_toy, 3, 6, seed=0),
        tiny_train_cfg(tmp_path / "run", max_steps=6, eval_steps=0),
        loss_weights_fn=weights,
    )
    assert result.history[-1]["train_loss"] > 0
    with pytest.raises(ValueError, match="loss_weights_fn"):
        train(
            process,
            build_model(tiny_toy, 3, 6, seed=0),
            tiny_train_cfg(tmp_path / "b" / "run", max_steps=2),
            loss_weights_fn=lambda t: t[:, :2].float(),
        )


def test_make_process_names_and_factored_specs():
    assert make_process("mess3", x=0.15, a=0.6).name == "mess3(x=0.15,a=0.6)"
    prod = make_process("product", factors=[{"name": "mess3"}, {"name": "mess3", "x": 0.15, "a": 0.6}])
    assert prod.vocab_size == 9 and prod.factor_state_sizes == (3, 3)
    corr = make_process("correlated", first={"name": "mess3"}, second={"name": "rrxor"}, rho=0.5)
    assert corr.factor_vocab_sizes == (3, 2)
    tag = make_process("capability_tag", capability={"name": "mess3"}, switch_prob=0.1)
    assert tag.vocab_size == 6
    with pytest.raises(ValueError, match="unknown process 'mess4'"):
        make_process("mess4")
    with pytest.raises(ValueError, match="does not accept"):
        make_process("mess3", y=0.1)


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("process: mess3\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--learning_rat'"):
        ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):
        ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(["--stepz", "3"])
    with pytest.raises(ValueError, match="unknown process"):
        ProcessConfig(process="mess_3")
    with pytest.raises(ValueError, match="does not divide"):
        ToyModelConfig(d_model=64, n_heads=3)
    good = tmp_path / "good.yaml"
    good.write_text("process: mess3\nprocess_kwargs: {x: 0.15}\nmax_steps: 7\n")
    data, model, tr = ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(
        ["--config", str(good), "--max_steps", "9"]
    )
    assert data.process_kwargs == {"x": 0.15} and tr.max_steps == 9 and model.n_layers == 4
    data, _, _ = ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(
        ["--process_kwargs", '{"a": 0.6}']
    )
    assert data.process_kwargs == {"a": 0.6}


def test_entry_point_with_config_file(tmp_path):
    result = main(
        [
            "--config",
            str(REPO / "configs/toy/mess3.yaml"),
            "--preset",
            "mess3_small",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "8",
            "--eval_steps",
            "0",
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
            "--val_max_sequences",
            "100",
        ]
    )
    assert result.step == 4 and not result.history[-1]["val_loss"] != result.history[-1]["val_loss"]
    assert (tmp_path / "checkpoint-4" / "config.json").is_file()


@pytest.mark.slow
def test_two_ranks_train_synchronized_parameters(tmp_path):
    """torchrun with 2 CPU (gloo) ranks: both ranks end with identical parameters, which differ from a
    1-rank run of the same steps (each rank saw its own data)."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch, hashlib\n"
        "torch.set_num_threads(1)\n"
        "from accelerate import PartialState\n"
        "from toy.experiments.pretrain import main\n"
        "r = main(sys.argv[1:])\n"
        "rank = PartialState().process_index\n"
        "flat = torch.cat([p.detach().flatten() for p in r.model.parameters()])\n"
        "torch.save(flat, f'{sys.argv[-1]}/params_rank{rank}.pt')\n"
        # a file per rank: two ranks printing to one pipe can interleave their bytes
        "open(f'{sys.argv[-1]}/world_rank{rank}.txt', 'w').write(str(PartialState().num_processes))\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "--config",
        str(REPO / "configs/toy/mess3.yaml"),
        "--preset",
        "mess3_small",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "8",
        "--eval_steps",
        "0",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--val_max_sequences",
        "100",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(out / f"world_rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    a, b = (
        torch.load(out / "params_rank0.pt", weights_only=True),
        torch.load(out / "params_rank1.pt", weights_only=True),
    )
    assert torch.equal(a, b)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["history"][-1]["tokens"] == 6 * 8 * 2 * 10
    # the saved model is the synchronized one
    saved = torch.cat([t.flatten() for t in load_file(out / "checkpoint-6" / "model.safetensors").values()])
    assert saved.numel() == a.numel()


def test_eval_fn_joins_step_zero_and_every_validation_point(tiny_toy, tiny_train_cfg, tmp_path):
    process = make_process("mess3")
    model = build_model(tiny_toy, 3, 6, seed=0)
    seen = []

    def eval_fn(m):
        seen.append(m.training)
        return {"probe_mse/x": float(len(seen))}

    result = train(process, model, tiny_train_cfg(tmp_path / "run"), eval_fn=eval_fn)
    assert [h["step"] for h in result.history if "probe_mse/x" in h] == [0, 6, 12]
    assert seen == [False, False, False] and result.model.training  # eval mode inside, training mode restored


def test_training_after_a_bf16_trainer_in_the_same_process(tiny_toy, tiny_train_cfg, tmp_path):
    """A TRL trainer in bf16 (what ToyGRPOConfig resolves on a GPU) leaves accelerate's process-wide state in bf16; the
    next toy.train of that process (the next seed of ``toy.experiments.rl --seeds``, its supervised control) must run
    with its own config's precision, not stop on accelerate's 'cannot be changed' error."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process: the trainer's state comes first
    Accelerator(cpu=True, mixed_precision="bf16")
    try:
        result = train(
            make_process("mess3"),
            build_model(tiny_toy, 3, 6, seed=0),
            tiny_train_cfg(tmp_path / "run", max_steps=3, eval_steps=0),
        )
        assert result.step == 3 and AcceleratorState().mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
