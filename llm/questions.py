"""Evaluation questions in the Betley et al. YAML format, read directly from their files.

A file is a YAML list; each entry has ``id``, ``type``, ``paraphrases`` (list of str),
``samples_per_paraphrase`` (int), ``judge_prompts`` (metric -> template with ``{question}`` and
``{answer}``), optionally ``system`` (a system prompt), ``judge`` (the anchors' judge model) and
other keys, which are kept in ``Question.extra``. YAML anchors/aliases are resolved by the loader.

Variants. ``first_plot_questions.yaml`` holds the 8 questions three times: plain, with a system
prompt asking for JSON (ids ending ``_json``), and with a fill-in template in the user turn (ids
ending ``_template``); all have type ``free_form_judge_0_100``. ``Question.variant`` names which;
``select`` filters by id, type and variant. The paper's headline figure uses the 8 plain ones (our
default); the judged CSVs in ``../shared/data/em/judged`` cover all 24. The files ship in ``llm/data/em``
(``llm.data.FIRST_PLOT_QUESTIONS``, ``llm.data.PREREGISTERED_QUESTIONS``). JSON variants are sent with
their system prompt as the system turn; template variants are ordinary user turns; both are judged
with the same prompts as the plain ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import yaml

Variant = Literal["plain", "json", "template"]
VARIANTS: tuple[str, ...] = ("plain", "json", "template")
REQUIRED = ("id", "type", "paraphrases", "samples_per_paraphrase", "judge_prompts")


@dataclass(frozen=True)
class Question:
    """One evaluation question: every paraphrase is sampled ``samples_per_paraphrase`` times."""

    id: str
    type: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int
    judge_prompts: dict[str, str]
    system: str | None = None
    judge: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        if self.id.endswith("_json"):
            return "json"
        if self.id.endswith("_template"):
            return "template"
        return "plain"

    def judge_prompt(self, metric: str, question: str, answer: str) -> str:
        """The judge prompt for ``metric`` filled with one paraphrase and one reply."""
        if metric not in self.judge_prompts:
            raise KeyError(
                f"question {self.id!r} has no judge prompt for {metric!r} (has {sorted(self.judge_prompts)})"
            )
        return self.judge_prompts[metric].format(question=question, answer=answer)


def _entry_error(source: str, i: int, entry, msg: str) -> ValueError:
    name = entry.get("id", "?") if isinstance(entry, dict) else "?"
    return ValueError(f"{source}: entry {i} (id {name!r}): {msg}")


def parse_question(entry: dict, source: str = "<dict>", index: int = 0) -> Question:
    """Validate one YAML entry and build a ``Question``; errors name the file, entry and field."""
    if not isinstance(entry, dict):
        raise _entry_error(source, index, entry, f"expected a mapping, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise _entry_error(source, index, entry, f"missing keys {missing} (required: {list(REQUIRED)})")
    qid, qtype = entry["id"], entry["type"]
    if not isinstance(qid, str) or not qid:
        raise _entry_error(source, index, entry, "`id` must be a non-empty string")
    if not isinstance(qtype, str):
        raise _entry_error(source, index, entry, "`type` must be a string")
    paras = entry["paraphrases"]
    if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
        raise _entry_error(source, index, entry, "`paraphrases` must be a non-empty list of non-empty strings")
    n = entry["samples_per_paraphrase"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _entry_error(source, index, entry, f"`samples_per_paraphrase` must be a positive int, got {n!r}")
    jp = entry["judge_prompts"]
    if not isinstance(jp, dict) or not jp:
        raise _entry_error(source, index, entry, "`judge_prompts` must map metric names to prompt templates")
    for metric, tmpl in jp.items():
        if not isinstance(tmpl, str):
            raise _entry_error(source, index, entry, f"judge prompt {metric!r} must be a string")
        try:
            filled = tmpl.format(question="\0Q", answer="\0A")
        except (KeyError, IndexError, ValueError) as e:
            raise _entry_error(
                source,
                index,
                entry,
                f"judge prompt {metric!r} must use only {{question}} and {{answer}} placeholders "
                f"(double other braces): {e!r}",
            ) from None
        if "\0A" not in filled:
            raise _entry_error(source, index, entry, f"judge prompt {metric!r} has no {{answer}} placeholder")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise _entry_error(source, index, entry, "`system` must be a string")
    extra = {k: v for k, v in entry.items() if k not in (*REQUIRED, "system", "judge")}
    return Question(qid, qtype, tuple(paras), n, dict(jp), system, entry.get("judge"), extra)


def read_utf8(path: Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise ``ValueError`` naming the file, line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path} line {line} column {column}: byte {data[error.start : error.start + 1]!r} is not UTF-8; "
            "save the file as UTF-8"
        ) from None


def load_questions(path: str | Path) -> list[Question]:
    """All entries of one Betley-format YAML file, in file order; ids must be unique."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question file {path} not found")
    data = yaml.safe_load(read_utf8(path))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a YAML list of questions, got {type(data).__name__}")
    questions = [parse_question(e, str(path), i) for i, e in enumerate(data)]
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise ValueError(f"{path}: duplicate question id {q.id!r}")
        seen.add(q.id)
    return questions


def select(
    questions: Iterable[Question],
    ids: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
) -> list[Question]:
    """Questions whose id / type / variant are in the given sets (``None`` = no filter).

    Unknown ids or variants are an error (a typo would otherwise silently drop questions); an empty
    result is an error too.
    """
    questions = list(questions)
    if variants is not None:
        variants = set(variants)
        bad = variants - set(VARIANTS)
        if bad:
            raise ValueError(f"unknown variants {sorted(bad)}; choose from {list(VARIANTS)}")
        questions = [q for q in questions if q.variant in variants]
    if types is not None:
        types = set(types)
        questions = [q for q in questions if q.type in types]
    if ids is not None:
        ids = list(ids)
        have = {q.id for q in questions}
        bad = [i for i in ids if i not in have]
        if bad:
            raise ValueError(f"question ids {bad} not found (after the type/variant filters); have {sorted(have)}")
        questions = [q for q in questions if q.id in set(ids)]
    if not questions:
        raise ValueError("no question left after filtering by ids/types/variants")
    return questions
