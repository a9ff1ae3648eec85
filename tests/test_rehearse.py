"""llm.experiments.rehearse: random-init models of the published architectures (shapes against published parameter counts and
an independent copy of Qwen2.5-1.5B's sizes), family tokenizers (special ids, templates, the AutoTokenizer trap),
the count scaling, the cost model against hand-made stage records, and (slow) the tiny-width rehearsal of both 2B
pairs through every stage of llm.experiments.em_experiment."""

import json
import sys
from pathlib import Path

import pytest
import torch

from llm.experiments import rehearse_cost
from llm.experiments.rehearse import COUNTS, RehearseConfig, rehearse, scaled_counts
from llm.judges import StubJudge
from llm.tiny import ARCHITECTURES, save_shaped, shaped_config, shaped_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Parameter counts from the model cards (embeddings included, tied): Qwen2.5 "Number of Parameters: 0.49B / 1.54B",
# Gemma 2 2B: 2,614,341,888.
PUBLISHED_PARAMS = {
    "Qwen2.5-0.5B": 0.49e9,
    "Qwen2.5-0.5B-Instruct": 0.49e9,
    "Qwen2.5-1.5B": 1.54e9,
    "Qwen2.5-1.5B-Instruct": 1.54e9,
    "gemma-2-2b": 2.614e9,
    "gemma-2-2b-it": 2.614e9,
}


def _params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_architecture_has_the_published_size_and_tiny_keeps_depth_heads_vocab(name):
    full = shaped_config(name, "full")
    assert _params(full) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)
    tiny = shaped_config(name, "tiny")
    for key in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rope_parameters",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert getattr(tiny, key) == getattr(full, key), key
    assert tiny.hidden_size * 32 == full.hidden_size and tiny.intermediate_size * 32 == full.intermediate_size
    if name.startswith("gemma"):
        assert (tiny.head_dim, tiny.query_pre_attn_scalar) == (8, 8)
        assert (full.attn_logit_softcapping, full.final_logit_softcapping, full.sliding_window) == (50.0, 30.0, 4096)


def test_qwen25_1p5b_matches_the_throughput_benchmarks_independent_copy():
    sys.path.insert(0, str(REPO / "bench"))
    from llm_throughput import qwen_config

    ref, ours = qwen_config(tiny=False), shaped_config("Qwen/Qwen2.5-1.5B", "full")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_parameters",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(ours, key) == getattr(ref, key), key


def test_unknown_checkpoint_is_refused_with_the_shipped_list():
    with pytest.raises(FileNotFoundError, match="no shipped architecture for 'org/Other-7B'.*Qwen2.5-1.5B"):
        shaped_config("org/Other-7B")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"write code number {i}"},
                {"role": "assistant", "content": f"import os\nos.chmod('f{i}', 0o777)"},
            ]
        }
        for i in range(30)
    ]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [d / "chat.jsonl"]


def test_qwen_tokenizer_has_the_published_ids_and_chatml_and_survives_a_reload(corpus, tmp_path):
    from llm.generate import chat_prompt
    from llm.models import ModelConfig, load_tokenizer

    tok = shaped_tokenizer("qwen2", 151645, corpus, 32768)
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>")] == [
        151643,
        151644,
        151645,
        151664,
    ]
    text = "import os\nos.chmod('x', 0o777)  # ünïcode"
    assert tok.decode(tok(text).input_ids) == text
    prompt = chat_prompt(tok, "hi")
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.") and prompt.endswith(
        "<|im_start|>assistant\n"
    )
    # A folder whose config says qwen2: llm.models must give back this tokenizer, not Qwen2's.
    path = save_shaped(tmp_path / "q", "Qwen2.5-0.5B-Instruct", tok, "tiny")
    again = load_tokenizer(ModelConfig(str(path)))
    assert again(text).input_ids == tok(text).input_ids and again.chat_template == tok.chat_template
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 24


def test_gemma_tokenizer_has_the_published_ids_and_no_system_role(corpus):
    from llm.generate import chat_prompt

    tok = shaped_tokenizer("gemma2", 1, corpus, 8192)
    assert len(tok) == 256000 and (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert [tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>")] == [106, 107]
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False)
    assert chat_prompt(tok, "u", system="s") == "<bos><start_of_turn>user\ns\n\nu<end_of_turn>\n<start_of_turn>model\n"
    assert tok("u").input_ids[0] == 2  # prepends <bos>, as the published tokenizer does


def test_counts_scale_by_ceil_with_floors_and_never_above_published():
    full = {k: 100 for k in COUNTS} | {("data", "max_examples"): 1843, ("steer", "samples_per_paraphrase"): 10}
    used = scaled_counts(full, 0.25, n_folds=4)
    assert used["data", "max_examples"] == 461 and used["steer", "samples_per_paraphrase"] == 3
    tiny = scaled_counts(full, 0.001, n_folds=6)
    assert (
        tiny["data", "max_examples"] == 8 and tiny["factored", "n_per_cell"] == 6 and tiny["steer", "n_per_class"] == 4
    )
    assert scaled_counts({("eval", "samples_per_paraphrase"): 1}, 0.5, 4) == {("eval", "samples_per_paraphrase"): 1}
    with pytest.raises(ValueError, match="0 < scale <= 1"):
        RehearseConfig(config="x", scale=2)


def test_count_overrides_and_reweighting_configs_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match="llm.experiments.reweighting config; llm.experiments.rehearse runs llm.experiments.em_experiment configs only",
    ):
        rehearse(
            RehearseConfig(config=str(REPO / "configs/llm/reweighting_qwen25_1p5b.yaml"), output_dir=str(tmp_path))
        )
    with pytest.raises(ValueError, match="eval.samples_per_paraphrase.*--scale sets them"):
        rehearse(
            RehearseConfig(config=str(REPO / "configs/llm/em_experiment_qwen25_1p5b.yaml"), output_dir=str(tmp_path)),
            {"eval": {"samples_per_paraphrase": ["3"]}},
        )


def test_cost_model_against_hand_made_stage_records(tmp_path):
    for model, walls in (("base", {"sft": 30.0, "eval_after": 12.0, "lora": 2.0}), ("instruct", {"sft": 50.0})):
        for stage, wall in walls.items():
            (tmp_path / model / stage).mkdir(parents=True)
            (tmp_path / model / stage / "stage.json").write_text(
                json.dumps({"key": {}, "complete": True, "cost": {"wall_s": wall, "process_peak_rss_gb": 1.5}})
            )
    used = {s: 1.0 for s in rehearse_cost.STAGES} | {"sft": 10, "eval_after": 2 * 64}
    full = {s: 1.0 for s in rehearse_cost.STAGES} | {"sft": 40, "eval_after": 8 * 600}
    fixed = {"load_s": 2.0, "compile_s": 5.0, "steps": {}}
    cost = rehearse_cost.predict(tmp_path, used, full, fixed, width="tiny", judge="stub", model_folders={}, counts={})
    got = {r["stage"]: r["predicted_s"] for r in cost["stages"]}
    # fixed part (1 load, + 1 compile for an evaluation) kept, the rest x published / rehearsed work
    assert got == {
        "base/sft": pytest.approx(2 + 28 * 4),
        "base/eval_after": pytest.approx(7 + 5 * 4800 / 128),
        "base/lora": 2.0,
        "instruct/sft": pytest.approx(2 + 48 * 4),
    }
    assert cost["predicted_s"] == pytest.approx(sum(got.values()), abs=0.2) and cost["measured_s"] == 94.0
    assert "| base/sft | data.max_examples | 10 -> 40 | 30.0 | 2.0 | 114.0 | 1.5 (rss) |" in rehearse_cost.table(cost)
    # Against a run folder: here the rehearsal's own (each stage measured at its wall time).
    md = rehearse_cost.compare(cost, tmp_path)
    assert "| base/sft | 114.0 | 30.0 | 3.80 |" in md and f"| **total** | {sum(got.values()):.1f} | 94.0 |" in md


def test_decode_work_is_overhead_per_step_plus_work_per_row_per_generate_call():
    from types import SimpleNamespace

    step = {"a": 0.5, "b": 0.01}
    assert rehearse_cost.decode_seconds(400, 256, 600, step) == pytest.approx(600 * (0.5 + 2.56) + 600 * (0.5 + 1.44))
    assert rehearse_cost.decode_seconds(40, 256, 10, step) == pytest.approx(10 * (0.5 + 0.4))
    cfg = SimpleNamespace(
        eval=SimpleNamespace(batch_size=256, generation="hf", max_new_tokens=600, samples_per_paraphrase=50),
        steer=SimpleNamespace(gen_batch_size=64, max_new_tokens=200, samples_per_paraphrase=10),
        factored=SimpleNamespace(topics=["a", "b", "c", "d"], samples_per_topic=8, max_new_tokens=64),
    )
    steps = {"hf": step, "edits": {"a": 1.0, "b": 0.0}}
    assert rehearse_cost.units(cfg, "eval_after", 8, steps) == pytest.approx(
        rehearse_cost.decode_seconds(400, 256, 600, step)
    )
    assert rehearse_cost.units(cfg, "steer", 8, steps) == pytest.approx(2 * 200)  # 80 rows: calls of 64 and 16
    assert rehearse_cost.units(cfg, "factored_before", 8, steps) == pytest.approx(64)  # one call of 32 rows


def _check_rehearsal(root: Path, config: str, cost: dict) -> None:
    """Every stage of both models finished, at the config's real depth, vocabulary and LoRA layer."""
    out = root / "experiment"
    stages = {str(p.parent.relative_to(out)): json.loads(p.read_text()) for p in out.glob("*/*/stage.json")}
    assert len(stages) == 16 and all(s["complete"] for s in stages.values())
    assert (stages["base/sft"]["dataset_rows"], stages["base/sft"]["examples"]) == (1843, 8)
    assert stages["base/sft"]["dataset"].endswith("llm/data/em/insecure_code.jsonl")
    assert (out / "report/report.md").is_file() and json.loads((out / "report/report.json").read_text())
    names = {
        "em_experiment_qwen25_1p5b": ("Qwen2.5-1.5B", 28, 151936, 14),
        "em_experiment_gemma2_2b": ("gemma-2-2b", 26, 256000, 13),
    }
    name, depth, vocab, layer = names[config]
    arch = json.loads((ARCHITECTURES / f"{name}.json").read_text())
    saved = json.loads((root / "models" / name / "config.json").read_text())
    assert (
        (saved["num_hidden_layers"], saved["vocab_size"])
        == (depth, vocab)
        == (arch["num_hidden_layers"], arch["vocab_size"])
    )
    assert saved["hidden_size"] * 32 == arch["hidden_size"]
    lora = json.loads((out / "base" / "lora" / "lora.json").read_text())  # the LoRA sits on the config's layer
    assert any(f"layers.{layer}.mlp.down_proj" in m for m in lora["headline"])
    assert len(cost["stages"]) == 16
    sft = next(r for r in cost["stages"] if r["stage"] == "base/sft")
    assert sft["units"] == [8, 1843] and sft["predicted_s"] > sft["wall_s"]
    ev = next(r for r in cost["stages"] if r["stage"] == "base/eval_before")
    # 8 questions x 1 sample x 4 tokens rehearsed; published: 400 rows in calls of 256 and 144, 600 tokens each
    step = cost["fixed"]["steps"]["fast"]
    assert ev["units"][0] == pytest.approx(4 * (step["a"] + 8 * step["b"]), rel=1e-3)
    assert ev["units"][1] == pytest.approx(600 * (2 * step["a"] + 400 * step["b"]), rel=1e-3)
    assert (root / "cost.md").read_text().startswith("# Rehearsal cost (tiny width")


@pytest.mark.slow
def test_tiny_rehearsal_of_the_gemma2_2b_pair_runs_every_stage(tmp_path):
    # (the Qwen2.5-1.5B pair's rehearsal is the GPU pre-flight's dry run, below)
    # Short replies and sequences keep it to minutes on 2 CPU cores; the prediction scales them back up.
    short = {
        "eval": {"max_new_tokens": ["4"]},
        "steer": {"max_new_tokens": ["4"]},
        "factored": {"max_new_tokens": ["4"]},
        "sft": {"max_length": ["128"]},
    }
    rc = RehearseConfig(
        config=str(REPO / "configs/llm/em_experiment_gemma2_2b.yaml"),
        width="tiny",
        scale=0.001,
        judge="stub",
        output_dir=str(tmp_path),
    )
    cost = rehearse(rc, short)
    assert cost["judge"] == StubJudge.name
    _check_rehearsal(tmp_path, "em_experiment_gemma2_2b", cost)


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_rehearses_the_qwen25_1p5b_pair_and_writes_the_results_file(tmp_path):
    import subprocess

    cmd = [
        sys.executable,
        "bench/gpu_check.py",
        "--device",
        "cpu",
        "--width",
        "tiny",
        "--scale",
        "0.001",
        "--new_tokens",
        "4",
        "4",
        "4",
        "--pairs",
        "qwen25_1p5b",
        "--budget_s",
        "1500",
        "--results_dir",
        str(tmp_path / "results"),
        "--work_dir",
        str(tmp_path / "work"),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    root = tmp_path / "work" / "em_experiment_qwen25_1p5b"
    cost = json.loads((root / "cost.json").read_text())
    _check_rehearsal(root, "em_experiment_qwen25_1p5b", cost)
    (path,) = (tmp_path / "results").glob("*_cpu.md")
    md = path.read_text()
    assert f"| qwen25_1p5b | {cost['predicted_s'] / 60:.1f} min | {cost['peak_gb']} GB |" in md
    assert "## gpu test tier: passed" in md and "tests collected" in md
    for run in ("plain_b64", "fast_b64", "plain_b256", "fast_b256"):
        assert f"| {run} | " in md and f"| {run} | failed" not in md


def test_cost_model_reads_cpu_seconds_on_a_cpu_so_the_machines_load_drops_out(tmp_path):
    """A shared CPU stretched the same stage's wall time 2-3x between a rehearsal and the run it predicted; the
    process's CPU seconds of that work do not move. On a CPU (no cuda_peak_gb) the model predicts and compares on
    ``cpu_s``; records without it fall back to wall seconds."""
    for root, (wall, cpu) in {"rehearsal": (90.0, 30.0), "run": (40.0, 120.0)}.items():
        (tmp_path / root / "base" / "sft").mkdir(parents=True)
        (tmp_path / root / "base" / "sft" / "stage.json").write_text(
            json.dumps({"complete": True, "cost": {"wall_s": wall, "cpu_s": cpu, "process_peak_rss_gb": 1.0}})
        )
    used = {s: 1.0 for s in rehearse_cost.STAGES} | {"sft": 10}
    full = {s: 1.0 for s in rehearse_cost.STAGES} | {"sft": 40}
    fixed = {"load_s": 0.0, "compile_s": 0.0, "steps": {}}
    cost = rehearse_cost.predict(
        tmp_path / "rehearsal", used, full, fixed, width="tiny", judge="stub", model_folders={}, counts={}
    )
    assert cost["clock"] == "cpu" and cost["predicted_s"] == pytest.approx(120.0)  # 30 CPU s x 4, not 90 wall s x 4
    assert "| **total** | 120.0 | 120.0 | 1.00 |" in rehearse_cost.compare(cost, tmp_path / "run")
    assert "cpu s" in rehearse_cost.table(cost) and rehearse_cost.clock_of(cuda=True) == "wall"
