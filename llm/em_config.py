"""The base-vs-instruct EM experiment's config, typed: the top-level options (``ExperimentOptions``) and one
dataclass per section of its YAML (``EMConfig``), parsed the house way (``plumbing.config.ConfigParser`` for the
options, ``plumbing.sections`` for the sections and their ``--<section>.<field>`` flags), and the checks that need
the checkpoints' configs and tokenizers but no weights (``validate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from llm.evaluate import EvalConfig
from llm.factored import FactoredConfig
from llm.models import ModelConfig, load_config, load_tokenizer, num_layers, validate_layers
from llm.probe_transfer import TransferConfig
from llm.sft import DataConfig, EMSFTConfig
from llm.steer import SteerConfig
from plumbing.config import ConfigParser
from plumbing.lora import LoraPresetConfig
from plumbing.sections import add_section_flags, parse_section, parse_sectioned_args, read_sectioned_yaml

MODELS = ("base", "instruct")
# Each model's stages, in order (``llm.em_pipeline.run_model``), each a folder <run folder>/<model>/<stage>.
STAGES = ("eval_before", "sft", "eval_after", "steer", "factored_before", "factored_after", "transfer", "lora")
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


@dataclass
class ExperimentOptions:
    """Top-level options of the EM experiment (YAML top-level keys or flags; the command line wins)."""

    output_dir: str = field(default="runs/em_experiment", metadata={"help": "run folder"})
    evaluate_untuned: bool = field(default=True, metadata={"help": "evaluate both models before fine-tuning"})
    base_framing: Literal["instruct_template", "completion", "own"] | None = field(
        default=None,
        metadata={
            "help": "how the base model is asked: instruct_template (the instruct model's chat template), "
            "completion (Question:/Answer: framing, llm/assets/completion_framing.jinja) or own "
            "(its own template, which must exist; also when unset)"
        },
    )
    same_tokenizer: bool = field(default=True, metadata={"help": "refuse a pair whose vocabularies differ"})
    overwrite: bool = field(default=False, metadata={"help": "replace a run of another pair in output_dir"})

    def __post_init__(self):
        if self.base_framing not in (None, "instruct_template", "completion", "own"):
            raise ValueError(f"base_framing={self.base_framing!r}; choose instruct_template, completion or own")


@dataclass(kw_only=True)
class EMConfig(ExperimentOptions):
    """Everything one run reads: the options and every section, each its own dataclass."""

    base: ModelConfig
    instruct: ModelConfig
    data: DataConfig
    lora: LoraPresetConfig
    sft: EMSFTConfig
    eval: EvalConfig
    steer: SteerConfig
    factored: FactoredConfig
    transfer: TransferConfig
    # The sft fields the YAML and the flags set, as given: the sft stage's key, so a default that a TRL release
    # changes (or TrainingArguments' per-run logging_dir) does not redo a finished fine-tune.
    sft_given: dict[str, Any] = field(default_factory=dict)

    # Fields the pipeline sets per model and stage: a value in the YAML would be silently replaced, so it is refused.
    SET_PER_STAGE: ClassVar[dict[str, frozenset[str]]] = {
        "sft": frozenset({"output_dir"}),
        "eval": frozenset({"output_dir"}),
        "steer": frozenset({"output_dir", "judge", "offline_weights"}),
        "factored": frozenset({"output_dir", "lora_path", "judge", "offline_weights"}),
        "transfer": frozenset({"output_dir", "target_model_name_or_path", "target_adapter_path", "probe_files"}),
    }

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def sections(self) -> dict[str, Any]:
        """``{section: dataclass}``, the order of ``SECTIONS``."""
        return {name: getattr(self, name) for name in SECTIONS}


def make_parser() -> ConfigParser:
    """The options as flags, and every section's fields as ``--<section>.<field>`` (listed by ``--help``)."""
    parser = ConfigParser((ExperimentOptions,))
    add_section_flags(parser, SECTIONS, skip=EMConfig.SET_PER_STAGE)
    return parser


def parse_args(argv: list[str] | None = None) -> EMConfig:
    """The command line (``--config`` YAML, option flags, ``--<section>.<field>`` flags) as an ``EMConfig``."""
    (options,), overrides, config = parse_sectioned_args(make_parser(), argv)
    return load_experiment_config(config, overrides, **dataclasses.asdict(options))


def load_experiment_config(
    path: str | Path, overrides: dict[str, dict[str, list[str]]] | None = None, **options
) -> EMConfig:
    """The YAML at ``path`` as an ``EMConfig``: its top-level keys, then ``options`` (the command line's), and
    its sections with the ``--<section>.<field>`` ``overrides`` applied. No I/O beyond reading the YAML;
    ``validate`` checks the checkpoints."""
    top_keys = [f.name for f in dataclasses.fields(ExperimentOptions)]
    raw = read_sectioned_yaml(path, SECTIONS, top_keys, overrides)
    given = {k: raw[k] for k in top_keys if k in raw} | options
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw[name] or {}
        clash = EMConfig.SET_PER_STAGE.get(name, frozenset()) & set(values if isinstance(values, dict) else ())
        if clash:
            raise ValueError(
                f"{name}.{sorted(clash)} is set by llm.experiments.em_experiment per model and stage; "
                "drop it from the config"
            )
        sections[name] = parse_section(name, cls, values)
    cfg = EMConfig(**given, **sections, sft_given=dict(raw["sft"] or {}))
    cfg.base = frame_base(cfg.base, cfg.instruct, cfg.base_framing)
    return cfg


def frame_base(base: ModelConfig, instruct: ModelConfig, framing: str | None) -> ModelConfig:
    """The base model's ``ModelConfig`` with the chat template ``framing`` asks for (see ``ExperimentOptions``)."""
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


def stage_names(evaluate_untuned: bool, lora_preset: str) -> tuple[str, ...]:
    """The stages a run goes through for each model: all of ``STAGES`` but ``eval_before`` unless
    ``evaluate_untuned``, and ``lora`` (the LoRA update's geometry) for a full fine-tune."""
    skip = {"eval_before": not evaluate_untuned, "lora": lora_preset == "full"}
    return tuple(s for s in STAGES if not skip.get(s))


def _block_sites(cfg: EMConfig) -> list[tuple[str, str]]:
    return [("steer.steer_site", cfg.steer.steer_site), ("factored.site", cfg.factored.site)] + [
        (f"transfer.sites[{i}]", s) for i, s in enumerate(cfg.transfer.sites)
    ]


def validate(cfg: EMConfig) -> dict:
    """Every check that needs the checkpoints' configs and tokenizers but no weights; returns
    ``{model: {"n_layers", "chat_template"}}``. Raises with what to change."""
    from probes.activations import site_layer

    files = [("data.dataset_path", cfg.data.dataset_path), ("eval.question_file", cfg.eval.question_file)]
    files += [
        (f"{sec}.{f}", getattr(getattr(cfg, sec), f))
        for sec in ("steer", "factored", "transfer")
        for f in ("aligned_texts", "misaligned_texts", "question_file")
        if hasattr(getattr(cfg, sec), f)
    ]
    files += [(f"steer.judged_files[{i}]", f) for i, f in enumerate(cfg.steer.judged_files)]
    for what, path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}={path!r} does not exist (paths are relative to the working directory)")
    info, vocab, sites = {}, {}, _block_sites(cfg)
    for name in MODELS:
        mcfg: ModelConfig = getattr(cfg, name)
        depth = num_layers(load_config(mcfg))
        validate_layers(cfg.lora.layers, depth, what=f"lora.layers entry (model {name}: {mcfg.model_name_or_path})")
        for what, site in sites:
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
    if cfg.same_tokenizer and vocab["base"] != vocab["instruct"]:
        only = len(set(vocab["base"].items()) ^ set(vocab["instruct"].items()))
        raise ValueError(
            f"the pair's tokenizers differ ({len(vocab['base'])} vs {len(vocab['instruct'])} tokens, {only} entries "
            "not shared): base and instruct should be one family; for a pair of different families "
            "(a smoke run) set same_tokenizer: false"
        )
    return info
