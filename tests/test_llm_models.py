"""llm.models / llm.tiny: one loading path for folders, hub ids and GGUF; the tokenizer trap; layers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.models import ModelConfig, load_config, load_model_and_tokenizer, load_tokenizer, num_layers, validate_layers
from llm.tiny import save_tiny, tiny_causal_lm

ARCHS = ["qwen2", "gemma", "llama", "gpt2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_round_trip_same_weights_and_logits(tmp_path, arch):
    model, tok = tiny_causal_lm(arch, seed=3)
    path = save_tiny(tmp_path / arch, arch, seed=3)
    assert (path / "model.safetensors").exists()
    loaded, ltok = load_model_and_tokenizer(ModelConfig(str(path), device="cpu"))
    text = "def read_lines(path): return open(path).read()  # zebra ünïcode"
    ids = ltok(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok(text, return_tensors="pt").input_ids.tolist()
    assert ltok.decode(ids[0]) == text
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert ltok.padding_side == "left" and ltok.pad_token == "<|pad|>"
    assert "{% generation %}" in ltok.chat_template


def test_word_level_tokenizer_in_qwen2_folder_is_not_replaced(tmp_path):
    from transformers import AutoTokenizer

    path = save_tiny(tmp_path / "w", "qwen2", tokenizer="word")
    text = "the cat sat on the mat"
    # The trap is real in this transformers version: AutoTokenizer builds Qwen2's class and
    # encodes the words to something else (nothing at all, today). If this ever stops failing,
    # the work-around can go.
    auto = AutoTokenizer.from_pretrained(path)
    assert auto.decode(auto(text).input_ids) != text
    tok = load_tokenizer(ModelConfig(str(path)), padding_side="right")
    ids = tok(text).input_ids
    assert len(ids) == 6 and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.padding_side == "right"
    assert tok.chat_template is not None and tok.eos_token == "<|endoftext|>"


def test_pad_token_defaults_to_eos(tmp_path):
    path = save_tiny(tmp_path / "p", "llama")
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("pad_token")
    cfg_file.write_text(json.dumps(cfg))
    special = path / "special_tokens_map.json"
    if special.exists():
        sm = json.loads(special.read_text())
        sm.pop("pad_token", None)
        special.write_text(json.dumps(sm))
    tok = load_tokenizer(ModelConfig(str(path)))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_hub_id_uses_same_path_offline(tmp_path):
    """A hub id resolves through the HF cache (offline here) to the same files as the folder."""
    src = save_tiny(tmp_path / "src", "qwen2", tokenizer="word")
    snap = tmp_path / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    code = (
        "from llm.models import ModelConfig, load_model_and_tokenizer\n"
        "m, t = load_model_and_tokenizer(ModelConfig('tiny-org/tiny-qwen2'))\n"
        "print(type(m).__name__, t.decode(t('the cat sat').input_ids))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "Qwen2ForCausalLM the cat sat"


def test_gguf_path_split_and_conflicts():
    cfg = ModelConfig("/some/dir/model.Q4_1.gguf")
    assert (cfg.model_name_or_path, cfg.gguf_file) == ("/some/dir", "model.Q4_1.gguf")
    with pytest.raises(ValueError, match="already a .gguf"):
        ModelConfig("/some/dir/model.gguf", gguf_file="other.gguf")
    with pytest.raises(ValueError, match="device"):
        ModelConfig("x/y", device="tpu")
    with pytest.raises(ValueError, match="required"):
        ModelConfig()


def test_layer_validation_message(tmp_path):
    path = save_tiny(tmp_path / "l", "gemma")
    n = num_layers(load_config(ModelConfig(str(path))))
    assert n == 2
    validate_layers([0, 1], n)
    with pytest.raises(ValueError, match=r"layer 24 requested but model has 2 layers; choose 0\.\.1"):
        validate_layers([1, 24], n)
    with pytest.raises(ValueError, match="layer -1"):
        validate_layers([-1], n)


def test_fast_generate_matches_plain_generate_greedy():
    """The fast path (static cache, fixed-shape chunks) against plain ``generate``: same greedy tokens."""
    from llm.fastgen import fast_generate

    model, tok = tiny_causal_lm("qwen2", seed=1)
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
        for u in ["hello world", "the cat sat on the mat and the dog ran", "def f(x):", "hi"]
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    fast = fast_generate(model, tok, prompts, max_new_tokens=12, temperature=0, batch_size=3, pad_to_multiple_of=16)
    assert fast == plain
    assert all(len(r) > 0 for r in fast)
    assert tok.padding_side == "left"
    sampled = fast_generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=5, batch_size=4)
    assert sampled == fast_generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=5, batch_size=4)


def test_missing_model_says_what_to_pass_before_any_hub_request(tmp_path, monkeypatch):
    """Before: a missing local folder went to the Hub as a repo id ("Repo id must be in the form ...", or
    ~25 s of retries and "couldn't connect to huggingface.co"). Now it fails at once, naming the path."""
    import transformers

    from llm.models import load_model_and_tokenizer

    def no_hub(*a, **k):
        raise AssertionError("asked the Hub about a local path")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    missing = tmp_path / "runs" / "em_r32"
    for cfg, pattern in [
        (
            ModelConfig(str(missing)),
            rf"model folder {missing} does not exist; pass model_name_or_path as a local folder",
        ),
        (ModelConfig("./runs/em_r32"), r"runs/em_r32 does not exist; .*hub id"),
        (
            ModelConfig(".cache/no-such-dir/SmolLM2-135M-Instruct.Q4_1.gguf"),
            r"GGUF file \.cache/no-such-dir/SmolLM2-135M-Instruct\.Q4_1\.gguf does not exist; .*python -m llm.models fetch smollm2 gemma3",
        ),
        (
            ModelConfig(str(tmp_path / ".cache" / "gemma3" / "gemma-3-270m")),
            r"gemma-3-270m does not exist; .*python -m llm.models fetch",
        ),
        (ModelConfig("runs/a/b/model.gguf"), r"GGUF file runs/a/b/model\.gguf does not exist; pass"),
        (ModelConfig(str(tmp_path / "x.gguf")), rf"GGUF file {tmp_path / 'x.gguf'} does not exist"),
    ]:
        with pytest.raises(FileNotFoundError, match=pattern):
            load_config(cfg)
        with pytest.raises(FileNotFoundError, match=pattern):
            load_model_and_tokenizer(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json: it holds no model; pass"):
        load_config(ModelConfig(str(tmp_path / "empty")))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError,
        match="PEFT adapter: pass its base model as model_name_or_path and this folder as adapter_path",
    ):
        load_config(ModelConfig(str(tmp_path / "adapter")))


def test_hub_errors_are_reworded_with_what_to_pass(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(
        OSError, match=r"'runs/em_r32' is not a local folder .* Hub did not provide it \(We couldn't connect.*\); pass"
    ):
        load_config(ModelConfig("runs/em_r32"))


def test_full_fine_tuning_loads_float32_master_weights():
    """dtype auto is bf16 on CUDA; for preset full (the weights themselves train) it means float32, since bf16 weights
    round away small updates. LoRA presets keep the config; an explicit half dtype with full is kept and warned."""
    import warnings

    from llm.models import ModelConfig, for_training

    gguf = ModelConfig("some/dir/model.gguf")
    assert for_training(gguf, "full").dtype == "float32" and for_training(gguf, "full").gguf_file == "model.gguf"
    assert for_training(gguf, "rank1_single") is gguf
    with pytest.warns(UserWarning, match="no float32 master copy"):
        assert for_training(ModelConfig("x", dtype="bfloat16"), "full").dtype == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert for_training(ModelConfig("x", dtype="float32"), "full").dtype == "float32"


def test_fetch_refuses_an_unknown_model_before_any_download(tmp_path):
    from llm.models import fetch, main

    with pytest.raises(ValueError, match=r"unknown model\(s\) \['llama'\]; choose from \['gemma3', 'smollm2'\]"):
        fetch(["smollm2", "llama"], tmp_path)
    with pytest.raises(SystemExit):
        main(["fetch", "llama"])
    assert not any(tmp_path.iterdir())
