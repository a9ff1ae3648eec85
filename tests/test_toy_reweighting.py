"""toy.reweighting (exact pass@k reweighting report of one-token policies) and toy.experiments.reweighting's CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from probes.passk import PassKConfig, pass_at_k
from toy.experiments.reweighting import main
from toy.model import ToyModelConfig, build_model
from toy.reweighting import (
    ExactReweightingConfig,
    agreement,
    behaviour_report,
    decode,
    nucleus,
    success_probability,
    with_temperature,
)

CFG = ExactReweightingConfig(n_boot=50)
ROOT = Path(__file__).resolve().parents[1]


def _random_policy(n: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).softmax(-1)


def _naive_nucleus(row: list[float], top_p: float) -> set[int]:
    """Independent reference: add answers in order of probability until their mass reaches top_p."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += row[i]
    return kept


def test_exact_pass_at_k_matches_brute_force_sampling_full_and_truncated():
    N, V, n = 40, 5, 4000
    pi = _random_policy(N, V, 0)
    g = torch.Generator().manual_seed(1)
    table = torch.nn.functional.one_hot(torch.randint(0, V, (N,), generator=g), V).double()
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.8)):
        q = decode(pi, temperature, top_p)
        for i in range(N):  # the truncated support is the naive nucleus of the tempered policy
            tempered = (pi[i] ** (1 / temperature)) / (pi[i] ** (1 / temperature)).sum()
            assert set(q[i].nonzero().flatten().tolist()) == _naive_nucleus(tempered.tolist(), top_p)
        draws = torch.multinomial(q, n, replacement=True, generator=g)  # (N, n) sampled answers
        correct = table.gather(1, draws).sum(1).long()
        p = success_probability(q, table)
        for k in (1, 4, 32):
            exact = float((1 - (1 - p) ** k).mean())
            sampled = float(pass_at_k(n, correct, k).mean())
            assert sampled == pytest.approx(exact, abs=0.02), (temperature, top_p, k)


def test_sharpened_reference_is_reweighting_under_truncated_support():
    N, V = 2000, 6
    pi_ref = _random_policy(N, V, 2, scale=1.5)
    answer = pi_ref.argmax(1)
    wrong = torch.rand(N, generator=torch.Generator().manual_seed(3)) < 0.3  # the reference's top answer is right 70%
    answer = torch.where(wrong, (answer + 1) % V, answer)
    table = torch.nn.functional.one_hot(answer, V).double()
    sharp = with_temperature(pi_ref, 0.5)
    assert (nucleus(sharp, 0.95) <= nucleus(pi_ref, 0.95)).all()  # sharpening keeps the support within the reference's
    r = behaviour_report(pi_ref, sharp, table, CFG)
    assert r["full"]["gain_k1"] > PassKConfig().min_gain_k1
    assert r["truncated"]["verdict"] == "not sharper at k=256", r["truncated"]["why"]
    assert r["truncated"]["outside_support_share"] == 0.0 and r["truncated"]["outside_support"].startswith(
        "not outside"
    )
    assert r["truncated"]["only_post"] < 1e-12 and r["post_decoded_mass_outside_ref_support"] == 0.0
    assert r["full"]["verdict"] == "uninformative"  # one-token answers are guessable: chance solves all at k = 256
    assert (
        r["kl_post_ref"] > 0 and r["loglik_post_under_ref"] > r["loglik_ref_under_ref"]
    )  # sharper: more likely under ref


def test_mass_outside_the_reference_support_is_outside_support():
    N, V = 2000, 6
    pi_ref = torch.tensor([0.5, 0.3, 0.17, 0.01, 0.01, 0.01], dtype=torch.float64).expand(N, V).clone()
    answer = torch.where(torch.arange(N) % 2 == 0, 0, 4)  # half the prompts want an answer outside the top-0.95 nucleus
    table = torch.nn.functional.one_hot(answer, V).double()
    post = pi_ref * table
    post = post / post.sum(1, keepdim=True)  # the exact optimum: pi_ref restricted to the right answer
    r = behaviour_report(pi_ref, post, table, CFG)
    t = r["truncated"]
    assert t["ref_unsolvable"] == pytest.approx(0.5) and t["post_success_where_ref_unsolvable"] == pytest.approx(1.0)
    assert t["verdict"] == "sharper at k=256" and t["only_post"] == pytest.approx(0.5)
    # exact: the answer the post-RL policy gives on half the prompts is outside the truncated reference's nucleus
    assert (
        t["outside_support_share"] == pytest.approx(0.5)
        and t["outside_support"] == "outside the reference's support at K=1e5 (exact)"
    )
    assert r["post_mass_outside_ref_support"] == pytest.approx(0.5)
    assert r["full"]["verdict"] == "uninformative" and r["full"]["chance_k_max"] > 0.99
    assert r["kl_post_ref"] == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.01)), rel=1e-9)
    same = behaviour_report(pi_ref, pi_ref, table, CFG)
    assert same["full"]["verdict"] == same["truncated"]["verdict"] == "inconclusive" and same["kl_post_ref"] == 0.0
    assert (
        agreement("outside the reference's support at K=1e5", "composition beyond rung 1 (reweighting within rung 2)")
        == "yes"
    )
    assert (
        agreement("not sharper at k=256", "composition beyond rung 2") == "no"
        and agreement("uninformative", "reweighting within rung 1") == "n/a"
    )
    # "sharper" takes no side: a same-support reweighting passes it
    assert agreement("sharper at k=256", "reweighting within rung 1") == "n/a"


def test_cli_on_a_tiny_random_init_model(tmp_path):
    V = 6  # mess3 x rrxor
    pre = build_model(ToyModelConfig(preset="mess3_small"), V + 2, 12, seed=0)
    pre.save_pretrained(tmp_path / "pre")
    post = build_model(ToyModelConfig(preset="mess3_small"), V + 2, 12, seed=0)
    with torch.no_grad():
        post.lm_head.weight[0] += 3 * post.transformer.ln_f.weight  # a different policy, mass moved onto answer 0
    post.save_pretrained(tmp_path / "runs" / "seed0" / "model")
    args = [
        "--process",
        "product",
        "--process_kwargs",
        json.dumps({"factors": [{"name": "mess3"}, {"name": "rrxor"}]}),
        "--reward",
        "compose",
        "--output_tokens",
        "0",
        "1",
        "--prompt_length",
        "6",
        "--n_eval_prompts",
        "300",
        "--pretrained_path",
        str(tmp_path / "pre"),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--seeds",
        "0",
        "1",
        "--thresholds",
        str(ROOT / "configs/toy/detector_thresholds.yaml"),
        "--n_boot",
        "20",
        "--use_cpu",
        "true",
        "--output_dir",
        str(tmp_path / "unused"),
    ]
    result = main(args)
    out = tmp_path / "runs" / "passk"
    saved = json.loads((out / "report.json").read_text())
    assert saved["skipped"] == [1] and [s["seed"] for s in saved["seeds"]] == [0]
    rep = saved["seeds"][0]["report"]
    assert rep["n_prompts"] == 300 and rep["reward_is_binary"] and rep["kl_post_ref"] > 0
    assert len(rep["full"]["curves"]["post-RL"]["mean"]) == len(PassKConfig().ks)
    assert 0 <= rep["readability"]["balanced_accuracy"]["pre_output_site"] <= 1
    names = [c["name"] for c in result["controls"]]
    assert names[:3] == ["sharpened", "reference", "reweight_rung1"] and names[-1] == "optimum"
    ref_row = result["controls"][1]["behaviour"]
    assert ref_row["full"]["verdict"] == "inconclusive" and ref_row["kl_post_ref"] == 0.0
    assert (out / "passk_seed0.png").is_file() and (out / "passk_control_optimum.png").is_file()
    assert "Agreement table" in (out / "report.md").read_text()


def test_calibration_key_rows():
    """The confusion table's key rows at the add report's counts (48 prompts x 16 replies), on an LLM-shaped
    reference and on family (b)'s exact truncated reference: the KL-regularised optimum pi_ref e^(beta r) / Z is called
    "sharper" yet never "outside the reference's support"; a capability the reference gives probability 0 is found in
    every run; no prompt is ever flagged that is not truly outside."""
    from probes.passk import PassKConfig
    from toy.experiments.passk_calibration import toy_reference
    from toy.passk_calibration import confusion, controls, llm_like

    pk = PassKConfig(n_boot=200)
    pi, correct = llm_like(512, 1e-3, 0.6)
    ctl = controls(pi, correct, formats=4)
    rw = confusion(ctl["reweight beta=10"], 48, 16, [1, 2, 4, 8, 16], 16, pk, runs=8)
    assert rw["sharper"] >= 0.9 and rw["outside"] == 0 and rw["truly_outside"] == 0 and rw["false_flags"] == 0
    same = confusion(ctl["identical"], 48, 16, [1, 2, 4, 8, 16], 16, pk, runs=8)
    assert same["sharper"] == same["outside"] == 0
    new = confusion(ctl["new capability q=0.3"], 48, 16, [1, 2, 4, 8, 16], 16, pk, runs=8)
    assert new["truly_outside"] == new["outside"] == 1.0 and new["false_flags"] == 0 and new["prompt_recall"] > 0.9
    ref_t, full, ok = toy_reference(str(ROOT / "configs/toy/rl_compose.yaml"), 512, 0.95)
    b = controls(ref_t, ok, full=full)
    opt = confusion(b["latent optimum"], 48, 16, [1, 2, 4, 8, 16], 16, pk, runs=8)
    assert opt["outside"] == opt["truly_outside"] > 0 and opt["false_flags"] == 0  # found in every run that holds one
    assert confusion(b["reweight beta=10"], 48, 16, [1, 2, 4, 8, 16], 16, pk, runs=8)["outside"] == 0
