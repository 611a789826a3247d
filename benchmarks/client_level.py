#!/usr/bin/env python3
"""Client-level DP at 508 clients (issue 30): the grid, as a plan that runs. NOT RUN YET.

The embedded reviews split one client per movie: ``data.partition = "natural"`` with
``data.num_clients = 508`` gives every client exactly one movie (`partition_natural` hands each
group, largest first, to the client with the fewest examples so far, so with as many clients as
movies every client gets one). 15% of the clients per round (76), 30 rounds, FFA-LoRA with
uniform weights, record-level DP-SGD off (``privacy.enabled = false``) so that only the
client-level guarantee is measured.

The grid (`jobs`):

- client-level epsilon 1, 2, 4, 8 and no DP, for central Gaussian (a trusted server, sum in the
  clear) and the distributed discrete Gaussian at 16 bits (under secure aggregation), 3 seeds;
- at epsilon 2 and 8: distributed discrete Gaussian and Skellam at 12, 16 and 20 bits, 3 seeds.

Secure aggregation for the distributed runs: the complete graph, threshold 68 of 76 and
``secagg.dropout_rate = 0.1`` (7 dropouts survive), so every noise share is sized for 68 inputs
(the fewest a sum accepts; ``privacy.colluders = 0``) and a full sum carries 76/68 of the noise
that was charged.

Model setting (what makes the grid fit in a few hours on 2 cores) -- the part still to build:
LoRA on the top encoder layer only (``lora.layers = [5]``, query and value) plus the head, and a
cache of the frozen lower layers' outputs per example, so that a local step runs one layer
instead of six. Without the cache it does not fit: a probe of the first central job (issue 30's
session, 2 threads on a 2-core machine shared with another job) took 1.6-2.9 s per local step,
8-16 s per client, so a round of 76 clients is 10-20 minutes, a 30-round run 5-10 hours and the
57 runs of the grid weeks. With the lower five layers cached, a step runs one layer of six plus
the head (expected about 5x less; to measure). Until the cache exists, ``--probe`` times one
round of the first central job, and ``--only`` runs a subset.

Reported (per job: accuracy, client-level epsilon against the server and against the model
alone, bytes per client per round, seconds per round; the table: mean and sd over seeds), with
the goals of the issue: distributed at 16+ bits within 1 point of central at the same epsilon;
epsilon 8 within 3 points of no DP; epsilon 1 above 0.68.

    python benchmarks/client_level.py --probe            # one round of the first job, timed
    python benchmarks/client_level.py [--only KEY ...]   # the grid (resumable), results/client_level.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "client_level"
SEEDS = (0, 1, 2)
CLIENTS, PER_ROUND, ROUNDS = 508, 76, 30


def base(seed: int) -> dict:
    return {
        "name": "client-level-508",
        "seed": seed,
        "threads": 2,
        "data": {"partition": "natural", "num_clients": CLIENTS},
        "lora": {"r": 8, "alpha": 16.0, "layers": [5], "target_modules": ["query", "value"]},
        "federation": {"strategy": "ffa", "rounds": ROUNDS, "clients_per_round": PER_ROUND, "weighting": "uniform"},
        "training": {"local_steps": 5, "batch_size": 32, "physical_batch_size": 32},
        "privacy": {"enabled": False},
    }


def job(seed: int, noise: str | None, epsilon: float | None, bits: int = 16) -> dict:
    cfg = base(seed)
    if noise is not None:
        cfg["privacy"].update({"unit": "client", "client_noise": noise, "client_clip": 1.0, "client_target_epsilon": epsilon})
        if noise != "central":
            cfg["privacy"]["client_bits"] = bits
            cfg["secagg"] = {"enabled": True, "threshold": 68, "dropout_rate": 0.1}
    return {"seed": seed, "noise": noise or "none", "epsilon": epsilon, "bits": bits if noise not in (None, "central") else None,
            "config": cfg}


def key(j: dict) -> str:
    return f"{j['noise']}-eps{j['epsilon']}-bits{j['bits']}-seed{j['seed']}"


def jobs(seeds=SEEDS) -> list[dict]:
    out = []
    for seed in seeds:
        out.append(job(seed, None, None))
        for eps in (1.0, 2.0, 4.0, 8.0):
            out.append(job(seed, "central", eps))
            out.append(job(seed, "discrete_gaussian", eps, 16))
        for eps in (2.0, 8.0):
            for noise in ("discrete_gaussian", "skellam"):
                for bits in (12, 16, 20):
                    if (noise, bits) != ("discrete_gaussian", 16):
                        out.append(job(seed, noise, eps, bits))
    return out


def run(j: dict, rounds: int | None = None) -> dict:
    from privlora.core.config import config_from_dict
    from privlora.transports.inprocess import run_experiment

    raw = json.loads(json.dumps(j["config"]))
    if rounds is not None:
        raw["federation"]["rounds"] = rounds
    out = OUT / key(j)
    t = time.perf_counter()
    run_experiment(config_from_dict(raw), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    cl = last.get("client_level") or {}
    done = [r for r in rows if r.get("round", 0) >= 1]
    return {"key": key(j), **{k: j[k] for k in ("seed", "noise", "epsilon", "bits")},
            "accuracy": last["test_accuracy"], "epsilon_server": cl.get("epsilon_server_max"),
            "epsilon_model_only": cl.get("epsilon_model_only_max"),
            "bytes_up_per_client": sum(r["bytes_up"] for r in done) / max(1, sum(len(r["clients"]) for r in done)),
            "seconds_per_round": sum(r["seconds"] for r in done) / max(1, len(done)), "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help="one round of the first DP job, timed")
    ap.add_argument("--only", nargs="*", default=None, help="job keys to run")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.probe:
        j = next(j for j in jobs((0,)) if j["noise"] == "central")
        print(json.dumps(run(dict(j, seed=0), rounds=1)))
        return 0
    log = OUT.parent / "client_level.jsonl"
    done = {json.loads(line)["key"] for line in log.read_text().splitlines()} if log.is_file() else set()
    for j in jobs():
        if key(j) in done or (args.only and key(j) not in args.only):
            continue
        rec = run(j)
        with log.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
