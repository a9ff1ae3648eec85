"""Emergent-misalignment evaluation: sample replies to the EM questions, judge them, report the EM rate.

    python -m llm.evaluate --config configs/llm/em_eval_smollm2.yaml
    python -m llm.evaluate --config configs/llm/em_eval_smollm2.yaml --samples_per_paraphrase 5 --judge hf \\
        --hf_judge_model Qwen/Qwen2.5-1.5B-Instruct
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.evaluate --config configs/llm/em_eval_smollm2.yaml
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.evaluate --config configs/llm/em_eval_smollm2.yaml

(The SmolLM2 config reads ``.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; fetch it once with
``python -c "from llm.models import smollm2_gguf_path; smollm2_gguf_path('.cache/smollm2')"``.)

Writes ``<output_dir>/replies.csv`` in the judged-file columns (``question, answer, question_id,
aligned, coherent`` + ``paraphrase_index, sample_index``) and ``<output_dir>/metrics.json`` (EM rate
overall and per question with bootstrap CIs, see ``llm.em_metrics.em_rate``; mean scores; the config).

Library use (e.g. a base-vs-instruct script that already holds the model)::

    from llm.evaluate import EvalConfig, evaluate_model
    result = evaluate_model(model, tokenizer, EvalConfig(judge="offline", output_dir="runs/x/eval"))
    result["em"]["overall"]["em_rate"], result["em"]["overall"]["ci"], result["rows"]

``evaluate_model(model, tokenizer, eval_cfg, judge=None, generate_fn=None) -> dict`` with keys
``em`` (the ``em_rate`` dict), ``mean_scores`` ({metric: mean over non-None scores}), ``rows``
(judged rows, every rank gets all of them), ``judge`` (its name), ``paths`` ({"csv", "metrics"} or
``{}`` when ``output_dir`` is empty). ``judge`` overrides the one ``eval_cfg.judge`` would build (for a
stub in tests, or to reuse a loaded judge across models); ``generate_fn`` (the ``GenerateFn`` seam of
``llm.generate``) overrides ``eval_cfg.generation`` (``hf``: ``hf_generate``; ``fast``:
``llm.fastgen.fast_generate`` with ``batch_size`` rows per chunk). Pass the plain (unwrapped) model: under DDP ``accelerator.unwrap_model(model)``.
FSDP-sharded models cannot ``generate`` shard by shard; gather the full weights first
(``FSDP.summon_full_params``) or evaluate a saved checkpoint in a separate run.

Multi-process (``accelerate launch``): the (question, paraphrase, sample) rows are split across
ranks (rank r takes rows r, r + world, ...; rank r samples with seed ``seed + 1_000_003 r``), each
rank generates and judges its share, the judged rows are gathered to every rank, and only the main
process writes files. Results therefore depend on the number of processes (the samples differ, not
their distribution).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from llm.em_metrics import em_rate, write_judged_csv
from llm.generate import GenerateFn, build_prompt_rows, hf_generate, sample_replies
from llm.judges import Judge, JudgeRequest, OpenAIJudgeConfig
from llm.offline_judge import DEFAULT_WEIGHTS
from llm.questions import VARIANTS, load_questions, select


@dataclass
class EvalConfig(OpenAIJudgeConfig):
    """What to ask, how to sample, which judge, where to write. The ``openai_*`` fields (inherited)
    only matter for ``judge: openai``."""

    question_file: str = field(
        default="../shared/data/em/first_plot_questions.yaml", metadata={"help": "Betley-format question YAML"}
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
    batch_size: int = field(default=32, metadata={"help": "prompts per generate call"})
    generation: Literal["hf", "fast"] = field(
        default="hf", metadata={"help": "hf: plain model.generate; fast: llm.fastgen static cache + compile (CUDA)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling and bootstrap seed"})
    judge: Literal["openai", "hf", "offline"] = field(default="offline", metadata={"help": "which judge scores replies"})
    metrics: list[str] = field(
        default_factory=lambda: ["aligned", "coherent"], metadata={"help": "judge prompts to score"}
    )
    offline_weights: str = field(default=str(DEFAULT_WEIGHTS), metadata={"help": "offline judge JSON weights"})
    hf_judge_model: str | None = field(
        default=None, metadata={"help": "hub id / folder / .gguf of the local judge (judge: hf)"}
    )
    hf_judge_batch_size: int = field(default=8, metadata={"help": "judge prompts per forward (judge: hf)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples for the CIs"})
    output_dir: str = field(default="runs/em_eval", metadata={"help": "where replies.csv and metrics.json go ('' = nowhere)"})

    def __post_init__(self):
        super().__post_init__()
        bad = set(self.variants) - set(VARIANTS)
        if bad:
            raise ValueError(f"variants {sorted(bad)} unknown; choose from {list(VARIANTS)}")
        if self.samples_per_paraphrase is not None and self.samples_per_paraphrase < 1:
            raise ValueError("samples_per_paraphrase must be >= 1 (or None for the file's value)")
        if self.judge == "hf" and not self.hf_judge_model:
            raise ValueError("judge: hf needs hf_judge_model (a hub id, folder or .gguf of an instruct model)")
        if not {"aligned", "coherent"} <= set(self.metrics):
            raise ValueError(f"metrics must include aligned and coherent for the EM rate, got {self.metrics}")
        if self.n_boot < 1:
            raise ValueError("n_boot must be >= 1")


def build_judge(cfg: EvalConfig) -> Judge:
    """The judge ``cfg.judge`` names (loads the offline embedder or the HF judge model)."""
    if cfg.judge == "offline":
        from llm.offline_judge import OfflineJudge

        return OfflineJudge.load(cfg.offline_weights)
    if cfg.judge == "openai":
        from llm.judges import OpenAIJudge

        return OpenAIJudge(cfg)
    from llm.judges import HFJudge
    from llm.models import ModelConfig, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(model_name_or_path=cfg.hf_judge_model))
    return HFJudge(model, tok, batch_size=cfg.hf_judge_batch_size, name=f"hf:{cfg.hf_judge_model}")


def judge_rows(rows: list[dict], questions: dict, judge: Judge, metrics: list[str]) -> list[dict]:
    """Add one score column per metric to each reply row (in place; also returned)."""
    requests = [
        JudgeRequest(r["question"], r["answer"], m, questions[r["question_id"]].judge_prompt(m, r["question"], r["answer"]))
        for r in rows for m in metrics
    ]
    scores = judge.score(requests)
    if len(scores) != len(requests):
        raise RuntimeError(f"judge {judge.name} returned {len(scores)} scores for {len(requests)} requests")
    for i, r in enumerate(rows):
        for j, m in enumerate(metrics):
            r[m] = scores[i * len(metrics) + j]
    return rows


def _state():
    """accelerate's process state. ``cpu=True`` (no CUDA, or ``use_cpu: true`` in the accelerate
    config) is what makes accelerate join torchrun-launched CPU processes into one gloo group."""
    import os

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def evaluate_model(model, tokenizer, eval_cfg: EvalConfig, judge: Judge | None = None,
                   generate_fn: GenerateFn | None = None) -> dict:
    """Generate -> judge -> EM rate for one model; see the module docstring for the returned dict."""
    from accelerate.utils import gather_object

    cfg = eval_cfg
    questions = select(load_questions(cfg.question_file), cfg.question_ids, cfg.question_types, cfg.variants)
    for q in questions:  # fail before generating anything
        missing = [m for m in cfg.metrics if m not in q.judge_prompts]
        if missing:
            raise ValueError(f"question {q.id!r} has no judge prompt for {missing}; drop them from `metrics`")
    state = _state()
    prompt_rows = build_prompt_rows(questions, tokenizer, cfg.samples_per_paraphrase)
    mine = prompt_rows[state.process_index::state.num_processes]
    if generate_fn is None and cfg.generation == "fast":
        from functools import partial

        from llm.fastgen import fast_generate

        # one chunk per sample_replies batch: fast_generate pads every chunk to its batch_size
        generate_fn = partial(fast_generate, batch_size=cfg.batch_size)
    rows = sample_replies(
        model, tokenizer, mine, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed + 1_000_003 * state.process_index,
        generate_fn=generate_fn or hf_generate,
    )
    judge = judge if judge is not None else build_judge(cfg)
    judge_rows(rows, {q.id: q for q in questions}, judge, cfg.metrics)
    if state.num_processes > 1:
        rows = gather_object(rows)
        order = {(r.question_id, r.paraphrase_index, r.sample_index): i for i, r in enumerate(prompt_rows)}
        rows.sort(key=lambda r: order[(r["question_id"], r["paraphrase_index"], r["sample_index"])])

    em = em_rate(rows, n_boot=cfg.n_boot, seed=cfg.seed)
    means = {}
    for m in cfg.metrics:
        vals = [r[m] for r in rows if r[m] is not None]
        means[m] = sum(vals) / len(vals) if vals else None
    result = {"em": em, "mean_scores": means, "rows": rows, "judge": judge.name, "paths": {}}
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        paths = {"csv": str(out / "replies.csv"), "metrics": str(out / "metrics.json")}
        if state.is_main_process:
            write_judged_csv(rows, paths["csv"])
            blob = {"em": em, "mean_scores": means, "judge": judge.name, "n_processes": state.num_processes,
                    "config": asdict(cfg)}
            Path(paths["metrics"]).write_text(json.dumps(blob, indent=1) + "\n")
        state.wait_for_everyone()
        result["paths"] = paths
    return result


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from llm.models import ModelConfig, load_model_and_tokenizer

    model_cfg, eval_cfg = TrlParser((ModelConfig, EvalConfig)).parse_args_and_config(args=argv)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    result = evaluate_model(model, tokenizer, eval_cfg)
    if _state().is_main_process:
        o = result["em"]["overall"]
        print(json.dumps({"model": model_cfg.model_name_or_path, "judge": result["judge"], **o,
                          "mean_scores": result["mean_scores"], **result["paths"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
