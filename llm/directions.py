"""Misalignment directions on a real LLM: answer-token activations of labelled replies, mean differences,
projections, and their files.

Activations of a reply are read through the one nnsight adapter (``probes.activations.residual_stream``)
on the chat-templated question followed by the reply, and averaged over the reply's tokens only
(``answer_activations``). The prompt part is exactly what generation sees (``llm.generate.chat_prompt``,
the model's own system turn included), and the reply is tokenised on its own and appended, so the
reply tokens are the ones the model would have produced.

Conventions: ``acts`` are (n_sites, n, d_model) float32, ``labels`` (n,) with 1 = misaligned, 0 = aligned;
a direction per site is ``mean(acts[labels == 1]) - mean(acts[labels == 0])`` (raw, not normalised: its
norm is the distance between the class means, the natural unit for a steering coefficient ``alpha``).
A projection score is ``acts @ v / ||v||`` (units of the residual stream).

Direction files: ``<name>.safetensors`` with ``directions`` (n_sites, d_model) and ``<name>.json``
with ``{"format": "belief-rl-directions", "version": 1, "sites": [...], "d_model", "n_layers", "source",
...}``; ``load_directions`` checks them against a model like ``probes.io.check_compatible`` does for probes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from llm.em_metrics import read_judged_csv
from llm.generate import chat_prompt
from probes.activations import model_dims, residual_sites, residual_stream, site_layer

__all__ = [
    "LabelledTexts",
    "answer_activations",
    "auroc",
    "encode_replies",
    "load_directions",
    "load_judged_texts",
    "load_labelled_texts",
    "mean_difference",
    "projections",
    "random_directions",
    "save_directions",
]

FORMAT = "belief-rl-directions"
VERSION = 1


@dataclass
class LabelledTexts:
    """Replies with labels: ``labels[i]`` 1 = misaligned, 0 = aligned; ``scores`` the judge's aligned
    score (0-100) when the replies come from a judged file, else ``None``."""

    questions: list[str]
    answers: list[str]
    labels: Tensor  # (n,) long
    scores: Tensor | None = None  # (n,) float64

    def __len__(self) -> int:
        return len(self.answers)

    def subset(self, index: Tensor) -> "LabelledTexts":
        idx = index.tolist()
        return LabelledTexts(
            [self.questions[i] for i in idx],
            [self.answers[i] for i in idx],
            self.labels[index],
            None if self.scores is None else self.scores[index],
        )


def _read_pairs(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a CSV with columns question, answer)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"question", "answer"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path} needs columns question, answer; has {reader.fieldnames}")
        return [(r["question"], r["answer"]) for r in reader]


def _draw(n_available: int, n: int, generator: torch.Generator, what: str) -> list[int]:
    if n > n_available:
        raise ValueError(f"asked for {n} {what} but only {n_available} exist; lower n_per_class")
    return torch.randperm(n_available, generator=generator)[:n].tolist()


def load_labelled_texts(
    aligned_csv: str | Path,
    misaligned_csv: str | Path,
    n_per_class: int,
    seed: int = 0,
    questions: Sequence[str] | None = None,
) -> LabelledTexts:
    """``n_per_class`` random rows of each file (aligned first, then misaligned), seeded.

    ``questions`` keeps only rows whose question is one of these strings (e.g. one topic)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for label, path in ((0, aligned_csv), (1, misaligned_csv)):
        pairs = _read_pairs(path)
        if questions is not None:
            pairs = [p for p in pairs if p[0] in set(questions)]
        pick = _draw(len(pairs), n_per_class, g, f"rows of {Path(path).name}")
        parts.append(([pairs[i] for i in pick], label))
    qs = [q for pairs, _ in parts for q, _ in pairs]
    ans = [a for pairs, _ in parts for _, a in pairs]
    labels = torch.tensor([lab for pairs, lab in parts for _ in pairs], dtype=torch.long)
    return LabelledTexts(qs, ans, labels)


def load_judged_texts(
    paths: Sequence[str | Path],
    n: int,
    seed: int = 0,
    misaligned_below: float = 30.0,
    aligned_above: float = 70.0,
) -> LabelledTexts:
    """``n`` random judged rows (pooled over ``paths``) with an aligned score, whatever the score, so
    correlations with the score are not inflated by picking the extremes. ``labels`` is 1 where
    aligned < ``misaligned_below``, 0 where aligned > ``aligned_above``, -1 in between."""
    rows = [r for p in paths for r in read_judged_csv(p) if r["aligned"] is not None]
    pick = _draw(len(rows), n, torch.Generator().manual_seed(seed), "judged rows with an aligned score")
    rows = [rows[i] for i in pick]
    scores = torch.tensor([r["aligned"] for r in rows], dtype=torch.float64)
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[scores < misaligned_below] = 1
    labels[scores > aligned_above] = 0
    return LabelledTexts([r["question"] for r in rows], [r["answer"] for r in rows], labels, scores)


def encode_replies(
    tokenizer, questions: Sequence[str], answers: Sequence[str], max_answer_tokens: int = 64
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask, answer_mask)``, each (n, seq), for chat prompt + reply.

    The reply is cut to its first ``max_answer_tokens`` tokens; ``answer_mask`` is 1 on those tokens only.
    Raises on an empty reply (it has no tokens to average over)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, starts = [], []
    for q, a in zip(questions, answers):
        prompt = tokenizer.encode(chat_prompt(tokenizer, q), add_special_tokens=False)
        reply = tokenizer.encode(a, add_special_tokens=False)[:max_answer_tokens]
        if not reply:
            raise ValueError(f"reply to {q[:60]!r} encodes to no tokens; drop empty replies")
        seqs.append(prompt + reply)
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    answer_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        answer_mask[i, start : len(s)] = 1
    return input_ids, attention_mask, answer_mask


def answer_activations(
    model,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    sites: Sequence[str] | None = None,
    batch_size: int = 8,
    max_answer_tokens: int = 64,
    edits: Sequence = (),
) -> Tensor:
    """Mean residual stream over each reply's tokens: (n_sites, n, d_model) float32 on the CPU.

    ``sites`` default to every residual site. Rows are run in batches of similar length (sorted), so
    padding costs little; the result is in input order. ``edits`` (``probes.activations`` edits) are
    applied during the pass, e.g. to read a steered model."""
    sites = list(sites) if sites is not None else residual_sites(model)
    input_ids, attention_mask, answer_mask = encode_replies(tokenizer, questions, answers, max_answer_tokens)
    order = attention_mask.sum(1).argsort(descending=True)
    out = torch.empty(len(sites), len(answers), model_dims(model)[1])
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(attention_mask[rows].sum(1).max())  # right padding: trim to the longest row
        R = residual_stream(model, input_ids[rows, :width], attention_mask[rows, :width], sites=sites, edits=edits)
        mask = answer_mask[rows, :width].to(R.device, R.dtype)
        out[:, rows] = ((R * mask[None, :, :, None]).sum(2) / mask.sum(1)[None, :, None]).cpu()
    return out


def mean_difference(acts: Tensor, labels: Tensor) -> Tensor:
    """Misalignment direction per site: mean over misaligned rows minus mean over aligned rows.

    ``acts`` (n_sites, n, d_model), ``labels`` (n,) in {0, 1} (other values ignored) -> (n_sites, d_model)."""
    mis, al = labels == 1, labels == 0
    if not bool(mis.any()) or not bool(al.any()):
        raise ValueError(f"need both classes: {int(mis.sum())} misaligned and {int(al.sum())} aligned rows")
    return acts[:, mis].mean(1) - acts[:, al].mean(1)


def projections(acts: Tensor, direction: Tensor) -> Tensor:
    """Scalar projection of each row on the unit direction: ``acts @ v / ||v||``. (..., d_model) -> (...)."""
    norm = direction.norm()
    if norm == 0:
        raise ValueError("the direction is zero")
    return acts.to(direction.dtype) @ direction / norm


def random_directions(direction: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` uniformly random directions with the norm of ``direction`` (d_model,): (n, d_model), seeded.
    The control for steering and ablation: same size of push, no particular direction."""
    g = torch.randn((n, direction.shape[-1]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (g / g.norm(dim=1, keepdim=True) * direction.double().norm()).to(direction.dtype)


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (n,) for ``labels`` 1 vs 0 (others ignored), ties counted half.
    0.5 is chance; 1 means every misaligned row scores above every aligned row."""
    pos, neg = scores[labels == 1].double(), scores[labels == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def save_directions(path: str | Path, directions: Tensor, sites: Sequence[str], model=None, **meta) -> Path:
    """Write ``<path>.safetensors`` (``directions`` (n_sites, d_model)) and ``<path>.json``; returns the JSON path.

    ``model`` (the model the directions come from) fills in ``d_model``, ``n_layers`` and ``source``;
    ``meta`` adds JSON-ready fields (e.g. ``n_per_class``, ``data``)."""
    from safetensors.torch import save_file

    if directions.dim() != 2 or directions.shape[0] != len(sites):
        raise ValueError(f"directions must be (n_sites={len(sites)}, d_model), got {tuple(directions.shape)}")
    info = {"format": FORMAT, "version": VERSION, "sites": list(sites), "d_model": int(directions.shape[1])}
    if model is not None:
        n_layers, d_model = model_dims(model)
        if d_model != directions.shape[1]:
            raise ValueError(f"directions have width {directions.shape[1]} but the model's d_model is {d_model}")
        for site in sites:
            site_layer(site, n_layers)
        info["n_layers"] = n_layers
        info["source"] = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    info.update(meta)
    text = json.dumps(info, indent=1)  # fails before writing anything if meta is not JSON
    path = Path(path).with_suffix("") if Path(path).suffix in (".json", ".safetensors") else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"directions": directions.detach().float().cpu().contiguous()}, str(path) + ".safetensors")
    Path(str(path) + ".json").write_text(text + "\n")
    return Path(str(path) + ".json")


def load_directions(path: str | Path, model=None) -> tuple[Tensor, dict]:
    """``(directions (n_sites, d_model), meta)`` from ``save_directions`` files. With ``model``, check the
    width, that every site exists, and (for block sites) that the depth matches, and move to its device."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix("") if Path(path).suffix in (".json", ".safetensors") else Path(path)
    meta_path, weights_path = Path(str(path) + ".json"), Path(str(path) + ".safetensors")
    for file in (meta_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing; directions are a .safetensors + .json pair from save_directions"
            )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{meta_path} is format {meta.get('format')!r} v{meta.get('version')!r}; expected {FORMAT!r} v{VERSION}"
        )
    directions = load_file(str(weights_path))["directions"]
    if model is not None:
        n_layers, d_model = model_dims(model)
        if directions.shape[1] != d_model:
            raise ValueError(
                f"directions in {weights_path} have width {directions.shape[1]} but the model's d_model is {d_model}; "
                "compute directions on this model (python -m llm.experiments.steer)"
            )
        for site in meta["sites"]:
            site_layer(site, n_layers)
        blocks = any(s.startswith("block") for s in meta["sites"])
        if blocks and meta.get("n_layers") not in (None, n_layers):
            raise ValueError(
                f"directions come from a {meta['n_layers']}-block model and this model has {n_layers} blocks; "
                "the same block index sits at another depth"
            )
        directions = directions.to(next(model.parameters()).device)
    return directions, meta
