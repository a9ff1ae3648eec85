"""Batched sampling of replies to evaluation questions through the model's chat template.

``sample_replies`` expands each question into ``samples_per_paraphrase`` copies of each paraphrase,
formats them with the tokenizer's chat template (system turn first when the question has one),
and hands batches of prompt strings to a ``GenerateFn``. The default, ``hf_generate``, is plain
``model.generate`` with left padding. A faster path (static cache, compiled forward) plugs in by
passing another function with the same signature:

    def generate_fn(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
                    top_p: float, seed: int) -> list[str]   # one decoded reply per prompt, in order

Sampling is seeded per batch (``seed + batch index``), so a run is reproducible for a fixed batch
size and device; different batch sizes give different (equally valid) samples.

Every prompt is measured against the model's context (``check_prompt_lengths``) before anything is generated: a prompt
that leaves no room for a reply is refused, naming it (an 800k-character question used to hang the evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from llm.questions import Question


class GenerateFn(Protocol):
    def __call__(
        self, model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]: ...


@dataclass(frozen=True)
class PromptRow:
    """One sample to draw: ``text`` is the chat-formatted prompt for ``question`` (the paraphrase)."""

    question_id: str
    question: str
    paraphrase_index: int
    sample_index: int
    text: str


def model_context(model) -> int | None:
    """The model's context length in tokens from its config (``max_position_embeddings``, GPT-2's ``n_positions``),
    or None when the config names none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(model, lengths: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Refuse, before generating, prompts of ``lengths`` tokens that fill the model's context (no room for one reply
    token); ``names`` say which (default: their index)."""
    context = model_context(model)
    if context is None:
        return
    over = [(names[i] if names is not None else f"prompt {i}", n) for i, n in enumerate(lengths) if n >= context]
    if over:
        shown = "; ".join(f"{name}: {n} tokens" for name, n in over[:3]) + (
            f"; and {len(over) - 3} more" if len(over) > 3 else ""
        )
        raise ValueError(
            f"{len(over)} prompt(s) do not fit the model's context of {context} tokens ({shown}); "
            "shorten them or leave them out. Nothing was generated."
        )


def left_padded(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, max_len) int64, sequences right-aligned."""
    if pad_id is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")
    L = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), L), dtype=torch.long)
    for i, s in enumerate(ids):
        if s:
            input_ids[i, L - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            attn[i, L - len(s) :] = 1
    return input_ids, attn


def chat_prompt(tokenizer, user: str, system: str | None = None, history: Sequence[dict] = ()) -> str:
    """The chat-template text that asks the model for an assistant turn, after the earlier turns ``history``
    (``{"role", "content"}`` dicts, e.g. worked examples) when given.

    Templates that reject a system turn (Gemma's) get the system prompt prepended to the first user turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tokenizer has no chat_template; EM questions are chat turns. Set tokenizer.chat_template "
            "(for a base model, e.g. to the instruct sibling's template) before evaluating."
        )
    msgs = [*history, {"role": "user", "content": user}]
    if system is not None:
        try:
            return tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *msgs], tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja2 TemplateError "System role not supported"
            if "system" not in str(e).lower():
                raise
            msgs[0] = {**msgs[0], "content": f"{system}\n\n{msgs[0]['content']}"}
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def build_prompt_rows(
    questions: Sequence[Question], tokenizer, samples_per_paraphrase: int | None = None
) -> list[PromptRow]:
    """Every (question, paraphrase, sample) to draw, ``samples_per_paraphrase`` overriding the file's."""
    rows = []
    for q in questions:
        n = samples_per_paraphrase or q.samples_per_paraphrase
        for pi, para in enumerate(q.paraphrases):
            text = chat_prompt(tokenizer, para, q.system)
            rows.extend(PromptRow(q.id, para, pi, s, text) for s in range(n))
    return rows


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """``generate`` keywords for a temperature and top-p: greedy at temperature 0, else sampling with ``top_k=0``
    (transformers' default top_k is 50), so temperature 1 / top_p 1 samples the model's full distribution."""
    return (
        dict(do_sample=False)
        if temperature == 0
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    )


@torch.no_grad()
def hf_generate(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> list[str]:
    """Plain ``model.generate`` on a left-padded batch; returns the decoded new tokens per prompt.

    ``temperature == 0`` means greedy decoding. Special tokens are dropped from the replies.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    check_prompt_lengths(model, [len(i) for i in ids])
    input_ids, attn = left_padded(ids, pad)
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = sampling_kwargs(temperature, top_p)
    out = model.generate(
        input_ids=input_ids.to(dev),
        attention_mask=attn.to(dev),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        **sampling,
    )
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


def sample_replies(
    model,
    tokenizer,
    rows: Sequence[PromptRow],
    *,
    max_new_tokens: int = 300,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    generate_fn: GenerateFn = hf_generate,
) -> list[dict]:
    """Draw one reply per row; returns dicts ``question, answer, question_id, paraphrase_index, sample_index``.

    ``top_k`` is off (0) so temperature 1 / top_p 1 samples from the model's full distribution, as the
    anchors' vLLM sampling does.
    """
    if temperature < 0 or not 0 < top_p <= 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, batch_size >= 1, max_new_tokens >= 1")
    texts = list(dict.fromkeys(r.text for r in rows))  # every distinct prompt once, before the first batch
    first = {r.text: r for r in reversed(rows)}
    check_prompt_lengths(
        model,
        [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]],
        [f"question {first[t].question_id!r} paraphrase {first[t].paraphrase_index}" for t in texts],
    )
    was_training = model.training
    model.eval()
    out = []
    try:
        for b, start in enumerate(range(0, len(rows), batch_size)):
            batch = rows[start : start + batch_size]
            replies = generate_fn(
                model,
                tokenizer,
                [r.text for r in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + b,
            )
            if len(replies) != len(batch):
                raise RuntimeError(f"generate_fn returned {len(replies)} replies for {len(batch)} prompts")
            out.extend(
                {
                    "question": r.question,
                    "answer": a,
                    "question_id": r.question_id,
                    "paraphrase_index": r.paraphrase_index,
                    "sample_index": r.sample_index,
                }
                for r, a in zip(batch, replies)
            )
    finally:
        model.train(was_training)
    return out
