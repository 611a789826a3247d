#!/usr/bin/env python3
"""Cost of client-level distributed noise (privlora/federation/distributed_noise.py) per client
and on the server, against numpy floors measured in the same run.

For D = 2^12, 2^16, 2^20 coordinates (a contribution of D - 3 float64 values, padded to D):

- rotate / unrotate: the randomized Hadamard transform (log2 D in-place butterfly passes);
- round: one conditional randomized rounding at Kairouz et al.'s beta = exp(-0.5);
- discrete Gaussian / Skellam: D draws of one client's noise share (the exact CKS sampler;
  numpy Poisson differences);
- encode (DDG, Skellam): the whole client side (flatten, clip, rotate, scale, round, noise, mod);
- decode: the server side for a sum of n = 10 encodings (centre, rescale, unrotate, unflatten);
- floors: numpy's float Gaussian draws (rng.standard_normal) and one elementwise float64 pass
  (x * 2.0) on D values, for scale.

Median of --repeats runs (default 5), seconds. The parameters: C = 1, bits = 32, n = 10 inputs,
scale from `choose_scale` with local noise 0.1 C / sqrt(n) in model units.

    python benchmarks/distributed_noise.py [--quick] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privlora.federation.distributed_noise import (
    DDG,
    SKELLAM,
    ClientEncoder,
    DistributedNoiseParams,
    Layout,
    choose_scale,
    conditional_randomized_round,
    decode_sum,
    modular_sum,
    noise_generator,
    sample_discrete_gaussian,
    sample_skellam,
)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(log_d: int, repeats: int) -> dict[str, float]:
    d = 1 << log_d
    n, bits, c = 10, 32, 1.0
    rng = noise_generator(log_d)
    contribution = {"lora_A": rng.standard_normal(d - 3) * 0.01, "weight": np.ones(3)}
    layout = Layout.of(contribution)
    local = 0.1 * c / math.sqrt(n)
    scale = choose_scale(bits=bits, clip_norm=c, dim=layout.size, n=n, local_stddev=local)
    seed = os.urandom(32)
    ddg = DistributedNoiseParams(mechanism=DDG, clip_norm=c, scale=scale, bits=bits, layout=layout, rotation_seed=seed, min_inputs=n, sigma=local * scale)
    sk = DistributedNoiseParams(mechanism=SKELLAM, clip_norm=c, scale=scale, bits=bits, layout=layout, rotation_seed=seed, min_inputs=n, variance=(local * scale) ** 2)
    x = np.concatenate([contribution["lora_A"], contribution["weight"]])
    x /= max(1.0, float(np.linalg.norm(x)))
    rot = ddg.rotation
    y = rot.rotate(x) * scale
    enc_ddg, enc_sk = ClientEncoder(ddg), ClientEncoder(sk)
    summed = modular_sum([enc_ddg.encode(contribution, rng)[0] for _ in range(n)], bits)
    return {
        "D": d,
        "rotate": median_seconds(lambda: rot.rotate(x), repeats),
        "unrotate": median_seconds(lambda: rot.unrotate(y), repeats),
        "round": median_seconds(lambda: conditional_randomized_round(y, ddg.rounding_bound, rng), repeats),
        "discrete Gaussian": median_seconds(lambda: sample_discrete_gaussian(ddg.sigma, d, rng), repeats),
        "Skellam": median_seconds(lambda: sample_skellam(sk.variance, d, rng), repeats),
        "encode DDG": median_seconds(lambda: enc_ddg.encode(contribution, rng), repeats),
        "encode Skellam": median_seconds(lambda: enc_sk.encode(contribution, rng), repeats),
        "decode (n=10)": median_seconds(lambda: decode_sum(summed, ddg, num_inputs=n), repeats),
        "floor: float normals": median_seconds(lambda: rng.standard_normal(d), repeats),
        "floor: one float pass": median_seconds(lambda: x * 2.0, repeats),
    }


def table(rows: list[dict[str, float]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join([f"2^{int(math.log2(r['D']))}"] + [f"{r[k]:.4f}" for k in cols[1:]]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D = 2^12 and 2^16 only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    sizes = [12, 16] if args.quick else [12, 16, 20]
    rows = [row(k, args.repeats) for k in sizes]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join(
        [
            f"# Distributed noise: seconds per call (median of {args.repeats} runs)",
            "",
            "Command: `python benchmarks/distributed_noise.py " + " ".join(sys.argv[1:]) + "`",
            (f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, load average {load:.1f} at the end"),
            "",
            table(rows),
            "",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
