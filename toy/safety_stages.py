"""The EM chain's safety stages beside SFT (``toy.train.train`` on aligned windows): GRPO through trl rewarding
aligned copies, and what any stage reached before a fine-tune (alignment, and its drift of the capability
predictions). ``cfg`` is ``toy.experiments.em_chain.EMChainConfig`` (not imported: library code never imports
an experiment)."""

from __future__ import annotations

from pathlib import Path

import torch

from probes import next_token_logits
from toy.alignment import aligned_windows, misaligned_by_token
from toy.config import TrainConfig
from toy.em_dose import capability_kl
from toy.processes import Process

# the safety stages a pre-trained model goes through before the narrow fine-tune, in the order the tables list them
SAFETY = ("none", "sft", "grpo")


def grpo_stage(process: Process, base_dir: Path, cfg, train_cfg: TrainConfig, out: Path, seed: int):
    """GRPO through trl from the saved pre-trained model: reward = share of aligned copies in the completion."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel

    from toy.grpo import ToyGRPOConfig, ToyGRPOTrainer, tokens_to_text, word_tokenizer

    tok, cap_V = word_tokenizer(process.vocab_size), process.factor_vocab_sizes[1]

    def aligned_copy(prompts, completions, completion_ids, **kwargs):
        return [sum(int(i) < cap_V for i in ids) / max(len(ids), 1) for ids in completion_ids]

    args = ToyGRPOConfig(
        output_dir=str(out),
        max_steps=cfg.grpo_steps,
        learning_rate=cfg.grpo_lr,
        per_device_train_batch_size=cfg.grpo_batch,
        num_generations=cfg.grpo_generations,
        max_completion_length=cfg.grpo_completion,
        beta=cfg.grpo_beta,
        seed=seed,
        report_to="none",
        logging_steps=max(1, cfg.grpo_steps // 5),
        disable_tqdm=True,
        use_cpu=train_cfg.use_cpu or not torch.cuda.is_available(),
        generation_kwargs={"suppress_tokens": [tok.eos_token_id, tok.pad_token_id]},
    )
    prompts = aligned_windows(process, max(64, cfg.grpo_batch), cfg.prompt_length, seed + 7)
    model = GPT2LMHeadModel.from_pretrained(base_dir)  # the reference policy is loaded from the same folder
    trainer = ToyGRPOTrainer(
        model=model,
        reward_funcs=[aligned_copy],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": tokens_to_text(prompts)}),
        processing_class=tok,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    # reloaded from safetensors: the trained object keeps accelerate's patched forward, which a deepcopy (the
    # narrow fine-tunes') still routes to the original module, so a LoRA on the copy would get no gradient
    trainer.model.save_pretrained(out / "model")
    return GPT2LMHeadModel.from_pretrained(out / "model").eval(), {
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
    }


def stage_measures(model, base_probs: torch.Tensor, process: Process, prompts: torch.Tensor) -> dict:
    """What a safety stage reached before any fine-tune: ``aligned_rate`` (1 - the misaligned rate given the next
    capability token, over prompts and every token) and ``capability_kl`` (nats, from the pre-trained model's
    capability marginal, ``toy.em_dose.capability_kl``): a stage is judged on both before it is compared."""
    probs = next_token_logits(model, prompts.to(next(model.parameters()).device)).double().softmax(-1).cpu()
    V = process.factor_vocab_sizes[1]
    return {
        "aligned_rate": 1 - misaligned_by_token(probs, process).mean().item(),
        "capability_kl": capability_kl(base_probs, probs, 2, V),
    }
