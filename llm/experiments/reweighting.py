"""The reweighting report for a (reference, post-RL) checkpoint pair with a verifiable reward.

    python -m llm.experiments.reweighting --config configs/llm/reweighting_smollm2_add_mul.yaml
    python -m llm.experiments.reweighting --config configs/llm/reweighting_qwen25_1p5b.yaml --n_samples 128 --k_max 128
    python -m llm.experiments.reweighting --config configs/llm/reweighting_smollm2_mul10_add_gpu.yaml   # one GPU: GRPO + k up to 256
    # one GPU (the report runs as ONE process; several processes are refused, see below):
    accelerate launch --config_file configs/accelerate/single_gpu.yaml -m llm.experiments.reweighting --config configs/llm/reweighting_gemma2_2b.yaml

The post-RL policy is ``post_model`` (a hub id / folder / .gguf; default: ``reference_model``'s weights) with ``post_adapter``
(a peft adapter folder, e.g. an ``llm.grpo`` output_dir) merged in. With ``grpo_config`` set and no adapter yet in
``post_adapter``, ``llm.grpo`` trains it first with that config (whose ``output_dir`` must be ``post_adapter``).

Prompts: the eval split of an ``llm.tasks`` task (disjoint from the GRPO train split), or ``eval_file``, a JSONL of
``{"question": str, "answer": int, "latent": int}`` rows (optional ``"group": str``: the probe folds' group). Both models see the same prompt text (the post-RL
tokenizer's chat template; the two tokenizers must have the same vocabulary). What the report measures:

* **pass@k** (``probes.passk``): ``n_samples`` replies per prompt from each model (``llm.fastgen``, temperature 1,
  top-p 1, no top-k: the models' full distributions), scored by the task (``llm.tasks.score``); the unbiased
  estimator for k = 1, 2, 4, ... ``k_max`` with bootstrap CIs over prompts; coverage (solved by one, the other,
  both, neither) at k = 1, ``k_verdict`` and ``k_max``; the three verdicts of ``probes.passk`` with ``PassKConfig``'s
  thresholds as committed (not options here), with uniform guessing over the task's answers as chance: "sharper at
  k" (the pass@k gain at ``k_verdict``), "wider at k" (at ``k_max``) and "outside the reference's support at K" (the
  reference's probability of the post-RL policy's correct replies, importance-sampled from their log-likelihoods,
  below 1/K; the only verdict that can show new support: ``pi_ref exp(beta r) / Z`` passes the other two). "Sharper"
  is taken at ``k_verdict``, the largest k of the curve at which guessing solves less than
  ``max_chance`` of the prompts (``probes.passk.informative_k``; fixed from the task and ``k_max`` before any sampling
  and printed then): a large budget extends the curves without turning the verdict "uninformative". When guessing
  reaches ``max_chance`` already at k = 1 the verdict is "uninformative" as before.
* **Few-shot elicitation baseline** (``shots``, default 3, task prompts only): the reference also answers after
  ``shots`` worked train-split examples (``llm.tasks.worked_examples``) and the post-RL policy is judged against it
  too: a capability the reference shows with a few examples in context is elicited by RL, not new.
* **Inside the reference's distribution?** Mean log-likelihood per token (nats) under the reference of the
  post-RL replies vs of the reference's own replies, and the share of post-RL replies less likely under the
  reference than the 5th percentile of its own replies (sequences scored with their eos; lengths differ, so the
  per-token mean is the comparable number).
* **KL(post || ref)** on the shared prompts: Monte-Carlo over the post-RL samples, ``E[log p_post(y) - log
  p_ref(y)]`` per reply (nats; also per token). Only with temperature 1 and top-p 1 (else the samples are not from
  p_post and the estimate is left out).
* **Belief side** (ladder idea of the toy detector): a cross-fitted ridge probe (``probes.linear``) of the task's
  intermediate latent (``add_mul``: a + b) with folds grouped by ``TaskPrompt.group`` (the operand pair that fixes
  the latent, met with several last operands; one-step tasks: each prompt alone) from the residual stream (``probes.activations``, the nnsight adapter)
  at the prompt's last position, at every site, for the reference, the post-RL model and a random-init model of
  the same architecture (the control: a random network already "reads" some of any input). Readable at a site =
  held-out R^2 > 0 and test MSE at most ``readable_ratio`` x the random-init control's. Then: is it readable in
  the reference before RL, and does the post-RL model read it better at the output-side sites (the last quarter
  of blocks and the final norm)? Readability is not use.

Guards, all before any sampling: ``k_max > n_samples``; an eval file row without an integer answer (or latent,
when probing); a post_adapter folder without an adapter, or one whose modules / shapes do not exist in the base
model; tokenizers with different vocabularies; more than one process (``WORLD_SIZE > 1``: the report splits no
work across ranks; run it with ``--num_processes 1``, it fits one GPU at 2B).

Writes ``output_dir``: ``report.json``, ``report.md``, ``passk.png``, ``samples.jsonl`` (every decoded reply with
its score) and ``verdict_data.json`` (per-prompt counts and the correct post-RL replies' log-likelihoods, from which
``python -m llm.experiments.reweighting_report <output_dir>`` re-derives every verdict).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llm.experiments.reweighting_report import judge, verdict_data, verdict_k, write_report
from llm.fastgen import all_reply_logprobs
from llm.reweighting_belief import belief_side
from llm.tasks import TaskName, TaskPrompt, chance_p, score, task_prompts, worked_examples
from probes.passk import (
    PassKConfig,
    coverage,
    log2_ks,
    pass_at_k_curve,
)

logger = logging.getLogger(__name__)


@dataclass
class ReweightingConfig:
    """One report: the pair, the prompts, the sampling budget and the probe."""

    reference_model: str = field(default=None, metadata={"help": "reference checkpoint: hub id, folder or .gguf"})
    post_model: str | None = field(
        default=None, metadata={"help": "post-RL checkpoint (None: the reference's weights + post_adapter)"}
    )
    post_adapter: str | None = field(
        default=None, metadata={"help": "peft adapter folder merged into post_model (an llm.grpo output_dir)"}
    )
    grpo_config: str | None = field(
        default=None, metadata={"help": "llm.grpo YAML that trains post_adapter first when it holds no adapter yet"}
    )
    task: TaskName | None = field(default="add_mul", metadata={"help": "llm.tasks task (its eval split)"})
    eval_file: str | None = field(
        default=None, metadata={"help": "JSONL of {question, answer, latent[, group]} instead of task"}
    )
    n_eval: int = field(default=48, metadata={"help": "task: eval prompts (the rest is GRPO's train split)"})
    split_seed: int = field(default=0, metadata={"help": "task: seed of the train/eval split"})
    n_samples: int = field(default=64, metadata={"help": "replies per prompt and model"})
    k_max: int | None = field(
        default=None, metadata={"help": "largest k of the curves (None: n_samples); must be <= n_samples"}
    )
    max_new_tokens: int = field(default=16, metadata={"help": "reply length cap (tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (1: the model's distribution)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus cut (1: none)"})
    batch_size: int = field(default=256, metadata={"help": "rows per sampling batch"})
    score_batch_size: int = field(default=64, metadata={"help": "rows per log-likelihood / activation forward pass"})
    n_boot: int = field(
        default=1000,
        metadata={"help": "bootstrap resamples of prompts for the plotted pass@k CIs (the verdicts' CIs: PassKConfig)"},
    )
    shots: int = field(
        default=3,
        metadata={
            "help": "the few-shot elicitation baseline: the reference also answers after this many worked train-split examples (0: none; task only, an eval_file has no train split)"
        },
    )
    probe_n: int = field(default=256, metadata={"help": "prompts the latent probe is fitted on (0: no belief side)"})
    probe_alpha: float = field(
        default=10.0, metadata={"help": "ridge strength of the latent probe (targets standardised)"}
    )
    probe_folds: int = field(default=5, metadata={"help": "cross-fitting folds of the latent probe"})
    readable_ratio: float = field(
        default=0.8, metadata={"help": "readable = test MSE <= this x the random-init control's (and R^2 > 0)"}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"}
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager for Gemma 2 (soft-capped attention)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling / probe seed"})
    output_dir: str = field(default="runs/reweighting_llm/report", metadata={"help": "where the report goes"})

    def __post_init__(self):
        if not self.reference_model:
            raise ValueError("reference_model is required: the checkpoint before RL (hub id, folder or .gguf)")
        if self.post_model is None and self.post_adapter is None:
            raise ValueError(
                "set post_model (a post-RL checkpoint) and/or post_adapter (a peft adapter folder); "
                "without either the report compares the reference with itself"
            )
        if (self.task is None) == (self.eval_file is None):
            raise ValueError("set exactly one of task and eval_file (task: null to use an eval_file)")
        if self.k_max is None:
            self.k_max = self.n_samples
        if self.k_max < 1 or self.n_samples < 1:
            raise ValueError("n_samples and k_max must be >= 1")
        if self.k_max > self.n_samples:
            raise ValueError(
                f"k_max={self.k_max} > n_samples={self.n_samples}: the unbiased pass@k needs at least k samples "
                f"per prompt; raise n_samples to {self.k_max} or lower k_max"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
        if self.shots < 0:
            raise ValueError(f"shots={self.shots}: the number of worked examples is >= 0")
        if self.probe_n and self.probe_folds < 2:
            raise ValueError("probe_folds must be >= 2 (cross-fitting)")
        if not 0 < self.readable_ratio <= 1:
            raise ValueError("readable_ratio is a share in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Inputs, checked before any sampling


def eval_prompts(cfg: ReweightingConfig) -> list[TaskPrompt]:
    """The task's eval split, or the rows of ``cfg.eval_file`` (each with an integer answer; a latent when probing)."""
    if cfg.task is not None:
        return task_prompts(cfg.task, "eval", cfg.n_eval, cfg.split_seed)
    path = Path(cfg.eval_file)
    if not path.is_file():
        raise FileNotFoundError(f"eval_file {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        for key in ("question", "answer") + (("latent",) if cfg.probe_n else ()):
            if key not in row:
                raise ValueError(
                    f"{path} line {i + 1} has no {key!r}; every row needs question and an integer answer"
                    + (" and latent (or set probe_n 0)" if cfg.probe_n else "")
                )
        if not isinstance(row["answer"], int):
            raise ValueError(f"{path} line {i + 1}: answer {row['answer']!r} is not an integer")
        rows.append(TaskPrompt(row["question"], row["answer"], int(row.get("latent", row["answer"])), row.get("group")))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def probe_prompts(cfg: ReweightingConfig) -> list[TaskPrompt]:
    """The prompts the latent probe is fitted on: ``probe_n`` of all the task's prompts (both splits: the probe reads
    the prompt, it is not scored on behaviour), or the eval file's rows."""
    if cfg.task is None:
        return eval_prompts(cfg)[: cfg.probe_n]
    rows = task_prompts(cfg.task, "eval", cfg.n_eval, cfg.split_seed) + task_prompts(
        cfg.task, "train", cfg.n_eval, cfg.split_seed
    )
    return rows[: cfg.probe_n]


def check_adapter(adapter_dir: str | Path, model) -> None:
    """Raise unless ``adapter_dir`` holds a peft adapter whose LoRA modules exist in ``model`` with matching shapes."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"post_adapter={adapter_dir}: no adapter_config.json + adapter_model.safetensors; point it at "
            "an llm.grpo output_dir (or set grpo_config to train one there)"
        )
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    modules = dict(model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            mod = modules.get(name)
            shape = f.get_slice(key).get_shape()
            if mod is None or not hasattr(mod, "in_features"):
                raise ValueError(
                    f"post_adapter {adapter_dir} adapts {name!r}, which the post-RL base model has no linear module "
                    f"named; the adapter was trained on another architecture (its base: {base}). Set post_model to it"
                )
            want = mod.in_features if ".lora_A." in key else mod.out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != want:
                raise ValueError(
                    f"post_adapter {adapter_dir}: {key} has width {got} where the base model's {name} has {want}; "
                    f"the adapter belongs to another model (its base: {base}). Set post_model to it"
                )


def _model_cfg(cfg: ReweightingConfig, path: str):
    from llm.models import ModelConfig

    return ModelConfig(
        model_name_or_path=path, dtype=cfg.dtype, device=cfg.device, attn_implementation=cfg.attn_implementation
    )


def load_pair(cfg: ReweightingConfig):
    """``(ref, post, tokenizer)``: the post-RL model with its adapter checked and merged; the post-RL tokenizer (its
    chat template formats the prompts) after checking that both tokenizers share one vocabulary."""
    from peft import PeftModel

    from llm.models import load_model_and_tokenizer

    ref, ref_tok = load_model_and_tokenizer(_model_cfg(cfg, cfg.reference_model))
    if cfg.post_model is None:  # the reference's weights: copy them rather than load (and dequantize) them again
        post, tok = copy.deepcopy(ref), ref_tok
    else:
        post, tok = load_model_and_tokenizer(_model_cfg(cfg, cfg.post_model))
    if cfg.post_adapter is not None:
        check_adapter(cfg.post_adapter, post)
        post = PeftModel.from_pretrained(post, cfg.post_adapter).merge_and_unload()
        post.eval()
    if ref_tok.get_vocab() != tok.get_vocab():
        raise ValueError(
            "the reference and the post-RL tokenizers differ; log-likelihoods and KL compare the same token "
            "sequences, so use a pair that shares a vocabulary (e.g. a base model and its instruct sibling)"
        )
    if not getattr(tok, "chat_template", None):
        raise ValueError("the post-RL tokenizer has no chat template; the prompts are chat turns")
    return ref, post, tok


# ---------------------------------------------------------------------------------------------
# The report


def _check_single_process() -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise SystemExit(
            f"llm.experiments.reweighting runs as one process (WORLD_SIZE={world}): it does not split prompts across ranks. "
            "Launch it with --num_processes 1 (configs/accelerate/single_gpu.yaml) or plain python -m llm.experiments.reweighting"
        )


def report(cfg: ReweightingConfig) -> dict:
    """Sample, score and probe; returns the report dict (also written to ``cfg.output_dir``)."""
    _check_single_process()
    t0 = time.time()
    prompts = eval_prompts(cfg)  # a bad eval file fails before any weights load
    probing = probe_prompts(cfg) if cfg.probe_n else []
    ks = log2_ks(cfg.k_max)
    pcfg = PassKConfig(ks=ks)
    k_verdict, k_why = verdict_k(cfg.task, pcfg)
    print(f"verdict k: {k_verdict} -- {k_why}", flush=True)  # fixed before any sample is drawn
    ref, post, tok = load_pair(cfg)
    timings = {"load_s": time.time() - t0}
    from llm.fastgen import sample_n_ids
    from llm.generate import chat_prompt

    texts = [chat_prompt(tok, p.question) for p in prompts]
    prompt_ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    answers = [p.answer for p in prompts]
    n = cfg.n_samples
    shots = cfg.shots if cfg.task else 0
    runs = [("reference", ref, texts), ("post", post, texts)]
    if shots:  # the elicitation baseline: what the reference already does with a few worked examples in context
        history = worked_examples(cfg.task, shots, cfg.n_eval, cfg.split_seed)
        runs.append(("reference_fewshot", ref, [chat_prompt(tok, p.question, history=history) for p in prompts]))
    samples, hits, correct, decoded = {}, {}, {}, {}
    for i, (name, model, prompt_texts) in enumerate(runs):
        t = time.time()
        ids = sample_n_ids(
            model,
            tok,
            prompt_texts,
            n,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed + 1000 * i,
            batch_size=cfg.batch_size,
        )
        decoded[name] = [tok.batch_decode(rows, skip_special_tokens=True) for rows in ids]
        hits[name] = torch.tensor([score(r, [a] * n) for r, a in zip(decoded[name], answers)], dtype=torch.float64)
        correct[name] = hits[name].sum(1).long()
        samples[name] = ids
        timings[f"sample_{name}_s"] = time.time() - t
        logger.info(
            "%s: %d x %d replies in %.0f s, pass@1 %.3f",
            name,
            len(prompts),
            n,
            timings[f"sample_{name}_s"],
            float(correct[name].sum()) / (n * len(prompts)),
        )

    t = time.time()
    flat = lambda name: [r for rows in samples[name] for r in rows]  # noqa: E731
    pad = tok.pad_token_id
    lengths = {name: torch.tensor([max(1, len(r)) for r in flat(name)], dtype=torch.float64) for name in samples}
    ll_ref_of_post = all_reply_logprobs(ref, prompt_ids, samples["post"], pad, cfg.score_batch_size)
    ll_ref_of_ref = all_reply_logprobs(ref, prompt_ids, samples["reference"], pad, cfg.score_batch_size)
    ll_post_of_post = all_reply_logprobs(post, prompt_ids, samples["post"], pad, cfg.score_batch_size)
    # the log-likelihoods of the correct post-RL replies: the importance weights of the outside-support verdict, valid
    # only when the replies were sampled from pi_post itself (temperature 1, no nucleus)
    right = hits["post"].flatten() > 0
    split = lambda x: [x[j * n : (j + 1) * n][right[j * n : (j + 1) * n]].tolist() for j in range(len(prompts))]  # noqa: E731
    ll_ref_ok, ll_post_ok = split(ll_ref_of_post), split(ll_post_of_post)
    exact = cfg.temperature == 1 and cfg.top_p == 1
    judged = judge(
        correct,
        n,
        ks,
        k_verdict,
        cfg.task,
        [torch.tensor(a) - torch.tensor(b) for a, b in zip(ll_ref_ok, ll_post_ok)] if exact else None,
    )
    tables, chance, j = judged["tables"], judged["chance"], judged["j"]
    curves = {name: pass_at_k_curve(tables[name], ks, n_boot=cfg.n_boot, seed=cfg.seed) for name in tables}
    if chance is not None:
        curves["chance (uniform guess)"] = pass_at_k_curve(chance, ks, n_boot=2, seed=cfg.seed)
    per_tok_post, per_tok_ref = ll_ref_of_post / lengths["post"], ll_ref_of_ref / lengths["reference"]
    p5 = float(torch.quantile(per_tok_ref, 0.05))
    likelihood = {
        "ref_ll_per_token_of_post_replies": float(per_tok_post.mean()),
        "ref_ll_per_token_of_ref_replies": float(per_tok_ref.mean()),
        "post_ll_per_token_of_post_replies": float((ll_post_of_post / lengths["post"]).mean()),
        "ref_ll_per_token_p5_of_ref_replies": p5,
        # per reply: exp(-this) is about the number of reference samples that produce a typical post-RL reply once
        "ref_ll_per_reply_of_post_replies": float(ll_ref_of_post.mean()),
        "ref_ll_per_reply_of_ref_replies": float(ll_ref_of_ref.mean()),
        "share_post_below_ref_p5": float((per_tok_post < p5).double().mean()),
        "mean_reply_tokens": {name: float(lengths[name].mean()) for name in lengths},
    }
    kl = None
    if exact:
        diff = ll_post_of_post - ll_ref_of_post
        kl = {
            "kl_post_ref_per_reply": float(diff.mean()),
            "se": float(diff.std() / math.sqrt(len(diff))),
            "kl_post_ref_per_token": float(diff.sum() / lengths["post"].sum()),
        }
    timings["likelihood_s"] = time.time() - t
    logger.info("log-likelihoods and KL in %.0f s", timings["likelihood_s"])

    t = time.time()
    belief = belief_side(cfg, ref, post, tok, probing) if probing else None
    timings["probe_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    result = {
        "config": asdict(cfg),
        "passk_config": asdict(pcfg),
        "n_prompts": len(prompts),
        "n_samples": n,
        "ks": ks,
        "chance_p": chance_p(cfg.task) if cfg.task else None,
        "k_verdict": k_verdict,
        "k_verdict_why": k_why,
        "curves": curves,
        "summary": judged["summary"],
        "verdict": judged["verdict"],
        "wider": judged["wider"],
        "outside_support": judged["outside_support"]
        or {
            "verdict": "not run",
            "why": "the replies were not sampled from the models' own distributions (temperature 1, top-p 1), so the likelihood ratios are not importance weights",
        },
        "vs_fewshot": judged["vs_fewshot"],
        "null_controls": judged["nulls"],
        "coverage_k1": coverage(tables["post"][:, 0], tables["reference"][:, 0]),
        "coverage_k_verdict": coverage(tables["post"][:, j - 1], tables["reference"][:, j - 1]),
        "coverage_k_max": coverage(tables["post"][:, -1], tables["reference"][:, -1]),
        "per_prompt": [
            {
                "question": p.question,
                "answer": p.answer,
                "correct_reference": int(correct["reference"][j]),
                "correct_post": int(correct["post"][j]),
                **({"correct_reference_fewshot": int(correct["reference_fewshot"][j])} if shots else {}),
            }
            for j, p in enumerate(prompts)
        ],
        "likelihood": likelihood,
        "kl": kl,
        "belief": belief,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    data = verdict_data(cfg.task, n, ks, k_verdict, shots, correct, ll_ref_ok, ll_post_ok) | {
        "ll_are_importance_weights": exact
    }
    write_report(result, decoded, answers, data, Path(cfg.output_dir))
    return result


def make_parser():
    from plumbing.config import ConfigParser

    return ConfigParser((ReweightingConfig,))


def _train_first(cfg: ReweightingConfig) -> None:
    """Train the adapter ``cfg.grpo_config`` describes (``llm.grpo.train``) when ``post_adapter`` holds none yet."""
    import yaml

    from plumbing.config import config_anchor

    if cfg.post_adapter is None:
        raise ValueError("grpo_config trains an adapter: set post_adapter to its output_dir")
    out = yaml.safe_load(Path(cfg.grpo_config).read_text()).get("output_dir")
    anchor = config_anchor(cfg.grpo_config)
    if out is None or (anchor / out).resolve() != Path(cfg.post_adapter).resolve():
        raise ValueError(
            f"grpo_config {cfg.grpo_config} writes output_dir {out!r}, not post_adapter {cfg.post_adapter!r}; make them the same"
        )
    if (Path(cfg.post_adapter) / "adapter_config.json").is_file():
        logger.info("post_adapter %s holds an adapter; not training", cfg.post_adapter)
        return
    from llm.grpo import make_parser as grpo_parser
    from llm.grpo import train

    t = time.time()
    train(*grpo_parser().parse_args_and_config(["--config", cfg.grpo_config]))
    logger.info("GRPO took %.0f s", time.time() - t)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _check_single_process()
    if cfg.grpo_config:
        _train_first(cfg)
    r = report(cfg)
    print((Path(cfg.output_dir) / "report.md").read_text())
    return r


if __name__ == "__main__":
    main()
