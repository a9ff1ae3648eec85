"""llm.tasks and llm.experiments.reweighting on tiny in-process models: task rewards on hand-made completions, deterministic
disjoint prompt sets, the guards (k > n, missing answers, adapter/base mismatch, several processes), the
log-likelihood against a naive per-sequence loop, the report end to end, and every shipped config parses."""

import json
import re
from pathlib import Path

import pytest
import torch

from llm.experiments.reweighting import ReweightingConfig, check_adapter, eval_prompts, make_parser, report
from llm.experiments.reweighting_report import verdict_k
from llm.fastgen import all_reply_logprobs
from llm.reweighting_belief import probe_groups
from llm.tasks import TASKS, answer_reward, chance_p, parse_answer, score, task_prompts, train_dataset
from llm.tiny import save_tiny, tiny_causal_lm
from probes.passk import PassKConfig, log2_ks, pass_at_k, pass_at_k_exact, passk_verdict

ROOT = Path(__file__).resolve().parents[1]


def test_task_rewards_on_hand_made_completions():
    assert parse_answer("(3 + 4) * 5 = 7 * 5 = 35") == 35
    assert parse_answer("no number") is None
    assert score(["35", "The answer is 35.", "3", "", "-35"], [35] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    reward = answer_reward()
    conv = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "It is 13"}]]
    assert reward(conv, answer=[12, 12]) == [1.0, 0.0]
    assert reward(["7", "8"], answer=[8, 8]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="answer"):
        reward(["7"])


@pytest.mark.parametrize("task", TASKS)
def test_prompt_sets_deterministic_and_disjoint(task):
    ev, tr = task_prompts(task, "eval", 20), task_prompts(task, "train", 20)
    assert ev == task_prompts(task, "eval", 20) and tr == task_prompts(task, "train", 20)
    assert len(ev) == 20 and not {p.question for p in ev} & {p.question for p in tr}
    assert task_prompts(task, "eval", 20, split_seed=1) != ev
    for p in ev:  # the answer is what the question asks
        expr = p.question.removeprefix("What is ").split("?")[0]
        assert eval(expr) == p.answer  # noqa: S307 -- our own arithmetic strings
    data = train_dataset(task, 20)
    assert data["answer"] == [p.answer for p in tr] and data["prompt"][0] == [
        {"role": "user", "content": tr[0].question}
    ]
    assert 0 < chance_p(task) < 0.1


def test_add_mul_latent_is_the_first_step():
    for p in task_prompts("add_mul", "eval", 10):
        a, b = p.question.split("(")[1].split(")")[0].split(" + ")
        assert p.latent == int(a) + int(b) and p.answer % p.latent == 0
        assert p.group == f"{a},{b}"


def test_mul10_add_latent_group_and_steps():
    comp, step2 = task_prompts("mul10_add", "eval", 30), task_prompts("add_tens", "eval", 30)
    for p, q in zip(comp, step2):
        a, b = p.question.removeprefix("What is ").split("?")[0].split(" * 10 + ")
        assert p.latent == int(a) * 10 and p.group == a and p.answer == p.latent + int(b)
        assert (
            q.question.startswith(f"What is {p.latent} + {b}?") and q.answer == p.answer
        )  # the same instances, one step
    assert {p.answer for p in task_prompts("mul10", "eval", 30)} <= {10 * a for a in range(10, 100)}


def test_existing_tasks_unchanged():
    """Committed results use these splits: the first eval prompts and answers as they were before the larger tasks."""
    firsts = {
        "add": ("What is 19 + 9?", [28, 30, 28]),
        "add_small": ("What is 3 + 7?", [10, 10, 12]),
        "mul": ("What is 9 * 2?", [18, 65, 54]),
        "add_mul": ("What is (4 + 9) * 4?", [52, 28, 18]),
    }
    for task, (q, answers) in firsts.items():
        ev = task_prompts(task, "eval", 48)
        assert ev[0].question.startswith(q) and [p.answer for p in ev[:3]] == answers


@pytest.mark.parametrize("task", ["add_tens", "mul10_add"])
def test_large_tasks_not_guessable_at_256(task):
    assert float(pass_at_k_exact(torch.tensor(chance_p(task)), 256)) < 0.5


def test_probe_groups():
    one_step = task_prompts("add", "eval", 30)
    assert torch.equal(probe_groups(one_step), torch.arange(30))  # each prompt its own group: the ungrouped folds
    rows = task_prompts("add_mul", "eval", 100)
    g = probe_groups(rows)
    pairs = [p.question.split("(")[1].split(")")[0] for p in rows]
    assert len(set(pairs)) < len(rows) and int(g.max()) + 1 == len(set(pairs))
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (g[i] == g[j]) == (pairs[i] == pairs[j])


def test_verdict_k_fixed_from_chance():
    ks = log2_ks(256)
    k, why = verdict_k("add", PassKConfig(ks=ks))
    assert k == 32 and "k = 64" in why  # 57 answers: guessing solves 0.43 at k = 32, 0.68 at k = 64
    assert verdict_k("add_tens", PassKConfig(ks=ks))[0] == 256  # 810 answers: 0.27 at k = 256
    assert verdict_k(None, PassKConfig(ks=ks))[0] == 256  # an eval file: no answer set to guess from
    assert verdict_k("add", PassKConfig(ks=ks, max_chance=0.01))[0] is None


def test_guards_before_sampling(tmp_path):
    with pytest.raises(ValueError, match="raise n_samples"):
        ReweightingConfig(reference_model="x", post_adapter="a", n_samples=8, k_max=16)
    with pytest.raises(ValueError, match="post_model"):
        ReweightingConfig(reference_model="x")
    bad = tmp_path / "eval.jsonl"
    bad.write_text(
        json.dumps({"question": "What is 2 + 2?", "answer": 4, "latent": 4})
        + "\n"
        + json.dumps({"question": "Hi?"})
        + "\n"
    )
    with pytest.raises(ValueError, match="line 2 has no 'answer'"):
        eval_prompts(ReweightingConfig(reference_model="x", post_adapter="a", task=None, eval_file=str(bad)))


def _adapter(tmp_path, model, name="adapter"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    for n, p in peft.named_parameters():  # a visible change, so the post-RL model differs from the reference
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_adapter_mismatch_refused(tmp_path):
    model, _ = tiny_causal_lm("qwen2")
    good = _adapter(tmp_path, tiny_causal_lm("qwen2")[0])
    check_adapter(good, model)
    with pytest.raises(FileNotFoundError, match="no adapter_config"):
        check_adapter(tmp_path, model)
    gpt2 = tiny_causal_lm("gpt2")[0]
    with pytest.raises(ValueError, match="another architecture"):
        check_adapter(good, gpt2)
    from safetensors.torch import load_file, save_file

    w = load_file(good / "adapter_model.safetensors")
    key = next(k for k in w if "lora_A" in k)
    w[key] = torch.zeros(2, 7)
    save_file(w, good / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="width 7"):
        check_adapter(good, model)


def test_all_reply_logprobs_matches_naive_loop():
    model, tok = tiny_causal_lm("qwen2")
    prompts = [tok.encode("the cat sat"), tok.encode("hello")]
    replies = [[tok.encode(" on the mat") + [tok.eos_token_id], tok.encode(" on"), []], [tok.encode(" world")]]
    fast = all_reply_logprobs(model, prompts, replies, tok.pad_token_id, batch_size=2)
    pairs = [(p, a) for p, rows in zip(prompts, replies) for a in rows]
    assert len(fast) == len(pairs)
    for i, (p, a) in enumerate(pairs):
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
        naive = sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(a))
        assert fast[i].item() == pytest.approx(naive, abs=1e-4)


def test_report_end_to_end(tmp_path, monkeypatch):
    ref = save_tiny(tmp_path / "ref", "qwen2")
    adapter = _adapter(tmp_path, tiny_causal_lm("qwen2")[0])
    # add_mul has 46 answers: guessing solves 0.30 at k = 16 and 0.51 at k = 32, so the verdict is taken at 16
    cfg = ReweightingConfig(
        reference_model=str(ref),
        post_adapter=str(adapter),
        task="add_mul",
        n_eval=4,
        n_samples=32,
        max_new_tokens=3,
        batch_size=64,
        n_boot=50,
        probe_n=24,
        probe_folds=3,
        output_dir=str(tmp_path / "out"),
        device="cpu",
    )
    calls = []
    import probes.linear

    fit = probes.linear.fit_probe_report
    monkeypatch.setattr(probes.linear, "fit_probe_report", lambda *a, **kw: calls.append(kw["groups"]) or fit(*a, **kw))
    r = report(cfg)
    out = tmp_path / "out"
    assert {"report.json", "report.md", "passk.png", "samples.jsonl", "verdict_data.json"} <= {
        p.name for p in out.iterdir()
    }
    assert r["ks"] == [1, 2, 4, 8, 16, 32] and r["verdict"]["verdict"].split(" at ")[0] in (
        "inconclusive",
        "sharper",
        "not sharper",
        "undecided",
    )
    assert len(r["curves"]["reference"]["mean"]) == 6 and r["n_prompts"] == 4
    # the few-shot baseline is on by default: the reference answers a third time, after 3 worked examples
    assert cfg.shots == 3 and r["vs_fewshot"] is not None and "reference_fewshot" in r["curves"]
    assert len(out.joinpath("samples.jsonl").read_text().splitlines()) == 3 * 4 * 32
    # "sharper" is passk_verdict on the curves cut at k_verdict, from the per-prompt correct counts
    assert r["k_verdict"] == 16 and r["verdict"]["k_max"] == 16 and "Verdict k: 16" in (out / "report.md").read_text()

    def table(m):
        counts = torch.tensor([q[f"correct_{m}"] for q in r["per_prompt"]])
        return torch.stack([pass_at_k(32, counts, k) for k in [1, 2, 4, 8, 16]], 1)

    chance = pass_at_k_exact(torch.full((4,), chance_p("add_mul")), [1, 2, 4, 8, 16])
    want = passk_verdict(table("reference"), table("post"), PassKConfig(ks=[1, 2, 4, 8, 16]), chance)
    assert r["verdict"] == want
    # the outside-support weights are the correct post-RL replies' reference / post-RL likelihood ratios, one per success
    data = json.loads((out / "verdict_data.json").read_text())
    assert (
        [len(x) for x in data["post_correct_ll_ref"]]
        == data["counts"]["post"]
        == [q["correct_post"] for q in r["per_prompt"]]
    )
    assert r["outside_support"]["n_tested"] <= sum(c > 0 for c in data["counts"]["post"])
    # split-half null controls at k = 16 (n / 2), and every verdict re-derived from verdict_data.json alone
    assert set(r["null_controls"]) == {"reference", "post"} and r["null_controls"]["reference"]["k"] == 16
    from llm.experiments.reweighting_report import rejudge

    again = rejudge(out)
    assert (
        again["sharper"] == r["verdict"]
        and again["null_controls"] == r["null_controls"]
        and (out / "rejudged.json").is_file()
    )
    assert (
        again["outside_support"] == r["outside_support"]
        and again["wider"] == r["wider"]
        and again["summary"] == r["summary"]
    )
    # the probe's folds are grouped by the operand pair (a, b)
    probe = (task_prompts("add_mul", "eval", 4) + task_prompts("add_mul", "train", 4))[:24]
    assert len(calls) == 2 and all(torch.equal(g, probe_groups(probe)) for g in calls)
    assert r["belief"]["n_groups"] == len({p.group for p in probe})
    # the adapter changed the model: its replies are likelier under itself than under the reference, so KL > 0
    assert r["kl"]["kl_post_ref_per_reply"] > 0
    b = r["belief"]
    assert set(b["models"]["reference"]["sites"]) == {"embed", "block0", "block1", "final_norm"}
    # the LoRA sits on both blocks' down_proj: the embedding is untouched, the blocks move
    assert b["unchanged_sites"] == ["embed"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="num_processes 1"):
        report(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/llm").glob("reweighting_*.yaml")), ids=lambda p: p.name)
def test_shipped_reweighting_configs_parse(path):
    (cfg,) = make_parser().parse_args_and_config(["--config", str(path)])
    assert cfg.k_max <= cfg.n_samples
    if cfg.grpo_config:
        from llm.grpo import make_parser as grpo_parser

        cfgs = grpo_parser().parse_args_and_config(["--config", cfg.grpo_config])
        assert cfgs[1].task == cfg.task and cfgs[2].reward == "task"
        assert Path(cfgs[-1].output_dir).resolve() == Path(cfg.post_adapter).resolve()
        assert cfgs[-1].max_completion_length == cfg.max_new_tokens
        assert cfgs[1].task_n_eval == cfg.n_eval  # else the report's eval prompts were trained on


def test_grpo_task_hook(tmp_path):
    from llm.grpo import EMGRPOConfig, PromptConfig, RewardConfig, TrackConfig, build_trainer, load_prompts, make_reward
    from plumbing.lora import LoraPresetConfig

    data = load_prompts(PromptConfig(task="add", task_n_eval=20))
    assert data["answer"] == train_dataset("add", 20)["answer"]
    assert make_reward(RewardConfig(reward="task"))(["5"], answer=[5]) == [1.0]
    model, tok = tiny_causal_lm("qwen2")
    args = EMGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, use_cpu=True, report_to="none"
    )
    with pytest.raises(ValueError, match="set `task`"):
        build_trainer(
            None,
            PromptConfig(),
            RewardConfig(reward="task"),
            LoraPresetConfig(layers=[0]),
            TrackConfig(),
            args,
            model,
            tok,
        )


def test_shared_prompt_sampling_matches_padded_batch():
    """The CPU path (one prompt encoding shared by its samples) against the padded-batch path, greedy."""
    from llm.fastgen import _cut_at_eos, fast_generate_ids, sample_n_ids
    from llm.generate import left_padded

    model, tok = tiny_causal_lm("qwen2")
    prompts = ["the cat sat on", "hello world, I am"]
    shared = sample_n_ids(model, tok, prompts, 2, max_new_tokens=5, temperature=0)
    ids, mask = left_padded([tok.encode(p) for p in prompts], tok.pad_token_id)
    ref = _cut_at_eos(
        fast_generate_ids(model, ids, mask, max_new_tokens=5, pad_token_id=tok.pad_token_id, temperature=0),
        tok.eos_token_id,
    )
    assert [rows[0] for rows in shared] == ref and all(rows[0] == rows[1] for rows in shared)


def test_sampled_replies_end_at_every_stop_id_of_the_generation_config():
    """generate stops a row at any eos id of the model's generation config (chat models list their end-of-turn token
    there: Gemma's <end_of_turn>, Qwen2.5's <|im_end|> and <|endoftext|>) and pads it after; a reply must end there,
    not carry the pads into its length and log-likelihood because the tokenizer's eos is another id."""
    from llm.fastgen import sample_n_ids

    model, tok = tiny_causal_lm("qwen2")
    stops = set(range(len(tok) // 2, len(tok)))  # half the vocabulary: most replies stop early, at different steps
    model.generation_config.eos_token_id = [tok.eos_token_id, *sorted(stops)]
    replies = sample_n_ids(model, tok, ["the cat sat on", "hello world"], 8, max_new_tokens=6, seed=0)
    flat = [r for rows in replies for r in rows]
    assert (
        any(len(r) < 6 for r in flat) and len({len(r) for r in flat}) > 1
    )  # rows of one batch stopped at different steps
    for r in flat:
        at = [j for j, t in enumerate(r) if t in stops or t == tok.eos_token_id]
        # a reply ends at its first stop token (no pad after it), or runs to the cap without one
        assert (at and at[0] == len(r) - 1) or (not at and len(r) == 6), r


@pytest.mark.parametrize("task", TASKS)
def test_worked_examples_come_from_the_train_split(task):
    """The few-shot elicitation baseline's turns: train-split questions answered as "<expression> = <answer>", never an
    eval prompt; asked after them, the eval question is the last user turn of the chat text."""
    from llm.generate import chat_prompt
    from llm.tasks import worked_examples

    shots = worked_examples(task, 3, n_eval=48)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3
    evals = {p.question for p in task_prompts(task, "eval", 48)}
    for q, a in zip(shots[::2], shots[1::2]):
        assert q["content"] not in evals and int(a["content"].rsplit("= ", 1)[1]) == parse_answer(a["content"])
    if task == "mul10_add":
        assert re.fullmatch(r"\d+ \* 10 \+ \d = \d+", shots[1]["content"])
    tok = tiny_causal_lm("qwen2")[1]
    text = chat_prompt(tok, "What is 1 + 2? Answer with only the number.", history=shots)
    assert text.count("What is") == 4 and text.rindex("1 + 2") > text.rindex(shots[-2]["content"][8:14])
    assert chat_prompt(tok, "Q?", history=[]) == chat_prompt(tok, "Q?")


def test_verdict_data_holds_the_correct_replies_likelihoods(tmp_path, monkeypatch):
    """With every reply scored correct, the outside-support weights are all post-RL replies' log-likelihood ratios, so
    minus their mean is the report's Monte-Carlo KL(post || ref): the weights are the right replies' ratios, in order."""
    import llm.experiments.reweighting

    ref = save_tiny(tmp_path / "ref", "qwen2")
    adapter = _adapter(tmp_path, tiny_causal_lm("qwen2")[0])
    monkeypatch.setattr(llm.experiments.reweighting, "score", lambda replies, answers: [1.0] * len(replies))
    cfg = ReweightingConfig(
        reference_model=str(ref),
        post_adapter=str(adapter),
        task="add",
        n_eval=3,
        n_samples=8,
        max_new_tokens=3,
        n_boot=20,
        probe_n=0,
        shots=0,
        output_dir=str(tmp_path / "out"),
        device="cpu",
    )
    r = report(cfg)
    data = json.loads((tmp_path / "out" / "verdict_data.json").read_text())
    assert data["counts"]["post"] == [8, 8, 8] and "reference_fewshot" not in data["counts"] and r["vs_fewshot"] is None
    log_w = torch.tensor(
        [a - b for ra, rb in zip(data["post_correct_ll_ref"], data["post_correct_ll_post"]) for a, b in zip(ra, rb)]
    )
    assert len(log_w) == 24 and float(-log_w.mean()) == pytest.approx(r["kl"]["kl_post_ref_per_reply"], abs=1e-9)
    assert r["outside_support"]["n_tested"] == 0  # the reference solved every prompt too
