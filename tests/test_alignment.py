"""toy.alignment: the shared/per-slice knob, checked against a naive event-by-event construction; the
subset world (capability subsets x one tag) against closed forms and sampled counts."""

import itertools
import math

import pytest
import torch

from toy.alignment import (
    force_copies,
    knob_measures,
    misaligned_by_token,
    pairwise_tag_mi,
    persona_world,
    slice_of_tokens,
    subset_measures,
    subset_slices,
    subset_tag_mass,
    subset_tag_probs,
    subset_world,
    tag_kernel,
)
from toy.beliefs import belief_states
from toy.data import sample
from toy.processes import mess3


def naive_kernel(K, c, s):
    """Tag step by enumerating the events: a common refresh (prob c r) or per-slice refreshes (prob q each)."""
    r = 2 * s
    q = r * (1 - c) / (1 - c * r)
    states = list(itertools.product((0, 1), repeat=K))
    R = torch.zeros(2**K, 2**K, dtype=torch.float64)
    for ai, a in enumerate(states):
        for coin in (0, 1):  # common refresh to a fresh coin
            R[ai, states.index((coin,) * K)] += c * r * 0.5
        for refresh in itertools.product((0, 1), repeat=K):
            p_ev = math.prod(q if f else 1 - q for f in refresh)
            for new in itertools.product((0, 1), repeat=sum(refresh)):
                it = iter(new)
                b = tuple(next(it) if f else a[k] for k, f in enumerate(refresh))
                R[ai, states.index(b)] += (1 - c * r) * p_ev * 0.5 ** sum(refresh)
    return R


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_kernel_matches_naive_events_and_is_stochastic(c):
    R = tag_kernel(3, c, 0.1)
    torch.testing.assert_close(R, naive_kernel(3, c, 0.1))
    torch.testing.assert_close(R.sum(1), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("c", [0.0, 0.5, 1.0])
def test_each_slice_flips_with_switch_prob_whatever_the_coupling(c):
    """The knob changes only the dependence: one slice's tag alone is the same chain at every coupling."""
    p = persona_world(mess3(), coupling=c, switch_prob=0.07)
    R = tag_kernel(3, c, 0.07)
    pi = p.stationary.reshape(8, 3).sum(1)
    for k in range(3):
        bit = (torch.arange(8) >> (2 - k)) & 1
        flip = (pi[:, None] * R * (bit[:, None] != bit[None, :])).sum()
        assert float(flip) == pytest.approx(0.07, abs=1e-12)


def test_mutual_information_spans_shared_to_independent():
    cap = mess3()
    assert pairwise_tag_mi(persona_world(cap, coupling=1.0)) == pytest.approx(math.log(2), abs=1e-9)
    assert pairwise_tag_mi(persona_world(cap, coupling=0.0)) == pytest.approx(0.0, abs=1e-12)
    mid = pairwise_tag_mi(persona_world(cap, coupling=0.5))
    assert 0.01 < mid < 0.6


def test_beliefs_match_a_naive_filter():
    cap, slices, c, s, noise = mess3(0.1, 0.7), [0, 1, 1], 0.6, 0.1, 0.15
    p = persona_world(cap, slices, c, s, noise)
    tokens = sample(p, 4, 6, seed=3).tokens
    got = belief_states(p, tokens)
    R, V, S = naive_kernel(2, c, s), cap.vocab_size, cap.n_states
    states = list(itertools.product((0, 1), repeat=2))
    for n in range(4):
        b = p.stationary.reshape(4, S).clone()
        for t in range(6):
            copy, x = divmod(int(tokens[n, t]), V)
            new = torch.zeros(4, S, dtype=torch.float64)
            for ai in range(4):
                for i in range(S):
                    for bi, tags in enumerate(states):
                        show = 1 - noise if tags[slices[x]] == copy else noise
                        new[bi] += b[ai, i] * R[ai, bi] * show * cap.T[x, i]
            b = new / new.sum()
            torch.testing.assert_close(got[n, t], b.reshape(-1))


def test_knob_ends_measure_shared_and_per_slice():
    cap = mess3()
    shared = knob_measures(persona_world(cap, coupling=1.0), n_windows=200, length=8)
    per_slice = knob_measures(persona_world(cap, coupling=0.0), n_windows=200, length=8)
    # the alignment factor always splits off the capability (the likelihood factorizes)
    assert shared["tags_x_capability_residual"] < 1e-20 and per_slice["tags_x_capability_residual"] < 1e-20
    # shared: one alignment direction, the copy predicted the same for every capability token
    assert shared["alignment_dims"]["0.99"] == 1 and shared["predictive_residual"] < 1e-20
    assert shared["slice0_x_rest_residual"] > 1e-3
    # per slice: the slices' tag beliefs are a product, three alignment directions, the copy depends on the token
    assert per_slice["alignment_dims"]["0.95"] == 3 and per_slice["slice0_x_rest_residual"] < 1e-20
    assert per_slice["predictive_residual"] > 1e-3


def test_data_edits():
    p = persona_world(mess3(), slices=[0, 1, 1], coupling=0.5)
    tokens = torch.tensor([[0, 4, 2, 3]])  # (copy, x): (0,0) (1,1) (0,2) (1,0)
    assert slice_of_tokens(p, tokens, [0, 1, 1]).tolist() == [[0, 1, 1, 0]]
    where = torch.tensor([[True, True, False, False]])
    assert force_copies(p, tokens, 1, where).tolist() == [[3, 4, 2, 3]]
    assert force_copies(p, tokens, 0, torch.ones_like(where)).tolist() == [[0, 1, 2, 0]]
    probs = torch.tensor([[0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 0.0, 0.0]])  # two specials at the end are ignored
    torch.testing.assert_close(misaligned_by_token(probs, p), torch.tensor([[0.75, 0.5, 0.5]], dtype=torch.float64))


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="switch_prob"):
        persona_world(mess3(), switch_prob=0.5)
    with pytest.raises(ValueError, match="slices"):
        persona_world(mess3(), slices=[0, 0, 0])
    with pytest.raises(ValueError, match="slices"):
        persona_world(mess3(), slices=[0, 2, 2])


def _h(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))


@pytest.mark.parametrize("corr", [0.0, 0.3, 0.7, 1.0])
def test_subset_world_mi_matches_the_closed_form(corr):
    """MI(subset; tag) read off the process's stationary distribution = H(tag) - E_s H(tag | s) with P(tag | s)
    from the definition; the tag's marginal stays 1/K; 0 = independent, 1 = the tag is the subset's function."""
    K = 3
    p = subset_world(mess3(), K, corr, switch_prob=0.1, tag_noise=0.1, target=1)
    q = subset_tag_probs(K, corr, target=1)
    m = subset_measures(p, n_windows=50, length=8)
    assert m["subset_tag_mi_nats"] == pytest.approx(_h(1 / K) - sum(_h(float(v)) for v in q) / K, abs=1e-12)
    assert m["misaligned_rate"] == pytest.approx(1 / K, abs=1e-12)
    assert m["misaligned_by_subset"] == pytest.approx(q.tolist(), abs=1e-12)
    assert 0 <= m["subset_copy_mi_nats"] <= m["subset_tag_mi_nats"] + 1e-12  # the tag noise only loses information
    if corr == 1.0:
        assert m["alignment_dims"]["0.99"] == 1 and q.tolist() == [0.0, 1.0, 0.0]


def test_subset_world_samples_follow_the_definition():
    """Sampled windows: tokens carry their subset, segments persist with 1 - switch_prob, and the misaligned-copy
    frequency per subset is p_k (1 - noise) + (1 - p_k) noise."""
    K, corr, sw, noise = 3, 0.8, 0.1, 0.1
    p = subset_world(mess3(), K, corr, switch_prob=sw, tag_noise=noise)
    t = sample(p, 4000, 12, seed=0).tokens
    sub = slice_of_tokens(p, t, subset_slices(p))
    assert subset_slices(p) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    stay = (sub[:, 1:] == sub[:, :-1]).double().mean().item()
    assert stay == pytest.approx(1 - sw + sw / K, abs=0.01)  # a redraw can land on the same subset
    copy = torch.div(t, K * 3, rounding_mode="floor")
    q = subset_tag_probs(K, corr)
    for k in range(K):
        assert copy[sub == k].double().mean().item() == pytest.approx(
            float(q[k] * (1 - noise) + (1 - q[k]) * noise), abs=0.02
        )
    # the per-slice misaligned mass of the beliefs, against the next-token distribution with the tag noise undone:
    # P(k, copy 1) = P(k, a 1) (1 - n) + (P(k) - P(k, a 1)) n
    b = belief_states(p, t[:50])
    nxt = (b @ p.T.sum(-1).T).reshape(*b.shape[:-1], 2, K, 3).sum(-1)  # (..., copy, subset)
    naive = (nxt[..., 1, :] - noise * nxt.sum(-2)) / (1 - 2 * noise)
    assert torch.allclose(subset_tag_mass(p, b), naive, atol=1e-12)


def test_subset_world_ends_one_shared_persona_or_a_tag_per_subset():
    """Correlation 0: the tag is a persona that persists across subset switches; 1: the tag is the subset's own."""
    K, sw = 3, 0.1
    for corr in (0.0, 1.0):
        p = subset_world(mess3(), K, corr, switch_prob=sw, tag_noise=0.0, target=2)
        t = sample(p, 2000, 12, seed=1).tokens
        sub = slice_of_tokens(p, t, subset_slices(p))
        copy = torch.div(t, K * 3, rounding_mode="floor")
        switched = sub[:, 1:] != sub[:, :-1]
        same = (copy[:, 1:] == copy[:, :-1])[switched].double().mean().item()
        if corr == 0.0:  # the persona was kept (1 - sw) or redrawn to the same value
            assert same == pytest.approx(1 - sw + sw * (1 - 2 * (1 / K) * (1 - 1 / K)), abs=0.02)
        else:
            assert torch.equal(copy, (sub == 2).long())


def test_subset_world_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="correlation"):
        subset_world(mess3(), 3, 1.5)
    with pytest.raises(ValueError, match="n_subsets"):
        subset_world(mess3(), 1, 0.5)
    with pytest.raises(ValueError, match="target"):
        subset_world(mess3(), 3, 0.5, target=3)
    with pytest.raises(ValueError, match="switch_prob"):
        subset_world(mess3(), 3, 0.5, switch_prob=0.0)
