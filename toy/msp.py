"""The mixed-state presentation (MSP) of a ``Process``: every belief reachable from the stationary distribution,
built one depth at a time in numpy (float64).

One step per depth, over the depth's unexpanded nodes in batches of ``_BATCH`` children: every node times every
token in one matrix product, normalised in one pass and hashed, ``_CHUNK`` children at a time (in cache);
children of probability at most ``1e-15`` are dropped. A child is the same node as a known belief (of any depth)
or an earlier child when every coordinate rounds to the same multiple of ``tol``. Equal rounded beliefs are found
with a vectorised open-addressing hash table of int32 node ids, sized once for the whole tree: a few gathers and
one scatter per child and no sort. The table always holds final node ids: a batch whose children merge is
compacted and its moved children repointed before the next batch, so no depth is renumbered afterwards.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from toy.hmm import Process

TOL = 1e-12  # beliefs whose entries round to the same multiple of TOL are one belief (MSP, myopic entropies)
MIN_TOL = 1e-15  # below this, b / tol of a belief near 1 leaves the range where the rounding below is exact
_CHUNK = 1 << 15  # children per chunk of the products and hashing: their temporaries stay small and in cache
_BATCH = 1 << 17  # children per batch of table lookups: each batch ends in a tail of few-hash probing rounds
_ROUND = 1 << 15  # hashes per first probing round (the later rounds of a batch go together)
_PRESIZE = 1 << 20  # nodes the first table has room for (8 MB): beyond, it grows once a tree gets that large, so
# a small MSP whose tree bound is large (beliefs that merge) does not touch a huge table's pages at random
_MAGIC = 1.5 * 2.0**52  # x + _MAGIC rounds x to an integer (ties to even) for |x| <= 2**51; its bits are the key


@dataclass
class MixedStatePresentation:
    """The mixed-state presentation (MSP) up to a depth, as flat tensors (no object tree).

    Attributes:
        beliefs: ``(N, S)`` distinct beliefs; node 0 is the stationary distribution (depth 0). Nodes are numbered
            depth by depth; the new nodes of a depth in order of first appearance (parent's number, then token).
        next_node: ``(N, V)`` long, the node reached by emitting each token, ``-1`` if that token has
            probability 0 or the node lies at the last depth and was not expanded.
        token_probs: ``(N, V)`` ``P(token | belief)``.
        levels: per depth ``d = 0..depth``, ``(nodes, probs)``: the nodes reachable after ``d`` tokens (ascending)
            and the probability of being at each (nodes may recur across depths, e.g. RRXOR).
        tol: beliefs whose entries round to the same multiple of ``tol`` are one node.
    """

    beliefs: torch.Tensor
    next_node: torch.Tensor
    token_probs: torch.Tensor
    levels: list[tuple[torch.Tensor, torch.Tensor]]
    tol: float

    @property
    def n_nodes(self) -> int:
        return self.beliefs.shape[0]

    @property
    def closed(self) -> bool:
        """True when every node's successors are in the graph: the MSP is finite and complete."""
        return bool((self.next_node >= 0).any(1).all())

    def transition_matrix(self) -> torch.Tensor:
        """``(N, N)`` belief-to-belief transition probabilities (rows of unexpanded nodes are zero)."""
        P = torch.zeros(self.n_nodes, self.n_nodes, dtype=torch.float64)
        rows = torch.arange(self.n_nodes)[:, None].expand_as(self.next_node)
        m = self.next_node >= 0
        return P.index_put_((rows[m], self.next_node[m]), self.token_probs[m], accumulate=True)


def mixed_state_presentation(
    process: Process, depth: int, tol: float = TOL, max_nodes: int = 20_000_000
) -> MixedStatePresentation:
    """Breadth-first MSP to ``depth`` tokens, merging beliefs equal up to ``tol`` across all depths.

    Tolerance: two beliefs are one node exactly when every coordinate divided by ``tol`` rounds to the same
    integer (half to even), so merged beliefs differ by less than ``tol`` in every coordinate; beliefs closer
    than ``tol`` stay apart when a rounding boundary falls between them. ``tol`` must be at least ``1e-15`` (and,
    for a generalized HMM, its beliefs' entries below ``2^50 tol``).
    Merges are checked on the rounded coordinates themselves, so a collision of the 64-bit hash can never merge
    two different beliefs (the build then restarts with other hash multipliers).

    Mess3(0.05, 0.85) at depth 12 has 797,161 nodes = 1 + 3 + ... + 3^12: no two of its prefixes share a
    belief (checked in exact rational arithmetic). A coarser ``tol`` merges distinct beliefs that happen to lie
    close: at ``tol=1e-10`` 27 nodes are absorbed into neighbours (prefixes like ``0^11`` and ``0^12``, 7e-12
    apart near the fixed point of ``T[0]``), giving 797,134. Time and memory are linear in the number of nodes.
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0; got {depth}")
    if not tol >= MIN_TOL:
        raise ValueError(f"tol must be >= {MIN_TOL:g} (float64 beliefs near 1 are ~1e-16 apart); got {tol}")
    for seed in range(3):
        try:
            return _build(process, depth, tol, max_nodes, seed)
        except _HashCollision:
            continue  # other multipliers; the result does not depend on them
    raise RuntimeError("mixed_state_presentation: three independent 64-bit hashes collided; report this")


class _HashCollision(Exception):
    """Two different rounded beliefs got the same 64-bit hash."""


class _Table:
    """Open-addressing hash table (double hashing) from 64-bit belief hashes to node ids, at most half full.

    A slot holds ``id + 1`` as int32 (0: empty); the node's hash is ``hashes[id]`` in an array the caller keeps,
    so a slot is 4 bytes and the random reads and writes touch little memory (at most half full: 8 MB for the
    797,161 nodes of Mess3 at depth 12, which stays in cache where 16 MB did not).
    """

    def __init__(self, n: int):
        bits = max(4, int(np.ceil(np.log2(2 * max(n, 1)))))
        self.cap, self.shift = 1 << bits, np.uint64(64 - bits)
        # zeroed by the kernel: a table sized for a whole tree costs nothing where the beliefs merge and it stays empty
        self.tab = _block(4 * self.cap, zeros=True).view(np.int32)

    def find_or_insert(self, h: np.ndarray, pv: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look up each hash ``h[i]``, inserting it under id ``pv[i] - 1`` (int32 ids + 1) if absent; ``hashes``
        must already hold ``h`` at those ids. Returns (int32) ``id + 1`` of the node each hash maps to (a known
        node, or the one of its first occurrence in ``h``) and the slot where each was found.

        One round per probe (``_probe``). The first probes go ``_ROUND`` hashes at a time (small temporaries); the
        hashes whose slot held another hash then probe on together, ordered as in ``h``, so that the rounds of the
        long tail of probe sequences are paid once per call. Repeats of a hash follow the same probes, so they stay
        pending together and the first one wins.
        """
        mask, out, pend = self.cap - 1, np.empty(len(h), np.int32), []
        slots = (h.view(np.uint64) >> self.shift).view(np.int64)
        for a in range(0, len(h), _ROUND):
            b = min(a + _ROUND, len(h))
            miss = self._probe(slots[a:b], h[a:b], pv[a:b], hashes, out[a:b])
            if len(miss):
                pend.append(miss + a)
        act = np.concatenate(pend) if pend else np.zeros(0, np.int64)
        s, h, pv = slots[act], h[act], pv[act]
        while len(act):
            s = (s + (h >> 1 | 1)) & mask  # each hash's own odd step: one round's losers do not collide again
            w = np.empty(len(act), np.int32)
            miss = self._probe(s, h, pv, hashes, w)
            out[act], slots[act] = w, s
            act, s, h, pv = act[miss], s[miss], h[miss], pv[miss]
        return out, slots

    def _probe(self, s: np.ndarray, h: np.ndarray, pv: np.ndarray, hashes: np.ndarray, out: np.ndarray) -> np.ndarray:
        """One round: every hash reads its slot ``s``, claims it if empty (occupied slots are written back
        unchanged) and reads it again into ``out``; returns the positions of the hashes whose slot holds another
        hash. Of several hashes claiming one slot the last written wins (a forward scatter, 4% faster than a
        backward one); where those were repeats of one hash (``pv`` grows along ``h``, so a repeat finds its hash
        under a larger id), the slot goes to the smallest id, the first occurrence, and the round is read again."""
        t = np.take(self.tab, s, mode="wrap")  # indices are in range: 'wrap' skips the bounds check, 2x faster
        self.tab[s] = np.where(t == 0, pv, t)
        np.take(self.tab, s, mode="wrap", out=out)
        miss = np.flatnonzero(out != pv)
        found = np.take(hashes, out[miss] - 1, mode="wrap") == h[miss]
        later = miss[found & (out[miss] > pv[miss])]
        if len(later):
            np.minimum.at(self.tab, s[later], pv[later])
            np.take(self.tab, s, mode="wrap", out=out)
            miss = np.flatnonzero(out != pv)
            found = np.take(hashes, out[miss] - 1, mode="wrap") == h[miss]
        return miss[~found]

    @classmethod
    def of(cls, hashes: np.ndarray, n_more: int) -> _Table:
        """A table of the distinct ``hashes`` (ids 0, 1, ...) with room for ``n_more`` more."""
        table = cls(len(hashes) + n_more)
        for a in range(0, len(hashes), _CHUNK):
            b = min(a + _CHUNK, len(hashes))
            pv = np.arange(a + 1, b + 1, dtype=np.int32)
            if not np.array_equal(table.find_or_insert(hashes[a:b], pv, hashes)[0], pv):
                raise _HashCollision
        return table


def _hashes(
    beliefs: np.ndarray, tol: float, mult: np.ndarray, out: np.ndarray | None = None, work: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(keys (n, S) int64, hashes (n,) int64)``: the bits of ``round(beliefs / tol)`` as floats and a nonzero
    wrapping-arithmetic hash of them. ``out`` receives the hashes and ``work`` (float64, at least ``n (S + 1)``)
    holds the temporaries, so that a build's chunks reuse memory (fresh temporaries cost page faults)."""
    n, S = beliefs.shape
    keys = np.divide(beliefs, tol, out=None if work is None else work[: n * S].reshape(n, S))
    keys += _MAGIC
    keys = keys.view(np.int64)
    h = np.multiply(keys[:, 0], mult[0], out=out)
    tmp = np.empty(n, np.int64) if work is None else work[n * S : n * (S + 1)].view(np.int64)
    for s in range(1, S):
        h += np.multiply(keys[:, s], mult[s], out=tmp)
    h |= 1
    return keys, h


@functools.lru_cache
def _multipliers(S: int, seed: int) -> np.ndarray:
    """Odd random int64 multipliers of the belief hash, one per state (read-only: cached, since seeding a
    generator costs a tenth of a millisecond, a few percent of a depth-10 build)."""
    mult = np.random.default_rng(seed).integers(1, 2**62, S) | 1
    mult.setflags(write=False)
    return mult


def _tree_size(V: int, depth: int, limit: int) -> int:
    """``1 + V + ... + V^depth``, or ``limit + 1`` if that is larger: the most nodes an MSP of ``depth`` has."""
    n, level = 1, 1
    for _ in range(depth):
        level *= V
        n += level
        if n > limit:
            return limit + 1
    return n


def _build(process: Process, depth: int, tol: float, max_nodes: int, seed: int) -> MixedStatePresentation:
    S, V = process.n_states, process.vocab_size
    T = process.T.numpy()
    flat = np.ascontiguousarray(T.transpose(1, 0, 2).reshape(S, V * S))  # [i, x * S + j] = T[x, i, j]
    emit = np.ascontiguousarray(T.sum(-1).T)  # [i, x] = P(x | i)
    mult = _multipliers(S, seed)
    # Node arrays and table sized for the whole tree when that is affordable (untouched rows cost no memory), so
    # no depth copies them; otherwise (a process whose beliefs merge, deep) they grow to fit each depth.
    bound = _tree_size(V, depth, max_nodes)
    cap = bound if bound <= max_nodes and bound * 8 * (S + 2 * V + 1) <= 2**31 else 1
    beliefs, next_node, token_probs, hashes, expanded, *tree_levels = arrays = _node_arrays(cap, S, V)
    beliefs[0], expanded[0] = process.stationary.numpy(), False
    hashes[0] = _hashes(beliefs[:1], tol, mult)[1][0]
    table = _Table.of(hashes[:1], min(cap, _PRESIZE) - 1)
    N = 1
    nodes, probs = np.zeros(1, np.int64), np.ones(1)
    levels = [(nodes, probs)]
    per_chunk, per_batch = max(1, _CHUNK // V), max(1, _BATCH // V)  # parents
    work = np.empty(per_chunk * V * (S + 1))  # the hashing's temporaries, reused by every chunk
    span = (0, 1)  # (lo, hi) while the depth's nodes are lo..hi-1, all new (unexpanded): no index arrays needed
    for d in range(depth):
        todo = None if span else nodes[~expanded[nodes]]
        n = span[1] - span[0] if span else len(todo)
        m, start = n * V, N
        if n:
            if N + m >= 2**31 - 1:
                raise ValueError(
                    f"{process.name}: the MSP exceeds max_nodes={max_nodes:,} at depth {d + 1}; use a smaller depth"
                )
            if len(beliefs) < N + m:
                bigger = _node_arrays(N + m, S, V)
                for a, b in zip(arrays[:5], bigger):
                    b[:N] = a[:N]
                beliefs, next_node, token_probs, hashes, expanded, *tree_levels = arrays = bigger
            if 2 * (N + m) > table.cap:  # a tree past _PRESIZE nodes: sized for all of it; else for this depth
                table = _Table.of(hashes[:N], cap - N if cap > 1 else 2 * m)
            lo, hi = span or (todo[0], todo[-1] + 1)
            rows = slice(lo, hi) if hi - lo == n else todo  # todo is sorted: a range when it is one depth's nodes
            B = beliefs[rows]
            px = token_probs[rows] if isinstance(rows, slice) else np.empty((n, V))
            got = next_node[rows] if isinstance(rows, slice) else np.empty((n, V), np.int64)
            for a in range(0, n, per_batch):
                b = min(a + per_batch, n)
                N = _expand(B[a:b], px[a:b], got[a:b], flat, emit, N, beliefs, hashes, table, tol, mult, work, process)
            if N > max_nodes:
                raise ValueError(
                    f"{process.name}: the MSP exceeds max_nodes={max_nodes:,} at depth {d + 1}; use a smaller depth"
                )
            if not isinstance(rows, slice):
                token_probs[rows], next_node[rows] = px, got
            expanded[rows] = True
            expanded[start:N] = False  # their next_node rows are written when expanded (or at the end)
        span = None
        if n and N - start == m and n == len(nodes):  # a tree depth: the children are the next depth's nodes
            p = np.multiply(px, probs[:, None], out=tree_levels[1][start:N].reshape(n, V)).ravel()
            if p.min() > 0:
                nodes, probs, span = _range(tree_levels[0][start:N], start), p, (start, N)
                levels.append((nodes, probs))
                continue
        nodes, probs = _next_level(next_node[nodes], token_probs[nodes] * probs[:, None], start, N)
        levels.append((nodes, probs))
    # token probabilities of the unexpanded nodes too, so every node knows its next-token distribution
    lo, n_rest = int(np.argmin(expanded[:N])), N - np.count_nonzero(expanded[:N])
    if n_rest == N - lo:  # the usual case, the last depth's new nodes: a range, no index array
        np.matmul(beliefs[lo:N], emit, out=token_probs[lo:N])
        next_node[lo:N] = -1
    elif n_rest:
        rest = np.flatnonzero(~expanded[:N])
        token_probs[rest], next_node[rest] = beliefs[rest] @ emit, -1
    # views into the node block (a few merges leave its tail unused); copies only when most of it is unused
    out = [torch.from_numpy(a[:N] if len(a) <= 2 * N else a[:N].copy()) for a in (beliefs, next_node, token_probs)]
    return MixedStatePresentation(*out, [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in levels], tol)


def _expand(B, px, got, flat, emit, N, beliefs, hashes, table, tol, mult, work, process) -> int:
    """Expand the parents ``B`` (one batch of a depth) by every token: writes ``P(token | parent)`` to ``px`` and
    the child node ids to ``got`` (``-1`` where dropped), appends the new children's beliefs and hashes at ``N``
    in order of first appearance, and returns the new node count.

    The children are written at ``N, N + 1, ...`` and inserted under those ids. When all are new (Mess3 below
    depth 13) that is the end; otherwise the new ones are compacted to the front of the batch, the table slots of
    the ones that moved are pointed at their final ids, and every merge is checked on the rounded coordinates.
    """
    n, V = px.shape
    k, step = n * V, max(1, _CHUNK // V)
    cand, h = beliefs[N : N + k], hashes[N : N + k]
    for a in range(0, n, step):  # products, normalisation and hashing a chunk at a time, in cache
        b = min(a + step, n)
        c = cand[a * V : b * V]
        np.matmul(B[a:b], flat, out=c.reshape(b - a, -1))
        np.matmul(B[a:b], emit, out=px[a:b])
        with np.errstate(divide="ignore", invalid="ignore"):  # dropped children (px ~ 0) become NaN
            np.divide(c.reshape(b - a, V, -1), px[a:b, :, None], out=c.reshape(b - a, V, -1))
        _hashes(c, tol, mult, out=h[a * V : b * V], work=work)
    ok = (px > 1e-15).ravel()
    own = np.arange(N + 1, N + k + 1, dtype=np.int32)  # id + 1 of each child if it is new
    flat_got = got.reshape(k)
    if ok.all():
        w, slots = table.find_or_insert(h, own, hashes)
        if np.array_equal(w, own):
            np.subtract(w, 1, out=flat_got)
            return N + k
    else:
        live = np.flatnonzero(ok)
        if process.generalized and len(live) and not np.abs(cand[live]).max() < 2**50 * tol:
            raise ValueError(
                f"{process.name}: beliefs reach {np.abs(cand[live]).max():.3g}, too large to round to tol={tol:g}; raise tol"
            )
        w, slots = np.zeros(k, np.int32), np.empty(k, np.int64)
        w[live], slots[live] = table.find_or_insert(h[live], own[live], hashes)
    # some children merge (with a known node or an earlier child of the batch) or were dropped (w == 0)
    new = w == own
    rank = np.cumsum(new) - 1
    ids = w.astype(np.int64) - 1
    inner = ids >= N  # points at a child of this batch, which is new: renumber it
    ids[inner] = N + rank[ids[inner] - N]
    n_new = int(rank[-1]) + 1
    moved = np.flatnonzero(new & (ids != own - 1))
    if len(moved):
        table.tab[slots[moved]] = ids[moved] + 1
    merged = np.flatnonzero(~new & (w > 0))
    keys = _hashes(cand[merged], tol, mult)[0]
    beliefs[N : N + n_new], hashes[N : N + n_new] = cand[new], h[new]
    if len(merged) and not np.array_equal(_hashes(beliefs[ids[merged]], tol, mult)[0], keys):
        raise _HashCollision
    flat_got[:] = ids
    return N + n_new


def _next_level(child: np.ndarray, p: np.ndarray, start: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """The nodes a depth's transitions reach (ascending) and their probabilities, given each transition's node
    (``-1``: dropped) and probability. The new nodes ``start..N-1`` were numbered in order of first appearance
    among these transitions, so a running maximum finds each one's first transition; the other transitions
    (merges, recurring nodes: few where the depth is large) are added to them or summed by a sort."""
    child, p = child.ravel(), p.ravel()
    seen = np.maximum.accumulate(child)
    np.maximum(seen, start - 1, out=seen)
    first = np.empty(len(child), bool)
    first[0] = child[0] >= start
    np.greater(child[1:], seen[:-1], out=first[1:])
    mass_new = p[first]  # node start + i's first transition; every new node has one
    rest = np.flatnonzero(~first & (child >= 0))
    again = rest[child[rest] >= start]
    np.add.at(mass_new, child[again] - start, p[again])
    old = rest[child[rest] < start]
    old_nodes, inv = np.unique(child[old], return_inverse=True)
    mass_old = np.bincount(inv, weights=p[old], minlength=len(old_nodes))
    keep_old, keep_new = mass_old > 0, mass_new > 0
    nodes = np.concatenate([old_nodes[keep_old], np.arange(start, N)[keep_new]])
    return nodes, np.concatenate([mass_old[keep_old], mass_new[keep_new]])


_HUGE = 2**21  # bytes in a huge page


def _block(nbytes: int, zeros: bool = False) -> np.ndarray:
    """Uninitialised (or zeroed) uint8 buffer; from 2 MB on it starts on a huge-page boundary, so that all of it
    (not only its aligned middle, which numpy advises the kernel to back with huge pages) takes one page fault per
    2 MB. The skipped head is never touched and costs no memory. Zeroed buffers come from ``calloc``: a large one
    is fresh pages from the kernel, already zero, which cost nothing until touched."""
    new = np.zeros if zeros else np.empty
    if nbytes < _HUGE:
        return new(nbytes, np.uint8)
    raw = new(max(nbytes, 2 * _HUGE) + _HUGE, np.uint8)  # numpy advises huge pages from 4 MB on
    start = -raw.ctypes.data % _HUGE
    return raw[start : start + nbytes]


def _range(out: np.ndarray, lo: int) -> np.ndarray:
    """``np.arange(lo, lo + len(out))`` written to ``out`` (int64)."""
    out.fill(1)
    out[0] = lo
    return np.cumsum(out, out=out)


def _node_arrays(n: int, S: int, V: int) -> tuple[np.ndarray, ...]:
    """``beliefs (n, S)``, ``next_node (n, V)``, ``token_probs (n, V)``, ``hashes (n,)``, ``expanded (n,)`` and
    the nodes (int64) and probabilities of tree depths (``(n,)`` each: a tree depth's new nodes are its nodes, so
    its level can sit at their rows) carved from one allocation: numpy backs 4 MB and more with huge pages, which
    saves thousands of page faults a build (a few microseconds each in a virtual machine)."""
    shapes = [((n, S), np.float64), ((n, V), np.int64), ((n, V), np.float64), ((n,), np.int64), ((n,), np.bool_)]
    shapes += [((n,), np.int64), ((n,), np.float64)]
    nbytes = [math.prod(shape) * np.dtype(t).itemsize for shape, t in shapes]
    block, start, out = _block(sum(-(-b // 64) * 64 for b in nbytes)), 0, []  # each array starts 64-byte aligned
    for (shape, t), b in zip(shapes, nbytes):
        out.append(block[start : start + b].view(t).reshape(shape))
        start += -(-b // 64) * 64
    return tuple(out)
