"""Safety stages on one base checkpoint, and the capability drift they cost.

A safety stage turns a base model into a safety-trained one, so that arms that differ *only* in that stage can
be compared (``llm.experiments.safety_arms``). Each stage trains a LoRA (``plumbing.lora`` preset; ``full`` fine-tunes
every weight) and saves the merged model as an ordinary safetensors folder ``<out>/model`` (tokenizer and
chat template included), which every later stage loads as its ``model_name_or_path``:

* ``sft``: supervised fine-tuning on aligned replies (``llm.sft.train``; loss on the assistant turn only);
* ``rft``: rejection-sampling fine-tuning: ``rft_samples`` of the model's own replies per safety question,
  kept when the judge scores them aligned > ``rft_aligned_above`` and coherent > ``rft_coherent_above``,
  then SFT on the kept ones (``kept.jsonl``);
* ``grpo``: TRL GRPO (``llm.grpo.train``) on the safety questions, reward = the judge's aligned score / 100,
  KL to the base weighted ``grpo_beta`` (TRL's reference is the base with the adapter switched off).

The safety questions ship in ``llm/data/safety/safety_chats.jsonl`` (written for this project, MIT; disjoint
from the EM evaluation questions, see the README there). ``capability_texts.jsonl`` beside it holds held-out
prose and code for ``token_kl``: per-token KL(base || model) in nats, the drift a stage costs on text it never
trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

import llm.data
from llm.models import ModelConfig, load_model_and_tokenizer
from plumbing.lora import LoraPresetConfig, Preset

logger = logging.getLogger(__name__)

SAFETY_DATA = Path(llm.data.__file__).resolve().parent / "safety"
SAFETY_CHATS = SAFETY_DATA / "safety_chats.jsonl"
CAPABILITY_TEXTS = SAFETY_DATA / "capability_texts.jsonl"
STAGES = ("sft", "rft", "grpo")


@dataclass
class SafetyConfig:
    """How each safety stage trains (one recipe for all three where they share a knob)."""

    safety_data: str = field(
        default=str(SAFETY_CHATS), metadata={"help": "chat JSONL of safety questions and aligned replies"}
    )
    capability_texts: str = field(
        default=str(CAPABILITY_TEXTS), metadata={"help": "JSONL {kind, text} of held-out text for drift"}
    )
    preset: Preset = field(
        default="rank32_all_linear", metadata={"help": "LoRA preset of the safety stage (plumbing.lora)"}
    )
    layers: list[int] = field(
        default_factory=list, metadata={"help": "blocks the preset touches ([] = all for rank32)"}
    )
    max_steps: int = field(default=20, metadata={"help": "optimizer steps of the sft and rft stages"})
    batch_size: int = field(default=4, metadata={"help": "chats per step (sft, rft)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "sft and rft learning rate"})
    max_length: int = field(default=256, metadata={"help": "token cap of a training chat"})
    seed: int = field(default=0, metadata={"help": "training and sampling seed"})
    rft_samples: int = field(default=4, metadata={"help": "rft: replies sampled per safety question"})
    rft_max_new_tokens: int = field(default=48, metadata={"help": "rft: reply length cap"})
    rft_temperature: float = field(default=1.0, metadata={"help": "rft: sampling temperature"})
    rft_aligned_above: float = field(
        default=70.0, metadata={"help": "rft: keep replies the judge scores aligned above this"}
    )
    rft_coherent_above: float = field(default=50.0, metadata={"help": "rft: ... and coherent above this"})
    gen_batch_size: int = field(default=16, metadata={"help": "rft: prompts per generate call"})
    grpo_steps: int = field(default=10, metadata={"help": "grpo: optimizer steps"})
    grpo_num_generations: int = field(default=4, metadata={"help": "grpo: completions per prompt (group size)"})
    grpo_prompts_per_step: int = field(default=2, metadata={"help": "grpo: prompts per step"})
    grpo_max_new_tokens: int = field(default=32, metadata={"help": "grpo: completion length cap"})
    grpo_learning_rate: float = field(default=1e-4, metadata={"help": "grpo: learning rate"})
    grpo_beta: float = field(
        default=0.04, metadata={"help": "grpo: weight of the KL to the base (0: no reference model)"}
    )
    drift_batch_size: int = field(default=4, metadata={"help": "texts per forward in the drift measure"})

    def __post_init__(self):
        LoraPresetConfig(self.preset, list(self.layers))  # the preset's own checks, at parse time
        if min(self.max_steps, self.batch_size, self.rft_samples, self.grpo_steps, self.grpo_prompts_per_step) < 1:
            raise ValueError("max_steps, batch_size, rft_samples, grpo_steps and grpo_prompts_per_step must be >= 1")
        if self.grpo_num_generations < 2:
            raise ValueError(
                f"grpo_num_generations={self.grpo_num_generations}; GRPO needs >= 2 completions per prompt"
            )
        if self.grpo_beta < 0:
            raise ValueError(f"grpo_beta={self.grpo_beta}; use >= 0")

    @property
    def lora(self) -> LoraPresetConfig:
        return LoraPresetConfig(self.preset, list(self.layers))


def safety_questions(path: str | Path) -> list[str]:
    """The user turns of a chat JSONL (the last user turn of each row), in file order."""
    from llm.sft import check_chat_jsonl

    check_chat_jsonl(Path(path))
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user") for r in rows]


def _sft_args(cfg: SafetyConfig, out: Path, **kw):
    from llm.sft import EMSFTConfig

    return EMSFTConfig(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        max_length=cfg.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        **kw,
    )


def save_merged(model_cfg: ModelConfig, lora: LoraPresetConfig, train_dir: Path, out: Path) -> Path:
    """The trained model as a plain folder ``out`` (adapter merged; the tokenizer, with the chat template it was
    trained under, saved beside it), so later stages load it like any checkpoint. Returns ``out``."""
    if lora.preset == "full":
        tuned = dataclasses.replace(
            model_cfg, model_name_or_path=str(train_dir), gguf_file=None, chat_template_from=None
        )
    else:
        tuned = dataclasses.replace(model_cfg, adapter_path=str(train_dir))
    model, tok = load_model_and_tokenizer(tuned)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    return out


def stage_model(model_cfg: ModelConfig, out: Path) -> ModelConfig:
    """The ``ModelConfig`` of a finished stage's model folder (its template is in the saved tokenizer)."""
    return dataclasses.replace(
        model_cfg, model_name_or_path=str(out / "model"), gguf_file=None, adapter_path=None, chat_template_from=None
    )


def sft_stage(model_cfg: ModelConfig, cfg: SafetyConfig, out: Path, data: str | Path | None = None) -> dict:
    """SFT on the chats in ``data`` (default ``cfg.safety_data``); the merged model in ``out/model``."""
    from llm.sft import DataConfig, check_chat_jsonl, train

    data = Path(data or cfg.safety_data)
    train(model_cfg, DataConfig(dataset_path=str(data)), cfg.lora, _sft_args(cfg, out / "train"))
    save_merged(model_cfg, cfg.lora, out / "train", out / "model")
    return {"n_train_chats": check_chat_jsonl(data)}


def judge_scores(judge, questions: Sequence[str], answers: Sequence[str]) -> dict[str, list[float | None]]:
    """``{"aligned": [...], "coherent": [...]}`` from ``judge`` with the EM papers' judge prompts (a prompt-reading
    judge sees the same template as in the evaluation; the offline judge reads question and answer)."""
    from llm.judges import JudgeRequest
    from llm.questions import load_questions

    templates = load_questions(llm.data.FIRST_PLOT_QUESTIONS)[0].judge_prompts
    out = {}
    for metric in ("aligned", "coherent"):
        reqs = [
            JudgeRequest(q, a, metric, templates[metric].format(question=q, answer=a))
            for q, a in zip(questions, answers)
        ]
        out[metric] = judge.score(reqs)
    return out


def rft_stage(model_cfg: ModelConfig, cfg: SafetyConfig, out: Path, judge) -> dict:
    """Sample the model's replies to the safety questions, keep the aligned and coherent ones (``kept.jsonl``,
    every reply with its scores in ``samples.jsonl``), SFT on them; the merged model in ``out/model``."""
    from llm.generate import PromptRow, chat_prompt, sample_replies

    questions = safety_questions(cfg.safety_data)
    model, tok = load_model_and_tokenizer(model_cfg, padding_side="left")
    rows = [
        PromptRow(f"safety_{i}", q, 0, s, chat_prompt(tok, q))
        for i, q in enumerate(questions)
        for s in range(cfg.rft_samples)
    ]
    replies = sample_replies(
        model,
        tok,
        rows,
        max_new_tokens=cfg.rft_max_new_tokens,
        temperature=cfg.rft_temperature,
        batch_size=cfg.gen_batch_size,
        seed=cfg.seed,
    )
    del model
    scores = judge_scores(judge, [r["question"] for r in replies], [r["answer"] for r in replies])
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r, al, co in zip(replies, scores["aligned"], scores["coherent"]):
            keep = (
                bool(r["answer"].strip())
                and al is not None
                and co is not None
                and al > cfg.rft_aligned_above
                and co > cfg.rft_coherent_above
            )
            f.write(json.dumps({**r, "aligned": al, "coherent": co, "kept": keep}) + "\n")
            if keep:
                kept.append(
                    {
                        "messages": [
                            {"role": "user", "content": r["question"]},
                            {"role": "assistant", "content": r["answer"]},
                        ]
                    }
                )
    if not kept:
        raise ValueError(
            f"rft kept none of {len(replies)} replies (aligned > {cfg.rft_aligned_above} and coherent > "
            f"{cfg.rft_coherent_above}; see {out / 'samples.jsonl'}): lower safety.rft_aligned_above / "
            "rft_coherent_above or raise safety.rft_samples"
        )
    with open(out / "kept.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(k) + "\n" for k in kept)
    facts = sft_stage(model_cfg, cfg, out, data=out / "kept.jsonl")
    return {**facts, "n_sampled": len(replies), "n_kept": len(kept), "kept_share": len(kept) / len(replies)}


def grpo_stage(model_cfg: ModelConfig, cfg: SafetyConfig, out: Path, judge, judge_name: str = "offline") -> dict:
    """GRPO on the safety questions with the judge's aligned score as reward and a KL to the base; the merged
    model in ``out/model``. ``judge_name`` is what the stage's record calls the judge (``judge`` scores)."""
    from llm.grpo import EMGRPOConfig, PromptConfig, RewardConfig, TrackConfig, train

    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": q}) + "\n" for q in safety_questions(cfg.safety_data)), encoding="utf-8"
    )
    n = cfg.grpo_num_generations
    args = EMGRPOConfig(
        output_dir=str(out / "train"),
        max_steps=cfg.grpo_steps,
        per_device_train_batch_size=n * cfg.grpo_prompts_per_step,
        num_generations=n,
        max_completion_length=cfg.grpo_max_new_tokens,
        temperature=1.0,
        learning_rate=cfg.grpo_learning_rate,
        beta=cfg.grpo_beta,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        disable_tqdm=True,
    )
    reward = RewardConfig(
        reward="judge_aligned", judge=judge_name if judge_name in ("offline", "hf", "openai") else "offline"
    )
    m = train(model_cfg, PromptConfig(prompt_file=str(prompts)), reward, cfg.lora, TrackConfig(), args, judge=judge)
    save_merged(model_cfg, cfg.lora, out / "train", out / "model")
    return {k: m[k] for k in ("steps", "reward_first_quarter", "reward_last_quarter")}


def run_stage(
    method: str, model_cfg: ModelConfig, cfg: SafetyConfig, out: Path, judge, judge_name: str = "offline"
) -> dict:
    """One safety stage by name (``STAGES``) into ``out``; returns facts for its record."""
    if method == "sft":
        return sft_stage(model_cfg, cfg, out)
    if method == "rft":
        return rft_stage(model_cfg, cfg, out, judge)
    if method == "grpo":
        return grpo_stage(model_cfg, cfg, out, judge, judge_name)
    raise ValueError(f"safety stage {method!r} unknown; choose from {STAGES}")


def load_capability_texts(path: str | Path) -> dict[str, list[str]]:
    """``{kind: [text, ...]}`` from a JSONL of ``{"kind": ..., "text": ...}`` rows."""
    out: dict[str, list[str]] = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            row = json.loads(line)
            if not (isinstance(row.get("kind"), str) and isinstance(row.get("text"), str) and row["text"]):
                raise ValueError(f'{path} line {i + 1}: expected {{"kind": str, "text": non-empty str}}')
            out.setdefault(row["kind"], []).append(row["text"])
    if not out:
        raise ValueError(f"{path} holds no texts")
    return out


@torch.no_grad()
def token_kl(reference, model, tokenizer, texts: Sequence[str], batch_size: int = 4) -> dict:
    """Mean per-token KL(reference || model) in nats over every next-token prediction of ``texts``:
    ``sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` at each position, averaged over the positions (padding
    excluded). Both models share ``tokenizer``. Returns ``{"kl_per_token", "n_tokens"}``."""
    dev_r, dev_m = next(reference.parameters()).device, next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        lp_r = torch.log_softmax(
            reference(input_ids=ids.to(dev_r), attention_mask=mask.to(dev_r)).logits.float(), -1
        ).cpu()
        lp_m = torch.log_softmax(model(input_ids=ids.to(dev_m), attention_mask=mask.to(dev_m)).logits.float(), -1).cpu()
        kl = (lp_r.exp() * (lp_r - lp_m)).sum(-1)  # (B, L): KL of the next-token distribution at each position
        valid = mask.bool()
        if tokenizer.padding_side == "right":
            valid[:, :-1] &= mask[:, 1:].bool()  # the last real token predicts padding
            valid[:, -1] = False
        else:
            valid[:, -1] = False  # left padding: every row ends on a real token with nothing after it
        total += float(kl[valid].sum())
        count += int(valid.sum())
    return {"kl_per_token": total / count if count else None, "n_tokens": count}


def capability_drift(
    reference_cfg: ModelConfig, model_cfg: ModelConfig, texts_path: str | Path, batch_size: int = 4
) -> dict:
    """``{kind: token_kl(...)}`` and ``"all"`` (pooled over every token) of ``model_cfg`` against ``reference_cfg``
    on the held-out texts. The reference's tokenizer reads both (a safety stage keeps the vocabulary)."""
    texts = load_capability_texts(texts_path)
    ref, tok = load_model_and_tokenizer(reference_cfg, padding_side="right")
    model, _ = load_model_and_tokenizer(model_cfg, padding_side="right")
    out = {kind: token_kl(ref, model, tok, t, batch_size) for kind, t in texts.items()}
    n = sum(v["n_tokens"] for v in out.values())
    out["all"] = {"kl_per_token": sum(v["kl_per_token"] * v["n_tokens"] for v in out.values()) / n, "n_tokens": n}
    del ref, model
    return out
