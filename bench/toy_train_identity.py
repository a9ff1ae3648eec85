"""Are two toy pre-training runs the same run? Compares the newest checkpoints of two run folders: model weights and
optimizer state with ``torch.equal``, and the training history (step, train_loss, val_loss, floor, lr, tokens) entry
by entry. The check a change to ``toy.train`` passes to claim the main job is unchanged:

    # the main job's config, 300 steps, once with the code before the change and once after (here: the old flags
    # before, the TrainingArguments names after):
    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml --steps 300 --eval_every 100 --save_every 0 \
        --progress false --report_to none --output_dir /tmp/before
    python -m toy.experiments.pretrain --config configs/toy/mess3.yaml --max_steps 300 --eval_steps 100 --save_steps 0 \
        --disable_tqdm true --report_to none --output_dir /tmp/after
    python bench/toy_train_identity.py /tmp/before /tmp/after

Prints one line per part and exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from plumbing.runs import latest_checkpoint  # noqa: E402

HISTORY_KEYS = ("step", "train_loss", "val_loss", "floor", "lr", "tokens")


def same_tensors(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values: equal structure, ``torch.equal`` tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def main(argv=None) -> bool:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs=2, type=Path, help="The two run folders (their newest checkpoints are compared).")
    args = ap.parse_args(argv)
    ckpts = [latest_checkpoint(run) for run in args.runs]
    for run, ckpt in zip(args.runs, ckpts):
        if ckpt is None:
            sys.exit(f"{run} holds no complete checkpoint-<step>")
    a, b = ckpts
    parts = {
        "weights": same_tensors(load_file(a / "model.safetensors"), load_file(b / "model.safetensors")),
        "optimizer state": same_tensors(
            torch.load(a / "optimizer.pt", weights_only=True), torch.load(b / "optimizer.pt", weights_only=True)
        ),
    }
    hist = [json.loads((c / "trainer_state.json").read_text())["history"] for c in ckpts]
    rows = [[{k: h.get(k) for k in HISTORY_KEYS} for h in hs] for hs in hist]
    parts[f"history ({len(rows[0])} and {len(rows[1])} entries: {', '.join(HISTORY_KEYS)})"] = rows[0] == rows[1]
    print(f"{a} vs {b}")
    for name, same in parts.items():
        print(f"  {name}: {'identical' if same else 'DIFFERENT'}")
    last = hist[1][-1]
    print(f"  last entry: step {last['step']}, val loss {last.get('val_loss')!r}, floor {last.get('floor')!r}")
    return all(parts.values())


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
