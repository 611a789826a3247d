"""Primitives: uniform masks, Shamir threshold, authenticated shares, key binding, neighbour graphs."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from secagg import DecryptionFailed, ReconstructionFailed, SecAggParams, aggregate_in_process
from secagg import messages as m
from secagg import shamir
from secagg.graph import choose_degree, neighbours
from secagg.primitives import (
    MaskExpander,
    keystream,
    open_sealed,
    pair_mask_seed,
    seal,
    session_id,
    share_key,
)
from secagg.client import associated_data

# chi-square critical value, 255 degrees of freedom, significance 0.001 (Wilson-Hilferty)
_Z_999 = 3.090232


def chi2_critical(df: int, z: float = _Z_999) -> float:
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def byte_chi2(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    expected = len(data) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def bit_z_scores(words: np.ndarray, bits: int) -> np.ndarray:
    """z-score of the count of ones at each bit position (expect Binomial(N, 1/2))."""
    n = len(words)
    ones = np.array([int(np.count_nonzero((words >> np.array(b, dtype=words.dtype)) & np.array(1, dtype=words.dtype))) for b in range(bits)])
    return (ones - n / 2) / math.sqrt(n / 4)


FIXED_SEED = bytes(range(32))


def test_prg_mask_bytes_are_uniform():
    data = keystream(FIXED_SEED, 1 << 20)
    assert byte_chi2(data) < chi2_critical(255)


@pytest.mark.parametrize("dtype, bits", [(np.uint32, 32), (np.uint64, 64)])
def test_prg_mask_words_have_balanced_bits(dtype, bits):
    words = MaskExpander(1 << 16, dtype).expand(FIXED_SEED).copy()
    assert np.max(np.abs(bit_z_scores(words, bits))) < 4.5  # Bonferroni over <= 64 positions at ~1e-4


def test_the_uniformity_test_can_fail():
    biased = (np.frombuffer(keystream(FIXED_SEED, 1 << 20), dtype=np.uint8) % 251).astype(np.uint8).tobytes()
    assert byte_chi2(biased) > chi2_critical(255)  # a 'mod 251' mask would be caught


def test_masked_input_of_a_zero_vector_looks_uniform():
    captured = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.MASKED_INPUT and sender == 1:
            captured["body"] = bytes(blob[m.ENVELOPE_BYTES:])
        return blob

    n = 1 << 16
    inputs = {c: np.zeros(n) for c in range(3)}
    res = aggregate_in_process(inputs, 1.0, SecAggParams(), tamper=tamper)
    assert np.all(res.sum == 0.0)
    body = captured["body"][: 4 * n]  # the data coordinates, without the clipped counts
    assert byte_chi2(body) < chi2_critical(255)
    assert np.max(np.abs(bit_z_scores(np.frombuffer(body, dtype="<u4"), 32))) < 4.5


def test_masks_depend_on_the_seed_and_cancel_exactly():
    ex = MaskExpander(1000, np.uint32)
    a = ex.expand(FIXED_SEED).copy()
    assert np.array_equal(a, ex.expand(FIXED_SEED))
    assert not np.array_equal(a, ex.expand(bytes(32)))
    acc = np.arange(1000, dtype=np.uint32)
    ex.add(acc, FIXED_SEED)
    ex.subtract(acc, FIXED_SEED)
    assert np.array_equal(acc, np.arange(1000, dtype=np.uint32))
    with pytest.raises(ValueError):
        ex.expand(bytes(16))  # seeds are 256 bits


# ---- Shamir -----------------------------------------------------------------------------------


def test_any_t_shares_reconstruct_and_fewer_do_not():
    secret = bytes(range(100, 132))
    holders = [3, 8, 11, 20, 21, 40, 99]
    shares = shamir.share(secret, holders, 4)
    for subset in itertools.combinations(holders, 4):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 4) == secret
    with pytest.raises(ReconstructionFailed, match="3 shares, 4 needed"):
        shamir.reconstruct({x: shares[x] for x in holders[:3]}, 4)


def test_share_replaced_by_garbage_is_detected():
    holders = [1, 2, 3, 4]
    shares = shamir.share(bytes(range(32)), holders, 3)
    bad = dict(shares)
    bad[2] = random.Random(0).getrandbits(520).to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(ReconstructionFailed, match="outside 256 bits"):
        shamir.reconstruct({x: bad[x] for x in (1, 2, 3)}, 3)


# ---- AEAD and key derivation ------------------------------------------------------------------


def test_every_single_bit_flip_of_an_encrypted_share_is_refused():
    key = bytes(range(32))
    ad = associated_data(bytes(32), 5, 1, 2, m.Stage.SHARE_KEYS)
    blob = seal(key, bytes(m.SHARE_PLAINTEXT_BYTES), ad)
    assert len(blob) == m.SHARE_CIPHERTEXT_BYTES
    for i in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecryptionFailed):
            open_sealed(key, bytes(flipped), ad)
    assert open_sealed(key, blob, ad) == bytes(m.SHARE_PLAINTEXT_BYTES)


@pytest.mark.parametrize(
    "other",
    [
        dict(session=b"\x01" * 32),
        dict(round_id=6),
        dict(sender=9),
        dict(recipient=9),
        dict(stage=m.Stage.UNMASKING),
    ],
)
def test_share_bound_to_another_context_does_not_decrypt(other):
    ctx = dict(session=bytes(32), round_id=5, sender=1, recipient=2, stage=m.Stage.SHARE_KEYS)
    key = bytes(range(32))
    blob = seal(key, b"share", associated_data(**ctx))
    with pytest.raises(DecryptionFailed):
        open_sealed(key, blob, associated_data(**{**ctx, **other}))


def test_key_derivation_binds_session_and_ids():
    shared, s1, s2 = b"k" * 32, b"a" * 32, b"b" * 32
    assert share_key(shared, s1, 1, 2) != share_key(shared, s1, 2, 1)  # one key per direction
    assert share_key(shared, s1, 1, 2) != share_key(shared, s2, 1, 2)
    assert pair_mask_seed(shared, s1, 1, 2) == pair_mask_seed(shared, s1, 2, 1)  # both ends agree
    assert pair_mask_seed(shared, s1, 1, 2) != pair_mask_seed(shared, s2, 1, 2)
    assert pair_mask_seed(shared, s1, 1, 2) != pair_mask_seed(shared, s1, 1, 3)


def test_session_id_covers_every_key_in_id_order():
    entries = [(c, bytes([c]) * 32, bytes([c + 50]) * 32, bytes([c + 100]) * 32) for c in range(5)]
    sid = session_id(b"d" * 32, 3, entries)
    assert session_id(b"d" * 32, 3, list(reversed(entries))) == sid
    assert session_id(b"d" * 32, 4, entries) != sid
    assert session_id(b"e" * 32, 3, entries) != sid
    for i in range(5):
        for field in (1, 2, 3):
            changed = [list(e) for e in entries]
            changed[i][field] = b"\xff" * 32
            assert session_id(b"d" * 32, 3, [tuple(e) for e in changed]) != sid


# ---- neighbour graphs -------------------------------------------------------------------------


def test_secagg_plus_graph_is_symmetric_regular_and_fixed_by_the_session():
    ids = random.Random(1).sample(range(10_000), 200)
    g = neighbours(ids, 12, b"s" * 32)
    assert all(len(v) == 12 and u not in v for u, v in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == neighbours(ids, 12, b"s" * 32)
    assert g != neighbours(ids, 12, b"t" * 32)
    assert neighbours(ids, 12, b"s" * 32, who=ids[:3]) == {u: g[u] for u in ids[:3]}


def plain_fisher_yates(items, key, slots):
    """The shuffle as first written: one AES-256-CTR word at a time, words of each 4096-byte block
    taken last first, rejection sampling for each draw."""
    import struct

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words: list[int] = []
    order = list(items) + [None] * (slots - len(items))
    for i in range(slots - 1, 0, -1):
        bound = i + 1
        while True:
            if not words:
                words = list(struct.unpack("<512Q", enc.update(bytes(4096))))
            w = words.pop()
            if w < (1 << 64) - ((1 << 64) % bound):
                break
        j = w % bound
        order[i], order[j] = order[j], order[i]
    return order


@pytest.mark.parametrize("count, slots", [(1, 1), (2, 2), (5, 9), (200, 200), (513, 700), (3000, 3300)])
def test_ring_is_the_plain_fisher_yates_shuffle_and_needs_only_the_list_length(count, slots, monkeypatch):
    from secagg import graph
    from secagg.primitives import LABEL, hkdf

    session = bytes([count % 251]) * 32
    ref = plain_fisher_yates(range(count), hkdf(session, LABEL + b"/graph"), slots)
    assert graph.ring(count, session, slots) == ref
    ids = sorted(random.Random(count).sample(range(10**6), count))
    assert graph.permutation(ids, session, slots) == [None if p is None else ids[p] for p in ref]
    if count >= 5:  # a client's neighbour positions, from the length and its own position only
        nb = graph.neighbours(ids, 4, session, slots=slots)
        for p in (0, count // 2, count - 1):
            assert {ids[q] for q in graph.neighbour_positions(count, 4, session, p, slots)} == nb[ids[p]]
    monkeypatch.setattr(graph, "_swap_draws", lambda key, n: None)  # the word-by-word fallback
    assert graph.ring(count, session, slots) == ref


def test_complete_graph_without_a_degree():
    g = neighbours([4, 1, 9], None, b"s" * 32)
    assert g == {1: {4, 9}, 4: {1, 9}, 9: {1, 4}}
    assert neighbours([4, 1, 9], 2, b"s" * 32) == g  # degree n - 1 is complete


def test_bell_et_al_degree_grows_logarithmically_and_threshold_exceeds_half():
    found = {n: choose_degree(n, 0.05, 0.1) for n in (100, 1000, 10_000, 100_000)}
    for n, (k, t) in found.items():
        assert k % 2 == 0 and k < n - 1 and 2 * t > k + 1 and t <= k + 1
    ks = [found[n][0] for n in sorted(found)]
    assert ks == sorted(ks) and ks[-1] < 2 * ks[1]  # 100x more clients, less than twice the degree
    assert SecAggParams(neighbours="auto").resolve(1000).degree == found[1000][0]


def test_secagg_imports_neither_torch_nor_the_other_packages():
    import subprocess
    import sys

    code = "import sys, secagg; bad = [m for m in ('torch', 'privlora', 'accounting') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype, length", [(np.uint32, 100_003), (np.uint64, 40_001), (np.uint32, 5)])
def test_chunked_masking_equals_whole_masks_added_one_by_one(dtype, length):
    seeds = [bytes([i]) * 32 for i in range(5)]
    signs = [1, -1, 1, 1, -1]
    ex = MaskExpander(length, dtype)
    acc = np.arange(length, dtype=dtype)
    ex.apply(acc, list(zip(seeds, signs)))
    ref = np.arange(length, dtype=dtype)
    for seed, sign in zip(seeds, signs):
        (ex.add if sign > 0 else ex.subtract)(ref, seed)
    assert np.array_equal(acc, ref)
