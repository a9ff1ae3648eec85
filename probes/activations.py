"""The one nnsight adapter: read and edit the residual stream of any HF causal LM.

Sites (names used everywhere in ``probes/``), for a model with ``n_layers`` decoder blocks:

* ``"embed"``      -- the residual stream entering block 0 (``resid_pre`` of block 0): token
                      embedding plus whatever the model adds before the first block (GPT-2's
                      position embedding, Gemma's sqrt(d_model) scaling). Equals HF
                      ``hidden_states[0]``.
* ``"block{i}"``   -- the output of block ``i`` (``resid_post`` of layer ``i``), i in [0, n_layers).
* ``"final_norm"`` -- the output of the final norm (``ln_f`` / ``norm``), what the unembedding
                      reads. HF's last ``hidden_states`` entry is this, not ``block{n_layers-1}``.

The blocks are found generically (the ``ModuleList`` of length ``config.num_hidden_layers``) and the
final norm beside them, so GPT-2, Llama, Qwen2, Gemma and Gemma2 work without touching their code.
Reads go through nnsight's ``NNsight`` wrapper in execution order; block outputs may be tensors or
tuples (transformers changed this between releases), both are handled.

Positions: an edit's ``positions`` index the sequence axis of ``input_ids`` as passed (padding
included); during generation the token generated at step ``k`` sits at position ``seq_len + k``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from nnsight import NNsight

__all__ = [
    "Edit",
    "add_vector",
    "generate_with_edits",
    "logits_with_edits",
    "model_dims",
    "next_token_logits",
    "project_out",
    "reader",
    "replace_positions",
    "residual_sites",
    "residual_stream",
    "site_layer",
]

_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm")


# --------------------------------------------------------------------------------------------
# Model layout


@dataclass(frozen=True)
class _Layout:
    blocks_path: str  # dotted path of the decoder-block ModuleList, e.g. "transformer.h"
    norm_path: str  # dotted path of the final norm, e.g. "transformer.ln_f"
    n_layers: int
    d_model: int


def _layout(model: nn.Module) -> _Layout:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) is None:
        raise TypeError(
            f"{type(model).__name__} has no `config.num_hidden_layers`; pass a Hugging Face causal LM "
            "(GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM, ...) or a PEFT wrapper of one."
        )
    n_layers, d_model = int(config.num_hidden_layers), int(config.hidden_size)
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name
    ]
    if not lists:
        raise ValueError(
            f"{type(model).__name__}: found no ModuleList of {n_layers} decoder blocks "
            "(config.num_hidden_layers); this adapter needs the blocks in one ModuleList."
        )
    # The shortest path is the decoder stack itself; deeper lists of the same length would be
    # per-block sub-lists (e.g. a PEFT wrapper's) nested under it.
    blocks_path = min(lists, key=lambda n: (n.count("."), len(n)))
    parent_path = blocks_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    norms = [n for n in _FINAL_NORM_NAMES if isinstance(getattr(parent, n, None), nn.Module)]
    if len(norms) != 1:
        children = [n for n, _ in parent.named_children()]
        raise ValueError(
            f"{type(model).__name__}: expected exactly one final norm named one of {_FINAL_NORM_NAMES} "
            f"beside the blocks in `{parent_path}`, found {norms or 'none'} among children {children}."
        )
    norm_path = f"{parent_path}.{norms[0]}" if parent_path else norms[0]
    return _Layout(blocks_path, norm_path, n_layers, d_model)


def model_dims(model: nn.Module) -> tuple[int, int]:
    """``(n_layers, d_model)`` of a Hugging Face causal LM, as the adapter sees it."""
    layout = _layout(model)
    return layout.n_layers, layout.d_model


def residual_sites(model: nn.Module) -> list[str]:
    """Every residual site in execution order: ``["embed", "block0", ..., "block{L-1}", "final_norm"]``."""
    n_layers = _layout(model).n_layers
    return ["embed", *(f"block{i}" for i in range(n_layers)), "final_norm"]


def site_layer(site: str, n_layers: int) -> int:
    """Position of ``site`` in ``residual_sites`` order: embed -> 0, block{i} -> i + 1, final_norm -> n_layers + 1.

    Raises with the valid names when the site does not exist in a model of ``n_layers`` blocks.
    """
    if site == "embed":
        return 0
    if site == "final_norm":
        return n_layers + 1
    if site.startswith("block") and site[5:].isdigit() and int(site[5:]) < n_layers:
        return int(site[5:]) + 1
    raise ValueError(
        f"unknown residual site {site!r} for a model with {n_layers} blocks; "
        f"use 'embed', 'block0'..'block{n_layers - 1}' or 'final_norm'."
    )


def _envoy(root: NNsight, path: str):
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


class _Sites:
    """Envoy access per site for one trace: read (and optionally rewrite) a site's residual."""

    def __init__(self, root: NNsight, layout: _Layout):
        self.blocks = _envoy(root, layout.blocks_path)
        self.norm = _envoy(root, layout.norm_path)
        self.n_layers = layout.n_layers

    def visit(self, site: str, edit_fn=None) -> Tensor:
        """Return the residual at ``site`` (batch, seq, d_model); if ``edit_fn`` is given, replace it by
        ``edit_fn(residual)`` for the rest of the forward pass and return the edited value."""
        if site == "embed":
            envoy, attr = self.blocks[0], "input"
        elif site == "final_norm":
            envoy, attr = self.norm, "output"
        else:
            envoy, attr = self.blocks[int(site[5:])], "output"
        value = getattr(envoy, attr)
        hidden = value[0] if isinstance(value, tuple) else value
        if edit_fn is None:
            return hidden
        hidden = edit_fn(hidden)
        setattr(envoy, attr, (hidden, *value[1:]) if isinstance(value, tuple) else hidden)
        return hidden


# --------------------------------------------------------------------------------------------
# Edits


@dataclass(frozen=True)
class Edit:
    """One edit of the residual stream at one site, applied on every forward pass it is active in.

    ``op``:
      * ``"add"``: ``h[:, p] += value`` with ``value`` (d_model,) or (batch, d_model).
      * ``"replace"``: ``h[:, positions] = value`` with ``value`` (n_pos, d_model) or (batch, n_pos, d_model).
      * ``"project_out"``: ``h[:, p] -= (h[:, p] @ U) @ U.T`` where ``U`` is an orthonormal basis of the
        columns of ``value`` (d_model,) or (d_model, r).
    ``positions`` (n_pos,) are absolute sequence positions (see the module docstring); ``None`` means every
    position, including every token generated later. Build edits with ``add_vector``, ``replace_positions``
    and ``project_out``.
    """

    site: str
    op: Literal["add", "replace", "project_out"]
    value: Tensor
    positions: Tensor | None = None

    def apply(self, hidden: Tensor, offset: int) -> Tensor:
        """Edited copy of ``hidden`` (batch, seq, d_model) whose first position is absolute position ``offset``."""
        value = self.value.to(device=hidden.device, dtype=hidden.dtype)
        hidden = hidden.clone()  # never write into a tensor the model may still hold elsewhere
        if self.positions is None:
            local, keep = slice(None), None
        else:
            local = self.positions.to(hidden.device) - offset
            keep = (local >= 0) & (local < hidden.shape[1])
            if not bool(keep.any()):
                return hidden
            local = local[keep]
        if self.op == "add":
            shift = value if value.dim() == 1 else value[:, None, :]
            hidden[:, local] += shift
        elif self.op == "replace":
            hidden[:, local] = value[keep] if value.dim() == 2 else value[:, keep]
        else:
            part = hidden[:, local]
            hidden[:, local] = part - (part @ value) @ value.T
        return hidden


def add_vector(site: str, vector: Tensor, alpha: float = 1.0, positions: Sequence[int] | Tensor | None = None) -> Edit:
    """Steering edit: add ``alpha * vector`` (d_model,) or (batch, d_model) at ``site``, at ``positions``
    (default: every position, including every generated token)."""
    if vector.dim() not in (1, 2):
        raise ValueError(f"add_vector: vector must be (d_model,) or (batch, d_model), got shape {tuple(vector.shape)}")
    return Edit(site, "add", alpha * vector.detach(), _positions(positions))


def replace_positions(site: str, positions: Sequence[int] | Tensor, values: Tensor) -> Edit:
    """Patch edit: set the residual at ``site`` and ``positions`` (n_pos,) to ``values`` (n_pos, d_model) or
    (batch, n_pos, d_model)."""
    pos = _positions(positions)
    if pos is None or values.dim() not in (2, 3) or values.shape[-2] != len(pos):
        raise ValueError(
            f"replace_positions: values must be (n_pos, d_model) or (batch, n_pos, d_model) with n_pos = "
            f"len(positions) = {None if pos is None else len(pos)}, got shape {tuple(values.shape)}"
        )
    return Edit(site, "replace", values.detach(), pos)


def project_out(site: str, directions: Tensor, positions: Sequence[int] | Tensor | None = None) -> Edit:
    """Ablation edit: remove the span of ``directions`` (d_model,) or (d_model, r) from the residual at
    ``site`` (default: every position). Directions need not be orthonormal or unit-norm."""
    if directions.dim() == 1:
        directions = directions[:, None]
    if directions.dim() != 2:
        raise ValueError(f"project_out: directions must be (d_model,) or (d_model, r), got {tuple(directions.shape)}")
    # Orthonormalise in float64 once, so repeated application is an exact projection.
    q, r = torch.linalg.qr(directions.detach().double())
    rank = int((r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()).sum())
    if rank < directions.shape[1]:
        raise ValueError(
            f"project_out: the {directions.shape[1]} directions span only {rank} dimensions; drop dependent ones"
        )
    return Edit(site, "project_out", q.to(directions.dtype), _positions(positions))


def _positions(positions: Sequence[int] | Tensor | None) -> Tensor | None:
    if positions is None:
        return None
    return torch.as_tensor(positions, dtype=torch.long).flatten()


def _check_edits(edits: Sequence[Edit], layout: _Layout) -> dict[str, list[Edit]]:
    by_site: dict[str, list[Edit]] = {}
    for edit in edits:
        site_layer(edit.site, layout.n_layers)
        width = edit.value.shape[0] if edit.op == "project_out" else edit.value.shape[-1]
        if width != layout.d_model:
            raise ValueError(
                f"{edit.op} edit at {edit.site!r} has width {width} but the model's d_model is {layout.d_model}; "
                "build the edit from vectors of the model's width."
            )
        by_site.setdefault(edit.site, []).append(edit)
    return by_site


def _ordered(sites: Sequence[str], n_layers: int) -> list[str]:
    # nnsight serves module values in execution order; asking out of order deadlocks the trace.
    return sorted(set(sites), key=lambda s: site_layer(s, n_layers))


def _visit_all(
    handles: _Sites, read: Sequence[str], by_site: dict[str, list[Edit]], end: int | None, out: dict
) -> None:
    """Visit read and edited sites in execution order. ``end`` is the absolute position one past this
    pass's last token (``None``: the pass starts at position 0)."""
    for site in _ordered([*read, *by_site], handles.n_layers):
        edits = by_site.get(site)
        edit_fn = None
        if edits:

            def edit_fn(hidden, edits=edits):
                offset = 0 if end is None else end - hidden.shape[1]
                for edit in edits:
                    hidden = edit.apply(hidden, offset)
                return hidden

        hidden = handles.visit(site, edit_fn)
        if site in read:
            out[site] = hidden.float()


# --------------------------------------------------------------------------------------------
# Forward passes


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reader() -> Literal["nnsight", "hooks"]:
    """``"nnsight"`` where nnsight imports, else ``"hooks"``: plain reads (``residual_stream`` without edits) then
    run through forward hooks at the same sites, because the GPU image ships without nnsight; edits need nnsight."""
    try:
        import nnsight  # noqa: F401
    except ImportError:
        return "hooks"
    return "nnsight"


def _hooked_stream(model: nn.Module, layout: _Layout, input_ids: Tensor, kwargs: dict, sites: Sequence[str]) -> Tensor:
    """One forward pass read with hooks: ``embed`` = input of block 0, ``block{i}`` = output of block i,
    ``final_norm`` = output of the final norm; ``(n_sites, batch, seq, d_model)`` float32."""
    blocks, norm = model.get_submodule(layout.blocks_path), model.get_submodule(layout.norm_path)
    seen: dict[str, Tensor] = {}

    def keep(name):
        def hook(module, args, kwargs_or_output):
            if name == "embed":
                value = args[0] if args else kwargs_or_output["hidden_states"]
            else:
                value = kwargs_or_output
            seen[name] = (value[0] if isinstance(value, tuple) else value).float()

        return hook

    handles = [blocks[0].register_forward_pre_hook(keep("embed"), with_kwargs=True)]
    handles += [b.register_forward_hook(keep(f"block{i}")) for i, b in enumerate(blocks)]
    handles.append(norm.register_forward_hook(keep("final_norm")))
    try:
        model(input_ids=input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[s] for s in sites])


def _wrap(model: nn.Module) -> "NNsight":
    # Imported here, not at module top: importing nnsight patches builtins (a `.save` on every object)
    # and torch, and `import probes` must not change anything for code that never traces a model.
    from nnsight import NNsight

    return NNsight(model)


@torch.no_grad()
def residual_stream(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    sites: Sequence[str] | None = None,
    batch_size: int | None = None,
    edits: Sequence[Edit] = (),
) -> Tensor:
    """Residual stream at ``sites`` (default: all of ``residual_sites(model)``).

    Args:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq), 1 for real tokens; passed to the model unchanged.
        batch_size: rows per forward pass (default: all at once).
        edits: optional edits applied during the pass; a read site that is also edited returns the
            edited value.

    Without nnsight (``reader() == "hooks"``) reads without edits go through forward hooks at the same sites.

    Returns:
        (n_sites, batch, seq, d_model) float32 on the model's device, in the order of ``sites``.
    """
    layout = _layout(model)
    sites = list(sites) if sites is not None else residual_sites(model)
    for site in sites:
        site_layer(site, layout.n_layers)
    by_site = _check_edits(edits, layout)
    step = batch_size or input_ids.shape[0]
    per_row = [e.site for e in edits if e.value.dim() == (2 if e.op == "add" else 3)]
    if per_row and step < input_ids.shape[0]:
        raise ValueError(f"edits at {per_row} carry one value per row; run them with batch_size=None")
    device = _device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    if not edits and reader() == "hooks":
        return torch.cat(
            [
                _hooked_stream(
                    model,
                    layout,
                    input_ids[start : start + step],
                    {} if attention_mask is None else {"attention_mask": attention_mask[start : start + step]},
                    sites,
                )
                for start in range(0, input_ids.shape[0], step)
            ],
            dim=1,
        )
    root = _wrap(model)
    import nnsight  # already imported by _wrap; see there why not at module top

    chunks = []
    for start in range(0, input_ids.shape[0], step):
        rows = slice(start, start + step)
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[rows]}
        with root.trace(input_ids[rows], **kwargs) as tracer:
            out = nnsight.save({})  # a container filled in the trace survives it only if saved
            _visit_all(_Sites(root, layout), sites, by_site, None, out)
            # Nothing past the last site is needed: skip the remaining blocks and the (large) unembedding.
            tracer.stop()
        chunks.append(torch.stack([out[s] for s in sites]))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def logits_with_edits(
    model: nn.Module, input_ids: Tensor, edits: Sequence[Edit] = (), attention_mask: Tensor | None = None
) -> Tensor:
    """Logits (batch, seq, vocab) float32 of one forward pass with ``edits`` applied (none: the plain model)."""
    layout = _layout(model)
    by_site = _check_edits(edits, layout)
    device = _device(model)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    root = _wrap(model)
    with root.trace(input_ids.to(device), **kwargs):
        _visit_all(_Sites(root, layout), (), by_site, None, {})
        logits = root.output.logits.float().save()
    return logits


def next_token_logits(
    model: nn.Module, input_ids: Tensor, edits: Sequence[Edit] = (), attention_mask: Tensor | None = None
) -> Tensor:
    """Next-token logits (batch, vocab) float32 at each row's last real token (left or right padding),
    with ``edits`` applied. Compare ``log_softmax`` of two calls to measure a steering edit's effect."""
    logits = logits_with_edits(model, input_ids, edits, attention_mask)
    if attention_mask is None:
        return logits[:, -1]
    positions = torch.arange(input_ids.shape[1], device=logits.device)
    last = (attention_mask.to(logits.device).bool() * positions).argmax(dim=1)
    return logits[torch.arange(len(last), device=logits.device), last]


@torch.no_grad()
def generate_with_edits(
    model: nn.Module,
    input_ids: Tensor,
    edits: Sequence[Edit] = (),
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    **generate_kwargs,
) -> Tensor:
    """``model.generate`` with ``edits`` active on every forward pass of the decode loop.

    The prompt pass and every later single-token pass get the edit (``positions=None`` edits hit every
    generated token); position-restricted edits fire only on the pass that contains their positions.
    Works with or without the KV cache: the absolute position of a pass's first token is recovered from
    the step index and the pass's length.

    Returns:
        (batch, seq + n_new) token ids, as ``generate`` returns them.
    """
    layout = _layout(model)
    by_site = _check_edits(edits, layout)
    device = _device(model)
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask.to(device)
    prompt_len = input_ids.shape[1]
    root = _wrap(model)
    generated: list[Tensor] = []

    def run_generate(*args, **kwargs):
        # Keep the ids in a closure rather than reading `tracer.result` in the block: a read of the
        # result after the step loop would never run when an EOS ends generation before max_new_tokens.
        ids = model.generate(*args, **kwargs)
        generated.append(ids)
        return ids

    with warnings.catch_warnings():
        # An EOS before max_new_tokens leaves the step loop waiting for a pass that never comes; nnsight
        # warns and unwinds the loop, which is exactly the intended ending here.
        warnings.filterwarnings("ignore", message=".*tracer.iter.*")
        with root.trace(input_ids, fn=run_generate, max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
            if by_site:
                handles = _Sites(root, layout)
                for step in tracer.iter[:max_new_tokens]:
                    # Pass k reads tokens up to absolute position prompt_len + k - 1, whether it is the
                    # whole sequence (no KV cache) or just the newest token.
                    _visit_all(handles, (), by_site, prompt_len + step, {})
    return generated[0]
