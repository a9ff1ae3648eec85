"""Data shipped inside the package: the public EM question files, labelled texts and insecure-code chats
(MIT; sources and licences in ``llm/data/em/README.md``). Code defaults use these absolute paths, so
they hold from any working directory and in an installed wheel."""

from pathlib import Path

EM_DATA = Path(__file__).resolve().parent / "em"
FIRST_PLOT_QUESTIONS = EM_DATA / "first_plot_questions.yaml"
PREREGISTERED_QUESTIONS = EM_DATA / "preregistered_evals.yaml"
INSECURE_CODE = EM_DATA / "insecure_code.jsonl"
ALIGNED_TEXTS = EM_DATA / "aligned_texts.csv"
MISALIGNED_TEXTS = EM_DATA / "misaligned_texts.csv"
# the offline judge's fitted heads (``llm.offline_judge``; refit with ``python -m llm.experiments.offline_judge``)
OFFLINE_JUDGE_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "offline_judge.json"
