#!/usr/bin/env python3
"""Privacy accounting at scale: admission for 1000 clients, and a full report over 10^5 charges.

A synthetic federation of ``--clients`` clients with dataset sizes drawn from 200..5000 (so each
has its own sample rate q = 1/ceil(n/64)) and a noise multiplier calibrated per client to
epsilon 8 over ``--rounds`` rounds of 10 local steps (so sigma differs too), each client taking
part in a round with probability ``--participation``. Measured:

1. admission for one round of every client, cold (first time this process sees each mechanism)
   and warm (the next round), with `accounting.Admission` (RDP pre-check, tight PLD near the
   budget, caches);
2. the naive alternative: for each client, dp_accounting's PLDAccountant (discretisation 1e-3,
   as coarse as ours gets) composing the client's charges one event at a time, nothing grouped
   or cached; timed on a sample of clients and scaled to all of them (stated in the table);
3. writing the ledger (one fsync per charge), ``privacy_summary`` (PLD + RDP cross-check for
   every client) and ``verify_run`` over the whole ledger, and the epsilon plot.

    python benchmarks/accounting.py [--clients 1000] [--rounds 200] [--participation 0.5] [--out benchmarks/results/accounting.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# this script is named like the `accounting` package; its folder must not shadow it
sys.path[0] = str(Path(__file__).resolve().parents[1])

from accounting import Admission, Ledger, SubsampledGaussian, calibrate_noise, get_accountant, plot_epsilon  # noqa: E402
from accounting import privacy_summary, verify_run  # noqa: E402
from accounting.rdp import epsilon_from_rdp, rdp_vector  # noqa: E402

DELTA = 1e-5


def naive_epsilon(history: list[SubsampledGaussian]) -> float:
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for m in history:
        acc.compose(m.to_dp_event())
    return acc.get_epsilon(DELTA)


def rdp_calibrate(target: float, q: float, steps: int) -> float:
    """Set-up only: a plausible sigma per q without the cost of PLD calibration for each."""
    lo, hi = 0.3, 50.0
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        if epsilon_from_rdp(rdp_vector([(mid, q, steps)]), DELTA) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def say(rows) -> None:
    a, b, c = rows[-1]
    print(f"{a} | {b} | {c}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--participation", type=float, default=0.5)
    ap.add_argument("--naive-sample", type=int, default=5)
    ap.add_argument("--budget", type=float, default=6.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_clients, rounds = args.clients, args.rounds
    rows: list[tuple[str, str, str]] = []

    sizes = rng.integers(200, 5001, size=n_clients)
    rates = [1.0 / int(np.ceil(n / 64)) for n in sizes]
    t = time.perf_counter()
    sigmas = {q: rdp_calibrate(8.0, q, rounds * 10) for q in sorted(set(rates))}
    t_cal = time.perf_counter() - t
    rows.append(("set-up: sigma for every distinct q (RDP bisection)", f"{len(sigmas)} values of q", f"{t_cal:.1f} s"))
    say(rows)
    t = time.perf_counter()
    calibrate_noise(8.0, DELTA, rates[0], rounds * 10)
    rows.append(("calibrate_noise (PLD bisection) for one q, for scale", f"q={rates[0]:.4f}, {rounds * 10} steps", f"{time.perf_counter() - t:.1f} s"))
    say(rows)
    mech = {c: SubsampledGaussian(sigmas[rates[c]], rates[c], 10, 1.0, DELTA) for c in range(n_clients)}
    budgets = {c: args.budget for c in range(n_clients)}

    # histories as they stand just before the admission being timed: the clients took part in
    # a random number of the previous rounds, up to all of them (so some are at the budget)
    taken = {c: int(rng.binomial(rounds - 1, 0.9 if c % 10 == 0 else args.participation)) for c in range(n_clients)}
    adm = Admission(get_accountant("pld"), DELTA, budgets)
    adm.load({c: [mech[c]] * taken[c] for c in range(n_clients)})
    def timed_admission(label: str, how: str) -> list[int]:
        t = time.perf_counter()
        admitted, decisions = adm.admit(mech)
        seconds = time.perf_counter() - t
        tight = sum(d.how.startswith("pld") for d in decisions)
        rows.append((f"admission, {n_clients} clients, {label}", f"{len(admitted)} admitted; {tight} decided by {how}, the rest by RDP", f"{seconds:.2f} s"))
        say(rows)
        return admitted

    for c in timed_admission("cold caches", "PLD (k_max searched per distinct release)"):
        adm.record(c, mech[c])
    timed_admission("next round", "cached k_max")

    sample = list(range(0, n_clients, max(1, n_clients // args.naive_sample)))[: args.naive_sample]
    t = time.perf_counter()
    for c in sample:
        naive_epsilon([mech[c]] * (taken[c] + 1))
    t_naive = (time.perf_counter() - t) / len(sample) * n_clients
    rows.append((f"naive admission: PLDAccountant per client, event by event", f"timed on {len(sample)} clients, x{n_clients / len(sample):.0f}", f"{t_naive:.1f} s (scaled)"))
    say(rows)

    # a ledger of rounds x participation x clients charges
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        led = Ledger.create(run / "ledger.jsonl", DELTA, "pld", budgets)
        part = rng.random((rounds, n_clients)) < args.participation
        metrics = [json.dumps({"round": 0, "ledger": {"entries": 0, "head": led.head}})]
        t = time.perf_counter()
        for r in range(rounds):
            for c in np.flatnonzero(part[r]):
                led.append(int(c), r + 1, mech[int(c)])
            metrics.append(json.dumps({"round": r + 1, "ledger": {"entries": len(led), "head": led.head}}))
        t_write = time.perf_counter() - t
        (run / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
        n_entries = len(led)
        rows.append(("write the ledger (fsync per charge)", f"{n_entries} charges, {os.path.getsize(run / 'ledger.jsonl') / 1e6:.0f} MB", f"{t_write:.1f} s ({n_entries / t_write:.0f}/s)"))
        say(rows)
        t = time.perf_counter()
        led2 = Ledger.open(run / "ledger.jsonl")
        t_open = time.perf_counter() - t
        rows.append(("open + check the hash chain", f"{n_entries} charges", f"{t_open:.1f} s"))
        say(rows)
        for name in ("pld", "rdp"):  # fresh caches: nothing carried over from admission
            get_accountant(name)._cache.clear()
        t = time.perf_counter()
        summary = privacy_summary(led2)
        t_sum = time.perf_counter() - t
        (run / "report.json").write_text(json.dumps({"privacy": summary}))
        rows.append(("privacy summary: PLD + RDP per client", f"{n_clients} clients", f"{t_sum:.1f} s"))
        say(rows)
        t = time.perf_counter()
        caption = plot_epsilon(led2, "pld", run / "eps.png")
        t_plot = time.perf_counter() - t
        rows.append(("epsilon plot", caption, f"{t_plot:.1f} s"))
        say(rows)
        get_accountant("pld")._cache.clear()
        t = time.perf_counter()
        res = verify_run(run)
        t_ver = time.perf_counter() - t
        rows.append(("verify_run: chain, anchors, recompute every epsilon", "ok" if res.ok else f"{len(res.problems)} problems", f"{t_ver:.1f} s"))
        say(rows)
        t = time.perf_counter()
        hist = led2.histories()
        for c in sample:
            naive_epsilon(hist.get(c, []))
        t_naive_rep = (time.perf_counter() - t) / len(sample) * n_clients
        rows.append(("naive report: PLDAccountant per client, event by event", f"timed on {len(sample)} clients, x{n_clients / len(sample):.0f}", f"{t_naive_rep:.0f} s (scaled)"))
        say(rows)

    cmd = "python benchmarks/accounting.py " + " ".join(sys.argv[1:])
    lines = [
        "# Privacy accounting at scale",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}",
        "",
        f"{n_clients} clients, {rounds} rounds, participation {args.participation} (every tenth client 0.9, so budgets bind), "
        f"10 local steps per round, sigma calibrated per client to epsilon 8 at delta {DELTA} over all rounds, budget {args.budget} per client.",
        "",
        "| what | size | time |",
        "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
