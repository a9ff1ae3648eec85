"""TRL's ``GRPOTrainer`` with the toy RL experiments' two changes, ``ToyGRPOTrainer`` (configured by
``toy.grpo.ToyGRPOConfig``):

- ``advantage: grpo`` is TRL's ``(r - group mean) / group std``; ``advantage: maxrl`` is ``(r - group mean) / group
  mean`` (MaxRL, arXiv:2602.02710), an estimator of the gradient of log(pass rate). With one-token completions and a
  0/1 reward GRPO's objective is the expected reward, whose gradient vanishes on prompts the policy answers
  confidently wrong; MaxRL keeps their gradient.
- One-token steps without TRL's overhead (``one_token_path: forward``, the default): a completion of one token
  depends on its prompt alone, so the step samples it from one forward pass over the *distinct* prompts (HF
  ``generate`` runs every one of the ``num_generations`` copies) and scores policy and reference from the prompts'
  last position, again once per distinct prompt (TRL runs every copy with its completion appended). Same
  sampling distribution, same draws from the same RNG, same loss: ~4x fewer model FLOPs per step with 4
  completions per prompt. ``one_token_path: generate`` keeps TRL's own path.

TRL has no public seam for the advantages or the sampler, so ``ToyGRPOTrainer`` wraps four private
``GRPOTrainer`` methods, ``_calculate_rewards``, ``_generate_and_score_completions``, ``_generate_single_turn``
and ``_get_per_token_logps_and_entropies``: trl is pinned to the minor version the tests pass on
(pyproject.toml), the options the wrappers do not handle are refused when the config or the trainer is built,
and ``tests/test_rl.py`` fails loudly when TRL moves any of them.
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer


def maxrl_advantages(centred: torch.Tensor, group_mean: torch.Tensor) -> torch.Tensor:
    """MaxRL advantages ``(r - m) / m`` from TRL's centred ones ``r - m`` and each completion's group mean ``m``
    (both ``(N,)``). ``E[(r - m) / m * grad log pi]`` estimates ``grad log p`` (p = the prompt's pass rate):
    a prompt's weight is ``1 / p`` where GRPO's is ``1 / std = 1 / sqrt(p (1 - p))``, so confidently wrong
    prompts keep a gradient. A group with ``m = 0`` has nothing to learn from and stays at 0."""
    return torch.where(group_mean > 0, centred / group_mean.clamp_min(1e-12), torch.zeros_like(centred))


class ToyGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose advantages follow ``args.advantage`` (see ``ToyGRPOConfig``): with ``"maxrl"``,
    TRL's centred advantages (``scale_rewards="none"``) are divided by their group's mean reward. With
    ``max_completion_length: 1`` and ``one_token_path: forward``, one-token completions are sampled and scored
    once per distinct prompt (``_generate_single_turn``, ``_get_per_token_logps_and_entropies``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._one_token = (
            getattr(self.args, "one_token_path", "generate") == "forward" and self.max_completion_length == 1
        )
        if self._one_token:
            self._check_one_token_path()

    def _check_one_token_path(self) -> None:
        """Refuse what the one-token path would not reproduce, with what to change."""
        gc, extra = self.generation_config, set(self.args.generation_kwargs or {}) - {"suppress_tokens"}
        # what generate would also read from the model's own generation config (e.g. min_new_tokens, bad_words_ids)
        extra |= set(self.model.generation_config.to_diff_dict()) - {
            "_from_model_config",
            "transformers_version",
            "use_cache",
            "output_attentions",
            "output_hidden_states",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        }
        refused = {
            "vLLM, continuous batching, tools or a rollout_func": self.use_vllm
            or self.use_transformers_continuous_batching
            or bool(self.tools)
            or self.rollout_func is not None,
            "DeepSpeed or FSDP": self.is_deepspeed_enabled or self.is_fsdp_enabled,
            "pad_to_multiple_of": self.pad_to_multiple_of is not None,
            "top_k, top_p, min_p or repetition_penalty": gc.top_k not in (None, 0)
            or gc.top_p not in (None, 1.0)
            or gc.min_p is not None
            or gc.repetition_penalty not in (None, 1.0),
            f"generation settings {sorted(extra)}": bool(extra),
            "dropout (disable_dropout: true removes it)": any(
                isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()
            ),
        }
        for what, bad in refused.items():
            if bad:
                raise ValueError(
                    f"one_token_path='forward' samples from temperature and suppress_tokens only, one forward "
                    f"pass per distinct prompt, and does not handle {what}; use one_token_path='generate'"
                )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """HF ``generate``'s one sampling step, on the distinct prompts only: float32 last-position logits,
        ``suppress_tokens`` at -inf, divided by the temperature, softmax, then ``torch.multinomial(probs, 1)`` on
        every row, as generate draws it (so a seed gives the same completions)."""
        if not self._one_token:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if len({len(ids) for ids in prompt_ids}) != 1:
            raise ValueError(
                "one_token_path='forward' needs prompts of one length (no padding); use one_token_path='generate'"
            )
        ids = torch.tensor(prompt_ids, device=self.accelerator.device)
        distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
        with torch.no_grad():
            logits = self.model(input_ids=distinct, logits_to_keep=1).logits[:, -1].float()
        suppress = self.generation_config.suppress_tokens
        if suppress:
            logits[:, torch.as_tensor(suppress, device=logits.device)] = -float("inf")
        if self.temperature != 1.0:
            logits = logits / self.temperature
        tokens = torch.multinomial(logits.softmax(-1)[inverse], num_samples=1)
        return tokens.tolist(), None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """TRL's per-token log-probs (and entropies) of a one-token completion, ``(B, 1)``: a completion token depends
        on its prompt alone (causal attention), so the model runs once per distinct prompt, without the completion,
        and every copy reads its prompt's last-position log-softmax (temperature-scaled, as TRL's fused head); a
        masked completion token scores 0, as in TRL."""
        if (
            not self._one_token
            or logits_to_keep != 1
            or compute_aux_loss
            or any(v is not None for v in multimodal.values())
        ):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )
        n = input_ids.size(1) - 1
        rows, inverse = torch.unique(
            torch.cat([input_ids[:, :-1], attention_mask[:, :-1].to(input_ids.dtype)], 1), dim=0, return_inverse=True
        )
        with self.accelerator.autocast():
            logits = model(input_ids=rows[:, :n], attention_mask=rows[:, n:], logits_to_keep=1).logits[:, -1]
        logp = (logits.float() / self.temperature).log_softmax(-1)[inverse]  # (B, V)
        scored = attention_mask[:, -1:] == 1
        logps = logp.gather(1, input_ids[:, -1:]).masked_fill(~scored, 0.0)
        entropies = (-(logp.exp() * logp).sum(1, keepdim=True)).masked_fill(~scored, 0.0) if compute_entropy else None
        return logps, entropies, None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # every process's completions, in generation order
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if getattr(self.args, "advantage", "grpo") != "maxrl" or not self.model.training:
            return output
        per_func = self._last_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(1)
        rewards[torch.isnan(per_func).all(1)] = float("nan")  # unscorable: out of the group mean, as in TRL
        if (rewards < 0).any():
            raise ValueError(
                "advantage='maxrl' needs rewards >= 0 (it divides by a group's mean reward); "
                "shift the reward or use advantage='grpo'"
            )
        G = self.num_generations
        mean = rewards.view(-1, G).nanmean(1).repeat_interleave(G)
        n = len(output["advantages"])  # this process's completions: TRL slices them in process order
        local = mean[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
        output["advantages"] = maxrl_advantages(output["advantages"], local.to(output["advantages"].device))
        return output
