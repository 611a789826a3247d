#!/usr/bin/env python3
"""Cost of one distributed-noise round's secure sum at the 508-client benchmark's size (issue 30).

For n = 50, 76, 100 clients per round, SecAgg+ with Bell et al.'s "auto" degree (10% dropouts,
5% corrupt assumed, no dropouts happening), D = 2^16 values per client, the distributed
discrete Gaussian at 16 bits carried in 32-bit words (``secagg.bits = 32``), the encoding that
privlora's nodes use under ``privacy.unit = "client"`` (`EncodingSpec.integers`):

- client: encode (clip, rotate, scale, round, noise, mod 2^16: `ClientEncoder`), median seconds;
  the protocol's own seconds per client (mean); bytes sent per client;
- server: protocol seconds, then decode (centre, rescale, unrotate) seconds;
- peak resident memory of the whole simulation (one process plays every party).

Noise: z = 1 (the counted shares together have std C = 1 before rounding; sigma per client
scale / sqrt(counted shares)), for cost only: the cost does not depend on the noise level.

    python benchmarks/client_level_secure_sum.py [--sizes 50 76 100] [--dim 65536] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(n: int, dim: int) -> dict:
    from privlora.federation.distributed_noise import (
        DDG,
        ClientEncoder,
        DistributedNoiseParams,
        Layout,
        choose_scale,
        decode_sum,
        noise_generator,
    )
    from secagg import EncodingSpec, SecAggClient, SecAggParams, SecAggServer
    from secagg.simulation import run_session

    plan = SecAggParams(bits=32, neighbours="auto", dropout_rate=0.1).resolve(n)
    length = dim - 3  # padded to dim
    layout = Layout((("x", (length,)),))
    n_min = plan.min_clients
    scale = choose_scale(bits=16, clip_norm=1.0, dim=length, n=n, local_stddev=1.0 / np.sqrt(n_min))
    params = DistributedNoiseParams(mechanism=DDG, clip_norm=1.0, scale=scale, bits=16, layout=layout,
                                    rotation_seed=bytes(16), min_inputs=n_min, sigma=max(0.5, scale / np.sqrt(n_min)))
    spec = EncodingSpec.integers(params.padded_dim, modulus_bits=16, bits=plan.bits, max_clients=plan.n_max)
    rng = np.random.default_rng(0)
    enc_seconds = []
    encoder = ClientEncoder(params)

    def provide(c: int) -> np.ndarray:
        x = rng.normal(size=length)
        t = time.perf_counter()
        v, _ = encoder.encode({"x": x}, noise_generator(c))
        enc_seconds.append(time.perf_counter() - t)
        return v

    nonce = os.urandom(32)
    clients = {c: SecAggClient(c, plan, spec, 1, session_nonce=nonce) for c in range(n)}
    server = SecAggServer(plan, spec, 1, expected=list(range(n)), session_nonce=nonce)
    res, st = run_session(clients, server, None, provide_input=provide)
    t = time.perf_counter()
    residues, _ = spec.decode(res.field_sum)
    _, rep = decode_sum(residues, params, num_inputs=len(res.survivors))
    decode = time.perf_counter() - t
    return {
        "n": n, "degree": plan.degree, "threshold": plan.threshold, "min_inputs": n_min, "D": params.padded_dim,
        "encode_s": statistics.median(enc_seconds), "client_protocol_s": statistics.mean(st.client_seconds.values()),
        "bytes_up": statistics.mean(st.bytes_up.values()), "server_s": st.server_seconds, "decode_s": decode,
        "wraps": rep.suspect, "wrap_p": rep.wrap_probability,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 76, 100])
    ap.add_argument("--dim", type=int, default=2**16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "client_level_secure_sum.md"))
    args = ap.parse_args(argv)
    rows = [one(n, args.dim) for n in args.sizes]
    lines = [
        "# Distributed-noise secure sum at the 508-client benchmark's size",
        "",
        f"`python benchmarks/client_level_secure_sum.py --sizes {' '.join(map(str, args.sizes))} --dim {args.dim}` on "
        f"{platform.machine()} ({os.cpu_count()} cores, shared), Python {platform.python_version()}. SecAgg+ degree "
        "'auto' (10% dropouts, 5% corrupt assumed; none happened), discrete Gaussian at 16 bits in 32-bit words. Peak "
        "memory is the process's (it plays every party) and only grows across rows.",
        "",
        "| n | degree | t | noise shares counted | D | client encode s | client protocol s | client bytes up | server s | decode s | wraps | wrap bound | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['degree']} | {r['threshold']} | {r['min_inputs']} | {r['D']} | {r['encode_s']:.3f} | "
                     f"{r['client_protocol_s']:.3f} | {r['bytes_up']:.0f} | {r['server_s']:.2f} | {r['decode_s']:.3f} | "
                     f"{r['wraps']} | {r['wrap_p']:.1e} | {r['peak_gb']:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
