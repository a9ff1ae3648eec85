"""Probe files: round trip, the file format, and every compatibility error."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from probes.activations import residual_stream
from probes.io import check_compatible, load_probe, save_probe, tensor_sha256
from probes.linear import LinearProbe, fit_ridge


def gpt2(n_layer=2, n_embd=16):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=5, n_positions=16)
    config._name_or_path = f"tiny-gpt2-{n_layer}x{n_embd}"
    return GPT2LMHeadModel(config).eval()


def fitted_probe(model, site="block1"):
    ids = torch.randint(0, 5, (8, 6), generator=torch.Generator().manual_seed(0))
    X = residual_stream(model, ids, sites=[site])[0].flatten(0, 1)
    Y = torch.stack([X[:, 0] - X[:, 1], X[:, 2]], dim=1)
    return fit_ridge(X, Y, alpha=0.1, site=site, target_names=["x0-x1", "x2"], metrics={"test": {"mse": 0.5}}), X


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = gpt2()
    probe, X = fitted_probe(model)
    meta_path = save_probe(probe, tmp_path / "probes" / "diff", model=model)
    assert sorted(p.name for p in (tmp_path / "probes").iterdir()) == ["diff.json", "diff.safetensors"]
    meta = json.loads(meta_path.read_text())
    assert meta == {
        "format": "belief-rl-probe",
        "version": 1,
        "site": "block1",
        "site_kind": "resid_post",
        "layer": 2,
        "d_model": 16,
        "n_layers": 2,
        "source": "tiny-gpt2-2x16",
        "target_names": ["x0-x1", "x2"],
        "alpha": 0.1,
        "rank": None,
        "metrics": {"test": {"mse": 0.5}},
        "sha256": tensor_sha256({"W": probe.W, "b": probe.b}),
    }
    assert set(load_file(str(tmp_path / "probes" / "diff.safetensors"))) == {"W", "b"}

    for path in (tmp_path / "probes" / "diff", meta_path, tmp_path / "probes" / "diff.safetensors"):
        loaded = load_probe(path, model=model)
        assert torch.equal(loaded.W, probe.W) and torch.equal(loaded.b, probe.b)
        assert (loaded.site, loaded.source, loaded.n_layers, loaded.target_names) == (
            "block1",
            "tiny-gpt2-2x16",
            2,
            ["x0-x1", "x2"],
        )
        torch.testing.assert_close(loaded.predict(X), probe.predict(X))


def test_compatibility_errors_say_what_to_change(tmp_path):
    model = gpt2()
    probe, _ = fitted_probe(model)
    save_probe(probe, tmp_path / "p", model=model)

    with pytest.raises(ValueError, match=r"width 16 does not match the model's d_model 32.*d_model=16"):
        load_probe(tmp_path / "p", model=gpt2(n_embd=32))
    with pytest.raises(ValueError, match=r"unknown residual site 'block1' for a model with 1 blocks.*site="):
        load_probe(tmp_path / "p", model=gpt2(n_layer=1))
    with pytest.raises(ValueError, match="resid_post vector, but site 'final_norm' holds a final_norm"):
        load_probe(tmp_path / "p", model=model, site="final_norm")
    deeper = gpt2(n_layer=4)
    with pytest.raises(ValueError, match="2-block model and this model has 4 blocks.*strict=False"):
        load_probe(tmp_path / "p", model=deeper)
    assert load_probe(tmp_path / "p", model=deeper, strict=False).site == "block1"
    assert load_probe(tmp_path / "p", model=deeper, site="block3", strict=False).site == "block3"
    # an explicit site is the caller choosing the matching block: accepted under strict too
    assert load_probe(tmp_path / "p", model=deeper, site="block3").site == "block3"
    # A different architecture of the same width and depth is fine: the probe reads a d_model vector.
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=5,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    assert check_compatible(load_probe(tmp_path / "p"), llama) == "block1"

    with pytest.raises(FileNotFoundError, match="missing"):
        load_probe(tmp_path / "absent")
    with pytest.raises(ValueError, match="site"):
        save_probe(LinearProbe(torch.zeros(16, 1), torch.zeros(1)), tmp_path / "q", model=model)
    with pytest.raises(ValueError, match="n_layers is unknown"):
        save_probe(LinearProbe(torch.zeros(16, 1), torch.zeros(1), site="embed"), tmp_path / "q")
    with pytest.raises(ValueError, match="d_model 32"):
        save_probe(probe, tmp_path / "q", model=gpt2(n_embd=32))
    with pytest.raises(TypeError, match="JSON serializable"):
        save_probe(
            LinearProbe(torch.zeros(16, 1), torch.zeros(1), site="embed", n_layers=2, metrics={"bad": torch.ones(1)}),
            tmp_path / "q",
        )
    assert not (tmp_path / "q.safetensors").exists()  # nothing half-written

    meta = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_probe(tmp_path / "p")


def test_damaged_probe_files_are_refused_naming_the_file(tmp_path):
    """Flipped bytes in the weights, a truncated file, a broken or incomplete JSON, and tensors that disagree
    with the metadata each give an error naming the file, never a probe with NaN in it."""
    model = gpt2()
    probe, _ = fitted_probe(model)
    save_probe(probe, tmp_path / "p", model=model)
    weights, meta = tmp_path / "p.safetensors", tmp_path / "p.json"
    good_w, good_m = weights.read_bytes(), meta.read_text()

    weights.write_bytes(good_w[:-4] + b"\xff\xff\xff\xff")  # the last float becomes NaN
    with pytest.raises(ValueError, match=r"p\.safetensors: 1 non-finite .*save_probe"):
        load_probe(tmp_path / "p")
    weights.write_bytes(good_w[:-7])  # truncated
    with pytest.raises(ValueError, match=r"p\.safetensors cannot be read as safetensors"):
        load_probe(tmp_path / "p")
    weights.write_bytes(good_w)

    meta.write_text(good_m[:-20])
    with pytest.raises(ValueError, match=r"p\.json is not valid JSON"):
        load_probe(tmp_path / "p")
    m = json.loads(good_m)
    for broken, pattern in [
        ({k: v for k, v in m.items() if k != "d_model"}, r"lacks the field\(s\) \['d_model'\]"),
        ({**m, "d_model": "16"}, r"wrong type: d_model='16'"),
        ({**m, "d_model": 8}, r"W \(16, 2\) and b \(2,\).*d_model=8"),
        ({**m, "target_names": ["one"]}, "names 1 targets but W has 2 columns"),
        ({**m, "site": "layer1"}, r"p\.json: unknown residual site 'layer1'"),
    ]:
        meta.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=pattern):
            load_probe(tmp_path / "p")
    meta.write_text(good_m)
    from safetensors.torch import save_file

    save_file({"W": probe.W, "b": probe.b[:1]}, str(weights))
    with pytest.raises(ValueError, match=r"b \(1,\)"):
        load_probe(tmp_path / "p")


def test_a_flipped_bit_in_the_weights_is_refused_and_an_old_file_without_a_checksum_loads_with_a_warning(
    tmp_path, caplog
):
    """A bit flipped in the tensor data (still a finite float) loaded as a slightly different probe. Now the JSON holds
    a sha256 of the tensors, checked on load; files written before it still load, with a warning naming them."""
    import hashlib

    model = gpt2()
    probe, _ = fitted_probe(model)
    save_probe(probe, tmp_path / "p", model=model)
    weights, meta = tmp_path / "p.safetensors", tmp_path / "p.json"
    good = weights.read_bytes()
    W = probe.W.detach().contiguous()
    # flip the lowest mantissa bit of W[0, 0] inside the file (safetensors stores the raw little-endian bytes)
    at = good.index(W.reshape(-1)[:1].view(torch.uint8).numpy().tobytes())
    weights.write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1 :])
    flipped = load_file(str(weights))["W"]
    assert torch.isfinite(flipped).all() and not torch.equal(flipped, W)
    with pytest.raises(ValueError, match=r"p\.safetensors: the tensors do not match the sha256 in .*p\.json"):
        load_probe(tmp_path / "p")
    weights.write_bytes(good)
    m = json.loads(meta.read_text())
    assert (
        m["sha256"]
        == hashlib.sha256(
            b"W|torch.float64|(16, 2)|"
            + W.view(torch.uint8).numpy().tobytes()
            + b"b|torch.float64|(2,)|"
            + probe.b.detach().view(torch.uint8).numpy().tobytes()
        ).hexdigest()
    )
    meta.write_text(json.dumps({k: v for k, v in m.items() if k != "sha256"}))
    with caplog.at_level("WARNING"):
        old = load_probe(tmp_path / "p")
    assert torch.equal(old.W, probe.W) and "has no sha256 of its tensors" in caplog.text and "p.json" in caplog.text
