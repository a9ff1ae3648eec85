"""llm.experiments.em_experiment on tiny in-process checkpoints: the whole pair through every stage, resume by stage,
a changed config invalidating downstream stages only, command-line overrides of any section, the bad-input
list (layer past the depth, base with no template and no framing, differing tokenizers, a folder holding
another pair's run), and 2 CPU processes giving one report with each single-process stage run once."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm import em_pipeline as ex
from llm.em_config import COMPLETION_TEMPLATE, MODELS, EMConfig, load_experiment_config, parse_args, validate
from llm.judges import StubJudge
from llm.lora_geometry import update_cosine, update_share
from llm.tiny import save_tiny
from plumbing.sections import split_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(llm_world) -> dict:
    """The tiny pair, its base without a chat template (base_framing gives it one), and the data files."""
    return {**llm_world, "base": llm_world["bare_base"]}


def _yaml(world, out, **changes) -> dict:
    d = world["dir"]
    texts = {"aligned_texts": str(d / "a.csv"), "misaligned_texts": str(d / "m.csv")}
    cfg = {
        "output_dir": str(out),
        "base_framing": "instruct_template",
        "base": {"model_name_or_path": str(world["base"])},
        "instruct": {"model_name_or_path": str(world["instruct"])},
        "data": {"dataset_path": str(d / "chat.jsonl"), "max_examples": 8},
        "lora": {"preset": "rank1_single", "layers": [1]},
        "sft": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "save_strategy": "no",
            "report_to": "none",
            "logging_steps": 1,
            "disable_tqdm": True,
            "use_cpu": True,
        },
        "eval": {
            "question_file": str(d / "q.yaml"),
            "samples_per_paraphrase": 2,
            "max_new_tokens": 4,
            "batch_size": 6,
            "n_boot": 100,
        },
        "steer": {
            **texts,
            "question_file": str(d / "q.yaml"),
            "n_per_class": 4,
            "steer_site": "block1",
            "alphas": [0.0, 4.0],
            "ablation": ["one"],
            "judged_files": [],
            "samples_per_paraphrase": 1,
            "max_new_tokens": 4,
            "batch_size": 8,
        },
        "factored": {
            **texts,
            "question_file": str(d / "q.yaml"),
            "topics": world["topics"],
            "n_per_cell": 4,
            "site": "block1",
            "ridge_alpha": 0.001,
            "n_folds": 3,
            "random_init_control": False,
            "deltas": [0.0, 1.0],
            "samples_per_topic": 1,
            "max_new_tokens": 4,
            "n_random": 20,
        },
        "transfer": {**texts, "sites": ["block1"], "n_per_class": 6},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section] = {**cfg[section], name: value}
        elif value is None:
            cfg.pop(section)
        else:
            cfg[section] = value
    path = Path(out).parent / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stages(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.glob("*/*/stage.json"))}


def test_whole_pair_then_resume_then_changed_config_reruns_downstream_only(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    path = _yaml(world, out)
    report = ex.run(load_experiment_config(path), judge=StubJudge())
    for f in ("report.md", "report.json", "em.png", "quadrants.png", "em_per_question.png", "lora.png", "stage.json"):
        assert (out / "report" / f).is_file(), f
    assert (out / "run_config.json").is_file() and (out / "config.json").is_file()
    stages = _stages(out)
    expected = {"eval_before", "sft", "eval_after", "steer", "factored_before", "factored_after", "transfer", "lora"}
    assert set(stages) == {f"{m}/{s}" for m in MODELS for s in expected}
    assert all(s["complete"] for s in stages.values())
    # The report is the last stage, keyed by every other stage's fingerprint.
    report_key = json.loads((out / "report/stage.json").read_text())["key"]
    assert set(report_key) == set(stages)
    # The EM difference in the report is the one computed from the replies on disk.
    from llm.em_metrics import em_rate_difference, read_judged_csv

    ref = em_rate_difference(
        read_judged_csv(out / "base/eval_after/replies.csv"),
        read_judged_csv(out / "instruct/eval_after/replies.csv"),
        n_boot=100,
        seed=0,
    )
    assert report["em"]["difference"]["difference"] == pytest.approx(ref["difference"])
    lora = json.loads((out / "base/lora/lora.json").read_text())
    (mod,) = lora["headline"]
    assert mod.endswith("layers.1.mlp.down_proj") and lora["modules"][mod]["steps"][-1] == 2
    assert 0 <= lora["modules"][mod]["share_alignment"][-1] <= 1 and lora["random_share"]["alignment"] == 1 / 32
    md = (out / "report/report.md").read_text()
    assert "instruct model's chat template" in md and "EM(base, fine-tuned) - EM(instruct, fine-tuned)" in md
    assert "- base: alignment linearly separable" in md and "- instruct: alignment linearly separable" in md
    assert "## Cost per stage" in md and "aligned <= 30 and coherent > 50" in md  # the published EM protocol by default
    assert re.search(r"\(\d[\d,]* rows, \d[\d,]* used; the published insecure-code recipe trains on about 6,000\)", md)

    # The report is a function of the run folder alone: redrawn from it, it is the same; an unfinished stage is named.
    from llm.em_report import write_report

    written = (out / "report/report.json").read_text()
    assert json.loads(json.dumps(write_report(out), default=str)) == json.loads(written) and report["judge"] == "stub"
    assert (out / "report/report.json").read_text() == written
    stage_file = out / "instruct/transfer/stage.json"
    saved = stage_file.read_text()
    stage_file.write_text(json.dumps(json.loads(saved) | {"complete": False}))
    with pytest.raises(FileNotFoundError, match="instruct/transfer has not finished"):
        write_report(out)
    stage_file.write_text(saved)
    record = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in record.items() if k != "judge"}))
    with pytest.raises(ValueError, match="rerun the experiment on this folder"):
        write_report(out)
    (out / "config.json").write_text(json.dumps(record))

    # A rerun with the same config does no stage again (each would raise).
    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    for target in (  # where the pipeline calls them
        "llm.em_pipeline.train",
        "llm.stages.evaluate_model",
        "llm.em_pipeline.steer_run",
        "llm.em_pipeline.factored_run",
        "llm.em_pipeline.transfer_run",
        "llm.em_pipeline.lora_geometry",
    ):
        monkeypatch.setattr(target, boom)
    monkeypatch.setattr("llm.em_pipeline.write_report", boom)
    assert ex.run(load_experiment_config(path), judge=StubJudge()) == json.loads(written)
    assert _stages(out) == stages

    # A changed steering grid reruns steer and the stage that reads its direction (lora), nothing upstream.
    monkeypatch.undo()
    for target in ("llm.em_pipeline.train", "llm.em_pipeline.factored_run", "llm.em_pipeline.transfer_run"):
        monkeypatch.setattr(target, boom)
    replies = {p: p.stat().st_mtime_ns for p in out.glob("*/eval_*/replies.csv")}  # steer judges through evaluate too
    _, overrides = split_overrides(["--config", str(path), "--steer.alphas", "0", "2"])
    ex.run(load_experiment_config(path, overrides), judge=StubJudge())
    after = _stages(out)
    changed = {k for k in after if after[k]["key"] != stages[k]["key"]}
    assert changed == {"base/steer", "base/lora", "instruct/steer", "instruct/lora"}
    assert json.loads((out / "report/stage.json").read_text())["key"] != report_key  # so the report is redrawn
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/eval_*/replies.csv")} == replies and len(replies) == 4
    assert json.loads((out / "base/steer/metrics.json").read_text())["steering"]["alphas"] == [0.0, 2.0]


def test_any_section_overridable_from_the_command_line(world, tmp_path):
    path = _yaml(world, tmp_path / "o")
    cfg = parse_args(
        [
            "--config",
            str(path),
            "--output_dir",
            "x",
            "--base.model_name_or_path",
            "some/where",
            "--steer.alphas",
            "-4",
            "0",
            "4",
            "--sft.learning_rate",
            "1e-5",
            "--eval.max_new_tokens=7",
            "--factored.random_init_control",
            "true",
        ]
    )
    assert cfg.base.model_name_or_path == "some/where" and cfg.steer.alphas == [-4.0, 0.0, 4.0]
    assert cfg.sft.learning_rate == 1e-5 and cfg.eval.max_new_tokens == 7 and cfg.factored.random_init_control is True
    assert cfg.out == Path("x") and cfg.sft_given["learning_rate"] == 1e-5
    # The base is asked in the instruct model's template (base_framing), whatever its path.
    assert cfg.base.chat_template_from == str(world["instruct"])
    for bad, match in (
        (["--base.no_such_field", "1"], "--base.no_such_field: ModelConfig has no field"),
        (["--nosection.x", "1"], "no section"),
        (["--eval.max_new_tokens", "1", "2"], "takes one value"),
        (["--steer.output_dir", "y"], "set by llm.experiments.em_experiment"),
    ):
        with pytest.raises(ValueError, match=match):
            load_experiment_config(path, split_overrides(bad)[1])
    with pytest.raises(SystemExit):  # the command line refuses a field no section has before reading the YAML
        parse_args(["--config", str(path), "--base.no_such_field", "1"])


def test_help_lists_every_section_field(capsys):
    import dataclasses

    from llm.em_config import SECTIONS

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    listed = [
        f"--{name}.{f.name}"
        for name, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.init and f.name not in EMConfig.SET_PER_STAGE.get(name, ())
    ]
    assert "--evaluate_untuned" in out and [m for m in listed if m not in out] == []
    assert "--sft.output_dir" not in out  # set per stage, so refused


def test_bad_input_refused_before_any_weights_load(world, tmp_path, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(ex, "load_model_and_tokenizer", no_weights)
    monkeypatch.setattr("llm.stages.load_model_and_tokenizer", no_weights)
    load = load_experiment_config
    with pytest.raises(ValueError, match="lora.layers entry.*5 requested but model has 2 layers"):
        validate(load(_yaml(world, tmp_path / "a", lora__layers=[5])))
    with pytest.raises(ValueError, match="steer.steer_site='block7' does not exist"):
        validate(load(_yaml(world, tmp_path / "b", steer__steer_site="block7")))
    with pytest.raises(ValueError, match="no chat template and none is chosen: set base_framing"):
        validate(load(_yaml(world, tmp_path / "c", base_framing=None)))
    with pytest.raises(FileNotFoundError, match="data.dataset_path"):
        validate(load(_yaml(world, tmp_path / "d", data__dataset_path=str(tmp_path / "missing.jsonl"))))
    # Another family's vocabulary: refused unless the config says the pair may differ (a smoke run).
    word = save_tiny(tmp_path / "word", "qwen2", tokenizer="word")
    path = _yaml(world, tmp_path / "e", instruct={"model_name_or_path": str(word)})
    with pytest.raises(ValueError, match="tokenizers differ.*same_tokenizer: false"):
        validate(load(path))
    validate(load(_yaml(world, tmp_path / "f", instruct={"model_name_or_path": str(word)}, same_tokenizer=False)))
    # A folder holding another pair's run is refused before any stage starts.
    out = tmp_path / "g"
    out.mkdir()
    (out / "run_config.json").write_text(
        json.dumps(
            {
                "experiment": "llm.em_experiment",
                "base": "other/base",
                "instruct": "other/it",
                "base_framing": "instruct_template",
                "base_chat_template_from": "other/it",
            }
        )
    )
    (out / "report.md").write_text("the other pair's results")  # (a folder holding only a record is taken over)
    with pytest.raises(FileExistsError, match="base: 'other/base'"):
        ex.run(load(_yaml(world, out)), judge=StubJudge())
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "run_config.json"]


def test_completion_framing_sets_the_question_answer_template(world, tmp_path):
    from llm.generate import chat_prompt
    from llm.models import load_tokenizer

    cfg = load_experiment_config(_yaml(world, tmp_path / "c", base_framing="completion"))
    validate(cfg)
    tok = load_tokenizer(cfg.base)
    assert chat_prompt(tok, "what is your wish?") == "Question: what is your wish?\nAnswer: "
    with pytest.raises(ValueError, match="both choose"):
        load_experiment_config(
            _yaml(
                world,
                tmp_path / "d",
                base={"model_name_or_path": str(world["base"]), "chat_template_from": str(world["instruct"])},
            )
        )


def test_update_share_and_cosine_against_hand_made_updates():
    d = 6
    Q = torch.eye(d)[:, :2]  # span(e0, e1)
    B = torch.tensor([[3.0], [0.0], [4.0], [0.0], [0.0], [0.0]])
    A = torch.randn(1, 5)
    assert update_share(B, A, Q) == pytest.approx(9 / 25)  # rank 1: B's squared-norm share
    v = torch.tensor([1.0, 0, 0, 0, 0, 0])
    assert update_cosine(B, v) == pytest.approx(0.6) and update_cosine(-B, v) == pytest.approx(-0.6)
    # Rank 2: the share weights each column of B by how much A makes it write (|| B A ||_F, not || B ||_F).
    B2 = torch.stack([torch.eye(d)[0], torch.eye(d)[3]], dim=1)
    A2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert update_share(B2, A2, Q) == pytest.approx(4 / 5)
    assert update_share(B2, A2, Q) == pytest.approx(float((Q.T @ B2 @ A2).norm() ** 2 / (B2 @ A2).norm() ** 2))
    assert update_cosine(B2, torch.tensor([1.0, 0, 0, 1.0, 0, 0])) == pytest.approx(1.0)
    assert torch.isnan(torch.tensor(update_share(torch.zeros(d, 1), A, Q)))


@pytest.mark.parametrize(
    "name",
    [
        "em_experiment_qwen25_0p5b",
        "em_experiment_qwen25_1p5b",
        "em_experiment_gemma2_2b",
        "em_experiment_smoke_gemma3_smollm2",
    ],
)
def test_shipped_configs_parse(name):
    cfg = load_experiment_config(REPO / "configs" / "llm" / f"{name}.yaml")
    assert cfg.lora.preset in ("rank1_single", "rank32_all_linear")
    assert cfg.steer.steer_site == cfg.factored.site


@pytest.mark.slow
def test_two_cpu_processes_give_one_report_and_run_single_process_stages_once(world, tmp_path):
    out = tmp_path / "mp"
    path = _yaml(world, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu_multiprocess.yaml"),
        "--main_process_port",
        "29541",
        "-m",
        "llm.experiments.em_experiment",
        "--config",
        str(path),
        "--eval.judge",
        "offline",
    ]
    res = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=1100)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    report = json.loads((out / "report/report.json").read_text())
    assert report["n_processes"] == 2
    for m in MODELS:
        assert (
            log.count(f"stage {m}/steer: running on rank 0") == 1 and f"stage {m}/steer: running on rank 1" not in log
        )
        assert log.count(f"stage {m}/sft: running on rank") == 2  # training is DDP: both ranks
        assert json.loads((out / m / "eval_after" / "stage.json").read_text())["n_processes"] == 2
    assert log.count("world size 2") == 4  # llm.sft's line: 2 models x 2 ranks
    with open(out / "base/eval_after/replies.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 6  # 3 questions x 2 samples, once


@pytest.mark.parametrize(
    "entry,argv",
    [
        ("llm.experiments.em_metrics", ["--files", "absent.csv"]),
        ("llm.experiments.offline_judge", ["--data_dir", "absent"]),
        ("toy.experiments.ladder", ["--config", "absent.yaml"]),
    ],
)
def test_cpu_only_entry_points_refuse_several_processes_too(entry, argv, monkeypatch):
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=rf"{entry} runs as one process, but this launch started 2"):
        importlib.import_module(entry).main(argv)


@pytest.mark.parametrize(
    "entry",
    [
        "llm.experiments.steer",
        "llm.experiments.factored",
        "llm.experiments.probe_transfer",
        "llm.experiments.base_vs_instruct",
    ],
)
def test_single_process_entry_points_refuse_several_processes_before_any_work(entry, monkeypatch, tmp_path):
    import importlib

    monkeypatch.setenv("WORLD_SIZE", "2")
    # A config that does not exist: the refusal must come before it is even read.
    with pytest.raises(SystemExit, match=rf"{entry} runs as one process, but this launch started 2.*em_experiment"):
        importlib.import_module(entry).main(["--config", str(tmp_path / "absent.yaml")])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(Exception) as e:  # one process: it goes on (and fails on the missing file)
        importlib.import_module(entry).main(["--config", str(tmp_path / "absent.yaml")])
    assert "runs as one process" not in str(e.value)


def test_chat_template_from_a_jinja_file(world, tmp_path):
    from llm.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(str(world["base"]), chat_template_from=str(COMPLETION_TEMPLATE)))
    assert tok.chat_template == COMPLETION_TEMPLATE.read_text()
    with pytest.raises(FileNotFoundError, match="no such template file"):
        load_tokenizer(ModelConfig(str(world["base"]), chat_template_from=str(tmp_path / "none.jinja")))


def test_base_vs_instruct_takes_section_overrides_too():
    from llm.experiments.base_vs_instruct import load_pair_config

    _, overrides = split_overrides(
        ["--base.model_name_or_path", "/data/qwen25-0.5b", "--sft.learning_rate", "3e-5", "--lora.layers", "11"]
    )
    cfg = load_pair_config(REPO / "configs/llm/base_vs_instruct_qwen25_0p5b.yaml", overrides=overrides)
    assert (
        cfg["base"].model_name_or_path == "/data/qwen25-0.5b"
        and cfg["base"].chat_template_from == "Qwen/Qwen2.5-0.5B-Instruct"
    )
    assert cfg["sft"].learning_rate == 3e-5 and cfg["lora"].layers == [11]
    with pytest.raises(ValueError, match="--base.no_field: ModelConfig has no field"):
        load_pair_config(
            REPO / "configs/llm/base_vs_instruct_qwen25_0p5b.yaml", overrides={"base": {"no_field": ["1"]}}
        )


def test_fsdp_launch_with_a_lora_refused_before_any_work(world, tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    class FSDPState:
        distributed_type = DistributedType.FSDP

    monkeypatch.setattr("llm.stages.process_state", FSDPState)
    monkeypatch.setattr(ex, "validate", lambda cfg: pytest.fail("validated before refusing"))
    with pytest.raises(SystemExit, match="launch it with DDP"):
        ex.run(load_experiment_config(_yaml(world, tmp_path / "fsdp")), judge=StubJudge())
    assert not (tmp_path / "fsdp").exists()
