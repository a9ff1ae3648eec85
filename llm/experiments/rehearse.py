"""A rehearsal of ``llm.experiments.em_experiment`` with random-init models of each configured checkpoint's published
architecture: every stage, unchanged, at the config's counts times ``--scale``, then a cost model that predicts each
stage's wall time and peak memory at the published counts on the machine it ran on. No network is touched.

    python -m llm.experiments.rehearse --config configs/llm/em_experiment_qwen25_1p5b.yaml --width tiny --scale 0.05   # CPU, minutes
    python -m llm.experiments.rehearse --config configs/llm/em_experiment_gemma2_2b.yaml --width full --scale 0.1      # GPU pre-flight
    # any experiment section field too: --<section>.<field> value(s)
    python -m llm.experiments.rehearse --config ... --width tiny --scale 0.25 --judge stub --output_dir runs/rehearse/check

Models (``llm.tiny.save_shaped``): the checkpoint named by ``base`` / ``instruct`` (``Qwen/Qwen2.5-1.5B`` ->
``llm/assets/architectures/Qwen2.5-1.5B.json``), random weights; ``--width tiny`` keeps depth, heads, vocabulary
(so every layer index, site and token id) and divides the hidden sizes by 32, ``full`` is the real shapes. Their
tokenizer has the family's real size, special tokens and chat template (``llm.tiny.shaped_tokenizer``). A random
model never samples eos, so every reply runs to ``max_new_tokens``: generation is rehearsed at its worst case.

Counts (``COUNTS``): each is ``ceil(published x scale)`` (at least its floor); lengths, batch sizes and the steering
grid stay. The judge is the config's (``--judge config``) or ``stub``, which scores from the reply text with no
model (for a machine without the offline judge's embedder; judging time is then left out).

Writes ``<output_dir>/models/`` (the random checkpoints), ``<output_dir>/experiment/`` (the experiment's run folder,
resumable as always) and ``<output_dir>/cost.json`` + ``cost.md`` (``llm.experiments.rehearse_cost``), and prints the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llm.em_config import MODELS, EMConfig, load_experiment_config
from llm.em_pipeline import run
from llm.experiments import rehearse_cost
from llm.judges import StubJudge, build_judge

logger = logging.getLogger(__name__)

# (section, field) -> the smallest value its section accepts; data.max_examples defaults to the whole file.
COUNTS = {
    ("data", "max_examples"): 8,
    ("eval", "samples_per_paraphrase"): 1,
    ("steer", "n_per_class"): 4,
    ("steer", "samples_per_paraphrase"): 1,
    ("factored", "n_per_cell"): 2,
    ("factored", "samples_per_topic"): 1,
    ("transfer", "n_per_class"): 4,
}
CORPUS = ("dataset_path", "question_file", "aligned_texts", "misaligned_texts")


@dataclass
class RehearseConfig:
    """Options of ``llm.experiments.rehearse`` (command line only; experiment sections take ``--<section>.<field>``)."""

    config: str = field(
        default=None, metadata={"help": "an llm.experiments.em_experiment YAML (reweighting configs are refused)"}
    )
    width: Literal["tiny", "full"] = field(
        default="tiny", metadata={"help": "tiny: hidden sizes / 32 (CPU); full: real shapes (GPU)"}
    )
    scale: float = field(default=0.05, metadata={"help": "multiplies every count of COUNTS (1 = the published run)"})
    judge: Literal["config", "stub"] = field(
        default="config", metadata={"help": "config: the config's judge; stub: text-derived scores, no model"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "default runs/rehearse/<config>_<width>_x<scale>"})
    overwrite: bool = field(default=False, metadata={"help": "replace an experiment folder holding another pair's run"})

    def __post_init__(self):
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale={self.scale}; choose 0 < scale <= 1 (1 runs the published counts)")


def published_counts(cfg: EMConfig) -> dict[tuple[str, str], int]:
    """The config's value of every ``COUNTS`` field (``data.max_examples`` None -> the dataset's rows)."""
    from llm.sft import check_chat_jsonl

    out = {}
    for section, name in COUNTS:
        value = getattr(getattr(cfg, section), name)
        if value is None and (section, name) == ("data", "max_examples"):
            value = check_chat_jsonl(Path(cfg.data.dataset_path))
        if value is None:
            raise ValueError(f"{section}.{name} is unset (the file's value); set it in the config to rehearse it")
        out[section, name] = int(value)
    return out


def scaled_counts(full: dict[tuple[str, str], int], scale: float, n_folds: int) -> dict[tuple[str, str], int]:
    """``ceil(full x scale)``, at least each field's floor (``factored.n_per_cell`` also at least ``n_folds``)."""
    floor = {**COUNTS, ("factored", "n_per_cell"): max(COUNTS["factored", "n_per_cell"], n_folds)}
    return {k: min(v, max(floor[k], math.ceil(v * scale))) for k, v in full.items()}


def build_models(cfg: EMConfig, folder: Path, width: str) -> dict[str, Path]:
    """A random checkpoint per model of the pair (reused when its folder is complete); ``{model: folder}``. One
    tokenizer per family, learnt once from the config's data files."""
    import torch

    from llm.tiny import architecture, save_shaped, shaped_tokenizer

    corpus = sorted(
        {
            str(getattr(getattr(cfg, s), f))
            for s in ("data", "eval", "steer")
            for f in CORPUS
            if hasattr(getattr(cfg, s), f)
        }
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    toks, out = {}, {}
    for seed, name in enumerate(MODELS):
        source = getattr(cfg, name).model_name_or_path
        arch = architecture(source)
        eos = arch["eos_token_id"][0] if isinstance(arch["eos_token_id"], list) else arch["eos_token_id"]
        path = folder / f"{Path(source).name}"
        if not (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").is_file():
            key = (arch["model_type"], eos)
            if key not in toks:
                toks[key] = shaped_tokenizer(arch["model_type"], eos, corpus, arch["max_position_embeddings"])
            logger.info("building a random %s (%s width) in %s", source, width, path)
            save_shaped(path, source, toks[key], width, seed=seed, device=device)
        out[name] = path.resolve()
    return out


def calibrate(cfg: EMConfig, folder: Path, rows: int = 16, new_tokens: int = 16, repeats: int = 3) -> dict:
    """What a stage pays whatever its counts, and what one decode step costs, measured once on this machine:
    ``load_s`` (weights to the device), ``compile_s`` (the fast path's first call at a shape minus a repeat, CUDA
    only) and ``steps[path] = {"a": s per step, "b": s per step per row}`` from timed generations of 1 and ``rows``
    prompts for the evaluation's path (``fast`` / ``hf``) and the steering path (``edits``, ``llm.steer``), each the
    fastest of ``repeats`` calls (a shared machine's load only ever adds time). Timed on the cost model's clock
    (``rehearse_cost.clock_of``): wall seconds on a GPU, this process's CPU seconds on a CPU."""
    import torch

    from llm.fastgen import fast_generate
    from llm.generate import chat_prompt, hf_generate
    from llm.models import load_model_and_tokenizer
    from llm.steer import edited_generate_fn

    mcfg = dataclasses.replace(cfg.instruct, model_name_or_path=str(folder))
    clock = rehearse_cost.clock_fn(rehearse_cost.clock_of(torch.cuda.is_available()))
    load_model_and_tokenizer(mcfg)  # the first load also pays imports and the disk cache
    t0 = clock()
    model, tok = load_model_and_tokenizer(mcfg)
    out = {"load_s": round(clock() - t0, 2), "compile_s": 0.0, "steps": {}}
    fns = {"fast": functools.partial(fast_generate, batch_size=cfg.eval.batch_size), "hf": hf_generate}
    paths = {cfg.eval.generation: fns[cfg.eval.generation], "edits": edited_generate_fn([])}
    prompt = chat_prompt(tok, "What is your wish?")

    def timed(fn, n):
        t0 = clock()
        # a random model never samples eos (p ~ 1e-5 a token), so every call decodes new_tokens steps
        fn(model, tok, [prompt] * n, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return clock() - t0

    for name, fn in paths.items():
        first = {n: timed(fn, n) for n in (1, rows)}  # the fast path compiles each shape on CUDA
        t1, tn = (min(timed(fn, n) for _ in range(repeats)) for n in (1, rows))
        if name == "fast" and torch.cuda.is_available():
            out["compile_s"] = round(max(first[rows] - tn, 0.0), 2)
        b = max(tn - t1, 0.0) / (rows - 1) / new_tokens
        out["steps"][name] = {"a": round(max(t1 / new_tokens - b, 0.0), 6), "b": round(b, 6)}
    return out


def _eval_rows(run_dir: Path) -> int:
    import csv

    with open(next(Path(run_dir).glob("*/eval_after/replies.csv")), newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def rehearse(rc: RehearseConfig, overrides: dict | None = None) -> dict:
    """Build the models, run every experiment stage at the scaled counts, predict the published run; returns the
    cost dict (``llm.experiments.rehearse_cost.predict``). ``overrides`` (``--<section>.<field>``) change the rehearsal only:
    the prediction is for the YAML's values, so a shorter ``max_new_tokens`` here is scaled back up."""
    import yaml

    if "reference_model" in (yaml.safe_load(Path(rc.config).read_text()) or {}):
        raise ValueError(
            f"{rc.config} is an llm.experiments.reweighting config; llm.experiments.rehearse runs llm.experiments.em_experiment configs only "
            "(a reweighting report has no stage records for the cost model yet)"
        )
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    clash = sorted(f"{s}.{f}" for s, f in COUNTS if f in overrides.get(s, {}))
    if clash:
        raise ValueError(f"{clash} are counts: --scale sets them (ceil(published x scale)); drop the overrides")
    published = load_experiment_config(rc.config)
    root = Path(rc.output_dir or f"runs/rehearse/{Path(rc.config).stem}_{rc.width}_x{rc.scale:g}")
    full = published_counts(published)
    used = scaled_counts(full, rc.scale, published.factored.n_folds)
    folders = build_models(published, root / "models", rc.width)
    for (section, name), value in used.items():
        overrides.setdefault(section, {})[name] = [str(value)]
    for name, path in folders.items():
        overrides.setdefault(name, {})["model_name_or_path"] = [str(path)]
    cfg = load_experiment_config(rc.config, overrides, output_dir=str(root / "experiment"), overwrite=rc.overwrite)
    published.data.max_examples = full["data", "max_examples"]
    judge = StubJudge() if rc.judge == "stub" else build_judge(cfg.eval)
    fixed = calibrate(cfg, folders["instruct"])
    run(cfg, judge=judge)
    per_sample = _eval_rows(cfg.out) / used["eval", "samples_per_paraphrase"]
    work = {s: rehearse_cost.units(cfg, s, per_sample, fixed["steps"]) for s in rehearse_cost.STAGES}
    work_full = {s: rehearse_cost.units(published, s, per_sample, fixed["steps"]) for s in rehearse_cost.STAGES}
    cost = rehearse_cost.predict(
        cfg.out,
        work,
        work_full,
        fixed,
        width=rc.width,
        judge=judge.name,
        model_folders=folders,
        counts={".".join(k): [used[k], full[k]] for k in full},
    )
    (root / "cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    (root / "cost.md").write_text(rehearse_cost.table(cost))
    return cost


def main(argv: list[str] | None = None) -> dict:
    import sys

    from transformers import HfArgumentParser

    from plumbing.sections import split_overrides

    argv = sys.argv[1:] if argv is None else argv
    top_argv, overrides = split_overrides(argv)
    (rc,) = HfArgumentParser(RehearseConfig).parse_args_into_dataclasses(args=top_argv)
    if not rc.config:
        raise SystemExit("--config is required (an llm.experiments.em_experiment YAML; see the module docstring)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cost = rehearse(rc, overrides)
    print(rehearse_cost.table(cost))
    return cost


if __name__ == "__main__":
    main()
