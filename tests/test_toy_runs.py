"""Runs you can trust, toy side: no code runs from a checkpoint, the run folder records its config,
checkpoints are atomic and chosen by step number, SIGTERM saves like Ctrl-C, a diverged run saves nothing of
itself; and every single-process toy entry point refuses a multi-process launch before any work."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing.runs import Stopped, TrainingDiverged
from toy.config import TrainConfig
from toy.model import build_model
from toy.processes import make_process
from toy.train import train

REPO = Path(__file__).resolve().parents[1]
MESS3 = make_process("mess3")


@pytest.fixture()
def fit(tiny_toy, tiny_train_cfg):
    """``(out, init_seed=0, **overrides) -> TrainResult``: the tiny model trained on Mess3 into ``out``."""

    def run(out, init_seed=0, **kw):
        return train(MESS3, build_model(tiny_toy, 3, 6, seed=init_seed), tiny_train_cfg(out, **kw))

    return run


def same_weights(a, b):
    return all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(a.parameters(), b.parameters()))


class Payload:
    """Unpickling this creates ``path``: proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- 1. no code from a checkpoint


def test_checkpoint_files_load_without_unpickling(fit, tmp_path):
    ckpt = fit(tmp_path / "run", max_steps=3, eval_steps=0).checkpoint_dir
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(ckpt / name, weights_only=True)


def test_a_crafted_rng_file_is_not_executed_on_resume(fit, tiny_toy, tiny_train_cfg, tmp_path):
    """A pickle payload in rng.pt: today's resume runs it. Now it is not loaded (a warning), and the resume is
    still exact because the data are seeded per step."""
    full = fit(tmp_path / "full")
    out = tmp_path / "run"
    fit(out, save_steps=6)
    marker = tmp_path / "pwned"
    torch.save({"torch": Payload(marker)}, out / "checkpoint-6" / "rng.pt")
    import shutil

    shutil.rmtree(out / "checkpoint-12")
    resumed = train(
        MESS3, build_model(tiny_toy, 3, 6, seed=99), tiny_train_cfg(out, save_steps=6, resume_from_checkpoint="last")
    )
    assert not marker.exists(), "resuming ran code from rng.pt"
    assert same_weights(full.model, resumed.model)


def test_no_unpickling_loader_in_toy():
    """Every torch.load in toy/ and bench/ says weights_only=True (tests/test_no_pickle.py on the rel branch
    checks the whole repository)."""
    import ast

    bad = []
    for path in [*REPO.glob("toy/**/*.py"), *REPO.glob("bench/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad


# --------------------------------------------------------------------------- 2. the folder records its config


def test_another_config_refuses_the_folder_until_overwrite(fit, tmp_path):
    out = tmp_path / "run"
    fit(out, max_steps=6, eval_steps=0)
    assert json.loads((out / "run_config.json").read_text())["TrainConfig"]["per_device_train_batch_size"] == 16
    with pytest.raises(
        FileExistsError, match=r"(?s)another config.*per_device_train_batch_size: 16 -> 8.*--overwrite true"
    ):
        fit(out, max_steps=6, eval_steps=0, per_device_train_batch_size=8)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # nothing was touched
    fit(out, max_steps=6, eval_steps=0, per_device_train_batch_size=8, overwrite=True)
    assert json.loads((out / "run_config.json").read_text())["TrainConfig"]["per_device_train_batch_size"] == 8


def test_a_fresh_start_over_this_runs_checkpoints_refuses(fit, tmp_path):
    """Today a second run silently rewrites checkpoint-N; now it says to resume or overwrite."""
    out = tmp_path / "run"
    fit(out, max_steps=6, eval_steps=0)
    with pytest.raises(FileExistsError, match=r"checkpoint-6.*--resume_from_checkpoint last.*--overwrite true"):
        fit(out, max_steps=6, eval_steps=0)
    fit(out, max_steps=6, eval_steps=0, overwrite=True)


@pytest.mark.parametrize("change", [{"seed": 1}, {"per_device_train_batch_size": 8}, {"learning_rate": 2e-2}])
def test_resume_refuses_a_changed_config(fit, tmp_path, change):
    out = tmp_path / "run"
    fit(out, save_steps=6)
    with pytest.raises(FileExistsError, match=f"TrainConfig.{next(iter(change))}"):
        fit(out, save_steps=6, resume_from_checkpoint="last", **change)


def test_resume_may_change_reporting_and_saving(fit, tmp_path):
    out = tmp_path / "run"
    fit(out, max_steps=12, save_steps=6)
    result = fit(out, max_steps=12, save_steps=4, logging_steps=2, disable_tqdm=False, resume_from_checkpoint="last")
    assert result.step == 12


def test_resume_by_path_refuses_a_checkpoint_of_another_config(fit, tmp_path):
    fit(tmp_path / "a", max_steps=6, eval_steps=0)
    with pytest.raises(ValueError, match=r"(?s)cannot resume.*TrainConfig.per_device_train_batch_size"):
        fit(
            tmp_path / "b",
            max_steps=6,
            eval_steps=0,
            per_device_train_batch_size=8,
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"),
        )


def test_overwrite_and_resume_together_are_refused():
    with pytest.raises(ValueError, match="pass one of them"):
        TrainConfig(overwrite=True, resume_from_checkpoint="last")


# --------------------------------------------------------------------------- 3. atomic checkpoints, polite stops


def test_resume_skips_a_half_written_newest_checkpoint(fit, tmp_path, caplog):
    """A checkpoint-10 without trainer_state.json (a crash mid-write by older code, a copy cut short): resume
    takes checkpoint-6 with a warning and ends with the uninterrupted run's weights."""
    full = fit(tmp_path / "full")
    out = tmp_path / "run"
    fit(out, save_steps=6)
    import shutil

    shutil.rmtree(out / "checkpoint-12")
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-10")
    (out / "checkpoint-10" / "trainer_state.json").unlink()
    with caplog.at_level("WARNING"):
        resumed = fit(out, init_seed=99, save_steps=6, resume_from_checkpoint="last")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-10" in caplog.text
    assert same_weights(full.model, resumed.model)


@pytest.mark.parametrize("damage", ["", '{"step": 12, "hist'])
def test_resume_skips_an_empty_or_cut_off_state_file_and_names_both(fit, tmp_path, caplog, damage):
    """A full disk during a save left checkpoint-12's trainer_state.json empty or cut off; resume took it (only its
    existence was checked) and died in json.loads naming no file. Now it is skipped, named, and the warning names
    checkpoint-6, from which the resume ends with the uninterrupted run's weights."""
    full = fit(tmp_path / "full")
    out = tmp_path / "run"
    fit(out, save_steps=6)
    (out / "checkpoint-12" / "trainer_state.json").write_text(damage)
    with caplog.at_level("WARNING"):
        resumed = fit(out, init_seed=99, save_steps=6, resume_from_checkpoint="last")
    assert f"skipping incomplete checkpoint {out / 'checkpoint-12'}: trainer_state.json is" in caplog.text
    assert f"resuming from {out / 'checkpoint-6'}" in caplog.text
    assert same_weights(full.model, resumed.model)
    (out / "checkpoint-12" / "trainer_state.json").write_text(damage)  # the resumed run rewrote it
    with pytest.raises(ValueError, match=rf"{out / 'checkpoint-12' / 'trainer_state.json'}"):
        fit(out, save_steps=6, resume_from_checkpoint=str(out / "checkpoint-12"))


def test_a_window_too_long_for_memory_is_refused_before_allocation(tiny_toy, tiny_train_cfg, tmp_path):
    """`context_length: 100000` reached 22.8 GB RSS in 90 s with no message (the sampled validation set alone is
    20000 x 100000 tokens). Now it is refused at once, naming the key and a window that fits, and nothing is written."""
    model = build_model(tiny_toy, 3, 100_000)
    with pytest.raises(
        ValueError,
        match=r"context_length=100000 \(batch_size=256\) needs about [\d,.]+ GiB .*use "
        r"context_length <= \d+",
    ):
        train(
            MESS3, model, tiny_train_cfg(tmp_path / "run", per_device_train_batch_size=256, val_samples=20_000), 100_000
        )
    assert not (tmp_path / "run").exists()


def test_a_crash_while_saving_leaves_no_partial_checkpoint(fit, tmp_path, monkeypatch):
    import toy.train as toy_train

    real = toy_train.torch.save

    def failing_save(obj, path, *a, **k):
        if Path(path).name == "rng.pt":
            raise OSError("disk full")
        return real(obj, path, *a, **k)

    out = tmp_path / "run"
    monkeypatch.setattr(toy_train.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fit(out, max_steps=3, eval_steps=0)
    assert not [p.name for p in out.iterdir() if "checkpoint" in p.name]


def test_sigterm_saves_and_the_resume_is_exact(tmp_path):
    """The pretraining entry point in a subprocess gets a real SIGTERM during step 8: it finishes the step,
    saves checkpoint-8, exits 143 and says how to resume; the resume ends with the uninterrupted run's weights."""
    from toy.experiments.pretrain import main

    args = [
        "--config",
        str(REPO / "configs/toy/mess3.yaml"),
        "--preset",
        "mess3_small",
        "--n_layers",
        "2",
        "--d_model",
        "16",
        "--n_heads",
        "2",
        "--d_mlp",
        "32",
        "--context_length",
        "6",
        "--max_steps",
        "12",
        "--per_device_train_batch_size",
        "16",
        "--warmup_steps",
        "2",
        "--logging_steps",
        "3",
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--val_max_sequences",
        "243",
    ]
    full = main([*args, "--output_dir", str(tmp_path / "full")])
    script = tmp_path / "term.py"
    script.write_text(
        "import os, signal, sys\n"
        "import toy.datasets as d\n"
        "real = d.SequenceStream.batch\n"
        "def batch(stream, step):  # toy.train's windows of step `step` (sample_chunk 1)\n"
        "    if step == 7:  # SIGTERM arrives while step 8 is in flight\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(stream, step)\n"
        "d.SequenceStream.batch = batch\n"
        "from toy.experiments.pretrain import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--output_dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "SIGTERM" in proc.stdout + proc.stderr and "--resume_from_checkpoint last" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    resumed = main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "last"])
    assert resumed.step == 12 and same_weights(full.model, resumed.model)


def test_stop_raises_training_stopped_with_the_shell_exit_code(tiny_toy, tiny_train_cfg, tmp_path):
    calls = []

    def weights(tokens):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.ones(tokens.shape[0], tokens.shape[1] - 1)

    with pytest.raises(Stopped) as info:
        train(MESS3, build_model(tiny_toy, 3, 6, seed=0), tiny_train_cfg(tmp_path / "run"), loss_weights_fn=weights)
    assert info.value.exit_code == 143 and info.value.checkpoint.name == "checkpoint-4"


# --------------------------------------------------------------------------- 4. validated inputs


def test_a_nan_loss_stops_before_anything_of_it_is_saved(tiny_toy, tiny_train_cfg, tmp_path):
    """NaN loss weights from step 5: today the run ends 'fine' with NaN weights in every later checkpoint."""
    calls = []

    def weights(tokens):
        calls.append(1)
        w = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
        return w * float("nan") if len(calls) >= 5 else w

    out = tmp_path / "run"
    with pytest.raises(
        TrainingDiverged, match=r"step 6: logged loss is nan.*Lower learning_rate.*last checkpoint: .*checkpoint-3"
    ):
        train(MESS3, build_model(tiny_toy, 3, 6, seed=0), tiny_train_cfg(out, save_steps=3), loss_weights_fn=weights)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / "model.safetensors").values())


def test_a_runaway_loss_stops(fit, tmp_path):
    """Plain SGD at a huge learning rate, no clipping: the loss runs away (or turns NaN) and the run stops."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="diverging|nan|inf"):
        fit(out, optim="sgd", learning_rate=1e4, max_grad_norm=0.0, warmup_steps=0, logging_steps=1, save_steps=1)
    for ckpt in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_max_loss_ratio_must_be_above_one():
    with pytest.raises(ValueError, match="max_loss_ratio"):
        TrainConfig(max_loss_ratio=0.5)
    assert not math.isnan(TrainConfig(max_loss_ratio=0).max_loss_ratio)


@pytest.mark.parametrize(
    "call",
    [
        lambda: __import__("toy.processes").processes.product(["mess3", "mess3"]),
        lambda: __import__("toy.processes").processes.product("mess3", "mess3"),
        lambda: __import__("toy.processes").processes.make_process("product", factors=["mess3", "mess3"]),
    ],
)
def test_product_of_names_says_what_to_pass(call):
    with pytest.raises((TypeError, ValueError), match=r"make_process\(\"product\", factors=\[\{\"name\": \"mess3\"\}"):
        call()


# --------------------------------------------------------------------------- toy GRPO runs


def _grpo(tmp_path, pre, **kw):
    from toy.grpo import RLTaskConfig, ToyGRPOConfig

    task = RLTaskConfig(
        process="mess3",
        reward="reweight",
        pretrained_path=str(pre),
        prompt_length=6,
        n_train_prompts=500,
        n_eval_prompts=100,
        n_curve_prompts=100,
        exact_eval_every=2,
        report=False,
    )
    args = dict(
        output_dir=str(tmp_path / "rl"),
        max_steps=6,
        learning_rate=1e-2,
        per_device_train_batch_size=16,
        num_generations=4,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    args.update(kw)
    return task, ToyGRPOConfig(**args)


def test_grpo_run_sigterm_saves_the_partial_policy_and_resumes(tiny_pretrained, tmp_path, monkeypatch, capsys):
    """A SIGTERM during GRPO step 3: the step finishes, checkpoint-3 (the partial policy) is saved beside the
    untouched pre-RL model and the run says how to continue; --resume_from_checkpoint last finishes the run
    from step 3. A fresh start over the stopped run's checkpoint refuses."""
    import toy.experiments.rl as rl

    real = rl.build_reward
    calls = []

    def build(task, process):
        reward = real(task, process)
        score = reward.__call__

        def on_call(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return score(*a, **k)

        on_call.__name__ = reward.__name__
        return on_call

    monkeypatch.setattr(rl, "build_reward", build)
    task, args = _grpo(tmp_path, tiny_pretrained)
    with pytest.raises(Stopped) as info:
        rl.run(task, args)
    assert info.value.exit_code == 143 and info.value.checkpoint.name == "checkpoint-3"
    err = capsys.readouterr().err
    assert str(tiny_pretrained) in err and "checkpoint-3" in err and "--resume_from_checkpoint last" in err
    assert (tiny_pretrained / "model.safetensors").is_file() and not (tmp_path / "rl" / "model").exists()
    monkeypatch.setattr(rl, "build_reward", real)
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint last"):
        rl.run(*_grpo(tmp_path, tiny_pretrained))
    m = rl.run(*_grpo(tmp_path, tiny_pretrained, resume_from_checkpoint="last"))
    steps = [h["step"] for h in m["log_history"] if "loss" in h]
    assert steps[-1] == 6 and (tmp_path / "rl" / "model" / "model.safetensors").is_file()


def test_grpo_run_refuses_a_folder_of_another_config(tiny_pretrained, tmp_path):
    import toy.experiments.rl as rl

    rl.run(*_grpo(tmp_path, tiny_pretrained, max_steps=2))
    with pytest.raises(FileExistsError, match="ToyGRPOConfig.learning_rate"):
        rl.run(*_grpo(tmp_path, tiny_pretrained, max_steps=2, learning_rate=2e-2))
    m = rl.run(*_grpo(tmp_path, tiny_pretrained, max_steps=2, learning_rate=2e-2, overwrite=True))
    assert m["grpo"]["learning_rate"] == 2e-2


# --------------------------------------------------------------------------- N processes


SINGLE_PROCESS = {
    "toy.experiments.factored": ["--config", "configs/toy/factored.yaml"],
    "toy.experiments.factor_steering": ["--config", "configs/toy/factor_steering.yaml"],
    "toy.experiments.steering_knob": ["--config", "configs/toy/factor_steering_knob.yaml"],
    "toy.experiments.toy_em": ["--config", "configs/toy/toy_em.yaml"],
    "toy.experiments.rl_objectives": ["--config", "configs/toy/rl_compose.yaml"],
    "toy.experiments.rl": ["--config", "configs/toy/rl_compose.yaml", "--seeds", "0", "1"],
}


@pytest.mark.parametrize("module", sorted(SINGLE_PROCESS))
def test_single_process_entry_points_refuse_several_processes_before_any_work(module, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    with pytest.raises(
        SystemExit, match=rf"(?s){module}.* runs as one process.*started 2.*python -m {module.split()[0]}"
    ):
        importlib.import_module(module).main([*SINGLE_PROCESS[module], "--output_dir", str(out)])
    assert not out.exists()


def test_rl_pair_report_refuses_several_processes(tmp_path, monkeypatch):
    from toy.experiments.rl import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs as one process"):
        main(
            [
                "--config",
                "configs/toy/rl_compose.yaml",
                "--pre",
                "a",
                "--post",
                "b",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_trainer_refuses_a_launch_whose_processes_it_cannot_see(tmp_path):
    """cpu_multiprocess.yaml without --use_cpu true: the accelerator sees one process per launch, so two copies
    would train into one folder. Refused before the folder is touched."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu_multiprocess.yaml",
        "-m",
        "toy.experiments.pretrain",
        "--config",
        "configs/toy/mess3.yaml",
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "pass --use_cpu true" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_factored_under_accelerate_with_two_processes_refuses(tmp_path):
    """The real launch of the issue: today both processes run the whole experiment into one folder."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu_multiprocess.yaml",
        "-m",
        "toy.experiments.factored",
        "--config",
        "configs/toy/factored.yaml",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "toy.experiments.factored runs as one process" in proc.stderr
    assert not out.exists()


def test_factored_rerun_with_another_config_refuses_and_overwrite_leaves_no_stale_checkpoint(tmp_path, monkeypatch):
    """Today a second run into the folder keeps the first run's checkpoint-20 beside the new checkpoint-100 and,
    sorting names as text, reports the stale run's losses. Now the second config refuses the folder; with
    --overwrite true the old run is gone and the losses are the new model's."""
    from toy.experiments.factored import main

    monkeypatch.chdir(REPO)
    argv = [
        "--config",
        "configs/toy/factored.yaml",
        "--output_dir",
        str(tmp_path),
        "--processes",
        "{}",
        "--rhos",
        "0.0",
        "--probe_sequences",
        "60",
        "--n_layers",
        "2",
        "--d_model",
        "16",
        "--d_mlp",
        "32",
        "--per_device_train_batch_size",
        "16",
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--val_samples",
        "200",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "true",
    ]
    first = main([*argv, "--max_steps", "20"])
    with pytest.raises(FileExistsError, match="TrainConfig.max_steps: 20 -> 100"):
        main([*argv, "--max_steps", "100"])
    second = main([*argv, "--max_steps", "100", "--overwrite", "true"])
    assert [p.name for p in (tmp_path / "models" / "rho_0.0").glob("checkpoint-*")] == ["checkpoint-100"]
    state = json.loads((tmp_path / "models" / "rho_0.0" / "checkpoint-100" / "trainer_state.json").read_text())
    assert (
        second["rho_sweep"]["0.0"]["val_loss"]
        == state["history"][-1]["val_loss"]
        != first["rho_sweep"]["0.0"]["val_loss"]
    )


def test_toy_yaml_values_are_converted_like_flags(tmp_path):
    """Toy configs go through plumbing.config.ConfigParser: `max_steps: 2.5` is refused (it trained and printed
    `val loss nan` with exit 0) and `learning_rate: 5e-2` arrives as a float."""
    from toy.experiments.pretrain import make_parser

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 2.5\n")
    with pytest.raises(ValueError, match="config key 'max_steps': 2.5 is not a valid int"):
        make_parser().parse_args_and_config(["--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 5e-2\nmax_loss_ratio: 20\n")
    _, _, cfg = make_parser().parse_args_and_config(["--config", str(good)])
    assert cfg.learning_rate == 0.05 and cfg.max_loss_ratio == 20.0


def test_pretrain_output_dir_dot_with_overwrite_deletes_nothing(tmp_path, monkeypatch):
    """`python -m toy.experiments.pretrain --output_dir . --overwrite true` inside a clone deleted the whole
    checkout, .git included. Now it is refused before any training and every file is still there."""
    from toy.experiments.pretrain import main

    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "train.py").write_text("print('mine')")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="no run_config.json"):
        main(["--output_dir", ".", "--overwrite", "true", "--max_steps", "2", "--use_cpu", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "train.py"]
    assert (tmp_path / ".git" / "HEAD").is_file()


# --------------------------------------------------------------------------- several ranks: stop, resume, lock

_PRETRAIN_ARGS = [
    "--config",
    str(REPO / "configs/toy/mess3.yaml"),
    "--preset",
    "mess3_small",
    "--n_layers",
    "2",
    "--d_model",
    "16",
    "--n_heads",
    "2",
    "--d_mlp",
    "32",
    "--context_length",
    "6",
    "--max_steps",
    "12",
    "--per_device_train_batch_size",
    "8",
    "--warmup_steps",
    "2",
    "--eval_steps",
    "0",
    "--save_steps",
    "0",
    "--use_cpu",
    "true",
    "--disable_tqdm",
    "true",
    "--val_max_sequences",
    "243",
]


def _two_ranks(tmp_path, out, *extra, term_at=None, term_ranks=(0, 1), port=29571):
    """``torchrun --nproc_per_node 2`` of toy.experiments.pretrain into ``out``; with ``term_at`` the ranks in
    ``term_ranks`` send themselves SIGTERM while step ``term_at + 1`` is in flight. Each rank writes its final
    parameters to ``out/params_rank<r>.pt`` when it finishes."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "import toy.datasets as d\n"
        "real = d.SequenceStream.batch\n"
        f"TERM_AT, TERM_RANKS = {term_at!r}, {tuple(term_ranks)!r}\n"
        "def batch(stream, step):\n"
        "    if step == TERM_AT and stream.rank in TERM_RANKS:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(stream, step)\n"
        "d.SequenceStream.batch = batch\n"
        "from toy.experiments.pretrain import main\n"
        "r = main(sys.argv[1:])\n"
        "rank = int(os.environ['RANK'])\n"
        "torch.save(torch.cat([p.detach().flatten() for p in r.model.parameters()]), f'{r.checkpoint_dir.parent if r.checkpoint_dir else sys.argv[-1]}/params_rank{rank}.pt')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(script),
        *_PRETRAIN_ARGS,
        *extra,
        "--output_dir",
        str(out),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_stopped_by_sigterm_resume_bit_exact(tmp_path):
    """Two CPU ranks stopped by SIGTERM (both, as a launcher forwards it) during step 8 save checkpoint-8; a
    two-rank resume ends with exactly the weights of an uninterrupted two-rank run. The resume failed on both
    ranks: torch.load(map_location=cpu:0) cannot restore the optimizer's storages."""
    full = _two_ranks(tmp_path, tmp_path / "full", "--logging_steps", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "run"
    stopped = _two_ranks(tmp_path, out, "--logging_steps", "4", term_at=7)
    assert stopped.returncode != 0 and "SIGTERM" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    resumed = _two_ranks(tmp_path, out, "--logging_steps", "4", "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = torch.load(tmp_path / "full" / "params_rank0.pt", weights_only=True)
    for rank in (0, 1):
        assert torch.equal(torch.load(out / f"params_rank{rank}.pt", weights_only=True), ref)


@pytest.mark.slow
def test_a_sigterm_to_one_rank_stops_every_rank_at_the_next_step_whatever_log_every(tmp_path):
    """With --log_every 1000 the ranks agreed to stop only at log points, so a SIGTERM to one rank (the launcher's
    30 s grace) saved nothing: the run went on to the end. Now the flag is all-reduced every step: both ranks stop
    after step 4, the one in flight, and checkpoint-4 is the only checkpoint."""
    out = tmp_path / "run"
    proc = _two_ranks(tmp_path, out, "--logging_steps", "1000", term_at=3, term_ranks=(1,), port=29572)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "signal to another rank" in proc.stdout + proc.stderr or "SIGTERM" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_refuses_naming_the_holder(fit, tmp_path):
    """Two runs started into one folder both exited 0, one reporting a checkpoint that held the other's weights.
    Now the folder is locked for the first run's life: the second refuses, naming the first's pid, and writes nothing."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "import toy.datasets as d\n"
        "real = d.SequenceStream.batch\n"
        "def batch(stream, step):\n"
        "    if step == 1:  # the first run is training: hold the folder until killed\n"
        f"        Path({str(ready)!r}).write_text('x')\n"
        "        time.sleep(600)\n"
        "    return real(stream, step)\n"
        "d.SequenceStream.batch = batch\n"
        "from toy.experiments.pretrain import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, str(script), *_PRETRAIN_ARGS, "--seed", "1", "--output_dir", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), (
            first.stderr.read()[-3000:] if first.poll() is not None else "the first run never started"
        )
        with pytest.raises(FileExistsError, match=rf"in use by another run: pid {first.pid} on host "):
            fit(out, seed=2)
        assert json.loads((out / "run_config.json").read_text())["TrainConfig"]["seed"] == 1
    finally:
        first.kill()
        first.wait()
    # killed: its lock is stale, and the next run takes the folder over (and resumes nothing: no checkpoint was saved)
    fit(out, max_steps=2, seed=1, overwrite=True)


def test_old_names_keep_working_for_one_release(tmp_path):
    """Toy pre-training now speaks transformers.TrainingArguments' names; the old flags and YAML keys still parse, onto
    the new names, with one warning naming each; of an old and a new name that disagree the typed flag wins, and with
    no flag to tell them apart they are refused; records hold only the new names."""
    from toy.config import OLD_NAMES
    from toy.experiments.pretrain import make_parser

    with pytest.raises(ValueError, match="steps=5 and max_steps=9 disagree; pass --max_steps alone"):
        TrainConfig(steps=5, max_steps=9)  # neither typed on a command line: no way to tell which is meant
    # fmt: off
    old = ["--steps", "7", "--batch_size", "8", "--lr", "0.02", "--grad_clip", "0.5", "--eval_every", "0",
           "--log_every", "2", "--save_every", "3", "--compile", "false", "--progress", "false", "--optimizer", "sgd",
           "--schedule", "constant", "--mixed_precision", "no", "--resume_from", "last"]
    # fmt: on
    with pytest.warns(FutureWarning, match=r"deprecated TrainConfig names.*steps -> max_steps.*schedule -> lr_sch"):
        _, _, cfg = make_parser().parse_args_and_config(old)
    new = ("max_steps", "per_device_train_batch_size", "learning_rate", "max_grad_norm", "eval_steps", "logging_steps")
    new += (
        "save_steps",
        "torch_compile",
        "disable_tqdm",
        "optim",
        "lr_scheduler_type",
        "bf16",
        "resume_from_checkpoint",
    )
    assert [getattr(cfg, k) for k in new] == [
        7,
        8,
        0.02,
        0.5,
        0,
        2,
        3,
        False,
        True,
        "sgd",
        "constant_with_warmup",
        False,
        "last",
    ]
    assert all(getattr(cfg, k) is None for k in OLD_NAMES) and not set(OLD_NAMES) & set(cfg.record())
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("steps: 5\nlr: 0.01\n")
    with pytest.warns(FutureWarning, match="steps -> max_steps, lr -> learning_rate"):
        _, _, cfg = make_parser().parse_args_and_config(["--config", str(yaml_file)])
    assert (cfg.max_steps, cfg.learning_rate) == (5, 0.01)
    # the command line overrides the file, whichever of the two names each uses
    _, _, cfg = make_parser().parse_args_and_config(["--config", str(yaml_file), "--max_steps", "9"])
    assert (cfg.max_steps, cfg.learning_rate) == (9, 0.01)
    _, _, cfg = make_parser().parse_args_and_config(["--config", str(yaml_file), "--max_steps", "3000"])  # the default
    assert cfg.max_steps == 3000
    yaml_file.write_text("max_steps: 5\n")
    _, _, cfg = make_parser().parse_args_and_config(["--config", str(yaml_file), "--steps", "9"])
    assert cfg.max_steps == 9


def test_a_run_folder_recorded_under_the_old_names_resumes(fit, tmp_path):
    """A run_config.json of the release before the rename records the same config under the old names: resuming
    its folder is not a config change (the record is rewritten under the new names), a changed value still is."""
    out = tmp_path / "run"
    fit(out, save_steps=6)
    shutil.rmtree(out / "checkpoint-12")
    record = json.loads((out / "run_config.json").read_text())
    t = record["TrainConfig"]
    for new, old, value in [
        ("max_steps", "steps", t["max_steps"]),
        ("per_device_train_batch_size", "batch_size", t["per_device_train_batch_size"]),
        ("learning_rate", "lr", t["learning_rate"]),
        ("max_grad_norm", "grad_clip", t["max_grad_norm"]),
        ("eval_steps", "eval_every", t["eval_steps"]),
        ("logging_steps", "log_every", t["logging_steps"]),
        ("save_steps", "save_every", t["save_steps"]),
        ("torch_compile", "compile", False),
        ("disable_tqdm", "progress", False),
        ("optim", "optimizer", "adamw"),
        ("lr_scheduler_type", "schedule", "cosine"),
        ("bf16", "mixed_precision", "no"),
    ]:
        del t[new]
        t[old] = value
    t["resume_from"] = None
    (out / "run_config.json").write_text(json.dumps(record))
    with pytest.raises(FileExistsError, match="TrainConfig.learning_rate: 0.01 -> 0.02"):
        fit(out, save_steps=6, learning_rate=2e-2, resume_from_checkpoint="last")
    assert fit(out, save_steps=6, resume_from_checkpoint="last").step == 12
    assert json.loads((out / "run_config.json").read_text())["TrainConfig"]["learning_rate"] == 0.01


def test_the_shipped_toy_configs_use_the_new_names():
    import yaml

    from toy.config import OLD_NAMES

    old = {f.name: sorted(set(yaml.safe_load(f.read_text())) & set(OLD_NAMES)) for f in REPO.glob("configs/toy/*.yaml")}
    assert old and not {name: keys for name, keys in old.items() if keys}
