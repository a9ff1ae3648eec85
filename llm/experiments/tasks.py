"""The reference's reach on the verifiable arithmetic tasks (``llm.tasks``): pass@1 of a model on each task's eval prompts.

python -m llm.experiments.tasks --model_name_or_path .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --n_prompts 32 --samples 16
python -m llm.experiments.tasks --model_name_or_path .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --tasks mul10 add_tens mul10_add
python -m llm.experiments.tasks --model_name_or_path ... --tasks mul10_add --n_prompts 96 --samples 32 --shots 3   # few-shot elicitation
"""

from __future__ import annotations

import argparse
import time

from llm.fastgen import sample_n_ids
from llm.generate import chat_prompt
from llm.models import ModelConfig, load_model_and_tokenizer
from llm.tasks import TASKS, chance_p, score, task_prompts, worked_examples


def main(argv: list[str] | None = None) -> dict:
    """Pass@1 of a model on each task's eval prompts (the reference's reach on each step and on the composition)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model_name_or_path", required=True)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--n_prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=256, help="rows per sampling batch (CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--shots", type=int, default=0, help="worked train-split examples as earlier chat turns (few-shot elicitation)"
    )
    a = ap.parse_args(argv)
    model, tok = load_model_and_tokenizer(ModelConfig(a.model_name_or_path))
    out = {}
    for task in a.tasks:
        t0 = time.time()
        prompts = task_prompts(task, "eval", a.n_prompts)
        shots = worked_examples(task, a.shots, a.n_prompts)
        ids = sample_n_ids(
            model,
            tok,
            [chat_prompt(tok, p.question, history=shots) for p in prompts],
            a.samples,
            max_new_tokens=a.max_new_tokens,
            batch_size=a.batch_size,
            seed=a.seed,
        )
        replies = [tok.batch_decode(rows, skip_special_tokens=True) for rows in ids]
        per_prompt = [sum(score(r, [p.answer] * len(r))) / len(r) for r, p in zip(replies, prompts)]
        out[task] = {
            "shots": a.shots,
            "pass@1": sum(per_prompt) / len(per_prompt),
            "solved_any": sum(x > 0 for x in per_prompt) / len(per_prompt),
            "chance_p": chance_p(task),
            "seconds": round(time.time() - t0, 1),
            "example": replies[0][:3],
        }
        print(task, out[task], flush=True)
    return out


if __name__ == "__main__":
    main()
