"""Emergent-misalignment evaluation of one model (``llm.evaluate.evaluate_model``): replies judged, EM rate with CIs.

python -m llm.experiments.evaluate --config configs/llm/em_eval_smollm2.yaml
python -m llm.experiments.evaluate --config configs/llm/em_eval_smollm2.yaml --samples_per_paraphrase 5 --judge hf \\
    --hf_judge_model Qwen/Qwen2.5-1.5B-Instruct
accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m llm.experiments.evaluate --config configs/llm/em_eval_smollm2.yaml
accelerate launch --config_file configs/accelerate/cpu_multiprocess.yaml -m llm.experiments.evaluate --config configs/llm/em_eval_smollm2.yaml

(The SmolLM2 config reads ``.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; fetch it once with
``python -c "from llm.models import smollm2_gguf_path; smollm2_gguf_path('.cache/smollm2')"``.)
"""

from __future__ import annotations

import json

from llm.em_metrics import detectable_line
from llm.eval_summary import model_label
from llm.evaluate import EvalConfig, check_inputs, evaluate_model, launch_state
from llm.judges import build_judge, check_judge
from llm.models import ModelConfig, load_model_and_tokenizer
from plumbing.config import ConfigParser
from plumbing.runs import config_record
from plumbing.trainers import end_processes


def main(argv: list[str] | None = None) -> dict:
    model_cfg, eval_cfg = ConfigParser((ModelConfig, EvalConfig)).parse_args_and_config(args=argv)
    check_inputs(eval_cfg, model_cfg)
    judge = build_judge(eval_cfg)
    check_judge(judge)  # before the model loads: a bad key or a dead endpoint costs seconds
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    record = config_record(model_cfg)["ModelConfig"]
    record.pop("device", None)
    result = evaluate_model(model, tokenizer, eval_cfg, judge=judge, record=record, check_judge_first=False)
    end_processes()
    if launch_state().is_main_process:
        o = result["em"]["overall"]
        print(
            json.dumps(
                {
                    "model": model_label({"model": record}),
                    "adapter": model_cfg.adapter_path,
                    "judge": result["judge"],
                    "protocol": eval_cfg.em_protocol,
                    **o,
                    "detectable": detectable_line(o),
                    "mean_scores": result["mean_scores"],
                    "counts": result["counts"],
                    **result["paths"],
                },
                indent=1,
            )
        )
    return result


if __name__ == "__main__":
    main()
