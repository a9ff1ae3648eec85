"""toy.experiments.rl_objectives: the one-token policy-gradient lab (exact and sampled objectives on the same parameters)."""

import json

import pytest
import torch

from toy.experiments.rl_objectives import ObjectivesConfig, main, objective_loss


def _grad(name, logits, table, G=4, seed=0):
    z = logits.clone().requires_grad_(True)
    loss, _ = objective_loss(name, z, logits, table, G, 0.0, torch.Generator().manual_seed(seed))
    loss.backward()
    return z.grad


def test_log_pass_gradient_is_expected_gradient_over_pass_rate():
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = torch.zeros(5, 6, dtype=torch.float64)
    table[torch.arange(5), torch.tensor([0, 3, 5, 1, 2])] = 1
    p = (logits.softmax(-1) * table).sum(1, keepdim=True)
    assert torch.allclose(_grad("log_pass", logits, table) * p, _grad("expected", logits, table))


def test_sampled_maxrl_estimates_the_log_pass_gradient_and_grpo_does_not():
    """A confidently wrong prompt (pass rate 0.05): MaxRL's sampled gradient matches grad log p (what a supervised
    loss would give); GRPO's is smaller by ~sqrt(p / (1 - p)) -- the stall of rl_compose.yaml in one prompt."""
    logits = torch.tensor([[0.0, 2.944, -20, -20]], dtype=torch.float64)  # p(token 0) = 0.05
    table = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    exact = _grad("log_pass", logits, table)
    maxrl = _grad("maxrl", logits, table, G=200_000)
    grpo = _grad("grpo", logits, table, G=200_000)
    assert torch.allclose(maxrl, exact, atol=0.02), (maxrl, exact)
    p = 0.05
    assert torch.allclose(grpo, exact * (p / (1 - p)) ** 0.5, atol=0.005), (grpo, exact)


def test_config_errors():
    with pytest.raises(ValueError, match="use one or more of"):
        ObjectivesConfig(objectives=["ppo"])


def test_every_objective_raises_the_reward_on_a_tiny_model(tiny_pretrained, tmp_path):
    out = main(
        [
            "--process",
            "mess3",
            "--reward",
            "reweight",
            "--pretrained_path",
            str(tiny_pretrained),
            "--prompt_length",
            "6",
            "--n_train_prompts",
            "1000",
            "--n_curve_prompts",
            "300",
            "--max_steps",
            "40",
            "--learning_rate",
            "1e-2",
            "--per_device_train_batch_size",
            "128",
            "--num_generations",
            "8",
            "--eval_every",
            "20",
            "--output_dir",
            str(tmp_path / "o"),
            "--use_cpu",
            "true",
        ]
    )
    for name, r in out["results"].items():
        assert r["curve"][-1][1] > r["curve"][0][1] + 0.15, (name, r["curve"])
    saved = json.loads((tmp_path / "o" / "objectives.json").read_text())
    assert (
        set(saved["results"]) == {"expected", "log_pass", "grpo", "maxrl"}
        and (tmp_path / "o" / "objectives.png").is_file()
    )
