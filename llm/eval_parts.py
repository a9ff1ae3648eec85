"""The append-only part files of an evaluation (``<output_dir>/parts/``): replies and scores are written as
JSON lines as they are produced, so a crash or a judge failure loses nothing and a rerun samples only the
missing replies and judges only the unjudged ones (``llm.evaluate.evaluate_model``)."""

from __future__ import annotations

import json
from pathlib import Path

from llm.generate import PromptRow

SAMPLE_COLUMNS = ("question", "answer", "question_id", "paraphrase_index", "sample_index")
SCORE_COLUMNS = ("question_id", "paraphrase_index", "sample_index", "metric", "score")


def row_key(r) -> tuple[str, int, int]:
    """A reply's identity: (question id, paraphrase index, sample index), from a prompt row or a stored row."""
    if isinstance(r, PromptRow):
        return (r.question_id, r.paraphrase_index, r.sample_index)
    return (str(r["question_id"]), int(r["paraphrase_index"]), int(r["sample_index"]))


def read_parts(paths, columns) -> list[dict]:
    """Rows of append-only JSON-lines part files; a line cut short by a crash mid-write is skipped."""
    rows = []
    for p in sorted(paths):
        # split on "\n" only: str.splitlines would also cut at U+2028 and friends inside a reply
        for line in Path(p).read_text(encoding="utf-8").split("\n"):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and all(c in r for c in columns):
                rows.append(r)
    return rows


class Appender:
    """Append rows as JSON lines (a JSON line holds no raw newline, so a line torn by a crash is
    recognisable and is cut off before the next append), flushed after every ``write``."""

    def __init__(self, path: Path | None, columns):
        self.path, self.columns = path, columns

    def write(self, rows) -> None:
        if self.path is None or not rows:
            return
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({k: r.get(k) for k in self.columns}) + "\n" for r in rows)
            f.flush()
