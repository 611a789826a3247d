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
from collections.abc import Sequence

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


def permutation(ids: Sequence[int], session: bytes, slots: int | None = None) -> list[int | None]:
    """A uniformly random placement of `ids` (sorted first) on a ring of `slots` positions
    (default: len(ids)), drawn from the session id; empty slots are None. With slots = len(ids)
    this is a uniformly random permutation of `ids`."""
    order: list[int | None] = sorted(ids)
    if slots is not None:
        if slots < len(order):
            raise ConfigurationError(f"{len(order)} clients do not fit on a ring of {slots} slots")
        order += [None] * (slots - len(order))
    stream = _WordStream(hkdf(session, LABEL + b"/graph"))
    for i in range(len(order) - 1, 0, -1):  # Fisher-Yates
        j = stream.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(ids: Sequence[int], degree: int | None, session: bytes, who: Sequence[int] | None = None,
               slots: int | None = None) -> dict[int, frozenset[int]]:
    """Neighbour sets (excluding the node itself) for the clients in `who` (default: all).

    `degree` None gives the complete graph over `ids`. Otherwise the Harary graph of `degree`
    over a ring of `slots` positions (default: len(ids); the protocol uses n_max): a client's
    neighbours are the listed clients in the `degree` slots nearest to it, so at most `degree`.
    """
    ids = sorted(ids)
    who = ids if who is None else list(who)
    n = len(ids) if slots is None else slots
    if degree is None or degree >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in who}
    if degree < 2 or degree % 2:
        raise ConfigurationError(f"SecAgg+ degree must be an even number >= 2, found {degree}")
    ring = permutation(ids, session, n)
    pos = {u: i for i, u in enumerate(ring) if u is not None}
    half = degree // 2
    out = {}
    for u in who:
        i = pos[u]
        out[u] = frozenset(v for v in (ring[(i + d) % n] for d in range(-half, half + 1) if d) if v is not None)
    return out


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
