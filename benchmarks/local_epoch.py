#!/usr/bin/env python3
"""Seconds per local epoch and peak memory of one default client, DP vs non-private.

Each measurement runs in its own process so that peak resident memory (ru_maxrss) belongs to
that mode alone. A "local epoch" is one expected pass over the client's data: ceil(n/B) steps
(under DP, 1/q Poisson-sampled logical batches of expected size B). The client is client 0 of
the given config (default: the embedded default, i.e. MiniLM on Rotten Tomatoes).

    python benchmarks/local_epoch.py [--config CONFIG] [--repeats 2] [--out benchmarks/results/local_epoch.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(config: str | None, private: bool, repeats: int) -> dict:
    """Runs inside the child process."""
    import torch

    from privlora.tasks.adapters import adapter_state, make_peft_model
    from privlora.core.config import load_config
    from privlora.federation.startup import build_federation

    cfg = load_config(config)
    fed = build_federation(cfg)
    client = fed.clients[0]
    steps = math.ceil(client.num_examples / cfg.training.batch_size)
    cfg = dataclasses.replace(
        cfg,
        privacy=dataclasses.replace(cfg.privacy, enabled=private),
        training=dataclasses.replace(cfg.training, local_steps=steps),
    )
    client.cfg = cfg
    strategy = client.strategy
    g = strategy.initial_state(adapter_state(make_peft_model(client.base_model, cfg, cfg.max_rank)))
    payload = strategy.broadcast(g, cfg.client_rank(0))
    _ = client.noise_multiplier if private else None  # calibration is not part of the epoch
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        res = client.train(payload, rnd=r + 1, rank=cfg.client_rank(0))
        times.append(time.perf_counter() - t0)
        assert res.steps == steps
    return {
        "mode": "DP-SGD (Opacus)" if private else "non-private",
        "examples": client.num_examples,
        "batch": cfg.training.batch_size,
        "physical_batch": cfg.training.physical_batch_size,
        "steps": steps,
        "seconds_min": min(times),
        "seconds_mean": sum(times) / len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/local_epoch.md")
    ap.add_argument("--child", choices=["dp", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.child == "dp", args.repeats)))
        return 0
    rows = []
    for mode in ("plain", "dp"):
        cmd = [sys.executable, __file__, "--child", mode, "--repeats", str(args.repeats)]
        if args.config:
            cmd += ["--config", args.config]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    command = "python benchmarks/local_epoch.py" + (f" --config {args.config}" if args.config else "") + f" --repeats {args.repeats}"
    lines = [
        "# Local epoch: DP vs non-private, one default client",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch threads {rows[0]['threads']}; {time.strftime('%Y-%m-%d')}",
        "",
        "| mode | examples | batch (physical) | steps | seconds / epoch (min of repeats) | mean | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['examples']} | {r['batch']} ({r['physical_batch']}) | {r['steps']} | "
            f"{r['seconds_min']:.1f} | {r['seconds_mean']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    ratio = rows[1]["seconds_min"] / rows[0]["seconds_min"]
    lines += ["", f"DP-SGD costs {ratio:.2f}x the non-private epoch on this client.", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
