"""The files of a toy pre-training checkpoint (``toy.train``): ``<output_dir>/checkpoint-<step>/`` holds the model
(``save_pretrained``, safetensors), ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` and ``trainer_state.json`` (step,
history, the run's facts). Tensors and plain values only: every file loads with ``weights_only=True``, so a checkpoint
cannot run code. The folder is written atomically (``plumbing.runs.atomic_dir``), the state file last."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from plumbing.runs import atomic_dir

logger = logging.getLogger(__name__)


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, history: list[dict], extra: dict) -> Path:
    """Write a resumable checkpoint (see the module docstring) atomically; call on the main process only."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        # written last: latest_checkpoint takes a folder as complete only with this file
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "history": history, **extra}, indent=1))
    return path


def rng_state() -> dict:
    """The global RNG states as tensors and plain values (numpy's key array as an int64 tensor), so that
    ``torch.load(..., weights_only=True)`` reads them back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(path: Path) -> None:
    """Restore the global RNGs from ``rng.pt``; one that only unpickling could read (an older checkpoint's
    numpy arrays, or a crafted file) is not loaded: a warning, and the global RNGs stay as they are (the data
    are seeded per step, so only a ``data_fn`` drawing from the global RNG would notice)."""
    try:
        rng = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with a long hint; the file is simply not trusted
        logger.warning(
            "%s holds more than tensors (%s); not loaded: the global RNG state is not restored",
            path,
            str(err).splitlines()[0][:200],
        )
        return
    restore_rng(rng)


def restore_rng(rng: dict) -> None:
    """Set the global RNGs to ``rng_state()``'s ``rng``."""
    torch.set_rng_state(rng["torch"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_weights(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors", device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the untied lm_head is saved; only a tied copy may legitimately be absent
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
