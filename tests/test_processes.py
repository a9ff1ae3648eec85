"""Process construction: published tables, validation errors, and the factored constructions' contracts
(each factor's marginal process is exactly its own; radix order; blanks of the rare factor)."""

import math

import pytest
import torch

from toy.beliefs import belief_states, enumerate_sequences
from toy.data import sample
from toy.factors import factor_marginals, factor_tokens, joint_tokens
from toy.processes import (
    Process,
    capability_tag,
    chained,
    correlated,
    even,
    golden_mean,
    mess3,
    noisy_and,
    noisy_gate,
    noisy_implies,
    noisy_not,
    product,
    rare_factor,
    rrxor,
    zero_one_random,
)


def marginal_sequence_probs(process: Process, k: int, length: int) -> torch.Tensor:
    """Exact probabilities of factor k's token sequences, ``(V_k ** length,)`` in lexicographic order,
    by summing the joint process's exact sequence probabilities."""
    toks, probs = enumerate_sequences(process, length, drop_zero=False)
    f = factor_tokens(process, toks)[..., k]  # (N, length)
    Vk = process.factor_vocab_sizes[k]
    idx = (f * Vk ** torch.arange(length - 1, -1, -1)).sum(-1)
    return torch.zeros(Vk**length, dtype=torch.float64).index_add_(0, idx, probs)


def own_sequence_probs(process: Process, length: int) -> torch.Tensor:
    return enumerate_sequences(process, length, drop_zero=False)[1]


# ----------------------------------------------------------------------------- published tables


def test_mess3_matches_published_table():
    x, a = 0.05, 0.85
    b, y = (1 - a) / 2, 1 - 2 * x
    T = torch.tensor(
        [
            [[a * y, b * x, b * x], [a * x, b * y, b * x], [a * x, b * x, b * y]],
            [[b * y, a * x, b * x], [b * x, a * y, b * x], [b * x, a * x, b * y]],
            [[b * y, b * x, a * x], [b * x, b * y, a * x], [b * x, b * x, a * y]],
        ],
        dtype=torch.float64,
    )
    p = mess3(x, a)
    assert torch.allclose(p.T, T, atol=1e-15)
    assert torch.allclose(p.stationary, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-12)
    assert not p.unifilar


def test_rrxor_table_and_stationary():
    p = rrxor(0.5, 0.5)
    S, Z, O, Tr, F = range(5)
    assert p.T[0, S, Z] == 0.5 and p.T[1, S, O] == 0.5
    assert p.T[0, Z, F] == 0.5 and p.T[1, Z, Tr] == 0.5 and p.T[0, O, Tr] == 0.5 and p.T[1, O, F] == 0.5
    assert p.T[1, Tr, S] == 1 and p.T[0, F, S] == 1
    expected = torch.tensor([1 / 3, 1 / 6, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    assert (p.stationary - expected).abs().max() < 1e-6
    assert p.unifilar


def test_small_processes_emit_what_their_docstrings_say():
    # Z1R: tokens at phases Z, O are 0, 1; R emits 0 with probability p
    z = zero_one_random(0.3)
    assert z.T[0, 0, 1] == 1 and z.T[1, 1, 2] == 1 and z.T[0, 2, 0] == 0.3
    # Even: no odd block of 1s between 0s -> "0 1 0" has probability 0
    assert enumerate_sequences(even(0.5), 3, drop_zero=False)[1][0b010] == 0
    # Golden mean: no "0 0"
    toks, probs = enumerate_sequences(golden_mean(0.5), 2, drop_zero=False)
    assert probs[0] == 0 and probs[1:].min() > 0


@pytest.mark.parametrize("gate,table", [(noisy_not, [1, 0]), (noisy_and, [0, 0, 0, 1]), (noisy_implies, [1, 1, 0, 1])])
def test_noisy_gates_emit_inputs_then_noisy_output(gate, table):
    """From the block start: n uniform bits, then the gate's output flipped with probability noise."""
    noise = 0.1
    p = gate(noise)
    n = int(math.log2(len(table)))
    assert p.n_states == 2 ** (n + 1) - 1 and p.unifilar
    # P(block | start state) by walking T from state 0 over the n + 1 tokens of every block
    for v in range(2**n):
        bits = [(v >> (n - 1 - k)) & 1 for k in range(n)]
        for out in (0, 1):
            eta = torch.zeros(p.n_states, dtype=torch.float64)
            eta[0] = 1
            for tok in bits + [out]:
                eta = eta @ p.T[tok]
            expected = 0.5**n * ((1 - noise) if out == table[v] else noise)
            assert abs(eta.sum().item() - expected) < 1e-12
            assert eta[0].item() == pytest.approx(expected)  # back at the block start


# ----------------------------------------------------------------------------- factored constructions


def test_product_token_radix_order_and_marginals():
    p = product(mess3(), rrxor())
    assert p.vocab_size == 6 and p.n_states == 15
    assert p.factor_vocab_sizes == (3, 2) and p.factor_state_sizes == (3, 5)
    f = torch.tensor([[2, 1], [0, 1], [1, 0]])
    assert joint_tokens(p, f).tolist() == [2 * 2 + 1, 1, 2]  # first factor most significant
    assert torch.equal(factor_tokens(p, joint_tokens(p, f)), f)
    for k, own in enumerate([mess3(), rrxor()]):
        assert torch.allclose(marginal_sequence_probs(p, k, 3), own_sequence_probs(own, 3), atol=1e-14)


@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_correlated_keeps_each_factor_exactly(rho):
    first, second = mess3(0.05, 0.85), mess3(0.15, 0.6)
    p = correlated(first, second, rho)
    for k, own in enumerate([first, second]):
        assert torch.allclose(marginal_sequence_probs(p, k, 3), own_sequence_probs(own, 3), atol=1e-13)
    if rho == 0:
        assert torch.allclose(p.T, product(first, second).T, atol=1e-15)


def test_correlated_rho_makes_tokens_dependent():
    """rho moves the pair from independent (mutual information 0) to dependent; at rho = 1 two copies of one
    process emit the same token at every step (they move in lockstep from the stationary diagonal)."""

    def mutual_information(rho):
        p = correlated(mess3(), mess3(), rho)
        toks, probs = enumerate_sequences(p, 1)
        joint = torch.zeros(3, 3, dtype=torch.float64)
        f = factor_tokens(p, toks)
        joint[f[:, 0, 0], f[:, 0, 1]] = probs
        pa, pb = joint.sum(1), joint.sum(0)
        m = joint > 0
        return (joint[m] * (joint[m] / (pa[:, None] * pb[None])[m]).log()).sum().item()

    mis = [mutual_information(r) for r in (0.0, 0.5, 1.0)]
    assert abs(mis[0]) < 1e-12 and 0 < mis[1] < mis[2]
    toks = factor_tokens(correlated(mess3(), mess3(), 1.0), sample(correlated(mess3(), mess3(), 1.0), 64, 20).tokens)
    assert torch.equal(toks[..., 0], toks[..., 1])


def test_chained_conditions_factor_two_on_factor_one_token():
    first = mess3()
    cond = [mess3(0.05, 0.85), mess3(0.15, 0.6), mess3(0.3, 0.5)]
    p = chained(first, cond)
    assert torch.allclose(marginal_sequence_probs(p, 0, 3), own_sequence_probs(first, 3), atol=1e-14)
    # T[(x1, x2), (i1, i2), (j1, j2)] = T1[x1, i1, j1] * T2^(x1)[x2, i2, j2]
    T = p.T.reshape(3, 3, 3, 3, 3, 3)
    for x1 in range(3):
        expected = torch.einsum("ij,ykl->yikjl", first.T[x1], cond[x1].T)
        assert torch.allclose(T[x1], expected, atol=1e-15)
    # with one conditioned process for every token it is the independent product
    same = chained(first, [mess3(0.15, 0.6)] * 3)
    assert torch.allclose(same.T, product(first, mess3(0.15, 0.6)).T, atol=1e-15)


def test_rare_factor_emits_blank_exactly_without_trigger():
    p = rare_factor(mess3(), rrxor(), trigger_token=1)
    f = factor_tokens(p, sample(p, 256, 50, seed=3).tokens)
    blank = rrxor().vocab_size
    assert torch.equal(f[..., 1] == blank, f[..., 0] != 1)
    # the rare factor steps as RRXOR on the trigger and stays put (blank) otherwise
    T = p.T.reshape(3, 3, 3, 5, 3, 5)  # (x1, x2, i1, i2, j1, j2)
    stay = torch.einsum("ij,kl->ikjl", mess3().T[0], torch.eye(5, dtype=torch.float64))
    assert torch.equal(T[0, blank], stay) and (T[0, :blank] == 0).all()
    step = torch.einsum("ij,ykl->yikjl", mess3().T[1], rrxor().T)
    assert torch.allclose(T[1, :blank], step, atol=1e-15) and (T[1, blank] == 0).all()
    assert torch.allclose(marginal_sequence_probs(p, 0, 3), own_sequence_probs(mess3(), 3), atol=1e-14)


def test_capability_tag_factors_are_tag_then_capability():
    cap = rrxor()
    p = capability_tag(cap, switch_prob=0.05, tag_noise=0.1)
    V, S = cap.vocab_size, cap.n_states
    assert p.factor_vocab_sizes == (2, V) and p.factor_state_sizes == (2, S) and p.factor_names[0] == "tag"
    # joint token = copy * V + x: the capability's token is the second (least significant) factor
    assert torch.allclose(marginal_sequence_probs(p, 1, 4), own_sequence_probs(cap, 4), atol=1e-14)
    # the first factor is the tag's copy: a 2-state chain flipping with 0.05, shown with noise 0.1
    toks, probs = enumerate_sequences(p, 2, drop_zero=False)
    copies = factor_tokens(p, toks)[..., 0]
    same = probs[copies[:, 0] == copies[:, 1]].sum().item()
    # P(copy_1 == copy_2) = sum over tag paths (0.95 stay / 0.05 flip) of the noisy readout agreeing
    agree_same_tag = 0.9**2 + 0.1**2
    assert same == pytest.approx(0.95 * agree_same_tag + 0.05 * (1 - agree_same_tag), abs=1e-12)
    # state radix: tag most significant, so the first factor marginal is the tag belief
    beliefs = belief_states(p, torch.tensor([[V + 0, V + 1, V + 0]]))  # three tokens from the misaligned copy
    tag = factor_marginals(p, beliefs)[0]
    assert tag.shape == (1, 3, 2) and (tag[0, :, 1] > 0.8).all()


# ----------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Process(torch.full((2, 2, 2), 0.3)), "must be 1"),  # rows sum to 1.2
        (lambda: Process(torch.tensor([[[1.2, 0.0], [0.0, 0.5]], [[-0.2, 0.0], [0.0, 0.5]]])), "negative"),
        (lambda: Process(torch.tensor([[[float("nan"), 0.5], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])), "NaN"),
        (lambda: Process(torch.ones(2, 2, 3) / 6), "shape"),
        (lambda: Process(torch.ones(4, 4) / 4), "shape"),
        (lambda: Process(torch.eye(2)[None]), "reducible"),  # two states that never talk
        (lambda: Process(mess3().T, factor_vocab_sizes=(3, 3), factor_state_sizes=(3, 3)), "multiply"),
        (lambda: Process(mess3().T, factor_vocab_sizes=(3,)), "both"),
        (lambda: mess3(0.6, 0.85), "x=0.6"),
        (lambda: mess3(0.0, 0.85), "reducible"),  # x = 0 never changes state
        (lambda: mess3(0.05, 1.5), "a=1.5"),
        (lambda: mess3(float("nan"), 0.5), "x=nan"),
        (lambda: rrxor(-0.1, 0.5), "p1"),
        (lambda: zero_one_random(2.0), r"\[0, 1\]"),
        (lambda: even(1.0), "p=1"),
        (lambda: golden_mean(1.0), "p=1"),
        (lambda: noisy_gate([0, 1, 1]), "2\\^n"),
        (lambda: noisy_gate([0, 2]), "0/1"),
        (lambda: noisy_and(1.5), "noise"),
        (lambda: product(mess3()), "at least two"),
        (lambda: chained(mess3(), [mess3(), mess3()]), "one conditioned process per token"),
        (lambda: chained(mess3(), [mess3(), mess3(), rrxor()]), "share vocab"),
        (lambda: correlated(mess3(), mess3(), 1.5), "rho"),
        (lambda: rare_factor(mess3(), rrxor(), 3), "trigger_token"),
        (lambda: capability_tag(mess3(), switch_prob=0.0), "switch_prob"),
        (lambda: capability_tag(mess3(), tag_noise=-0.1), "tag_noise"),
    ],
)
def test_invalid_processes_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_generalized_hmm_allows_negative_entries_but_not_as_factor():
    T = torch.tensor([[[0.6, -0.1], [0.2, 0.2]], [[0.3, 0.2], [0.3, 0.3]]], dtype=torch.float64)
    g = Process(T, name="ghmm", generalized=True)
    assert not g.unifilar and abs(g.stationary.sum().item() - 1) < 1e-12
    with pytest.raises(ValueError, match="generalized"):
        product(g, mess3())
    with pytest.raises(ValueError, match="generalized"):
        correlated(g, mess3(), 0.5)
    with pytest.raises(ValueError, match="no hidden state path"):
        sample(g, 2, 3, return_states=True)
