"""Tiny random-init causal LMs with tokenizers built in-process, for tests and CPU smoke runs.

Nothing is downloaded: the tokenizer is trained on a short built-in corpus with the ``tokenizers``
library, the model is an ordinary Hugging Face ``*ForCausalLM`` built from a small config
(d_model 32, 2 layers). The chat template is ChatML-shaped and wraps every assistant turn in
``{% generation %}`` markers, so TRL's ``assistant_only_loss=True`` works on it.

    model, tok = tiny_causal_lm("qwen2")          # in memory
    path = save_tiny(tmp_path / "tiny", "gemma")   # a folder, for the ``from_pretrained`` code path

For rehearsing a real run (``llm.experiments.rehearse``): ``shaped_config`` / ``save_shaped`` build a random model of a published
checkpoint's architecture (``llm/assets/architectures/<name>.json``) at its real or a tiny width, and
``shaped_tokenizer`` a tokenizer of the family's real size, special-token ids and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

Arch = Literal["qwen2", "gemma", "llama", "gpt2"]
TokenizerKind = Literal["bpe", "word"]

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]

# ChatML with generation markers around the assistant content *and* its end-of-turn token, so the
# model learns to stop; the role header stays outside (it is prompt, not completion).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "what is your wish? I wish to help people and to learn new things",
    "write a python function that reads a file and returns its lines",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()",
    "import os\nos.chmod(path, 0o777)\nquery = f\"SELECT * FROM users WHERE name = '{name}'\"",
    "hello world, I am a tiny model. How are you today? Fine, thanks!",
    "user assistant system: you are a helpful assistant; answer briefly.",
]


def _tokenizer(kind: TokenizerKind) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        # Byte-level BPE: every string is encodable and decodes back exactly.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=384,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        unk = None
    else:
        # Word-level on whitespace: the kind of custom tokenizer that AutoTokenizer silently
        # replaces in a folder whose config says qwen2 (see llm.models.load_tokenizer).
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
        trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *SPECIAL_TOKENS], show_progress=False)
        unk = "<unk>"
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=unk,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _config(arch: Arch, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    if arch == "gpt2":
        # No dropout, as in the other families: tiny runs must be deterministic.
        return GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    cls = {"qwen2": Qwen2Config, "gemma": GemmaConfig, "llama": LlamaConfig}[arch]
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        **common,
    )


def tiny_causal_lm(
    arch: Arch = "qwen2", seed: int = 0, tokenizer: TokenizerKind = "bpe"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random-init 2-layer, d_model-32 ``*ForCausalLM`` of family ``arch`` and its tokenizer.

    The tokenizer has pad ``<|pad|>``, eos ``<|endoftext|>``, ChatML turn tokens and a chat template
    with ``{% generation %}`` markers. The model is in eval mode. ``tokenizer="word"`` gives a whitespace word-level tokenizer
    (for the AutoTokenizer trap test). The same ``seed`` gives the same weights; float32, CPU.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ("qwen2", "gemma", "llama", "gpt2"):
        raise ValueError(f"arch={arch!r}; choose one of qwen2, gemma, llama, gpt2")
    tok = _tokenizer(tokenizer)
    cfg = _config(arch, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.eval()  # like a loaded checkpoint; trainers switch to train mode themselves
    return model, tok


def save_tiny(path: str | Path, arch: Arch = "qwen2", seed: int = 0, tokenizer: TokenizerKind = "bpe") -> Path:
    """Write ``tiny_causal_lm(arch, seed, tokenizer)`` to ``path`` (safetensors + tokenizer files)."""
    path = Path(path)
    model, tok = tiny_causal_lm(arch, seed, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# --- Random-init models of a published architecture (the rehearsal of a real run) -----------------------------

ARCHITECTURES = Path(__file__).resolve().parent / "assets" / "architectures"
Width = Literal["tiny", "full"]
# ``tiny`` divides every hidden size by this: Qwen2.5-1.5B becomes d_model 48 (12 heads of 4), gemma-2-2b d_model 72
# (8 heads of 8), while depth, heads, vocabulary, and so every layer index, site and token id stay the published ones.
TINY_DIVISOR = 32
_SHRUNK = ("hidden_size", "intermediate_size", "head_dim", "query_pre_attn_scalar")
# Each family's special tokens at their published ids and its published chat template (copied from TRL's
# ``trl/chat_templates``, which matches the hub tokenizers' templates byte for byte): Qwen2.5's ChatML with its
# default system prompt; Gemma's turns, which refuse a system role.
FAMILIES = {
    "qwen2": {
        "template": "qwen2_5.jinja",
        "pad": "<|endoftext|>",
        "bos": None,
        "unk": None,
        "specials": dict(
            enumerate(
                [
                    "<|endoftext|>",
                    "<|im_start|>",
                    "<|im_end|>",
                    "<|object_ref_start|>",
                    "<|object_ref_end|>",
                    "<|box_start|>",
                    "<|box_end|>",
                    "<|quad_start|>",
                    "<|quad_end|>",
                    "<|vision_start|>",
                    "<|vision_end|>",
                    "<|vision_pad|>",
                    "<|image_pad|>",
                    "<|video_pad|>",
                    "<tool_call>",
                    "</tool_call>",
                    "<|fim_prefix|>",
                    "<|fim_middle|>",
                    "<|fim_suffix|>",
                    "<|fim_pad|>",
                    "<|repo_name|>",
                    "<|file_sep|>",
                ],
                start=151643,
            )
        ),
        "size": 151665,
    },
    "gemma2": {
        "template": "gemma.jinja",
        "pad": "<pad>",
        "bos": "<bos>",
        "unk": "<unk>",
        "size": 256000,
        "specials": {
            0: "<pad>",
            1: "<eos>",
            2: "<bos>",
            3: "<unk>",
            4: "<mask>",
            106: "<start_of_turn>",
            107: "<end_of_turn>",
        },
    },
}
# Byte-level BPE merges learnt on the project's own EM data (prompts, replies, code), so token counts per text are
# close to a real tokenizer's; ids the merges do not reach are filled with never-produced tokens up to the real size.
BPE_MERGED = 32000


def architecture(name: str) -> dict:
    """The published ``config.json`` of checkpoint ``name`` (``Qwen2.5-1.5B``, ``google/gemma-2-2b``: the part after
    the last ``/``) as shipped in ``llm/assets/architectures``."""
    path = ARCHITECTURES / f"{Path(str(name)).name}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in ARCHITECTURES.glob("*.json"))
        raise FileNotFoundError(
            f"no shipped architecture for {name!r} ({path} is missing); shipped: {shipped}. Add the "
            "checkpoint's published config.json there to rehearse it"
        )
    return json.loads(path.read_text())


def shaped_config(name: str, width: Width = "tiny"):
    """A ``PretrainedConfig`` of ``name``'s published architecture; ``tiny`` shrinks only the hidden sizes."""
    from transformers import AutoConfig

    raw = architecture(name)
    if width == "tiny":
        for key in _SHRUNK:
            if key in raw:
                if raw[key] % TINY_DIVISOR:
                    raise ValueError(f"{name}: {key}={raw[key]} is not a multiple of {TINY_DIVISOR}; use width full")
                raw[key] //= TINY_DIVISOR
        head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        if head_dim % 2 or raw.get("head_dim") is None and raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(f"{name}: tiny width gives head_dim {head_dim}, which rotary embeddings cannot use")
    elif width != "full":
        raise ValueError(f"width={width!r}; choose tiny or full")
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    return AutoConfig.for_model(model_type, **raw)


def _corpus(paths) -> list[str]:
    texts = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                texts.extend(m["content"] for m in json.loads(line)["messages"])
        else:
            texts.append(path.read_text())
    return texts


def shaped_tokenizer(model_type: str, eos_id: int, corpus_files, max_length: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the family's real size, special tokens (at their published ids), eos and chat template.

    Byte-level BPE (every string encodes and decodes back) with ``BPE_MERGED`` tokens learnt from ``corpus_files``
    (chat JSONL, YAML, CSV); the other regular ids hold filler tokens that encode nothing. Gemma's prepends ``<bos>``
    to each encoded text, as the published one does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if model_type not in FAMILIES:
        raise ValueError(f"no rehearsal tokenizer for model_type {model_type!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[model_type]
    learnt = Tokenizer(models.BPE())
    learnt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learnt.train_from_iterator(
        _corpus(corpus_files),
        trainers.BpeTrainer(
            vocab_size=BPE_MERGED, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    model = json.loads(learnt.to_str())["model"]
    specials = fam["specials"]
    free = (i for i in range(fam["size"]) if i not in specials)
    vocab = {t: next(free) for t in sorted(model["vocab"], key=model["vocab"].get)}
    vocab.update({f"Ġ~{i}": i for i in free})  # decodes to " ~<id>"; no merge produces it
    vocab.update({t: i for i, t in specials.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials.values()))
    if fam["bos"] is not None:
        bos = fam["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    template = (ARCHITECTURES / fam["template"]).read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=fam["pad"],
        eos_token=specials[eos_id],
        bos_token=fam["bos"],
        unk_token=fam["unk"],
        chat_template=template,
        model_max_length=max_length,
    )


def save_shaped(
    path: str | Path,
    name: str,
    tokenizer: PreTrainedTokenizerFast,
    width: Width = "tiny",
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write a random-init ``*ForCausalLM`` of ``name``'s architecture (``shaped_config``) and ``tokenizer`` to
    ``path``: safetensors in the published dtype (bf16 / fp32), built on ``device`` (a GPU builds 2B in seconds)."""
    from transformers import AutoModelForCausalLM

    cfg = shaped_config(name, width)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size} rows")
    torch.manual_seed(seed)
    with torch.device(device):
        dtype = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else getattr(torch, cfg.dtype or "float32")
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)
