"""Where DP-SGD's Gaussian noise comes from: torch's seeded generator, or a secure one.

- ``"seeded"`` (simulation, the default of `privlora run`): Opacus draws noise from torch's
  global Mersenne Twister, which the client seeds from (run seed, round, client). Runs repeat
  bit for bit, which experiments and crash-resume tests need; anyone who knows the seed can
  recompute the noise, so this is not for deployment.
- ``"secure"`` (Flower deployment nodes): noise from ChaCha20 keyed with 256 bits from the
  operating system (``os.urandom``), turned into Gaussians by the Box-Muller transform in
  float64. Opacus's own ``secure_mode`` needs the ``torchcsprng`` package, which has no build
  for current torch; this is the equivalent. Like Opacus's secure mode it averages several
  draws (the sum of 4 standard normals divided by 2 is exactly N(0, 1)) to blunt attacks on the
  floating-point representation of a single sample (Mironov 2012); it does not claim more.

`noise_source(kind)` is a context manager: inside it, Opacus's noise generation uses the chosen
source. The report records which source each client used.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

NOISE_SOURCES = ("seeded", "secure")


class SecureGaussian:
    """Standard normal float64 samples from ChaCha20 keyed by ``os.urandom(32)``."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        key, nonce = os.urandom(32), os.urandom(16)
        self._enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def _uniform(self, n: int) -> np.ndarray:
        """n doubles uniform on (0, 1]: 53 random bits each, never exactly 0."""
        words = np.frombuffer(self._enc.update(bytes(8 * n)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)

    def standard_normal(self, n: int) -> np.ndarray:
        """n draws of N(0, 1): each the sum of 4 Box-Muller normals divided by 2."""
        m = 2 * n  # 4 normals per output, 2 per Box-Muller pair
        u1, u2 = self._uniform(m), self._uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
        return z.reshape(4, n).sum(axis=0) / 2.0


@contextlib.contextmanager
def noise_source(kind: str):
    """Make Opacus draw its DP noise from ``kind`` ("seeded" or "secure") inside the block."""
    if kind not in NOISE_SOURCES:
        raise ValueError(f"noise source must be one of {NOISE_SOURCES}, found {kind!r}")
    global _CURRENT
    previous, _CURRENT = _CURRENT, kind
    try:
        if kind == "seeded":
            yield
            return
        with _secure_opacus():
            yield
    finally:
        _CURRENT = previous


_CURRENT = "seeded"


def current_noise_source() -> str:
    """The source chosen by the innermost `noise_source` block ("seeded" outside any)."""
    return _CURRENT


def integer_noise_generator(seed: int, *parts: int) -> np.random.Generator:
    """The generator of a client's client-level noise (rounding and noise shares): under a
    "secure" `noise_source`, `distributed_noise.noise_generator` keyed from the operating system;
    otherwise (simulation) a reproducible one from (run seed, parts)."""
    from privlora.federation.distributed_noise import noise_generator

    if _CURRENT == "secure":
        return noise_generator(None)
    return noise_generator(int(np.random.SeedSequence([int(seed), *map(int, parts)]).generate_state(1, dtype=np.uint64)[0] >> 1))


@contextlib.contextmanager
def _secure_opacus():
    import torch
    from opacus.optimizers import optimizer as dp_optimizer_module

    source = SecureGaussian()
    original = dp_optimizer_module._generate_noise

    def secure_noise(std, reference, generator=None, secure_mode=False):
        if std == 0:
            return torch.zeros(reference.shape, device=reference.device, dtype=reference.dtype)
        z = source.standard_normal(int(reference.numel())) * float(std)
        return torch.from_numpy(z).to(dtype=reference.dtype, device=reference.device).view(reference.shape)

    dp_optimizer_module._generate_noise = secure_noise
    try:
        yield
    finally:
        dp_optimizer_module._generate_noise = original
