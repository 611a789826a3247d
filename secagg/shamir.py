"""t-of-n Shamir secret sharing of 256-bit secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

A secret s < 2^256 is the constant term of a random polynomial f of degree t - 1 whose other
coefficients are uniform in [0, p) (from `secrets`). Holder x (a non-zero field element; the
protocol uses client id + 1) receives f(x). Any t shares give s back by Lagrange interpolation at
0; any t - 1 shares are jointly uniform, independent of s.

Integrity. `reconstruct` interpolates from the t shares with the smallest x and, when it is
given more, checks that the (t+1)-th lies on the same polynomial: a share that was changed
(one flipped bit, or a forged value) among those t + 1 makes them inconsistent -- the error
adds delta * L_i(x) with L_i(x) != 0 -- and raises `ReconstructionFailed`. Shares beyond the
t + 1 used play no part in the result. With exactly t shares there is no redundancy: the range
check (the result must be below 2^256) catches an unrelated value except with probability
about 2^-265 but not a small offset (the Lagrange weights of small x are small integers). That
is why the protocol never relies on it alone: each client commits to its self-mask seed (a
hash in its signed share message) and each mask key is checked against its advertised public
key, so a wrong secret is always a named error, never a wrong sum.
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
def _denominators(xs: tuple[int, ...]) -> tuple[int, ...]:
    """1 / prod_{j != i} (x_i - x_j) mod p, for each i (the barycentric weights)."""
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xi - xj) % PRIME
        dens.append(den)
    return tuple(_batch_inverse(dens))


def _lagrange_at(xs: tuple[int, ...], point: int) -> list[int]:
    """L_i(point) = prod_{j != i} (point - x_j) / (x_i - x_j) mod p; `point` not among xs."""
    diffs = [(point - x) % PRIME for x in xs]
    whole = 1
    for d in diffs:
        whole = whole * d % PRIME
    inv = _batch_inverse(diffs)
    w = _denominators(xs)
    return [whole * inv[i] % PRIME * w[i] % PRIME for i in range(len(xs))]


def _field_value(raw: bytes, what: str) -> int:
    if len(raw) != SHARE_BYTES:
        raise ReconstructionFailed(f"{what}: a share is {len(raw)} bytes, expected {SHARE_BYTES}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ReconstructionFailed(f"{what}: a share is not a field element")
    return y


def reconstruct(shares: dict[int, bytes], threshold: int, what: str = "secret") -> bytes:
    """The 32-byte secret from at least `threshold` shares {x: share}.

    Interpolates at 0 from the t smallest x; if there are more shares, the next one must lie on
    the same polynomial. Raises `ReconstructionFailed` if there are too few shares, a share is
    not a field element, the t + 1 shares used are inconsistent (a changed share), or the result
    is not a 256-bit value.
    """
    if len(shares) < threshold:
        raise ReconstructionFailed(f"{what}: {len(shares)} shares, {threshold} needed")
    order = sorted(shares)
    if any(not isinstance(x, int) or not 0 < x < PRIME for x in order):
        raise ReconstructionFailed(f"{what}: share x-coordinates must be distinct non-zero field elements")
    xs = tuple(order[:threshold])
    ys = [_field_value(shares[x], what) for x in xs]
    s = 0
    for y, li in zip(ys, _lagrange_at(xs, 0)):
        s = (s + y * li) % PRIME
    if len(order) > threshold:
        x_check = order[threshold]
        y_check = _field_value(shares[x_check], what)
        f = 0
        for y, li in zip(ys, _lagrange_at(xs, x_check)):
            f = (f + y * li) % PRIME
        if f != y_check:
            raise ReconstructionFailed(
                f"{what}: the {threshold + 1} shares of holders x={list(xs)[:3]}...{x_check} are inconsistent "
                f"(do not lie on one polynomial of degree {threshold - 1}): a share was changed"
            )
    if s >> SECRET_BITS:
        raise ReconstructionFailed(f"{what}: shares reconstruct to a value outside 256 bits (a corrupted share)")
    return s.to_bytes(SECRET_BITS // 8, "big")
