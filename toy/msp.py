"""The mixed-state presentation (MSP) of a ``Process``: every belief reachable from the stationary distribution,
built one depth at a time in numpy (float64).

One step per depth: every unexpanded node of the depth times every token in one matrix product, normalised in
one pass; children of probability at most ``1e-15`` are dropped. A child is the same node as a known belief (of
any depth) or an earlier child when every coordinate rounds to the same multiple of ``tol``. Equal rounded
beliefs are found with a vectorised open-addressing hash table (linear probing) of 16-byte ``(hash, node id)``
entries: a handful of gathers and scatters per depth and no sort, the step that dominated a sort-based MSP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toy.hmm import Process

TOL = 1e-12  # beliefs whose entries round to the same multiple of TOL are one belief (MSP, myopic entropies)
MIN_TOL = 1e-15  # below this, b / tol of a belief near 1 leaves the range where the rounding below is exact
_CHUNK = 1 << 15  # rows per chunk of the hashing and table steps: their temporaries stay small and in cache
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
    so a slot is 4 bytes and the random reads and writes, the cost of the whole build, touch little memory.
    """

    def __init__(self, n: int):
        bits = max(4, int(np.ceil(np.log2(4 * max(n, 1)))))
        self.cap, self.shift = 1 << bits, np.uint64(64 - bits)
        self.tab = _block(4 * self.cap).view(np.int32)
        self.tab.fill(0)

    def find_or_insert(
        self,
        h: np.ndarray,
        prov: int | np.ndarray,
        hashes: np.ndarray,
        out: np.ndarray,
        slots: np.ndarray | None = None,
    ) -> int:
        """Look up each hash ``h[i]``, inserting it under provisional id ``prov + i`` (or ``prov[i]``) if absent;
        ``hashes`` must already hold ``h`` at those ids. Writes to ``out`` the id each hash maps to (a known id, or
        the provisional id of its first occurrence in ``h``), and to ``slots`` (if given) the slot where each was
        found; returns how many hashes got their own provisional id.

        One round per probe: every pending hash reads its slot, claims it if empty (occupied slots are written
        back unchanged) and reads it again; it is done when the slot holds its own id or an id with its hash.
        Repeats of a hash follow the same probes and resolve together; writing backwards lets the first occurrence
        write last and win. Each hash's own odd step keeps one round's losers from colliding again. Chunks of
        ``_CHUNK`` hashes keep the temporaries small (fresh large arrays cost a page fault per 4 kB).
        """
        own = 0
        for a in range(0, len(h), _CHUNK):
            b = min(a + _CHUNK, len(h))
            pv = (
                np.arange(prov + a + 1, prov + b + 1, dtype=np.int32)
                if np.isscalar(prov)
                else prov[a:b].astype(np.int32) + 1
            )
            own += self._insert(h[a:b], pv, hashes, out[a:b], None if slots is None else slots[a:b])
        return own

    def _insert(
        self, hv: np.ndarray, pv: np.ndarray, hashes: np.ndarray, out: np.ndarray, slots: np.ndarray | None
    ) -> int:
        mask, own, act = self.cap - 1, 0, None  # act: positions still probing (None: all, the first round)
        s = (hv.view(np.uint64) >> self.shift).view(np.int64)
        while True:
            t = np.take(self.tab, s, mode="wrap")  # indices are in range: 'wrap' skips the bounds check, 2x faster
            claim = np.where(t == 0, pv, t)
            self.tab[s[::-1]] = claim[::-1]  # backwards, so that the first occurrence of a hash writes last and wins
            w = np.take(self.tab, s, mode="wrap")
            done = w == pv
            own += np.count_nonzero(done)
            other = np.flatnonzero(~done)
            done[other] = np.take(hashes, w[other] - 1, mode="wrap") == hv[other]
            if act is None:
                out[:] = w
            else:
                out[act] = w
            if slots is not None:
                slots[slice(None) if act is None else act] = s
            pend = np.flatnonzero(~done)
            if not len(pend):
                out -= 1
                return own
            act = pend if act is None else act[pend]
            hv, pv = hv[pend], pv[pend]
            s = (s[pend] + (hv >> 1 | 1)) & mask

    def slots_of(self, h: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The slot holding each ``ids[i]``, found along the probe sequence of its hash ``h[i]``."""
        mask, target = self.cap - 1, (ids + 1).astype(np.int32)
        s = (h.view(np.uint64) >> self.shift).view(np.int64)
        out, act = np.empty(len(h), np.int64), np.arange(len(h))
        while len(act):
            hit = np.take(self.tab, s, mode="wrap") == target
            out[act[hit]] = s[hit]
            act, h, target = act[~hit], h[~hit], target[~hit]
            s = (s[~hit] + (h >> 1 | 1)) & mask
        return out

    @classmethod
    def of(cls, hashes: np.ndarray, n_more: int) -> _Table:
        """A table of the distinct ``hashes`` (ids 0, 1, ...) with room for ``n_more`` more."""
        table = cls(len(hashes) + n_more)
        if table.find_or_insert(hashes, 0, hashes, np.empty(len(hashes), np.int64)) != len(hashes):
            raise _HashCollision
        return table


def _hashes(
    beliefs: np.ndarray, tol: float, mult: np.ndarray, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(keys (n, S) int64, hashes (n,) int64)``: the bits of ``round(beliefs / tol)`` as floats and a nonzero
    wrapping-arithmetic hash of them. With ``out``, the hashes go there, computed in chunks (keys not returned)."""
    if out is not None:
        for a in range(0, len(beliefs), _CHUNK):
            out[a : a + _CHUNK] = _hashes(beliefs[a : a + _CHUNK], tol, mult)[1]
        return None, out
    keys = np.divide(beliefs, tol)
    keys += _MAGIC
    keys = keys.view(np.int64)
    h = keys[:, 0] * mult[0]
    for s in range(1, len(mult)):
        h += keys[:, s] * mult[s]
    h |= 1
    return keys, h


def _multipliers(S: int, seed: int) -> np.ndarray:
    """Odd random int64 multipliers of the belief hash, one per state."""
    return np.random.default_rng(seed).integers(1, 2**62, S) | 1


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
    # Node arrays sized for the whole tree when that is affordable (untouched rows cost no memory), so no depth
    # copies them; otherwise (a process whose beliefs merge, deep) they grow to fit each depth.
    bound = _tree_size(V, depth, max_nodes)
    cap = bound if bound <= max_nodes and bound * 8 * (S + 2 * V + 1) <= 2**31 else 1
    beliefs, next_node, token_probs, hashes, expanded = arrays = _node_arrays(cap, S, V)
    beliefs[0], next_node[0], expanded[0] = process.stationary.numpy(), -1, False
    hashes[0] = _hashes(beliefs[:1], tol, mult)[1][0]
    table = _Table.of(hashes[:1], 0)
    N = 1
    nodes, probs = np.zeros(1, np.int64), np.ones(1)
    levels = [(nodes, probs)]
    last_fresh = True  # whether the last depth expanded had only new children (no merge, none dropped)
    for d in range(depth):
        todo = nodes[~expanded[nodes]]
        n, m = len(todo), len(todo) * V
        fresh = False  # every child of this depth is a new node, in order
        if n:
            if N + m >= 2**31 - 1:
                raise ValueError(
                    f"{process.name}: the MSP exceeds max_nodes={max_nodes:,} at depth {d + 1}; use a smaller depth"
                )
            if len(beliefs) < N + m:
                bigger = _node_arrays(N + m, S, V)
                for a, b in zip(arrays, bigger):
                    b[:N] = a[:N]
                beliefs, next_node, token_probs, hashes, expanded = arrays = bigger
            lo, hi = todo[0], todo[-1] + 1
            rows = slice(lo, hi) if hi - lo == n else todo  # todo is sorted: a range when it is one depth's nodes
            B = beliefs[rows]
            cand = beliefs[N : N + m]  # children are written where new nodes go, and compacted if some merge
            np.matmul(B, flat, out=cand.reshape(n, V * S))
            if isinstance(rows, slice):
                px = np.matmul(B, emit, out=token_probs[rows])
            else:
                px = token_probs[rows] = B @ emit
            expanded[rows] = True
            with np.errstate(divide="ignore", invalid="ignore"):  # dropped children (px ~ 0) become NaN
                np.divide(cand.reshape(n, V, S), px[..., None], out=cand.reshape(n, V, S))
            ok = (px > 1e-15).ravel()
            if process.generalized and ok.any() and not np.abs(cand[ok]).max() < 2**50 * tol:
                raise ValueError(
                    f"{process.name}: beliefs reach {np.abs(cand[ok]).max():.3g}, too large to round to tol={tol:g}; raise tol"
                )
            h = _hashes(cand, tol, mult, out=hashes[N : N + m])[1]  # under the provisional ids N, N + 1, ...
            live = None if ok.all() else np.flatnonzero(ok)
            n_live = m if live is None else len(live)
            if 2 * (N + n_live) > table.cap:
                table = _Table.of(hashes[:N], n_live)
            got = next_node[rows].reshape(m) if isinstance(rows, slice) else np.empty(m, np.int64)
            # where the last depth merged, this one likely does too: keep each child's slot for _settle
            slots = None if last_fresh else _block(8 * m).view(np.int64)
            if live is None:
                fresh = table.find_or_insert(h, N, hashes, got, slots) == m
            else:
                got[:] = -1
                sub, sub_slots = np.empty(n_live, np.int64), None if slots is None else np.empty(n_live, np.int64)
                table.find_or_insert(h[live], N + live, hashes, sub, sub_slots)
                got[live] = sub
                if slots is not None:
                    slots[live] = sub_slots
            last_fresh = fresh
            if fresh:
                n_new = m
            else:
                got, n_new = _settle(table, got, N, cand, beliefs, h.copy(), hashes, tol, mult, slots)
            if N + n_new > max_nodes:
                raise ValueError(
                    f"{process.name}: the MSP exceeds max_nodes={max_nodes:,} at depth {d + 1}; use a smaller depth"
                )
            if not fresh or not isinstance(rows, slice):
                next_node[rows] = got.reshape(n, V)
            next_node[N : N + n_new], expanded[N : N + n_new] = -1, False
            fresh = fresh and n == len(nodes)
            N += n_new
        if fresh:  # a tree level: the children are the next depth's nodes, in order
            p = np.multiply(px, probs[:, None], out=_block(8 * m).view(np.float64).reshape(n, V)).ravel()
            if p.min() > 0:
                nodes, probs = _range(N - m, N), p
                levels.append((nodes, probs))
                continue
        child, p = next_node[nodes], token_probs[nodes] * probs[:, None]
        live_child = child >= 0
        child, p = child[live_child], p[live_child]
        base = child.min() if len(child) else 0
        dense = np.bincount(child - base, weights=p, minlength=N - base)
        reached = np.flatnonzero(dense > 0)
        nodes, probs = reached + base, dense[reached]
        levels.append((nodes, probs))
    # token probabilities of the unexpanded nodes too, so every node knows its next-token distribution
    lo, n_rest = int(np.argmin(expanded[:N])), N - np.count_nonzero(expanded[:N])
    if n_rest == N - lo:  # the usual case, the last depth's new nodes: a range, no index array
        np.matmul(beliefs[lo:N], emit, out=token_probs[lo:N])
    elif n_rest:
        rest = np.flatnonzero(~expanded[:N])
        token_probs[rest] = beliefs[rest] @ emit
    # views into the node block (a few merges leave its tail unused); copies only when most of it is unused
    out = [torch.from_numpy(a[:N] if len(a) <= 2 * N else a[:N].copy()) for a in (beliefs, next_node, token_probs)]
    return MixedStatePresentation(*out, [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in levels], tol)


_HUGE = 2**21  # bytes in a huge page


def _block(nbytes: int) -> np.ndarray:
    """Uninitialised uint8 buffer; from 2 MB on it starts on a huge-page boundary, so that all of it (not only its
    aligned middle, which numpy advises the kernel to back with huge pages) takes one page fault per 2 MB. The
    skipped head is never touched and costs no memory."""
    if nbytes < _HUGE:
        return np.empty(nbytes, np.uint8)
    raw = np.empty(max(nbytes, 2 * _HUGE) + _HUGE, np.uint8)  # numpy advises huge pages from 4 MB on
    start = -raw.ctypes.data % _HUGE
    return raw[start : start + nbytes]


def _range(lo: int, hi: int) -> np.ndarray:
    """``np.arange(lo, hi)`` (int64) in a ``_block``."""
    out = _block(8 * (hi - lo)).view(np.int64)
    out.fill(1)
    out[0] = lo
    return np.cumsum(out, out=out)


def _node_arrays(n: int, S: int, V: int) -> tuple[np.ndarray, ...]:
    """``beliefs (n, S)``, ``next_node (n, V)``, ``token_probs (n, V)``, ``hashes (n,)``, ``expanded (n,)`` carved
    from one allocation: numpy backs 4 MB and more with huge pages, which saves thousands of page faults a build
    (a few microseconds each in a virtual machine)."""
    shapes = [((n, S), np.float64), ((n, V), np.int64), ((n, V), np.float64), ((n,), np.int64), ((n,), np.bool_)]
    sizes = [int(np.prod(shape)) * np.dtype(t).itemsize for shape, t in shapes]
    block, start, out = _block(sum(sizes)), 0, []
    for (shape, t), size in zip(shapes, sizes):
        out.append(block[start : start + size].view(t).reshape(shape))
        start += size
    return tuple(out)


def _settle(table, got, N, cand, beliefs, h, hashes, tol, mult, slots=None) -> tuple[np.ndarray, int]:
    """Node ids of a depth's children when some merge (with a known node or an earlier child) or were dropped
    (``got == -1``); writes the new nodes' beliefs and hashes at ``N, N + 1, ...`` in order of first appearance
    and checks every merge on the rounded coordinates. Returns ``(ids (m,), number of new nodes)``."""
    m = len(got)
    new = got >= N
    local = got[new] - N  # the child whose provisional id the table holds for this hash
    first = np.arange(m)  # first occurrence of each new hash, in case a later repeat won its slot
    if not np.array_equal(local, np.flatnonzero(new)):  # some hash repeats within this depth
        np.minimum.at(first, local, np.flatnonzero(new))
    canon = np.zeros(m, bool)
    canon[first[local]] = True
    rank = np.cumsum(canon) - 1
    ids = got.copy()
    ids[new] = N + rank[first[local]]
    n_new = int(canon.sum())
    owners = np.flatnonzero(new & (got == N + np.arange(m)))  # children whose provisional id holds a slot
    moved = owners[ids[owners] != got[owners]]  # point those slots at the final ids
    table.tab[table.slots_of(h[moved], got[moved]) if slots is None else slots[moved]] = ids[moved] + 1
    merged = (ids >= 0) & ~canon
    keys = _hashes(cand[merged], tol, mult)[0]
    beliefs[N : N + n_new], hashes[N : N + n_new] = cand[canon], h[canon]
    if merged.any() and not np.array_equal(_hashes(beliefs[ids[merged]], tol, mult)[0], keys):
        raise _HashCollision
    return ids, n_new
