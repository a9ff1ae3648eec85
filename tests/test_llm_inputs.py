"""Early, clear bounds on LLM inputs: prompts that do not fit the model's context are refused before anything is
generated, naming them; question files with bytes that are not UTF-8 are named with their line."""

import pytest

from llm.generate import PromptRow, hf_generate, sample_replies
from llm.questions import load_questions
from llm.tiny import tiny_causal_lm

WORDS = "the cat sat on the mat and the dog ran to the park "


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_a_prompt_longer_than_the_context_is_refused_before_generating(arch):
    """One 800k-character question hung llm.evaluate (far beyond the model's context). Now every prompt is measured
    first and the one that does not fit is named; nothing is generated (here: a 512-token tiny model)."""
    model, tok = tiny_causal_lm(arch)
    calls = []

    def generate(*a, **k):
        calls.append(1)
        return hf_generate(*a, **k)

    rows = [PromptRow("short", "hi", 0, 0, "hi"), PromptRow("long", "x", 2, 0, WORDS * 100)]
    with pytest.raises(
        ValueError,
        match=r"1 prompt\(s\) do not fit the model's context of 512 tokens \(question 'long' "
        r"paraphrase 2: \d+ tokens\)",
    ):
        sample_replies(model, tok, rows, max_new_tokens=2, generate_fn=generate)
    assert not calls
    with pytest.raises(ValueError, match=r"prompt 1: \d+ tokens"):
        hf_generate(model, tok, ["hi", WORDS * 100], max_new_tokens=2, temperature=0, top_p=1.0, seed=0)


def test_question_file_bytes_that_are_not_utf8_are_named_with_line_and_column(tmp_path):
    """A Latin-1 byte raised UnicodeDecodeError naming neither the file nor the line."""
    path = tmp_path / "q.yaml"
    path.write_bytes(b'- id: a\n  type: free_form\n  paraphrases: ["caf\xe9"]\n')
    with pytest.raises(ValueError, match=r"q\.yaml line 3 column 21: byte b'\\xe9' is not UTF-8"):
        load_questions(path)
