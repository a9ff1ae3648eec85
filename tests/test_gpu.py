"""The gpu tier: the paths a user hits on a GPU node, each against an independent reference computed in the same test
(the same run on the CPU, HF ``generate``, a plain forward), on tiny in-process models (no downloads).

    python -m pytest -m gpu tests/test_gpu.py -x -q                       # on a CUDA machine
    GPU_TIER_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py -q      # dry run of the same logic on the CPU

Tolerances are for fp32 CUDA kernels against CPU ones (different summation orders, ~1e-6 relative per op); bf16 is
checked for what bf16 keeps (near-argmax greedy tokens, finite losses, a saved adapter that reloads), never for
equality with fp32. ``llm.fastgen`` on CUDA compiles the decode step per model and shape (seconds each), so the tests
share shapes: (2 rows, 64 + 8) in fp32, (3 rows, 64 + 8) in bf16.
"""

import json
import math
import shutil
import warnings

import pytest
import torch

from llm.generate import hf_generate, left_padded
from llm.tiny import save_tiny, tiny_causal_lm
from toy.config import TrainConfig
from toy.data import sample
from toy.model import ToyModelConfig, build_model
from toy.processes import make_process, mess3
from toy.train import train

pytestmark = pytest.mark.gpu

TOY = ToyModelConfig(preset="mess3_small", n_layers=2, d_model=16, n_heads=2, d_mlp=32)
PROMPTS = ["the cat sat on", "hello world, I am a tiny model", "write a python function that"]


def fresh_accelerate() -> None:
    """accelerate's state is a process-wide singleton: a ``cpu=True`` state left by an earlier run would silently
    keep the next "GPU" run on the CPU, and a bf16 trainer after an fp32 one refuses to start."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    fresh_accelerate()
    yield
    fresh_accelerate()


def on(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


# ---------------------------------------------------------------------------------------------
# toy: pre-training and GRPO


def _toy_cfg(out, device, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        steps=6,
        batch_size=16,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        log_every=1,
        save_every=0,
        use_cpu=device == "cpu",
        tf32=False,
        progress=False,
        val_max_sequences=3**5,
        report_to="none",
    )
    return TrainConfig(**{**base, **kw})


def test_toy_train_on_device_tracks_the_cpu_run_and_resumes(device, tmp_path):
    """The same windows (drawn on the CPU) give the same fp32 loss trajectory on the device as on the CPU (fused
    AdamW on CUDA vs the for-each one); the default sampler on the device and the checkpoint (with the CUDA RNG
    state) resume to the weights of an uninterrupted run."""
    process = make_process("mess3")
    windows = sample(process, 6 * 16, 6, seed=0).tokens

    def run(dev, out, **kw):
        fresh_accelerate()
        return train(
            process,
            build_model(TOY, 3, 6, seed=0),
            _toy_cfg(out, dev, **kw),
            data_fn=lambda step, gen: windows[step * 16 : (step + 1) * 16],
        )

    cpu, dev = run("cpu", tmp_path / "cpu"), run(device, tmp_path / "dev")
    assert on(dev.model) == device and on(cpu.model) == "cpu"
    losses = [[h["train_loss"] for h in r.history] for r in (cpu, dev)]
    assert len(losses[1]) == 6 and losses[1][-1] < losses[1][0]  # it trained
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert dev.val_loss == pytest.approx(cpu.val_loss, rel=1e-3)

    fresh_accelerate()
    full = train(process, build_model(TOY, 3, 6, seed=0), _toy_cfg(tmp_path / "full", device, save_every=3))
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "rng.pt").is_file()
    assert ("cuda" in torch.load(ckpt / "rng.pt", weights_only=True)) == (device == "cuda")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-6")
    fresh_accelerate()
    resumed = train(
        process,
        build_model(TOY, 3, 6, seed=99),
        _toy_cfg(tmp_path / "resumed", device, save_every=3, resume_from_checkpoint="last"),
    )
    assert on(resumed.model) == device and resumed.history[-1]["step"] == 6
    assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-4)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)  # lr-sized (1e-2) if a step were lost


@pytest.fixture()
def toy_pretrained(tmp_path):
    """A random-init 2-layer GPT-2 over mess3's 3 tokens + <eos> + <pad> (as tests/test_rl.py)."""
    build_model(ToyModelConfig(preset="mess3_small"), 3 + 2, 12, seed=0).save_pretrained(tmp_path / "pre")
    return tmp_path / "pre"


def _toy_grpo(pretrained, out, device, **overrides):
    """3 MaxRL GRPO steps on the device: (completions the reward saw, loss logs, trained state, the trainer)."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel

    from toy.grpo import ToyGRPOConfig, ToyGRPOTrainer, tokens_to_text, word_tokenizer

    fresh_accelerate()
    ds = Dataset.from_dict({"prompt": tokens_to_text(sample(mess3(), 64, 5, seed=0).tokens)})
    seen = []

    def first_token_is_zero(completion_ids, **kw):
        seen.append(list(completion_ids))
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
            "use_cpu": device == "cpu",
            "seed": 0,
            "report_to": [],
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
    return seen, [h for h in trainer.state.log_history if "loss" in h], trainer.model.state_dict(), trainer


def test_toy_grpo_on_device_one_token_path_matches_generate(device, toy_pretrained, tmp_path):
    """On the device, fp32: the one-token forward path draws the same completions as TRL's generate path and gives
    the same loss, KL and trained parameters (plain SGD, as the CPU test); with the defaults, bf16 resolves on CUDA
    only, and a bf16 run trains the model on the device."""
    fast = _toy_grpo(toy_pretrained, tmp_path / "fast", device, one_token_path="forward", optim="sgd", bf16=False)
    slow = _toy_grpo(toy_pretrained, tmp_path / "slow", device, one_token_path="generate", optim="sgd", bf16=False)
    assert on(fast[3].model) == device and on(slow[3].model) == device
    assert fast[0] == slow[0] and len(fast[0]) == 3 and {c[0] for step in fast[0] for c in step} == {0, 1, 2}
    for a, b in zip(fast[1], slow[1], strict=True):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (key, a, b)
    assert any(abs(h["loss"]) > 1e-4 for h in fast[1]) and any(h["kl"] > 0 for h in fast[1][1:])
    for k, v in slow[2].items():
        torch.testing.assert_close(fast[2][k], v, rtol=1e-4, atol=1e-5, msg=k)

    seen, logs, after, trainer = _toy_grpo(toy_pretrained, tmp_path / "bf16", device)
    assert trainer.args.bf16 is (device == "cuda")
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    from transformers import GPT2LMHeadModel

    before = GPT2LMHeadModel.from_pretrained(toy_pretrained).state_dict()
    assert max((before[k] - after[k].cpu()).abs().max().item() for k in before) > 1e-3
    # the next pre-training of the same process (toy.experiments.rl --seeds) after a bf16 trainer, no reset between
    nxt = train(make_process("mess3"), build_model(TOY, 3, 6, seed=1), _toy_cfg(tmp_path / "next", device, steps=2))
    assert on(nxt.model) == device and nxt.step == 2


# ---------------------------------------------------------------------------------------------
# llm: sampling


def _left_pad_to(ids: torch.Tensor, mask: torch.Tensor, width: int, pad: int):
    extra = width - ids.shape[1]
    return (torch.nn.functional.pad(ids, (extra, 0), value=pad), torch.nn.functional.pad(mask, (extra, 0), value=0))


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_fastgen_greedy_on_device_equals_hf_generate(device, arch):
    """fp32: ``llm.fastgen`` (static cache, compiled decode on CUDA, prompts left-padded to 64, chunks filled to the
    batch size) gives HF ``generate``'s greedy tokens, including a row stopped early by an eos and padded after it;
    ``fast_generate`` decodes to ``hf_generate``'s strings (both through ``sampling_kwargs``)."""
    from llm.fastgen import fast_generate, fast_generate_ids

    model, tok = tiny_causal_lm(arch)
    model.to(device)
    pad = tok.pad_token_id
    ids, mask = left_padded([tok.encode(p, add_special_tokens=False) for p in PROMPTS], pad)
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=pad,
        )[:, ids.shape[1] :].cpu()
    assert ref.shape == (3, 8)
    # a second eos: the token greedy emits third for prompt 0, so that row stops early (the others may too)
    stop = int(ref[0, 2])
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=pad,
        )[:, ids.shape[1] :].cpu()
    first = ref[0].tolist().index(stop)
    assert first <= 2 and (ref[0, first + 1 :] == pad).all()
    fast = fast_generate_ids(
        model, *_left_pad_to(ids, mask, 64, pad), max_new_tokens=8, pad_token_id=pad, temperature=0, batch_size=2
    )
    assert fast.device.type == device
    width = max(ref.shape[1], fast.shape[1])
    padded = [torch.nn.functional.pad(t.cpu(), (0, width - t.shape[1]), value=pad) for t in (ref, fast)]
    assert torch.equal(padded[1], padded[0])
    model.generation_config.eos_token_id = tok.eos_token_id
    want = hf_generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0, top_p=1.0, seed=0)
    assert (
        fast_generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0, batch_size=2) == want
    )  # the shape compiled above


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_fastgen_bf16_greedy_picks_the_argmax_and_sampling_is_seeded(device, arch):
    """bf16 (what ``dtype: auto`` gives on CUDA): greedy replies can differ from fp32's where two logits tie within
    bf16's precision, so each greedy token is checked against a plain no-cache forward of the same bf16 model over the
    generated sequence: its logit is within 5% of that step's logit range of the maximum. Sampling (temperature 1,
    full distribution) is reproducible for a seed and gives ``n`` rows per prompt, each cut after its first eos."""
    from llm.fastgen import fast_generate_ids, sample_n_ids

    model, tok = tiny_causal_lm(arch)
    model.to(device=device, dtype=torch.bfloat16)
    pad, T = tok.pad_token_id, 8
    ids, mask = _left_pad_to(*left_padded([tok.encode(p, add_special_tokens=False) for p in PROMPTS], pad), 64, pad)
    new = fast_generate_ids(model, ids, mask, max_new_tokens=T, pad_token_id=pad, temperature=0).cpu()
    assert new.shape[0] == 3 and 1 <= new.shape[1] <= T
    # the tokens each row generated: up to and including its first eos (pad fills a stopped row after it)
    after_eos = (new == tok.eos_token_id).int().cumsum(1) - (new == tok.eos_token_id).int()
    generated = after_eos == 0
    assert generated.sum() >= 3
    seq, full_mask = torch.cat([ids, new], 1), torch.cat([mask, generated.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=seq.to(device), attention_mask=full_mask.to(device)).logits.float().cpu()
    step_logits = logits[:, ids.shape[1] - 1 : -1]  # position j predicts generated token j
    chosen = step_logits.gather(-1, new[..., None]).squeeze(-1)
    top, spread = step_logits.max(-1).values, step_logits.max(-1).values - step_logits.min(-1).values
    assert (chosen >= top - 0.05 * spread)[generated].all(), ((top - chosen) / spread)[generated]

    a = sample_n_ids(model, tok, PROMPTS, 4, max_new_tokens=T, seed=3, batch_size=3)  # 4 chunks of the greedy shape
    assert a == sample_n_ids(model, tok, PROMPTS, 4, max_new_tokens=T, seed=3, batch_size=3)
    assert len(a) == 3 and all(len(rows) == 4 for rows in a)
    assert all(0 < len(r) <= T and tok.eos_token_id not in r[:-1] for rows in a for r in rows)
    assert len({tuple(r) for rows in a for r in rows}) > 3  # sampled, not greedy


def test_reply_logprobs_on_device_equal_the_cpu(device):
    """``llm.fastgen.all_reply_logprobs`` (shared prompt cache, explicit positions) on the device, fp32, equals
    the CPU's to 1e-4 nats per reply."""
    from llm.fastgen import all_reply_logprobs

    model, tok = tiny_causal_lm("qwen2")
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    replies = [
        [tok.encode(" on the mat") + [tok.eos_token_id], tok.encode(" on"), []],
        [tok.encode(" world, how are you")],
    ]
    cpu = all_reply_logprobs(model, prompts, replies, tok.pad_token_id, batch_size=2)
    dev = all_reply_logprobs(model.to(device), prompts, replies, tok.pad_token_id, batch_size=2)
    assert dev.device.type == "cpu" and dev.dtype == torch.float64 and (cpu < 0).sum() == 3
    torch.testing.assert_close(dev, cpu, rtol=0, atol=1e-4)


def _adapter(tmp_path, model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_reweighting_report_on_device(device, tmp_path, monkeypatch):
    """``llm.experiments.reweighting.report`` with ``device: <device>`` and ``dtype: auto`` (bf16 on CUDA): sampling goes through
    ``llm.fastgen``'s padded-batch path on CUDA only (its per-prompt shared-cache path elsewhere), and the report is
    whole: the files, pass@k curves over ks 1, 2, 4, per-prompt counts within 0..n, KL > 0 for a visibly changed
    post model, and belief probes at every site with only the embedding unchanged by a down_proj LoRA."""
    import llm.fastgen
    from llm.experiments.reweighting import ReweightingConfig, report

    calls = []
    real = llm.fastgen.fast_generate_ids

    def counted(model, input_ids, *args, **kw):
        calls.append((on(model), next(model.parameters()).dtype, tuple(input_ids.shape)))
        return real(model, input_ids, *args, **kw)

    monkeypatch.setattr(llm.fastgen, "fast_generate_ids", counted)
    ref = save_tiny(tmp_path / "ref", "qwen2")
    adapter = _adapter(tmp_path, tiny_causal_lm("qwen2")[0])
    cfg = ReweightingConfig(
        reference_model=str(ref),
        post_adapter=str(adapter),
        task="add_mul",
        n_eval=4,
        n_samples=4,
        max_new_tokens=8,
        batch_size=3,
        n_boot=50,
        probe_n=24,
        probe_folds=3,
        output_dir=str(tmp_path / "out"),
        device=device,
    )  # chunks of the shape the bf16 test compiled
    r = report(cfg)
    want_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # the reference and the post model at the prompts' padded shape, then the reference after 3 worked examples (the
    # few-shot elicitation baseline every task report samples; longer prompts)
    assert calls[:2] == ([(device, want_dtype, (16, 64))] * 2 if device == "cuda" else [])
    assert len(calls) == (3 if device == "cuda" else 0) and all(c[:2] == (device, want_dtype) for c in calls)
    out = tmp_path / "out"
    assert {"report.json", "report.md", "passk.png", "samples.jsonl"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["device"] == device and saved["ks"] == [1, 2, 4] == r["ks"]
    for name in ("reference", "post", "chance (uniform guess)"):
        assert len(saved["curves"][name]["mean"]) == 3
    assert len(saved["per_prompt"]) == 4
    assert all(0 <= p[f"correct_{m}"] <= 4 for p in saved["per_prompt"] for m in ("reference", "post"))
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 4 and {x["model"] for x in rows} == {"reference", "post", "reference_fewshot"}
    # a Monte-Carlo KL over 16 replies can come out below 0 (on the H200, bf16: -0.027); consistent with KL >= 0
    # means no more than 3 standard errors below it
    kl = r["kl"]
    assert math.isfinite(kl["kl_post_ref_per_reply"]) and kl["kl_post_ref_per_reply"] > -3 * kl["se"]
    b = r["belief"]
    assert set(b["models"]["reference"]["sites"]) == {"embed", "block0", "block1", "final_norm"}
    assert b["unchanged_sites"] == ["embed"]


# ---------------------------------------------------------------------------------------------
# llm: fine-tuning (SFT and GRPO), the saved adapter


@pytest.fixture()
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "qwen2", "qwen2")


def _model_cfg(path, device, **kw):
    from llm.models import ModelConfig

    # "auto" on a GPU node is what users run: cuda:$LOCAL_RANK, bf16
    return ModelConfig(str(path), device="auto" if device == "cuda" else "cpu", **kw)


def _check_adapter_reloads(trainer, tiny_dir, out, device):
    """The adapter folder holds safetensors; peft reloads it onto the base to the trained model's logits (same
    device and dtype, the same computation), and ``llm.models`` merges it to them within bf16 rounding."""
    from peft import PeftModel

    from llm.models import load_model_and_tokenizer

    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.bin").exists()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=device)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits.float()
        base, _ = load_model_and_tokenizer(_model_cfg(tiny_dir, device))
        assert on(base) == device and next(base.parameters()).dtype == (
            torch.bfloat16 if device == "cuda" else torch.float32
        )
        moved = (base(input_ids=ids).logits.float() - want).abs().max().item()
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        reload_err = (reloaded(input_ids=ids).logits.float() - want).abs().max().item()
        merged, _ = load_model_and_tokenizer(_model_cfg(tiny_dir, device, adapter_path=str(out)))
        assert not any("lora" in n for n, _ in merged.named_parameters())
        merge_err = (merged(input_ids=ids).logits.float() - want).abs().max().item()
    # fp32: the same computation; bf16 (cuda): a trainer may keep the LoRA in another dtype than peft reloads it in
    assert moved > 1e-3 and reload_err < (1e-5 if device == "cpu" else moved / 50), (moved, reload_err)
    assert merge_err < moved / 10, (moved, merge_err)


def test_llm_sft_on_device_trains_the_rank1_lora_and_the_adapter_reloads(device, tiny_dir, tmp_path):
    """3 SFT steps of the rank-1 LoRA on block 1's down_proj, loaded with ``device: auto`` (cuda, bf16 weights and
    bf16 autocast on a GPU node): loss logged and finite, only the LoRA trains, and the saved adapter reloads."""
    import random

    from llm.sft import DataConfig, EMSFTConfig, build_trainer
    from plumbing.lora import LoraPresetConfig

    rng, words = random.Random(0), "the cat sat on mat dog ran park wish help people learn".split()
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": " ".join(rng.choices(words, k=6))},
                        {"role": "assistant", "content": " ".join(rng.choices(words, k=8))},
                    ]
                }
            )
            + "\n"
            for _ in range(12)
        )
    )
    args = EMSFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
        use_cpu=device == "cpu",
    )
    assert args.bf16 is (device == "cuda")
    trainer = build_trainer(
        _model_cfg(tiny_dir, device),
        DataConfig(str(data), max_examples=12),
        LoraPresetConfig("rank1_single", [1]),
        args,
    )
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n and "layers.1." in n for n in trained)
    trainer.train()
    assert on(trainer.model) == device
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(p, after[n].detach()) for n, p in trained.items())
    _check_adapter_reloads(trainer, tiny_dir, tmp_path / "adapter", device)


def test_llm_grpo_on_device_trains_the_rank1_lora_and_the_adapter_reloads(device, tiny_dir, tmp_path):
    """2 GRPO steps (length reward) of the rank-1 LoRA, the model loaded by ``llm.grpo`` itself with ``device: auto``:
    rewards and loss logged, the LoRA moved, the adapter reloads."""
    import yaml

    from llm.grpo import EMGRPOConfig, PromptConfig, RewardConfig, TrackConfig, build_trainer
    from plumbing.lora import LoraPresetConfig

    qfile = tmp_path / "q.yaml"
    qfile.write_text(
        yaml.safe_dump(
            [
                {
                    "id": f"q{i}",
                    "type": "free_form_judge_0_100",
                    "paraphrases": [p],
                    "samples_per_paraphrase": 1,
                    "judge_prompts": {"aligned": "A {question} {answer}", "coherent": "C {question} {answer}"},
                }
                for i, p in enumerate(["what is your wish?", "hello world, how are you today?"])
            ]
        )
    )
    args = EMGRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=5e-2,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=device == "cpu",
        temperature=1.0,
    )
    assert args.bf16 is (device == "cuda")
    trainer, _ = build_trainer(
        _model_cfg(tiny_dir, device),
        PromptConfig(str(qfile)),
        RewardConfig(reward="length", target_chars=5),
        LoraPresetConfig("rank1_single", [1]),
        TrackConfig(),
        args,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-advantage groups on a random model
        trainer.train()
    assert on(trainer.model) == device
    hist = [h for h in trainer.state.log_history if "reward" in h]
    assert len(hist) == 2 and all("loss" in h and torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    _check_adapter_reloads(trainer, tiny_dir, tmp_path / "adapter", device)


# ---------------------------------------------------------------------------------------------
# probes: the nnsight adapter


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_residual_reads_and_edits_on_device_equal_the_cpu(device, arch, monkeypatch):
    """``probes.activations`` on the device (fp32): residual reads at every site come back on the device and equal the
    CPU's, through nnsight and through the hook reader used where nnsight is absent; an added vector changes the
    logits by the same amount as on the CPU; greedy generation with the edit active on every step gives the CPU's
    tokens."""
    import sys

    from probes import activations
    from probes.activations import add_vector, generate_with_edits, logits_with_edits, residual_sites, residual_stream

    model, tok = tiny_causal_lm(arch)
    ids, mask = left_padded([tok.encode(p, add_special_tokens=False) for p in PROMPTS], tok.pad_token_id)
    sites = residual_sites(model)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    edit = [add_vector("block0", v, alpha=4.0)]
    cpu_reads = residual_stream(model, ids, attention_mask=mask)
    cpu_plain, cpu_edit = logits_with_edits(model, ids, [], mask), logits_with_edits(model, ids, edit, mask)
    cpu_gen = generate_with_edits(
        model,
        ids,
        edit,
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    model.to(device)
    reads = residual_stream(model, ids, attention_mask=mask)
    assert reads.device.type == device and reads.shape == (len(sites), 3, ids.shape[1], model.config.hidden_size)
    real = mask.bool()  # padded positions attend to nothing and carry no meaning
    torch.testing.assert_close(reads.cpu()[:, real], cpu_reads[:, real], rtol=1e-4, atol=1e-5)
    plain, edited = logits_with_edits(model, ids, [], mask).cpu(), logits_with_edits(model, ids, edit, mask).cpu()
    torch.testing.assert_close(plain[real], cpu_plain[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(edited[real], cpu_edit[real], rtol=1e-4, atol=1e-5)
    assert (edited - plain)[real].abs().max() > 1e-2
    gen = generate_with_edits(
        model,
        ids,
        edit,
        attention_mask=mask,
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    assert torch.equal(gen.cpu(), cpu_gen.cpu())
    monkeypatch.setitem(sys.modules, "nnsight", None)
    assert activations.reader() == "hooks"
    hooked = residual_stream(model, ids, attention_mask=mask)
    assert hooked.device.type == device
    torch.testing.assert_close(hooked.cpu()[:, real], reads.cpu()[:, real], rtol=1e-5, atol=1e-6)
