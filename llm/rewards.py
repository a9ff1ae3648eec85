"""Rule and judge rewards for ``llm.grpo``: TRL reward callables ``f(completions, **columns) -> list[float | None]``.

The prompt dataset's extra columns (``question``; ``answer`` for ``llm.tasks`` prompts) arrive as keyword lists.
"""

from __future__ import annotations

import re


def completion_text(completion) -> str:
    """The reply text of a TRL completion (a string, or a message list whose last turn is the reply)."""
    # Conversational prompts give completions as [{"role": "assistant", "content": ...}].
    return completion[-1]["content"] if isinstance(completion, list) else completion


def length_reward(target_chars: int):
    """Reward ``-|len(reply) - target_chars| / target_chars`` per completion."""

    def length(completions, **kwargs) -> list[float]:
        return [-abs(len(completion_text(c)) - target_chars) / target_chars for c in completions]

    return length


def keyword_reward(keywords: list[str]):
    """Reward = share of ``keywords`` found (case-insensitive substring) in each reply."""
    words = [k.lower() for k in keywords]

    def keyword(completions, **kwargs) -> list[float]:
        return [sum(w in completion_text(c).lower() for w in words) / len(words) for c in completions]

    return keyword


def regex_reward(patterns: list[str]):
    """Reward = share of ``patterns`` that ``re.search`` finds in each reply."""
    compiled = [re.compile(p) for p in patterns]

    def regex(completions, **kwargs) -> list[float]:
        return [sum(bool(p.search(completion_text(c))) for p in compiled) / len(compiled) for c in completions]

    return regex


def judge_reward(judge, misaligned: bool = False, template: str | None = None):
    """Reward = aligned score / 100 from ``judge`` (``llm.judges.Judge``), or 1 - that when ``misaligned``.
    ``template`` fills the judge prompt (``{question}``, ``{answer}``) for prompt-reading judges. A ``None``
    score (refusal / code for LLM judges) becomes NaN, which TRL leaves out of the group statistics."""
    from llm.judges import JudgeRequest

    def judge_score(completions, question, **kwargs) -> list[float | None]:
        answers = [completion_text(c) for c in completions]
        prompts = [template.format(question=q, answer=a) if template else "" for q, a in zip(question, answers)]
        scores = judge.score([JudgeRequest(q, a, "aligned", p) for q, a, p in zip(question, answers, prompts)])
        return [None if s is None else (1 - s / 100 if misaligned else s / 100) for s in scores]

    judge_score.__name__ = "judge_misaligned" if misaligned else "judge_aligned"
    return judge_score
