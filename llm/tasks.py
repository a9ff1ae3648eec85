"""Verifiable arithmetic tasks: prompts with per-prompt integer answers, a reward for ``llm.grpo`` and the
reference's reach on each step.

    python -m llm.tasks --model_name_or_path .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --n_prompts 32 --samples 16

Tasks (operands drawn from fixed ranges; every operand tuple is one prompt):

* ``add``: "What is a + b?", a, b in 1..29 -- one step;
* ``add_small``: "What is a + b?", a, b in 1..9 -- the first step of ``add_mul`` alone;
* ``mul``: "What is s * c?", s in 2..18, c in 2..5 -- the second step of ``add_mul`` alone (s spans a + b's range);
* ``add_mul``: "What is (a + b) * c?", a, b in 1..9, c in 2..5 -- the two steps composed. Its intermediate latent
  is ``a + b`` (the first step's result), the target of the belief-side probe in ``llm.reweighting``.

Every prompt ends with "Answer with only the number." and is asked as one user turn. The train and eval prompts of a
task are disjoint by construction: the task's operand tuples are shuffled once with ``split_seed`` and the first
``n_eval`` are the eval set, the rest the train set. Scoring (``score``): the reply's **last** integer must equal the
answer (so "(3 + 4) * 5 = 7 * 5 = 35" counts, and a reply cut off mid-way usually does not). Answers are small
integers, so a policy can guess them: ``chance_p`` is the per-prompt success of guessing uniformly over the task's
answer set, which ``probes.passk.passk_verdict`` takes as the chance policy.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Literal

from llm.rewards import completion_text

TaskName = Literal["add", "add_small", "mul", "add_mul", "add3_1", "add3_2", "sub3_1", "add_add", "add_sub"]
TASKS: tuple[str, ...] = ("add", "add_small", "mul", "add_mul", "add3_1", "add3_2", "sub3_1", "add_add", "add_sub")
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


@lru_cache(maxsize=None)  # the large tasks have 10^5 prompts; build each list once
def _all_prompts(task: str) -> tuple[TaskPrompt, ...]:
    return tuple(_build_prompts(task))


def _build_prompts(task: str) -> list[TaskPrompt]:
    if task == "add":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(1, 30), repeat=2)]
    if task == "add_small":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(1, 10), repeat=2)]
    if task == "mul":
        return [TaskPrompt(f"What is {s} * {c}?{SUFFIX}", s * c, s * c) for s, c in product(range(2, 19), range(2, 6))]
    if task == "add_mul":
        return [TaskPrompt(f"What is ({a} + {b}) * {c}?{SUFFIX}", (a + b) * c, a + b, f"{a},{b}")
                for a, b, c in product(range(1, 10), range(1, 10), range(2, 6))]
    if task == "add3_1":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(100, 1000), range(1, 10))]
    if task == "add3_2":
        return [TaskPrompt(f"What is {a} + {b}?{SUFFIX}", a + b, a + b) for a, b in product(range(100, 1000), range(10, 100))]
    if task == "sub3_1":
        return [TaskPrompt(f"What is {s} - {c}?{SUFFIX}", s - c, s - c) for s, c in product(range(110, 1099), range(2, 10))]
    if task == "add_add":
        return [TaskPrompt(f"What is {a} + {b} + {c}?{SUFFIX}", a + b + c, a + b, f"{a},{b}")
                for a, b, c in product(range(100, 1000), range(1, 10), range(1, 10))]
    if task == "add_sub":
        return [TaskPrompt(f"What is {a} + {b} - {c}?{SUFFIX}", a + b - c, a + b, f"{a},{b}")
                for a, b, c in product(range(100, 1000), range(10, 100), range(2, 6))]
    raise ValueError(f"task={task!r}; choose one of {', '.join(TASKS)}")


def task_prompts(task: str, split: Literal["train", "eval"], n_eval: int = 48, split_seed: int = 0) -> list[TaskPrompt]:
    """The ``split`` prompts of ``task`` (see the module docstring: the same ``n_eval`` and ``split_seed`` give disjoint
    sets). Deterministic: the same arguments give the same list in the same order."""
    rows = list(_all_prompts(task))
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
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p.question}] for p in rows],
        "question": [p.question for p in rows],
        "answer": [p.answer for p in rows],
    })


def main(argv: list[str] | None = None) -> dict:
    """Pass@1 of a model on each task's eval prompts (the reference's reach on each step and on the composition)."""
    from llm.fastgen import sample_n_ids
    from llm.generate import chat_prompt
    from llm.models import ModelConfig, load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model_name_or_path", required=True)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--n_prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=256, help="rows per sampling batch (CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    model, tok = load_model_and_tokenizer(ModelConfig(a.model_name_or_path))
    out = {}
    for task in a.tasks:
        t0 = time.time()
        prompts = task_prompts(task, "eval", a.n_prompts)
        ids = sample_n_ids(model, tok, [chat_prompt(tok, p.question) for p in prompts], a.samples,
                           max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, seed=a.seed)
        replies = [tok.batch_decode(rows, skip_special_tokens=True) for rows in ids]
        per_prompt = [sum(score(r, [p.answer] * len(r))) / len(r) for r, p in zip(replies, prompts)]
        out[task] = {"pass@1": sum(per_prompt) / len(per_prompt), "solved_any": sum(x > 0 for x in per_prompt) / len(per_prompt),
                     "chance_p": chance_p(task), "seconds": round(time.time() - t0, 1), "example": replies[0][:3]}
        print(task, out[task], flush=True)
    return out


if __name__ == "__main__":
    main()
