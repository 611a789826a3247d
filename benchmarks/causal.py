#!/usr/bin/env python3
"""Task "causal-lm" on SmolLM2-135M-Instruct: the cost of one DP step, and the strategies compared.

    python benchmarks/causal.py steps                 # seconds/step and peak memory (table below)
    python benchmarks/causal.py steps --lengths 64    # one sequence length only
    python benchmarks/causal.py eval                  # held-out evaluation: shared prompt vs one sequence per answer
    python benchmarks/causal.py strategies            # every stored-missing strategy point
    python benchmarks/causal.py strategies --set federation.rounds=2   # a smaller grid
    python benchmarks/causal.py strategies --seeds 0 1 2 --set federation.rounds=1 --set training.local_steps=3 \
        --set training.batch_size=16 --set data.test_fraction=0.01 --lr-a 0.2 0.03   # the committed grid (docs/benchmarks.md)
    python benchmarks/causal.py --table               # re-render both tables from the store

``steps``: one optimizer step on a logical batch of 16 review instructions padded to exactly
L tokens (L = 64 and 256), LoRA rank 8 on q_proj and v_proj, physical batches of 8, for
non-private training, DP-SGD with Opacus's hooks (per-sample gradients materialised; what
privlora's client runs) and DP-SGD with Opacus's ghost clipping (per-sample norms without
per-sample gradients, two backward passes). Before timing, ghost clipping is checked to give
the same clipped gradient sum as hooks on the same batch (noise 0). Peak memory is the
process's peak resident set (``ru_maxrss``) measured in a fresh process per row.

``eval``: one held-out evaluation of examples/causal.toml's test split (answer accuracy, loss,
perplexity) on the untrained SmolLM2, scoring each allowed answer as its own sequence, against
running the prompt once and its key/value cache per answer (`options_nll`), in the data's order
and shortest first (what the server runs); all must give the same accuracy and loss to 1e-4.

``strategies``: examples/causal.toml with each strategy (FedIT, FFA-LoRA, FLoRA, HetLoRA), at
the example's rank (lora.r) for every client and with FLoRA's heterogeneous ranks
[64, 32, 16, 16, 8, 8, 4, 4, 4, 4] (FFA-LoRA, FLoRA, HetLoRA; FedIT cannot average different shapes), with and without DP, seeds
0, 1, 2; ``--set KEY=VALUE`` (repeatable) changes a field of the example for every point, for a
grid smaller than the example (its points are stored and tabled apart from other grids'). All
points run in one process, which reads the base model from disk once (later points' seconds
leave out that load). Finished points are appended to benchmarks/results/causal.jsonl with their
command line; re-running skips them; seeds are the outer loop, so an interrupted grid leaves whole
seeds. ``--lr-a LR [LR_CLEAR]`` gives the strategies that train A (FedIT, FLoRA, HetLoRA) their
own learning rate, with DP and in the clear (FFA-LoRA keeps training.lr); ``--only NAME...`` and
``--dp yes|no`` run part of the grid (the learning-rate probes: ``--only fedit --set
data.holdout=validation``). Each grid (its ``--set`` list and ``--lr-a``) is stored and tabled
apart; FedIT's rows keep its measured cross-term error per round.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/ holds scripts named like the packages: never import from it
RESULTS = ROOT / "benchmarks" / "results"
STORE = RESULTS / "causal.jsonl"
TABLE = RESULTS / "causal.md"
EXAMPLE = ROOT / "examples" / "causal.toml"
MODES = ("plain", "hooks", "ghost")
BATCH, PHYSICAL, REPEATS = 16, 8, 3


# --------------------------------------------------------------------------- one step


def _model_and_batch(length: int):
    import torch

    from privlora.tasks.adapters import make_peft_model
    from privlora.tasks.causal_lm import IGNORE, load_causal_model, load_causal_tokenizer, tokenize_causal
    from privlora.core.config import load_config
    from privlora.tasks import load_records

    cfg = load_config(EXAMPLE)
    tok = load_causal_tokenizer(cfg.model.path)
    reviews = load_records(cfg).subset(range(BATCH))
    ds = tokenize_causal(reviews, tok, length, cfg.model.system_prompt)
    ids, mask, labels = ds.tensors
    # pad every sequence to exactly `length` real tokens: repeat its prompt body (measures L, not the data)
    for i in range(BATCH):
        n = int(mask[i].sum())
        if n < length:
            body = ids[i, : n - 8].repeat(length // max(1, n - 8) + 1)[: length - n]
            ids[i] = torch.cat([body, ids[i, :n]])[:length]
            labels[i] = torch.cat([torch.full((length - n,), IGNORE), labels[i, :n]])[:length]
            mask[i] = 1
    base = load_causal_model(cfg.model.path, 0)
    model = make_peft_model(base, cfg, cfg.lora.r, copy_base=False)
    return cfg, model, (ids, mask, labels)


def _ghost_step(model, optimizer, batch, sigma: float):
    """Opacus ghost clipping on privlora's per-sequence loss (the loss wrapper takes the vector)."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from privlora.tasks.causal_lm import sequence_nll

    ids, mask, labels = batch
    for s in range(0, ids.shape[0], PHYSICAL):
        part = slice(s, s + PHYSICAL)
        optimizer.zero_grad(set_to_none=True)  # Opacus keeps the clipped sum across skipped steps
        total, count = sequence_nll(model, ids[part], mask[part], labels[part])
        loss = DPTensorFastGradientClipping(model, optimizer, total / count.clamp(min=1), "mean")
        loss.backward()
        optimizer.signal_skip_step(do_skip=s + PHYSICAL < ids.shape[0])
        optimizer.step()


def _hooks_step(model, optimizer, batch, plain: bool):
    from privlora.tasks.causal_lm import causal_loss

    ids, mask, labels = batch
    optimizer.zero_grad(set_to_none=True)
    for s in range(0, ids.shape[0], PHYSICAL):
        part = slice(s, s + PHYSICAL)
        if not plain:  # as privlora's client: Opacus keeps the clipped sum across skipped steps
            optimizer.zero_grad(set_to_none=True)
        loss = causal_loss(model, (ids[part], mask[part], labels[part]))
        (loss * (PHYSICAL / ids.shape[0]) if plain else loss).backward()
        if not plain:
            optimizer.signal_skip_step(do_skip=s + PHYSICAL < ids.shape[0])
            optimizer.step()
    if plain:
        optimizer.step()


def _private(model, mode: str, sigma: float):
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.zeros(BATCH, 1)), batch_size=BATCH)
    kwargs = {"grad_sample_mode": "ghost", "criterion": torch.nn.CrossEntropyLoss()} if mode == "ghost" else {}
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                              max_grad_norm=1.0, poisson_sampling=False, **kwargs)
    return out[0], out[1]


def clipped_sum(mode: str, length: int) -> dict:
    """The summed clipped gradient of one logical batch at noise 0 (ghost must equal hooks)."""
    cfg, model, batch = _model_and_batch(length)
    gs, opt = _private(model, mode, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    (_ghost_step if mode == "ghost" else lambda m, o, b, s: _hooks_step(m, o, b, False))(gs, opt, batch, 0.0)
    return {"update": [float((b - p.detach()).double().sum()) for b, p in zip(before, params)]}


def time_step(mode: str, length: int) -> dict:
    import torch

    torch.set_num_threads(2)
    cfg, model, batch = _model_and_batch(length)
    if mode == "plain":
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        step = lambda: _hooks_step(model, optimizer, batch, True)  # noqa: E731
    else:
        gs, optimizer = _private(model, mode, 1.0)
        step = (lambda: _ghost_step(gs, optimizer, batch, 1.0)) if mode == "ghost" else (lambda: _hooks_step(gs, optimizer, batch, False))
    step()  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "length": length, "seconds": statistics.median(times), "all_seconds": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def time_eval() -> dict:
    from contextlib import nullcontext
    from unittest import mock

    from privlora.tasks import causal_lm
    from privlora.core.config import load_config
    from privlora.federation.startup import load_split

    cfg = load_config(EXAMPLE)
    _, _, test = load_split(cfg)
    tok = causal_lm.load_causal_tokenizer(cfg.model.path)
    ds = causal_lm.tokenize_causal_eval(test, tok, cfg.model.max_length, cfg.model.system_prompt)
    model = causal_lm.load_causal_model(cfg.model.path, 0)
    row = {"kind": "eval", "examples": len(ds), "batch": cfg.training.eval_batch_size}
    for name, shared, by_length in (("separate", False, False), ("shared_unsorted", True, False), ("shared", True, True)):
        ctx = mock.patch.object(causal_lm, "_shared_prefix", lambda *a: None) if not shared else nullcontext()
        with ctx:
            t0 = time.perf_counter()
            row[name] = causal_lm.evaluate_causal(model, ds, cfg.training.eval_batch_size, by_length=by_length)
            row[f"{name}_seconds"] = time.perf_counter() - t0
    for other in ("separate", "shared_unsorted"):
        a, b = row[other], row["shared"]
        if a["accuracy"] != b["accuracy"] or abs(a["loss"] - b["loss"]) > 1e-4 * abs(a["loss"]):
            raise SystemExit(f"the evaluation by length with a shared prompt differs from {other}: {b} vs {a}")
    return row


# --------------------------------------------------------------------------- the strategy grid

GRID_STRATEGIES = {
    "fedit": {},
    "ffa": {},
    "flora": {},
    "hetlora": {},
    "ffa-het": {"lora": {"rank_distribution": "flora"}},
    "flora-het": {"lora": {"rank_distribution": "flora"}},
    "hetlora-het": {"lora": {"rank_distribution": "flora"}},
}


def trains_a(name: str) -> bool:
    """FedIT, FLoRA and HetLoRA train both LoRA factors; FFA-LoRA trains B only (A frozen)."""
    return not name.startswith("ffa")


def strategy_point(name: str, private: bool, seed: int, sets: tuple[str, ...] = (), lr_a: tuple[float, ...] | None = None) -> dict:
    """One grid point; ``lr_a`` is (lr with DP, lr in the clear) or (one lr for both) of the
    strategies that train A, or None for the example's training.lr."""
    from privlora.core.config import config_from_dict, config_to_dict
    from privlora.core.overrides import load_with_overrides
    from privlora.transports.inprocess import run_experiment

    raw = config_to_dict(load_with_overrides(EXAMPLE, sets))
    raw["federation"]["strategy"] = name.split("-")[0]
    raw["federation"]["server_momentum"] = -1.0
    raw["seed"] = seed
    raw["privacy"]["enabled"] = private
    if lr_a is not None and trains_a(name):
        raw["training"]["lr"] = lr_a[0] if private or len(lr_a) == 1 else lr_a[1]
    for section, values in GRID_STRATEGIES[name].items():
        raw[section].update(values)
    cfg = config_from_dict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        final = run_experiment(cfg, Path(tmp) / "run", progress=False)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = sorted(set(cfg.client_ranks()), reverse=True)
    return {"kind": "strategy", "name": name, "dp": private, "seed": seed, "set": list(sets),
            "lr_a": None if lr_a is None else lr_a[0] if len(lr_a) == 1 else list(lr_a),
            "lr": cfg.training.lr,
            "ranks": "FLoRA het." if name.endswith("-het") else "r " + "/".join(map(str, ranks)),
            "accuracy": final["test_accuracy"],
            "loss": final["test_loss"], "perplexity": final.get("test_perplexity"), "epsilon_max": final.get("epsilon_max"),
            "zero_shot_accuracy": rows[0]["test_accuracy"], "zero_shot_loss": rows[0]["test_loss"],
            "fedit_cross_term_error": [r["fedit_cross_term_error"] for r in rows if r.get("fedit_cross_term_error") is not None],
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- store and table


def grid_key(r: dict) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """Which grid a stored strategy point belongs to: its ``--set`` list and ``--lr-a`` (stored as
    one number when one was given, else as a list)."""
    lr_a = r.get("lr_a")
    if lr_a is not None:
        lr_a = tuple(lr_a) if isinstance(lr_a, list) else (lr_a,)
    return tuple(r.get("set", [])), lr_a


def stored() -> list[dict]:
    if not STORE.is_file():
        return []
    return [json.loads(line) for line in STORE.read_text().splitlines() if line.strip()]


def append(record: dict) -> None:
    record = {**record, "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/causal.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"}
    with STORE.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def render() -> str:
    rows = stored()
    lines = ["# Causal LM (SmolLM2-135M-Instruct): step cost and strategies", "",
             "Made by `python benchmarks/causal.py steps` and `python benchmarks/causal.py strategies`; "
             "every row of benchmarks/results/causal.jsonl names its command.", ""]
    steps = [r for r in rows if r.get("kind") == "step"]
    if steps:
        lines += ["## One optimizer step (logical batch 16, physical 8, LoRA r 8 on q_proj/v_proj)", "",
                  "| mode | tokens per sequence | seconds per step (median of 3) | peak RSS (MB) |", "|---|---|---|---|"]
        for r in sorted(steps, key=lambda r: (r["length"], MODES.index(r["mode"]))):
            lines.append(f"| {r['mode']} | {r['length']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
        by = {(r["mode"], r["length"]): r["seconds"] for r in steps}
        ratios = [by[("ghost", L)] / by[("hooks", L)] for L in sorted({r["length"] for r in steps})
                  if ("ghost", L) in by and ("hooks", L) in by]
        if ratios:
            lines += ["", f"Ghost clipping takes {min(ratios):.2f}-{max(ratios):.2f}x the time of hooks here (it runs two "
                          "backward passes; with LoRA on q_proj and v_proj only, hooks' per-sample gradients are small), at "
                          "about the same memory, so privlora's client uses hooks. A non-private step is no faster than a DP "
                          "step with hooks: the frozen model's forward and backward dominate, and the per-sample gradients "
                          "and clipping of the LoRA factors cost little here (why the plain rows came out slower, 4-19%, was "
                          "not investigated; each row ran alone in a fresh process, plain first)."]
        checks = [r for r in rows if r.get("kind") == "ghost-check"]
        for c in checks:
            lines += ["", f"Ghost clipping against hooks, same batch at noise 0 (L = {c['length']}): largest relative "
                          f"difference of the per-tensor update sums {c['max_rel_diff']:.2e}."]
        lines.append("")
    for r in [r for r in rows if r.get("kind") == "eval"][-1:]:
        lines += [f"## One held-out evaluation ({r['examples']} reviews x 2 answers, untrained model, batch {r['batch']})", "",
                  "| scoring | seconds | accuracy | loss |", "|---|---|---|---|",
                  f"| each answer as its own sequence | {r['separate_seconds']:.1f} | {r['separate']['accuracy']:.3f} | "
                  f"{r['separate']['loss']:.5f} |",
                  *([f"| prompt once, key/value cache per answer, batches in the data's order | {r['shared_unsorted_seconds']:.1f} | "
                     f"{r['shared_unsorted']['accuracy']:.3f} | {r['shared_unsorted']['loss']:.5f} |"] if "shared_unsorted" in r else []),
                  f"| prompt once, key/value cache per answer{', batches shortest first' if 'shared_unsorted' in r else ''} (privlora) | "
                  f"{r['shared_seconds']:.1f} | {r['shared']['accuracy']:.3f} | {r['shared']['loss']:.5f} |", ""]
    every = [r for r in rows if r.get("kind") == "strategy"]
    for sets, lr_a in sorted({grid_key(r) for r in every}, key=lambda k: (k[0], k[1] or ())):
        grid = [r for r in every if grid_key(r) == (sets, lr_a)]
        given = " ".join(f"`--set {a}`" for a in sets) + (" `--lr-a " + " ".join(f"{x:g}" for x in lr_a) + "`" if lr_a else "")
        probe = "data.holdout=validation" in sets
        lines += [f"## {'Learning-rate probe on the validation split' if probe else 'Strategies'} on examples/causal.toml"
                  f"{' with ' + given if given else ''} (held-out answer accuracy and response loss, final round)", "",
                  "| strategy | ranks | DP | lr | seeds | accuracy mean (sd) | loss mean (sd) | max ε | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["name"], r["dp"]) for r in grid})
        for name, dp in keys:
            g = [r for r in grid if r["name"] == name and r["dp"] == dp]
            acc = [r["accuracy"] for r in g]
            sd = f" ({statistics.stdev(acc):.3f})" if len(acc) > 1 else ""
            loss = [r["loss"] for r in g]
            loss_sd = f" ({statistics.stdev(loss):.4f})" if len(loss) > 1 else ""
            eps = f"{max(r['epsilon_max'] for r in g):.2f}" if dp else "-"
            lr = g[0].get("lr", 0.5)  # rows stored before "lr" was recorded ran at the example's 0.5
            lines.append(f"| {name.split('-')[0]} | {g[0].get('ranks', 'FLoRA het.' if name.endswith('-het') else 'r 8')} | {'yes' if dp else 'no'} | "
                         f"{lr:g} | {len(g)} | {statistics.fmean(acc):.3f}{sd} | {statistics.fmean(loss):.4f}{loss_sd} | "
                         f"{eps} | {statistics.fmean(r['seconds'] for r in g):.0f} |")
        zero = {r["seed"]: (r["zero_shot_accuracy"], r["zero_shot_loss"]) for r in grid}
        lines += ["", "Zero-shot (round 0): " + "; ".join(f"seed {k}: accuracy {a:.3f}, loss {l:.4f}" for k, (a, l) in sorted(zero.items())) + "."]
        for dp in (True, False):
            errs = [e for r in grid if r["name"] == "fedit" and r["dp"] == dp for e in r.get("fedit_cross_term_error", [])]
            if errs:
                lines.append(f"FedIT's cross-term error {'with DP' if dp else 'in the clear'} (||its update - the mean of the "
                             f"clients' updates||_F / ||the mean||_F, every round and seed): mean {statistics.fmean(errs):.3g}, "
                             f"range {min(errs):.3g} to {max(errs):.3g}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=("steps", "eval", "strategies", "_step", "_check"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(GRID_STRATEGIES), help="strategies: these grid strategies only")
    ap.add_argument("--dp", choices=("both", "yes", "no"), default="both", help="strategies: with DP, without, or both")
    ap.add_argument("--lr-a", type=float, nargs="+", metavar="LR", help="strategies: learning rate of the strategies "
                    "that train A (FedIT, FLoRA, HetLoRA), one for both or two: with DP, then in the clear; FFA-LoRA "
                    "keeps the example's training.lr")
    ap.add_argument("--mode")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="strategies: override a field of examples/causal.toml for every point (repeatable)")
    args = ap.parse_args(argv)
    if args.what == "_step":  # one row in a fresh process, so ru_maxrss is this row's peak
        print(json.dumps(time_step(args.mode, args.lengths[0])))
        return 0
    if args.what == "_check":
        print(json.dumps(clipped_sum(args.mode, args.lengths[0])))
        return 0
    if args.what == "steps":
        def child(kind: str, mode: str, length: int) -> dict:
            out = subprocess.run([sys.executable, __file__, kind, "--mode", mode, "--lengths", str(length)],
                                 check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        for length in args.lengths:
            hooks, ghost = child("_check", "hooks", length)["update"], child("_check", "ghost", length)["update"]
            worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(hooks, ghost))
            append({"kind": "ghost-check", "length": length, "max_rel_diff": worst})
            for mode in args.modes:
                row = child("_step", mode, length)
                append({"kind": "step", **row})
                print(f"{mode:6s} L={length:4d} {row['seconds']:.2f} s/step  peak {row['peak_rss_mb']:.0f} MB", flush=True)
    if args.what == "eval":
        row = time_eval()
        append(row)
        print(f"separate {row['separate_seconds']:.1f} s, shared {row['shared_seconds']:.1f} s", flush=True)
    if args.what == "strategies":
        if args.lr_a is not None and len(args.lr_a) > 2:
            ap.error("--lr-a takes one learning rate, or two (with DP, in the clear)")
        sets, lr_a = tuple(args.sets), tuple(args.lr_a) if args.lr_a else None
        done = {(r["name"], r["dp"], r["seed"]) for r in stored()
                if r.get("kind") == "strategy" and grid_key(r) == (sets, lr_a)}
        dps = {"both": (True, False), "yes": (True,), "no": (False,)}[args.dp]
        for seed in args.seeds:  # seed outermost: an interrupted grid leaves whole seeds
            for name in args.only or GRID_STRATEGIES:
                for dp in dps:
                    if (name, dp, seed) in done:
                        continue
                    row = strategy_point(name, dp, seed, sets, lr_a)
                    append(row)
                    print(f"{name} dp={dp} seed={seed}: accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)", flush=True)
    TABLE.write_text(render())
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
