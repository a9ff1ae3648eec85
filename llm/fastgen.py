"""Fast batched sampling: static KV cache + compiled decode step (CUDA graphs), large fixed batches.

``fast_generate`` has the ``GenerateFn`` signature of ``llm.generate`` (evaluation and GRPO can pass
it wherever the plain ``hf_generate`` goes) and returns the same kind of output: one decoded reply
per prompt, in order. What makes it fast, each in one line:

- a static cache, so transformers compiles the one-token decode step (``reduce-overhead`` mode:
  CUDA graphs remove the per-layer launch overhead that dominates small-batch decoding);
- prompts left-padded to a multiple of ``pad_to_multiple_of`` and every chunk padded to exactly
  ``batch_size`` rows, so a run sees a handful of shapes and compiles a handful of times;
- a large batch (default 256): decoding is memory-bound, so more rows per weight read is nearly free.

Compilation happens on CUDA only (on CPU the static cache runs eagerly). The first call per shape
pays the compile (tens of seconds for a 1.5B model); later calls reuse it.
Sampling is seeded per chunk with ``seed + chunk index``; results depend on ``batch_size``.

Many replies to one prompt share the prompt's KV cache (``shared_prompt_cache``): ``sample_n_ids`` samples them,
``reply_logprobs`` / ``all_reply_logprobs`` score given replies under a model (their log-likelihoods, nats).
"""

from __future__ import annotations

import inspect

import torch

from llm.generate import check_prompt_lengths, sampling_kwargs


def fast_generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    **generate_kwargs,
) -> torch.Tensor:
    """Token-level core: ``input_ids``/``attention_mask`` (N, L) left-padded -> new tokens (N, T).

    ``T <= max_new_tokens``; rows that stopped early are filled with ``pad_token_id``. Runs in chunks of
    ``batch_size`` rows, the last chunk filled up with copies of its first row (same compiled shape).
    """
    sampling = sampling_kwargs(temperature, top_p)
    n = input_ids.shape[0]
    device = next(model.parameters()).device
    outs = []
    for chunk_index, start in enumerate(range(0, n, batch_size)):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        rows = ids.shape[0]
        if n > batch_size and rows < batch_size:
            fill = batch_size - rows
            ids = torch.cat([ids, ids[:1].expand(fill, -1)])
            mask = torch.cat([mask, mask[:1].expand(fill, -1)])
        torch.manual_seed(seed + chunk_index)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                cache_implementation="static",
                pad_token_id=pad_token_id,
                **sampling,
                **generate_kwargs,
            )
        outs.append(out[:rows, ids.shape[1] :])
    width = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_token_id) for o in outs])


def fast_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    pad_to_multiple_of: int = 64,
    **generate_kwargs,
) -> list[str]:
    """Sample one continuation per prompt; ``temperature=0`` means greedy, ``top_k`` is off.

    ``prompts`` are already chat-formatted strings (special tokens in the text, so none are added).
    Returns the decoded new tokens (special tokens skipped), ``len(prompts)`` strings in order.
    ``generate_kwargs`` go to ``model.generate`` (e.g. ``min_new_tokens`` for fixed-length benchmarks).
    """
    if not prompts:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with llm.models.load_tokenizer")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must line up at the right edge
    try:
        enc = tokenizer(
            prompts, return_tensors="pt", padding=True, pad_to_multiple_of=pad_to_multiple_of, add_special_tokens=False
        )
    finally:
        tokenizer.padding_side = old_side
    check_prompt_lengths(model, enc["attention_mask"].sum(1).tolist())
    new = fast_generate_ids(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        **generate_kwargs,
    )
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a sampled reply: the tokenizer's eos and every eos id of the model's generation config, where
    ``generate`` stops a row (and pads it after). Chat models list their end-of-turn token there (Gemma's
    ``<end_of_turn>``, Qwen2.5's ``<|im_end|>`` and ``<|endoftext|>``), and a base model's may differ from the paired
    instruct tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({tokenizer.eos_token_id, *eos} - {None})


def _cut_at_eos(new: torch.Tensor, eos: int | list[int]) -> list[list[int]]:
    """Rows of ``new`` (N, T) as lists, each cut after its first token in ``eos`` (one id or several)."""
    ends = torch.isin(new, torch.as_tensor(eos, device=new.device))
    # length = up to and including the first eos, else every token
    first = torch.where(
        ends.any(1), ends.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1], device=new.device)
    )
    return [new[i, : int(first[i])].tolist() for i in range(new.shape[0])]


def cache_kwarg(model) -> str:
    """The keyword that passes a KV cache to ``model``'s forward and ``generate``: transformers renamed
    ``past_key_values`` to ``cache`` (5.24 warns on the old name, 5.40 drops it; older releases know only it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: list[int], repeats: int):
    """A ``DynamicCache`` of ``prompt_ids[:-1]`` (one forward pass) repeated ``repeats`` times along the batch: the
    prompt is encoded once for all its samples (the last prompt token is left for the caller's forward)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    if len(prompt_ids) > 1:
        model(torch.tensor([prompt_ids[:-1]], device=device), use_cache=True, **{cache_kwarg(model): cache})
    cache.batch_repeat_interleave(repeats)
    return cache


def sample_n_ids(
    model,
    tokenizer,
    prompts: list[str],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    pad_to_multiple_of: int = 64,
) -> list[list[list[int]]]:
    """``n`` sampled continuations per prompt as token ids, each cut after its first eos (any of ``stop_ids``; kept:
    it is part of the sampled sequence, so log-likelihoods and KL estimates count it, and the pads ``generate`` puts
    after it are not). Returns ``[prompt][sample] -> ids``.

    ``prompts`` are chat-formatted strings. On CUDA: prompt-major rows (``n`` copies of prompt 0 first) in chunks of
    ``batch_size`` through ``fast_generate_ids`` (static cache, compiled). Elsewhere the prompt, usually longer than
    the reply, is encoded once and its cache shared by its ``n`` samples (``shared_prompt_cache``; prompt ``i``
    seeded with ``seed + i``): on a CPU that pass, not decoding, dominates the cost.
    """
    if n < 1 or not prompts:
        raise ValueError(f"need n >= 1 and at least one prompt, got n={n}, {len(prompts)} prompts")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with llm.models.load_tokenizer")
    eos, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in prompts]
    check_prompt_lengths(model, [len(ids) for ids in encoded])
    if device.type != "cuda":
        sampling = sampling_kwargs(temperature, top_p)
        out = []
        for i, ids in enumerate(encoded):
            cache = shared_prompt_cache(model, ids, n)
            torch.manual_seed(seed + i)
            with torch.inference_mode():
                new = model.generate(
                    input_ids=torch.tensor([ids], device=device).expand(n, -1),
                    attention_mask=torch.ones(n, len(ids), dtype=torch.long, device=device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    **sampling,
                    **{cache_kwarg(model): cache},
                )
            out.append(_cut_at_eos(new[:, len(ids) :].cpu(), eos))
        return out
    rows = [p for p in prompts for _ in range(n)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            rows, return_tensors="pt", padding=True, pad_to_multiple_of=pad_to_multiple_of, add_special_tokens=False
        )
    finally:
        tokenizer.padding_side = old_side
    new = fast_generate_ids(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    ).cpu()
    seqs = _cut_at_eos(new, eos)
    return [seqs[i * n : (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def reply_logprobs(model, prompt_ids: list[int], replies: list[list[int]], pad_id: int) -> torch.Tensor:
    """Sum over each reply's tokens of ``log p(token | prompt, earlier reply tokens)`` (nats), float64 (len(replies),).

    The prompt is encoded once (``llm.fastgen.shared_prompt_cache``) and its cache shared by all replies; rows are the
    last prompt token followed by the right-padded reply, positions continuing the prompt's.
    """
    device = next(model.parameters()).device
    m, lp, la = len(replies), len(prompt_ids), max(1, max(len(a) for a in replies))
    x = torch.full((m, 1 + la), pad_id, dtype=torch.long)
    x[:, 0] = prompt_ids[-1]
    keep = torch.zeros(m, la, dtype=torch.long)
    for i, a in enumerate(replies):
        if a:
            x[i, 1 : 1 + len(a)] = torch.as_tensor(a)
            keep[i, : len(a)] = 1
    mask = torch.cat([torch.ones(m, lp, dtype=torch.long), keep], dim=1)
    pos = torch.arange(lp - 1, lp + la)[None].expand(m, -1)
    cache = shared_prompt_cache(model, prompt_ids, m)
    logits = model(
        input_ids=x.to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        **{cache_kwarg(model): cache},
    ).logits[:, :la]  # position j predicts reply token j
    tok_lp = logits.double().log_softmax(-1).gather(-1, x[:, 1:, None].to(device)).squeeze(-1)
    return (tok_lp * keep.to(device)).sum(1).cpu()


def all_reply_logprobs(
    model, prompt_ids: list[list[int]], replies: list[list[list[int]]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """``reply_logprobs`` for every prompt's replies (``[prompt][sample] -> ids``), in chunks of ``batch_size``
    replies; flattened prompt-major, float64 (total replies,)."""
    out = []
    for p, rows in zip(prompt_ids, replies):
        out += [reply_logprobs(model, p, rows[s : s + batch_size], pad_id) for s in range(0, len(rows), batch_size)]
    return torch.cat(out)
