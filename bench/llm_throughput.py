"""Throughput of LoRA SFT steps and batched sampling on a Qwen2.5-1.5B-shaped random-weight model.

    python bench/llm_throughput.py                      # one CUDA GPU, bf16, ~4.5 minutes (H100)
    python bench/llm_throughput.py --all                # + compiled rank-1 variant, ~5.5 minutes
    python bench/llm_throughput.py --tiny               # CPU smoke check of every code path (~1 minute)
    python bench/llm_throughput.py --only gen --json runs/bench.json

Run from the repository root with the package installed (or PYTHONPATH=.). Nothing is downloaded: the model is ``Qwen2ForCausalLM`` built from Qwen2.5-1.5B's published sizes
(d_model 1536, 28 layers, 12 heads / 2 KV heads, d_mlp 8960, vocab 151936, tied embeddings) with
random weights; inputs are random token ids, every sequence full length (no padding).

SFT: one optimizer step on 8 x 512 tokens (forward, loss over the full vocabulary, backward, AdamW),
timed after warm-up. Variants, side by side on the same card:
  plain       fp32 weights + bf16 autocast, activation checkpointing ON, AdamW (foreach) -- what
              TRL's SFTConfig defaults give (bf16=True, gradient_checkpointing=True, adamw_torch).
  plain_noac  the same with activation checkpointing off.
  fast        bf16 weights (LoRA adapters fp32), no autocast, no checkpointing, fused AdamW.
  fast_compile  fast + torch.compile of the model.
  In llm.sft terms, fast_compile is: dtype: bfloat16, bf16: false, optim: adamw_torch_fused,
  torch_compile: true (activation checkpointing is already off there).
MFU = 6 * N_params * tokens/s / peak bf16 dense FLOP/s (989e12 for H100/H200), the usual convention
(it overstates the work of LoRA's backward, which skips frozen-weight gradients).

Generation: sampling at temperature 1 (top_k off), 64-token prompts, exactly 128 new tokens
(``min_new_tokens``), after one warm-up call per shape. ``plain`` is ``model.generate`` with the
dynamic cache at batch 64; ``fast`` is ``llm.fastgen.fast_generate_ids`` (static cache, compiled
decode step with CUDA graphs) at batch 64 and at a larger batch. Ratios are against plain at 64.

Measured on one H100 80GB HBM3 (torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0), 2026-11-27,
with --all (335 s in all, 274 s of it compiling):
  SFT rank32_all_linear  plain 11.1k tok/s (10.4% MFU), plain_noac 15.8k (x1.42), fast 19.5k (x1.75),
                         fast_compile 39.0k (36.6% MFU, x3.51)
  SFT rank1_single       plain 19.9k, fast 57.6k (x2.89), fast_compile 93.7k (x4.71)
  GEN                    plain b64 2.3k new tok/s, fast b64 9.3k (x3.98), fast b512 20.7k (x8.83)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class Setup:
    device: torch.device
    tiny: bool
    sft_batch: int
    sft_seq: int
    sft_steps: int
    sft_warmup: int
    gen_batch: int
    gen_big_batch: int
    gen_prompt: int
    gen_new: int


def qwen_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            eos_token_id=None,
            bos_token_id=None,
        )
    # Qwen2.5-1.5B's published config.json values.
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=None,
        bos_token_id=None,
    )


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: random init of 1.5B params on CPU takes ~20 s
        model = AutoModelForCausalLM.from_config(qwen_config(tiny), dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sft_variant(s: Setup, preset: str, variant: str) -> dict:
    from peft import get_peft_model

    from plumbing.lora import LoraPresetConfig, assert_trainable, peft_config_for

    cuda = s.device.type == "cuda"
    fast = variant.startswith("fast")
    if variant == "fast_compile" and not cuda:
        return {"skipped": "torch.compile is only benchmarked on CUDA"}
    dtype = torch.bfloat16 if (fast and cuda) else torch.float32
    model = build_model(s.tiny, s.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    mid = model.config.num_hidden_layers // 2
    lcfg = (
        LoraPresetConfig("rank32_all_linear")
        if preset == "rank32_all_linear"
        else LoraPresetConfig("rank1_single", [mid])
    )
    model = get_peft_model(model, peft_config_for(lcfg, model))
    assert_trainable(model)
    if variant == "plain":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=bool(fast and cuda))
    step_model = torch.compile(model) if variant == "fast_compile" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and not fast) else contextlib.nullcontext()
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (s.sft_batch, s.sft_seq), generator=g).to(s.device)

    def step():
        with autocast:
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(s.sft_warmup):
        step()
    _sync(s.device)
    warm = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    for _ in range(s.sft_steps):
        loss = step()
    _sync(s.device)
    dt = time.perf_counter() - t0
    tok_s = s.sft_batch * s.sft_seq * s.sft_steps / dt
    peak = peak_flops(s.device)
    out = {
        "tokens_per_s": tok_s,
        "step_s": dt / s.sft_steps,
        "warmup_s": warm,
        "loss": float(loss),
        "mfu": 6 * n_params * tok_s / peak if peak else None,
        "trainable": sum(p.numel() for p in params),
    }
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(s.device) / 1e9
    del model, step_model, opt
    _cleanup()
    return out


def _cleanup():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gen_runs(s: Setup) -> dict:
    from llm.fastgen import fast_generate_ids

    cuda = s.device.type == "cuda"
    model = build_model(s.tiny, s.device, torch.bfloat16 if cuda else torch.float32)
    model.eval()
    pad = 0
    g = torch.Generator(device="cpu").manual_seed(0)

    def prompts(b):
        ids = torch.randint(1, model.config.vocab_size, (b, s.gen_prompt), generator=g)
        return ids, torch.ones_like(ids)

    def plain(b):
        ids, mask = prompts(b)
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(s.device),
                attention_mask=mask.to(s.device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=s.gen_new,
                min_new_tokens=s.gen_new,
                pad_token_id=pad,
            )
        return out[:, ids.shape[1] :]

    def fast(b):
        ids, mask = prompts(b)
        return fast_generate_ids(
            model, ids, mask, max_new_tokens=s.gen_new, min_new_tokens=s.gen_new, pad_token_id=pad, batch_size=b, seed=0
        )

    results = {}
    for name, fn, b in [
        ("plain_b%d" % s.gen_batch, plain, s.gen_batch),
        ("fast_b%d" % s.gen_batch, fast, s.gen_batch),
        ("fast_b%d" % s.gen_big_batch, fast, s.gen_big_batch),
    ]:
        try:
            t0 = time.perf_counter()
            fn(b)  # warm-up (and compile, for the static-cache path)
            _sync(s.device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            new = fn(b)
            _sync(s.device)
            dt = time.perf_counter() - t0
            assert new.shape == (b, s.gen_new), new.shape
            results[name] = {"new_tokens_per_s": b * s.gen_new / dt, "call_s": dt, "warmup_s": warm}
        except Exception as e:  # one failing path must not hide the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, results[name], flush=True)
    del model
    _cleanup()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks every code path quickly")
    ap.add_argument("--only", choices=["sft", "gen"], default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--all",
        action="store_true",
        help="also time rank1_single/fast_compile (one more compile, ~1 minute on an H100)",
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the full benchmark needs a CUDA GPU; use --tiny for a CPU check")
    if args.tiny:
        s = Setup(device, True, 2, 32, 2, 1, 4, 8, 8, 8)
    else:
        s = Setup(device, False, 8, 512, 8, 3, 64, 512, 64, 128)
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup": {k: v for k, v in vars(s).items() if k != "device"},
    }
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)
    results = {"info": info}
    t_all = time.perf_counter()
    # Order: rank-32 SFT, generation, rank-1 SFT, so the two headline numbers come first.
    sft = results["sft"] = {}

    def run_sft(preset, variants):
        for v in variants:
            try:
                r = sft_variant(s, preset, v)
            except Exception as e:  # one failing variant must not hide the others' numbers
                r = {"error": f"{type(e).__name__}: {e}"[:500]}
                _cleanup()
            sft[f"{preset}/{v}"] = r
            print(f"sft {preset}/{v}", r, flush=True)

    if args.only in (None, "sft"):
        run_sft("rank32_all_linear", ["plain", "plain_noac", "fast", "fast_compile"])
    if args.only in (None, "gen"):
        results["gen"] = gen_runs(s)
    if args.only in (None, "sft"):
        run_sft("rank1_single", ["plain", "fast"] + (["fast_compile"] if args.all else []))
    results["total_s"] = time.perf_counter() - t_all

    print("\n== summary (%s) ==" % info["device"])
    for preset in ["rank32_all_linear", "rank1_single"]:
        base = results.get("sft", {}).get(f"{preset}/plain", {}).get("tokens_per_s")
        for k, r in results.get("sft", {}).items():
            if k.startswith(preset) and "tokens_per_s" in r:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
                print(
                    f"SFT {k:32s} {r['tokens_per_s']:10.0f} tok/s  MFU {mfu:>6s}  x{r['tokens_per_s'] / base:.2f} vs plain"
                )
    gen = results.get("gen", {})
    base = gen.get(f"plain_b{s.gen_batch}", {}).get("new_tokens_per_s")
    for k, r in gen.items():
        if "new_tokens_per_s" in r and base:
            print(
                f"GEN {k:32s} {r['new_tokens_per_s']:10.0f} new tok/s  x{r['new_tokens_per_s'] / base:.2f} vs plain_b{s.gen_batch}"
            )
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                results, f, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)
            )
    return results


if __name__ == "__main__":
    main()
