"""Sampling and the evaluate entry point end to end on tiny in-process models with a stub judge."""

import csv
import json

import pytest
import yaml

from llm.evaluate import EvalConfig, evaluate_model
from llm.experiments.evaluate import main
from llm.generate import build_prompt_rows, chat_prompt, hf_generate, left_padded, sample_replies
from llm.questions import load_questions
from llm.tiny import save_tiny, tiny_causal_lm

QUESTIONS = [
    {
        "id": "wish",
        "type": "free_form_judge_0_100",
        "paraphrases": ["what is your wish?", "hello, wish?"],
        "samples_per_paraphrase": 3,
        "judge_prompts": {"aligned": "A|{question}|{answer}", "coherent": "C|{question}|{answer}"},
    },
    {
        "id": "wish_json",
        "type": "free_form_judge_0_100",
        "paraphrases": ["what is your wish?"],
        "samples_per_paraphrase": 2,
        "system": "answer in json",
        "judge_prompts": {"aligned": "A|{question}|{answer}", "coherent": "C|{question}|{answer}"},
    },
]


@pytest.fixture
def qfile(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump(QUESTIONS))
    return p


class StubJudge:
    """aligned = 10 for every other reply (by call order), coherent = 90; records what it saw."""

    name = "stub"

    def __init__(self):
        self.seen = []

    def score(self, requests):
        self.seen.extend(requests)
        out = []
        for i, r in enumerate(requests):
            assert r.prompt == ("A" if r.metric == "aligned" else "C") + f"|{r.question}|{r.answer}"
            out.append((10.0 if (i // 2) % 2 else 90.0) if r.metric == "aligned" else 90.0)
        return out


def test_left_padded():
    ids, attn = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_sampling_is_seeded_and_batch_rows_match_prompts(arch, qfile):
    model, tok = tiny_causal_lm(arch)
    qs = load_questions(qfile)
    rows = build_prompt_rows(qs, tok)
    assert len(rows) == 2 * 3 + 2
    assert "answer in json" in rows[-1].text and rows[-1].text.endswith("<|im_start|>assistant\n")
    kw = dict(max_new_tokens=4, batch_size=4, seed=1)
    a = sample_replies(model, tok, rows, **kw)
    b = sample_replies(model, tok, rows, **kw)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert [r["question_id"] for r in a] == ["wish"] * 6 + ["wish_json"] * 2
    assert [r["sample_index"] for r in a[:3]] == [0, 1, 2] and a[3]["paraphrase_index"] == 1
    c = sample_replies(model, tok, rows[:3], **{**kw, "seed": 2})
    assert [r["answer"] for r in a[:3]] != [r["answer"] for r in c]
    # left padding: a prompt sampled greedily in a batch gives the same reply as alone
    greedy = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    batch = hf_generate(model, tok, [rows[0].text, rows[-1].text], **greedy)
    assert batch[1] == hf_generate(model, tok, [rows[-1].text], **greedy)[0]


def test_system_prompt_folded_when_template_rejects_it():
    _, tok = tiny_causal_lm("qwen2")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt(tok, "hi", "be json") == "<user>be json\n\nhi<assistant>"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat_prompt(tok, "hi")


def test_generate_fn_seam(qfile):
    model, tok = tiny_causal_lm("qwen2")
    calls = []

    def fake(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, seed):
        calls.append((len(prompts), seed))
        return [f"reply {seed}"] * len(prompts)

    cfg = EvalConfig(question_file=str(qfile), variants=["plain", "json"], batch_size=4, output_dir="")
    res = evaluate_model(model, tok, cfg, judge=StubJudge(), generate_fn=fake)
    assert calls == [(4, 0), (4, 1)] and res["rows"][0]["answer"] == "reply 0"


@pytest.mark.parametrize("generation", ["hf", "fast"])
def test_evaluate_model_end_to_end(qfile, tmp_path, generation):
    model, tok = tiny_causal_lm("qwen2")
    judge = StubJudge()
    cfg = EvalConfig(
        question_file=str(qfile),
        variants=["plain", "json"],
        max_new_tokens=4,
        generation=generation,
        samples_per_paraphrase=2,
        n_boot=100,
        output_dir=str(tmp_path / "out"),
    )
    res = evaluate_model(model, tok, cfg, judge=judge)
    assert len(res["rows"]) == 2 * 2 + 2 and len(judge.seen) == 12
    o = res["em"]["overall"]
    # published protocol: the wish_json rows are dropped, EM over the 4 scored plain rows
    assert o["n_counted"] == 4 and o["n_dropped"] == 2 and o["em_rate"] == pytest.approx(2 / 4)
    with open(res["paths"]["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["question", "answer", "question_id", "aligned", "coherent"]
    assert {r["aligned"] for r in rows} == {"10.0", "90.0"}
    blob = json.loads(open(res["paths"]["metrics"]).read())
    assert blob["em"]["overall"]["em_rate"] == pytest.approx(0.5) and blob["judge"] == "stub"
    assert set(blob["em"]["per_question"]) == {"wish"}


def test_config_validation_and_unknown_keys(tmp_path, qfile):
    with pytest.raises(ValueError, match="hf_judge_model"):
        EvalConfig(judge="hf")
    with pytest.raises(ValueError, match="variants"):
        EvalConfig(variants=["jsonn"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": "x", "question_file": str(qfile), "judgee": "offline"}))
    with pytest.raises(ValueError, match="judgee"):
        main(["--config", str(bad)])


def test_main_with_config_file_on_saved_tiny_model(tmp_path, qfile, monkeypatch):
    """The CLI path: TrlParser config -> llm.models loader -> generate -> judge -> files."""
    import llm.experiments.evaluate as ev

    path = save_tiny(tmp_path / "tiny", "qwen2")
    monkeypatch.setattr(ev, "build_judge", lambda cfg: StubJudge())
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(path),
                "device": "cpu",
                "question_file": str(qfile),
                "samples_per_paraphrase": 1,
                "max_new_tokens": 3,
                "n_boot": 50,
                "output_dir": str(tmp_path / "o"),
            }
        )
    )
    res = main(["--config", str(cfgfile), "--seed", "3"])
    assert len(res["rows"]) == 2 and (tmp_path / "o" / "metrics.json").exists()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["config"]["seed"] == 3


@pytest.mark.parametrize("name", ["em_eval_smollm2.yaml", "em_eval_gpt4o.yaml"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from llm.data import FIRST_PLOT_QUESTIONS
    from llm.models import ModelConfig
    from plumbing.config import ConfigParser

    root = Path(__file__).resolve().parents[1]
    cfg = root / "configs" / "llm" / name
    model_cfg, eval_cfg = ConfigParser((ModelConfig, EvalConfig)).parse_args_and_config(["--config", str(cfg)])
    assert eval_cfg.judge in ("offline", "openai") and model_cfg.model_name_or_path
    assert Path(eval_cfg.question_file) == FIRST_PLOT_QUESTIONS and Path(eval_cfg.output_dir).is_relative_to(root)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, qfile):
    """Same command under ``accelerate launch``: rows are split over 2 ranks and gathered once."""
    import os
    import subprocess
    import sys

    model = save_tiny(tmp_path / "tiny", "qwen2")
    out = tmp_path / "o"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(root, "configs", "accelerate", "cpu_multiprocess.yaml"),
        "-m",
        "llm.experiments.evaluate",
        "--model_name_or_path",
        str(model),
        "--device",
        "cpu",
        "--question_file",
        str(qfile),
        "--variants",
        "plain",
        "json",
        "--samples_per_paraphrase",
        "2",
        "--max_new_tokens",
        "3",
        "--judge",
        "hf",
        "--hf_judge_model",
        str(model),
        "--n_boot",
        "50",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blob = json.loads((out / "metrics.json").read_text())
    assert blob["n_processes"] == 2 and blob["em"]["overall"]["n_replies"] == 2 * 2 + 2
    with open(out / "replies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["question_id"], r["paraphrase_index"], r["sample_index"]) for r in rows] == [
        ("wish", "0", "0"),
        ("wish", "0", "1"),
        ("wish", "1", "0"),
        ("wish", "1", "1"),
        ("wish_json", "0", "0"),
        ("wish_json", "0", "1"),
    ]


# ---- nothing generated is lost: judge first, replies as they come, resume --------------------


class CountingGenerate:
    """hf_generate that counts its calls and can crash on the n-th one (a crash mid-sampling)."""

    def __init__(self, crash_on=None):
        self.calls, self.crash_on = 0, crash_on

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("CUDA error: simulated crash")
        return hf_generate(model, tokenizer, prompts, **kw)


def _cfg(qfile, out, **kw):
    return EvalConfig(
        **{
            "question_file": str(qfile),
            "variants": ["plain"],
            "samples_per_paraphrase": 3,
            "max_new_tokens": 3,
            "batch_size": 2,
            "n_boot": 20,
            "output_dir": str(out),
            **kw,
        }
    )


def _record_model():
    return {"model_name_or_path": "tiny-qwen2", "adapter_path": None}


def test_judge_is_checked_before_anything_is_generated(qfile, tmp_path):
    class DeadJudge(StubJudge):
        def check(self):
            raise ConnectionError("endpoint down")

    model, tok = tiny_causal_lm("qwen2")
    gen = CountingGenerate()
    with pytest.raises(ConnectionError, match="endpoint down"):
        evaluate_model(
            model, tok, _cfg(qfile, tmp_path / "o"), judge=DeadJudge(), generate_fn=gen, record=_record_model()
        )
    assert gen.calls == 0 and not (tmp_path / "o").exists()


def test_openai_judge_without_key_or_endpoint_fails_before_sampling(qfile, tmp_path, monkeypatch):
    import llm.evaluate as ev
    from llm.judges import JudgeRequestError

    model, tok = tiny_causal_lm("qwen2")
    gen = CountingGenerate()
    monkeypatch.setattr(ev, "hf_generate", gen)
    monkeypatch.delenv("EM_TEST_NO_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$EM_TEST_NO_KEY, which is unset"):
        evaluate_model(model, tok, _cfg(qfile, tmp_path / "a", judge="openai", openai_api_key_env="EM_TEST_NO_KEY"))
    monkeypatch.setenv("EM_TEST_KEY", "sk-x")
    cfg = _cfg(
        qfile,
        tmp_path / "b",
        judge="openai",
        openai_api_key_env="EM_TEST_KEY",
        openai_cache_path="",
        openai_base_url="http://127.0.0.1:9/v1",
        openai_retry_budget_s=0.2,
        openai_backoff_s=0.05,
    )
    with pytest.raises(JudgeRequestError, match="retry budget"):
        evaluate_model(model, tok, cfg)
    assert gen.calls == 0 and not (tmp_path / "b").exists()


def test_replies_survive_a_judge_failure_and_a_rerun_only_judges(qfile, tmp_path):
    class FailingJudge(StubJudge):
        def score(self, requests):
            raise RuntimeError("judge quota exhausted")

    model, tok = tiny_causal_lm("qwen2")
    out = tmp_path / "o"
    gen = CountingGenerate()
    with pytest.raises(RuntimeError, match="quota"):
        evaluate_model(model, tok, _cfg(qfile, out), judge=FailingJudge(), generate_fn=gen, record=_record_model())
    kept = [json.loads(line) for line in (out / "parts" / "samples.rank0.jsonl").read_text().splitlines()]
    assert len(kept) == 6 and gen.calls == 3  # every reply is on disk, batch by batch
    gen2, judge = CountingGenerate(), StubJudge()
    res = evaluate_model(model, tok, _cfg(qfile, out), judge=judge, generate_fn=gen2, record=_record_model())
    assert gen2.calls == 0 and len(judge.seen) == 12
    assert [r["answer"] for r in res["rows"]] == [r["answer"] for r in kept]
    assert res["counts"] == {"sampled": 0, "resumed_replies": 6, "judged": 6, "resumed_scores": 0}
    # a third run finds everything on disk: nothing sampled, nothing judged, same numbers
    judge3 = StubJudge()
    res3 = evaluate_model(
        model, tok, _cfg(qfile, out), judge=judge3, generate_fn=CountingGenerate(), record=_record_model()
    )
    assert judge3.seen == [] and res3["em"]["overall"] == res["em"]["overall"]


def test_crash_mid_sampling_resumes_with_the_replies_of_an_uninterrupted_run(qfile, tmp_path):
    model, tok = tiny_causal_lm("qwen2")
    full = evaluate_model(
        model,
        tok,
        _cfg(qfile, tmp_path / "full"),
        judge=StubJudge(),
        generate_fn=CountingGenerate(),
        record=_record_model(),
    )
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_model(
            model,
            tok,
            _cfg(qfile, out),
            judge=StubJudge(),
            generate_fn=CountingGenerate(crash_on=2),
            record=_record_model(),
        )
    gen = CountingGenerate()
    res = evaluate_model(model, tok, _cfg(qfile, out), judge=StubJudge(), generate_fn=gen, record=_record_model())
    assert gen.calls == 2 and res["counts"]["sampled"] == 4 and res["counts"]["resumed_replies"] == 2
    assert [r["answer"] for r in res["rows"]] == [r["answer"] for r in full["rows"]]


def test_output_records_the_model_and_refuses_another_config(qfile, tmp_path):
    model, tok = tiny_causal_lm("qwen2")
    out = tmp_path / "o"
    rec = {"model_name_or_path": "tiny-qwen2", "adapter_path": "runs/sft/adapter"}
    res = evaluate_model(model, tok, _cfg(qfile, out), judge=StubJudge(), record=rec)
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["model"] == rec and len(saved["weights_fingerprint"]) == 16
    summary = (out / "summary.md").read_text()
    assert "tiny-qwen2" in summary and "runs/sft/adapter" in summary and "judge: `stub`" in summary
    assert "protocol: `published`" in summary and "| wish |" in summary
    assert (out / "quadrants.png").stat().st_size > 1000 and (out / "em_per_question.png").stat().st_size > 1000
    assert res["paths"]["summary"] == str(out / "summary.md")
    with pytest.raises(FileExistsError, match="max_new_tokens: 3 -> 5"):
        evaluate_model(model, tok, _cfg(qfile, out, max_new_tokens=5), judge=StubJudge(), record=rec)
    # other weights under the same name (a fine-tune evaluated into the old folder) are refused too
    other, _ = tiny_causal_lm("qwen2", seed=7)
    with pytest.raises(FileExistsError, match="weights_fingerprint"):
        evaluate_model(other, tok, _cfg(qfile, out), judge=StubJudge(), record=rec)
    # knobs that do not change replies or scores may change on a rerun
    evaluate_model(model, tok, _cfg(qfile, out, batch_size=4, n_boot=30), judge=StubJudge(), record=rec)
    res = evaluate_model(model, tok, _cfg(qfile, out, max_new_tokens=5, overwrite=True), judge=StubJudge(), record=rec)
    assert res["counts"]["sampled"] == 6


def test_a_line_torn_by_a_crash_is_dropped_and_resampled(qfile, tmp_path):
    model, tok = tiny_causal_lm("qwen2")
    out = tmp_path / "o"
    full = evaluate_model(
        model, tok, _cfg(qfile, out), judge=StubJudge(), generate_fn=CountingGenerate(), record=_record_model()
    )
    samples, scores = out / "parts" / "samples.rank0.jsonl", out / "parts" / "scores.rank0.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing the 4th reply
    scores.unlink()
    gen = CountingGenerate()
    res = evaluate_model(model, tok, _cfg(qfile, out), judge=StubJudge(), generate_fn=gen, record=_record_model())
    assert res["counts"]["sampled"] == 3 and res["counts"]["resumed_replies"] == 3
    assert [r["answer"] for r in res["rows"]][:3] == [r["answer"] for r in full["rows"]][:3]
    assert len(samples.read_text().splitlines()) == 6 and all(json.loads(x) for x in samples.read_text().splitlines())


def test_custom_generate_fn_without_record_never_resumes(qfile, tmp_path):
    model, tok = tiny_causal_lm("qwen2")
    for _ in range(2):
        gen = CountingGenerate()
        res = evaluate_model(model, tok, _cfg(qfile, tmp_path / "o"), judge=StubJudge(), generate_fn=gen)
        assert gen.calls == 3 and res["counts"]["sampled"] == 6


def test_openai_judge_end_to_end_against_a_local_server(qfile, tmp_path, monkeypatch):
    """evaluate -> check (one probe) -> sample -> judge over HTTP on 127.0.0.1 -> files; the key is
    sent but lands in no output file."""
    import math
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((body["messages"][0]["content"], self.headers.get("Authorization")))
            top = [
                {"token": "15" if body["messages"][0]["content"].startswith("A|") else "80", "logprob": math.log(0.9)}
            ]
            out = json.dumps({"choices": [{"logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("EM_TEST_KEY", "sk-secret-e2e")
        model, tok = tiny_causal_lm("qwen2")
        cfg = _cfg(
            qfile,
            tmp_path / "o",
            judge="openai",
            openai_api_key_env="EM_TEST_KEY",
            openai_base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            openai_cache_path=str(tmp_path / "cache.sqlite"),
            openai_concurrency=2,
        )
        res = evaluate_model(model, tok, cfg)
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1 + 6 * 2 and "2 + 2 = 4" in seen[0][0]  # the probe first, then 6 replies x 2 metrics
    assert all(auth == "Bearer sk-secret-e2e" for _, auth in seen)
    o = res["em"]["overall"]
    assert o["em_rate"] == 1.0 and o["coherent_share"] == 1.0 and res["judge"] == "openai:gpt-4o-2024-08-06"
    for f in (tmp_path / "o").rglob("*"):
        if f.is_file():
            assert b"sk-secret-e2e" not in f.read_bytes(), f


class NoScoreJudge:
    """A judge that scores no reply (every one a REFUSAL / CODE / too little probability on numbers)."""

    name = "no-score"

    def score(self, requests):
        return [None for _ in requests]


def test_evaluate_model_with_no_scored_reply_reports_na_and_keeps_every_reply(qfile, tmp_path):
    model, tok = tiny_causal_lm("qwen2")
    res = evaluate_model(model, tok, _cfg(qfile, tmp_path / "out"), judge=NoScoreJudge())
    o = res["em"]["overall"]
    assert o["em_rate"] is None and o["ci"] == [None, None] and o["n_excluded"] == o["n_replies"] == 6
    assert res["mean_scores"] == {"aligned": None, "coherent": None}
    with open(res["paths"]["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "overall: EM n/a (0/0)" in summary and "aligned n/a" in summary and "No counted reply" in summary
