"""t-of-n Shamir secret sharing of 256-bit secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret s < 2^256 is the constant term of a random polynomial f of degree t - 1 whose other
coefficients are uniform in [0, p) (from `secrets`). Holder x (a non-zero field element; the
protocol uses client id + 1) receives f(x). Any t shares give s back by Lagrange interpolation at
0; any t - 1 shares are jointly uniform, independent of s.

The field is much larger than the secret space: a share replaced by an unrelated value makes the
reconstruction land outside [0, 2^256) except with probability about 2^-265, so `reconstruct`
checks the range and raises `ReconstructionFailed`. This is a sanity check, not integrity: a
deliberately small offset (e.g. one flipped low bit) shifts the secret by a small multiple of a
Lagrange coefficient and can go unnoticed. The protocol additionally checks every reconstructed
mask key against its advertised public key; a wrong self-mask seed corrupts the sum, which a
malicious client could do anyway by sending a wrong input.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from functools import lru_cache

from .errors import ReconstructionFailed

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BITS = 256


def share(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Split a 32-byte secret into shares for `holders` (distinct non-zero x < p), t-of-n."""
    if len(secret) * 8 != SECRET_BITS:
        raise ValueError(f"secrets are {SECRET_BITS // 8} bytes, found {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in [1, {len(holders)}] (the number of holders)")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError("share holders must be distinct non-zero field elements")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in holders:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def _batch_inverse(values: list[int]) -> list[int]:
    """Modular inverses of non-zero values with one exponentiation (Montgomery's trick)."""
    prefix, acc = [], 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % PRIME
    inv = pow(acc, -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p."""
    total = 1
    for x in xs:
        total = total * x % PRIME
    nums, dens = [], []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xj - xi) % PRIME
        nums.append(xi)
        dens.append(den)
    inv = _batch_inverse(nums + dens)  # 1/x_i and 1/den_i together
    t = len(xs)
    return tuple(total * inv[i] % PRIME * inv[t + i] % PRIME for i in range(t))


def reconstruct(shares: dict[int, bytes], threshold: int, what: str = "secret") -> bytes:
    """The 32-byte secret from at least `threshold` shares {x: share}; uses the t smallest x.

    Raises `ReconstructionFailed` if there are too few shares, a share is not a field element,
    or the result is not a 256-bit value (a corrupted share).
    """
    if len(shares) < threshold:
        raise ReconstructionFailed(f"{what}: {len(shares)} shares, {threshold} needed")
    xs = tuple(sorted(shares)[:threshold])
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ReconstructionFailed(f"{what}: share x-coordinates must be distinct non-zero field elements")
    lam = _lagrange_at_zero(xs)
    s = 0
    for x, li in zip(xs, lam):
        raw = shares[x]
        if len(raw) != SHARE_BYTES:
            raise ReconstructionFailed(f"{what}: a share is {len(raw)} bytes, expected {SHARE_BYTES}")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise ReconstructionFailed(f"{what}: a share is not a field element")
        s = (s + y * li) % PRIME
    if s >> SECRET_BITS:
        raise ReconstructionFailed(f"{what}: shares reconstruct to a value outside 256 bits (a corrupted share)")
    return s.to_bytes(SECRET_BITS // 8, "big")
