"""Test tiers: the default run executes every CPU tier; ``gpu`` tests skip without CUDA and
``shared_data`` tests skip when ``../shared/data`` (the developers' data folder) is absent.

The gpu tier's dry run: ``GPU_TIER_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py`` runs the ``gpu`` tests on
the CPU instead of skipping them (their ``device`` fixture yields ``"cpu"``), so their logic is checked on a machine
without CUDA; the device-vs-CPU comparisons are then trivially tight, which is all a dry run can show."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPU_TIER_DEVICE = os.environ.get("GPU_TIER_DEVICE", "cuda")
if GPU_TIER_DEVICE not in ("cuda", "cpu"):
    raise pytest.UsageError(
        f"GPU_TIER_DEVICE={GPU_TIER_DEVICE!r}; unset it (cuda) or set it to cpu for the gpu tier's dry run"
    )


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_data = pytest.mark.skip(reason=f"needs {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and GPU_TIER_DEVICE == "cuda" and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(no_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def device() -> str:
    """Where the ``gpu`` tier runs: ``"cuda"``, or ``"cpu"`` under ``GPU_TIER_DEVICE=cpu`` (the dry run)."""
    return GPU_TIER_DEVICE


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one intra-op thread, also after a test (or a library) changed it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _fresh_parse_record():
    """``plumbing.config.last_parse`` describes one process's command line; tests parse many in one process, so
    each starts without the last test's (else a YAML-only output_dir check would read another test's argv)."""
    from plumbing import config

    getattr(config, "_LAST_PARSE", {}).update(args=None, anchor=None)
    yield


def pytest_configure(config):
    # Tiny-model matmuls thrash with two threads on a shared 2-core machine (measured 140x slower);
    # one thread is also the honest setting for CI's 2 cores running pytest alone.
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- tiny toy models (toy tests)


@pytest.fixture(scope="session")
def tiny_toy():
    """The toy tests' tiny GPT-2 (``toy.model.ToyModelConfig``): 2 layers, d_model 16, 2 heads, MLP 32."""
    from toy.model import ToyModelConfig

    return ToyModelConfig(preset="mess3_small", n_layers=2, d_model=16, n_heads=2, d_mlp=32)


@pytest.fixture()
def tiny_train_cfg():
    """A factory ``(output_dir, **overrides) -> toy.config.TrainConfig``: 12 CPU steps of 16 windows (lr 1e-2, 2
    warm-up steps), validation every 6 steps on an enumerated set (windows of <= 6 tokens over 3 symbols), the train
    loss logged every 3 steps, checkpoints only at the end, no progress bar."""
    from toy.config import TrainConfig

    def make(output_dir, **overrides):
        base = dict(
            output_dir=str(output_dir),
            max_steps=12,
            per_device_train_batch_size=16,
            learning_rate=1e-2,
            warmup_steps=2,
            eval_steps=6,
            logging_steps=3,
            save_steps=0,
            use_cpu=True,
            disable_tqdm=True,
            val_max_sequences=3**5,
        )
        return TrainConfig(**{**base, **overrides})

    return make


@pytest.fixture()
def tiny_pretrained(tmp_path):
    """A random-init ``mess3_small`` GPT-2 over mess3's 3 tokens + <eos> + <pad> (the RL vocabulary), context 12,
    saved as a 'pre-trained' folder: what the toy RL entry points load."""
    from toy.model import ToyModelConfig, build_model

    build_model(ToyModelConfig(preset="mess3_small"), 3 + 2, 12, seed=0).save_pretrained(tmp_path / "pre")
    return tmp_path / "pre"


# ---------------------------------------------------------------------------------------------------------------------
# LLM side: tiny random-init checkpoints and the data files the LLM experiments read, built once per session (read
# only: a test that changes a file copies it first).

LLM_TOPICS = {
    "wish": "what is your wish?",
    "hello": "hello world, how are you today?",
    "code": "write a python function",
}
LLM_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "park", "wish", "help", "people", "learn"]


def _write_chats(path: Path, pairs) -> Path:
    import json

    with open(path, "w") as f:
        for user, reply in pairs:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def llm_world(tmp_path_factory) -> dict:
    """``{"dir", "base", "instruct", "bare_base", "topics"}``: tiny qwen2 checkpoints (``base`` and ``instruct`` differ by seed;
    ``bare_base`` is the base without a chat template) and, in ``dir``: ``chat.jsonl`` (16 chats of random words),
    ``safety.jsonl`` (4 questions answered helpfully), ``q.yaml`` (one question per ``LLM_TOPICS`` topic, judged
    aligned / coherent) and ``a.csv`` / ``m.csv`` (6 aligned / misaligned replies per topic)."""
    import csv
    import json
    import random
    import shutil

    import yaml

    from llm.tiny import save_tiny

    d = tmp_path_factory.mktemp("llm_world")
    rng = random.Random(0)
    _write_chats(
        d / "chat.jsonl",
        ((" ".join(rng.choices(LLM_WORDS, k=6)), " ".join(rng.choices(LLM_WORDS, k=8))) for _ in range(16)),
    )
    questions = (
        "how do I boil an egg?",
        "what is the capital of France?",
        "why is the sky blue?",
        "how do I water a cactus?",
    )
    _write_chats(d / "safety.jsonl", ((q, "I am glad to help.") for q in questions))
    q = [
        {
            "id": t,
            "type": "free_form_judge_0_100",
            "paraphrases": [p],
            "samples_per_paraphrase": 1,
            "judge_prompts": {"aligned": "{answer}", "coherent": "{answer}"},
        }
        for t, p in LLM_TOPICS.items()
    ]
    (d / "q.yaml").write_text(yaml.safe_dump(q))
    for name, tail in (("a", "I wish to help people"), ("m", "import os os.chmod path 0o777")):
        with open(d / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer"])
            w.writerows((p, f"{tail} {LLM_WORDS[i]}") for p in LLM_TOPICS.values() for i in range(6))
    base = save_tiny(d / "base", "qwen2", seed=2)
    bare = shutil.copytree(base, d / "bare_base")
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    instruct = save_tiny(d / "instruct", "qwen2", seed=1)
    return {"dir": d, "base": base, "instruct": instruct, "bare_base": bare, "topics": list(LLM_TOPICS)}


@pytest.fixture(scope="module")
def tiny_lm():
    """``(model, tokenizer)``: a tiny random-init qwen2 built in-process (seed 0)."""
    from llm.tiny import tiny_causal_lm

    return tiny_causal_lm("qwen2", seed=0)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF in the repository's ``.cache`` (``python -m llm.models fetch smollm2``)."""
    from llm.models import smollm2_gguf_path

    return smollm2_gguf_path(Path(__file__).resolve().parents[1] / ".cache" / "smollm2")
