"""toy.experiments.factored: the tagged process with a rho knob, the geometry metrics on synthetic representations, the entry point."""

import json
from pathlib import Path

import pytest
import torch

from toy import processes as P
from toy.beliefs import belief_states
from toy.collect import ProbeRows, collect
from toy.data import sample
from toy.experiments.factored import _rank_for, factor_geometry, hypotheses
from toy.factors import factor_marginals, product_belief
from toy.model import ToyModelConfig, build_model
from toy.processes import tag_process, tagged


def test_tagged_at_rho_zero_is_capability_tag():
    cap = P.mess3(0.15, 0.6)
    a, b = tagged(cap, 0.0, 0.07, 0.2), P.capability_tag(cap, 0.07, 0.2)
    assert torch.allclose(a.T, b.T, atol=1e-15)
    assert a.factor_vocab_sizes == b.factor_vocab_sizes == (2, 3)
    assert a.factor_names[0] == "tag"


def test_tagged_keeps_each_factor_for_every_rho_and_entangles():
    cap, tag = P.mess3(0.05, 0.85), tag_process(0.05, 0.1)
    p = tagged(cap, 0.7)
    T = p.T.reshape(2, 3, 2, 3, 2, 3)  # [copy, x, a, i, b, j]
    # the tag's own kernel P(copy, b | a) is the same whatever the capability state i
    tag_marg = T.sum(dim=(1, 5)).permute(0, 1, 3, 2)  # [copy, a, b, i]
    assert torch.allclose(tag_marg, tag.T[..., None].expand_as(tag_marg), atol=1e-12)
    cap_marg = T.sum(dim=(0, 4))  # [x, a, i, j]
    assert torch.allclose(cap_marg, cap.T[:, None].expand_as(cap_marg), atol=1e-12)
    # ... but the joint belief stops being a product
    beliefs = belief_states(p, sample(p, 50, 8, seed=0).tokens).reshape(-1, 6)
    s = torch.linalg.svdvals(beliefs.reshape(-1, 2, 3))
    assert (s[:, 1] / s[:, 0]).max() > 1e-3
    s0 = torch.linalg.svdvals(belief_states(tagged(cap, 0.0), sample(p, 50, 8, seed=0).tokens).reshape(-1, 2, 3))
    assert (s0[:, 1] / s0[:, 0]).max() < 1e-10


def test_hypotheses():
    m = P.mess3()
    assert hypotheses(P.product(m, m)) == {"factored": 4, "joint": 8}
    assert hypotheses(P.product(m, m, m)) == {"factored": 6, "joint": 26}
    assert hypotheses(P.product(m, P.rrxor())) == {"factored": 6, "joint": 14}
    with pytest.raises(ValueError, match="not a factored"):
        hypotheses(m)


def test_rank_for_picks_the_knee():
    curve = {1: 0.5, 2: 0.12, 3: 0.1005, 4: 0.1}
    assert _rank_for(curve, 1.0, 0.95) == 2
    assert _rank_for(curve, 1.0, 0.999) == 3


def _synthetic(process, n_seq, kind, seed=0, d=32):
    """A fake residual stream holding the beliefs linearly: factor marginals side by side ('factored') or the joint."""
    tokens = sample(process, n_seq, 8, seed=seed).tokens
    beliefs = belief_states(process, tokens).reshape(-1, process.n_states)
    source = torch.cat(factor_marginals(process, beliefs), -1) if kind == "factored" else beliefs
    g = torch.Generator().manual_seed(seed)
    X = source.float() @ torch.randn(source.shape[1], d, generator=g) + 1e-4 * torch.randn(len(source), d, generator=g)
    return ProbeRows(
        tokens,
        beliefs,
        torch.ones(len(beliefs), dtype=torch.float64),
        torch.arange(n_seq).repeat_interleave(8),
        False,
        {"x": X},
    )


@pytest.mark.parametrize("K", [2, 3])
def test_geometry_tells_factored_from_joint(K):
    process = P.product(*[P.mess3(0.05, 0.85), P.mess3(0.15, 0.6), P.mess3(0.1, 0.7)][:K])
    fac = factor_geometry(process, _synthetic(process, 300, "factored"), alpha=1e-2)
    joint = factor_geometry(process, _synthetic(process, 300, "joint"), alpha=1e-2)
    h = hypotheses(process)
    # a factored representation: its joint-belief read-out is the factored one, rank 2K, no interaction read
    assert fac["dims"]["probe_pca"]["0.99"] <= h["factored"] == fac["dims"]["exact_factored"]["0.99"]
    assert fac["dims"]["reduced_rank"]["0.99"] <= h["factored"]
    assert fac["joint"]["interaction_r2"] < 0.01
    assert abs(fac["joint"]["test_r2"] - fac["joint"]["factored_r2_ceiling"]) < 0.01
    # a joint representation: the read-out has the joint belief's dimension and reads the interaction too
    assert joint["dims"]["probe_pca"] == joint["dims"]["exact_joint"]
    assert joint["dims"]["probe_pca"]["0.99"] > h["factored"]
    assert joint["joint"]["interaction_r2"] > 0.99
    assert all(f["test_r2"] > 0.99 for f in fac["factors"] + joint["factors"])
    assert len(fac["overlaps"]) == K * (K - 1) // 2


def test_collect_matches_exact_beliefs():
    process = P.product(P.mess3(), P.mess3(0.15, 0.6))
    model = build_model(
        ToyModelConfig(preset="mess3_small", d_model=16, d_mlp=32), process.vocab_size, 7, seed=0
    ).eval()
    with pytest.raises(ValueError, match="never scores; probe windows of at most 6 tokens"):
        collect(model, process, 7, 5, seed=3, sites=["block1"])  # the last position's output is never trained
    data = collect(model, process, 6, 5, seed=3, sites=["block1"])
    assert data.X.shape == (30, 16) and data.beliefs.shape == (30, 9)
    assert torch.equal(data.beliefs.reshape(5, 6, 9), belief_states(process, data.tokens))
    assert data.groups.tolist() == [i for i in range(5) for _ in range(6)]
    # a product process's exact joint belief is the product of its marginals
    assert torch.allclose(product_belief(factor_marginals(process, data.beliefs)), data.beliefs, atol=1e-12)


@pytest.mark.slow
def test_factored_entry_point(tmp_path):
    from toy.experiments.factored import main

    m3 = {"name": "mess3"}
    metrics = main(
        [
            "--config",
            "configs/toy/factored.yaml",
            "--output_dir",
            str(tmp_path),
            "--steps",
            "60",
            "--probe_sequences",
            "60",
            "--processes",
            json.dumps({"k2": {"name": "product", "factors": [m3, {"name": "mess3", "x": 0.15, "a": 0.6}]}}),
            "--rhos",
            "0.0",
            "1.0",
            "--d_model",
            "16",
            "--d_mlp",
            "32",
            "--val_samples",
            "200",
        ]
    )
    for f in ("metrics.json", "summary.md", "dims.png", "rho_sweep.png", "factors.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["rho_sweep"]) == {"0.0", "1.0"} and set(saved["processes"]) == {"k2"}
    assert saved["processes"]["k2"]["hypotheses"] == {"factored": 4, "joint": 8}
    # rho = 1 entangles the exact beliefs; rho = 0 does not
    assert saved["rho_sweep"]["0.0"]["schmidt_residual"] < 1e-12 < saved["rho_sweep"]["1.0"]["schmidt_residual"]
    assert metrics["processes"]["k2"]["val_loss"] > 0


def test_config_takes_json_specs_on_the_command_line_and_rejects_bad_ones(tmp_path):
    from plumbing.config import ConfigParser
    from toy.config import TrainConfig
    from toy.experiments.factored import FactoredConfig
    from toy.model import ToyModelConfig

    cfg, _, train_cfg = ConfigParser((FactoredConfig, ToyModelConfig, TrainConfig)).parse_args_and_config(
        ["--config", "configs/toy/factored.yaml", "--processes", '{"k2": {"name": "mess3"}}', "--rhos", "0.5"]
    )
    assert cfg.processes == {"k2": {"name": "mess3"}} and cfg.rhos == [0.5]
    assert cfg.rho_process["name"] == "correlated" and train_cfg.output_dir == str(
        Path("configs").resolve().parent / "runs/factored"
    )  # from the YAML, anchored at the project root
    with pytest.raises(ValueError, match="without 'rho'"):
        FactoredConfig(rho_process={"name": "correlated", "rho": 0.3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rhos: [0.1]\nnot_a_field: 1\n")
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--not_a_field'"):
        ConfigParser((FactoredConfig,)).parse_args_and_config(["--config", str(bad)])
