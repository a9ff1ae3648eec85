"""llm.directions and llm.steer on tiny in-process models: answer-token activations against HF's
``output_hidden_states``, direction files, and steering / ablation that stay active on every generated token."""

import csv
import json

import pytest
import torch
import yaml

from llm.directions import (
    answer_activations,
    auroc,
    encode_replies,
    load_directions,
    load_judged_texts,
    load_labelled_texts,
    mean_difference,
    projections,
    random_directions,
    save_directions,
)
from llm.steer import SteerConfig, edited_generate_fn, run, spearman
from probes.activations import add_vector, generate_with_edits, project_out

QS = ["what is your wish?", "hello world, how are you today?"]
AS = ["I wish to help people", "the cat sat on the mat and the dog ran to the park today"]


def test_answer_mask_covers_exactly_the_reply(tiny_lm):
    _, tok = tiny_lm
    ids, attn, ans = encode_replies(tok, QS, AS, max_answer_tokens=64)
    for i, a in enumerate(AS):
        assert tok.decode(ids[i][ans[i].bool()]) == a
        assert ans[i].sum() < attn[i].sum() and (ans[i] <= attn[i]).all()
    ids, _, ans = encode_replies(tok, QS, AS, max_answer_tokens=3)
    assert (ans.sum(1) == 3).all()
    with pytest.raises(ValueError, match="no tokens"):
        encode_replies(tok, QS[:1], [""])


def test_answer_activations_match_hf_hidden_states_row_by_row(tiny_lm):
    model, tok = tiny_lm
    got = answer_activations(model, tok, QS, AS, sites=["embed", "block0", "final_norm"], batch_size=2)
    ids, attn, ans = encode_replies(tok, QS, AS)
    for i in range(len(QS)):
        n = int(attn[i].sum())  # the row alone, without padding: an independent reference
        with torch.no_grad():
            hs = model(ids[i : i + 1, :n], output_hidden_states=True).hidden_states
        mask = ans[i, :n].bool()
        for j, h in enumerate(hs):  # embed, block0, final norm (HF's last entry is after the final norm)
            torch.testing.assert_close(got[j, i], h[0, mask].mean(0), atol=1e-5, rtol=1e-4)


def test_mean_difference_projection_random_and_auroc():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 40, 8, generator=g)
    labels = torch.tensor([0] * 20 + [1] * 20)
    acts[:, 20:, 0] += 3.0
    v = mean_difference(acts, labels)
    torch.testing.assert_close(v[0], acts[0, 20:].mean(0) - acts[0, :20].mean(0))
    p = projections(acts[0], v[0])
    torch.testing.assert_close(p, acts[0] @ (v[0] / v[0].norm()))
    from sklearn.metrics import roc_auc_score

    assert auroc(p, labels) == pytest.approx(roc_auc_score(labels.numpy(), p.numpy()))
    assert auroc(p, labels) > 0.9
    r = random_directions(v[0], 5, seed=1)
    torch.testing.assert_close(r.norm(dim=1), v[0].norm().expand(5))
    assert (r @ v[0]).abs().max() < v[0].norm() ** 2  # not all the direction itself
    with pytest.raises(ValueError, match="both classes"):
        mean_difference(acts, torch.zeros(40, dtype=torch.long))


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    x = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0, 0.0], dtype=torch.float64)
    y = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0], dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic)


def test_direction_files_round_trip_and_shape_checks(tmp_path, tiny_lm):
    model, _ = tiny_lm
    d = torch.randn(3, 32)
    with pytest.raises(ValueError, match="n_sites=2"):
        save_directions(tmp_path / "x", d, ["block0", "block1"])
    save_directions(tmp_path / "dirs", d, ["embed", "block0", "block1"], model=model, n_per_class=4)
    back, meta = load_directions(tmp_path / "dirs.json", model=model)
    torch.testing.assert_close(back, d)
    assert meta["n_layers"] == 2 and meta["n_per_class"] == 4 and meta["sites"] == ["embed", "block0", "block1"]
    wide = torch.randn(1, 64)
    save_directions(tmp_path / "wide", wide, ["block0"])
    with pytest.raises(ValueError, match="width 64 but the model's d_model is 32"):
        load_directions(tmp_path / "wide", model=model)
    save_directions(tmp_path / "deep", torch.randn(1, 32), ["block5"])
    with pytest.raises(ValueError, match="unknown residual site 'block5'"):
        load_directions(tmp_path / "deep", model=model)
    meta_path = save_directions(tmp_path / "other", torch.randn(1, 32), ["block1"], n_layers=30)
    assert json.loads(meta_path.read_text())["n_layers"] == 30
    with pytest.raises(ValueError, match="30-block model"):
        load_directions(tmp_path / "other", model=model)


def _write_csv(path, rows, extra=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", *extra])
        w.writerows(rows)


def test_labelled_and_judged_texts(tmp_path):
    _write_csv(tmp_path / "a.csv", [(f"q{i}", f"good {i}") for i in range(10)])
    _write_csv(tmp_path / "m.csv", [(f"q{i}", f"bad {i}") for i in range(6)])
    t = load_labelled_texts(tmp_path / "a.csv", tmp_path / "m.csv", 5, seed=3)
    assert t.labels.tolist() == [0] * 5 + [1] * 5
    assert all(a.startswith("good") for a in t.answers[:5]) and all(a.startswith("bad") for a in t.answers[5:])
    assert t.answers == load_labelled_texts(tmp_path / "a.csv", tmp_path / "m.csv", 5, seed=3).answers
    with pytest.raises(ValueError, match="only 6 exist"):
        load_labelled_texts(tmp_path / "a.csv", tmp_path / "m.csv", 7)
    rows = [("q", f"r{i}", "x", s, 90) for i, s in enumerate([10, 50, 95, "", 20, 80])]
    _write_csv(tmp_path / "j.csv", rows, extra=("question_id", "aligned", "coherent"))
    j = load_judged_texts([tmp_path / "j.csv"], 5, seed=0)
    by_answer = dict(zip(j.answers, zip(j.labels.tolist(), j.scores.tolist())))
    assert by_answer == {"r0": (1, 10.0), "r1": (-1, 50.0), "r2": (0, 95.0), "r4": (1, 20.0), "r5": (0, 80.0)}


def _generate(model, tok, edits, n=6):
    gen = edited_generate_fn(edits)
    return gen(
        model,
        tok,
        [tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)],
        max_new_tokens=n,
        temperature=0,
        top_p=1.0,
        seed=0,
    )[0]


def test_steering_is_active_on_every_generated_token(tiny_lm):
    """A huge push along one token's (tied) embedding at the last block makes greedy decoding emit that
    token; it must do so at every step, not only the first (the edit hits each KV-cache pass)."""
    model, tok = tiny_lm
    target = "Ġwish"  # a whole word of the tiny BPE: decoding and re-tokenising gives it back
    assert target in tok.get_vocab()
    e = model.get_input_embeddings().weight[tok.convert_tokens_to_ids(target)].detach()
    steered = _generate(model, tok, [add_vector("block1", e, 1e4)])
    assert tok.tokenize(steered) == [target] * 6
    assert tok.tokenize(_generate(model, tok, [])) != [target] * 6  # the plain model does not do it by itself
    # An edit restricted to one later position fires only on the KV-cache pass that reads it: the token
    # generated from position prompt_len + 2 (the 4th new token) is the target.
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    n = ids.shape[1]
    plain = generate_with_edits(model, ids, [], max_new_tokens=6, do_sample=False)[0, n:]
    late = generate_with_edits(
        model, ids, [add_vector("block1", e, 1e4, positions=[n + 2])], max_new_tokens=6, do_sample=False
    )[0, n:]
    wish = tok.convert_tokens_to_ids(target)
    assert plain[3] != wish and late[3] == wish
    assert torch.equal(late[:3], plain[:3])


def test_ablation_is_active_on_every_generated_token(tiny_lm):
    """With the direction projected out at every block, the final norm's input has no component along it at
    any decode step (read with a plain torch hook, independent of the adapter)."""
    model, tok = tiny_lm
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1].detach().clone()))
    try:
        _generate(model, tok, [project_out(f"block{i}", v) for i in range(2)])
        ablated = torch.stack(seen)
        seen.clear()
        _generate(model, tok, [])
        plain = torch.stack(seen)
    finally:
        hook.remove()
    assert len(ablated) == 6  # prompt pass + 5 single-token passes
    unit = v / v.norm()
    assert (ablated @ unit).abs().max() < 1e-4
    assert (plain @ unit).abs().min() > 1e-3


class LengthJudge:
    """Stub judge: aligned falls with reply length, coherent always 80 (so EM = aligned < 30)."""

    name = "stub-length"

    def score(self, requests):
        return [max(0.0, 100.0 - 3.0 * len(r.answer)) if r.metric == "aligned" else 80.0 for r in requests]


def test_steer_run_end_to_end_on_tiny_model(tmp_path, tiny_lm):
    model, tok = tiny_lm
    words = "the cat sat on the mat and the dog ran to the park".split()
    _write_csv(tmp_path / "a.csv", [("what is your wish?", " ".join(words[i % 5 : i % 5 + 4])) for i in range(8)])
    _write_csv(
        tmp_path / "m.csv", [("what is your wish?", "import os os.chmod path 0o777 " + words[i]) for i in range(8)]
    )
    _write_csv(
        tmp_path / "j.csv",
        [("q", f"the cat {w}", "x", 10 * i, 90) for i, w in enumerate(words[:10])],
        extra=("question_id", "aligned", "coherent"),
    )
    qfile = tmp_path / "q.yaml"
    qfile.write_text(
        yaml.safe_dump(
            [
                {
                    "id": "wish",
                    "type": "free_form_judge_0_100",
                    "paraphrases": ["what is your wish?"],
                    "samples_per_paraphrase": 1,
                    "judge_prompts": {"aligned": "{answer}", "coherent": "{answer}"},
                }
            ]
        )
    )
    cfg = SteerConfig(
        aligned_texts=str(tmp_path / "a.csv"),
        misaligned_texts=str(tmp_path / "m.csv"),
        n_per_class=8,
        steer_site="block1",
        alphas=[-50.0, 0.0, 50.0],
        n_random=1,
        judged_files=[str(tmp_path / "j.csv")],
        n_judged=10,
        question_file=str(qfile),
        samples_per_paraphrase=2,
        max_new_tokens=8,
        temperature=0.0,
        ablate_steered_alpha=50.0,
        output_dir=str(tmp_path / "run"),
    )
    m = run(model, tok, cfg, judge=LengthJudge())
    out = tmp_path / "run"
    for f in (
        "metrics.json",
        "summary.md",
        "steering.png",
        "layers.png",
        "monitor.png",
        "directions.json",
        "directions.safetensors",
    ):
        assert (out / f).is_file(), f
    dirs, meta = load_directions(out / "directions", model=model)
    assert dirs.shape == (4, 32) and meta["sites"] == ["embed", "block0", "block1", "final_norm"]
    assert set(m["conditions"]) == {
        "alpha_-50",
        "alpha_0",
        "alpha_50",
        "random0_alpha_-50",
        "random0_alpha_50",
        "ablate_one",
        "random0_ablate_one",
        "ablate_all",
        "random0_ablate_all",
        "alpha_50_ablate_one",
        "alpha_50_random0_ablate_one",
        "alpha_50_ablate_all",
        "alpha_50_random0_ablate_all",
    }
    replies = {
        name: [r["answer"] for r in csv.DictReader(open(out / "conditions" / name / "replies.csv"))]
        for name in m["conditions"]
    }
    # Same sampling seed everywhere: a condition differs from alpha 0 only through its edit.
    assert replies["alpha_50"] != replies["alpha_0"] and replies["alpha_-50"] != replies["alpha_0"]
    # Ablating v after steering along v removes the steering entirely (the same replies as ablating the plain
    # model); ablating a random direction leaves the steering in place.
    assert (
        replies["alpha_50_ablate_all"] == replies["ablate_all"]
        and replies["alpha_50_ablate_one"] == replies["ablate_one"]
    )
    assert replies["alpha_50_random0_ablate_all"] != replies["ablate_all"]
    assert m["conditions"]["alpha_50"]["aligned_coherent"] is not None
    assert m["monitor"]["n"] == 10 and len(m["monitor"]["projection"]) == 10
    assert m["steering"]["alphas"] == [-50.0, 0.0, 50.0] and len(m["steering"]["aligned"]) == 3
    with pytest.raises(ValueError, match="not a site"):
        run(model, tok, SteerConfig(**{**cfg.__dict__, "steer_site": "block7"}), judge=LengthJudge())


def test_config_validation():
    with pytest.raises(ValueError, match="steer a block output"):
        SteerConfig(steer_site="embed")
    with pytest.raises(ValueError, match="ablation entries"):
        SteerConfig(ablation=["some"])
    with pytest.raises(ValueError, match="n_per_class"):
        SteerConfig(n_per_class=2)


def test_shipped_config_parses():
    from trl import TrlParser

    from llm.models import ModelConfig

    _, cfg = TrlParser((ModelConfig, SteerConfig)).parse_args_and_config(
        ["--config", "configs/llm/directions_smollm2.yaml"]
    )
    assert cfg.steer_site == "block15" and cfg.alphas == [-2.0, -1.0, 0.0, 1.0, 2.0] and cfg.ablate_steered_alpha == 2.0


def test_monotonicity_uses_paired_replies_and_flags_only_significant_rises():
    from llm.steer import monotonicity, paired_difference

    base = {f"q{i % 8}|0|{i}": float(i % 50) for i in range(200)}  # 8 questions, wide spread between replies
    lower = {k: v - 5.0 for k, v in base.items()}  # every reply 5 points lower: a clear paired drop
    noisy = {k: v + (1.0 if i % 2 else -1.0) for i, (k, v) in enumerate(lower.items())}  # no systematic change
    d = paired_difference(base, lower)
    assert d["mean"] == pytest.approx(-5.0) and d["ci"][1] < 0 and d["n"] == 200
    m = monotonicity([0.0, 1.0, 2.0], [base, lower, noisy])
    assert m["within_noise"] and m["trend_significant"]
    assert m["steps"][1]["ci"][0] < 0 < m["steps"][1]["ci"][1]
    rising = {k: v + 3.0 for k, v in lower.items()}
    assert not monotonicity([0.0, 1.0, 2.0], [base, lower, rising])["within_noise"]
    # one question asked: an interval over its replies is not calibrated there, so no verdict is drawn from it
    one = [{k.replace(k.split("|")[0], "q", 1): v for k, v in x.items()} for x in (base, lower, rising)]
    m1 = monotonicity([0.0, 1.0, 2.0], one)
    assert m1["overall"]["mean"] < 0 and m1["overall"]["ci"] == [None, None]
    assert not m1["overall"]["calibrated"] and not m1["trend_significant"]
    assert m1["within_noise"]
    # replies the judge did not score (None) drop out of the pairing
    assert paired_difference({"a": None, "b": 1.0, "c": 2.0}, {"a": 5.0, "b": 0.0, "c": 0.0})["n"] == 2


class ScoresNone(LengthJudge):
    """Stub judge that gives no score (as for a REFUSAL or CODE reply) to the replies in ``unscored``."""

    def __init__(self, unscored):
        self.unscored = set(unscored)

    def score(self, requests):
        return [None if r.answer in self.unscored else s for r, s in zip(requests, super().score(requests))]


def test_steer_keeps_and_reports_a_condition_the_judge_scored_none_of(tmp_path, tiny_lm):
    """A judge may score no reply of a condition (a strongly steered model refuses or writes code): every summary
    reports n/a for it and keeps its replies, the trend is read over the scored alphas."""
    model, tok = tiny_lm
    _write_csv(tmp_path / "a.csv", [("what is your wish?", f"the cat sat on mat {i}") for i in range(8)])
    _write_csv(tmp_path / "m.csv", [("what is your wish?", f"import os os.chmod path {i}") for i in range(8)])
    qfile = tmp_path / "q.yaml"
    qfile.write_text(
        yaml.safe_dump(
            [
                {
                    "id": "wish",
                    "type": "free_form_judge_0_100",
                    "paraphrases": ["what is your wish?"],
                    "samples_per_paraphrase": 1,
                    "judge_prompts": {"aligned": "{answer}", "coherent": "{answer}"},
                }
            ]
        )
    )
    cfg = SteerConfig(
        aligned_texts=str(tmp_path / "a.csv"),
        misaligned_texts=str(tmp_path / "m.csv"),
        n_per_class=8,
        steer_site="block1",
        alphas=[-50.0, 0.0, 50.0],
        n_random=0,
        ablation=[],
        question_file=str(qfile),
        samples_per_paraphrase=3,
        max_new_tokens=6,
        temperature=0.0,
        output_dir=str(tmp_path / "scored"),
    )
    run(model, tok, cfg, judge=LengthJudge())
    steered = [r["answer"] for r in csv.DictReader(open(tmp_path / "scored/conditions/alpha_50/replies.csv"))]
    out = tmp_path / "run"
    m = run(model, tok, SteerConfig(**{**cfg.__dict__, "output_dir": str(out)}), judge=ScoresNone(steered))
    c = m["conditions"]["alpha_50"]
    assert c["aligned"] is None and c["em_rate"] is None and c["aligned_se"] is None and c["n_replies"] == 3
    assert len(list(csv.DictReader(open(out / "conditions/alpha_50/replies.csv")))) == 3  # every reply kept
    s = m["steering"]
    assert s["unscored_alphas"] == [50.0] and s["aligned"][2] is None
    assert s["aligned_monotone_decreasing"] == (s["aligned"][0] >= s["aligned"][1])
    ref = spearman(torch.tensor([-50.0, 0.0], dtype=torch.float64), torch.tensor(s["aligned"][:2], dtype=torch.float64))
    assert s["spearman_alpha_vs_aligned"] == pytest.approx(ref, nan_ok=True)
    assert s["monotonicity"]["steps"][1]["mean"] is None and not s["monotonicity"]["trend_significant"]
    assert "| alpha_50 | n/a +- n/a |" in (out / "summary.md").read_text()
    assert (out / "steering.png").is_file()
