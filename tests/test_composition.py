"""toy.composition: the detector's math on constructed cases whose answer is known."""

import math

import pytest
import torch

from plumbing.stats import mean_ci
from toy.beliefs import belief_states, next_token_distributions
from toy.composition import (
    DetectorConfig,
    behaviour_report,
    best_global_tilt,
    per_prompt_tilt,
    representation_report,
    supervised_control,
    tilt,
    verdict,
)
from toy.data import sample
from toy.processes import mess3, product, rrxor
from toy.rewards import ComposedLatentReward, NextTokenArgmaxReward

P = product(mess3(), rrxor())


@pytest.fixture(scope="module")
def prompts():
    tokens = sample(P, 1500, 10, seed=11).tokens
    return tokens, belief_states(P, tokens)[:, -1], next_token_distributions(P, tokens)[:, -1]


def test_exact_reweighting_has_zero_kl_and_recovers_beta(prompts):
    _, beliefs, pi_ref = prompts
    table = NextTokenArgmaxReward(P, 0).table(beliefs)
    pi = tilt(pi_ref, table, 1 / 0.25)
    fit = best_global_tilt(pi, pi_ref, table)
    assert fit["kl"] < 1e-4 and math.isclose(fit["beta_hat"], 0.25, rel_tol=0.03)  # up to the beta grid's spacing
    # per-prompt strengths are recovered exactly when every prompt was tilted by its own strength
    s = torch.linspace(0.0, 6.0, len(pi_ref), dtype=torch.float64)
    s_hat = per_prompt_tilt(tilt(pi_ref, table, s), pi_ref, table)
    assert torch.allclose(s_hat, s, atol=1e-6)


def test_sharpening_the_reference_is_reweighting(prompts):
    """pi_ref = the exact predictive, which carries the argmax: a tilt of it by the reward is a reweighting."""
    _, beliefs, pi_ref = prompts
    reward = NextTokenArgmaxReward(P, 0)
    b = behaviour_report(pi_ref, tilt(pi_ref, reward.table(beliefs), 3.0), reward, beliefs)
    assert b["reward_gain"] > 0.2
    assert abs(b["excess_reward"]) < 0.05  # what the policy earns, a function of pi_ref earns too
    assert b["explained_kl"] > 0.9
    assert verdict(b, {"latent_gain": 0.0, "latent_gain_output_site": 0.0}, DetectorConfig())[0] == "reweighting"


def test_policy_using_hidden_latent_is_composition(prompts):
    """A policy that names XOR(a, b) with b invisible in pi_ref's outputs beats every output-only policy."""
    _, beliefs, pi_ref = prompts
    reward = ComposedLatentReward(P, [0, 1], [0], [1, 2], "xor", [0, 1])
    table = reward.table(beliefs)
    pi = 0.1 * pi_ref + 0.9 * table  # 90% on the right token, whatever pi_ref says
    b = behaviour_report(pi_ref, pi, reward, beliefs)
    assert b["reward_output_only"] < 0.75  # ~2/3: only the synchronised-XOR prompts reveal b
    assert b["excess_reward"] > 0.15
    # no reweighting by what pi_ref predicts can split t0 from t1 where b is invisible (~2/3 of prompts,
    # ~0.4 nats each); the share "explained" stays high because most of the move is onto {t0, t1} at all
    assert b["kl_to_output_reweighting"] > 0.15
    assert verdict(b, {"latent_gain": 0.3, "latent_gain_output_site": 0.3}, DetectorConfig())[0] == "composition"
    # and the true-reward optimum cannot tell: it knows the latent, so it fits this policy well too
    assert b["kl_to_per_prompt_true_reweighting"] < 0.5 * b["kl_to_output_reweighting"]


def test_verdict_needs_a_reward_gain_and_agreeing_signatures():
    cfg = DetectorConfig()
    flat = {"reward_gain": 0.01, "excess_reward": 0.3, "explained_kl": 0.0}
    assert verdict(flat, {"latent_gain": 0.5, "latent_gain_output_site": 0.5}, cfg)[0] == "inconclusive"
    mixed = {"reward_gain": 0.2, "excess_reward": 0.3, "explained_kl": 0.0}
    assert (
        verdict(mixed, {"latent_gain": 0.0, "latent_gain_output_site": 0.0}, cfg)[0] == "inconclusive"
    )  # behaviour says new, representation does not
    # the verdict reads the latent where latent_site says: the output site by default, all sites on request
    split = {"latent_gain": 0.02, "latent_gain_output_site": 0.2}
    assert verdict(mixed, split, cfg)[0] == "composition"
    assert verdict(mixed, split, DetectorConfig(latent_site="all"))[0] == "inconclusive"


def test_representation_report_on_constructed_activations(prompts):
    """Activations = factor beliefs (+ noise) before; after, the XOR latent is added on a new axis. The
    read-out of the latent rises, and neither it nor the change lives in the factor subspaces."""
    _, beliefs, _ = prompts
    reward = ComposedLatentReward(P, [0, 1], [0], [1, 2], "xor", [0, 1])
    g = torch.Generator().manual_seed(0)
    marg = beliefs.reshape(-1, 3, 5)
    factors = torch.cat([marg.sum(2), marg.sum(1)], 1)  # (N, 8)
    X_pre = torch.cat([factors, torch.zeros(len(beliefs), 4, dtype=torch.float64)], 1) + 1e-3 * torch.randn(
        len(beliefs), 12, generator=g, dtype=torch.float64
    )
    X_post = X_pre.clone()
    X_post[:, 10] += reward.latent(beliefs).double()
    rep = representation_report(X_pre, X_post, P, reward, beliefs, d_model=4)  # the last 4 columns: the "output site"
    assert rep["latent_accuracy"]["post"] > 0.98 and rep["latent_gain"] > 0.15
    assert rep["latent_accuracy"]["pre_output_site"] < 0.6 < 0.98 < rep["latent_accuracy"]["post_output_site"]
    assert rep["latent_gain_output_site"] > 0.35
    assert rep["latent_share_in_factor_subspaces"] < 0.5
    assert rep["change_share_in_factor_subspaces"] < 0.05
    for t in rep["probe_transfer"]:
        assert t["mse_pre_probe_on_pre"] < 1e-4 and t["mse_refit_on_post"] < 1e-4


def test_mean_ci_matches_t_interval():
    out = mean_ci([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and math.isclose(out["ci"][1] - 2.0, 4.302652729911275 * 1.0 / math.sqrt(3), rel_tol=1e-9)


def test_supervised_control_learns_the_rewarded_token_and_trains_only_named_modules():
    from toy.grpo import policy_probs, prompt_set
    from toy.model import ToyModelConfig, build_model

    reward = ComposedLatentReward(P, [0, 1], [0], [1, 2], "xor", [0, 1])
    pre = build_model(ToyModelConfig(preset="mess3_small"), P.vocab_size + 2, 8, seed=0)
    prompts, beliefs = prompt_set(P, 2000, 6, seed=0)
    control = supervised_control(
        pre, P, reward, prompts, beliefs, [r"^transformer\.h\.1\.", "^lm_head"], steps=150, batch_size=128
    )
    table = reward.table(beliefs)
    before = float((policy_probs(pre, prompts, P.vocab_size) * table).sum(1).mean())
    after = float((policy_probs(control, prompts, P.vocab_size) * table).sum(1).mean())
    assert after > before + 0.3  # from ~1/6 onto the two output tokens and towards the right one
    # a reweighting reward (two top tokens per prompt): the control keeps pi_ref's odds between them
    sharpen = NextTokenArgmaxReward(P, 0)
    ctl = supervised_control(pre, P, sharpen, prompts, beliefs, ["^lm_head"], steps=150, batch_size=128)
    top = sharpen.table(beliefs) > 0
    p0, p1 = policy_probs(pre, prompts, P.vocab_size), policy_probs(ctl, prompts, P.vocab_size)
    odds = lambda p: (p * top)[:, ::2].sum(1) / (p * top).sum(1)  # noqa: E731  share of the RRXOR-0 token among the top two
    assert (odds(p1) - odds(p0)).abs().mean() < 0.05 < float((p1 * top).sum(1).mean() - (p0 * top).sum(1).mean())
    frozen = [n for n, _ in pre.named_parameters() if not n.startswith(("transformer.h.1.", "lm_head"))]
    assert all(torch.equal(pre.state_dict()[n], control.state_dict()[n]) for n in frozen)
    assert all(p.requires_grad for p in pre.parameters())  # the pre-RL model itself is untouched


@pytest.mark.slow
def test_seed_sweep_with_supervised_control(tmp_path):
    """python -m toy.experiments.rl --seeds ... --supervised_control: both reports per seed, aggregated."""
    import json

    import yaml

    from toy.experiments.rl import main

    pre_cfg = tmp_path / "pre.yaml"
    pre_cfg.write_text(
        yaml.safe_dump(
            {
                "process": "product",
                "process_kwargs": {"factors": [{"name": "mess3", "x": 0.05, "a": 0.85}, {"name": "rrxor"}]},
                "context_length": 8,
                "preset": "mess3_small",
                "steps": 40,
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
    main(
        [
            "--config",
            "configs/toy/rl_compose.yaml",
            "--pretrain_config",
            str(pre_cfg),
            "--pretrain_dir",
            str(tmp_path / "pre"),
            "--output_dir",
            str(tmp_path / "c"),
            "--prompt_length",
            "6",
            "--n_train_prompts",
            "500",
            "--n_eval_prompts",
            "400",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "64",
            "--exact_eval_every",
            "2",
            "--seeds",
            "0",
            "--supervised_control",
            "true",
            "--control_steps",
            "20",
            "--train_modules",
            r"^transformer\.h\.1\.",
            "^lm_head",
        ]
    )
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert saved["aggregate"]["control"]["verdicts"][0] in {"reweighting", "composition", "inconclusive"}
    assert (tmp_path / "c" / "seed0" / "control" / "composition_report.md").is_file()
    assert "Supervised control" in (tmp_path / "c" / "summary.md").read_text()
