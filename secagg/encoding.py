"""Float vectors to fixed point in Z_(2^b) and back, with clipping that is counted, never silent.

A vector is cut into segments (one, or several of very different magnitudes, e.g. a weight
n_k ~ 1000 followed by LoRA factors ~ 0.05), each with its own clip range c_j. Within segment j:

    x  ->  clip(x, -c_j, c_j) * 2^f_j  ->  stochastic rounding  ->  q in Z, |q| <= c_j 2^f_j
    q  ->  q mod 2^b (two's complement)

f_j is the largest integer with  n_max * c_j * 2^f_j <= 2^(b-1) - 1, where n_max is the number of
clients that can be in the sum: the sum of any n_max encodings then lies in
[-(2^(b-1) - 1), 2^(b-1) - 1] and is recovered exactly from its residue mod 2^b. Decoding is
q_sum * 2^-f_j (a power of two, so a single rounding from integer to float64, exact while
|q_sum| < 2^53).

Precision is relative to the range: each client's [-c_j, c_j] is resolved into
2 c_j 2^f_j >= 2^precision_bits steps. Shrinking a range therefore does not buy room; what
bounds the configuration is n_max x (2^precision_bits steps) against 2^b. A configuration that
cannot give every client `precision_bits` of resolution without risking a wrap-around is refused
with `OverflowRisk`, whose message names the fixes (fewer clients, a coarser precision_bits,
or bits=64).

Stochastic rounding: q = floor(y) + [u < y - floor(y)] with u uniform in [0, 1), so E[q] = y
exactly (y = x 2^f is exact in float64). The u come from a numpy PCG64 generator seeded with 256
bits from os.urandom. They are NOT a secret and need not be: the masks hide q completely; the
rounding only has to be unbiased and unpredictable enough not to correlate across clients.

Clipping: the number of coordinates with |x| > c_j in each segment is returned in a
`ClipReport` and also appended to the encoded vector as one extra integer coordinate per
segment, so the server learns the *total* clipped count through the secure sum (and nothing
about any single client's count). A count is capped at floor((2^(b-1) - 1) / n_max) so the
counters cannot wrap either; `EncodingSpec.counts_exact` says whether the cap can bite.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput, OverflowRisk

ClipArg = float | int | Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Segment:
    """`length` coordinates clipped to [-clip, clip] and scaled by 2^frac_bits."""

    length: int
    clip: float
    frac_bits: int

    @property
    def step(self) -> float:
        """Quantization step of one client's value (the rounding error is below one step)."""
        return math.ldexp(1.0, -self.frac_bits)


@dataclass(frozen=True)
class ClipReport:
    """How many coordinates of one client's vector were clipped, in total and per segment."""

    clipped: int
    per_segment: tuple[int, ...]
    length: int

    @property
    def fraction(self) -> float:
        return self.clipped / self.length if self.length else 0.0


def _frac_bits(clip: float, limit: int) -> int:
    """Largest f with clip * 2^f <= limit (exact comparison in float/int arithmetic)."""
    f = math.floor(math.log2(limit) - math.log2(clip))
    while math.ldexp(clip, f) > limit:
        f -= 1
    while math.ldexp(clip, f + 1) <= limit:
        f += 1
    return f


@dataclass(frozen=True)
class EncodingSpec:
    """The agreed fixed-point format: bits, number of clients, segments and their scales.

    Build it with `EncodingSpec.build`; every client and the server must use the same spec (its
    digest is bound into the session id).
    """

    bits: int
    max_clients: int
    precision_bits: int
    segments: tuple[Segment, ...]
    modulus_bits: int = 0
    """0: the fixed-point float encoding above. m in [1, bits]: integer inputs already in
    Z_(2^m) (`EncodingSpec.integers`): no scaling or clipping, and the masked vector a client
    sends and the sum the server decodes are reduced mod 2^m (masks mod 2^bits reduced mod 2^m
    are still uniform, since 2^m divides 2^bits), so nobody sees more than the sum mod 2^m."""

    @classmethod
    def build(cls, clip: ClipArg, length: int, *, bits: int, max_clients: int, precision_bits: int = 16) -> "EncodingSpec":
        """Segments from one clip range for the whole vector, or a list of (length, range).

        Raises `InvalidInput` for a bad range or lengths that do not add up to `length`, and
        `OverflowRisk` when `max_clients` values at `precision_bits` of resolution could wrap
        Z_(2^bits).
        """
        if bits not in (32, 64):
            raise InvalidInput(f"bits must be 32 or 64, found {bits!r}")
        if not isinstance(max_clients, int) or max_clients < 1:
            raise InvalidInput(f"max_clients must be a positive int, found {max_clients!r}")
        if not isinstance(precision_bits, int) or not 1 <= precision_bits <= bits - 2:
            raise InvalidInput(f"precision_bits must be an int in [1, {bits - 2}], found {precision_bits!r}")
        if not isinstance(length, int) or length < 1:
            raise InvalidInput(f"vector length must be a positive int, found {length!r}")
        if isinstance(clip, (int, float)) and not isinstance(clip, bool):
            raw = [(length, float(clip))]
        else:
            try:
                raw = [(int(n), float(c)) for n, c in clip]
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"clip must be a number or a list of (length, range) pairs: {exc}") from exc
            if not raw:
                raise InvalidInput("clip segment list is empty")
        if sum(n for n, _ in raw) != length:
            raise InvalidInput(
                f"clip segments cover {sum(n for n, _ in raw)} coordinates but the vector has {length}"
            )
        limit = ((1 << (bits - 1)) - 1) // max_clients
        segs = []
        for n, c in raw:
            if n < 1:
                raise InvalidInput(f"clip segment length must be >= 1, found {n}")
            if not (math.isfinite(c) and 1e-30 <= c <= 1e30):
                raise InvalidInput(f"clip range must be finite and in [1e-30, 1e30], found {c!r}")
            f = _frac_bits(c, limit)
            if 2 * math.ldexp(c, f) < (1 << precision_bits):
                need = math.log2(max_clients) + precision_bits + 1
                raise OverflowRisk(
                    f"{max_clients} clients x a quantized range of 2^{precision_bits} steps each need about "
                    f"{need:.1f} bits but Z_(2^{bits}) has {bits}: the sum could wrap around the modulus. "
                    f"Use fewer clients, a coarser precision_bits (< {precision_bits}), or bits=64."
                )
            segs.append(Segment(n, c, f))
        return cls(bits=bits, max_clients=max_clients, precision_bits=precision_bits, segments=tuple(segs))

    @classmethod
    def integers(cls, length: int, *, modulus_bits: int, bits: int, max_clients: int) -> "EncodingSpec":
        """The encoding of vectors of ``length`` integers in [0, 2^modulus_bits), summed mod
        2^modulus_bits (e.g. distributed DP's noised, rounded vectors). The sum of any number of
        them is only ever known mod 2^modulus_bits; wrap-around is the caller's to bound."""
        if bits not in (32, 64):
            raise InvalidInput(f"bits must be 32 or 64, found {bits!r}")
        if isinstance(modulus_bits, bool) or not isinstance(modulus_bits, int) or not 1 <= modulus_bits <= bits:
            raise InvalidInput(f"modulus_bits must be an int in [1, {bits}], found {modulus_bits!r}")
        if not isinstance(max_clients, int) or max_clients < 1:
            raise InvalidInput(f"max_clients must be a positive int, found {max_clients!r}")
        if not isinstance(length, int) or length < 1:
            raise InvalidInput(f"vector length must be a positive int, found {length!r}")
        return cls(bits=bits, max_clients=max_clients, precision_bits=min(modulus_bits, bits - 2),
                   segments=(Segment(length, float(2 ** modulus_bits), 0),), modulus_bits=modulus_bits)

    @property
    def modulus_mask(self) -> int:
        """2^modulus_bits - 1 (integer mode), or 2^bits - 1."""
        return (1 << (self.modulus_bits or self.bits)) - 1

    def reduce(self, v: np.ndarray) -> None:
        """In integer mode, reduce ``v`` (this spec's dtype) mod 2^modulus_bits in place."""
        if self.modulus_bits and self.modulus_bits < self.bits:
            np.bitwise_and(v, v.dtype.type(self.modulus_mask), out=v)

    # ---- shape ----------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Number of data coordinates (the float vector's length)."""
        return sum(s.length for s in self.segments)

    @property
    def total_length(self) -> int:
        """Encoded length: data plus one clipped-count coordinate per segment."""
        return self.length + len(self.segments)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.bits == 32 else np.dtype("<u8")

    @property
    def count_cap(self) -> int:
        return ((1 << (self.bits - 1)) - 1) // self.max_clients

    @property
    def counts_exact(self) -> bool:
        """True when no client's clipped count can reach the cap (so summed counts are exact)."""
        return all(s.length <= self.count_cap for s in self.segments)

    def digest(self) -> bytes:
        h = hashlib.sha256(b"privlora-secagg/v1/encoding")
        h.update(struct.pack(">BIBI", self.bits, self.max_clients, self.precision_bits, len(self.segments)))
        for s in self.segments:
            h.update(struct.pack(">Qdi", s.length, s.clip, s.frac_bits))
        if self.modulus_bits:
            h.update(b"integers mod 2^" + struct.pack(">B", self.modulus_bits))
        return h.digest()

    # ---- encode / decode ------------------------------------------------------------------

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, ClipReport]:
        """Encode one client's float vector: (uint32/uint64 vector of `total_length`, ClipReport)."""
        x = np.asarray(x)
        if x.ndim != 1 or x.shape[0] != self.length:
            raise InvalidInput(f"expected a 1-D vector of length {self.length}, found shape {x.shape}")
        if self.modulus_bits:
            return self._encode_integers(x)
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise InvalidInput(f"expected a float vector, found dtype {x.dtype}")
        x = x.astype(np.float64, copy=False)
        if not np.all(np.isfinite(x)):
            raise InvalidInput(f"input has {int(np.sum(~np.isfinite(x)))} non-finite values (NaN or inf)")
        if rng is None:
            rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
        out = np.empty(self.total_length, dtype=self.dtype)
        signed = out.view(np.int32 if self.bits == 32 else np.int64)
        counts = []
        start = 0
        for j, seg in enumerate(self.segments):
            xs = x[start : start + seg.length]
            over = int(np.count_nonzero(xs > seg.clip)) + int(np.count_nonzero(xs < -seg.clip))
            counts.append(over)
            y = np.clip(xs, -seg.clip, seg.clip)
            np.multiply(y, math.ldexp(1.0, seg.frac_bits), out=y)  # exact: a power of two
            q = np.floor(y)
            np.subtract(y, q, out=y)  # fractional part in [0, 1)
            q += rng.random(seg.length) < y  # round up with probability = fractional part
            # |q| <= c 2^f <= (2^(b-1) - 1) / n_max: the cast to the signed b-bit type is exact
            np.copyto(signed[start : start + seg.length], q, casting="unsafe")
            signed[self.length + j] = min(over, self.count_cap)
            start += seg.length
        return out, ClipReport(clipped=sum(counts), per_segment=tuple(counts), length=self.length)

    def _encode_integers(self, x: np.ndarray) -> tuple[np.ndarray, ClipReport]:
        if x.dtype.kind not in "iu":
            raise InvalidInput(f"integer encoding: expected an integer vector, found dtype {x.dtype}")
        if x.size and (int(x.min()) < 0 or int(x.max()) > self.modulus_mask):
            raise InvalidInput(f"integer encoding: values must be in [0, 2^{self.modulus_bits}), found [{int(x.min())}, {int(x.max())}]")
        out = np.zeros(self.total_length, dtype=self.dtype)
        out[: self.length] = x.astype(self.dtype)
        return out, ClipReport(clipped=0, per_segment=(0,), length=self.length)

    def decode(self, field_sum: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """From the sum mod 2^b of encodings: (float64 sum of the data, summed clipped counts)."""
        field_sum = np.asarray(field_sum)
        if field_sum.shape != (self.total_length,) or field_sum.dtype != self.dtype:
            raise InvalidInput(f"expected a {self.dtype} vector of length {self.total_length}")
        if self.modulus_bits:  # the residues mod 2^m, unsigned; the caller centres them
            out_int = field_sum[: self.length].astype(np.uint64)
            out_int &= np.uint64(self.modulus_mask)
            return out_int, (0,)
        signed = field_sum.view(np.int32 if self.bits == 32 else np.int64)
        out = np.empty(self.length, dtype=np.float64)
        start = 0
        for seg in self.segments:
            out[start : start + seg.length] = np.ldexp(signed[start : start + seg.length].astype(np.float64), -seg.frac_bits)
            start += seg.length
        counts = tuple(int(c) for c in signed[self.length :])
        return out, counts

