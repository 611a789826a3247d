"""Who shares keys and masks with whom: the complete graph (SecAgg) or SecAgg+'s sparse graph.

SecAgg (Bonawitz et al. CCS 2017) uses the complete graph: every client shares its secrets with,
and masks against, every other client.

SecAgg+ (Bell et al. CCS 2020) replaces it with a k-regular graph of degree k = O(log n): a
Harary graph H(k, n) -- a ring where each node is joined to the k/2 nearest nodes on each side --
laid over a uniformly random permutation. Here the ring has n_max *slots*, one per client the
session is planned for, whatever the length of the key list: the L listed clients and
n_max - L empty slots are permuted together by a PRG keyed by HKDF(session id), so every party
computes the same graph from the key list alone. An absent client leaves an empty slot -- it
counts as a dropout -- and never pulls farther clients into anyone's neighbourhood: a server
that shows a client a short list shrinks that client's neighbourhood, it cannot fill it with
chosen clients. (Before, the graph was drawn over the list itself, and a list of 57 clients
with degree 84 was the complete graph over whoever the server listed.) The server still
chooses the list, and so the session id: each list it tries is a fresh random graph, which is
why SECURITY.md states the bound per graph tried.

A client u's *share holders* are its neighbours plus itself, h = k + 1 parties (h = n for the
complete graph). Its self-mask seed and mask key are shared t-of-h among them. Following Bell et
al.'s semi-malicious analysis we require t > h / 2: two disjoint groups of t holders cannot exist,
so the server cannot collect both kinds of share of one client from honest holders.

`choose_degree` follows Bell et al.'s parameter search: the smallest even k such that (1) the
graph stays connected, except with probability 2^-(sigma+1), after removing the assumed fractions
of corrupt and dropped clients (a union bound over pairs of k/2-long gaps in the ring), and
(2) some threshold t satisfies both security -- 2t > h + (the corrupt neighbours), h = k + 1,
except with probability 2^-(sigma+1)/n -- and correctness -- at least t neighbours survive except
with probability 2^-eta/n (hypergeometric tails). sigma = 40 and eta = 20 as in the paper.
The holders include the client itself (it keeps one share of each of its own secrets), hence
h = k + 1: a malicious server needs t shares of each kind, honest holders release one kind
each and the client releases its own self-mask share, so it needs 2t <= h + c corrupt holders.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ConfigurationError
from .primitives import LABEL, hkdf

SIGMA = 40
ETA = 20


class _WordStream:
    """Uniform 64-bit words from AES-256-CTR under a key derived from the session id."""

    def __init__(self, key: bytes):
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._words: list[int] = []

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) by rejection sampling (no modulo bias)."""
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            if not self._words:
                self._words = list(struct.unpack("<512Q", self._enc.update(bytes(4096))))
            w = self._words.pop()
            if w < limit:
                return w % bound


_TOP = np.uint64(0xFFFFFFFFFFFFFFFF)


def _swap_draws(key: bytes, slots: int) -> list[int] | None:
    """The Fisher-Yates draws j_i in [0, i] for i = slots - 1 .. 1, exactly as `_WordStream.below`
    gives them (the words of each 4096-byte block taken last first), computed with numpy; None if
    a word would be rejected (probability below slots / 2^64), for the caller to fall back on the
    word-by-word stream."""
    count = slots - 1
    if count <= 0:
        return []
    blocks = -(-count // 512)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4096 * blocks))
    words = np.frombuffer(stream, dtype="<u8").reshape(blocks, 512)[:, ::-1].ravel()[:count]
    bounds = np.arange(slots, 1, -1, dtype=np.uint64)  # i + 1
    rem = (_TOP % bounds + np.uint64(1)) % bounds  # 2^64 mod (i + 1)
    if not np.all(words <= _TOP - rem):  # below() would reject a word: the draws shift
        return None
    return (words % bounds).tolist()


def ring(count: int, session: bytes, slots: int | None = None) -> list[int | None]:
    """A uniformly random placement of the positions 0 .. count-1 (of a sorted list) and
    slots - count empty slots (None) on a ring of `slots` (default: count), drawn from the
    session id by a Fisher-Yates shuffle of AES-256-CTR words (rejection sampling, no bias).
    It depends on the list only through its length: a client that knows the length of the key
    list and its own position finds its neighbours' positions without the list itself."""
    slots = count if slots is None else slots
    if count < 0 or slots < count:
        raise ConfigurationError(f"{count} clients do not fit on a ring of {slots} slots")
    order: list[int | None] = list(range(count)) + [None] * (slots - count)
    key = hkdf(session, LABEL + b"/graph")
    draws = _swap_draws(key, slots)
    if draws is None:
        stream = _WordStream(key)
        draws = [stream.below(i + 1) for i in range(slots - 1, 0, -1)]
    for i, j in zip(range(slots - 1, 0, -1), draws):
        order[i], order[j] = order[j], order[i]
    return order


def permutation(ids: Sequence[int], session: bytes, slots: int | None = None) -> list[int | None]:
    """A uniformly random placement of `ids` (sorted first) on a ring of `slots` positions
    (default: len(ids)), drawn from the session id; empty slots are None. With slots = len(ids)
    this is a uniformly random permutation of `ids`. (`ring` with each position replaced by
    its id.)"""
    order = sorted(ids)
    return [None if p is None else order[p] for p in ring(len(order), session, slots)]


def is_complete(count: int, degree: int | None, slots: int | None = None) -> bool:
    """Whether `degree` gives the complete graph on a ring of `slots` (default: count)."""
    n = count if slots is None else slots
    return degree is None or degree >= n - 1


def neighbour_positions(count: int, degree: int | None, session: bytes, position: int, slots: int | None = None) -> frozenset[int]:
    """The positions (in the sorted key list of `count` clients) of the neighbours of the client
    at `position`: everyone else for the complete graph, otherwise the listed clients in the
    `degree` slots nearest to its own on the ring of `slots` (see `neighbours`)."""
    if not 0 <= position < count:
        raise ConfigurationError(f"position {position} is not in a list of {count} clients")
    if is_complete(count, degree, slots):
        return frozenset(range(count)) - {position}
    if degree < 2 or degree % 2:
        raise ConfigurationError(f"SecAgg+ degree must be an even number >= 2, found {degree}")
    order = ring(count, session, slots)
    n, i, half = len(order), order.index(position), degree // 2
    return frozenset(p for p in (order[(i + d) % n] for d in range(-half, half + 1) if d) if p is not None)


def neighbours(ids: Sequence[int], degree: int | None, session: bytes, who: Sequence[int] | None = None,
               slots: int | None = None) -> dict[int, frozenset[int]]:
    """Neighbour sets (excluding the node itself) for the clients in `who` (default: all).

    `degree` None gives the complete graph over `ids`. Otherwise the Harary graph of `degree`
    over a ring of `slots` positions (default: len(ids); the protocol uses n_max): a client's
    neighbours are the listed clients in the `degree` slots nearest to it, so at most `degree`.
    """
    ids = sorted(ids)
    who = ids if who is None else list(who)
    if is_complete(len(ids), degree, slots):
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in who}
    if degree < 2 or degree % 2:
        raise ConfigurationError(f"SecAgg+ degree must be an even number >= 2, found {degree}")
    order = permutation(ids, session, slots)
    n = len(order)
    pos = {u: i for i, u in enumerate(order) if u is not None}
    half = degree // 2
    out = {}
    for u in who:
        i = pos[u]
        out[u] = frozenset(v for v in (order[(i + d) % n] for d in range(-half, half + 1) if d) if v is not None)
    return out


class CompleteGraph(Mapping):
    """The complete graph's neighbour sets, {u: every other listed client}, made on demand
    instead of stored (n sets of n - 1 ids would be O(n^2) memory at the server)."""

    def __init__(self, ids):
        self._all = frozenset(ids)

    def __getitem__(self, u: int) -> frozenset[int]:
        if u not in self._all:
            raise KeyError(u)
        return self._all - {u}

    def __iter__(self):
        return iter(sorted(self._all))

    def __len__(self) -> int:
        return len(self._all)


# ---- Bell et al.'s parameter choice ----------------------------------------------------------


def _log_hypergeom_pmf(population: int, successes: int, draws: int, x: int) -> float:
    if x < max(0, draws - (population - successes)) or x > min(draws, successes):
        return -math.inf

    def lc(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    return lc(successes, x) + lc(population - successes, draws - x) - lc(population, draws)


def choose_degree(n: int, corrupt_rate: float, dropout_rate: float) -> tuple[int, int] | None:
    """(k, t) for SecAgg+ with n clients, or None when only the complete graph works.

    Smallest even degree k < n - 1 meeting Bell et al.'s connectivity, security and correctness
    bounds (see the module docstring) for the given assumed corrupt and dropout fractions; t is
    the smallest secure threshold, and never below k/2 + 1.
    """
    if not (0 <= corrupt_rate < 1 and 0 <= dropout_rate < 1 and corrupt_rate + 2 * dropout_rate <= 0.9):
        raise ConfigurationError(
            f"assumed corrupt rate {corrupt_rate} and dropout rate {dropout_rate} must satisfy "
            "corrupt + 2 x dropout <= 0.9 (Bell et al.'s semi-malicious feasibility condition)"
        )
    adv = math.floor(corrupt_rate * n + 1e-9)
    bad = adv + math.floor(dropout_rate * n + 1e-9)
    survivors = math.ceil((1 - dropout_rate) * n - 1e-9)
    eps_sec = 2.0 ** -(SIGMA + 1) / n
    eps_cor = 2.0 ** -ETA / n
    for k in range(2, n - 1, 2):
        if k <= bad:  # both k/2-gaps of the ring must be entirely corrupt or dropped
            log_p = (
                math.log(n) + math.log(n - k - 1) - math.log(2)
                + math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1) - math.lgamma(bad - k + 1)
            )
            if log_p >= -(SIGMA + 1) * math.log(2):
                continue
        # t1: the number of corrupt neighbours exceeds t1 with probability <= eps_sec
        tail, t1 = 0.0, -1
        for x in range(k, -1, -1):
            p = math.exp(_log_hypergeom_pmf(n, adv, k, x))
            if tail + p > eps_sec:
                t1 = x
                break
            tail += p
        # t2: fewer than t2 neighbours survive with probability <= eps_cor
        cdf, t2 = 0.0, 0
        for x in range(0, k + 1):
            p = math.exp(_log_hypergeom_pmf(n, survivors, k, x))
            if cdf + p > eps_cor:
                t2 = x
                break
            cdf += p
        # more than t1 corrupt neighbours has probability <= eps_sec; a malicious server needs
        # c >= 2t - (k + 1) of them (module docstring), so 2t >= t1 + k + 2 keeps it out
        t_low = max(math.ceil((t1 + k + 2) / 2), k // 2 + 1, 2)
        if t_low <= t2:
            return k, t_low
    return None


def neighbourhood_failure_log2(plan, corrupt_rate: float) -> float:
    """log2 of an upper bound on the probability that, in one graph drawn for `plan`, some
    client's k neighbour slots hold more than `plan.tolerated_colluders` of the
    floor(corrupt_rate n_max) corrupt clients -- the event that lets a malicious server collect
    both kinds of that client's shares. Union bound over the n_max clients of the hypergeometric
    tail P[X >= 2t - h], X ~ HG(n_max - 1, corrupt, k). -inf when it cannot happen (there are
    not enough corrupt clients). For the complete graph there is no randomness: None.
    """
    if plan.degree is None:
        return None
    n, k = plan.n_max, plan.degree
    bad = math.floor(corrupt_rate * n + 1e-9)
    need = plan.tolerated_colluders + 1
    if need > min(k, bad):
        return -math.inf
    logs = [_log_hypergeom_pmf(n - 1, bad, k, x) for x in range(need, min(k, bad) + 1)]
    top = max(logs)
    tail = top + math.log(sum(math.exp(v - top) for v in logs))
    return (math.log(n) + tail) / math.log(2)
