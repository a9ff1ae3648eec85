"""Exact beliefs and entropies against hand computation, a naive per-token reference, brute-force
enumeration and published values; the mixed-state presentation against the previous (sort-based, torch)
implementation kept below as a reference; factored geometry measured from sampled beliefs."""

import math

import numpy as np
import pytest
import torch

import toy.msp
from toy.beliefs import (
    belief_states,
    entropy_rate,
    enumerate_sequences,
    initial_token_distribution,
    loss_floor,
    mixed_state_presentation,
    myopic_entropy,
    next_token_distributions,
    sequence_log_probabilities,
    sequence_probabilities,
)
from toy.data import sample
from toy.factors import factor_marginals, factor_tokens, product_approximation, product_belief, schmidt_spectrum
from toy.msp import MixedStatePresentation, _hashes
from toy.processes import (
    Process,
    capability_tag,
    correlated,
    even,
    golden_mean,
    mess3,
    noisy_and,
    noisy_not,
    product,
    rrxor,
    zero_one_random,
)

# A 2-state HMM small enough to filter by hand. Rows: A -> 0.3+0.2+0.0+0.5, B -> 0.1+0.0+0.4+0.5.
HAND = Process(torch.tensor([[[0.3, 0.2], [0.1, 0.0]], [[0.0, 0.5], [0.4, 0.5]]], dtype=torch.float64), name="hand")


def test_position_convention_two_step_hand_example():
    """sum_x T = [[0.3, 0.7], [0.5, 0.5]] -> pi = [5/12, 7/12].
    Token 0 = 0: pi T[0] = [5/12*0.3 + 7/12*0.1, 5/12*0.2] = [2.2/12, 1/12] -> P = 3.2/12, belief [0.6875, 0.3125].
    Token 1 = 1: [0.6875*0 + 0.3125*0.4, 0.6875*0.5 + 0.3125*0.5] = [0.125, 0.5] -> P = 0.625, belief [0.2, 0.8].
    Predictions: after token 0, P(next) = [0.6875*0.5 + 0.3125*0.1, .] = [0.375, 0.625];
    after token 1, [0.2*0.5 + 0.8*0.1, .] = [0.18, 0.82]."""
    assert torch.allclose(HAND.stationary, torch.tensor([5 / 12, 7 / 12], dtype=torch.float64))
    tokens = torch.tensor([[0, 1]])
    b = belief_states(HAND, tokens)
    assert b.shape == (1, 2, 2) and b.dtype == torch.float64
    assert torch.allclose(b[0, 0], torch.tensor([0.6875, 0.3125], dtype=torch.float64), atol=1e-15)  # after token 0
    assert torch.allclose(b[0, 1], torch.tensor([0.2, 0.8], dtype=torch.float64), atol=1e-15)  # after token 1
    assert sequence_probabilities(HAND, tokens).item() == pytest.approx(3.2 / 12 * 0.625, abs=1e-15)
    nxt = next_token_distributions(HAND, tokens)
    assert torch.allclose(nxt[0], torch.tensor([[0.375, 0.625], [0.18, 0.82]], dtype=torch.float64), atol=1e-15)
    assert initial_token_distribution(HAND)[0].item() == pytest.approx(3.2 / 12, abs=1e-15)


def naive_filter(T: np.ndarray, pi: np.ndarray, tokens: np.ndarray):
    """Per-sequence, per-token reference: eta <- eta T[x] / (eta T[x] 1)."""
    B, L = tokens.shape
    beliefs, logp = np.zeros((B, L, T.shape[1])), np.zeros(B)
    for b in range(B):
        eta = pi.copy()
        for t in range(L):
            v = eta @ T[tokens[b, t]]
            logp[b] += math.log(v.sum())
            eta = v / v.sum()
            beliefs[b, t] = eta
    return beliefs, logp


@pytest.mark.parametrize("process", [mess3(), mess3(0.15, 0.6), rrxor(), capability_tag(mess3()), noisy_and(0.1)])
def test_vectorized_filter_matches_naive_reference(process):
    tokens = sample(process, 40, 25, seed=7).tokens
    ref_b, ref_lp = naive_filter(process.T.numpy(), process.stationary.numpy(), tokens.numpy())
    assert np.abs(belief_states(process, tokens).numpy() - ref_b).max() < 1e-12
    assert np.abs(sequence_log_probabilities(process, tokens).numpy() - ref_lp).max() < 1e-10
    # the predictive at t is the next-token marginal of the belief after t
    pred = next_token_distributions(process, tokens)
    assert np.abs(pred.numpy() - ref_b @ process.T.sum(-1).T.numpy()).max() < 1e-12


# ----------------------------------------------------------------------------- published values


def test_entropy_rates_and_floor_match_published_values():
    assert abs(entropy_rate(mess3(0.05, 0.85)) - 0.79345755) <= 1e-6
    assert abs(entropy_rate(mess3(0.15, 0.6)) - 1.08888821) <= 1e-6
    assert abs(loss_floor(mess3(0.05, 0.85), 10) - 0.80351776) <= 1e-6
    assert abs(entropy_rate(rrxor()) - 2 / 3 * math.log(2)) <= 1e-6


def test_entropy_rate_of_unifilar_and_product_processes_is_exact():
    hb = lambda q: -q * math.log(q) - (1 - q) * math.log(1 - q)  # noqa: E731
    # noisy gate: n fair input bits then one output flipped with probability noise, per n + 1 tokens
    assert entropy_rate(noisy_and(0.1)) == pytest.approx((2 * math.log(2) + hb(0.1)) / 3, abs=1e-12)
    assert entropy_rate(noisy_not(0.2)) == pytest.approx((math.log(2) + hb(0.2)) / 2, abs=1e-12)
    assert entropy_rate(even(0.5)) == pytest.approx(2 / 3 * math.log(2), abs=1e-12)  # pi_A = 2/3, H(A) = ln 2
    assert entropy_rate(golden_mean(0.5)) == pytest.approx(2 / 3 * math.log(2), abs=1e-12)
    assert entropy_rate(zero_one_random(0.5)) == pytest.approx(math.log(2) / 3, abs=1e-12)
    both = entropy_rate(product(even(0.5), noisy_and(0.1)))  # (two period-3 factors would be reducible)
    assert both == pytest.approx(entropy_rate(even(0.5)) + entropy_rate(noisy_and(0.1)), abs=1e-12)
    mixed = entropy_rate(product(rrxor(), mess3(0.15, 0.6)))  # not unifilar: found as a product of its factors
    assert mixed == pytest.approx(2 / 3 * math.log(2) + 1.08888821, abs=1e-6)


def test_entropy_rate_terminates_with_clear_error_when_it_cannot_converge():
    with pytest.raises(RuntimeError, match="did not converge"):
        entropy_rate(correlated(mess3(), mess3(0.15, 0.6), 0.5), max_beliefs=20_000)


def test_myopic_entropies_match_block_entropies_by_enumeration():
    for process in [mess3(), rrxor(), capability_tag(rrxor())]:
        h = myopic_entropy(process, 5)
        block = [0.0]
        for n in range(1, 6):
            p = enumerate_sequences(process, n)[1]
            block.append(-(p * p.log()).sum().item())
        assert torch.allclose(h, torch.tensor(np.diff(block), dtype=torch.float64), atol=1e-10)
    assert loss_floor(mess3(), 6) == pytest.approx(myopic_entropy(mess3(), 6)[1:].mean().item(), abs=1e-15)


def test_enumeration_sums_to_one_and_refuses_when_too_large():
    for process in [mess3(), rrxor(), product(mess3(), rrxor())]:
        toks, probs = enumerate_sequences(process, 4)
        assert abs(probs.sum().item() - 1) < 1e-12 and (probs > 0).all()
    toks, probs = enumerate_sequences(rrxor(), 6, drop_zero=False)
    assert len(toks) == 64 and (probs == 0).any()  # some 6-token strings break the XOR in every phase
    with pytest.raises(ValueError, match="max_sequences"):
        enumerate_sequences(mess3(), 20)
    with pytest.raises(ValueError, match="length"):
        enumerate_sequences(mess3(), 0)


def test_rrxor_stationary_and_rate():
    p = rrxor()
    assert torch.allclose(p.stationary, torch.tensor([1 / 3] + [1 / 6] * 4, dtype=torch.float64), atol=1e-6)
    assert entropy_rate(p) / math.log(2) == pytest.approx(2 / 3, abs=1e-6)


# ----------------------------------------------------------------------------- mixed-state presentation


def reference_mixed_state_presentation(process: Process, depth: int, tol: float = 1e-12) -> MixedStatePresentation:
    """The previous implementation of ``mixed_state_presentation``, kept as the reference the level-at-a-time
    numpy one is tested (and benchmarked, ``bench/msp_speed.py``) against: breadth-first in torch, equal beliefs
    found by sorting one int64 hash of the rounded belief per node. Nodes of a depth come in hash order."""
    S, V = process.n_states, process.vocab_size
    flat = process.T.permute(1, 0, 2).reshape(S, V * S)
    weights = (torch.randint(1, 2**62, (4096,), generator=torch.Generator().manual_seed(0)) | 1)[:S]
    hash_of = lambda b: (torch.round(b / tol).to(torch.int64) * weights).sum(-1)  # noqa: E731
    beliefs = process.stationary[None].clone()
    next_node = torch.full((1, V), -1, dtype=torch.long)
    token_probs = torch.zeros(1, V, dtype=torch.float64)
    expanded = torch.zeros(1, dtype=torch.bool)
    known_hash, known_id = hash_of(beliefs), torch.zeros(1, dtype=torch.long)  # sorted hashes and their node ids
    levels = [(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64))]
    for _ in range(depth):
        nodes, probs = levels[-1]
        todo = nodes[~expanded[nodes]]
        if len(todo):
            joint = (beliefs[todo] @ flat).view(-1, V, S)
            px = joint.sum(-1)
            ok = px > 1e-15
            cand = (joint / px.clamp_min(1e-300)[..., None])[ok]
            sh, perm = torch.sort(hash_of(cand))
            uh, inv_sorted = torch.unique_consecutive(sh, return_inverse=True)
            inv = torch.empty_like(inv_sorted).scatter_(0, perm, inv_sorted)
            first = torch.empty(len(uh), dtype=torch.long).scatter_(0, inv_sorted, perm)
            pos = torch.searchsorted(known_hash, uh).clamp_max(len(known_hash) - 1)
            found = known_hash[pos] == uh
            ids = torch.where(found, known_id[pos], -1)
            n_new = int((~found).sum())
            new_ids = torch.arange(beliefs.shape[0], beliefs.shape[0] + n_new)
            ids[~found] = new_ids
            beliefs = torch.cat([beliefs, cand[first[~found]]])
            next_node = torch.cat([next_node, torch.full((n_new, V), -1, dtype=torch.long)])
            token_probs = torch.cat([token_probs, torch.zeros(n_new, V, dtype=torch.float64)])
            expanded = torch.cat([expanded, torch.zeros(n_new, dtype=torch.bool)])
            known_hash, order = torch.sort(torch.cat([known_hash, uh[~found]]))
            known_id = torch.cat([known_id, new_ids])[order]
            rows = torch.full((len(todo), V), -1, dtype=torch.long)
            rows[ok] = ids[inv]
            next_node[todo], token_probs[todo], expanded[todo] = rows, px, True
        child, p = next_node[nodes], token_probs[nodes] * probs[:, None]
        m = child >= 0
        dense = torch.zeros(beliefs.shape[0], dtype=torch.float64).index_add_(0, child[m], p[m])
        reached = (dense > 0).nonzero().squeeze(1)
        levels.append((reached, dense[reached]))
    rest = (~expanded).nonzero().squeeze(1)
    token_probs[rest] = (beliefs[rest] @ flat).view(-1, V, S).sum(-1)
    return MixedStatePresentation(beliefs, next_node, token_probs, levels, tol)


def node_map(a: MixedStatePresentation, b: MixedStatePresentation) -> np.ndarray:
    """``m[i]`` = the node of ``b`` that node ``i`` of ``a`` is, found by following the same tokens from the
    root; asserts that this is a bijection under which every transition of ``a`` is one of ``b``."""
    assert a.n_nodes == b.n_nodes
    m = np.full(a.n_nodes, -1)
    m[0] = 0
    an, bn, frontier = a.next_node.numpy(), b.next_node.numpy(), np.array([0])
    while len(frontier):
        ca, cb = an[frontier], bn[m[frontier]]
        assert np.array_equal(ca >= 0, cb >= 0)
        ca, cb = ca[ca >= 0], cb[cb >= 0]
        seen = m[ca] >= 0
        assert np.array_equal(m[ca[seen]], cb[seen])
        m[ca[~seen]] = cb[~seen]
        frontier = np.unique(ca[~seen])
    assert (m >= 0).all() and len(np.unique(m)) == a.n_nodes
    return m


def first_depth(msp: MixedStatePresentation) -> np.ndarray:
    """The first depth at which each node is reachable."""
    d = np.full(msp.n_nodes, -1)
    for k, (nodes, _) in reversed(list(enumerate(msp.levels))):
        d[nodes.numpy()] = k
    return d


def test_msp_mess3_depth_counts_and_consistency():
    msp = mixed_state_presentation(mess3(), 6)
    assert msp.n_nodes == sum(3**d for d in range(7))  # no two Mess3 prefixes share a belief
    for nodes, probs in msp.levels:
        assert abs(probs.sum().item() - 1) < 1e-12
        # the level distribution's mean belief is the stationary distribution at every depth
        assert torch.allclose(probs @ msp.beliefs[nodes], mess3().stationary, atol=1e-12)
    # h(n) from the MSP levels equals myopic_entropy
    ent = lambda p: -(p * p.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    h = torch.stack([probs @ ent(msp.token_probs[nodes]) for nodes, probs in msp.levels[:6]])
    assert torch.allclose(h, myopic_entropy(mess3(), 6), atol=1e-12)


def test_msp_finite_for_rrxor_and_tolerance_merges():
    msp = mixed_state_presentation(rrxor(), 30)
    assert msp.closed and msp.n_nodes < 40
    assert torch.allclose(msp.transition_matrix().sum(1), torch.ones(msp.n_nodes, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_nodes"):
        mixed_state_presentation(mess3(), 12, max_nodes=1000)
    with pytest.raises(ValueError, match="tol"):
        mixed_state_presentation(mess3(), 2, tol=0)


@pytest.mark.parametrize(
    "process,depths",
    [
        (mess3(), [0, 1, 5, 9]),
        (mess3(0.15, 0.6), [3, 8]),
        (rrxor(), [4, 30]),
        (even(0.5), [20]),
        (golden_mean(0.5), [20]),
    ],
)
def test_msp_is_the_reference_tree(process, depths):
    """Same nodes, beliefs, token probabilities, transitions, levels and depths as the previous implementation,
    up to node numbering (its nodes of a depth come in hash order, these in order of first appearance).
    Beliefs agree to float noise (a few ulp: numpy vs torch BLAS); merges agree exactly on these processes,
    whose beliefs lie nowhere near a rounding boundary of ``tol``."""
    for depth in depths:
        ref, msp = reference_mixed_state_presentation(process, depth), mixed_state_presentation(process, depth)
        m = node_map(ref, msp)
        assert torch.allclose(msp.beliefs[m], ref.beliefs, rtol=0, atol=2e-15)
        assert torch.allclose(msp.token_probs[m], ref.token_probs, rtol=0, atol=2e-15)
        assert np.array_equal(first_depth(msp)[m], first_depth(ref))
        assert len(msp.levels) == len(ref.levels) == depth + 1
        for (rn, rp), (nn, np_) in zip(ref.levels, msp.levels):
            assert torch.equal(nn, nn.sort().values)  # ascending, as documented
            order = np.argsort(m[rn.numpy()])
            assert np.array_equal(m[rn.numpy()][order], nn.numpy())
            assert torch.allclose(np_, rp[order], rtol=0, atol=1e-15)


def test_msp_merges_across_chunks_batches_and_probing_rounds(monkeypatch):
    """Chunks of one or two parents, table batches of four children and first probing rounds of three hashes put
    the boundaries of every step between merging beliefs: merges with known nodes, with earlier children of the
    same batch and of earlier batches of the depth, dropped children (RRXOR, Even, Golden Mean emit some tokens
    with probability 0), and table hits resolved in later probing rounds. The trees are still the previous
    implementation's, up to numbering, and still numbered in order of first appearance."""
    monkeypatch.setattr(toy.msp, "_CHUNK", 3)
    monkeypatch.setattr(toy.msp, "_BATCH", 4)
    monkeypatch.setattr(toy.msp, "_ROUND", 3)
    monkeypatch.setattr(toy.msp, "_PRESIZE", 8)  # the table grows (is rebuilt from the node hashes) mid-build
    for process, depth, n in [
        (rrxor(), 12, None),
        (even(0.5), 12, 4),
        (golden_mean(0.5), 12, 3),
        (mess3(0.15, 0.6), 5, None),
    ]:
        ref, msp = reference_mixed_state_presentation(process, depth), mixed_state_presentation(process, depth)
        assert n is None or msp.n_nodes == n
        m = node_map(ref, msp)
        assert torch.allclose(msp.beliefs[m], ref.beliefs, rtol=0, atol=2e-15)
        assert torch.allclose(msp.token_probs[m], ref.token_probs, rtol=0, atol=2e-15)
        assert np.array_equal(first_depth(msp)[m], first_depth(ref))
        for (rn, rp), (nn, np_) in zip(ref.levels, msp.levels, strict=True):
            order = np.argsort(m[rn.numpy()])
            assert np.array_equal(m[rn.numpy()][order], nn.numpy())
            assert torch.allclose(np_, rp[order], rtol=0, atol=1e-15)
        # order of first appearance: following transitions parent by parent, token by token, from the root,
        # each node is first met in increasing order
        seen = msp.next_node.numpy().ravel()
        seen = seen[seen > 0]
        first = seen[np.sort(np.unique(seen, return_index=True)[1])]
        assert np.array_equal(first, np.arange(1, msp.n_nodes))


def test_msp_numbers_nodes_depth_by_depth_in_order_of_first_appearance():
    """Mess3 is a tree (no merges): node ``k`` of depth ``d`` (first id ``s_d``) has children
    ``s_{d+1} + V k + x``, and the last depth's rows are unexpanded."""
    msp, V = mixed_state_presentation(mess3(), 4), 3
    start = np.cumsum([0] + [V**d for d in range(5)])
    for d in range(4):
        k = np.arange(V**d)
        expect = start[d + 1] + V * k[:, None] + np.arange(V)
        assert np.array_equal(msp.next_node[start[d] : start[d + 1]].numpy(), expect)
    assert (msp.next_node[start[4] :] == -1).all() and not msp.closed


def test_msp_merges_equal_beliefs():
    """Even and Golden Mean by hand (p = 1/2, pi = (2/3, 1/3)). Even: root; 0 -> (1, 0); 1 -> (1/2, 1/2);
    (1, 0) -1-> (0, 1); (1/2, 1/2) -1-> (2/3, 1/3), the root again: 4 nodes at any depth >= 3, against one per
    possible prefix without merging. Golden Mean: root, (0, 1), (1, 0): 3 nodes. Mess3 never merges."""
    for process, n in [(even(0.5), 4), (golden_mean(0.5), 3)]:
        msp = mixed_state_presentation(process, 8)
        prefixes = 1 + sum(len(enumerate_sequences(process, k)[0]) for k in range(1, 9))
        assert msp.n_nodes == n < prefixes and msp.closed
    even_beliefs = mixed_state_presentation(even(0.5), 3).beliefs
    hand = torch.tensor([[2 / 3, 1 / 3], [1, 0], [1 / 2, 1 / 2], [0, 1]], dtype=torch.float64)
    assert torch.allclose(even_beliefs, hand, atol=1e-15)  # in order of first appearance: 0, 1, then 10
    mess = mixed_state_presentation(mess3(), 5)
    assert mess.n_nodes == 1 + sum(len(enumerate_sequences(mess3(), k)[0]) for k in range(1, 6))


def test_msp_tolerance_merges_only_beliefs_closer_than_tol():
    """At tol = 1e-10, depth 12, 27 Mess3 nodes merge into neighbours 7e-12 away (797,134 of 797,161 nodes);
    every transition still lands within tol of the exact child belief, coordinate by coordinate."""
    for tol, n in [(1e-12, 797_161), (1e-10, 797_134)]:
        msp = mixed_state_presentation(mess3(), 12, tol=tol)
        assert msp.n_nodes == n
        b, nxt, T = msp.beliefs.numpy(), msp.next_node.numpy(), mess3().T.numpy()
        i, x = np.nonzero(nxt >= 0)
        child = np.einsum("ns,nsj->nj", b[i], T[x])
        child /= child.sum(1, keepdims=True)
        assert np.abs(child - b[nxt[i, x]]).max() < tol
    # the key itself: same key <=> every coordinate rounds to the same multiple of tol
    tol, mult = 1e-12, toy.msp._multipliers(3, 0)
    base = np.array([[0.25, 0.25, 0.5]])
    near = base + np.array([[0.49e-12, -0.49e-12, 0.0]])
    across = base + np.array([[0.51e-12, 0.0, 0.0]])
    keys = [_hashes(b, tol, mult) for b in (base, near, across)]
    assert keys[0][1] == keys[1][1] and np.array_equal(keys[0][0], keys[1][0])
    assert keys[0][1] != keys[2][1]
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(3), 100_000)
    b = a + rng.uniform(-2e-12, 2e-12, a.shape)
    same = _hashes(a, tol, mult)[1] == _hashes(b, tol, mult)[1]
    assert same.any() and (~same).any() and np.abs(a - b)[same].max() < tol


def test_msp_survives_a_hash_collision(monkeypatch):
    """Hash multipliers of zero make every belief collide: the merge check on the rounded coordinates catches it
    and the build restarts with other multipliers, giving the same tree."""
    process = rrxor()  # one object: two rrxor() calls can differ in the last bit of the stationary distribution
    good = mixed_state_presentation(process, 12)
    real = toy.msp._multipliers
    monkeypatch.setattr(toy.msp, "_multipliers", lambda S, seed: real(S, seed) * (seed > 0))
    again = mixed_state_presentation(process, 12)
    assert torch.equal(again.beliefs, good.beliefs) and torch.equal(again.next_node, good.next_node)


# ----------------------------------------------------------------------------- factored geometry


def affine_dim(X: torch.Tensor, rel_tol: float = 1e-8) -> tuple[int, torch.Tensor]:
    """Affine dimension of the rows of X: singular values of the centred matrix above rel_tol * the largest."""
    s = torch.linalg.svdvals(X - X.mean(0))
    return int((s > rel_tol * s[0]).sum()), s / s[0]


@pytest.mark.parametrize("K", [2, 3])
def test_independent_mess3_factors_span_3K_minus_1_joint_and_2K_marginal_dims(K):
    """Measured from sampled beliefs (float64 filter): the joint beliefs of K independent Mess3 factors span
    3^K - 1 affine dimensions, their factor marginals side by side 2K. Tolerance: singular values of the
    centred belief matrix count when above 1e-8 of the largest (the next ones are at float64 noise, ~1e-15)."""
    p = product(*[mess3()] * K)
    beliefs = sample(p, 512, 12, seed=0, return_beliefs=True).beliefs.reshape(-1, p.n_states)
    joint_dim, s_joint = affine_dim(beliefs)
    marg_dim, s_marg = affine_dim(torch.cat(factor_marginals(p, beliefs), -1))
    print(
        f"K={K}: joint affine dim {joint_dim} (smallest kept / first dropped sv: "
        f"{s_joint[joint_dim - 1]:.2e} / {s_joint[joint_dim] if joint_dim < len(s_joint) else 0:.2e}); "
        f"marginals {marg_dim} ({s_marg[marg_dim - 1]:.2e} / {s_marg[marg_dim]:.2e})"
    )
    assert joint_dim == 3**K - 1 and marg_dim == 2 * K
    assert s_joint[joint_dim - 1] > 1e-4 and s_marg[marg_dim - 1] > 1e-2  # a clear gap, not a borderline count


def test_marginals_of_a_product_are_the_factor_filters():
    p = product(mess3(), rrxor(), mess3(0.15, 0.6))
    toks = sample(p, 64, 15, seed=2).tokens
    joint = belief_states(p, toks)
    f = factor_tokens(p, toks)
    for k, (own, marg) in enumerate(zip([mess3(), rrxor(), mess3(0.15, 0.6)], factor_marginals(p, joint))):
        assert torch.allclose(marg, belief_states(own, f[..., k]), atol=1e-12)
    assert torch.allclose(product_belief(factor_marginals(p, joint)), joint, atol=1e-12)


def test_product_approximation_and_schmidt_spectrum():
    prod = product(mess3(), mess3(0.15, 0.6))
    b = sample(prod, 32, 10, seed=1, return_beliefs=True).beliefs
    va, vb, res = product_approximation(b, (3, 3))
    assert res.abs().max() < 1e-12
    ma, mb = factor_marginals(prod, b)
    assert torch.allclose(va, ma, atol=1e-12) and torch.allclose(vb, mb, atol=1e-12)
    s = schmidt_spectrum(b, (3, 3))
    assert (s[..., 1:] < 1e-12 * s[..., :1]).all()  # rank 1
    for rho in (0.3, 1.0):
        corr = correlated(mess3(), mess3(0.15, 0.6), rho)
        bc = sample(corr, 32, 10, seed=1, return_beliefs=True).beliefs
        res = product_approximation(bc, (3, 3))[2]
        assert res.norm(dim=-1).max() > 1e-3  # entangled beliefs are not products
        assert (schmidt_spectrum(bc, (3, 3))[..., 1] > 1e-6).any()


def test_factor_token_round_trip_and_errors():
    from toy.factors import joint_tokens

    p = product(mess3(), rrxor(), mess3())
    toks = torch.arange(p.vocab_size)
    assert torch.equal(joint_tokens(p, factor_tokens(p, toks)), toks)
    with pytest.raises(ValueError, match="not a factored process"):
        factor_tokens(mess3(), toks)
    with pytest.raises(ValueError, match="0..17"):
        factor_tokens(p, torch.tensor([18]))
    with pytest.raises(ValueError, match="factor 1"):
        joint_tokens(p, torch.tensor([[0, 2, 0]]))
    with pytest.raises(ValueError, match="last axis of 3"):
        joint_tokens(p, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="states"):
        factor_marginals(p, torch.ones(2, 5))


# ----------------------------------------------------------------------------- invalid inputs


@pytest.mark.parametrize(
    "tokens,match",
    [
        (torch.tensor([0, 1, 2]), "shape"),
        (torch.tensor([[0.0, 1.0]]), "integer"),
        (torch.tensor([[0, 3]]), r"0\.\.2"),
        (torch.tensor([[-1, 0]]), r"0\.\.2"),
    ],
)
def test_bad_tokens_raise(tokens, match):
    with pytest.raises(ValueError, match=match):
        belief_states(mess3(), tokens)


def test_zero_probability_sequence_raises_but_has_probability_zero():
    toks, probs = enumerate_sequences(rrxor(), 6, drop_zero=False)
    impossible = toks[probs == 0][:1]  # violates the XOR in every phase
    assert len(impossible) == 1
    assert sequence_probabilities(rrxor(), impossible).item() == 0.0
    with pytest.raises(ValueError, match="sequence 1 has probability 0"):
        belief_states(rrxor(), torch.cat([toks[probs > 0][:1], impossible]))


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="max_length"):
        myopic_entropy(mess3(), 0)
    with pytest.raises(ValueError, match="context_length"):
        loss_floor(mess3(), 1)
    with pytest.raises(ValueError, match="depth"):
        mixed_state_presentation(mess3(), -1)
    with pytest.raises(ValueError, match="not a factored"):
        factor_marginals(Process(mess3().T), torch.ones(3))
