"""Seconds per round and bytes on the wire: the in-process transport against Flower on loopback,
with and without secure aggregation, in one run; and one round of 100 virtual clients on
Flower's simulation engine (a tiny model).

    .venv/bin/python benchmarks/flower.py [--rounds 1] [--skip-sim] [--fresh] [--out benchmarks/results/flower.md]
        [--transports in-process,flower,flower-node] [--remeasure in-process,flower-node]

Each finished run is stored in ``flower.runs.jsonl`` beside the table; a second call measures
only what is missing (``--fresh`` measures everything again).

Setting: the embedded default config (MiniLM, 10 clients by movie, 5 per round, 10 DP-SGD steps)
with ``federation.rounds`` set to ``--rounds``; the Flower runs use 10 SuperNodes and one
SuperLink on 127.0.0.1 (``--insecure``), nodes with seeded noise so both transports compute
the same thing. "flower" is the ClientApp as the node (Flower starts a new ClientApp process per
message: it reloads the node's data and model); "flower, node processes" has one long-lived
node process per node (``privlora node serve``, data and model loaded once, before the run) and
the ClientApps only relay message bytes to it over a Unix socket. "x in-process" is the Flower
round's seconds over the in-process round's measured with it (same date, setting and secagg). "privlora bytes" is what the round engine's messages carry (the same on both
transports); "loopback bytes" is the growth of the loopback interface's received-byte counter
(/proc/net/dev) over the Flower run: everything Flower sends, its polling, heartbeats and app
bundle included. Seconds per round are the rounds' own ``seconds`` in metrics.jsonl (round 0,
loading and describing, is reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def summary(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows[1:] if "stopped" not in r]
    return {
        "round0_s": rows[0]["seconds"],
        "round_s": statistics.mean(r["seconds"] for r in rounds) if rounds else float("nan"),
        "privlora_mb_up": statistics.mean(r["bytes_up"] + (sum(pc["upload_bytes"] for pc in r["per_client"]) if r.get("secagg") else 0)
                                          for r in rounds) / 1e6 if rounds else float("nan"),
        "privlora_mb_down": statistics.mean(r["bytes_down"] for r in rounds) / 1e6 if rounds else float("nan"),
        "accuracy": rows[-1]["test_accuracy"],
        "epsilon_max": rows[-1].get("epsilon_max"),
    }


def write_cfg(cfg, path: Path) -> Path:
    from privlora.core.config import config_to_toml

    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path


def run_inprocess(cfg_path: Path, out: Path) -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "privlora", "run", str(cfg_path), "--out", str(out), "--quiet"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return {**summary(out), "wall_s": time.perf_counter() - t, "loopback_mb": None}


def run_flower(cfg_path: Path, out: Path, n: int, node_processes: bool = False) -> dict:
    from privlora.transports.flower.local import LocalDeployment, node_configs

    work = out.parent / f"{out.name}-flower"
    t = time.perf_counter()
    before = lo_bytes()
    with LocalDeployment(node_configs(cfg_path, n, work / "nodes", noise="seeded"), work, node_processes=node_processes) as dep:
        started = time.perf_counter() - t  # node processes: loading every node's data and model
        run_id = dep.submit({"config": str(cfg_path), "out": str(out)})
        status = dep.wait(run_id, 7200)
    if status != "finished:completed":
        raise RuntimeError(f"the Flower run ended {status}; logs in {work}")
    extra = {"breakdown": breakdown(work / "nodes")} if node_processes else {}
    return {**summary(out), "wall_s": time.perf_counter() - t, "loopback_mb": (lo_bytes() - before) / 1e6, "start_s": started,
            **extra}


def breakdown(nodes_dir: Path) -> dict:
    """Where a Flower round's seconds go, from the node processes' activity logs (each message's
    received and sent times on its node): per round, the sum over its stages of the slowest
    node's own time on the stage ("node s"), and the gaps between stages (the time between the
    last reply of a stage leaving its node and the first request of the next reaching one:
    SuperNode polling, ClientApp start, SuperLink and the server's own work)."""
    pairs = []
    for log in sorted(nodes_dir.glob("client-*/activity.jsonl")):
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        for a, b in zip(rows, rows[1:]):
            if a.get("direction") == "received" and b.get("direction") == "sent":
                pairs.append({"round": a.get("round"), "stage": a.get("stage") or a["kind"], "start": a["time"], "end": b["time"]})
    out = {}
    for rnd in sorted({p["round"] for p in pairs if p["round"]}):
        stages = {}
        for p in (p for p in pairs if p["round"] == rnd):
            st = stages.setdefault(p["stage"], {"first": p["start"], "last": p["end"], "node": 0.0})
            st["first"], st["last"] = min(st["first"], p["start"]), max(st["last"], p["end"])
            st["node"] = max(st["node"], p["end"] - p["start"])
        order = sorted(stages.values(), key=lambda s: s["first"])
        out[rnd] = {"stages": len(order), "node_s": sum(s["node"] for s in order),
                    "between_stages_s": sum(b["first"] - a["last"] for a, b in zip(order, order[1:])),
                    "span_s": order[-1]["last"] - order[0]["first"]}
    return out


def run_sim100(work: Path, secure: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TOKENIZER_FILES, tiny_bert

    from privlora.core.config import config_from_dict
    from privlora.tasks.models import resolve_model_path

    model = work / "tiny-bert"
    if not model.exists():
        tiny_bert().save_pretrained(model)
        src = resolve_model_path("embedded:minilm")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, model / name)
    cfg = config_from_dict({
        "name": "sim100", "seed": 0, "threads": 1,
        "model": {"path": str(model), "max_length": 32},
        "data": {"max_examples": 4400, "num_clients": 100, "partition": "iid", "test_fraction": 0.1},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": "ffa", "rounds": 1, "clients_per_round": 100, "server_momentum": 0.0},
        "training": {"local_steps": 2, "batch_size": 16, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.0},
        "secagg": {"enabled": secure, "bits": 64, "value_bound": 8.0, "max_weight": 1000.0, "stage_timeout": 600.0},
    })
    path = write_cfg(cfg, work / f"sim100-{'secure' if secure else 'clear'}.toml")
    out = work / f"sim100-{'secure' if secure else 'clear'}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "privlora.transports.flower.local", str(path), "--out", str(out), "--simulation"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return {**summary(out), "wall_s": time.perf_counter() - t, "loopback_mb": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flower.md"))
    ap.add_argument("--fresh", action="store_true", help="ignore the stored runs and measure everything again")
    ap.add_argument("--transports", default="in-process,flower,flower-node",
                    help="which of in-process, flower (a ClientApp process per message), flower-node (node processes) to run")
    ap.add_argument("--remeasure", default="", help="transports to measure again even if stored (comma-separated)")
    args = ap.parse_args()
    names = {"in-process": "in-process", "flower": "flower", "flower-node": "flower, node processes"}
    wanted = [names[t] for t in args.transports.split(",") if t]
    again = {names[t] for t in args.remeasure.split(",") if t}
    from privlora.core.config import ExperimentConfig

    work = Path(tempfile.mkdtemp(prefix="privlora-flower-bench-"))
    store = Path(args.out).with_suffix(".runs.jsonl")
    rows = [json.loads(x) for x in store.read_text().splitlines()] if store.is_file() and not args.fresh else []
    done = {(r["setting"], r["transport"], r["secagg"]) for r in rows if r["transport"] not in again}

    def keep(row: dict) -> None:  # each finished run is stored at once: a crash loses only the run in progress
        rows.append(row)
        with store.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    if not args.skip_default:
        base = ExperimentConfig()
        for secure in (False, True):
            cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, rounds=args.rounds),
                                      secagg=dataclasses.replace(base.secagg, enabled=secure, stage_timeout=600.0))
            path = write_cfg(cfg, work / f"default-{'secure' if secure else 'clear'}.toml")
            for transport in wanted:
                setting = "default config, 10 clients, 5 per round"
                if (setting, transport, secure) in done:
                    continue
                out = work / f"{transport.replace(', ', '-').replace(' ', '-')}-{'secure' if secure else 'clear'}"
                print(f"running {transport}, secagg={secure} ...", file=sys.stderr, flush=True)
                res = (run_inprocess(path, out) if transport == "in-process" else
                       run_flower(path, out, cfg.data.num_clients, node_processes=transport != "flower"))
                keep({"setting": setting, "transport": transport, "secagg": secure, "date": time.strftime("%Y-%m-%d %H:%M"),
                      "rounds": args.rounds, **res})
    if not args.skip_sim:
        for secure in (False, True):
            setting, transport = "tiny model, 100 virtual clients, all per round", "flower simulation engine (Ray, 1 CPU)"
            if (setting, transport, secure) in done:
                continue
            print(f"running 100 virtual clients, secagg={secure} ...", file=sys.stderr, flush=True)
            keep({"setting": setting, "transport": transport, "secagg": secure, "date": time.strftime("%Y-%m-%d %H:%M"),
                  **run_sim100(work, secure)})
    cmd = "python benchmarks/flower.py " + " ".join(sys.argv[1:])
    lines = [
        "# Flower vs in-process: seconds per round and bytes", "",
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}; {platform.machine()}, {platform.python_version()}, 2 cores).", "",
        "| setting | transport | secagg | rounds | measured | round 0 s | s / round | x in-process | privlora MB up / round | MB down / round | loopback MB (whole run) | nodes start s | wall s | accuracy | max epsilon |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def base(r: dict) -> dict | None:  # the in-process run measured with it (the latest up to its date)
        same = [b for b in rows if b["transport"] == "in-process" and b["setting"] == r["setting"] and b["secagg"] == r["secagg"]
                and b.get("rounds", 1) == r.get("rounds", 1) and b.get("date", "") <= r.get("date", "")]
        return max(same, key=lambda b: b.get("date", "")) if same else None

    for r in rows:
        lo = "" if r["loopback_mb"] is None else f"{r['loopback_mb']:.1f}"
        eps = "" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        b = base(r)
        ratio = "" if r["transport"] == "in-process" or b is None else f"{r['round_s'] / b['round_s']:.2f}"
        st = "" if r.get("start_s") is None else f"{r['start_s']:.0f}"
        lines.append(f"| {r['setting']} | {r['transport']} | {'yes' if r['secagg'] else 'no'} | {r.get('rounds', 1)} | {r.get('date', '')} | "
                     f"{r['round0_s']:.1f} | {r['round_s']:.1f} | {ratio} | "
                     f"{r['privlora_mb_up']:.2f} | {r['privlora_mb_down']:.2f} | {lo} | {st} | {r['wall_s']:.0f} | {r['accuracy']:.3f} | {eps} |")
    dates = sorted({r.get("date", "") for r in rows})
    lines += ["", f"Runs measured {dates[0]} to {dates[-1]} (stored in `{store.name}`).", "",
              next(p for p in __doc__.split("\n\n") if p.startswith("Setting:")).strip(), ""]
    text = "\n".join(lines)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
