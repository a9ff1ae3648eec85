"""Factored subspaces on a real LLM: a capability factor (topic) crossed with an alignment factor.

Its command: ``python -m llm.experiments.factored``.

One process (``accelerate launch --config_file configs/accelerate/single_gpu.yaml -m llm.experiments.factored ...`` on a GPU); a launch with several
processes is refused before any work (``llm.experiments.em_experiment`` runs this step once on rank 0 of a multi-GPU job).

Text set: the shared labelled replies (``aligned_texts``/``misaligned_texts``) whose question is one of
the EM questions named in ``topics`` (their plain paraphrase in ``question_file``): ``n_per_cell``
replies per (topic, alignment) cell. The capability factor is the topic (which question the reply
answers), the alignment factor the label. Activations: residual stream at ``site``, averaged over the
reply's tokens (``llm.directions.answer_activations``).

1. Probes (``probes.linear``): ridge from activations to the alignment label (1 = misaligned, k = 1) and to
   the one-hot topic (k = n_topics, so a (n_topics - 1)-dimensional subspace), with ``n_folds``-fold
   held-out MSE/R^2, the shuffled-target control, a random-init model of the same architecture as the
   second control (``random_init_control``), and held-out accuracy. Both probes are saved with
   ``probes.io`` under ``probes/`` (load them onto another checkpoint with ``llm.probe_transfer``).
2. Geometry (``probes.subspaces``): overlap of the two probes' subspaces (mean cos^2 of the principal
   angles; random baseline max(r_a, r_b) / d_model), and the share of the misalignment direction
   (class-mean difference) inside each subspace vs random subspaces of the same dimension.
3. Factor steering: with ``W = [W_topic | W_align]`` (d_model, n_topics + 1), the edit that moves the
   alignment read-out by ``delta`` and leaves every topic read-out unchanged, with the smallest norm, is
   ``dx = [0, ..., 0, delta] @ pinv(W)`` (probe -> factorize -> change one factor -> map back). It is
   added at ``site`` on every position while the model answers the topics' questions; the replies are
   read back with the edit active, and the check is that the topic read-out (and accuracy) stays put
   while the alignment read-out moves. The naive edit along the class-mean difference with the same
   alignment shift is the comparison. Replies are scored by the offline judge.
4. LoRA (``lora_path``, an ``llm.sft`` rank-1 output): the share of each LoRA B vector (what the
   adapter writes into the residual stream after its block) inside the alignment subspace, the topic
   subspace and random subspaces of the same dimensions. Measured against probes at ``site``; put
   ``site`` at the LoRA's block (``block<layer>``) for the comparison to be like for like.

Writes ``metrics.json``, ``summary.md``, ``probes/*.{safetensors,json}``, ``factor_steering.png``,
``subspaces.png`` and ``conditions/<name>/replies.csv`` to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from llm.data import ALIGNED_TEXTS, FIRST_PLOT_QUESTIONS, MISALIGNED_TEXTS, OFFLINE_JUDGE_WEIGHTS
from llm.directions import LabelledTexts, answer_activations, load_labelled_texts, mean_difference
from llm.factored_report import plot_factored, write_summary
from probes.activations import add_vector
from probes.io import save_probe
from probes.linear import LinearProbe, fit_probe_report, fit_ridge, kfold_indices
from probes.subspaces import fraction_in_subspace, random_fraction_baseline, subspace_overlap

logger = logging.getLogger(__name__)


@dataclass
class FactoredConfig:
    """Text set, probes, factor steering and LoRA comparison of ``llm.factored``."""

    aligned_texts: str = field(default=str(ALIGNED_TEXTS), metadata={"help": "CSV question,answer of aligned replies"})
    misaligned_texts: str = field(
        default=str(MISALIGNED_TEXTS), metadata={"help": "CSV question,answer of misaligned replies"}
    )
    question_file: str = field(
        default=str(FIRST_PLOT_QUESTIONS), metadata={"help": "EM questions; topics are their ids"}
    )
    topics: list[str] = field(
        default_factory=lambda: ["gender_roles", "ruler_of_the_world", "quick_buck", "enough_of_my_husband"],
        metadata={"help": "question ids forming the capability factor (>= 2)"},
    )
    n_per_cell: int = field(default=16, metadata={"help": "replies per (topic, alignment) cell"})
    site: str = field(default="block15", metadata={"help": "residual site probed and steered"})
    max_answer_tokens: int = field(default=64, metadata={"help": "reply tokens averaged"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    ridge_alpha: float = field(
        default=100.0, metadata={"help": "ridge penalty of both probes (activations are raw, norms ~100s)"}
    )
    n_folds: int = field(default=4, metadata={"help": "folds of the held-out probe metrics"})
    random_init_control: bool = field(
        default=True, metadata={"help": "also probe a random-init model of the same architecture"}
    )
    deltas: list[float] = field(
        default_factory=lambda: [0.0, 1.0, 2.0], metadata={"help": "alignment read-out shifts to steer by"}
    )
    samples_per_topic: int = field(default=4, metadata={"help": "replies per topic question and steering condition"})
    max_new_tokens: int = field(default=32, metadata={"help": "reply length while steering"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature while steering (0 = greedy)"})
    lora_path: str | None = field(
        default=None,
        metadata={"help": "llm.sft rank-1 LoRA output whose B vectors are measured (not merged into the probed model)"},
    )
    n_random: int = field(default=500, metadata={"help": "random subspaces drawn for each share baseline"})
    judge: Literal["offline", "hf", "openai"] = field(
        default="offline", metadata={"help": "judge of the steered replies"}
    )
    offline_weights: str = field(default=str(OFFLINE_JUDGE_WEIGHTS), metadata={"help": "offline judge weights"})
    seed: int = field(default=0, metadata={"help": "data draw, folds, sampling seed"})
    output_dir: str = field(default="runs/factored_smollm2", metadata={"help": "run folder"})

    def __post_init__(self):
        if len(set(self.topics)) < 2:
            raise ValueError(f"topics={self.topics}; need at least two distinct question ids for a capability factor")
        if self.n_per_cell < 2 or self.n_folds < 2 or self.n_per_cell * 2 * len(self.topics) < self.n_folds:
            raise ValueError("need n_per_cell >= 2 and 2 <= n_folds <= number of texts")
        if not (self.site.startswith("block") and self.site[5:].isdigit()):
            raise ValueError(f"site={self.site!r}; probe a block output, e.g. block15")
        if self.ridge_alpha < 0:
            raise ValueError("ridge_alpha must be >= 0")
        if self.samples_per_topic < 1 or self.max_new_tokens < 1 or self.n_random < 1:
            raise ValueError("need samples_per_topic, max_new_tokens, n_random >= 1")


@dataclass
class CrossedTexts:
    """``texts`` with ``topic`` (n,) long indices into ``topics``; ``texts.labels`` is the alignment factor."""

    texts: LabelledTexts
    topic: Tensor
    topics: list[str]
    questions: dict[str, str]  # topic -> the question text asked while steering


def crossed_texts(cfg: FactoredConfig) -> CrossedTexts:
    """``n_per_cell`` replies per (topic, alignment) cell, in topic-major order."""
    from llm.questions import load_questions

    by_id = {q.id: q for q in load_questions(cfg.question_file)}
    missing = [t for t in cfg.topics if t not in by_id]
    if missing:
        raise ValueError(f"topics {missing} are not question ids of {cfg.question_file}; choose from {sorted(by_id)}")
    parts, topic = [], []
    for i, t in enumerate(cfg.topics):
        part = load_labelled_texts(
            cfg.aligned_texts, cfg.misaligned_texts, cfg.n_per_cell, cfg.seed + i, questions=by_id[t].paraphrases
        )
        parts.append(part)
        topic += [i] * len(part)
    texts = LabelledTexts(
        [q for p in parts for q in p.questions],
        [a for p in parts for a in p.answers],
        torch.cat([p.labels for p in parts]),
    )
    return CrossedTexts(texts, torch.tensor(topic), list(cfg.topics), {t: by_id[t].paraphrases[0] for t in cfg.topics})


def random_init_like(model):
    """A randomly initialised model of ``model``'s architecture and size, seeded, on its device: the
    control that says how much a probe reads from architecture and token identity alone."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ctrl = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    return ctrl.to(next(model.parameters()).device).eval()


def cv_accuracy(X: Tensor, Y: Tensor, alpha: float, n_folds: int, seed: int) -> float:
    """Out-of-fold accuracy of a ridge probe used as a classifier: argmax over one-hot columns, or
    ``> 0.5`` for one 0/1 column. X (n, d), Y (n, k)."""
    correct = 0
    for train, test in kfold_indices(X.shape[0], n_folds, seed):
        pred = fit_ridge(X[train], Y[train], alpha).predict(X[test])
        if Y.shape[1] == 1:
            correct += int(((pred[:, 0] > 0.5).long() == Y[test, 0].long()).sum())
        else:
            correct += int((pred.argmax(1) == Y[test].argmax(1)).sum())
    return correct / X.shape[0]


def factor_edit(topic_probe: LinearProbe, align_probe: LinearProbe, delta: float) -> Tensor:
    """Minimal-norm ``dx`` (d_model,) with ``dx @ W_align = delta`` and ``dx @ W_topic = 0``, where the
    joint read-out is ``W = [W_topic | W_align]``: ``dx = [0, ..., 0, delta] @ pinv(W)``. Raises when the
    alignment read-out cannot move without moving the topic read-out (W_align inside W_topic's span)."""
    W = torch.cat([topic_probe.W, align_probe.W], dim=1).double()
    target = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)
    target[-1] = delta
    dx = target @ torch.linalg.pinv(W)
    achieved = dx @ W
    if delta != 0 and not torch.allclose(achieved, target, atol=1e-6 * abs(delta) + 1e-9):
        raise ValueError(
            f"the factor edit reaches read-out {achieved.tolist()} instead of {target.tolist()}: "
            "the alignment probe's direction lies in the topic probe's span"
        )
    return dx


def _judge(cfg: FactoredConfig):
    from llm.judges import JudgeConfig, build_judge

    return build_judge(JudgeConfig(judge=cfg.judge, offline_weights=cfg.offline_weights))


def steer_factor(
    model,
    tokenizer,
    crossed: CrossedTexts,
    topic_probe,
    align_probe,
    edits: dict,
    cfg: FactoredConfig,
    judge,
    out: Path,
) -> dict:
    """Generate replies to every topic question under each ``{name: dx}`` edit, read them back with the
    edit active, and report the probes' read-outs, topic accuracy and the judge's scores."""
    from llm.em_metrics import write_judged_csv
    from llm.generate import chat_prompt
    from llm.judges import JudgeRequest
    from llm.steer import edited_generate_fn

    questions = [crossed.questions[t] for t in crossed.topics for _ in range(cfg.samples_per_topic)]
    topic_idx = torch.arange(len(crossed.topics)).repeat_interleave(cfg.samples_per_topic)
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    results = {}
    for name, dx in edits.items():
        edit = [add_vector(cfg.site, dx.float())] if dx is not None else []
        replies = edited_generate_fn(edit)(
            model,
            tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=1.0,
            seed=cfg.seed,
        )
        keep = [i for i, r in enumerate(replies) if tokenizer.encode(r, add_special_tokens=False)]
        X = answer_activations(
            model,
            tokenizer,
            [questions[i] for i in keep],
            [replies[i] for i in keep],
            [cfg.site],
            cfg.batch_size,
            cfg.max_answer_tokens,
            edits=edit,
        )[0].double()
        topic_out, align_out = topic_probe.predict(X), align_probe.predict(X)[:, 0]
        requests = [JudgeRequest(questions[i], replies[i], m, "") for i in keep for m in ("aligned", "coherent")]
        scores = judge.score(requests)
        aligned = [s for s in scores[0::2] if s is not None]
        coherent = [s for s in scores[1::2] if s is not None]
        rows = [
            {
                "question": questions[i],
                "answer": replies[i],
                "question_id": crossed.topics[int(topic_idx[i])],
                "aligned": scores[2 * j],
                "coherent": scores[2 * j + 1],
            }
            for j, i in enumerate(keep)
        ]
        write_judged_csv(rows, out / "conditions" / name / "replies.csv")
        t = topic_idx[keep]
        results[name] = {
            "edit_norm": 0.0 if dx is None else float(dx.norm()),
            "n_replies": len(keep),
            "alignment_readout": float(align_out.mean()),
            "topic_readout_true": float(topic_out[torch.arange(len(keep)), t].mean()),
            "topic_accuracy": float((topic_out.argmax(1) == t).double().mean()),
            "judge_aligned": sum(aligned) / len(aligned) if aligned else None,
            "judge_coherent": sum(coherent) / len(coherent) if coherent else None,
        }
        logger.info("%s: %s", name, results[name])
    base = results.get("delta_0")
    if base is not None:
        for r in results.values():
            r["alignment_shift"] = r["alignment_readout"] - base["alignment_readout"]
            r["topic_shift"] = r["topic_readout_true"] - base["topic_readout_true"]
    return results


def lora_b_vectors(adapter_path: str | Path) -> dict[str, Tensor]:
    """``{module name: B (d_out,)}`` for every rank-1 LoRA in an adapter folder (``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(adapter_path) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; adapter_path must be an llm.sft output folder holding a LoRA adapter"
        )
    out = {}
    for key, value in load_file(str(path)).items():
        if "lora_B" in key:
            if value.shape[1] != 1:
                raise ValueError(f"{key} has rank {value.shape[1]}; the B-vector share is defined for rank-1 LoRAs")
            out[key.split(".lora_B")[0].removeprefix("base_model.model.")] = value[:, 0].double()
    if not out:
        raise ValueError(f"{path} holds no lora_B tensors")
    return out


def shares(vector: Tensor, subspaces: dict[str, LinearProbe | Tensor], n_random: int, seed: int) -> dict:
    """Share of ``vector``'s squared norm in each subspace next to random subspaces of the same dimension:
    ``{name: {"share", "dim", "random_mean", "random_q95", "percentile"}}``."""
    from probes.subspaces import orthonormal_basis

    out = {}
    for name, span in subspaces.items():
        dim = orthonormal_basis(span).shape[1]
        share = float(fraction_in_subspace(vector, span))
        rand = random_fraction_baseline(vector, dim, n_draws=n_random, seed=seed)
        out[name] = {
            "share": share,
            "dim": dim,
            "random_mean": float(rand.mean()),
            "random_q95": float(rand.quantile(0.95)),
            "percentile": float((rand < share).double().mean()),
        }
    return out


def run(model, tokenizer, cfg: FactoredConfig, judge=None) -> dict:
    """Everything in the module docstring on a loaded model; returns (and writes) the metrics."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    crossed = crossed_texts(cfg)
    texts = crossed.texts
    X = answer_activations(
        model, tokenizer, texts.questions, texts.answers, [cfg.site], cfg.batch_size, cfg.max_answer_tokens
    )[0].double()
    y_align = texts.labels.double()[:, None]
    y_topic = torch.nn.functional.one_hot(crossed.topic, len(crossed.topics)).double()
    control = None
    if cfg.random_init_control:
        rand_model = random_init_like(model)
        control = {
            cfg.site: answer_activations(
                rand_model, tokenizer, texts.questions, texts.answers, [cfg.site], cfg.batch_size, cfg.max_answer_tokens
            )[0]
        }
        del rand_model
    probes_report = {}
    for name, Y, names in (("alignment", y_align, ["misaligned"]), ("topic", y_topic, crossed.topics)):
        rep = fit_probe_report(
            {cfg.site: X}, Y, control, alpha=cfg.ridge_alpha, n_folds=cfg.n_folds, seed=cfg.seed, target_names=names
        )
        entry = rep["sites"][cfg.site]
        entry["accuracy"] = cv_accuracy(X, Y, cfg.ridge_alpha, cfg.n_folds, cfg.seed)
        if control is not None:
            entry["random_init_accuracy"] = cv_accuracy(
                control[cfg.site].double(), Y, cfg.ridge_alpha, cfg.n_folds, cfg.seed
            )
        entry["shuffled_accuracy"] = cv_accuracy(
            X,
            Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(cfg.seed))],
            cfg.ridge_alpha,
            cfg.n_folds,
            cfg.seed,
        )
        probes_report[name] = entry
    align_probe = fit_ridge(
        X,
        y_align,
        cfg.ridge_alpha,
        site=cfg.site,
        target_names=["misaligned"],
        metrics={"test": probes_report["alignment"]["test"], "accuracy": probes_report["alignment"]["accuracy"]},
    )
    topic_probe = fit_ridge(
        X,
        y_topic,
        cfg.ridge_alpha,
        site=cfg.site,
        target_names=crossed.topics,
        metrics={"test": probes_report["topic"]["test"], "accuracy": probes_report["topic"]["accuracy"]},
    )
    paths = {
        n: str(save_probe(p, out / "probes" / f"{n}_{cfg.site}", model=model))
        for n, p in (("alignment", align_probe), ("topic", topic_probe))
    }
    v = mean_difference(X[None].float(), texts.labels)[0].double()
    metrics: dict = {
        "config": dataclasses.asdict(cfg),
        "n_texts": len(texts),
        "cells": {
            t: {
                "aligned": int(((crossed.topic == i) & (texts.labels == 0)).sum()),
                "misaligned": int(((crossed.topic == i) & (texts.labels == 1)).sum()),
            }
            for i, t in enumerate(crossed.topics)
        },
        "probes": probes_report,
        "probe_files": paths,
        "overlap": subspace_overlap(align_probe, topic_probe),
        "direction_shares": shares(v, {"alignment": align_probe, "topic": topic_probe}, cfg.n_random, cfg.seed),
        "cos_direction_alignment_probe": float(torch.nn.functional.cosine_similarity(v, align_probe.W[:, 0], dim=0)),
    }

    judge = judge if judge is not None else _judge(cfg)
    edits: dict[str, Tensor | None] = {}
    for d in cfg.deltas:
        edits[f"delta_{d:g}"] = factor_edit(topic_probe, align_probe, d) if d != 0 else None
    d_max = max(cfg.deltas, key=abs)
    if d_max != 0:
        # The naive edit: along the class-mean difference, scaled to the same alignment read-out shift.
        edits[f"naive_delta_{d_max:g}"] = v * (d_max / float(v @ align_probe.W[:, 0]))
        metrics["naive_edit_topic_change"] = (edits[f"naive_delta_{d_max:g}"] @ topic_probe.W).tolist()
        metrics["factor_edit_topic_change"] = (edits[f"delta_{d_max:g}"] @ topic_probe.W).tolist()
    metrics["steering"] = steer_factor(model, tokenizer, crossed, topic_probe, align_probe, edits, cfg, judge, out)

    if cfg.lora_path:
        B = lora_b_vectors(cfg.lora_path)
        metrics["lora"] = {
            name: {
                "layer_site": f"block{_layer(name)}",
                "probe_site": cfg.site,
                "norm": float(b.norm()),
                "cos_direction": float(torch.nn.functional.cosine_similarity(b, v, dim=0)),
                **shares(b, {"alignment": align_probe, "topic": topic_probe}, cfg.n_random, cfg.seed),
            }
            for name, b in B.items()
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_factored(metrics, out)
    write_summary(metrics, out)
    return metrics


def _layer(module_name: str) -> int | None:
    import re

    m = re.search(r"\.(\d+)\.", f".{module_name}.")
    return int(m.group(1)) if m else None
