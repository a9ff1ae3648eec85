"""Verifiable arithmetic tasks: prompts with per-prompt integer answers, a reward for ``llm.grpo`` and the
reference's reach on each step.

Its command: ``python -m llm.experiments.tasks``.

Tasks (operands drawn from fixed ranges; every operand tuple is one prompt):

* ``add``: "What is a + b?", a, b in 1..29 -- one step;
* ``add_small``: "What is a + b?", a, b in 1..9 -- the first step of ``add_mul`` alone;
* ``mul``: "What is s * c?", s in 2..18, c in 2..5 -- the second step of ``add_mul`` alone (s spans a + b's range);
* ``add_mul``: "What is (a + b) * c?", a, b in 1..9, c in 2..5 -- the two steps composed. Its intermediate latent
  is ``a + b`` (the first step's result), the target of the belief-side probe in ``llm.experiments.reweighting``;
* ``add_tens``: "What is s + b?", s in 100, 110, ..., 990, b in 1..9 -- one step with 810 answers (guessing solves 0.27
  of the prompts at k = 256, so a k = 256 verdict is informative), and the second step of ``mul10_add`` alone;
* ``mul10``: "What is a * 10?", a in 10..99 -- the first step of ``mul10_add`` alone;
* ``mul10_add``: "What is a * 10 + b?", a in 10..99, b in 1..9 -- the two steps composed, 810 answers; latent ``a * 10``.
  Its prompts and ``add_tens``'s are the same (a, b) grid in the same order, so the two eval splits pair up
  ("76 * 10 + 1" with "760 + 1").

A two-step task's ``group`` is the operands that fix its latent ((a, b) for ``add_mul``, a for ``mul10_add``): the
latent probe's folds keep them together, so it cannot score by recognising operands it was fitted on.

The reference's reach (SmolLM2-135M-Instruct Q4_1, CPU; 24 eval prompts x 16 replies, 16 new tokens; ~1 min per task):

    python -m llm.experiments.tasks --model_name_or_path .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --tasks mul10 add_tens mul10_add --n_prompts 24 --samples 16

``mul10`` pass@1 0.096, solved by any of 16 replies 0.67 (90 answers); ``add_tens`` 0.023, 0.29 (810 answers);
``mul10_add`` 0.0026, 0.04 (1 prompt of 24). Dropped candidates (same command; code in commit 13d1644): three-digit +
two-digit (a in 100..999, b in 10..99) 0.013, 0.08; three-digit + one-digit 0.008, 0.13; three-digit - one-digit
0.005, 0.04; a + b + c (three-digit + two one-digit) 0.0026, 0.04, but its step is the weak three-digit + one-digit;
a + b - c (three-digit + two-digit - one-digit) 0, 0.

Every prompt ends with "Answer with only the number." and is asked as one user turn. The train and eval prompts of a
task are disjoint by construction: the task's operand tuples are shuffled once with ``split_seed`` and the first
``n_eval`` are the eval set, the rest the train set. Scoring (``score``): the reply's **last** integer must equal the
answer (so "(3 + 4) * 5 = 7 * 5 = 35" counts, and a reply cut off mid-way usually does not). Answers are small
integers, so a policy can guess them: ``chance_p`` is the per-prompt success of guessing uniformly over the task's
answer set, which ``probes.passk.passk_verdict`` takes as the chance policy.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product
from typing import Literal

from llm.rewards import completion_text

TaskName = Literal["add", "add_small", "mul", "add_mul", "add_tens", "mul10", "mul10_add"]
TASKS: tuple[str, ...] = ("add", "add_small", "mul", "add_mul", "add_tens", "mul10", "mul10_add")
SUFFIX = " Answer with only the number."
_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class TaskPrompt:
    """One verifiable prompt: ``question`` (the user turn), its integer ``answer``, ``latent`` (the first step's
    result for a two-step task; the answer itself for one-step tasks) and ``group``: prompts of one group share the
    operands that determine the latent (``add_mul``: the pair (a, b), met with several c), so a latent probe's folds
    keep a group together; None: the prompt is its own group."""

    question: str
    answer: int
    latent: int
    group: str | None = None


def _all_prompts(task: str) -> list[TaskPrompt]:
    if task == "add":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(1, 30), repeat=2)]
    if task == "add_small":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(1, 10), repeat=2)]
    if task == "mul":
        return [TaskPrompt(f"What is {s} * {c}?{SUFFIX}", s * c, s * c) for s, c in product(range(2, 19), range(2, 6))]
    if task == "add_mul":
        return [
            TaskPrompt(f"What is ({a} + {b}) * {c}?{SUFFIX}", (a + b) * c, a + b, f"{a},{b}")
            for a, b, c in product(range(1, 10), range(1, 10), range(2, 6))
        ]
    if task == "add_tens":
        return [
            TaskPrompt(f"What is {s} + {b}?{SUFFIX}", s + b, s + b)
            for s, b in product(range(100, 1000, 10), range(1, 10))
        ]
    if task == "mul10":
        return [TaskPrompt(f"What is {a} * 10?{SUFFIX}", a * 10, a * 10) for a in range(10, 100)]
    if task == "mul10_add":
        return [
            TaskPrompt(f"What is {a} * 10 + {b}?{SUFFIX}", a * 10 + b, a * 10, f"{a}")
            for a, b in product(range(10, 100), range(1, 10))
        ]
    raise ValueError(f"task={task!r}; choose one of {', '.join(TASKS)}")


def task_prompts(task: str, split: Literal["train", "eval"], n_eval: int = 48, split_seed: int = 0) -> list[TaskPrompt]:
    """The ``split`` prompts of ``task`` (see the module docstring: the same ``n_eval`` and ``split_seed`` give disjoint
    sets). Deterministic: the same arguments give the same list in the same order."""
    rows = _all_prompts(task)
    if not 1 <= n_eval < len(rows):
        raise ValueError(f"n_eval={n_eval}; task {task!r} has {len(rows)} prompts, so use 1..{len(rows) - 1}")
    random.Random(split_seed).shuffle(rows)
    if split == "eval":
        return rows[:n_eval]
    if split == "train":
        return rows[n_eval:]
    raise ValueError(f"split={split!r}; choose train or eval")


def chance_p(task: str) -> float:
    """Success probability of guessing uniformly over ``task``'s set of answers."""
    return 1.0 / len({p.answer for p in _all_prompts(task)})


def parse_answer(reply: str) -> int | None:
    """The reply's last integer (None when it has none)."""
    found = _INT.findall(reply)
    return int(found[-1]) if found else None


def score(replies: list[str], answers: list[int]) -> list[float]:
    """1.0 where the reply's last integer equals the answer, else 0.0."""
    if len(replies) != len(answers):
        raise ValueError(f"{len(replies)} replies for {len(answers)} answers")
    return [float(parse_answer(r) == int(a)) for r, a in zip(replies, answers)]


def answer_reward():
    """A TRL reward callable: TRL passes the dataset's ``answer`` column as a keyword argument."""

    def task_answer(completions, answer=None, **kwargs) -> list[float]:
        if answer is None:
            raise ValueError("reward task needs an `answer` column in the prompts; set `task` in the prompt config")
        return score([completion_text(c) for c in completions], answer)

    return task_answer


def train_dataset(task: str, n_eval: int = 48, split_seed: int = 0):
    """``datasets.Dataset`` of the train prompts: ``prompt`` (conversational), ``question``, ``answer``."""
    from datasets import Dataset

    rows = task_prompts(task, "train", n_eval, split_seed)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p.question}] for p in rows],
            "question": [p.question for p in rows],
            "answer": [p.answer for p in rows],
        }
    )


_EXPR = re.compile(r"What is (.+?)\?")


def worked_examples(task: str, shots: int, n_eval: int = 48, split_seed: int = 0) -> list[dict]:
    """``shots`` worked examples from ``task``'s **train** split as earlier chat turns: the question, then the
    assistant's "<expression> = <answer>" (the format a GRPO-trained policy settles on). The few-shot elicitation
    baseline: a capability the reference shows with a few examples in context is elicited, not new, when RL makes it
    zero-shot."""
    msgs = []
    for q in task_prompts(task, "train", n_eval, split_seed)[:shots]:
        msgs += [
            {"role": "user", "content": q.question},
            {"role": "assistant", "content": f"{_EXPR.match(q.question).group(1)} = {q.answer}"},
        ]
    return msgs
