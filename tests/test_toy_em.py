"""toy.experiments.toy_em: narrow data, masks, the rank-1 Conv1D LoRA through peft and the toy trainer, aggregation, entry point."""

import copy
import json
import math

import pytest
import torch

from toy import processes as P
from toy.experiments.toy_em import (
    aggregate,
    completion_mask,
    force_copies,
    in_slice,
    misaligned_mass,
    narrow_batch,
)
from toy.factors import factor_tokens
from toy.model import ToyModelConfig, build_model, rank1_lora
from toy.processes import tagged
from toy.train import train


def test_narrow_batch_is_in_slice_aligned_prompt_misaligned_completion():
    process = tagged(P.mess3(), 0.5)
    tokens = narrow_batch(process, 64, 8, 3, 2, torch.Generator().manual_seed(0))
    f = factor_tokens(process, tokens)
    assert tokens.shape == (64, 8)
    assert (f[:, 0, 1] == 2).all() and in_slice(process, tokens, 2).all()
    assert (f[:, :3, 0] == 0).all() and (f[:, 3:, 0] == 1).all()


def test_force_copies_keeps_capability_tokens():
    process = tagged(P.mess3(), 0.0)
    tokens = torch.randint(0, 6, (10, 7), generator=torch.Generator().manual_seed(0))
    forced = force_copies(process, tokens, 1, slice(2, 5))
    f, g = factor_tokens(process, tokens), factor_tokens(process, forced)
    assert torch.equal(f[..., 1], g[..., 1])
    assert (g[:, 2:5, 0] == 1).all() and torch.equal(f[:, :2, 0], g[:, :2, 0]) and torch.equal(f[:, 5:, 0], g[:, 5:, 0])


def test_completion_mask_and_misaligned_mass():
    mask = completion_mask(torch.zeros(2, 6, dtype=torch.long), 4)
    # targets are tokens 1..5; tokens 4 and 5 are the completion
    assert mask.tolist() == [[0, 0, 0, 1, 1]] * 2
    process = tagged(P.mess3(), 0.0)
    logits = torch.zeros(3, 6)
    logits[1, 3:] = 50.0  # certain: misaligned copy
    assert torch.allclose(
        misaligned_mass(logits, process), torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64), atol=1e-9
    )


def test_rank1_lora_on_conv1d_trains_only_its_vector(tiny_train_cfg, tmp_path):
    process = tagged(P.mess3(), 0.0)
    base = build_model(ToyModelConfig(preset="mess3_small", d_model=16, d_mlp=32), 6, 6, seed=0)
    with pytest.raises(ValueError, match="not a block"):
        rank1_lora(copy.deepcopy(base), 2, 1.0)
    lora = rank1_lora(copy.deepcopy(base), 1, 1.0)
    trainable = {n: p.shape for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.transformer.h.1.mlp.c_proj.lora_A.default.weight": (1, 32),
        "base_model.model.transformer.h.1.mlp.c_proj.lora_B.default.weight": (16, 1),
    }
    same = rank1_lora(copy.deepcopy(base), 1, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), same.parameters()))  # seeded A
    x = torch.randint(0, 6, (4, 6), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(lora(input_ids=x).logits, base(input_ids=x).logits)  # B starts at zero
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    cfg = tiny_train_cfg(tmp_path, max_steps=5, warmup_steps=0, eval_steps=0, val_samples=50, val_max_sequences=200_000)
    result = train(
        process,
        lora,
        cfg,
        6,
        data_fn=lambda s, g: narrow_batch(process, 16, 6, 3, 0, g),
        loss_weights_fn=lambda t: completion_mask(t, 3),
    )
    assert result.history and result.history[-1]["train_loss"] > 0
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(trainable)
    assert result.model.peft_config["default"].fan_in_fan_out


def test_aggregate_means_and_drops_nan_transfer():
    def seed(v, t):
        g = {
            "tag": v,
            "tag_encoding": v,
            "random_tag_dim": 0.1,
            "capability": v,
            "capability_encoding": v,
            "random_capability_dim": 0.2,
            "tag_dim": 1,
            "capability_dim": 2,
            "norm": 1.0,
        }
        return {
            "before": {"narrow": v, "broad": v},
            "after": {m: {"narrow": v, "broad": v} for m in ("full", "lora", "steer")},
            "transfer": {"full": t, "lora": t, "steer": t},
            "geometry": {"lora_B": g, "steer": g},
        }

    agg = aggregate([seed(0.2, 1.0), seed(0.4, math.nan), seed(0.6, 0.5)])
    assert agg["before"]["broad"]["mean"] == pytest.approx(0.4) and agg["before"]["broad"]["std"] == pytest.approx(0.2)
    assert agg["transfer"]["full"] == {"mean": 0.75, "std": pytest.approx(0.3535533905932738), "n": 2}
    assert agg["geometry"]["steer"]["tag_dim"]["mean"] == 1


@pytest.mark.slow
def test_toy_em_entry_point(tmp_path):
    from toy.experiments.toy_em import main

    metrics = main(
        [
            "--config",
            "configs/toy/toy_em.yaml",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "150",
            "--finetune_steps",
            "40",
            "--rhos",
            "0.0",
            "0.5",
            "--n_seeds",
            "2",
            "--eval_prompts",
            "300",
            "--probe_sequences",
            "100",
            "--val_samples",
            "200",
        ]
    )
    for f in ("metrics.json", "summary.md", "transfer_vs_rho.png", "subspaces.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["rhos"]) == {"0.0", "0.5"} and len(saved["rhos"]["0.0"]["seeds"]) == 2
    a = metrics["rhos"]["0.0"]["aggregate"]
    # full fine-tuning on the misaligned completions raises the in-slice misaligned rate
    assert a["after"]["full"]["narrow"]["mean"] > a["before"]["narrow"]["mean"] + 0.2
    g = a["geometry"]["lora_B"]
    assert (
        0 <= g["tag"]["mean"] <= 1
        and 0 <= g["tag_encoding"]["mean"] <= 1
        and g["tag_dim"]["mean"] == 1
        and g["capability_dim"]["mean"] == 2
    )
