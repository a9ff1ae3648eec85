"""The LoRA update's geometry against the untuned model's alignment / topic subspaces over training
(``lora_geometry``), for the EM experiment's report (``llm.em_report``).

For a module that writes into the residual stream (MLP down-projection,
attention output) LoRA adds ``dW = B @ A`` with ``B: (d_model, r)``, ``A: (r, d_in)``. Its share in a subspace
with orthonormal basis ``Q`` is ``||Q^T dW||_F^2 / ||dW||_F^2`` = ``tr(Q^T B G B^T Q) / tr(B G B^T)`` with
``G = A A^T`` (r x r, so the d_model x d_in update is never formed); for rank 1 it is the share of ``B``'s
squared norm. A uniformly random k-dimensional subspace of R^d_model holds ``k / d_model`` in expectation:
the baseline. The cosine with the misalignment direction ``v`` is signed for rank 1 (``cos(B, v)``) and, for
rank r, the largest cosine between ``v`` and any vector the update can write (``||P_B v|| / ||v||``).
Measured at every step ``llm.lora.LoraTrajectoryCallback`` saved.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from plumbing.lora import DOWN_PROJ_SUFFIXES

RESIDUAL_WRITERS = DOWN_PROJ_SUFFIXES + ("self_attn.o_proj", "attn.c_proj", "self_attention.dense")


def _layer(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def update_share(B: torch.Tensor, A: torch.Tensor, Q: torch.Tensor) -> float:
    """Share of ``||B @ A||_F^2`` inside span(Q). B (d_model, r), A (r, d_in), Q (d_model, k) orthonormal.
    NaN while the update is zero (B starts at zero)."""
    B, A, Q = B.double(), A.double(), Q.double()
    BG = B @ (A @ A.T)
    total = float((BG * B).sum())
    if total <= 0:
        return math.nan
    QB = Q.T @ B
    return float(((QB @ (A @ A.T)) * QB).sum()) / total


def update_cosine(B: torch.Tensor, v: torch.Tensor) -> float:
    """Signed ``cos(B, v)`` for rank 1; for rank r the largest cosine between ``v`` and span(B) (>= 0)."""
    B, v = B.double(), v.double()
    if float(B.norm()) == 0:
        return math.nan
    if B.shape[1] == 1:
        return float(B[:, 0] @ v / (B[:, 0].norm() * v.norm()))
    from probes.subspaces import orthonormal_basis

    Q = orthonormal_basis(B)
    return float((Q.T @ v).norm() / v.norm())


def lora_geometry(trajectory_dir: str | Path, probes_dir: str | Path, directions: str | Path, site: str) -> dict:
    """Share of each residual-writing LoRA update in the alignment and topic probe subspaces at ``site`` (from
    ``llm.factored``'s ``probes/``) and its cosine with the ``site`` direction (``llm.steer``'s
    ``directions``), at every saved step. ``headline``: the modules of the probed block."""
    from safetensors.torch import load_file

    from llm.directions import load_directions
    from probes.io import load_probe
    from probes.subspaces import orthonormal_basis

    subspaces = {n: orthonormal_basis(load_probe(Path(probes_dir) / f"{n}_{site}")) for n in ("alignment", "topic")}
    dirs, meta = load_directions(directions)
    v = dirs[meta["sites"].index(site)].double()
    d_model = v.shape[0]
    files = sorted(Path(trajectory_dir).glob("step_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise FileNotFoundError(
            f"no step_*.safetensors in {trajectory_dir}; the sft stage saves them (llm.lora.LoraTrajectoryCallback)"
        )
    modules: dict[str, dict] = {}
    for f in files:
        step = int(f.stem.split("_")[1])
        snap = load_file(str(f))
        for key in snap:
            if not key.endswith(".lora_B"):
                continue
            mod = key[: -len(".lora_B")]
            B, A = snap[key], snap[f"{mod}.lora_A"]
            if not mod.endswith(RESIDUAL_WRITERS) or B.shape[0] != d_model:
                continue
            e = modules.setdefault(
                mod,
                {
                    "layer": _layer(mod),
                    "rank": B.shape[1],
                    "steps": [],
                    "share_alignment": [],
                    "share_topic": [],
                    "cos_direction": [],
                    "norm_B": [],
                },
            )
            e["steps"].append(step)
            for name, Q in subspaces.items():
                e[f"share_{name}"].append(update_share(B, A, Q))
            e["cos_direction"].append(update_cosine(B, v))
            e["norm_B"].append(float(B.norm()))
    if not modules:
        raise ValueError(
            f"no LoRA module in {trajectory_dir} writes into the residual stream ({', '.join(RESIDUAL_WRITERS)})"
        )
    k = int(site.removeprefix("block")) if site.startswith("block") else None
    return {
        "site": site,
        "d_model": d_model,
        "random_share": {n: Q.shape[1] / d_model for n, Q in subspaces.items()},
        "dims": {n: Q.shape[1] for n, Q in subspaces.items()},
        "headline": [m for m, e in modules.items() if e["layer"] == k],
        "modules": modules,
    }
