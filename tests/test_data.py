"""Sampling: exact token statistics, determinism, state path vs belief path, float32 option, and the
Hugging Face / streaming views with their resume contract."""

import pytest
import scipy.stats
import torch
from torch.utils.data import DataLoader

from toy.beliefs import belief_states, enumerate_sequences
from toy.data import sample
from toy.datasets import SequenceStream, seed_for_step, to_hf_dataset
from toy.factors import factor_marginals, factor_tokens
from toy.processes import capability_tag, mess3, product, rare_factor, rrxor


def chi2_pvalue(process, tokens: torch.Tensor) -> float:
    """Pearson chi-squared p-value of the counts of whole sequences against their exact probabilities."""
    length = tokens.shape[1]
    toks, probs = enumerate_sequences(process, length)
    V = process.vocab_size
    powers = V ** torch.arange(length - 1, -1, -1)
    counts = torch.bincount((tokens * powers).sum(1), minlength=V**length).double()
    observed = counts[(toks * powers).sum(1)]
    assert observed.sum() == len(tokens), "sampled a sequence of probability zero"
    expected = probs * len(tokens)
    return float(scipy.stats.chi2.sf(((observed - expected) ** 2 / expected).sum().item(), len(probs) - 1))


@pytest.mark.parametrize("process", [mess3(), mess3(0.15, 0.6), rrxor(), capability_tag(rrxor(), 0.2, 0.1)])
@pytest.mark.parametrize("mode", ["beliefs64", "beliefs32", "states"])
def test_sampled_sequences_follow_exact_probabilities(process, mode):
    """Fixed seeds; a correct sampler fails this with probability 1e-4 per case, a wrong one (a token
    distribution off by 1% on 50,000 draws of ~81 cells) fails it surely."""
    kw = {"beliefs64": {}, "beliefs32": {"belief_dtype": torch.float32}, "states": {"return_states": True}}[mode]
    tokens = sample(process, 50_000, 4 if process.vocab_size <= 3 else 2, seed=11, **kw).tokens
    assert chi2_pvalue(process, tokens) > 1e-4


def test_chi2_check_detects_a_wrong_distribution():
    tokens = sample(mess3(0.15, 0.6), 50_000, 4, seed=11).tokens
    assert chi2_pvalue(mess3(), tokens) < 1e-10  # the same draw judged against the other Mess3


def test_same_seed_identical_different_seed_differs():
    a = sample(mess3(), 64, 32, seed=5, return_beliefs=True)
    b = sample(mess3(), 64, 32, seed=5, return_beliefs=True)
    # tokens are bit-identical; beliefs are the same numbers up to the last bit (CPU kernels round a
    # reduction differently depending on buffer alignment: measured differences <= 9e-16)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.beliefs, b.beliefs, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(sample(mess3(), 64, 32, generator=g).tokens, a.tokens)
    assert not torch.equal(sample(mess3(), 64, 32, seed=6).tokens, a.tokens)
    s1 = sample(rrxor(), 64, 32, seed=5, return_states=True)
    assert torch.equal(s1.states, sample(rrxor(), 64, 32, seed=5, return_states=True).states)


def test_returned_beliefs_are_the_exact_filter_and_states_are_consistent():
    p = capability_tag(mess3())
    for dtype, tol in [(torch.float64, 1e-13), (torch.float32, 1e-5)]:
        b = sample(p, 128, 40, seed=1, return_beliefs=True, belief_dtype=dtype)
        assert b.beliefs.dtype == dtype and b.beliefs.shape == (128, 40, p.n_states)
        assert (b.beliefs.double() - belief_states(p, b.tokens)).abs().max() < tol
    s = sample(rrxor(), 128, 40, seed=1, return_states=True, return_beliefs=True)
    assert s.states.shape == (128, 41)
    # every sampled (state, token, next state) step has positive probability under T
    assert (rrxor().T[s.tokens, s.states[:, :-1], s.states[:, 1:]] > 0).all()
    # the belief puts positive mass on the true state
    assert (s.beliefs.gather(2, s.states[:, 1:, None]) > 0).all()


def test_sample_rejects_bad_arguments():
    with pytest.raises(ValueError, match=">= 1"):
        sample(mess3(), 0, 10)
    with pytest.raises(ValueError, match="either generator or seed"):
        sample(mess3(), 2, 10, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="belief_dtype"):
        sample(mess3(), 2, 10, belief_dtype=torch.float16)
    with pytest.raises(ValueError, match="integers"):
        sample(mess3(), 2.5, 10)


# ----------------------------------------------------------------------------- datasets / streams


def test_stream_is_a_pure_function_of_seed_and_step_and_resumes_exactly():
    stream = SequenceStream(mess3(), 16, 12, seed=3)
    it = iter(stream)
    first = [next(it)["input_ids"] for _ in range(5)]
    resumed = iter(SequenceStream(mess3(), 16, 12, seed=3, start_step=3))
    assert torch.equal(next(resumed)["input_ids"], first[3]) and torch.equal(next(resumed)["input_ids"], first[4])
    assert torch.equal(stream.batch(2)["input_ids"], first[2])
    assert torch.equal(first[0], sample(mess3(), 16, 12, seed=seed_for_step(3, 0), belief_dtype=torch.float32).tokens)
    assert not torch.equal(first[0], first[1])
    assert seed_for_step(0, 1) != seed_for_step(1, 0)


def test_stream_under_dataloader_workers_keeps_step_order():
    stream = SequenceStream(rrxor(), 8, 6, seed=1, start_step=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [b["input_ids"] for _, b in zip(range(4), loader)]
    for k, g in enumerate(got):
        assert torch.equal(g, stream.batch(2 + k)["input_ids"])


def test_stream_factor_columns():
    p = product(mess3(), rrxor())
    b = SequenceStream(p, 8, 10, seed=0, beliefs=True, factor_ids=True, factor_beliefs=True).batch(0)
    assert torch.equal(b["factor_ids"], factor_tokens(p, b["input_ids"]))
    for k, m in enumerate(factor_marginals(p, b["beliefs"])):
        assert torch.equal(b[f"factor{k}_beliefs"], m)
    with pytest.raises(ValueError, match="not a factored process"):
        SequenceStream(mess3(), 8, 10, factor_ids=True)


def test_hf_dataset_columns_match_the_stream():
    p = rare_factor(mess3(), rrxor(), 0)
    ds = to_hf_dataset(p, 50, 8, seed=4, beliefs=True, factor_ids=True, factor_beliefs=True, batch_size=32)
    assert len(ds) == 50
    assert set(ds.column_names) == {"input_ids", "beliefs", "factor_ids", "factor0_beliefs", "factor1_beliefs"}
    rows = ds.with_format("torch")[:]
    stream = SequenceStream(p, 32, 8, seed=4, beliefs=True, factor_ids=True, factor_beliefs=True)
    ref = {k: torch.cat([stream.batch(0)[k], stream.batch(1)[k]])[:50] for k in rows}
    for k in rows:
        assert torch.equal(rows[k], ref[k]), k
    assert rows["beliefs"].dtype == torch.float32 and rows["input_ids"].dtype == torch.int64
    plain = to_hf_dataset(mess3(), 10, 5)
    assert plain.column_names == ["input_ids"]
