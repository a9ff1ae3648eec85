"""The nnsight adapter against independent references: HF ``output_hidden_states`` for reads, plain
torch hooks for edits, on tiny random-init models built in-process (no downloads)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from probes.activations import (
    add_vector,
    generate_with_edits,
    logits_with_edits,
    model_dims,
    next_token_logits,
    project_out,
    replace_positions,
    residual_sites,
    residual_stream,
)

VOCAB, D = 11, 16
_LLM_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_LLM_SIZES)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**_LLM_SIZES)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**_LLM_SIZES)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLM_SIZES)),
}


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def blocks_and_norm(model):
    base = model.transformer if hasattr(model, "transformer") else model.model
    return (base.h if hasattr(base, "h") else base.layers), (base.ln_f if hasattr(base, "ln_f") else base.norm)


def ids_and_left_padded_mask(batch=3, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_residual_stream_matches_hf_hidden_states(arch):
    model = tiny(arch)
    ids, mask = ids_and_left_padded_mask()
    sites = residual_sites(model)
    assert sites == ["embed", "block0", "block1", "block2", "final_norm"]
    assert model_dims(model) == (3, D)

    R = residual_stream(model, ids, attention_mask=mask)
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert R.shape == (5, 3, 7, D) and R.dtype == torch.float32 and not R.requires_grad
    # HF: hidden_states[0] = input to block 0, [i + 1] = output of block i, except the last entry,
    # which is the final-norm output in place of the last block's.
    torch.testing.assert_close(R[0], hs[0])
    torch.testing.assert_close(R[1], hs[1])
    torch.testing.assert_close(R[2], hs[2])
    torch.testing.assert_close(R[4], hs[3])
    assert not torch.allclose(R[3], R[4], atol=1e-3)  # the last block's output is not the final norm's

    chunked = residual_stream(model, ids, attention_mask=mask, sites=["final_norm", "embed"], batch_size=2)
    torch.testing.assert_close(chunked, R[[4, 0]])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hook_reader_without_nnsight_reads_the_same_sites(arch, monkeypatch):
    """Where nnsight is absent (the GPU image) plain reads go through forward hooks at the same sites."""
    import sys

    from probes import activations

    model = tiny(arch)
    ids, mask = ids_and_left_padded_mask()
    R = residual_stream(model, ids, attention_mask=mask)
    monkeypatch.setitem(sys.modules, "nnsight", None)
    assert activations.reader() == "hooks"
    hooked = residual_stream(model, ids, attention_mask=mask, batch_size=2)
    torch.testing.assert_close(hooked, R, atol=1e-6, rtol=1e-6)


def test_unknown_site_and_non_hf_model_fail_loudly():
    model = tiny("gpt2")
    ids, _ = ids_and_left_padded_mask()
    with pytest.raises(ValueError, match="block0'..'block2'"):
        residual_stream(model, ids, sites=["block3"])
    with pytest.raises(ValueError, match="d_model is 16"):
        residual_stream(model, ids, edits=[add_vector("block0", torch.ones(8))])
    with pytest.raises(TypeError, match="num_hidden_layers"):
        residual_sites(nn.Linear(3, 3))


class _TupleBlock(nn.Module):
    """A block in the older transformers style: returns ``(hidden, extra)``."""

    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Linear(d, d)

    def forward(self, hidden, attention_mask=None):
        return hidden + torch.tanh(self.mlp(hidden)), None


class _TupleLM(nn.Module):
    def __init__(self, d=8, n_layers=2, vocab=5):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n_layers, hidden_size=d)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_TupleBlock(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)[0]
        return SimpleNamespace(logits=self.lm_head(self.norm(hidden)))


def test_tuple_block_outputs_are_read_and_edited():
    torch.manual_seed(0)
    model = _TupleLM().eval()
    ids = torch.randint(0, 5, (2, 4))
    v = torch.randn(8)
    R = residual_stream(model, ids, edits=[add_vector("block0", v, alpha=2.0)])
    with torch.no_grad():
        h0 = model.layers[0](model.embed(ids))[0] + 2.0 * v
        h1 = model.layers[1](h0)[0]
        logits = model.lm_head(model.norm(h1))
    torch.testing.assert_close(R[1], h0)
    torch.testing.assert_close(R[2], h1)
    torch.testing.assert_close(logits_with_edits(model, ids, [add_vector("block0", v, alpha=2.0)]), logits)


def _hooked_forward(model, ids, site_module, fn, mask=None):
    """Reference: a plain torch forward hook applies ``fn`` to ``site_module``'s output."""
    handle = site_module.register_forward_hook(lambda m, args, out: fn(out))
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_single_pass_edits_match_torch_hook_reference(arch):
    model = tiny(arch)
    blocks, _ = blocks_and_norm(model)
    ids, mask = ids_and_left_padded_mask()
    v = torch.randn(D)
    u = v / v.norm()

    ref = _hooked_forward(model, ids, blocks[1], lambda h: h + 3.0 * v, mask)
    torch.testing.assert_close(logits_with_edits(model, ids, [add_vector("block1", v, 3.0)], mask), ref)

    ref = _hooked_forward(model, ids, blocks[0], lambda h: h - (h @ u)[..., None] * u, mask)
    torch.testing.assert_close(logits_with_edits(model, ids, [project_out("block0", 5 * v)], mask), ref)

    patch = torch.randn(2, D)

    def patched(h):
        h = h.clone()
        h[:, [3, 5]] = patch
        return h

    ref = _hooked_forward(model, ids, blocks[2], patched, mask)
    torch.testing.assert_close(logits_with_edits(model, ids, [replace_positions("block2", [3, 5], patch)], mask), ref)

    # next-token logits read each row's last real token; with left padding that is the last column.
    nxt = next_token_logits(model, ids, [add_vector("block1", v, 3.0)], mask)
    torch.testing.assert_close(nxt, _hooked_forward(model, ids, blocks[1], lambda h: h + 3.0 * v, mask)[:, -1])
    plain = next_token_logits(model, ids, attention_mask=mask)
    assert (nxt - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_generation_edit_is_active_on_later_generated_tokens(arch):
    """The hidden state of the 3rd generated token (computed on decode step 3, when it is the input)
    must equal a no-cache reference forward with the edit at EVERY position, and must differ from one
    where the edit touched only the prompt (which a prompt-only implementation would match)."""
    model = tiny(arch)
    blocks, norm = blocks_and_norm(model)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    prompt_len = ids.shape[1]
    v = torch.randn(D, generator=torch.Generator().manual_seed(4))
    edit = add_vector("block0", v, alpha=4.0)

    recorded = []
    handle = norm.register_forward_hook(lambda m, args, out: recorded.append(out[:, -1].detach().clone()))
    try:
        out = generate_with_edits(
            model, ids, [edit], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
        )
    finally:
        handle.remove()
    assert out.shape == (2, prompt_len + 5) and len(recorded) == 5
    step3 = recorded[3]  # decode step 3 reads the 3rd generated token (position prompt_len + 2)
    upto = out[:, : prompt_len + 3]

    def final_norm_last(fn):
        seen = []
        h_norm = norm.register_forward_hook(lambda m, args, o: seen.append(o[:, -1]))
        try:
            _hooked_forward(model, upto, blocks[0], fn)
        finally:
            h_norm.remove()
        return seen[0]

    everywhere = final_norm_last(lambda h: h + 4.0 * v)

    def prompt_only(h):
        h = h.clone()
        h[:, :prompt_len] += 4.0 * v
        return h

    torch.testing.assert_close(step3, everywhere, atol=1e-5, rtol=1e-4)
    assert (step3 - final_norm_last(prompt_only)).abs().max() > 1e-2
    assert (step3 - final_norm_last(lambda h: h)).abs().max() > 1e-2


def test_generation_ablation_and_positional_patch_hit_the_right_steps():
    model = tiny("gpt2")
    blocks, _ = blocks_and_norm(model)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    v = torch.randn(D)
    u = v / v.norm()
    steps4 = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    seen = []  # input of block 1 on each decode step = block 0's (edited) output
    handle = blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -1].clone()))
    try:
        generate_with_edits(model, ids, [project_out("block0", v)], use_cache=False, **steps4)
        ablated = torch.stack(seen)
        seen.clear()
        patch = torch.randn(1, D)
        # Position 6 is the 2nd generated token, the newest input on decode step 2.
        generate_with_edits(model, ids, [replace_positions("block0", [6], patch)], **steps4)
        patched = torch.stack(seen)
    finally:
        handle.remove()
    assert (ablated @ u).abs().max() < 1e-5  # without the KV cache too
    torch.testing.assert_close(patched[2], patch.expand(2, D))
    assert not torch.allclose(patched[[0, 1, 3]], patch.expand(3, 2, D))


def test_generation_that_stops_early_on_eos_returns_its_tokens():
    model = tiny("qwen2")
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    edit = add_vector("block1", torch.randn(D), alpha=2.0)
    first = generate_with_edits(model, ids, [edit], max_new_tokens=1, do_sample=False)[0, -1].item()
    # Declaring the first generated token the EOS ends the decode loop long before max_new_tokens.
    out = generate_with_edits(model, ids, [edit], max_new_tokens=6, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert out.shape == (1, 6) and out[0, -1].item() == first
