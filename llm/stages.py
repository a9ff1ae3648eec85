"""One stage runner for the multi-stage LLM experiments (the base-vs-instruct EM pipeline, the safety arms): the run
folder claimed and its config recorded, then each stage run once per key across the launch's processes.

A stage is a folder with ``stage.json`` holding the key (its config and the fingerprints of the stages it reads)
that made it (``plumbing.runs.Stage``): a rerun skips a finished stage with the same key and redoes one whose key
changed, and with it every stage downstream. ``stage.json`` also records the stage's cost (wall and CPU seconds,
peak memory), which the rehearsal's cost model reads back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import timedelta
from pathlib import Path

from llm.evaluate import evaluate_model, unsharded
from llm.models import load_model_and_tokenizer
from plumbing.runs import Stage, claim_output_dir, config_record

logger = logging.getLogger(__name__)


def process_state():
    """accelerate's process state, created here first so its process group gets a long timeout: while rank 0
    runs an analysis stage (minutes at 2B scale) the other ranks wait in a barrier, and NCCL's default
    10-minute timeout would kill them."""
    import os

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu, timeout=timedelta(hours=6))


def free_memory() -> None:
    """Collect what a finished model or trainer left in reference cycles (a model held by a cycle would stay in
    memory until the next full collection) and return the CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def without(config, *names: str) -> dict:
    """``dataclasses.asdict(config)`` less the fields a stage sets itself (its key must not depend on them)."""
    d = dataclasses.asdict(config)
    for n in names:
        d.pop(n, None)
    return d


class StageCost:
    """Wall time, CPU time and rank 0's peak memory of one stage, stored in its ``stage.json`` (``cost``) so a
    run's per-stage budget can be read back and extrapolated."""

    def __init__(self):
        import time

        import torch

        self.t0, self.c0 = time.perf_counter(), time.process_time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def done(self) -> dict:
        import resource
        import time

        import torch

        out = {
            "wall_s": round(time.perf_counter() - self.t0, 1),
            # this process's CPU seconds (all threads): on a CPU the work itself, whatever else shares the cores
            "cpu_s": round(time.process_time() - self.c0, 1),
            # ru_maxrss is the process's peak so far (KiB on Linux), not this stage's alone
            "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        if torch.cuda.is_available():
            out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out


class StageRunner:
    """Runs the stages of one run folder once across ranks: ``done`` is read by every rank at the same barrier,
    only rank 0 writes ``stage.json``; an ``all_ranks`` stage (training, sharded generation) runs on every rank,
    any other on rank 0 alone. In one process the barriers cost nothing."""

    def __init__(self, root: Path, state=None):
        self.root = Path(root)
        self.state = state if state is not None else process_state()
        self.stages: dict[str, Stage] = {}  # every stage this run has reached, by its folder under the root

    def claim(self, claim: dict, record: dict, overwrite: bool) -> None:
        """Claim the folder for the run ``claim`` names (``plumbing.runs.claim_output_dir``: a run of another
        claim is refused unless ``overwrite``) and write ``config.json``: ``record`` as
        ``plumbing.runs.config_record`` writes it (secrets left out)."""
        main = self.state.is_main_process
        claim_output_dir(self.root, claim, overwrite=overwrite, write=main)
        self.state.wait_for_everyone()
        if main:
            text = json.dumps(config_record(record), indent=1, sort_keys=True, default=str)
            (self.root / "config.json").write_text(text + "\n")

    def run(self, rel: str, key: dict, fn, *args, all_ranks: bool = False) -> Stage:
        """``fn(folder, *args) -> facts`` unless the stage ``rel`` is done with ``key``; the facts and the cost go
        into its ``stage.json``. A stage that reads every earlier one keys on ``fingerprints()``."""
        stage = self.stages[rel] = Stage(self.root / rel, key)
        if stage.done():
            logger.info("stage %s: done with this config, skipped", rel)
            return stage
        main = self.state.is_main_process
        if main:
            stage.start()
        self.state.wait_for_everyone()
        facts, cost = None, StageCost()
        if all_ranks:
            logger.info("stage %s: running on rank %d", rel, self.state.process_index)
            facts = fn(stage.dir, *args)
        elif main:
            logger.info("stage %s: running on rank %d", rel, self.state.process_index)
            with unsharded():
                facts = fn(stage.dir, *args)
        self.state.wait_for_everyone()
        if main:
            stage.finish(**(facts or {}), cost=cost.done())
        self.state.wait_for_everyone()
        logger.info("stage %s: finished", rel)
        return stage

    def fingerprints(self) -> dict[str, str]:
        """The fingerprint of every stage reached so far, by folder: the key of a stage that reads them all."""
        return {rel: stage.fingerprint for rel, stage in self.stages.items()}


def evaluate(d: Path, model_cfg, eval_cfg, judge) -> dict:
    """The judged EM evaluation of one checkpoint into the stage folder ``d`` (``llm.evaluate.evaluate_model``,
    sharded across the launch's processes); its EM rate, mean scores and process count as the stage's facts."""
    model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
    res = evaluate_model(model, tok, dataclasses.replace(eval_cfg, output_dir=str(d)), judge=judge)
    del model
    free_memory()
    n = process_state().num_processes
    return {"em": res["em"]["overall"], "mean_scores": res["mean_scores"], "n_processes": n}


def stage_facts(stage: Stage) -> dict:
    """What a finished stage recorded in its ``stage.json`` (its facts, key and cost)."""
    return json.loads((stage.dir / "stage.json").read_text())
