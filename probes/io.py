"""Probe files: ``<name>.safetensors`` (weights) + ``<name>.json`` (metadata). No pickle.

``<name>.safetensors`` holds ``W`` (d_model, k) and ``b`` (k,) in the dtype they were fitted in.
``<name>.json`` holds::

    {"format": "belief-rl-probe", "version": 1,
     "site": "block3", "site_kind": "resid_post", "layer": 4,   # layer = index in residual_sites order
     "d_model": 64, "n_layers": 4, "source": "runs/mess3/checkpoint",
     "target_names": ["s0", "s1", "s2"], "alpha": 0.0, "rank": null, "metrics": {...},
     "sha256": "..."}                                            # of the tensors, checked on load

``sha256`` (``tensor_sha256``) covers each tensor's name, dtype, shape and bytes, so a flipped bit in the weights is
refused on load rather than read as a slightly different probe. Files written before it existed load with a warning.

A probe loads onto any model of the same width whose residual sites include the probe's site;
``check_compatible`` says what to change otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .activations import model_dims, site_layer
from .linear import LinearProbe

__all__ = ["check_compatible", "load_probe", "save_probe", "site_kind", "tensor_sha256"]

logger = logging.getLogger(__name__)

FORMAT = "belief-rl-probe"
VERSION = 1
# The metadata fields load_probe reads and the JSON types each may have (bool is refused where int is).
_META_TYPES = {
    "site": str,
    "d_model": int,
    "n_layers": int,
    "source": (str, type(None)),
    "target_names": (list, type(None)),
    "alpha": (int, float),
    "rank": (int, type(None)),
    "metrics": dict,
}


def site_kind(site: str) -> str:
    """``"embed"``, ``"resid_post"`` (a block's output) or ``"final_norm"``: what kind of vector a site holds.
    Final-norm outputs are normalised and embeddings precede every block, so a probe does not transfer
    between kinds."""
    if site in ("embed", "final_norm"):
        return site
    if site.startswith("block") and site[5:].isdigit():
        return "resid_post"
    raise ValueError(f"unknown residual site {site!r}; use 'embed', 'block<i>' or 'final_norm'")


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of ``tensors`` in name order: each name, dtype, shape and the raw bytes of its (CPU, contiguous) data."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_probe(probe: LinearProbe, path: str | Path, model: nn.Module | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path.

    ``model`` (the model the probe was fitted on) fills in ``source`` and ``n_layers`` and checks the
    probe fits it; without it those fields come from the probe. The probe must name its ``site``.
    """
    if probe.site is None:
        raise ValueError("probe.site is None; set the residual site it reads (e.g. 'block3') before saving")
    source, n_layers = probe.source, probe.n_layers
    if model is not None:
        check_compatible(probe, model)
        n_layers = model_dims(model)[0]
        source = source or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if n_layers is None:
        raise ValueError(
            "the probe's n_layers is unknown; pass model= (the model it was fitted on) or set probe.n_layers"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "site": probe.site,
        "site_kind": site_kind(probe.site),
        "layer": site_layer(probe.site, n_layers),
        "d_model": probe.d_model,
        "n_layers": n_layers,
        "source": source,
        "target_names": probe.target_names,
        "alpha": probe.alpha,
        "rank": probe.rank,
        "metrics": probe.metrics,
    }
    if probe.target_names is not None and len(probe.target_names) != probe.n_targets:
        raise ValueError(f"{len(probe.target_names)} target_names for a probe with {probe.n_targets} targets")
    tensors = {"W": probe.W.detach().cpu().contiguous(), "b": probe.b.detach().cpu().contiguous()}
    meta["sha256"] = tensor_sha256(tensors)
    text = json.dumps(meta, indent=2)  # fails here, before any file is written, if metrics are not JSON
    weights_path, meta_path = _paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(weights_path), metadata={"format": FORMAT, "version": str(VERSION)})
    meta_path.write_text(text + "\n")
    return meta_path


def load_probe(
    path: str | Path, model: nn.Module | None = None, site: str | None = None, strict: bool = True
) -> LinearProbe:
    """Read a probe written by ``save_probe`` (``path`` with or without suffix).

    With ``model``, check it fits (``check_compatible``, which ``site`` and ``strict`` are passed to) and
    move the weights to the model's device; the returned probe's ``site`` is the site it will read.
    """
    weights_path, meta_path = _paths(path)
    for file in (weights_path, meta_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; a probe is a .safetensors + .json pair written by save_probe")
    rewrite = "; rewrite it with probes.io.save_probe (refit the probe, or restore the file from a good copy)"
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error}){rewrite}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise ValueError(
            f"{meta_path} is format {got[0]!r} version {got[1]!r}; this code reads {FORMAT!r} version {VERSION}"
        )
    missing = [k for k in _META_TYPES if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {missing}{rewrite}")
    wrong = [
        f"{k}={meta[k]!r}"
        for k, types in _META_TYPES.items()
        if not isinstance(meta[k], types) or isinstance(meta[k], bool)
    ]
    if wrong:
        raise ValueError(f"{meta_path} has fields of the wrong type: {', '.join(wrong)}{rewrite}")
    try:
        site_kind(meta["site"])
    except ValueError as error:
        raise ValueError(f"{meta_path}: {error}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path} cannot be read as safetensors ({error}){rewrite}") from None
    if set(tensors) != {"W", "b"}:
        raise ValueError(f"{weights_path} holds tensors {sorted(tensors)}; a probe holds exactly W and b{rewrite}")
    W, b = tensors["W"], tensors["b"]
    if W.dim() != 2 or b.dim() != 1 or b.shape[0] != W.shape[1] or W.shape[0] != meta["d_model"]:
        raise ValueError(
            f"{weights_path} holds W {tuple(W.shape)} and b {tuple(b.shape)}; {meta_path} says W is "
            f"(d_model={meta['d_model']}, k) and b is (k,){rewrite}"
        )
    if not (W.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{weights_path} holds W {W.dtype}, b {b.dtype}; a probe is floating point{rewrite}")
    for name, t in (("W", W), ("b", b)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{weights_path}: {bad} non-finite (NaN/inf) value(s) in {name} (damaged file?){rewrite}")
    if meta["target_names"] is not None and len(meta["target_names"]) != W.shape[1]:
        raise ValueError(
            f"{meta_path} names {len(meta['target_names'])} targets but W has {W.shape[1]} columns{rewrite}"
        )
    if "sha256" not in meta:
        logger.warning(
            "%s has no sha256 of its tensors (written before probe files carried one): %s is not checked; "
            "save it again with probes.io.save_probe to add it",
            meta_path,
            weights_path,
        )
    elif meta["sha256"] != tensor_sha256(tensors):
        raise ValueError(
            f"{weights_path}: the tensors do not match the sha256 in {meta_path} (flipped bits or an edit: "
            f"a damaged file){rewrite}"
        )
    probe = LinearProbe(
        W,
        b,
        alpha=meta["alpha"],
        rank=meta["rank"],
        site=meta["site"],
        target_names=meta["target_names"],
        metrics=meta["metrics"],
        source=meta["source"],
        n_layers=meta["n_layers"],
    )
    if model is not None:
        probe.site = check_compatible(probe, model, site=site, strict=strict)
        device = next(model.parameters()).device
        probe.W, probe.b = probe.W.to(device), probe.b.to(device)
    return probe


def check_compatible(probe: LinearProbe, model: nn.Module, site: str | None = None, strict: bool = True) -> str:
    """Check that ``probe`` can read ``model``'s residual stream at ``site`` (default: the probe's own site);
    return that site. Raises ``ValueError`` saying what to change when:

    * the widths differ (probe d_model vs model d_model);
    * the site does not exist in the model (e.g. ``block30`` on a 24-block model);
    * ``site`` overrides the probe's site with one of another kind (embed / resid_post / final_norm);
    * (``strict``, no ``site`` given) the probe comes from a model with a different number of blocks and
      reads a block output, where the same index means a different relative depth. An explicit ``site``
      is the caller choosing the matching block, so it is accepted.
    """
    n_layers, d_model = model_dims(model)
    origin = f"fitted on {probe.source or 'an unknown model'} at {probe.site}"
    if probe.d_model != d_model:
        raise ValueError(
            f"probe width {probe.d_model} does not match the model's d_model {d_model} (probe {origin}); "
            f"load it onto a model with d_model={probe.d_model}, or fit a new probe on this model's activations."
        )
    target = site or probe.site
    if target is None:
        raise ValueError("the probe names no site; pass site= (e.g. 'block3')")
    try:
        site_layer(target, n_layers)
    except ValueError as error:
        raise ValueError(f"probe {origin}: {error} Pass site= to read it elsewhere.") from None
    if probe.site is not None and site_kind(target) != site_kind(probe.site):
        raise ValueError(
            f"probe {origin} reads a {site_kind(probe.site)} vector, but site {target!r} holds a "
            f"{site_kind(target)} vector; pass a site of kind {site_kind(probe.site)}."
        )
    if strict and site is None and site_kind(target) == "resid_post" and probe.n_layers not in (None, n_layers):
        raise ValueError(
            f"probe {origin} comes from a {probe.n_layers}-block model and this model has {n_layers} blocks, so "
            f"{target} sits at a different depth; pass site= for the matching block, or strict=False to accept it."
        )
    return target
