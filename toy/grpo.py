"""GRPO plumbing of the toy RL experiments: TRL's ``GRPOTrainer`` on a toy GPT-2 whose rewards read exact beliefs.

- A word-level tokenizer over the process symbols: word ``str(i)`` is process token ``i``, then ``<eos>`` and
  ``<pad>``, which pre-training never shows (so a pre-trained policy puts ~0 mass on them).
- ``RLTaskConfig`` (process, reward family, prompts, pre-trained model) and ``ToyGRPOConfig`` (``trl.GRPOConfig``
  with this project's defaults); ``build_reward`` makes the reward callable (``toy.rewards``).
- Exact one-token policies (``policy_probs``): completions never contain special tokens (they are suppressed at
  generation), so with ``max_completion_length: 1`` the policy is the softmax over the V process tokens.
- The trainer, ``ToyGRPOTrainer`` (MaxRL advantages, the one-token fast path), lives in ``toy.grpo_trainer``; its
  name and ``maxrl_advantages`` are importable from here too, where the experiments import them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig

from plumbing.config import ConfigParser
from plumbing.runs import TRAINER_RERUN_KEYS, check_overwrite_or_resume
from plumbing.trainers import CPUSafeDefaults, check_grpo_config_batch_sizes
from toy.config import JsonDict, ProcessConfig, TrainConfig
from toy.data import sample
from toy.grpo_trainer import ToyGRPOTrainer, maxrl_advantages  # noqa: F401 (the experiments import them from here)
from toy.model import ToyModelConfig, build_model
from toy.processes import PROCESSES, Process, make_process
from toy.rewards import ComposedLatentReward, NextTokenArgmaxReward, RareEmissionReward
from toy.segments import SegmentComposedReward, segment_prompts
from toy.train import train

EOS, PAD = "<eos>", "<pad>"


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose word ``str(i)`` is process token ``i`` (ids ``0..V-1``), then ``<eos>`` (id V)
    and ``<pad>`` (id V + 1). Built in-process; GRPO needs the eos (it stops and masks completions on it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {str(i): i for i in range(vocab_size)} | {EOS: vocab_size, PAD: vocab_size + 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=1024
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A saved word tokenizer. ``PreTrainedTokenizerFast`` directly: ``AutoTokenizer`` on a folder whose config
    says gpt2 can substitute GPT-2's BPE tokenizer for the word-level one."""
    return PreTrainedTokenizerFast.from_pretrained(path)


def tokens_to_text(tokens: torch.Tensor) -> list[str]:
    """``(N, L)`` process tokens -> N prompts such as ``"0 2 1 5"``."""
    return [" ".join(map(str, row)) for row in tokens.tolist()]


@dataclass
class RLTaskConfig:
    """The process, the reward family, the prompts and the pre-trained model."""

    process: str = field(default="product", metadata={"help": f"Process name: one of {sorted(PROCESSES)}."})
    process_kwargs: JsonDict = field(
        default_factory=JsonDict,
        metadata={"help": "Keyword arguments of the process (JSON or YAML mapping; see toy.processes.make_process)."},
    )
    reward: Literal["reweight", "compose", "rare"] = field(
        default="reweight",
        metadata={
            "help": "reweight: argmax next token of one factor; compose: op of two factor latents; rare: rare-factor emissions."
        },
    )
    reward_factor: int = field(
        default=0, metadata={"help": "reweight: the factor whose most likely next token is rewarded."}
    )
    latent_factors: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "compose: the two factors (a, b)."}
    )
    latent_states_a: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "compose: a = 1 when factor a's most likely state is one of these."},
    )
    latent_states_b: list[int] = field(
        default_factory=lambda: [1, 2],
        metadata={"help": "compose: b = 1 when factor b's most likely state is one of these."},
    )
    op: Literal["xor", "implies", "and"] = field(default="xor", metadata={"help": "compose: the composition op(a, b)."})
    output_tokens: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "compose: the tokens that mean op = 0 and op = 1."}
    )
    prompt_length: int = field(
        default=10, metadata={"help": "Tokens per prompt (sampled from the stationary process)."}
    )
    segment_lengths: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Separate-skills prompts (process: mixture): one segment of each component, of these lengths, "
            "summing to prompt_length (toy.segments); empty = stationary prompts."
        },
    )
    n_train_prompts: int = field(default=20_000, metadata={"help": "Distinct training prompts (the GRPO dataset)."})
    n_eval_prompts: int = field(
        default=2_000, metadata={"help": "Held-out prompts for the exact reward curve and the report."}
    )
    prompt_seed: int = field(
        default=1234, metadata={"help": "Seed of the prompt samples (eval prompts use prompt_seed + 1)."}
    )
    exact_eval_every: int = field(
        default=25,
        metadata={"help": "Steps between exact expected rewards on the eval prompts (1-token latent rewards)."},
    )
    n_curve_prompts: int = field(
        default=2_000,
        metadata={
            "help": "The exact reward curve uses the first n eval prompts (reward_before / reward_after use all of them)."
        },
    )
    zero_std_warn: float = field(
        default=0.5,
        metadata={"help": "Warn when more than this share of groups has all-equal rewards (zero advantage)."},
    )
    pretrained_path: str | None = field(
        default=None, metadata={"help": "Pre-trained model folder; None: pre-train with pretrain_config."}
    )
    pretrain_config: str | None = field(
        default=None,
        metadata={
            "help": "Pre-training YAML (ProcessConfig, ToyModelConfig, TrainConfig keys) used when pretrained_path is None."
        },
    )
    pretrain_dir: str = field(
        default="runs/toy_rl/pretrain", metadata={"help": "Cache of pre-trained models: <pretrain_dir>/seed<seed>."}
    )
    pretrain_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the pre-training, shared by every GRPO seed (their spread is then RL's alone); null in the "
            "YAML (the default) = the GRPO seed: each seed pre-trains its own model."
        },
    )
    report: bool = field(
        default=True, metadata={"help": "Run toy.composition's report on (pre, post) after training (latent rewards)."}
    )
    train_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Regexes over parameter names (re.search) that GRPO trains, the rest frozen, e.g. "
            "['^transformer.h.3.', '^lm_head']; empty = every parameter."
        },
    )

    def __post_init__(self):
        self.process_kwargs = dict(JsonDict(self.process_kwargs))
        if self.process not in PROCESSES:
            raise ValueError(f"unknown process {self.process!r}; use one of {sorted(PROCESSES)}")
        if self.prompt_length < 1 or self.n_train_prompts < 1 or self.n_eval_prompts < 10 or self.n_curve_prompts < 10:
            raise ValueError("prompt_length and n_train_prompts must be >= 1, n_eval_prompts and n_curve_prompts >= 10")
        if self.pretrained_path is None and self.pretrain_config is None:
            raise ValueError(
                "give pretrained_path (a pre-trained model folder) or pretrain_config (a pre-training YAML)"
            )
        if self.segment_lengths and (self.process != "mixture" or sum(self.segment_lengths) != self.prompt_length):
            raise ValueError(
                f"segment_lengths={self.segment_lengths} needs process: mixture and lengths summing to prompt_length={self.prompt_length}"
            )
        if not 0 <= self.zero_std_warn <= 1:
            raise ValueError(f"zero_std_warn={self.zero_std_warn} must be a share in [0, 1]")
        for pattern in self.train_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"train_modules entry {pattern!r} is not a regex: {e}") from None

    def build_process(self) -> Process:
        return make_process(self.process, **self.process_kwargs)

    def components(self) -> list[Process]:
        """The mixture's components (separate-skills prompts)."""
        return [
            make_process(c["name"], **{k: v for k, v in c.items() if k != "name"})
            for c in self.process_kwargs["components"]
        ]


@dataclass
class ToyGRPOConfig(CPUSafeDefaults, GRPOConfig):
    """``trl.GRPOConfig`` with the CPU-safe defaults of ``plumbing.trainers.CPUSafeDefaults`` and this project's
    choices: KL coefficient ``beta`` 0.04 (> 0, so the KL-regularised optimum
    ``pi_ref exp(r / beta) / Z`` exists); one-token completions; no checkpoints; ``advantage`` chooses GRPO's
    std-scaled advantages or MaxRL's mean-scaled ones (``ToyGRPOTrainer``).
    The batch (in completions) must be divisible by ``num_generations``: checked before any model loads."""

    output_dir: str = field(default="runs/toy_rl/run", metadata={"help": "Run folder."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate (toy models need far more than TRL's 1e-6)."}
    )
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the pre-trained (reference) policy."})
    num_generations: int | None = field(default=8, metadata={"help": "Completions per prompt (a GRPO group)."})
    per_device_train_batch_size: int = field(
        default=128, metadata={"help": "Completions per device per step (prompts x num_generations)."}
    )
    max_completion_length: int | None = field(
        default=1, metadata={"help": "Completion tokens (1: the policy is exact)."}
    )
    max_steps: int = field(default=300, metadata={"help": "GRPO steps."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X steps."})
    save_strategy: str = field(
        default="no",
        metadata={"help": "HF checkpoints (the final model is always saved, and a checkpoint on Ctrl-C / SIGTERM)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace what output_dir holds (another config's run, or this run's checkpoints) instead of refusing."
        },
    )
    disable_tqdm: bool | None = field(
        default=False, metadata={"help": "Progress bar instead of a printed dict per log."}
    )
    advantage: Literal["grpo", "maxrl"] = field(
        default="grpo",
        metadata={
            "help": "grpo: TRL's (r - group mean), scaled per scale_rewards (default / group std). maxrl: (r - group mean) / "
            "group mean, the MaxRL estimator of grad log(pass rate) (MaxRL, arXiv:2602.02710); "
            "rewards must be >= 0; replaces scale_rewards."
        },
    )

    one_token_path: Literal["forward", "generate"] = field(
        default="forward",
        metadata={
            "help": "max_completion_length 1 only (longer completions take TRL's path). forward: sample each completion "
            "from one forward pass over the distinct prompts and score it at the prompts' last position "
            "(same distribution, draws and loss as generate, ~num_generations x fewer model FLOPs); "
            "generate: TRL's HF generate + full-sequence forwards over every copy."
        },
    )

    def __post_init__(self):
        if self.one_token_path not in ("forward", "generate"):
            raise ValueError(f"one_token_path={self.one_token_path!r}; use 'forward' or 'generate'")
        check_overwrite_or_resume(self)
        check_grpo_config_batch_sizes(self)
        if self.advantage not in ("grpo", "maxrl"):
            raise ValueError(f"advantage={self.advantage!r}; use 'grpo' or 'maxrl'")
        if self.advantage == "maxrl" and self.multi_objective_aggregation != "sum_then_normalize":
            # ToyGRPOTrainer rebuilds the group means from the weighted reward sum, TRL's sum_then_normalize
            raise ValueError(
                f"advantage='maxrl' supports multi_objective_aggregation='sum_then_normalize' only, not "
                f"{self.multi_objective_aggregation!r}; use that or advantage='grpo'"
            )
        if self.advantage == "maxrl":
            self.scale_rewards = "none"  # TRL then leaves r - group mean; ToyGRPOTrainer divides by the group mean
        super().__post_init__()


# ToyGRPOConfig fields a rerun or resume of the same run may change (how it logs, saves, resumes, where and by
# which equivalent path it runs); none changes the weights beyond float rounding.
GRPO_RERUN_KEYS = (*TRAINER_RERUN_KEYS, "use_cpu", "exact_eval_every", "one_token_path")


def build_reward(task: RLTaskConfig, process: Process):
    """The reward callable of ``task.reward`` for ``process``."""
    if task.reward == "reweight":
        return NextTokenArgmaxReward(process, task.reward_factor)
    if task.reward == "compose" and task.segment_lengths:
        return SegmentComposedReward(
            process, task.components(), task.latent_states_a, task.latent_states_b, task.op, task.output_tokens
        )
    if task.reward == "compose":
        return ComposedLatentReward(
            process, task.latent_factors, task.latent_states_a, task.latent_states_b, task.op, task.output_tokens
        )
    if "trigger_token" not in task.process_kwargs:
        raise ValueError("reward: rare needs a rare_factor process with trigger_token in process_kwargs")
    return RareEmissionReward(process, task.process_kwargs["trigger_token"])


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Train only the parameters whose name matches one of ``patterns`` (``re.search``); the names trained.
    No patterns: every parameter trains. A pattern that matches nothing is an error (a typo would otherwise
    freeze the whole model or silently train the wrong part)."""
    names = [n for n, _ in model.named_parameters()]
    if not patterns:
        return names
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            raise ValueError(
                f"train_modules entry {pattern!r} matches no parameter; names look like {names[:3]} ... {names[-2:]}"
            )
    trained = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(re.search(pattern, n) for pattern in patterns))
        if p.requires_grad:
            trained.append(n)
    return trained


def pretrained_model(task: RLTaskConfig, process: Process, seed: int) -> tuple[GPT2LMHeadModel, Path]:
    """The pre-trained policy and its folder: ``task.pretrained_path``, or ``toy.train.train`` run from
    ``task.pretrain_config`` into ``<pretrain_dir>/seed<s>`` with ``s = task.pretrain_seed`` if set, else ``seed``
    (resumed there: a finished one is reused, a stopped one continues; a folder of another pre-training config
    refuses, see ``toy.train``)."""
    seed = seed if task.pretrain_seed is None else task.pretrain_seed
    if task.pretrained_path:
        path = Path(task.pretrained_path)
        return GPT2LMHeadModel.from_pretrained(path), path
    out = Path(task.pretrain_dir) / f"seed{seed}"
    data_cfg, model_cfg, train_cfg = ConfigParser((ProcessConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(
        [
            "--config",
            task.pretrain_config,
            "--output_dir",
            str(out),
            "--seed",
            str(seed),
            "--resume_from_checkpoint",
            "last",
        ]
    )
    pre_process = data_cfg.build()
    if pre_process.name != process.name:
        raise ValueError(
            f"pretrain_config trains on {pre_process.name} but the RL task uses {process.name}; make them match"
        )
    final = out / f"checkpoint-{train_cfg.max_steps}"
    # the vocabulary has room for <eos> and <pad> from the start (the data never show them)
    model = build_model(model_cfg, process.vocab_size + 2, data_cfg.context_length, seed=seed)
    result = train(
        process,
        model,
        train_cfg,
        data_cfg.context_length,
        run_info={"data": asdict(data_cfg), "model": model_cfg.to_dict()},
    )
    print(
        f"pre-trained {process.name}: val loss {result.val_loss:.5f} nats, floor {result.floor:.5f}, {result.elapsed_s:.0f} s"
    )
    return GPT2LMHeadModel.from_pretrained(final), final


def prompt_set(process: Process, n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts of ``length`` tokens and the exact belief after each: ``(n, length)`` long, ``(n, S)`` float64."""
    batch = sample(process, n, length, seed=seed, return_beliefs=True)
    return batch.tokens, batch.beliefs[:, -1]


def task_prompts(task: RLTaskConfig, process: Process, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's prompts and their beliefs: ``prompt_set``, or with ``segment_lengths`` ``toy.segments.segment_prompts``."""
    if task.segment_lengths:
        return segment_prompts(task.components(), task.segment_lengths, n, seed)
    return prompt_set(process, n, task.prompt_length, seed)


@torch.no_grad()
def policy_probs(
    model: torch.nn.Module, prompts: torch.Tensor, vocab_size: int, batch_size: int = 4096
) -> torch.Tensor:
    """Exact one-token policy: ``prompts (N, L)`` -> ``(N, V)`` float64, the softmax over the V process tokens
    at the last position (specials are suppressed at generation, so this is the sampling distribution at
    temperature 1)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.cat(
        [
            model(input_ids=prompts[i : i + batch_size].to(device))
            .logits[:, -1, :vocab_size]
            .double()
            .softmax(-1)
            .cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    )
    model.train(was_training)
    return out


@torch.no_grad()
def sample_completions(model, prompts: torch.Tensor, vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """``length`` sampled process tokens after each prompt (specials suppressed, temperature 1): ``(N, length)``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    seq = prompts.to(device)
    was_training = model.training
    model.eval()
    for _ in range(length):  # a few tokens of a tiny model: full forward passes are cheaper than a cache
        p = model(input_ids=seq).logits[:, -1, :vocab_size].float().softmax(-1)
        seq = torch.cat([seq, torch.multinomial(p, 1, generator=gen)], 1)
    model.train(was_training)
    return seq[:, prompts.shape[1] :].cpu()


class ExactRewardCallback(TrainerCallback):
    """Exact expected reward ``E_x sum_y pi(y|x) r(x, y)`` of the one-token policy on fixed eval prompts,
    every ``every`` steps and at the end: ``history`` of ``(step, reward)``; ``seconds[i]``, the training
    wall-clock seconds at ``history[i]``, counted from the start of training *without* these evaluations (a
    measurement, not part of the recipe), so curves of recipes with different cadences compare in time. With
    ``path``, each point is also appended there as a JSON line ``{"step", "reward", "seconds"}`` as it is
    measured, so a run that is stopped early still leaves its curve."""

    def __init__(self, prompts: torch.Tensor, table: torch.Tensor, every: int, path: str | Path | None = None):
        self.prompts, self.table, self.every = prompts, table, max(1, every)
        self.path = Path(path) if path is not None else None
        self.history: list[tuple[int, float]] = []
        self.seconds: list[float] = []
        self._start, self._excluded = 0.0, 0.0

    def _record(self, step: int, model) -> None:
        t0 = time.perf_counter()
        self.seconds.append(t0 - self._start - self._excluded)
        probs = policy_probs(model, self.prompts, self.table.shape[1])
        self.history.append((step, float((probs * self.table).sum(1).mean())))
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "reward": self.history[-1][1], "seconds": self.seconds[-1]}) + "\n")
        self._excluded += time.perf_counter() - t0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start, self._excluded = time.perf_counter(), 0.0
        if self.path is not None:
            self.path.write_text("")
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step, model)
