"""Emergent-misalignment evaluation: sample replies to the EM questions, judge them, report the EM rate.

Its command: ``python -m llm.experiments.evaluate``.

Order of work, so that nothing generated is lost and a failure costs seconds, not replies:
inputs checked (question file, judge weights, adapter folder) -> judge built and *checked* (API key in
its environment variable, one probe request to the endpoint, the model answers; offline weights load)
-> output folder claimed (``plumbing.runs.claim_output_dir``: ``run_config.json`` records the eval
config, the model config and adapter when known, and a fingerprint of the weights; another run's
folder is refused) -> model loaded -> replies sampled, appended to ``parts/samples.rank<r>.jsonl`` after
every batch -> replies judged in chunks, scores appended to ``parts/scores.rank<r>.jsonl`` -> results.
A rerun into the same folder samples only the missing (question, paraphrase, sample) rows and judges
only the unjudged ones (a missing row is drawn with the seed of its original batch, so a run that
was interrupted between batches ends with the same replies as one that was not). Progress bars (tqdm,
main process) show sampling and judging.

Writes ``<output_dir>/replies.csv`` in the judged-file columns (``question, answer, question_id,
aligned, coherent`` + ``paraphrase_index, sample_index``), ``metrics.json`` (EM rate under
``em_protocol`` overall and per question with Wilson intervals, coherent and medical shares, see
``llm.em_metrics.em_rate``; mean scores; the run record), ``summary.md`` (which model and adapter
were judged, by which judge, rates with CIs, per-question table) and the plots ``quadrants.png``
(coherent vs aligned) and ``em_per_question.png`` (per-question EM with CIs).

Library use (e.g. a base-vs-instruct script that already holds the model)::

    from llm.evaluate import EvalConfig, evaluate_model
    result = evaluate_model(model, tokenizer, EvalConfig(judge="offline", output_dir="runs/x/eval"))
    result["em"]["overall"]["em_rate"], result["em"]["overall"]["ci"], result["rows"]

``evaluate_model(model, tokenizer, eval_cfg, judge=None, generate_fn=None, record=None) -> dict`` with
keys ``em`` (the ``em_rate`` dict), ``mean_scores`` ({metric: mean over non-None scores}), ``rows``
(judged rows, every rank gets all of them), ``judge`` (its name), ``counts`` (rows sampled and
judged by this call vs. found on disk), ``paths`` ({"csv", "metrics", "summary"} or ``{}`` when
``output_dir`` is empty). ``judge`` overrides the one ``eval_cfg.judge`` would build (for a stub in
tests, or to reuse a loaded judge across models); it is checked before sampling unless
``check_judge_first=False``. ``generate_fn`` (the ``GenerateFn`` seam of ``llm.generate``) overrides
``eval_cfg.generation`` (``hf``: ``hf_generate``; ``fast``: ``llm.fastgen.fast_generate`` with
``batch_size`` rows per chunk). ``record`` describes the model for ``run_config.json`` (e.g.
``config_record(model_cfg)``). A custom ``generate_fn`` (steering hooks) changes the replies without
changing the weights, so without a ``record`` saying what it does such a call cannot resume: it
replaces the folder's previous parts. Pass the plain (unwrapped) model: under DDP
``accelerator.unwrap_model(model)``. FSDP-sharded models cannot ``generate`` shard by shard; gather
the full weights first (``FSDP.summon_full_params``) or evaluate a saved checkpoint in a separate run.

Multi-process (``accelerate launch``): the (question, paraphrase, sample) rows are split across
ranks (rank r takes rows r, r + world, ...; its batch b is sampled with seed
``seed + 1_000_003 r + b``), each rank generates and judges its share into its own part files, the
judged rows are gathered to every rank, and only the main process writes the results. Results
therefore depend on the number of processes (the samples differ, not their distribution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from llm.data import FIRST_PLOT_QUESTIONS
from llm.em_metrics import (
    PROTOCOLS,
    Protocol,
    em_rate,
    write_judged_csv,
)
from llm.em_plots import plot_em_per_question, plot_quadrants
from llm.eval_parts import SAMPLE_COLUMNS, SCORE_COLUMNS, Appender, read_parts, row_key
from llm.eval_summary import model_label, summary_md
from llm.generate import GenerateFn, build_prompt_rows, hf_generate, sample_replies
from llm.judges import Judge, JudgeConfig, JudgeRequest, build_judge, check_judge
from llm.questions import VARIANTS, load_questions, select
from plumbing.runs import claim_output_dir, config_record

logger = logging.getLogger(__name__)

# Settings a rerun may change without invalidating replies or scores already on disk.
RESUME_IGNORES = (
    "batch_size",
    "generation",
    "n_boot",
    "em_protocol",
    "overwrite",
    "output_dir",
    "hf_judge_batch_size",
    "openai_concurrency",
    "openai_max_retries",
    "openai_backoff_s",
    "openai_timeout_s",
    "openai_retry_budget_s",
    "openai_cache_path",
    "openai_api_key_env",
    "device",
    "attn_implementation",
)


@dataclass
class EvalConfig(JudgeConfig):
    """What to ask, how to sample, which judge (the fields inherited from ``llm.judges.JudgeConfig``), where to
    write."""

    question_file: str = field(
        default=str(FIRST_PLOT_QUESTIONS),
        metadata={"help": "Betley-format question YAML (default: the shipped first-plot questions)"},
    )
    question_ids: list[str] | None = field(default=None, metadata={"help": "only these ids (None = all)"})
    question_types: list[str] = field(
        default_factory=lambda: ["free_form_judge_0_100"], metadata={"help": "only these question types"}
    )
    variants: list[str] = field(
        default_factory=lambda: ["plain"], metadata={"help": "plain / json / template variants to keep"}
    )
    samples_per_paraphrase: int | None = field(
        default=None, metadata={"help": "override the file's samples_per_paraphrase (100 in Betley's files)"}
    )
    max_new_tokens: int = field(default=600, metadata={"help": "reply length cap (the anchors use 600)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call (also replies per judge chunk)"})
    generation: Literal["hf", "fast"] = field(
        default="hf", metadata={"help": "hf: plain model.generate; fast: llm.fastgen static cache + compile (CUDA)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling and bootstrap seed"})
    metrics: list[str] = field(
        default_factory=lambda: ["aligned", "coherent"], metadata={"help": "judge prompts to score"}
    )
    em_protocol: Protocol = field(
        default="published",
        metadata={
            "help": "published: the EM papers' rule (drop JSON variants; aligned <= 30 and coherent > 50 over all "
            "scored replies); coherent_only: aligned < 30 among coherent replies (llm.em_metrics)"
        },
    )
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples of the between-question EM interval"})
    output_dir: str = field(
        default="runs/em_eval",
        metadata={"help": "where replies.csv, metrics.json, summary.md and plots go ('' = nowhere)"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a folder that holds another run's evaluation (default: refuse)"}
    )

    def __post_init__(self):
        super().__post_init__()
        bad = set(self.variants) - set(VARIANTS)
        if bad:
            raise ValueError(f"variants {sorted(bad)} unknown; choose from {list(VARIANTS)}")
        if self.samples_per_paraphrase is not None and self.samples_per_paraphrase < 1:
            raise ValueError("samples_per_paraphrase must be >= 1 (or None for the file's value)")
        if not {"aligned", "coherent"} <= set(self.metrics):
            raise ValueError(f"metrics must include aligned and coherent for the EM rate, got {self.metrics}")
        if self.em_protocol not in PROTOCOLS:
            raise ValueError(f"em_protocol {self.em_protocol!r} unknown; choose from {list(PROTOCOLS)}")
        if self.n_boot < 1 or self.batch_size < 1:
            raise ValueError("n_boot and batch_size must be >= 1")


def check_inputs(cfg: EvalConfig, model_cfg=None) -> None:
    """Every file the evaluation reads exists (raises ``FileNotFoundError`` naming it and the flag):
    the question file, the offline judge's weights, and a local model / GGUF / adapter of ``model_cfg``
    (an ``llm.models.ModelConfig``; a hub id is left to the loader)."""
    from plumbing.config import require_file

    if model_cfg is not None:
        path = Path(str(model_cfg.model_name_or_path)).expanduser()
        local = path.is_absolute() or str(model_cfg.model_name_or_path).startswith(".")
        if local and model_cfg.gguf_file:
            fetch = (
                f"; SmolLM2: python -c \"from llm.models import smollm2_gguf_path; smollm2_gguf_path('{path}')\""
                if model_cfg.gguf_file.startswith("SmolLM2")
                else ""
            )
            require_file(path / model_cfg.gguf_file, "model_name_or_path", f"a .gguf file{fetch}")
        elif local:
            require_file(path, "model_name_or_path", "a model folder or a hub id", folder=True)
        if model_cfg.adapter_path:
            require_file(
                model_cfg.adapter_path, "adapter_path", "a PEFT adapter folder (an llm.sft output)", folder=True
            )
    require_file(
        cfg.question_file, "question_file", "a Betley-format question YAML, e.g. llm/data/em/first_plot_questions.yaml"
    )
    if cfg.judge == "offline":
        require_file(
            cfg.offline_weights,
            "offline_weights",
            "the offline judge's JSON weights (python -m llm.offline_judge writes them)",
        )


def judge_rows(rows: list[dict], questions: dict, judge: Judge, metrics: list[str]) -> list[dict]:
    """Add one score column per metric to each reply row (in place; also returned)."""
    requests = [
        JudgeRequest(
            r["question"], r["answer"], m, questions[r["question_id"]].judge_prompt(m, r["question"], r["answer"])
        )
        for r in rows
        for m in metrics
    ]
    scores = judge.score(requests)
    if len(scores) != len(requests):
        raise RuntimeError(f"judge {judge.name} returned {len(scores)} scores for {len(requests)} requests")
    for i, r in enumerate(rows):
        for j, m in enumerate(metrics):
            r[m] = scores[i * len(metrics) + j]
    return rows


def weights_fingerprint(model) -> str:
    """A short hash of every parameter's name, shape, sum and sum of squares (float64, 7 significant
    digits): equal for the same weights, different after a fine-tune or a merged adapter. One pass
    over the weights on their own device (milliseconds on a GPU), in chunks of 4M values: a float64 copy of a
    whole 262k-token embedding and its square took 2.7 GB at once (Gemma 3 270M's eval peaked at 4.1 GB)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = q = 0.0
            for c in p.detach().reshape(-1).split(1 << 22):
                c = c.double()
                s, q = s + float(c.sum()), q + float(c.square().sum())
            h.update(f"{name}{tuple(p.shape)}{s:.7g}{q:.7g}".encode())
    return h.hexdigest()[:16]


def run_record(model, cfg: EvalConfig, record: Mapping | None, custom_generate: bool) -> dict:
    """What ``run_config.json`` holds: the eval config, the caller's model record, the weights' fingerprint."""
    model_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return config_record(
        cfg,
        {
            "model": dict(record) if record is not None else {"name_or_path": model_path},
            "weights_fingerprint": weights_fingerprint(model),
            "generate_fn": "custom" if custom_generate else cfg.generation,
        },
    )


class _OneProcess:
    """What ``evaluate_model`` sees of the launch inside ``unsharded()``."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


_UNSHARDED = False


@contextmanager
def unsharded():
    """Within the block ``evaluate_model`` generates and judges every row in this process instead of sharding
    rows across ranks and gathering them: for a stage that rank 0 runs alone while the other ranks wait in a
    barrier (a gather there would hang)."""
    global _UNSHARDED
    saved, _UNSHARDED = _UNSHARDED, True
    try:
        yield
    finally:
        _UNSHARDED = saved


def launch_state():
    """accelerate's process state (or one process, inside ``unsharded()``). ``cpu=True`` (no CUDA, or
    ``use_cpu: true`` in the accelerate config) is what makes accelerate join torchrun-launched CPU processes
    into one gloo group."""
    import os

    import torch
    from accelerate import PartialState

    if _UNSHARDED:
        return _OneProcess()
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="reply", disable=not enabled, dynamic_ncols=True)


def evaluate_model(
    model,
    tokenizer,
    eval_cfg: EvalConfig,
    judge: Judge | None = None,
    generate_fn: GenerateFn | None = None,
    record: Mapping | None = None,
    check_judge_first: bool = True,
) -> dict:
    """Check judge -> claim folder -> sample the missing replies -> judge the unjudged -> EM rate; see
    the module docstring for the order, the files and the returned dict."""
    from accelerate.utils import gather_object

    cfg = eval_cfg
    t0 = time.perf_counter()
    questions = select(load_questions(cfg.question_file), cfg.question_ids, cfg.question_types, cfg.variants)
    for q in questions:  # fail before generating anything
        missing = [m for m in cfg.metrics if m not in q.judge_prompts]
        if missing:
            raise ValueError(f"question {q.id!r} has no judge prompt for {missing}; drop them from `metrics`")
    by_id = {q.id: q for q in questions}
    state = launch_state()
    main = state.is_main_process
    if judge is None:
        judge = build_judge(cfg)
        check_judge_first = True
    if check_judge_first:
        check_judge(judge)

    out = Path(cfg.output_dir) if cfg.output_dir else None
    parts = None
    if out is not None:
        custom = generate_fn is not None and record is None
        rec = run_record(model, cfg, record, generate_fn is not None)
        if main:
            claim_output_dir(out, rec, overwrite=cfg.overwrite, ignore=RESUME_IGNORES)
            if custom:  # nothing vouches that earlier parts came from the same generate_fn
                shutil.rmtree(out / "parts", ignore_errors=True)
            (out / "parts").mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        if not main:
            claim_output_dir(out, rec, overwrite=False, ignore=RESUME_IGNORES, write=False)
        parts = out / "parts"
    r = state.process_index

    prompt_rows = build_prompt_rows(questions, tokenizer, cfg.samples_per_paraphrase)
    mine = prompt_rows[r :: state.num_processes]
    wanted = {row_key(p) for p in mine}
    done = {}
    if parts is not None:
        for row in read_parts(parts.glob("samples.rank*.jsonl"), SAMPLE_COLUMNS):
            if row_key(row) in wanted:
                done[row_key(row)] = row
    if generate_fn is None and cfg.generation == "fast":
        from functools import partial

        from llm.fastgen import fast_generate

        # one chunk per sample_replies batch: fast_generate pads every chunk to its batch_size
        generate_fn = partial(fast_generate, batch_size=cfg.batch_size)
    samples = Appender(parts / f"samples.rank{r}.jsonl" if parts else None, SAMPLE_COLUMNS)
    n_missing = sum(row_key(p) not in done for p in mine)
    n_sampled = 0
    with _progress(n_missing, "sampling", main) as bar:
        for b, start in enumerate(range(0, len(mine), cfg.batch_size)):
            todo = [p for p in mine[start : start + cfg.batch_size] if row_key(p) not in done]
            if not todo:
                continue
            # the seed of the original batch: a resumed run draws a whole missing batch as the
            # uninterrupted run would have
            new = sample_replies(
                model,
                tokenizer,
                todo,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                batch_size=len(todo),
                seed=cfg.seed + 1_000_003 * r + b,
                generate_fn=generate_fn or hf_generate,
            )
            samples.write(new)
            for row in new:
                done[row_key(row)] = row
            n_sampled += len(new)
            bar.update(len(new))
    rows = [dict(done[row_key(p)]) for p in mine]

    scores = {}
    if parts is not None:
        for s in read_parts(parts.glob("scores.rank*.jsonl"), SCORE_COLUMNS):
            scores[(*row_key(s), s["metric"])] = s["score"]
    todo = [row for row in rows if any((*row_key(row), m) not in scores for m in cfg.metrics)]
    score_file = Appender(parts / f"scores.rank{r}.jsonl" if parts else None, SCORE_COLUMNS)
    with _progress(len(todo), f"judging ({judge.name})", main) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = [dict(row) for row in todo[start : start + cfg.batch_size]]
            judge_rows(chunk, by_id, judge, cfg.metrics)
            score_file.write(
                [
                    {
                        "question_id": c["question_id"],
                        "paraphrase_index": c["paraphrase_index"],
                        "sample_index": c["sample_index"],
                        "metric": m,
                        "score": c[m],
                    }
                    for c in chunk
                    for m in cfg.metrics
                ]
            )
            for c in chunk:
                for m in cfg.metrics:
                    scores[(*row_key(c), m)] = c[m]
            bar.update(len(chunk))
    for row in rows:
        for m in cfg.metrics:
            row[m] = scores[(*row_key(row), m)]
    counts = {
        "sampled": n_sampled,
        "resumed_replies": len(mine) - n_sampled,
        "judged": len(todo),
        "resumed_scores": len(rows) - len(todo),
    }

    if state.num_processes > 1:
        rows = gather_object(rows)
        counts = {k: sum(c[k] for c in gather_object([counts])) for k in counts}
        order = {row_key(p): i for i, p in enumerate(prompt_rows)}
        rows.sort(key=lambda x: order[row_key(x)])

    em = em_rate(rows, n_boot=cfg.n_boot, seed=cfg.seed, protocol=cfg.em_protocol)
    means = {}
    for m in cfg.metrics:
        vals = [x[m] for x in rows if x[m] is not None]
        means[m] = sum(vals) / len(vals) if vals else None
    result = {"em": em, "mean_scores": means, "rows": rows, "judge": judge.name, "counts": counts, "paths": {}}
    if out is not None:
        paths = {
            "csv": str(out / "replies.csv"),
            "metrics": str(out / "metrics.json"),
            "summary": str(out / "summary.md"),
        }
        if main:
            write_judged_csv(rows, paths["csv"])
            blob = {
                "em": em,
                "mean_scores": means,
                "judge": judge.name,
                "n_processes": state.num_processes,
                "counts": counts,
                "wall_s": round(time.perf_counter() - t0, 1),
                "record": rec,
                "config": asdict(cfg),
            }
            Path(paths["metrics"]).write_text(json.dumps(blob, indent=1) + "\n")
            label = model_label(rec, short=True)
            plot_quadrants({label: rows}, out / "quadrants.png", protocol=cfg.em_protocol)
            merged = em_rate(rows, n_boot=cfg.n_boot, seed=cfg.seed, protocol=cfg.em_protocol, merge_variants=True)
            plot_em_per_question({label: merged}, out / "em_per_question.png")
            Path(paths["summary"]).write_text(summary_md(cfg, rec, judge.name, em, means, counts, blob["wall_s"]))
        state.wait_for_everyone()
        result["paths"] = paths
    return result
