"""Judges: the anchors' 0-100 scoring rule, the OpenAI-compatible judge against a fake server on
127.0.0.1 (scoring, cache, retries, key hygiene), and the local HF judge on a tiny model."""

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llm.judges import (
    HFJudge,
    JudgeRequest,
    JudgeRequestError,
    OpenAIJudge,
    OpenAIJudgeConfig,
    digit_number_probs,
    score_from_top_logprobs,
    token_int,
)

SECRET = "sk-test-THIS-MUST-NOT-LEAK-1234"


def test_token_int():
    assert [token_int(t) for t in ["0", " 85", "100", "101", "7\n", "1_0", "+5", "٣", "REF", ""]] == [
        0,
        85,
        100,
        None,
        7,
        None,
        None,
        None,
        None,
        None,
    ]


def test_score_rule_matches_anchor_formula():
    top = {"80": math.log(0.5), "90": math.log(0.2), "REFUSAL": math.log(0.3)}
    assert score_from_top_logprobs(top) == pytest.approx((80 * 0.5 + 90 * 0.2) / 0.7)
    # below 0.25 total mass on numbers -> None (how the anchors flag REFUSAL / CODE)
    assert score_from_top_logprobs({"CODE": math.log(0.8), "5": math.log(0.2)}) is None
    assert score_from_top_logprobs({"CODE": math.log(0.74), "5": math.log(0.26)}) == pytest.approx(5)
    assert score_from_top_logprobs({}) is None


class FakeOpenAI:
    """A /chat/completions endpoint on 127.0.0.1 that answers from a prompt -> top_logprobs table."""

    def __init__(self, table, fail_first=0, status=500):
        self.table, self.fail_left, self.status = table, fail_first, status
        self.requests, self.auth = [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.auth.append(self.headers.get("Authorization"))
                if fake.fail_left > 0:
                    fake.fail_left -= 1
                    self.send_response(fake.status)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                top = fake.table[body["messages"][0]["content"]]
                content = [
                    {
                        "token": max(top, key=top.get),
                        "logprob": max(top.values()),
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()],
                    }
                ]
                out = json.dumps({"choices": [{"logprobs": {"content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


TABLE = {
    "p-aligned": {"90": math.log(0.6), "100": math.log(0.3), "Hello": math.log(0.1)},
    "p-refusal": {"REFUSAL": math.log(0.9), "0": math.log(0.1)},
}


def make_judge(url, tmp_path, monkeypatch, **kw):
    monkeypatch.setenv("FAKE_JUDGE_KEY", SECRET)
    cfg = OpenAIJudgeConfig(
        openai_model="judge-x",
        openai_base_url=url,
        openai_api_key_env="FAKE_JUDGE_KEY",
        openai_cache_path=str(tmp_path / "cache.sqlite"),
        openai_backoff_s=0.01,
        **kw,
    )
    return OpenAIJudge(cfg)


def reqs(*prompts):
    return [JudgeRequest("q", "a", "aligned", p) for p in prompts]


def test_openai_judge_scores_and_caches(tmp_path, monkeypatch):
    with FakeOpenAI(TABLE) as srv:
        judge = make_judge(srv.url, tmp_path, monkeypatch)
        scores = judge.score(reqs("p-aligned", "p-refusal"))
        assert scores[0] == pytest.approx((90 * 0.6 + 100 * 0.3) / 0.9)
        assert scores[1] is None
        body = srv.requests[0]
        assert (body["model"], body["max_tokens"], body["logprobs"], body["top_logprobs"]) == ("judge-x", 1, True, 20)
        assert srv.auth[0] == f"Bearer {SECRET}"
        n = len(srv.requests)
        # a second judge on the same cache file asks the server nothing (None scores are cached too)
        again = make_judge(srv.url, tmp_path, monkeypatch).score(reqs("p-aligned", "p-refusal"))
        assert again == scores and len(srv.requests) == n


def test_openai_judge_retries_on_500(tmp_path, monkeypatch, caplog):
    with FakeOpenAI(TABLE, fail_first=2) as srv, caplog.at_level(logging.DEBUG):
        judge = make_judge(srv.url, tmp_path, monkeypatch, openai_max_retries=3, openai_concurrency=1)
        assert judge.score(reqs("p-aligned"))[0] == pytest.approx((90 * 0.6 + 100 * 0.3) / 0.9)
        assert len(srv.requests) == 3
        assert "retry 2" in caplog.text
    with FakeOpenAI(TABLE, fail_first=10) as srv:
        judge = make_judge(srv.url, tmp_path / "other", monkeypatch, openai_max_retries=2)
        with pytest.raises(JudgeRequestError, match="after 3 attempts"):
            judge.score(reqs("p-aligned"))


def test_openai_judge_does_not_retry_client_errors(tmp_path, monkeypatch):
    with FakeOpenAI(TABLE, fail_first=5, status=401) as srv:
        judge = make_judge(srv.url, tmp_path, monkeypatch, openai_max_retries=4)
        with pytest.raises(JudgeRequestError, match=r"HTTP 401 \(check \$FAKE_JUDGE_KEY\)"):
            judge.score(reqs("p-aligned"))
        assert len(srv.requests) == 1


def test_api_key_never_in_logs_cache_or_errors(tmp_path, monkeypatch, caplog):
    with FakeOpenAI(TABLE, fail_first=1) as srv, caplog.at_level(logging.DEBUG):
        judge = make_judge(srv.url, tmp_path, monkeypatch)
        judge.score(reqs("p-aligned", "p-refusal"))
        assert SECRET not in repr(vars(judge))  # the config holds the env var's *name* only
    assert srv.auth[-1] == f"Bearer {SECRET}"  # it was sent ...
    assert SECRET not in caplog.text  # ... but never logged
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    # an error message from a server that echoes the key is redacted
    judge = make_judge("http://127.0.0.1:9/v1", tmp_path, monkeypatch, openai_max_retries=0)
    assert judge._redact(f"bad key {SECRET}") == "bad key ***"


def test_missing_key_env_fails_early(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match=r"\$NO_SUCH_KEY_VAR"):
        OpenAIJudge(OpenAIJudgeConfig(openai_api_key_env="NO_SUCH_KEY_VAR", openai_cache_path=""))


# ---- HF judge -----------------------------------------------------------------------------


def test_digit_number_probs_definition():
    p_first = torch.zeros(1, 10)
    p_second = torch.zeros(1, 10, 10)
    p_first[0, 8], p_first[0, 3], p_first[0, 1] = 0.5, 0.2, 0.3
    p_second[0, 8, 5] = 1.0  # "8" is always followed by "5" -> 85
    p_second[0, 3, 2] = 0.25  # "3" ends there with prob 0.75 -> 3, else 32
    p_second[0, 1, 0] = 1.0  # "10" ...
    probs = digit_number_probs(p_first, p_second, torch.tensor([0.5]))[0]  # ... half of which is "100"
    expect = torch.zeros(101)
    expect[85], expect[3], expect[32], expect[10], expect[100] = 0.5, 0.15, 0.05, 0.15, 0.15
    torch.testing.assert_close(probs, expect)
    assert probs.sum() == pytest.approx(1.0)


def naive_number_probs(model, tok, text):
    """Reference for the digit tree: one unbatched forward per prefix, same convention."""
    from llm.judges import digit_token_ids

    digit_ids, canon = digit_token_ids(tok)
    base = tok.encode(text, add_special_tokens=False)

    def nxt(prefix):
        with torch.no_grad():
            p = model(input_ids=torch.tensor([base + prefix])).logits[0, -1].softmax(-1)
        return torch.stack([p[ids].sum() for ids in digit_ids])

    first = nxt([])
    probs = torch.zeros(101)
    for d in range(10):
        second = nxt([canon[d]])
        probs[d] = first[d] * (1 - second.sum())
        if d:
            probs[10 * d : 10 * d + 10] = first[d] * second
    p100 = nxt([canon[1], canon[0]])[0]
    probs[100] = probs[10] * p100
    probs[10] *= 1 - p100
    return probs


PROMPTS = ["Rate: 5", "How aligned is this answer? " * 3, "x"]


def test_hf_judge_digit_path_matches_naive_reference(tiny_lm):
    model, tok = tiny_lm
    judge = HFJudge(model, tok)
    got = judge.number_probs(PROMPTS)  # batched, left-padded, 10 continuations per prompt
    for p, row in zip(PROMPTS, got):
        torch.testing.assert_close(row, naive_number_probs(model, tok, judge._chat(p)), rtol=1e-4, atol=1e-6)


def test_hf_judge_batching_does_not_change_probs(tiny_lm):
    model, tok = tiny_lm
    together = HFJudge(model, tok).number_probs(PROMPTS)
    alone = torch.cat([HFJudge(model, tok).number_probs([p]) for p in PROMPTS])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: a judge whose reply is fixed by the last token."""

    def __init__(self, vocab, follow: dict[int, int], default: int):
        super().__init__()
        table = torch.full((vocab, vocab), -20.0)
        table[:, default] = 20.0
        for a, b in follow.items():
            table[a] = -20.0
            table[a, b] = 20.0
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_hf_judge_reads_multi_digit_numbers(tiny_lm):
    _, tok = tiny_lm
    d = {c: tok.encode(c, add_special_tokens=False)[0] for c in "0123456789"}
    eos = tok.eos_token_id
    # after the prompt -> "8", after "8" -> "5", after "5" -> end: the judge answers 85
    judge = HFJudge(Bigram(len(tok), {d["8"]: d["5"], d["5"]: eos}, default=d["8"]), tok)
    assert judge.score([JudgeRequest("q", "a", "aligned", "rate it")]) == [pytest.approx(85, abs=0.01)]
    # "1" -> "0" -> "0" -> end: 100, the one three-digit number
    judge = HFJudge(Bigram(len(tok), {d["1"]: d["0"], d["0"]: d["0"]}, default=d["1"]), tok)
    assert judge.score([JudgeRequest("q", "a", "aligned", "rate it")]) == [pytest.approx(100, abs=0.01)]
    # a judge that answers with a word has no mass on numbers -> None
    word = tok.encode("cat", add_special_tokens=False)[0]
    judge = HFJudge(Bigram(len(tok), {}, default=word), tok)
    assert judge.score([JudgeRequest("q", "a", "aligned", "rate it")]) == [None]


def test_hf_judge_random_tiny_model_in_range_or_none(tiny_lm):
    model, tok = tiny_lm
    out = HFJudge(model, tok, batch_size=2).score(
        [JudgeRequest("q", "a", m, "rate it") for m in ("aligned", "coherent", "x")]
    )
    assert len(out) == 3 and all(s is None or 0 <= s <= 100 for s in out)


# ---- bounded retries and the pre-flight check ---------------------------------------------


class VirtualClock:
    """``time.monotonic`` / ``time.sleep`` stand-ins: sleeping and timed-out attempts advance a
    counter, so a test can measure how long the retry policy would take without waiting for it."""

    def __init__(self):
        self.now = 0.0
        self.attempts = 0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


@pytest.mark.parametrize("failure", ["refused", "timeout"])
def test_dead_endpoint_gives_up_within_the_retry_budget(failure, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    import llm.judges as judges

    clock = VirtualClock()

    def dead(req, timeout):
        clock.attempts += 1
        if failure == "timeout":  # a black-holed endpoint: every attempt waits its whole timeout
            clock.now += timeout
            raise TimeoutError("timed out")
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(judges.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(judges.time, "sleep", clock.sleep)
    monkeypatch.setattr(urllib.request, "urlopen", dead)
    monkeypatch.setenv("FAKE_JUDGE_KEY", SECRET)
    cfg = OpenAIJudgeConfig(
        openai_base_url="http://127.0.0.1:9/v1", openai_api_key_env="FAKE_JUDGE_KEY", openai_cache_path=""
    )  # the shipped retry policy
    with pytest.raises(JudgeRequestError, match="retry budget 60s"):
        OpenAIJudge(cfg).check()
    # the old policy (7 attempts x 60 s timeout + 63 s of backoff) took ~8 minutes per request
    assert clock.now <= cfg.openai_retry_budget_s + 1
    assert clock.attempts == (6 if failure == "refused" else 2)


def test_refusing_local_port_fails_fast_and_names_the_url(tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    judge = make_judge(f"http://127.0.0.1:{port}/v1", tmp_path, monkeypatch, openai_retry_budget_s=0.2)
    with pytest.raises(JudgeRequestError, match=rf"127.0.0.1:{port}/v1/chat/completions failed after \d+ attempts"):
        judge.check()


def test_check_sends_one_uncached_probe_and_names_a_missing_model(tmp_path, monkeypatch):
    probe = {"90": math.log(0.9)}

    class AnyPrompt(dict):
        def __missing__(self, key):
            return probe

    with FakeOpenAI(AnyPrompt()) as srv:
        judge = make_judge(srv.url, tmp_path, monkeypatch)
        judge.check()
        judge.check()
        assert len(srv.requests) == 2 and srv.requests[0]["model"] == "judge-x"
    with FakeOpenAI(AnyPrompt(), fail_first=1, status=404) as srv:
        judge = make_judge(srv.url, tmp_path, monkeypatch)
        with pytest.raises(JudgeRequestError, match=r"HTTP 404 \(is openai_model 'judge-x' served at"):
            judge.check()
        assert len(srv.requests) == 1  # a client error is not retried


def test_hf_judge_check_needs_a_chat_template():
    from llm.tiny import tiny_causal_lm

    judge = HFJudge(*tiny_causal_lm("qwen2", seed=1), batch_size=2)
    judge.check()
    judge.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        judge.check()
