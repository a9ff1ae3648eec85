"""toy.grpo / toy.rewards / toy.experiments.rl: GRPO smoke on a tiny random-init GPT-2, guards, tokenizer, exact rewards."""

import itertools
import warnings

import pytest
import torch

from plumbing.lora import assert_trainable
from plumbing.trainers import ZeroAdvantageCallback
from toy.beliefs import belief_states, next_token_distributions
from toy.data import sample
from toy.experiments.rl import main, run
from toy.grpo import (
    RLTaskConfig,
    ToyGRPOConfig,
    ToyGRPOTrainer,
    freeze_except,
    load_tokenizer,
    maxrl_advantages,
    tokens_to_text,
    word_tokenizer,
)
from toy.model import ToyModelConfig, build_model
from toy.processes import golden_mean, mess3, product, rare_factor, rrxor
from toy.rewards import ComposedLatentReward, NextTokenArgmaxReward, RareEmissionReward


def test_grpo_smoke_reward_rises_and_parameters_change(tiny_pretrained, tmp_path):
    from transformers import GPT2LMHeadModel

    task = RLTaskConfig(
        process="mess3",
        reward="reweight",
        pretrained_path=str(tiny_pretrained),
        prompt_length=6,
        n_train_prompts=2000,
        n_eval_prompts=400,
        exact_eval_every=10,
        report=False,
    )
    args = ToyGRPOConfig(
        output_dir=str(tmp_path / "rl"),
        max_steps=40,
        learning_rate=1e-2,
        per_device_train_batch_size=64,
        num_generations=8,
        use_cpu=True,
        seed=0,
    )
    assert args.bf16 is False and not args.gradient_checkpointing  # the CPU defaults resolved in one place
    m = run(task, args)
    assert any("loss" in h for h in m["log_history"]) and any("reward" in h for h in m["log_history"])
    # the chance-level random policy (1/3) learns to copy the likely next token of Mess3
    assert m["reward_after"] > m["reward_before"] + 0.15, m["exact_reward_curve"]
    # the curve's clock: training seconds at each evaluation, its own evaluations excluded
    seconds = m["exact_reward_seconds"]
    assert len(seconds) == len(m["exact_reward_curve"]) == 5 and seconds[0] < 0.5 and seconds == sorted(seconds)
    assert seconds[-1] < m["train_seconds"]
    import json

    lines = [json.loads(x) for x in (tmp_path / "rl" / "exact_reward_curve.jsonl").read_text().splitlines()]
    assert [[q["step"], q["reward"]] for q in lines] == [
        list(p) for p in m["exact_reward_curve"]
    ]  # written as measured
    pre = GPT2LMHeadModel.from_pretrained(tiny_pretrained).state_dict()
    post = GPT2LMHeadModel.from_pretrained(tmp_path / "rl" / "model").state_dict()
    assert max((pre[k] - post[k]).abs().max().item() for k in pre) > 1e-3
    assert (tmp_path / "rl" / "reward_curve.png").is_file() and (tmp_path / "rl" / "summary.md").is_file()


def test_maxrl_advantages_weight_prompts_by_inverse_pass_rate():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])  # groups of 4: pass rates 1/4, 3/4, 0
    m = r.view(-1, 4).mean(1).repeat_interleave(4)
    a = maxrl_advantages(r - m, m)
    assert torch.allclose(a[:4], torch.tensor([3.0, -1, -1, -1]))  # (r - m) / m
    assert torch.allclose(a[4:8], torch.tensor([1 / 3, 1 / 3, 1 / 3, -1]))
    assert torch.equal(a[8:], torch.zeros(4))  # nothing succeeded: nothing to learn, no division by 0
    # the per-prompt gradient weight is 1 / p: summed positive advantage per group = G (1 - p), i.e. the success
    # share (p) times 1/p times (1 - p) -- GRPO's std scaling gives sqrt(p (1 - p)) instead
    assert a[:4].clamp_min(0).sum() == 3 and torch.isclose(a[4:8].clamp_min(0).sum(), torch.tensor(1.0))


def test_maxrl_config_replaces_reward_scaling_and_rejects_unknown(tmp_path):
    args = ToyGRPOConfig(output_dir=str(tmp_path), advantage="maxrl", use_cpu=True)
    assert args.scale_rewards == "none"  # TRL centres; ToyGRPOTrainer divides by the group mean
    assert ToyGRPOConfig(output_dir=str(tmp_path), use_cpu=True).scale_rewards == "group"
    with pytest.raises(ValueError, match="'grpo' or 'maxrl'"):
        ToyGRPOConfig(output_dir=str(tmp_path), advantage="ppo", use_cpu=True)


def test_maxrl_trainer_divides_trl_advantages_by_the_group_mean(tiny_pretrained, tmp_path):
    """Through TRL: the advantages the loss sees are (r - m) / m of the rewards the reward function gave,
    and a negative reward is refused with a message."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel

    tok = word_tokenizer(3)
    ds = Dataset.from_dict({"prompt": tokens_to_text(sample(mess3(), 64, 5, seed=0).tokens)})
    given = []

    def first_token_is_zero(completion_ids, **kw):
        given.append([float(ids[0] == 0) for ids in completion_ids])
        return given[-1]

    args = ToyGRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=16,
        num_generations=4,
        advantage="maxrl",
        use_cpu=True,
        generation_kwargs={"suppress_tokens": [3, 4]},
    )
    trainer = ToyGRPOTrainer(
        model=GPT2LMHeadModel.from_pretrained(tiny_pretrained),
        reward_funcs=[first_token_is_zero],
        args=args,
        train_dataset=ds,
        processing_class=tok,
    )
    trainer.model.train()
    out = trainer._generate_and_score_completions([ds[i // 4] for i in range(16)])
    r = torch.tensor(given[-1])
    m = r.view(-1, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(out["advantages"].float(), maxrl_advantages(r - m, m), atol=1e-6)

    trainer.reward_funcs = [lambda completions, **kw: [-1.0] * len(completions)]
    with pytest.raises(ValueError, match="rewards >= 0"):
        trainer._generate_and_score_completions([ds[i // 4] for i in range(16)])


def _few_steps(pretrained, out, one_token_path: str, **overrides) -> tuple[list, list[dict], dict]:
    """3 GRPO steps (MaxRL, beta > 0) through ToyGRPOTrainer.train: the completions the reward saw, the logs, the
    trained parameters."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel

    ds = Dataset.from_dict({"prompt": tokens_to_text(sample(mess3(), 64, 5, seed=0).tokens)})
    seen = []

    def first_token_is_zero(completion_ids, **kw):
        seen.append([ids for ids in completion_ids])
        return [float(ids[0] == 0) for ids in completion_ids]

    args = ToyGRPOConfig(
        **{
            "output_dir": str(out),
            "max_steps": 3,
            "per_device_train_batch_size": 32,
            "num_generations": 4,
            "learning_rate": 3e-2,
            "beta": 0.04,
            "advantage": "maxrl",
            "use_cpu": True,
            "seed": 0,
            "report_to": [],
            "one_token_path": one_token_path,
            "generation_kwargs": {"suppress_tokens": [3, 4]},
            **overrides,
        }
    )
    trainer = ToyGRPOTrainer(
        model=GPT2LMHeadModel.from_pretrained(pretrained),
        reward_funcs=[first_token_is_zero],
        args=args,
        train_dataset=ds,
        processing_class=word_tokenizer(3),
    )
    trainer.train()
    return seen, [h for h in trainer.state.log_history if "loss" in h], trainer.model.state_dict()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_token_forward_path_matches_trl_generate(tiny_pretrained, tmp_path, temperature):
    """The one-token path against TRL's own (HF generate + full-sequence forwards): same seed -> the same sampled
    completions, the same loss, KL and entropy at every step, and the same parameters after 3 steps. Plain SGD:
    Adam turns float noise on a parameter whose gradient is exactly 0 in exact arithmetic (the lm_head rows of the
    suppressed tokens: their gradient is a sum of group-centred advantages times one probability per prompt) into
    an lr-sized step, so no two orders of float operations agree after an Adam step."""
    fast = _few_steps(tiny_pretrained, tmp_path / "fast", "forward", temperature=temperature, optim="sgd")
    slow = _few_steps(tiny_pretrained, tmp_path / "slow", "generate", temperature=temperature, optim="sgd")
    assert fast[0] == slow[0] and len(fast[0]) == 3 and {c[0] for step in fast[0] for c in step} == {0, 1, 2}
    for a, b in zip(fast[1], slow[1], strict=True):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert any(abs(h["loss"]) > 1e-4 for h in fast[1]) and any(h["kl"] > 0 for h in fast[1][1:])
    for k, v in slow[2].items():
        torch.testing.assert_close(fast[2][k], v, rtol=1e-5, atol=1e-6)


def test_one_token_forward_path_refuses_what_it_does_not_reproduce(tiny_pretrained, tmp_path):
    with pytest.raises(ValueError, match="top_k, top_p"):
        _few_steps(tiny_pretrained, tmp_path, "forward", top_k=2)
    with pytest.raises(ValueError, match="generation settings .'no_repeat_ngram_size'"):
        _few_steps(
            tiny_pretrained,
            tmp_path,
            "forward",
            generation_kwargs={"suppress_tokens": [3, 4], "no_repeat_ngram_size": 2},
        )
    with pytest.raises(ValueError, match="one_token_path="):
        ToyGRPOConfig(output_dir=str(tmp_path), one_token_path="fast", use_cpu=True)


def test_grpo_maxrl_smoke_reward_rises(tiny_pretrained, tmp_path):
    task = RLTaskConfig(
        process="mess3",
        reward="reweight",
        pretrained_path=str(tiny_pretrained),
        prompt_length=6,
        n_train_prompts=2000,
        n_eval_prompts=400,
        exact_eval_every=10,
        report=False,
    )
    m = run(
        task,
        ToyGRPOConfig(
            output_dir=str(tmp_path / "rl"),
            max_steps=40,
            learning_rate=1e-2,
            advantage="maxrl",
            per_device_train_batch_size=64,
            num_generations=8,
            use_cpu=True,
            seed=0,
        ),
    )
    assert m["grpo"]["advantage"] == "maxrl"
    assert m["reward_after"] > m["reward_before"] + 0.15, m["exact_reward_curve"]


def test_batch_not_divisible_fails_before_any_model_load(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        ToyGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=12, num_generations=8, use_cpu=True)
    # through the entry point: the model path does not exist, so any error other than ours means it loaded first
    with pytest.raises(ValueError, match="multiple of num_generations"):
        main(
            [
                "--process",
                "mess3",
                "--pretrained_path",
                str(tmp_path / "missing"),
                "--output_dir",
                str(tmp_path / "o"),
                "--per_device_train_batch_size",
                "12",
                "--num_generations",
                "8",
                "--use_cpu",
                "true",
            ]
        )


def test_refuses_model_without_trainable_parameters():
    model = build_model(ToyModelConfig(preset="mess3_small"), 5, 8)
    assert assert_trainable(model) > 0
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        assert_trainable(model)


def test_train_modules_freeze_the_rest(tiny_pretrained, tmp_path):
    model = build_model(ToyModelConfig(preset="mess3_small"), 5, 8)
    trained = freeze_except(model, [r"^transformer\.h\.1\.", "^lm_head"])
    assert trained and all(n.startswith(("transformer.h.1.", "lm_head")) for n in trained)
    assert all(p.requires_grad == (n in trained) for n, p in model.named_parameters())
    assert len(freeze_except(model, [])) == len(list(model.parameters()))  # no patterns: everything trains
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_except(model, ["^transformer.h.7."])
    with pytest.raises(ValueError, match="not a regex"):
        RLTaskConfig(process="mess3", pretrained_path="x", train_modules=["("])
    # through GRPO: the frozen parameters come out bit-identical, the trained ones move
    from transformers import GPT2LMHeadModel

    task = RLTaskConfig(
        process="mess3",
        reward="reweight",
        pretrained_path=str(tiny_pretrained),
        prompt_length=6,
        n_train_prompts=200,
        n_eval_prompts=50,
        report=False,
        train_modules=["^lm_head"],
    )
    run(
        task,
        ToyGRPOConfig(
            output_dir=str(tmp_path / "rl"),
            max_steps=3,
            learning_rate=1e-2,
            per_device_train_batch_size=16,
            num_generations=8,
            use_cpu=True,
            seed=0,
        ),
    )
    pre = GPT2LMHeadModel.from_pretrained(tiny_pretrained).state_dict()
    post = GPT2LMHeadModel.from_pretrained(tmp_path / "rl" / "model").state_dict()
    assert all(torch.equal(pre[k], post[k]) for k in pre if not k.startswith("lm_head"))
    assert not torch.equal(pre["lm_head.weight"], post["lm_head.weight"])


def test_zero_advantage_callback_warns_on_crossing():
    from transformers import TrainerControl, TrainerState

    cb, state, control = ZeroAdvantageCallback(0.5), TrainerState(), TrainerControl()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_log(None, state, control, logs={"frac_reward_zero_std": 0.25})
    with pytest.warns(RuntimeWarning, match="all-equal rewards"):
        cb.on_log(None, state, control, logs={"frac_reward_zero_std": 0.875})
    assert cb.summary()["max"] == 0.875 and cb.summary()["steps_above_threshold"] == 1


def test_constant_reward_is_flagged_through_grpo(tiny_pretrained, tmp_path):
    """A reward that never varies gives every group zero advantage: TRL's per-group metric must reach 1
    and the guard must warn (the silent failure mode it exists for)."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import GRPOTrainer

    tok = word_tokenizer(3)
    ds = Dataset.from_dict({"prompt": tokens_to_text(sample(mess3(), 64, 5, seed=0).tokens)})
    args = ToyGRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=16,
        num_generations=4,
        use_cpu=True,
        generation_kwargs={"suppress_tokens": [3, 4]},
    )
    cb = ZeroAdvantageCallback(0.5)
    trainer = GRPOTrainer(
        model=GPT2LMHeadModel.from_pretrained(tiny_pretrained),
        reward_funcs=[lambda completions, **kw: [1.0] * len(completions)],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[cb],
    )
    with pytest.warns(RuntimeWarning, match="all-equal rewards"):
        trainer.train()
    assert cb.summary()["mean"] == 1.0


def test_word_tokenizer_ids_and_reload(tmp_path):
    tok = word_tokenizer(6)
    assert tok("0 5 3")["input_ids"] == [0, 5, 3]
    assert (tok.eos_token_id, tok.pad_token_id) == (6, 7)
    assert tok.decode([0, 5, 3]) == "0 5 3"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("2 4")["input_ids"] == [2, 4] and again.eos_token_id == 6


def test_argmax_reward_matches_brute_force():
    p = product(mess3(), rrxor())
    tokens = sample(p, 200, 7, seed=3).tokens
    beliefs = belief_states(p, tokens)[:, -1]
    r = NextTokenArgmaxReward(p, 0)
    pred = next_token_distributions(p, tokens)[:, -1].reshape(-1, 3, 2).sum(-1)  # Mess3 marginal of the next token
    best = pred.argmax(-1)
    for n, y in itertools.product(range(0, 200, 37), range(6)):
        assert r.table(beliefs)[n, y] == float(y // 2 == best[n])
    scores = r(None, None, [[int(2 * best[0])], [6]], beliefs[:2].tolist())  # a rewarded token; a special token
    assert scores == [1.0, 0.0]


def test_composed_reward_is_xor_of_factor_argmax_states():
    p = product(mess3(), rrxor())
    beliefs = belief_states(p, sample(p, 300, 9, seed=4).tokens)[:, -1]
    r = ComposedLatentReward(p, [0, 1], [0], [1, 2], "xor", [0, 1])
    joint = beliefs.reshape(-1, 3, 5)
    # exact ties (RRXOR's 0.5/0.5 beliefs) go to the lowest state, also after last-bit noise
    a = (joint.sum(2).round(decimals=9).argmax(1) == 0).long()
    b = torch.isin(joint.sum(1).round(decimals=9).argmax(1), torch.tensor([1, 2])).long()
    assert torch.equal(r.latent(beliefs), a ^ b)
    noisy = beliefs * (
        1 + 1e-15 * torch.randn(beliefs.shape, generator=torch.Generator().manual_seed(0), dtype=beliefs.dtype)
    )
    assert torch.equal(r.latent(noisy), r.latent(beliefs))
    assert 0.2 < r.latent(beliefs).double().mean() < 0.8  # both classes occur
    with pytest.raises(ValueError, match="latent_states_b"):
        ComposedLatentReward(p, [0, 1], [0], [7], "xor", [0, 1])


def test_rare_reward_counts_rare_emissions_and_rejects_impossible_completions():
    p = rare_factor(golden_mean(0.9), mess3(), trigger_token=0)  # joint token = common * 4 + rare (3 = blank)
    eta = p.stationary.expand(3, -1)
    r = RareEmissionReward(p, 0)
    comp = torch.tensor(
        [
            [7, 1, 7, 7],  # 1/blank, 0/rare 1, 1/blank, 1/blank: valid, one rare emission in four tokens
            [1, 2, 7, 7],  # two triggers in a row: golden mean forbids "00"
            [3, 7, 7, 7],  # trigger with a blank rare token: impossible
        ]
    )
    assert r.score(eta, comp).tolist() == [0.25, 0.0, 0.0]


@pytest.mark.parametrize("bad", [{"reward_factor": 2}, {"latent_factors": [0, 0]}])
def test_reward_config_errors_say_what_to_change(bad):
    from toy.grpo import build_reward

    task = RLTaskConfig(
        process="product",
        process_kwargs={"factors": [{"name": "mess3"}, {"name": "rrxor"}]},
        reward="reweight" if "reward_factor" in bad else "compose",
        pretrained_path="x",
        **bad,
    )
    with pytest.raises(ValueError, match="factor"):
        build_reward(task, task.build_process())


@pytest.mark.slow
def test_entry_point_pretrains_trains_and_reports(tmp_path):
    """python -m toy.experiments.rl end to end on tiny settings: toy.train pre-training (cached), GRPO, composition report."""
    import json

    import yaml

    pre_cfg = tmp_path / "pre.yaml"
    pre_cfg.write_text(
        yaml.safe_dump(
            {
                "process": "product",
                "process_kwargs": {"factors": [{"name": "mess3"}, {"name": "rrxor"}]},
                "context_length": 8,
                "preset": "mess3_small",
                "steps": 60,
                "batch_size": 64,
                "warmup_steps": 10,
                "eval_every": 0,
                "save_every": 0,
                "val_samples": 500,
                "progress": False,
                "use_cpu": True,
            }
        )
    )
    argv = [
        "--config",
        "configs/toy/rl_compose.yaml",
        "--pretrain_config",
        str(pre_cfg),
        "--pretrain_dir",
        str(tmp_path / "pre"),
        "--output_dir",
        str(tmp_path / "rl"),
        "--prompt_length",
        "6",
        "--n_train_prompts",
        "1000",
        "--n_eval_prompts",
        "400",
        "--max_steps",
        "15",
        "--per_device_train_batch_size",
        "64",
        "--exact_eval_every",
        "5",
        "--seed",
        "1",
        "--pretrain_seed",
        "0",
        "--train_modules",
        r"^transformer\.h\.1\.",
        "^lm_head",
    ]  # the config names block 3 of the 4-block preset
    m = main(argv)
    assert (
        tmp_path / "pre" / "seed0" / "checkpoint-60" / "model.safetensors"
    ).is_file()  # pretrain_seed, not the GRPO seed
    assert not (tmp_path / "pre" / "seed1").exists()
    saved = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert saved["report"]["verdict"] in {"reweighting", "composition", "inconclusive"}
    assert 0.0 <= m["reward_before"] <= 1.0 and len(m["exact_reward_curve"]) == 4
    for f in ("composition_report.md", "reward_curve.png", "summary.md"):
        assert (tmp_path / "rl" / f).is_file()


@pytest.mark.slow
def test_maxrl_advantages_under_two_ranks(tiny_pretrained, tmp_path):
    """torchrun with 2 CPU ranks: each rank's advantages are (r - m) / m with m the mean of its group over *all*
    ranks' completions (TRL spreads a group's completions over ranks and gathers rewards before centring)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from datasets import Dataset\n"
        "from transformers import GPT2LMHeadModel\n"
        "from toy.data import sample\n"
        "from toy.processes import mess3\n"
        "from toy.grpo import ToyGRPOConfig, ToyGRPOTrainer, tokens_to_text, word_tokenizer\n"
        "out, pre = sys.argv[1], sys.argv[2]\n"
        "ds = Dataset.from_dict({'prompt': tokens_to_text(sample(mess3(), 64, 5, seed=0).tokens)})\n"
        "local = []\n"
        "def reward(completion_ids, **kw):\n"
        "    local.append([float(ids[0] == 0) for ids in completion_ids])\n"
        "    return local[-1]\n"
        "args = ToyGRPOConfig(output_dir=out, max_steps=1, per_device_train_batch_size=6, num_generations=4, advantage='maxrl',\n"
        "                     use_cpu=True, seed=0, generation_kwargs={'suppress_tokens': [3, 4]})\n"
        "trainer = ToyGRPOTrainer(model=GPT2LMHeadModel.from_pretrained(pre), reward_funcs=[reward], args=args,\n"
        "                         train_dataset=ds, processing_class=word_tokenizer(3))\n"
        "trainer.model.train()\n"
        "rank = trainer.accelerator.process_index\n"
        "assert trainer.accelerator.num_processes == 2\n"
        "inputs = [ds[i // 4] for i in range(rank * 6, rank * 6 + 6)]  # 12 completions = 3 groups over 2 ranks\n"
        "adv = trainer._generate_and_score_completions(inputs)['advantages']\n"
        "torch.save({'r': torch.tensor(local[-1]), 'adv': adv.float()}, f'{out}/rank{rank}.pt')\n"
        "from plumbing.trainers import end_processes\n"
        "end_processes()  # a gloo rank exiting with its group alive can abort in teardown\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29537",
        str(script),
        str(tmp_path),
        str(tiny_pretrained),
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1)]
    r = torch.cat([x["r"] for x in ranks])  # process order = TRL's generation order
    m = r.view(-1, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(torch.cat([x["adv"] for x in ranks]), maxrl_advantages(r - m, m), atol=1e-6)


def test_trl_still_has_the_private_methods_the_trainer_wraps():
    """ToyGRPOTrainer overrides four private GRPOTrainer methods (no public seam sets the advantages or the sampler). This fails
    loudly when a TRL release renames them or changes their arguments: re-check the wrapper before moving the pin."""
    import inspect

    from trl import GRPOTrainer

    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self",
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    assert "_calculate_rewards" in inspect.getsource(GRPOTrainer._generate_and_score_completions)
    # the one-token path: the sampler's arguments and (completion ids, logprobs) return, the scorer's arguments
    assert list(inspect.signature(GRPOTrainer._generate_single_turn).parameters) == [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ]
    assert "return completion_ids, logprobs" in inspect.getsource(GRPOTrainer._generate_single_turn)
    assert list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)[:8] == [
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ]
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)
    for caller in (GRPOTrainer._generate_and_score_completions, GRPOTrainer._compute_loss):
        assert "self._get_per_token_logps_and_entropies(" in inspect.getsource(caller)


def test_maxrl_refuses_options_the_wrapper_does_not_handle(tmp_path):
    with pytest.raises(ValueError, match="sum_then_normalize"):
        ToyGRPOConfig(
            output_dir=str(tmp_path),
            advantage="maxrl",
            multi_objective_aggregation="normalize_then_sum",
            per_device_train_batch_size=8,
            num_generations=4,
            use_cpu=True,
        )


def test_speed_bench_reads_times_to_a_reward_level():
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench/toy_rl_speed.py"))
    curve, seconds = [[0, 0.5], [25, 0.7], [50, 0.9]], [0.0, 10.0, 20.0]
    assert bench["time_to_level"](seconds, curve, 0.8) == pytest.approx(15.0)  # linear between evaluations
    assert bench["time_to_level"](seconds, curve, 0.95) == float("inf")
    assert bench["reward_at"](seconds, curve, 19.0) == 0.7
