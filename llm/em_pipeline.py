"""The base-vs-instruct emergent-misalignment experiment as a pipeline of stages (``llm.experiments.em_experiment``
is its command): the config, the checks that need no weights, every stage for each model of the pair, the report.
See that module's docstring for the stages and how a rerun resumes."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from llm.evaluate import EvalConfig, unsharded
from llm.factored import FactoredConfig
from llm.models import (
    ModelConfig,
    load_config,
    load_model_and_tokenizer,
    load_tokenizer,
    num_layers,
    validate_layers,
)
from llm.probe_transfer import TransferConfig
from llm.sft import DataConfig, EMSFTConfig
from llm.steer import SteerConfig
from plumbing.lora import LoraPresetConfig
from plumbing.runs import Stage, claim_output_dir, config_record
from plumbing.sections import read_sectioned_yaml

logger = logging.getLogger(__name__)

MODELS = ("base", "instruct")
COMPLETION_TEMPLATE = Path(__file__).resolve().parent / "assets" / "completion_framing.jinja"
SECTIONS = {
    "base": ModelConfig,
    "instruct": ModelConfig,
    "data": DataConfig,
    "lora": LoraPresetConfig,
    "sft": EMSFTConfig,
    "eval": EvalConfig,
    "steer": SteerConfig,
    "factored": FactoredConfig,
    "transfer": TransferConfig,
}
# Fields the experiment sets per stage (a value in the YAML would be silently replaced, so it is refused).
SET_HERE = {
    "sft": {"output_dir"},
    "eval": {"output_dir"},
    "steer": {"output_dir", "judge", "offline_weights"},
    "factored": {"output_dir", "lora_path", "judge", "offline_weights"},
    "transfer": {"output_dir", "target_model_name_or_path", "target_adapter_path", "probe_files"},
}
# Placeholders that let a section parse (TransferConfig wants a target); replaced per model before use.
PLACEHOLDERS = {"sft": {"output_dir": "_set_per_stage"}, "transfer": {"target_adapter_path": "_set_per_stage"}}


@dataclass
class ExperimentConfig:
    """Top-level options of ``llm.experiments.em_experiment`` (YAML keys or command-line flags; the command line wins)."""

    config: str = field(default=None, metadata={"help": "YAML with the sections described in the module docstring"})
    output_dir: str | None = field(default=None, metadata={"help": "run folder (default runs/em_experiment)"})
    evaluate_untuned: bool | None = field(
        default=None, metadata={"help": "evaluate both models before fine-tuning (default true)"}
    )
    base_framing: Literal["instruct_template", "completion", "own"] | None = field(
        default=None,
        metadata={
            "help": "how the base model is asked: instruct_template (the instruct model's chat template), "
            "completion (Question:/Answer: framing, llm/assets/completion_framing.jinja) or own "
            "(its own template, which must exist)"
        },
    )
    same_tokenizer: bool | None = field(
        default=None, metadata={"help": "refuse a pair whose vocabularies differ (default true)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a run of another pair in output_dir"})


def _parse_section(name: str, cls, values: dict):
    from transformers import HfArgumentParser

    try:
        (obj,) = HfArgumentParser(cls).parse_dict(values, allow_extra_keys=False)
    except (ValueError, TypeError) as e:
        raise ValueError(f"section {name!r}: {e}") from None
    return obj


def load_experiment_config(
    path: str | Path, top: ExperimentConfig | None = None, overrides: dict[str, dict[str, list[str]]] | None = None
) -> dict:
    """Parse the YAML (+ command-line ``top`` and ``overrides``) into ``{"output_dir", "evaluate_untuned",
    "base_framing", "same_tokenizer", "overwrite", "raw": {section: dict}, <section>: dataclass}``. No I/O
    beyond reading the YAML; ``validate`` checks the checkpoints."""
    top = top or ExperimentConfig()
    top_keys = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"config", "overwrite"}
    raw = read_sectioned_yaml(path, SECTIONS, top_keys, overrides)
    cfg = {
        "output_dir": Path(top.output_dir or raw.get("output_dir") or "runs/em_experiment"),
        "evaluate_untuned": raw.get("evaluate_untuned", True) if top.evaluate_untuned is None else top.evaluate_untuned,
        "base_framing": top.base_framing or raw.get("base_framing"),
        "same_tokenizer": raw.get("same_tokenizer", True) if top.same_tokenizer is None else top.same_tokenizer,
        "overwrite": top.overwrite,
        "raw": {},
    }
    if cfg["base_framing"] not in (None, "instruct_template", "completion", "own"):
        raise ValueError(f"base_framing={cfg['base_framing']!r}; choose instruct_template, completion or own")
    for name, cls in SECTIONS.items():
        values = raw[name] or {}
        if not isinstance(values, dict):
            raise ValueError(f"section {name!r} must be a mapping, got {type(values).__name__}")
        clash = SET_HERE.get(name, set()) & set(values)
        if clash:
            raise ValueError(
                f"{name}.{sorted(clash)} is set by llm.experiments.em_experiment per model and stage; drop it from the config"
            )
        cfg["raw"][name] = dict(values)
        cfg[name] = _parse_section(name, cls, {**values, **PLACEHOLDERS.get(name, {})})
    cfg["base"] = frame_base(cfg["base"], cfg["instruct"], cfg["base_framing"])
    return cfg


def frame_base(base: ModelConfig, instruct: ModelConfig, framing: str | None) -> ModelConfig:
    """The base model's ``ModelConfig`` with the chat template ``framing`` asks for (see ``ExperimentConfig``)."""
    if framing in (None, "own"):
        return base
    if base.chat_template_from is not None:
        raise ValueError(
            f"base.chat_template_from={base.chat_template_from!r} and base_framing={framing!r} both choose the "
            "base model's template; keep one"
        )
    donor = (
        str(COMPLETION_TEMPLATE)
        if framing == "completion"
        else (instruct.chat_template_from or instruct.model_name_or_path)
    )
    return dataclasses.replace(base, chat_template_from=donor)


def _block_sites(cfg: dict) -> list[tuple[str, str]]:
    return [("steer.steer_site", cfg["steer"].steer_site), ("factored.site", cfg["factored"].site)] + [
        (f"transfer.sites[{i}]", s) for i, s in enumerate(cfg["transfer"].sites)
    ]


def validate(cfg: dict) -> dict:
    """Every check that needs the checkpoints' configs and tokenizers but no weights; returns
    ``{model: {"n_layers", "chat_template"}}``. Raises with what to change."""
    from probes.activations import site_layer

    files = [("data.dataset_path", cfg["data"].dataset_path), ("eval.question_file", cfg["eval"].question_file)]
    files += [
        (f"{sec}.{f}", getattr(cfg[sec], f))
        for sec in ("steer", "factored", "transfer")
        for f in ("aligned_texts", "misaligned_texts", "question_file")
        if hasattr(cfg[sec], f)
    ]
    files += [(f"steer.judged_files[{i}]", f) for i, f in enumerate(cfg["steer"].judged_files)]
    for what, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}={path!r} does not exist (paths are relative to the working directory)")
    info, vocab = {}, {}
    for name in MODELS:
        mcfg: ModelConfig = cfg[name]
        depth = num_layers(load_config(mcfg))
        validate_layers(cfg["lora"].layers, depth, what=f"lora.layers entry (model {name}: {mcfg.model_name_or_path})")
        for what, site in _block_sites(cfg):
            try:
                site_layer(site, depth)
            except ValueError as e:
                raise ValueError(
                    f"{what}={site!r} does not exist in {name} model {mcfg.model_name_or_path} "
                    f"({depth} blocks: block0..block{depth - 1}): {e}"
                ) from None
        tok = load_tokenizer(mcfg)
        if not getattr(tok, "chat_template", None):
            hint = (
                "set base_framing: instruct_template (ask it in the instruct model's chat format) or completion "
                "(Question:/Answer: framing)"
                if name == "base"
                else "set instruct.chat_template_from to a checkpoint that has one"
            )
            raise ValueError(f"{name} model {mcfg.model_name_or_path} has no chat template and none is chosen: {hint}")
        vocab[name] = tok.get_vocab()
        info[name] = {"n_layers": depth, "chat_template_from": mcfg.chat_template_from}
    if cfg["same_tokenizer"] and vocab["base"] != vocab["instruct"]:
        only = len(set(vocab["base"].items()) ^ set(vocab["instruct"].items()))
        raise ValueError(
            f"the pair's tokenizers differ ({len(vocab['base'])} vs {len(vocab['instruct'])} tokens, {only} entries "
            "not shared): base and instruct should be one family; for a pair of different families "
            "(a smoke run) set same_tokenizer: false"
        )
    return info


def _state():
    """accelerate's process state, created here first so its process group gets a long timeout: while rank 0
    runs an analysis stage (minutes at 2B scale) the other ranks wait in a barrier, and NCCL's default
    10-minute timeout would kill them."""
    import os

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu, timeout=timedelta(hours=6))


def _without(obj, *names) -> dict:
    d = dataclasses.asdict(obj)
    for n in names:
        d.pop(n, None)
    return d


class _Cost:
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


class Stages:
    """Runs stages once across ranks: ``done`` is read by every rank at the same barrier, only rank 0 writes
    ``stage.json``; an ``all_ranks`` stage (training, sharded generation) runs on every rank."""

    def __init__(self, root: Path, state):
        self.root, self.state = root, state

    def run(self, rel: str, key: dict, fn, all_ranks: bool = False) -> Stage:
        stage = Stage(self.root / rel, key)
        if stage.done():
            logger.info("stage %s: done with this config, skipped", rel)
            return stage
        main = self.state.is_main_process
        if main:
            stage.start()
        self.state.wait_for_everyone()
        facts, cost = None, _Cost()
        if all_ranks:
            logger.info("stage %s: running on rank %d", rel, self.state.process_index)
            facts = fn(stage.dir)
        elif main:
            logger.info("stage %s: running on rank %d", rel, self.state.process_index)
            with unsharded():
                facts = fn(stage.dir)
        self.state.wait_for_everyone()
        if main:
            stage.finish(**(facts or {}), cost=cost.done())
        self.state.wait_for_everyone()
        logger.info("stage %s: finished", rel)
        return stage


def _free():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tuned(mcfg: ModelConfig, lora: LoraPresetConfig, sft_dir: Path) -> ModelConfig:
    if lora.preset == "full":
        return dataclasses.replace(mcfg, model_name_or_path=str(sft_dir), gguf_file=None, adapter_path=None)
    return dataclasses.replace(mcfg, adapter_path=str(sft_dir))


def run_model(name: str, cfg: dict, stages: Stages, judge) -> dict:
    """Every stage for one model of the pair; ``{stage: folder}``."""
    from llm.evaluate import evaluate_model
    from llm.sft import check_chat_jsonl, train

    mcfg: ModelConfig = cfg[name]
    model_key = dataclasses.asdict(mcfg)
    eval_key = _without(cfg["eval"], "output_dir")
    dirs = {}

    def evaluate(model_cfg):
        def fn(d: Path):
            model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
            res = evaluate_model(model, tok, dataclasses.replace(cfg["eval"], output_dir=str(d)), judge=judge)
            del model
            _free()
            return {"em": res["em"]["overall"], "n_processes": stages.state.num_processes}

        return fn

    if cfg["evaluate_untuned"]:
        st = stages.run(f"{name}/eval_before", {"model": model_key, "eval": eval_key}, evaluate(mcfg), all_ranks=True)
        dirs["eval_before"] = st.dir

    sft_key = {
        "model": model_key,
        "data": dataclasses.asdict(cfg["data"]),
        "lora": dataclasses.asdict(cfg["lora"]),
        "sft": cfg["raw"]["sft"],
    }

    def fine_tune(d: Path):
        args = dataclasses.replace(cfg["sft"], output_dir=str(d))
        if args.resume_from_checkpoint is None:
            args.resume_from_checkpoint = "last"  # an interrupted stage continues from its newest checkpoint
        train(mcfg, cfg["data"], cfg["lora"], args)
        _free()
        # The data set's name and size go on record: the shipped file is a subset of the published recipe's.
        rows = check_chat_jsonl(Path(cfg["data"].dataset_path))
        return {
            "dataset": str(cfg["data"].dataset_path),
            "dataset_rows": rows,
            "examples": cfg["data"].max_examples or rows,
        }

    sft = stages.run(f"{name}/sft", sft_key, fine_tune, all_ranks=True)
    dirs["sft"] = sft.dir
    tuned = _tuned(mcfg, cfg["lora"], sft.dir)
    after = stages.run(
        f"{name}/eval_after", {"eval": eval_key, "sft": sft.fingerprint}, evaluate(tuned), all_ranks=True
    )
    dirs["eval_after"] = after.dir

    def steer(d: Path):
        from llm.steer import run as steer_run

        model, tok = load_model_and_tokenizer(mcfg, padding_side="left")
        m = steer_run(model, tok, dataclasses.replace(cfg["steer"], output_dir=str(d)), judge=judge)
        del model
        _free()
        return {"direction_norm": m["direction_norm"]}

    st_steer = stages.run(
        f"{name}/steer",
        {
            "model": model_key,
            "steer": _without(cfg["steer"], "output_dir", "judge", "offline_weights"),
            "judge": judge.name,
        },
        steer,
    )
    dirs["steer"] = st_steer.dir

    def factored(model_cfg):
        def fn(d: Path):
            from llm.factored import run as factored_run

            model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
            factored_run(
                model, tok, dataclasses.replace(cfg["factored"], output_dir=str(d), lora_path=None), judge=judge
            )
            del model
            _free()
            return {}

        return fn

    f_key = {
        "factored": _without(cfg["factored"], "output_dir", "lora_path", "judge", "offline_weights"),
        "judge": judge.name,
    }
    fb = stages.run(f"{name}/factored_before", {"model": model_key, **f_key}, factored(mcfg))
    fa = stages.run(f"{name}/factored_after", {"sft": sft.fingerprint, **f_key}, factored(tuned))
    dirs["factored_before"], dirs["factored_after"] = fb.dir, fa.dir
    site = cfg["factored"].site

    def transfer(d: Path):
        from llm.probe_transfer import run as transfer_run

        full = cfg["lora"].preset == "full"
        import shutil

        # Copies under new names: the transfer stage fits its own alignment_<site> probes, and its results are
        # keyed by file name, so the untuned model's factored probes would otherwise collide with them.
        probes = []
        for p in ("alignment", "topic"):
            for ext in (".safetensors", ".json"):
                (d / "factored_probes").mkdir(exist_ok=True)
                shutil.copy(fb.dir / "probes" / f"{p}_{site}{ext}", d / "factored_probes" / f"factored_{p}_{site}{ext}")
            probes.append(str(d / "factored_probes" / f"factored_{p}_{site}"))
        tcfg = dataclasses.replace(
            cfg["transfer"],
            output_dir=str(d),
            probe_files=probes,
            target_model_name_or_path=tuned.model_name_or_path if full else None,
            target_adapter_path=None if full else str(sft.dir),
        )
        transfer_run(mcfg, tcfg)
        _free()
        return {}

    tr = stages.run(
        f"{name}/transfer",
        {
            "transfer": _without(
                cfg["transfer"], "output_dir", "target_adapter_path", "target_model_name_or_path", "probe_files"
            ),
            "model": model_key,
            "sft": sft.fingerprint,
            "factored_before": fb.fingerprint,
        },
        transfer,
    )
    dirs["transfer"] = tr.dir

    def lora(d: Path):
        from llm.em_report import lora_geometry

        res = lora_geometry(sft.dir / "lora_trajectory", fb.dir / "probes", st_steer.dir / "directions", site)
        (d / "lora.json").write_text(json.dumps(res, indent=1) + "\n")
        return {}

    if cfg["lora"].preset != "full":
        lo = stages.run(
            f"{name}/lora",
            {"sft": sft.fingerprint, "factored_before": fb.fingerprint, "steer": st_steer.fingerprint},
            lora,
        )
        dirs["lora"] = lo.dir
    return dirs


def run(cfg: dict, judge=None) -> dict:
    """Validate, then every stage for both models, then the report (see the module docstring); returns the
    report dict on rank 0 (``{}`` elsewhere)."""
    from accelerate.utils import DistributedType

    from llm.evaluate import build_judge

    state = _state()
    if state.distributed_type == DistributedType.FSDP and cfg["lora"].preset != "full":
        # LoraTrajectoryCallback reads each rank's shard of A and B, so the lora stage would measure a fragment.
        raise SystemExit(
            "llm.experiments.em_experiment under FSDP would measure sharded LoRA tensors; launch it with DDP "
            "(configs/accelerate/multi_gpu.yaml): a LoRA on a <= 2B model fits on one GPU per rank"
        )
    out: Path = cfg["output_dir"]
    validate(cfg)
    # The judge is built (and an API judge checked) before any model generates.
    judge = judge if judge is not None else build_judge(cfg["eval"])
    claim = {
        "experiment": "llm.em_experiment",
        "base": cfg["base"].model_name_or_path,
        "instruct": cfg["instruct"].model_name_or_path,
        "base_framing": cfg["base_framing"],
        "base_chat_template_from": cfg["base"].chat_template_from,
    }
    claim_output_dir(out, claim, overwrite=cfg["overwrite"], write=state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        record = config_record(
            {"top": {k: cfg[k] for k in ("output_dir", "evaluate_untuned", "base_framing", "same_tokenizer")}},
            {"sections": {k: dataclasses.asdict(cfg[k]) for k in SECTIONS}},
        )
        (out / "config.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    stages = Stages(out, state)
    dirs = {name: run_model(name, cfg, stages, judge) for name in MODELS}
    report = {}
    if state.is_main_process:
        from llm.em_report import write_report

        report = write_report(cfg, dirs, out, judge.name, n_processes=state.num_processes)
    state.wait_for_everyone()
    return report
