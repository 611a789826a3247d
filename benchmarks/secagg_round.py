#!/usr/bin/env python3
"""One round of the default federated experiment, with and without secure aggregation.

Runs the embedded default (MiniLM, FFA-LoRA, DP) for one round twice — contributions summed in
the clear, then under `secagg` — and compares the global adapters: the largest absolute and
relative difference over every tensor, and the time secure aggregation added to the round.

    python benchmarks/secagg_round.py [--bits 64] [--out benchmarks/results/secagg_round.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/secagg.py must not shadow the secagg package

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from privlora.core.config import ExperimentConfig  # noqa: E402
from privlora.transports.inprocess import run_experiment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = ExperimentConfig()
    base = dataclasses.replace(base, federation=dataclasses.replace(base.federation, rounds=1))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (False, True):
            cfg = dataclasses.replace(base, secagg=dataclasses.replace(base.secagg, enabled=secure, bits=args.bits))
            out = Path(tmp) / ("secure" if secure else "clear")
            t = time.perf_counter()
            run_experiment(cfg, out, progress=False)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[secure] = {
                "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
                "accuracy": rows[-1]["test_accuracy"],
                "secagg": rows[-1].get("secagg"),
                "seconds": time.perf_counter() - t,
            }
    a, b = runs[False]["adapter"], runs[True]["adapter"]
    abs_diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(a[k]))) for k in a)
    changed = sum(int(np.any(a[k] != b[k])) for k in a)
    sec = runs[True]["secagg"]
    cmd = "python benchmarks/secagg_round.py " + " ".join(sys.argv[1:])
    lines = [
        "# One default round: secure aggregation vs the clear sum",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}",
        "",
        "The embedded default (MiniLM, FFA-LoRA rank 8, DP epsilon 8, 5 of 10 clients) for one round, the "
        f"contributions summed in the clear and then under secagg ({args.bits}-bit fixed point, complete graph).",
        "",
        "| | value |",
        "|---|---|",
        f"| adapter tensors | {len(a)} ({changed} differ at all) |",
        f"| largest absolute difference | {abs_diff:.3g} (largest value {scale:.3g}) |",
        f"| held-out accuracy, clear / secure | {runs[False]['accuracy']:.4f} / {runs[True]['accuracy']:.4f} |",
        f"| values summed per client | {sec['values']} |",
        f"| clipped values | {sec['clipped']} |",
        f"| secure aggregation time (whole protocol, 5 clients, one process) | {sec['seconds']:.2f} s |",
        f"| bytes up / down per client (protocol) | {sec['bytes_up_per_client'] / 1e3:.0f} kB / {sec['bytes_down_per_client'] / 1e3:.0f} kB |",
        f"| run seconds, clear / secure (incl. model load, training, evaluation) | {runs[False]['seconds']:.0f} / {runs[True]['seconds']:.0f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
