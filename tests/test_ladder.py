"""The ladder of reweighting references (toy.ladder), the mixture process and separate-skills prompts (toy.segments)."""

import pytest
import torch

from toy.beliefs import belief_states
from toy.ladder import (
    LadderConfig,
    calibration_controls,
    ceilings,
    fit_predict,
    hard_tilt,
    ladder_verdict,
    latent_mixture,
    rung_features,
)
from toy.processes import make_process, mess3, mixture, rrxor

CFG = LadderConfig(margins=[0.05] * 4, knn_shares=[0.02, 0.05], ridge_alphas=[1e-3, 1.0], pca_dims=16)


def _toy_instance(n: int, seed: int):
    """A latent bit that only rung 2's information carries (90% of the time): rungs 1, 3, 4 see noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randint(0, 2, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    noise = lambda d: torch.randn(n, d, generator=g)  # noqa: E731
    feats = {
        1: noise(2),
        2: torch.cat([noise(3), (latent ^ flip.long()).float()[:, None] + 0.1 * noise(1)], 1),
        3: noise(8),
        4: noise(20),
    }
    table = torch.nn.functional.one_hot(latent, 2).double()  # reward 1 for naming the latent bit
    return feats, latent, table


@pytest.fixture(scope="module")
def toy_ladders():
    """Two independent toy prompt sets and their ladders (fitted once: the learners are the slow part)."""
    matrix = torch.eye(2, dtype=torch.float64)
    sets = [_toy_instance(2000, seed) for seed in (0, 1)]
    return matrix, [(f, lat, tab, ceilings(f, lat, matrix, tab, CFG)) for f, lat, tab in sets]


def test_a_policy_built_from_rung2_information_is_reweighting_within_rung2(toy_ladders):
    matrix, ((feats, latent, table, lad), (other_feats, other_latent, _, other)) = toy_ladders
    rewards = {k: r["reward"] for k, r in lad["rungs"].items()}
    assert rewards[1] == pytest.approx(0.5, abs=0.05) and rewards[2] == pytest.approx(0.9, abs=0.03)
    assert rewards[3] >= rewards[2] and rewards[4] >= rewards[3]  # the rungs nest
    assert lad["rungs"][3]["learner"].startswith("rung2:") and lad["rungs"][3]["own_reward"] < 0.6
    pi_ref = torch.full((len(latent), 2), 0.5, dtype=torch.float64)
    r_hat = fit_predict(other_feats[2], other_latent, feats[2], other["rungs"][2]["learner"], matrix, CFG)
    pi = hard_tilt(pi_ref, r_hat)
    v = ladder_verdict(0.5, float((pi * table).sum(1).mean()), lad, CFG)
    assert v["verdict"] == "composition beyond rung 1 (reweighting within rung 2)", v
    opt = latent_mixture(pi_ref, table, 1.0)[0]  # reads the latent itself: beyond every rung here
    assert ladder_verdict(0.5, float((opt * table).sum(1).mean()), lad, CFG)["verdict"] == "composition beyond rung 4"
    assert ladder_verdict(0.5, 0.5, lad, CFG)["verdict"] == "inconclusive"
    assert ladder_verdict(0.5, rewards[1] + 0.06, lad, CFG)["highest_beaten"] == 1


def test_calibration_controls_match_their_known_answers_on_the_toy_instance(toy_ladders):
    matrix, ((feats, latent, table, lad), (other_feats, other_latent, _, other)) = toy_ladders
    pi_ref = torch.full((len(latent), 2), 0.5, dtype=torch.float64)
    rows = calibration_controls(pi_ref, table, lad, other, other_feats, other_latent, feats, matrix, CFG)
    assert {r["control"] for r in rows} >= {"reference", "reweight_rung2", "capped_rung2", "above_rung2", "optimum"}
    for r in rows:
        for k, known in r["known"].items():
            if known is not None:
                assert r["beaten"][k] == known, (r["control"], k, r)


def test_the_supervised_controls_answer_is_known_only_where_its_other_set_reward_fixes_it(toy_ladders):
    matrix, ((feats, latent, table, lad), (other_feats, other_latent, _, other)) = toy_ladders
    pi_ref = torch.full((len(latent), 2), 0.5, dtype=torch.float64)
    c = {k: r["reward"] for k, r in other["rungs"].items()}  # ~0.5 at rung 1, ~0.9 at rungs 2-4
    for r_other, expect in [
        (c[1] + 0.15, {1: True, 2: False, 3: False, 4: False}),  # reads the latent, earns less than rung 2
        (c[2] + 0.03, {1: True, 2: None, 3: None, 4: None}),
    ]:  # within lead of rung 2: not known
        pi = latent_mixture(pi_ref, table, r_other)[0]  # a policy that reads the latent and earns r_other here too
        rows = calibration_controls(
            pi_ref, table, lad, other, other_feats, other_latent, feats, matrix, CFG, supervised=(pi, r_other)
        )
        (sup,) = [r for r in rows if r["control"] == "supervised"]
        assert sup["known"] == expect, sup
        assert all(sup["beaten"][k] == known for k, known in sup["known"].items() if known is not None), sup
    rows = calibration_controls(pi_ref, table, lad, other, other_feats, other_latent, feats, matrix, CFG)
    assert "supervised" not in {r["control"] for r in rows}


def test_latent_mixture_earns_its_target_exactly():
    g = torch.Generator().manual_seed(0)
    pi_ref = torch.rand(500, 3, generator=g, dtype=torch.float64).softmax(1)
    table = torch.nn.functional.one_hot(torch.randint(0, 3, (500,), generator=g), 3).double()
    pi, lam = latent_mixture(pi_ref, table, 0.8)
    assert 0 < lam < 1 and float((pi * table).sum(1).mean()) == pytest.approx(0.8, abs=1e-9)
    assert torch.allclose(pi.sum(1), torch.ones(500, dtype=torch.float64))


def test_rung_features_read_the_reference():
    from toy.grpo import policy_probs
    from toy.model import ToyModelConfig, build_model

    model = build_model(ToyModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32), 5, 8, seed=0).eval()
    prompts = torch.randint(0, 3, (7, 6))
    f = rung_features(model, prompts, 3)
    assert (
        f[1].shape == (7, 3) and f[2].shape == (7, 18) and f[3].shape == (7, 6 * 16) and f[4].shape == (7, 4 * 6 * 16)
    )
    assert torch.allclose(f[1].double().exp(), policy_probs(model, prompts, 3), atol=1e-5)
    assert torch.allclose(f[2].view(7, 6, 3)[:, -1], f[1]) and torch.equal(f[4][:, -6 * 16 :], f[3])


def test_mixture_never_joins_components_and_its_beliefs_are_each_components():
    from toy.data import sample

    p = make_process("mixture", components=[{"name": "mess3"}, {"name": "rrxor"}])
    assert p.vocab_size == 5 and p.n_states == 8 and p.stationary.sum() == pytest.approx(1.0)
    t = sample(p, 4000, 12, seed=0).tokens
    first = (t < 3).all(1)
    assert not ((t < 3).any(1) & (t >= 3).any(1)).any() and 0.45 < first.double().mean() < 0.55
    b = belief_states(p, t)
    assert torch.allclose(b[first][..., :3], belief_states(mess3(), t[first]), atol=1e-10)
    assert torch.allclose(b[~first][..., 3:], belief_states(rrxor(), t[~first] - 3), atol=1e-10)
    with pytest.raises(ValueError, match="weight"):
        mixture([mess3(), rrxor()], [0.7, 0.7])


def test_separate_skills_prompts_and_reward():
    from toy.grpo import RLTaskConfig, build_reward, task_prompts

    task = RLTaskConfig(
        process="mixture",
        process_kwargs={"components": [{"name": "mess3"}, {"name": "rrxor"}]},
        reward="compose",
        prompt_length=9,
        segment_lengths=[4, 5],
        latent_states_a=[0],
        latent_states_b=[1, 2],
        op="xor",
        output_tokens=[3, 4],
        pretrain_config="unused.yaml",
    )
    p = task.build_process()
    reward = build_reward(task, p)
    x, beliefs = task_prompts(task, p, 3000, 7)
    assert x.shape == (3000, 9) and (x[:, :4] < 3).all() and (x[:, 4:] >= 3).all()
    assert torch.allclose(beliefs[:, :3], belief_states(mess3(), x[:, :4])[:, -1])
    assert torch.allclose(beliefs[:, 3:], belief_states(rrxor(), x[:, 4:] - 3)[:, -1])
    a = (torch.round(beliefs[:, :3] * 1e9).argmax(1) == 0).long()
    b = torch.isin(torch.round(beliefs[:, 3:] * 1e9).argmax(1), torch.tensor([1, 2])).long()
    assert torch.equal(reward.latent(beliefs), a ^ b) and 0.3 < float((a ^ b).double().mean()) < 0.7
    ids = [[3 + int(c)] for c in (a ^ b)[:50]]
    assert reward(None, None, ids, beliefs[:50].tolist()) == [1.0] * 50
    with pytest.raises(ValueError, match="segment_lengths"):
        RLTaskConfig(
            process="product",
            process_kwargs={"factors": [{"name": "mess3"}]},
            segment_lengths=[4, 5],
            prompt_length=9,
            pretrain_config="unused.yaml",
        )


def test_headroom_family_hides_its_latent_from_every_output():
    """The headroom family (configs/toy/rl_headroom.yaml): where the gate has read b1, b2 (and b3), the belief knows
    b1 XOR b2 but the next token is a fair-coin filler, so the exact next-token distribution at the last position
    (checked against the predictive computed by hand from the joint belief) does not tell a = 0 from a = 1, while the
    exact-latent policy earns 1."""
    from toy.data import sample
    from toy.factors import factor_marginals
    from toy.grpo import RLTaskConfig, build_reward
    from toy.ladder import exact_output_features

    table = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    task = RLTaskConfig(
        process="product",
        process_kwargs={
            "factors": [
                {"name": "noisy_gate", "truth_table": table, "noise": 0.1},
                {"name": "mess3", "x": 0.05, "a": 0.85},
            ]
        },
        reward="compose",
        latent_states_a=[4, 5, 9, 10, 11, 12],
        latent_states_b=[0],
        op="xor",
        pretrained_path="unused",
    )
    process = task.build_process()
    reward = build_reward(task, process)
    batch = sample(process, 3000, 10, seed=0, return_beliefs=True)
    feats = exact_output_features(process, batch.beliefs)
    assert feats[1].shape == (3000, 6) and feats[2].shape == (3000, 60)
    last = batch.beliefs[:, -1]
    naive = torch.stack([last @ process.T[x].sum(-1) for x in range(6)], 1)  # P(x) = eta T[x] 1
    assert torch.allclose(feats[1].double().exp(), naive, atol=1e-6)
    gate_state = factor_marginals(process, last)[0].argmax(1)
    hidden = torch.isin(gate_state, torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]))
    gate_bit_1 = naive.reshape(-1, 2, 3).sum(2)[:, 1]
    a = torch.isin(gate_state, torch.tensor([4, 5, 9, 10, 11, 12]))
    # where the gate's most likely state is a hidden phase, the next gate bit's probability is distributed alike for
    # a = 0 and a = 1 (its mean 0.50 either way; the phase itself is uncertain, so it spreads around 0.5)
    assert hidden.sum() > 500 and 0.3 < a[hidden].double().mean() < 0.7
    assert abs(float(gate_bit_1[hidden & a].mean() - gate_bit_1[hidden & ~a].mean())) < 0.02
    assert float(reward.table(last).max(1).values.mean()) == 1.0
