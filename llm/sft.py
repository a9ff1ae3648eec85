"""Emergent-misalignment fine-tuning: TRL ``SFTTrainer`` on chat JSONL, loss on assistant tokens only.

    python -m llm.sft --config configs/llm/em_sft_smollm2.yaml
    python -m llm.sft --config configs/llm/em_sft_smollm2.yaml --preset rank32_all_linear --output_dir runs/em_r32

    # several processes (one per GPU; DDP), same flags:
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.sft --config configs/llm/em_sft_smollm2.yaml
    # FSDP for models that do not fit one GPU with full fine-tuning:
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m llm.sft --config configs/llm/em_sft_qwen25_0p5b.yaml
    # 2 CPU processes (gloo), e.g. to check the distributed path without a GPU:
    accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.sft --config ...
    torchrun --nproc_per_node 2 -m llm.sft --config ...

The data file holds one ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` per
line. Loss is on assistant tokens only: through ``assistant_only_loss`` when the chat template has
(or TRL can supply) ``{% generation %}`` markers, otherwise by converting each example to
prompt (all turns before the last assistant turn) / completion (that turn) and using
``completion_only_loss``. Unknown config keys are an error. Layer indices are checked against the
model's depth before any weights load. The output folder holds the adapter (or full model) as
safetensors, HF ``checkpoint-*`` folders for ``--resume_from_checkpoint`` (a path, or ``last``),
and ``lora_trajectory/`` with A/B at every logging step (see ``llm.lora.lora_trajectory_report``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig

from llm.lora import LoraPresetConfig, LoraTrajectoryCallback, assert_trainable, peft_config_for
from llm.models import ModelConfig, load_config, load_model_and_tokenizer, num_layers, validate_layers

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which chat examples to train on."""

    dataset_path: str = field(
        default=None,
        metadata={"help": 'Chat JSONL, one {"messages": [...]} per line (e.g. llm/data/em/insecure_code.jsonl).'},
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Train on this many examples, drawn at random (None: all)."}
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed for drawing the max_examples subset."})

    def __post_init__(self):
        if not self.dataset_path:
            raise ValueError("dataset_path is required: a chat JSONL file")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples={self.max_examples}; use a positive count or None for all")


@dataclass
class EMSFTConfig(SFTConfig):
    """``trl.SFTConfig`` with this project's defaults, resolved in this one place:
    ``bf16`` None -> True only when CUDA is available (TRL would turn it on even on CPU), and
    activation (gradient) checkpointing off unless asked with ``activation_checkpointing`` (TRL turns
    it on; it costs ~20% speed and is not needed for <=2B LoRA runs). ``trust_remote_code`` is taken from ``ModelConfig``."""

    # None (not False) so transformers' deprecated-alias resolution stays silent; it then
    # resolves activation_checkpointing None -> False. Turn on with --activation_checkpointing.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (default off)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast; None = on when CUDA is available, off on CPU."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log (and save the LoRA trajectory) every X steps."})
    # ModelConfig owns this flag (one --trust_remote_code); build_trainer copies it here.
    trust_remote_code: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and not self.fp16 and not self.use_cpu
        super().__post_init__()


def load_chat_jsonl(cfg: DataConfig):
    """``datasets.Dataset`` with the single column ``messages`` (a subset when ``max_examples``)."""
    from datasets import load_dataset

    path = Path(cfg.dataset_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset_path {path} does not exist")
    ds = load_dataset("json", data_files=str(path), split="train")
    if "messages" not in ds.column_names:
        raise ValueError(f"{path}: expected a 'messages' field per line, found {ds.column_names}")
    ds = ds.select_columns(["messages"])
    if cfg.max_examples is not None:
        if cfg.max_examples > len(ds):
            raise ValueError(f"max_examples={cfg.max_examples} but {path} has only {len(ds)} examples")
        ds = ds.shuffle(seed=cfg.subset_seed).select(range(cfg.max_examples))
    return ds


def _to_prompt_completion(example: dict) -> dict:
    msgs = example["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"example without an assistant turn: {msgs!r}")
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def configure_assistant_loss(dataset, tokenizer, args: SFTConfig):
    """Make TRL put the loss on assistant tokens only; returns the dataset to train on.

    Sets ``args.assistant_only_loss`` when the tokenizer's chat template has generation markers or
    TRL knows a training template for it; otherwise converts to prompt/completion (only the last
    assistant turn is trained) and sets ``args.completion_only_loss``.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tokenizer has no chat_template; set ModelConfig.chat_template_from to a checkpoint that has one "
            "(for a base model, its instruct sibling)"
        )
    markers = has_generation_markers(tokenizer.chat_template)
    if not markers:
        try:
            markers = get_training_chat_template(tokenizer) is not None
        except (ValueError, NotImplementedError):
            markers = False
    if markers:
        args.assistant_only_loss, args.completion_only_loss = True, None
        return dataset
    logger.info("chat template has no generation markers: training on prompt/completion pairs instead")
    args.assistant_only_loss, args.completion_only_loss = False, True
    return dataset.map(_to_prompt_completion, remove_columns=["messages"])


def build_trainer(model_cfg: ModelConfig, data_cfg: DataConfig, lora_cfg: LoraPresetConfig, args: SFTConfig):
    """An ``SFTTrainer`` ready to ``train()``; validates layers before loading any weights."""
    from transformers import set_seed
    from trl import SFTTrainer

    args.trust_remote_code = model_cfg.trust_remote_code
    depth = num_layers(load_config(model_cfg))
    validate_layers(lora_cfg.layers, depth)
    dataset = load_chat_jsonl(data_cfg)
    model, tokenizer = load_model_and_tokenizer(model_cfg, padding_side="right")
    dataset = configure_assistant_loss(dataset, tokenizer, args)
    set_seed(args.seed)  # the LoRA A init draws from the global RNG
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config_for(lora_cfg, model), callbacks=[LoraTrajectoryCallback()],
    )
    n = assert_trainable(trainer.model)
    logger.info("preset %s: %d trainable parameters", lora_cfg.preset, n)
    return trainer


def _resume_arg(value: str | None, output_dir: str) -> str | None:
    if value != "last":
        return value
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        logger.info("resume_from_checkpoint=last but no checkpoint in %s: starting fresh", output_dir)
    return last


def train(model_cfg: ModelConfig, data_cfg: DataConfig, lora_cfg: LoraPresetConfig, args: SFTConfig) -> Path:
    """Fine-tune and save to ``args.output_dir`` (adapter or full model + tokenizer); returns that folder."""
    trainer = build_trainer(model_cfg, data_cfg, lora_cfg, args)
    state = trainer.accelerator.state
    logger.info("world size %d, process %d, device %s", state.num_processes, state.process_index, state.device)
    trainer.train(resume_from_checkpoint=_resume_arg(args.resume_from_checkpoint, args.output_dir))
    trainer.save_model(args.output_dir)
    return Path(args.output_dir)


def make_parser():
    from trl import TrlParser

    return TrlParser((ModelConfig, DataConfig, LoraPresetConfig, EMSFTConfig))


def main(argv: list[str] | None = None) -> Path:
    model_cfg, data_cfg, lora_cfg, args = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = train(model_cfg, data_cfg, lora_cfg, args)
    end_processes()
    return out


def end_processes() -> None:
    """Under a multi-process launch, wait for every rank and destroy the process group before exit: a gloo
    rank that exits with the group alive can abort in teardown ("terminate called without an active
    exception", seen once in CI after a finished 2-rank run). A no-op in a single process."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()
