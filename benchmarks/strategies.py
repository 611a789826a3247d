#!/usr/bin/env python3
"""FedIT vs FFA-LoRA vs FLoRA (both forms) vs HetLoRA on the embedded task, with equal budgets.

Every run uses the same data (embedded Rotten Tomatoes, the natural by-movie non-IID split over
10 clients, 5 sampled per round), the same model (MiniLM, LoRA on query/value of layers 3-5),
rounds, local steps, batch size, learning rate and, with DP, the same per-client epsilon target
(8 at delta 1e-5, noise calibrated per client). The classification head is left frozen at its
seeded random init (the same for every method) so that the adapters, and so the aggregation
rule, carry all of the learning: with the default trainable head (lr 2.0) a first pass gave
every method the same curve (final 0.68/0.68/0.68/0.66 for seed 0), because the head learned and
the adapters barely moved. Ranks are homogeneous (8 for every client) or heterogeneous (FLoRA's
distribution [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]; FedIT cannot average factors of different
shapes and is not run there). FLoRA's slot form gives the same merged weights as its product
form (tests/test_flora.py), so it runs only where it matters (heterogeneous ranks, no DP), to
show that and its smaller upload. Server momentum is off so that each method's own aggregation
is what is compared. Each configuration runs for several seeds; each run is its own process.

Reported per method and setting: final held-out accuracy and the mean over the last three
rounds (mean and spread over seeds), the mean absolute change of accuracy from one round to the
next (from round 2 on: how stable training is), tensor bytes each client uploads and downloads per round
(mean), seconds per round (mean), and for FedIT the measured size of its missing cross terms
(``fedit_cross_term_error`` in metrics.jsonl: ||FedIT's update - the mean of the clients'
updates||_F / ||the mean update||_F, per round).

    python benchmarks/strategies.py [--seeds 0 1 2] [--workers 2]      # the main grid, 5 rounds
    # longer runs on the two claims, rendered together into strategies_15rounds.md:
    python benchmarks/strategies.py --rounds 15 --settings nodp-het --methods FFA-LoRA "FLoRA (product)" HetLoRA
    python benchmarks/strategies.py --rounds 15 --settings dp-hom --methods FedIT FFA-LoRA "FLoRA (product)" HetLoRA

Finished runs are kept in benchmarks/results/strategies/runs.jsonl, with the command that ran
them; re-running skips them, and the report lists every stored run of that length.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ holds scripts named like the packages (accounting.py, secagg.py): never import from it
sys.path[0] = str(ROOT)
RESULTS = ROOT / "benchmarks" / "results"
FLORA_RANKS = "flora"
ROUNDS = 5  # the main grid; --rounds runs a longer grid, stored under its own keys
SETTINGS = ("nodp-hom", "nodp-het", "dp-hom", "dp-het")

METHODS = {
    "FedIT": {"federation": {"strategy": "fedit"}},
    "FFA-LoRA": {"federation": {"strategy": "ffa"}},
    "FLoRA (product)": {"federation": {"strategy": "flora", "flora_form": "product"}},
    "FLoRA (slot)": {"federation": {"strategy": "flora", "flora_form": "slot"}},
    "HetLoRA": {"federation": {"strategy": "hetlora", "hetlora_prune": True}},
}


def base_config(seed: int, dp: bool, heterogeneous: bool, rounds: int = ROUNDS) -> dict:
    return {
        "name": "bench",
        "seed": seed,
        "threads": 1,
        "model": {"max_length": 48},
        "data": {"partition": "natural", "num_clients": 10, "max_examples": 4000, "test_fraction": 0.1},
        # the head is left frozen at its seeded random init (the same for every method), so that
        # the adapters, and therefore the aggregation rule, carry all of the learning
        "lora": {"r": 8, "alpha": 16.0, "layers": [3, 4, 5], "modules_to_save": [],
                 **({"rank_distribution": FLORA_RANKS} if heterogeneous else {})},
        "federation": {"rounds": rounds, "clients_per_round": 5, "server_momentum": 0.0},
        "training": {"local_steps": 8, "batch_size": 32, "physical_batch_size": 32, "lr": 0.2},
        "privacy": {"enabled": dp, "target_epsilon": 8.0, "delta": 1e-5},
    }


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def jobs(seeds: list[int], rounds: int = ROUNDS, settings: tuple[str, ...] = SETTINGS,
         methods: tuple[str, ...] = tuple(METHODS)) -> list[dict]:
    out = []
    for dp in (False, True):
        for het in (False, True):
            if f"{'dp' if dp else 'nodp'}-{'het' if het else 'hom'}" not in settings:
                continue
            for method in methods:
                if het and method == "FedIT":
                    continue  # FedIT cannot average factors of different shapes
                if method == "FLoRA (slot)" and (dp or not het):
                    continue  # the same merged weights as the product form (tested): run once to show it
                for seed in seeds:
                    out.append({"method": method, "dp": dp, "heterogeneous": het, "seed": seed, "rounds": rounds,
                                "config": merge(base_config(seed, dp, het, rounds), METHODS[method])})
    return out


def key(job: dict) -> str:
    k = f"{job['method']}|dp={job['dp']}|het={job['heterogeneous']}|seed={job['seed']}"
    return k if job.get("rounds", ROUNDS) == ROUNDS else f"{k}|rounds={job['rounds']}"


def run_one(job: dict) -> dict:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from privlora.core.config import config_from_dict
    from privlora.transports.inprocess import run_experiment

    cfg = config_from_dict(job["config"])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_experiment(cfg, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows[1:] if "stopped" not in r]
    per_client = [pc for r in trained for pc in r.get("per_client", [])]
    return {
        "key": key(job),
        "method": job["method"], "dp": job["dp"], "heterogeneous": job["heterogeneous"], "seed": job["seed"],
        "rounds": job["rounds"],
        "accuracy": [r["test_accuracy"] for r in rows],
        "majority": rows[0]["majority_baseline"],
        "epsilon_max": trained[-1].get("epsilon_max"),
        "upload_bytes": statistics.mean(pc["upload_bytes"] for pc in per_client),
        "download_bytes": statistics.mean(pc["download_bytes"] for pc in per_client),
        "seconds_per_round": statistics.mean(r["seconds"] for r in trained),
        "total_seconds": total,
        # FedIT only: ||its update - the mean of the clients' updates|| / ||the mean update||, per round
        "fedit_error": [r["fedit_cross_term_error"] for r in trained if r.get("fedit_cross_term_error") is not None],
    }


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def table(results: list[dict]) -> list[str]:
    lines = []
    for dp in (False, True):
        for het in (False, True):
            sel = [r for r in results if r["dp"] == dp and r["heterogeneous"] == het]
            if not sel:
                continue
            lines += ["", f"### {'DP-SGD, epsilon 8 per client' if dp else 'no DP'}, "
                          f"{'heterogeneous ranks [64,32,16,16,8,8,4,4,4,4]' if het else 'rank 8 for every client'}", "",
                      "| method | final accuracy (mean ± sd) | per seed | last 3 rounds (mean ± sd) "
                      "| round-to-round change | upload / client / round | download / client / round | s / round | max ε |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for method in METHODS:
                rs = sorted((r for r in sel if r["method"] == method), key=lambda r: r["seed"])
                if not rs:
                    continue
                finals = [r["accuracy"][-1] for r in rs]
                lasts = [statistics.mean(r["accuracy"][-3:]) for r in rs]
                # stability: mean |accuracy_t - accuracy_(t-1)| from round 2 on (round 1 leaves the init)
                steps = [abs(r["accuracy"][t] - r["accuracy"][t - 1]) for r in rs for t in range(2, len(r["accuracy"]))]
                change = f"{statistics.mean(steps):.3f}" if steps else "-"
                eps = "-" if rs[0]["epsilon_max"] is None else f"{max(r['epsilon_max'] for r in rs):.2f}"
                lines.append(
                    f"| {method} | {mean_sd(finals)} | {', '.join(f'{a:.3f}' for a in finals)} | {mean_sd(lasts)} | {change} | "
                    f"{fmt_bytes(statistics.mean(r['upload_bytes'] for r in rs))} | "
                    f"{fmt_bytes(statistics.mean(r['download_bytes'] for r in rs))} | "
                    f"{statistics.mean(r['seconds_per_round'] for r in rs):.1f} | {eps} |"
                )
            majority = sorted({r["majority"] for r in sel})
            lines.append(f"\nMajority class: {' to '.join(dict.fromkeys(f'{m:.3f}' for m in (majority[0], majority[-1])))}"
                         " (it depends on the seed's held-out draw).")
            errs = [e for r in sel if r["method"] == "FedIT" for e in r.get("fedit_error", [])]
            if errs:
                lines.append(
                    f"FedIT's cross-term error, ||its update - the mean of the clients' updates||_F / "
                    f"||the mean update||_F over every round and seed: mean {statistics.mean(errs):.3f}, "
                    f"range {min(errs):.3f}-{max(errs):.3f} ({len(errs)} rounds)."
                )
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(dp, het) for dp in (False, True) for het in (False, True)
              if any(r["dp"] == dp and r["heterogeneous"] == het for r in results)]
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), sharey=True, squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method in every panel
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (dp, het) in zip(axes.flat, panels):
        for method in METHODS:
            rs = [r for r in results if r["dp"] == dp and r["heterogeneous"] == het and r["method"] == method]
            if not rs:
                continue
            n = min(len(r["accuracy"]) for r in rs)
            ts = range(n)
            slot = method == "FLoRA (slot)"  # drawn dotted: it lies exactly on the product form
            ax.plot(ts, [statistics.mean(r["accuracy"][t] for r in rs) for t in ts], marker="" if slot else "o", ms=3,
                    ls=":" if slot else "-", lw=2.5 if slot else 1.5, color=colors[method], label=method)
            ax.fill_between(ts, [min(r["accuracy"][t] for r in rs) for t in ts],
                            [max(r["accuracy"][t] for r in rs) for t in ts], color=colors[method], alpha=0.12)
        ax.axhline(statistics.mean(r["majority"] for r in results if r["dp"] == dp and r["heterogeneous"] == het),
                   color="grey", ls="--", lw=1, label="majority class (mean over seeds)")
        ax.set_title(f"{'DP ε=8' if dp else 'no DP'}, {'heterogeneous' if het else 'homogeneous'} ranks")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy")
    fig.suptitle("mean over seeds; band: min to max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_runs(store: Path) -> dict[str, dict]:
    """The finished runs by key. A line cut short by a crash while it was being written is
    skipped with a warning (that run is simply redone); any other bad line is an error."""
    done: dict[str, dict] = {}
    if not store.is_file():
        return done
    lines = store.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"strategies.py: {store}: the last line is incomplete (a crash while writing?); "
                      "that run is redone", file=sys.stderr)
                continue
            raise SystemExit(f"strategies.py: {store}, line {i}, is not JSON; fix or delete that line and re-run")
        done[run["key"]] = run
    return done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds per run (the main grid: {ROUNDS})")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--out", help="default: benchmarks/results/strategies.md, or strategies_<N>rounds.md with --rounds N")
    args = ap.parse_args()
    stem = "strategies" if args.rounds == ROUNDS else f"strategies_{args.rounds}rounds"
    out_md = Path(args.out) if args.out else RESULTS / f"{stem}.md"
    wanted_jobs = jobs(args.seeds, args.rounds, tuple(args.settings), tuple(args.methods))
    store = RESULTS / "strategies" / "runs.jsonl"
    store.parent.mkdir(parents=True, exist_ok=True)
    done = load_runs(store)
    todo = [j for j in wanted_jobs if key(j) not in done]
    print(f"{len(done)} runs done, {len(todo)} to go", file=sys.stderr, flush=True)
    cmd = shlex.join(["python", "benchmarks/strategies.py", *sys.argv[1:]])
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(run_one, todo):
            res["command"], res["date"] = cmd, time.strftime("%Y-%m-%d")
            with store.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
            done[res["key"]] = res
            print(f"{res['key']}: accuracy {res['accuracy'][-1]:.3f} ({res['total_seconds']:.0f} s)", file=sys.stderr, flush=True)
    # every stored run of this length and these seeds, so that grids run piecewise render together
    results = [r for r in done.values() if r.get("rounds", ROUNDS) == args.rounds and r["seed"] in args.seeds]
    if not results:
        sys.exit(f"strategies.py: no stored runs of {args.rounds} rounds for seeds {args.seeds}; nothing to report")
    png = out_md.with_suffix(".png")
    plot(results, png)
    commands = list(dict.fromkeys(r.get("command", cmd) for r in results))
    text = "\n".join([
        "# Aggregation strategies compared on the embedded task",
        "",
        *(f"Command: `{c}`  " for c in commands),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{args.workers} runs in parallel with 1 torch thread each; runs made on "
        + ", ".join(f"{d} ({n})" for d, n in sorted(collections.Counter(r.get("date", "?") for r in results).items()))
        + ". Seconds compare only between runs made on the same day.",
        "",
        "MiniLM-L6 + LoRA on query/value of layers 3-5, embedded Rotten Tomatoes (4,000 reviews: 3,600 split by movie "
        f"over 10 clients, 5 per round, and 400 held out), {args.rounds} rounds x 8 local steps of batch 32, SGD with momentum 0.9 "
        "and lr 0.2 on the adapters, the classification head frozen at its seeded random init, no server momentum; "
        f"seeds {args.seeds}. Bytes are tensor bytes (float32) a deployment would send.",
        *table(results),
        "",
        f"![accuracy per round]({png.name})",
    ]) + "\n"
    print(text)
    out_md.write_text(text)


if __name__ == "__main__":
    main()
