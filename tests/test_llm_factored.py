"""llm.factored and llm.probe_transfer on tiny in-process models: the crossed text set, the minimal-norm
factor edit, LoRA B shares, the end-to-end run, and probe files moved between checkpoints with shape errors."""

import pytest
import torch
import yaml

from llm.factored import FactoredConfig, crossed_texts, cv_accuracy, factor_edit, lora_b_vectors, run, shares
from llm.probe_transfer import TransferConfig, compare, target_config
from llm.tiny import save_tiny, tiny_causal_lm
from probes.io import load_probe, save_probe
from probes.linear import LinearProbe, fit_ridge


def _texts(world) -> dict:
    """The reply and question files of the ``llm_world`` fixture (tests/conftest.py): 6 aligned / misaligned replies
    per topic, one question per topic."""
    d = world["dir"]
    return dict(aligned_texts=str(d / "a.csv"), misaligned_texts=str(d / "m.csv"), question_file=str(d / "q.yaml"))


def test_crossed_texts_fill_every_cell(llm_world):
    # the file holds a third topic ("hello"), whose replies must not be drawn
    question = {q["id"]: q["paraphrases"][0] for q in yaml.safe_load((llm_world["dir"] / "q.yaml").read_text())}
    c = crossed_texts(FactoredConfig(**_texts(llm_world), topics=["wish", "code"], n_per_cell=4))
    assert len(c.texts) == 16 and c.topics == ["wish", "code"]
    for i, t in enumerate(c.topics):
        rows = (c.topic == i).nonzero().flatten().tolist()
        assert {c.texts.questions[r] for r in rows} == {question[t]}
        assert sorted(c.texts.labels[rows].tolist()) == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="not question ids"):
        crossed_texts(FactoredConfig(**_texts(llm_world), topics=["wish", "nope"], n_per_cell=4))


def test_factor_edit_moves_one_readout_with_minimal_norm():
    g = torch.Generator().manual_seed(0)
    d = 20
    topic = LinearProbe(torch.randn(d, 3, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    align = LinearProbe(torch.randn(d, 1, generator=g, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    dx = factor_edit(topic, align, 2.0)
    torch.testing.assert_close(dx @ topic.W, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float(dx @ align.W[:, 0]) == pytest.approx(2.0)
    # Minimal norm: any other solution adds a null-space component, so it is longer; the optimum lies in
    # the span of W's columns.
    W = torch.cat([topic.W, align.W], 1)
    coef = torch.linalg.lstsq(W, dx[:, None]).solution
    torch.testing.assert_close(W @ coef, dx[:, None], atol=1e-10, rtol=0)
    null = torch.randn(d, dtype=torch.float64, generator=g)
    null -= W @ torch.linalg.lstsq(W, null[:, None]).solution[:, 0]
    assert (dx + null).norm() > dx.norm()
    # One-hot topic probes have columns summing to zero (rank n_topics - 1): still exact.
    topic0 = LinearProbe(topic.W - topic.W.mean(1, keepdim=True), topic.b)
    dx0 = factor_edit(topic0, align, 1.0)
    assert (dx0 @ topic0.W).abs().max() < 1e-10 and float(dx0 @ align.W[:, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lies in the topic probe's span"):
        factor_edit(topic, LinearProbe(topic.W[:, :1] + topic.W[:, 1:2], torch.zeros(1)), 1.0)


def test_cv_accuracy_separable_vs_shuffled():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    X = torch.randn(60, 10, generator=g, dtype=torch.float64) + 4 * torch.nn.functional.one_hot(y, 10).double()
    Y = torch.nn.functional.one_hot(y, 3).double()
    assert cv_accuracy(X, Y, 0.1, 4, 0) == 1.0
    assert cv_accuracy(X, Y[torch.randperm(60, generator=g)], 0.1, 4, 0) < 0.6
    assert cv_accuracy(X, (y == 1).double()[:, None], 0.1, 4, 0) > 0.95


def test_shares_against_random_baseline():
    d = 50
    span = torch.eye(d, dtype=torch.float64)[:, :2]
    inside = shares(torch.tensor([3.0, 4.0] + [0.0] * (d - 2), dtype=torch.float64), {"s": span}, 200, 0)["s"]
    assert inside["share"] == pytest.approx(1.0) and inside["percentile"] == 1.0 and inside["dim"] == 2
    assert inside["random_mean"] == pytest.approx(2 / d, rel=0.3)
    outside = shares(torch.eye(d, dtype=torch.float64)[:, 5], {"s": span}, 200, 0)["s"]
    assert outside["share"] == pytest.approx(0.0) and outside["percentile"] == 0.0


def _rank1_adapter(tmp_path):
    from peft import get_peft_model

    from plumbing.lora import LoraPresetConfig, peft_config_for

    model, _ = tiny_causal_lm("qwen2")
    peft = get_peft_model(model, peft_config_for(LoraPresetConfig("rank1_single", [1]), model))
    ((name, mod),) = [
        (n, m) for n, m in peft.named_modules() if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})
    ]
    with torch.no_grad():
        mod.lora_B["default"].weight.copy_(torch.arange(32.0)[:, None])
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_lora_b_vectors_read_back(tmp_path):
    B = lora_b_vectors(_rank1_adapter(tmp_path))
    assert list(B) == ["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(B["model.layers.1.mlp.down_proj"], torch.arange(32.0, dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lora_b_vectors(tmp_path)


class StubJudge:
    name = "stub"

    def score(self, requests):
        return [50.0 for _ in requests]


class NoScoreJudge:
    """Scores no reply of any condition (REFUSAL / CODE for all): the summaries report n/a and keep the replies."""

    name = "no-score"

    def score(self, requests):
        return [None for _ in requests]


@pytest.mark.parametrize("judge", [StubJudge, NoScoreJudge])
def test_factored_run_end_to_end_on_tiny_model(tmp_path, llm_world, judge):
    from llm.em_metrics import read_judged_csv

    model, tok = tiny_causal_lm("qwen2")
    adapter = _rank1_adapter(tmp_path)
    cfg = FactoredConfig(
        **_texts(llm_world),
        topics=llm_world["topics"],
        n_per_cell=4,
        site="block1",
        ridge_alpha=1e-3,
        n_folds=3,
        deltas=[0.0, 1.0],
        samples_per_topic=2,
        max_new_tokens=6,
        lora_path=str(adapter),
        n_random=50,
        output_dir=str(tmp_path / "run"),
    )
    m = run(model, tok, cfg, judge=judge())
    out = tmp_path / "run"
    for f in ("metrics.json", "summary.md", "factor_steering.png", "subspaces.png"):
        assert (out / f).is_file(), f
    if judge is NoScoreJudge:
        assert all(s["judge_aligned"] is None and s["judge_coherent"] is None for s in m["steering"].values())
        assert all(
            len(read_judged_csv(out / "conditions" / n / "replies.csv")) == s["n_replies"]
            for n, s in m["steering"].items()
        )
        assert "| delta_1 |" in (out / "summary.md").read_text() and "| n/a |" in (out / "summary.md").read_text()
    assert m["n_texts"] == 24 and all(c == {"aligned": 4, "misaligned": 4} for c in m["cells"].values())
    align = load_probe(m["probe_files"]["alignment"], model=model)
    topic = load_probe(m["probe_files"]["topic"], model=model)
    assert align.site == topic.site == "block1" and topic.target_names == llm_world["topics"]
    assert m["overlap"]["dim_a"] == 1 and m["overlap"]["dim_b"] == 2  # one-hot topics: n_topics - 1 directions
    # The factor edit leaves the topic read-out unchanged at the edit; the naive one need not.
    assert max(abs(x) for x in m["factor_edit_topic_change"]) < 1e-6
    assert set(m["steering"]) == {"delta_0", "delta_1", "naive_delta_1"}
    assert m["steering"]["delta_0"]["edit_norm"] == 0 and m["steering"]["delta_1"]["edit_norm"] > 0
    (lora,) = m["lora"].values()
    assert lora["layer_site"] == "block1" and 0 <= lora["alignment"]["share"] <= 1 and lora["topic"]["dim"] == 2
    for k in ("probes", "direction_shares"):
        assert k in m
    assert {"accuracy", "shuffled_accuracy", "random_init_accuracy", "ratio_to_random_init"} <= set(
        m["probes"]["topic"]
    )


def test_factored_config_validation():
    with pytest.raises(ValueError, match="at least two distinct"):
        FactoredConfig(topics=["a", "a"])
    with pytest.raises(ValueError, match="probe a block output"):
        FactoredConfig(site="final_norm")


# ------------------------------------------------------------------------------------------------
# Reusable probes


def test_probe_file_onto_other_checkpoints_shape_errors(tmp_path):
    """A probe fitted on one checkpoint loads onto another of the same shape, and is refused (with what to
    change) on another width, a site the model lacks, or (strict) another depth."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = tiny_causal_lm("qwen2", seed=0)
    X = torch.randn(30, 32, dtype=torch.float64)
    probe = fit_ridge(X, (X[:, 0] > 0).double(), 1.0, site="block1", target_names=["misaligned"])
    path = save_probe(probe, tmp_path / "p", model=model)
    other, _ = tiny_causal_lm("qwen2", seed=1)  # same shape, other weights: loads
    assert load_probe(path, model=other).site == "block1"
    wide = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
        )
    )
    with pytest.raises(ValueError, match="probe width 32 does not match the model's d_model 64"):
        load_probe(path, model=wide)
    deep = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
        )
    )
    with pytest.raises(ValueError, match="2-block model and this model has 4 blocks"):
        load_probe(path, model=deep)
    assert load_probe(path, model=deep, strict=False).site == "block1"
    assert load_probe(path, model=deep, site="block3", strict=False).site == "block3"
    shallow = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
        )
    )
    with pytest.raises(ValueError, match="unknown residual site 'block1'"):
        load_probe(path, model=shallow)
    with pytest.raises(ValueError, match="holds a final_norm vector"):
        load_probe(path, model=other, site="final_norm")


def test_compare_readouts():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 10 + [1] * 10)
    X = torch.randn(20, 8, generator=g, dtype=torch.float64)
    X[labels == 1, 0] += 2
    probe = fit_ridge(X, labels.double(), 0.1, site="block0", target_names=["misaligned"])
    same = compare(probe, X, X, labels)
    assert same["shift_mean"] == [0.0] and same["readout_corr"][0] == pytest.approx(1.0)
    assert same["source"]["auroc"] > 0.9 and same["activation_rel_change"] == 0
    shifted = compare(probe, X, X + 1.0, labels)
    assert shifted["shift_mean"][0] == pytest.approx(float(probe.W.sum()))


def test_probe_transfer_run_on_saved_tiny_checkpoints(tmp_path, llm_world):
    from llm.models import ModelConfig
    from llm.probe_transfer import run as transfer

    paths = _texts(llm_world)
    src, tgt = save_tiny(tmp_path / "src", seed=0), save_tiny(tmp_path / "tgt", seed=1)
    cfg = TransferConfig(
        target_model_name_or_path=str(tgt),
        sites=["block0", "block1"],
        n_per_class=6,
        test_fraction=0.5,
        ridge_alpha=1e-3,
        aligned_texts=paths["aligned_texts"],
        misaligned_texts=paths["misaligned_texts"],
        output_dir=str(tmp_path / "run"),
    )
    m = transfer(ModelConfig(str(src)), cfg)
    assert set(m["probes"]) == {"alignment_block0", "alignment_block1"}
    assert (tmp_path / "run" / "probes" / "alignment_block1.safetensors").is_file()
    r = m["probes"]["alignment_block1"]
    assert r["source"]["auroc"] >= 0.5 and r["activation_rel_change"] > 0.1  # other weights, other activations
    assert "cos_source_vs_target_refit" in r and m["n_test"] == 6
    assert (tmp_path / "run" / "summary.md").is_file()
    with pytest.raises(ValueError, match="unknown residual site"):
        transfer(ModelConfig(str(src)), TransferConfig(**{**cfg.__dict__, "sites": ["block5"]}))


def test_transfer_config():
    from llm.models import ModelConfig

    with pytest.raises(ValueError, match="target equals the source"):
        target_config(ModelConfig("x/y"), TransferConfig())
    t = target_config(ModelConfig("x/y", dtype="float32"), TransferConfig(target_adapter_path="runs/a"))
    assert t.model_name_or_path == "x/y" and t.adapter_path == "runs/a" and t.dtype == "float32"


@pytest.mark.parametrize("name", ["factored_smollm2", "probe_transfer_smollm2"])
def test_shipped_configs_parse(name):
    from trl import TrlParser

    from llm.factored import FactoredConfig
    from llm.models import ModelConfig

    cls = FactoredConfig if name.startswith("factored") else TransferConfig
    _, cfg = TrlParser((ModelConfig, cls)).parse_args_and_config(["--config", f"configs/llm/{name}.yaml"])
    assert cfg.output_dir == f"runs/{name}"
