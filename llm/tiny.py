"""Tiny random-init causal LMs with tokenizers built in-process, for tests and CPU smoke runs.

Nothing is downloaded: the tokenizer is trained on a short built-in corpus with the ``tokenizers``
library, the model is an ordinary Hugging Face ``*ForCausalLM`` built from a small config
(d_model 32, 2 layers). The chat template is ChatML-shaped and wraps every assistant turn in
``{% generation %}`` markers, so TRL's ``assistant_only_loss=True`` works on it.

    model, tok = tiny_causal_lm("qwen2")          # in memory
    path = save_tiny(tmp_path / "tiny", "gemma")   # a folder, for the ``from_pretrained`` code path
"""

from __future__ import annotations

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
            vocab_size=384, special_tokens=SPECIAL_TOKENS, show_progress=False,
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
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=unk,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def _config(arch: Arch, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    if arch == "gpt2":
        # No dropout, as in the other families: tiny runs must be deterministic.
        return GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    cls = {"qwen2": Qwen2Config, "gemma": GemmaConfig, "llama": LlamaConfig}[arch]
    return cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
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
