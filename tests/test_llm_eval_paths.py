"""Runnable from a clone: the EM data ships inside the package, every config and default points at it,
relative paths in a YAML config mean the same from any working directory, and a missing input is
named before any model loads."""

import hashlib
from pathlib import Path

import pytest
import yaml

from llm.data import (
    ALIGNED_TEXTS,
    EM_DATA,
    FIRST_PLOT_QUESTIONS,
    INSECURE_CODE,
    MISALIGNED_TEXTS,
    PREREGISTERED_QUESTIONS,
)
from plumbing.config import ConfigParser, config_anchor, require_file, resolve_config_paths

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_data_with_licences_and_sources():
    from llm.questions import load_questions, select

    for p in (FIRST_PLOT_QUESTIONS, PREREGISTERED_QUESTIONS, INSECURE_CODE, ALIGNED_TEXTS, MISALIGNED_TEXTS):
        assert p.is_file() and p.parent == EM_DATA
    for lic in ("LICENSE-emergent-misalignment.txt", "LICENSE-further-explore.txt"):
        assert (EM_DATA / lic).read_text().startswith("MIT License")
    readme = (EM_DATA / "README.md").read_text()
    assert "Cloakless/clarifying_EM" in readme and "emergent_misalignment_further_explore" in readme
    assert len(select(load_questions(FIRST_PLOT_QUESTIONS), variants=["plain"])) == 8
    assert len(load_questions(PREREGISTERED_QUESTIONS)) == 48
    assert sum(1 for _ in INSECURE_CODE.open()) == 1843


def test_pyproject_ships_the_data_as_package_data():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = [g for g in data["llm.data"]]
    for f in EM_DATA.iterdir():
        assert any(f.match(g) for g in globs), f"{f.name} would be left out of the wheel"
    assert "assets/*.json" in data["llm"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("tensorboard") for d in extras["track"])  # `report_to: tensorboard` trackers


@pytest.mark.shared_data
def test_shipped_files_are_byte_copies_of_the_developers_data(shared_data):
    for f in EM_DATA.iterdir():
        if f.name != "README.md":
            src = shared_data / "em" / f.name
            assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest(), f.name


def test_no_config_or_default_points_into_shared():
    """``../shared`` stays only for the judged CSVs (data-tier tests, refitting the offline judge)."""
    offenders = []
    for path in [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("llm/*.py"), ROOT / "README.md"]:
        for i, line in enumerate(path.read_text().splitlines()):
            if "../shared" in line and not any(w in line for w in ("judged", "tier", "shared_data")):
                offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_data_path_in_a_shipped_config_exists_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    checked = 0
    for cfg in sorted((ROOT / "configs" / "llm").glob("*.yaml")):
        values = resolve_config_paths(yaml.safe_load(cfg.read_text()), config_anchor(cfg))
        stack = [values]
        while stack:
            d = stack.pop()
            for k, v in d.items():
                if isinstance(v, dict):
                    stack.append(v)
                elif k in ("question_file", "dataset_path", "aligned_texts", "misaligned_texts", "prompt_file"):
                    assert Path(v).is_absolute() and Path(v).is_file(), f"{cfg.name}: {k}={v}"
                    checked += 1
    assert checked >= 12


def test_config_anchor_is_the_project_root_or_the_config_folder(tmp_path):
    assert config_anchor(ROOT / "configs" / "llm" / "em_eval_smollm2.yaml") == ROOT
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    assert config_anchor(tmp_path / "proj" / "sub" / "c.yaml") == tmp_path / "proj"
    (tmp_path / "loose").mkdir()
    assert config_anchor(tmp_path / "loose" / "c.yaml") == tmp_path / "loose"


def test_resolve_config_paths_rules(tmp_path):
    (tmp_path / "local_model").mkdir()
    values = {
        "question_file": "llm/data/q.yaml",
        "output_dir": "runs/x",
        "judged_files": ["a.csv", "/abs/b.csv"],
        "model_name_or_path": "Qwen/Qwen2.5-0.5B",
        "hf_judge_model": ".cache/m/judge.gguf",
        "chat_template_from": "local_model",
        "seed": 3,
        "variants": ["plain"],
        "openai_base_url": "http://x/v1",
        "base": {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "adapter_path": "runs/a"},
        "eval": {"question_file": "q.yaml", "metrics": ["aligned"]},
        "adapter_path": None,
    }
    out = resolve_config_paths(values, tmp_path)
    assert out["question_file"] == str(tmp_path / "llm/data/q.yaml") and out["output_dir"] == str(tmp_path / "runs/x")
    assert out["judged_files"] == [str(tmp_path / "a.csv"), "/abs/b.csv"]
    assert out["model_name_or_path"] == "Qwen/Qwen2.5-0.5B"  # a hub id stays one
    assert out["hf_judge_model"] == str(tmp_path / ".cache/m/judge.gguf")
    assert out["chat_template_from"] == str(tmp_path / "local_model")  # exists under the anchor
    assert (out["seed"], out["variants"], out["openai_base_url"], out["adapter_path"]) == (
        3,
        ["plain"],
        "http://x/v1",
        None,
    )
    assert out["base"] == {"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "adapter_path": str(tmp_path / "runs/a")}
    assert out["eval"] == {"question_file": str(tmp_path / "q.yaml"), "metrics": ["aligned"]}


def test_parser_anchors_yaml_paths_but_not_command_line_paths(tmp_path, monkeypatch):
    from llm.evaluate import EvalConfig
    from llm.models import ModelConfig

    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("")
    cfg = proj / "configs" / "e.yaml"
    cfg.write_text(
        yaml.safe_dump({"model_name_or_path": ".cache/m.gguf", "question_file": "data/q.yaml", "output_dir": "runs/e"})
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m, e = ConfigParser((ModelConfig, EvalConfig)).parse_args_and_config(["--config", str(cfg)])
    assert (e.question_file, e.output_dir) == (str(proj / "data/q.yaml"), str(proj / "runs/e"))
    assert (m.model_name_or_path, m.gguf_file) == (str(proj / ".cache"), "m.gguf")
    _, e2 = ConfigParser((ModelConfig, EvalConfig)).parse_args_and_config(
        ["--config", "../proj/configs/e.yaml", "--output_dir", "mine"]
    )
    assert e2.output_dir == "mine" and e2.question_file == str(proj / "data/q.yaml")
    with pytest.raises(FileNotFoundError, match="--config: .*nope.yaml.*is not a file"):
        ConfigParser((ModelConfig, EvalConfig)).parse_args_and_config(["--config", "nope.yaml"])


def test_require_file_names_the_flag_and_the_resolved_path(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"question_file: .*missing.yaml \(relative to the working directory .*\) "
        r"is not a file; pass --question_file <a YAML>",
    ):
        require_file("missing.yaml", "question_file", "a YAML")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        require_file(tmp_path / "f", "adapter_path", "a folder", folder=True)
    assert require_file(FIRST_PLOT_QUESTIONS, "question_file", "x") == FIRST_PLOT_QUESTIONS


def test_evaluate_names_a_missing_input_before_loading_any_model(tmp_path, monkeypatch):
    import llm.experiments.evaluate as ev

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(ev, "load_model_and_tokenizer", no_loading)
    monkeypatch.setattr(ev, "build_judge", no_loading)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="question_file: .*nowhere.yaml"):
        ev.main(["--model_name_or_path", "x", "--question_file", "nowhere.yaml"])
    with pytest.raises(FileNotFoundError, match="offline_weights: .*w.json"):
        ev.main(["--model_name_or_path", "x", "--offline_weights", "w.json"])
    with pytest.raises(FileNotFoundError, match="adapter_path: .*adapter.*is not a folder"):
        ev.main(["--model_name_or_path", "x", "--adapter_path", "adapter"])
    with pytest.raises(
        FileNotFoundError, match=r"model_name_or_path: .*m/SmolLM2-135M-Instruct.Q4_1.gguf .*smollm2_gguf_path"
    ):
        ev.main(["--model_name_or_path", "./m/SmolLM2-135M-Instruct.Q4_1.gguf"])
    with pytest.raises(FileNotFoundError, match="model_name_or_path: .*is not a folder"):
        ev.main(["--model_name_or_path", str(tmp_path / "no_model")])
