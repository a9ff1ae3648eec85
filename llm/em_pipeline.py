"""The base-vs-instruct emergent-misalignment experiment as a pipeline of stages (``llm.experiments.em_experiment``
is its command and its docstring lists the stages): for each model of the pair, every stage in its folder under
the run folder, run once per key (``llm.stages.StageRunner``), then the report (``llm.em_report``) as the last
stage, in ``<run folder>/report/``.

Each stage is one function here, ``<stage>(folder, ...) -> facts``, that loads what it needs, calls the one
library function that does the work and frees the model; ``run_model`` chains them with their keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from llm.em_config import MODELS, EMConfig, stage_names, validate
from llm.em_report import write_report
from llm.factored import FactoredConfig
from llm.factored import run as factored_run
from llm.judges import build_judge
from llm.lora_geometry import lora_geometry
from llm.models import ModelConfig, load_model_and_tokenizer
from llm.probe_transfer import TransferConfig
from llm.probe_transfer import run as transfer_run
from llm.sft import DataConfig, check_chat_jsonl, train
from llm.stages import StageRunner, evaluate, free_memory, without
from llm.steer import SteerConfig
from llm.steer import run as steer_run

logger = logging.getLogger(__name__)


def fine_tune(d: Path, model_cfg: ModelConfig, cfg: EMConfig) -> dict:
    """The EM fine-tune (``llm.sft.train``, DDP across the launch's processes); an interrupted stage continues
    from its newest checkpoint."""
    args = dataclasses.replace(cfg.sft, output_dir=str(d))
    if args.resume_from_checkpoint is None:
        args.resume_from_checkpoint = "last"
    train(model_cfg, cfg.data, cfg.lora, args)
    free_memory()
    return dataset_facts(cfg.data)


def dataset_facts(data: DataConfig) -> dict:
    """The data set's name and size, on record: the shipped file is a subset of the published recipe's."""
    rows = check_chat_jsonl(Path(data.dataset_path))
    return {"dataset": str(data.dataset_path), "dataset_rows": rows, "examples": data.max_examples or rows}


def steer(d: Path, model_cfg: ModelConfig, steer_cfg: SteerConfig, judge) -> dict:
    """The misalignment direction, steering and ablation on the untuned model (``llm.steer.run``)."""
    model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
    m = steer_run(model, tok, dataclasses.replace(steer_cfg, output_dir=str(d)), judge=judge)
    del model
    free_memory()
    return {"direction_norm": m["direction_norm"]}


def factored(d: Path, model_cfg: ModelConfig, factored_cfg: FactoredConfig, judge) -> dict:
    """Alignment x topic probes, their overlap and factor steering on one checkpoint (``llm.factored.run``)."""
    model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
    factored_run(model, tok, dataclasses.replace(factored_cfg, output_dir=str(d), lora_path=None), judge=judge)
    del model
    free_memory()
    return {}


def transfer(d: Path, model_cfg: ModelConfig, tuned: ModelConfig, cfg: TransferConfig, probes_dir: Path, site: str):
    """The untuned model's probes (its own fitted here, and the factored stage's) read on the fine-tuned one
    (``llm.probe_transfer.run``)."""
    # Copies under new names: the transfer stage fits its own alignment_<site> probes, and its results are
    # keyed by file name, so the untuned model's factored probes would otherwise collide with them.
    (d / "factored_probes").mkdir(exist_ok=True)
    probes = []
    for p in ("alignment", "topic"):
        for ext in (".safetensors", ".json"):
            shutil.copy(probes_dir / f"{p}_{site}{ext}", d / "factored_probes" / f"factored_{p}_{site}{ext}")
        probes.append(str(d / "factored_probes" / f"factored_{p}_{site}"))
    full = tuned.adapter_path is None  # a full fine-tune is a checkpoint of its own, a LoRA an adapter on the untuned
    tcfg = dataclasses.replace(
        cfg,
        output_dir=str(d),
        probe_files=probes,
        target_model_name_or_path=tuned.model_name_or_path if full else None,
        target_adapter_path=tuned.adapter_path,
    )
    transfer_run(model_cfg, tcfg)
    free_memory()
    return {}


def lora(d: Path, sft_dir: Path, probes_dir: Path, directions: Path, site: str) -> dict:
    """The LoRA update's share in the alignment / topic subspaces and its cosine with the direction at every
    saved training step (``llm.lora_geometry.lora_geometry``)."""
    res = lora_geometry(sft_dir / "lora_trajectory", probes_dir, directions, site)
    (d / "lora.json").write_text(json.dumps(res, indent=1) + "\n")
    return {}


def report(d: Path) -> dict:
    """The report (``llm.em_report.write_report``) into ``d``, from the run folder above it alone."""
    write_report(d.parent, d)
    return {}


def run_model(name: str, cfg: EMConfig, runner: StageRunner, judge) -> None:
    """Every stage for one model of the pair (``llm.em_config.stage_names``), in order, each keyed by its config
    and the stages it reads."""
    names = stage_names(cfg.evaluate_untuned, cfg.lora.preset)
    mcfg: ModelConfig = getattr(cfg, name)
    model_key = dataclasses.asdict(mcfg)
    eval_key = without(cfg.eval, "output_dir")
    if "eval_before" in names:
        key = {"model": model_key, "eval": eval_key}
        runner.run(f"{name}/eval_before", key, evaluate, mcfg, cfg.eval, judge, all_ranks=True)
    key = {"model": model_key, "data": dataclasses.asdict(cfg.data), "lora": dataclasses.asdict(cfg.lora)}
    sft = runner.run(f"{name}/sft", key | {"sft": cfg.sft_given}, fine_tune, mcfg, cfg, all_ranks=True)
    tuned = mcfg.fine_tuned(sft.dir, full=cfg.lora.preset == "full")
    key = {"eval": eval_key, "sft": sft.fingerprint}
    runner.run(f"{name}/eval_after", key, evaluate, tuned, cfg.eval, judge, all_ranks=True)
    key = {"model": model_key, "steer": without(cfg.steer, *EMConfig.SET_PER_STAGE["steer"]), "judge": judge.name}
    st_steer = runner.run(f"{name}/steer", key, steer, mcfg, cfg.steer, judge)
    key = {"factored": without(cfg.factored, *EMConfig.SET_PER_STAGE["factored"]), "judge": judge.name}
    fb = runner.run(f"{name}/factored_before", {"model": model_key, **key}, factored, mcfg, cfg.factored, judge)
    runner.run(f"{name}/factored_after", {"sft": sft.fingerprint, **key}, factored, tuned, cfg.factored, judge)
    probes, site = fb.dir / "probes", cfg.factored.site
    key = {
        "transfer": without(cfg.transfer, *EMConfig.SET_PER_STAGE["transfer"]),
        "model": model_key,
        "sft": sft.fingerprint,
        "factored_before": fb.fingerprint,
    }
    runner.run(f"{name}/transfer", key, transfer, mcfg, tuned, cfg.transfer, probes, site)
    if "lora" in names:
        key = {"sft": sft.fingerprint, "factored_before": fb.fingerprint, "steer": st_steer.fingerprint}
        runner.run(f"{name}/lora", key, lora, sft.dir, probes, st_steer.dir / "directions", site)


def run(cfg: EMConfig, judge=None) -> dict:
    """Validate, then every stage for both models, then the report stage (see the module docstring); returns the
    report dict on rank 0 (``{}`` elsewhere)."""
    from accelerate.utils import DistributedType

    runner = StageRunner(cfg.out)
    if runner.state.distributed_type == DistributedType.FSDP and cfg.lora.preset != "full":
        # LoraTrajectoryCallback reads each rank's shard of A and B, so the lora stage would measure a fragment.
        raise SystemExit(
            "llm.experiments.em_experiment under FSDP would measure sharded LoRA tensors; launch it with DDP "
            "(configs/accelerate/multi_gpu.yaml): a LoRA on a <= 2B model fits on one GPU per rank"
        )
    validate(cfg)
    # The judge is built (and an API judge checked) before any model generates.
    judge = judge if judge is not None else build_judge(cfg.eval)
    claim = {
        "experiment": "llm.em_experiment",  # its name in run folders, unchanged so that earlier runs resume
        "base": cfg.base.model_name_or_path,
        "instruct": cfg.instruct.model_name_or_path,
        "base_framing": cfg.base_framing,
        "base_chat_template_from": cfg.base.chat_template_from,
    }
    top = {"output_dir": cfg.out, "evaluate_untuned": cfg.evaluate_untuned}
    top |= {"base_framing": cfg.base_framing, "same_tokenizer": cfg.same_tokenizer}
    sections = {k: dataclasses.asdict(v) for k, v in cfg.sections().items()}
    # config.json: all the report reads besides the stage folders (llm.em_report.run_folder)
    record = {"top": top, "sections": sections, "judge": judge.name, "n_processes": runner.state.num_processes}
    runner.claim(claim, record, overwrite=cfg.overwrite)
    for name in MODELS:
        run_model(name, cfg, runner, judge)
    # The last stage reads every other: it is redrawn whenever one of them was redone.
    rep = runner.run("report", runner.fingerprints(), report)
    return json.loads((rep.dir / "report.json").read_text()) if runner.state.is_main_process else {}
