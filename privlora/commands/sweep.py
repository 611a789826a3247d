"""Privacy-utility sweeps: one run per (strategy, epsilon, seed), a table and a plot from the folders.

    privlora sweep [CONFIG] --epsilons 1 2 4 8 inf --seeds 0 1 2 [--strategies ffa fedit] \\
                   [--set KEY=VALUE ...] [--workers N] --out DIR
    privlora sweep --grid grid.toml          # the same from a [sweep] table
    privlora sweep --resume DIR              # continue DIR's sweep with the grid it recorded
    privlora sweep --table DIR               # rebuild the table and the plot from DIR's run folders

Each grid point is an ordinary run folder, ``DIR/runs/<strategy>-eps<epsilon>-seed<seed>/``, made
by `privlora.transports.inprocess.run_experiment` from the base config (CONFIG, or the embedded default,
with every ``--set`` applied) with ``federation.strategy``, ``seed`` and the privacy fields set:
a finite epsilon sets ``privacy.enabled = true`` and ``privacy.target_epsilon`` (the noise is
calibrated to it; the budget stays the target unless the config sets budgets), ``inf`` sets
``privacy.enabled = false`` (the non-private line). ``privlora verify`` checks each folder.

Resuming: running the same sweep again (or ``--resume DIR``) looks at every point's folder:

- finished (`completion`: its config.toml is the point's, report.json belongs to that config
  and agrees with metrics.jsonl's final record, every planned round is in metrics.jsonl or the
  run stopped on a budget, and the adapter is saved): skipped, no file touched;
- interrupted with a usable checkpoint: continued with ``run_experiment(resume=True)``, so the
  charges already in its ledger are reused, never repeated;
- a start that never finished round 0: started again in place;
- a checkpoint that cannot be used (missing or damaged): the folder is moved to
  ``DIR/discarded/`` (nothing is deleted) and the point starts again;
- a folder whose config.toml is not the point's (the config or a --set changed): refused, with
  the folder named, before anything runs.

``DIR/sweep.json`` (replaced atomically after every change) holds the grid, the command lines
(``command``: the one that started the sweep; ``commands``: every invocation) and each point's
status. A point that fails (an error, or its worker process dying) is recorded
as failed and the others go on; Ctrl-C stops the sweep, records the points as they are and
leaves every finished point intact. ``--workers N`` runs N points at once, each in its own
process with ``cores // N`` torch threads (unless the config sets ``threads``).

The outputs are computed from the run folders alone, so ``--table DIR`` rebuilds them:
``DIR/table.md`` and ``DIR/table.csv`` (per strategy and epsilon: held-out accuracy mean, sd,
min and max over seeds, the epsilon actually spent, seconds), ``DIR/points.csv`` (one row per
finished run) and ``DIR/sweep.png`` (accuracy against epsilon on a log axis with the seed spread,
the non-private line and the majority-class line).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from privlora.core.checkpoint import CheckpointError, atomic_write, load_checkpoint
from privlora.core.config import (
    STRATEGIES,
    ConfigError,
    ExperimentConfig,
    FederationConfig,
    config_to_dict,
    config_to_toml,
    load_config,
    read_toml,
)
from privlora.core.errors import RunFolderError, UserError
from privlora.core.overrides import apply_overrides, flatten, parse_overrides, read_table, resolve

FORMAT = "privlora-sweep/1"
RUNS = "runs"
DISCARDED = "discarded"
SWEEP_JSON = "sweep.json"
GRID_KEYS = ("config", "epsilons", "seeds", "strategies", "set", "workers", "out")
"""The keys of a grid file's ``[sweep]`` table."""
SWEPT_KEYS = ("seed", "federation.strategy", "privacy.enabled", "privacy.target_epsilon")
"""What the sweep sets in each point; a --set of one of these is overridden by the grid."""


class SweepError(UserError):
    """A sweep's grid, output folder or one of its run folders is not what it must be."""


# --------------------------------------------------------------------------- the grid


def parse_epsilon(value: Any, where: str = "--epsilons") -> float:
    """A number > 0, or ``inf`` (also ``"inf"`` in a grid file) for the non-private run."""
    given = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "+inf", "infinity"):
            return math.inf
        try:
            value = float(text)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{where}: expected numbers > 0 or inf, found {given!r}")
    return float(value)


def parse_seed(value: Any, where: str = "--seeds") -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected whole numbers >= 0, found {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected whole numbers >= 0, found {value!r}")
    return value


def _unique(values: list) -> tuple:
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return tuple(out)


def epsilon_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def epsilon_json(eps: float) -> float | str:
    return "inf" if math.isinf(eps) else eps


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: the base config (a path, or None for the embedded default), typed
    overrides (dotted key -> value), and the epsilons, seeds and strategies it crosses."""

    config: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    epsilons: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()
    strategies: tuple[str, ...] = ()
    workers: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "set": self.overrides,
            "epsilons": [epsilon_json(e) for e in self.epsilons],
            "seeds": list(self.seeds),
            "strategies": list(self.strategies),
            "workers": self.workers,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Grid":
        return cls(
            config=d.get("config"),
            overrides=dict(d.get("set") or {}),
            epsilons=tuple(parse_epsilon(e, "sweep.json epsilons") for e in d.get("epsilons", [])),
            seeds=tuple(parse_seed(s, "sweep.json seeds") for s in d.get("seeds", [])),
            strategies=tuple(d.get("strategies") or ()),
            workers=int(d.get("workers") or 1),
        )


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The ``[sweep]`` table of a grid file, checked key by key; ``config`` and ``out`` are
    taken relative to the grid file's folder, ``set`` is a table of config fields
    (``[sweep.set]`` with ``federation.rounds = 3``) or a list of ``"KEY=VALUE"`` strings."""
    path = Path(path)
    doc = read_toml(path, "--grid", "a TOML file with a [sweep] table")
    extra = [k for k in doc if k != "sweep"]
    if extra or not isinstance(doc.get("sweep"), dict):
        raise ConfigError(f"--grid: {path} must hold one [sweep] table with keys {', '.join(GRID_KEYS)}"
                          + (f"; found {', '.join(extra)}" if extra else ""))
    table = doc["sweep"]
    for key in table:
        if key not in GRID_KEYS:
            raise ConfigError(f"sweep.{key}: unknown key. Allowed keys here: {', '.join(GRID_KEYS)}")
    out: dict[str, Any] = {}
    base = path.parent
    for key in ("config", "out"):
        if key in table:
            if not isinstance(table[key], str) or not table[key]:
                raise ConfigError(f"sweep.{key}: expected a path (a string), found {table[key]!r}")
            out[key] = os.path.normpath(base / table[key])
    for key in ("epsilons", "seeds", "strategies"):
        if key in table:
            if not isinstance(table[key], list) or not table[key]:
                raise ConfigError(f"sweep.{key}: expected a non-empty list, found {table[key]!r}")
            out[key] = list(table[key])
    if "workers" in table:
        w = table["workers"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"sweep.workers: expected a whole number >= 1, found {w!r}")
        out["workers"] = w
    if "set" in table:
        s = table["set"]
        if isinstance(s, dict):
            out["set"] = flatten(s)
        elif isinstance(s, list) and all(isinstance(x, str) for x in s):
            out["set"] = parse_overrides(s)
        else:
            raise ConfigError(f"sweep.set: expected a table of config fields ([sweep.set] with e.g. federation.rounds = 3) "
                              f"or a list of \"KEY=VALUE\" strings, found {s!r}")
    return out


def make_grid(
    config: str | None = None,
    epsilons: list | None = None,
    seeds: list | None = None,
    strategies: list | None = None,
    sets: list[str] | None = None,
    workers: int | None = None,
    grid_file: str | Path | None = None,
) -> tuple[Grid, str | None]:
    """The grid from a grid file (optional) and command-line values (which win; ``--set``s are
    applied after the file's). Returns (grid, the grid file's ``out`` or None)."""
    g = read_grid_file(grid_file) if grid_file else {}
    if config is not None and "config" in g:
        raise ConfigError(f"sweep: CONFIG {config} and sweep.config in {grid_file} both name the base config; give one")
    cfg_path = config if config is not None else g.get("config")
    eps_in = epsilons if epsilons else g.get("epsilons")
    seeds_in = seeds if seeds else g.get("seeds")
    if not eps_in:
        raise ConfigError("sweep: no epsilons; give --epsilons 1 2 4 8 inf (or epsilons = [...] in the grid file)")
    if not seeds_in:
        raise ConfigError("sweep: no seeds; give --seeds 0 1 2 (or seeds = [...] in the grid file)")
    eps = _unique([parse_epsilon(e, "--epsilons" if epsilons else "sweep.epsilons") for e in eps_in])
    sds = _unique([parse_seed(s, "--seeds" if seeds else "sweep.seeds") for s in seeds_in])
    strat = _unique(list(strategies or g.get("strategies") or []))
    for s in strat:
        if s not in STRATEGIES:
            where = "--strategies" if strategies else "sweep.strategies"
            raise ConfigError(f"{where}: {s!r} is not one of {', '.join(map(repr, STRATEGIES))}")
    overrides = dict(g.get("set") or {})
    overrides.update(parse_overrides(sets or []))
    w = workers if workers is not None else g.get("workers", 1)
    if cfg_path is not None:
        cfg_path = os.path.abspath(cfg_path)
    return Grid(cfg_path, overrides, eps, sds, strat, int(w)), g.get("out")


@dataclass(frozen=True)
class Point:
    name: str
    strategy: str
    epsilon: float
    seed: int
    cfg: ExperimentConfig

    @property
    def folder(self) -> str:
        return f"{RUNS}/{self.name}"


def point_name(strategy: str, epsilon: float, seed: int) -> str:
    return f"{strategy}-eps{epsilon_label(epsilon)}-seed{seed}"


def point_overrides(strategy: str, epsilon: float, seed: int) -> dict[str, Any]:
    over: dict[str, Any] = {"seed": seed, "federation.strategy": strategy}
    if math.isinf(epsilon):
        over["privacy.enabled"] = False
    else:
        over.update({"privacy.enabled": True, "privacy.target_epsilon": epsilon})
    return over


def _base_strategy(raw: dict[str, Any]) -> str:
    fed = raw.get("federation")
    value = fed.get("strategy") if isinstance(fed, dict) else None
    return value if isinstance(value, str) else FederationConfig().strategy


def expand(grid: Grid) -> tuple[list[Point], str]:
    """Every point of the grid with its validated config, and the sweep's identity (the SHA-256
    of the base config with the swept fields fixed): two sweeps with one identity may share a
    folder. Any point whose config is invalid stops the sweep before anything runs."""
    for key in SWEPT_KEYS:
        if key in grid.overrides:
            instead = {"seed": "--seeds", "federation.strategy": "--strategies"}.get(key, "--epsilons (inf = no DP)")
            raise ConfigError(f"--set {key}: the sweep sets it for every point; give it with {instead} instead")
    raw = apply_overrides(read_table(grid.config), grid.overrides)
    strategies = grid.strategies or (_base_strategy(raw),)
    fixed_noise = (raw.get("privacy") or {}).get("noise_multiplier", 0) if isinstance(raw.get("privacy"), dict) else 0
    if fixed_noise and any(not math.isinf(e) for e in grid.epsilons):
        raise ConfigError(
            f"privacy.noise_multiplier = {fixed_noise} fixes the noise, so a sweep over epsilon would train every point "
            "with the same noise; calibrate it instead: --set privacy.noise_multiplier=0"
        )
    points = []
    for s in strategies:
        for e in grid.epsilons:
            for seed in grid.seeds:
                name = point_name(s, e, seed)
                try:
                    cfg = resolve(raw, point_overrides(s, e, seed), blame=False)
                except ConfigError as exc:
                    raise ConfigError(f"sweep point {name}: {exc}") from exc
                points.append(Point(name, s, e, seed, cfg))
    # identity: the base with the swept fields set to fixed values
    neutral = apply_overrides(raw, {"seed": 0, "federation.strategy": "ffa", "privacy.enabled": False,
                                        "privacy.target_epsilon": 8.0})
    try:
        ident = hashlib.sha256(json.dumps(non_default(resolve(neutral, {})), sort_keys=True).encode()).hexdigest()
    except ConfigError:  # the base is only valid with the points' strategies: hash its raw table
        ident = hashlib.sha256(json.dumps(neutral, sort_keys=True, default=str).encode()).hexdigest()
    return points, ident


def non_default(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from the defaults (dotted keys): what identifies a base
    config, so that a release adding a field with a default keeps every sweep's identity."""
    flat, default = flatten(config_to_dict(cfg)), flatten(config_to_dict(ExperimentConfig()))
    return {k: v for k, v in flat.items() if default.get(k, object()) != v}


def same_config(cfg_file: Path, cfg: ExperimentConfig) -> bool:
    """Whether the run folder's ``config.toml`` is ``cfg``: read by this version (a field it has
    that the file lacks takes its default, which is what the older version that wrote the file
    ran) and compared as resolved configs."""
    try:
        return config_to_toml(load_config(cfg_file)) == config_to_toml(cfg)
    except ConfigError:
        return False


# --------------------------------------------------------------------------- a point's folder


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def completion(folder: str | Path) -> tuple[bool, str]:
    """(finished, why not): a run folder is finished when its report.json was written for its
    config.toml and agrees with metrics.jsonl's final record, every planned round is recorded
    (or the run stopped on a budget, which is final), no round was aborted, and the adapter is
    saved. Reads only; never raises on a damaged folder."""
    from privlora.core.config import load_config
    from privlora.reporting.report import read_metrics

    folder = Path(folder)
    try:
        if not (folder / "config.toml").is_file():
            return False, "no config.toml"
        cfg = load_config(folder / "config.toml")
        report_path = folder / "report.json"
        if not report_path.is_file():
            return False, "no report.json (the run did not finish)"
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or report.get("format") != "privlora-run-report/1":
            return False, "report.json is not a privlora run report"
        run = report.get("run") or {}
        if run.get("config_sha256") != _sha256_file(folder / "config.toml"):
            return False, "report.json was written for another config.toml"
        rows = read_metrics(folder)
        if any(r.get("aborted") for r in rows):
            return False, "a round was aborted (resuming retries it)"
        final = [r for r in rows if "stopped" not in r][-1]
        stopped = any("stopped" in r for r in rows)
        if not stopped and final["round"] != cfg.federation.rounds:
            return False, f"metrics.jsonl ends at round {final['round']} of {cfg.federation.rounds}"
        if run.get("rounds_completed") != final["round"]:
            return False, "report.json and metrics.jsonl disagree on the rounds completed"
        if (report.get("accuracy") or {}).get("final") != final["test_accuracy"]:
            return False, "report.json and metrics.jsonl disagree on the final accuracy"
        if not (folder / "adapter" / "adapter_model.safetensors").is_file():
            return False, "no adapter/adapter_model.safetensors"
        if cfg.privacy.enabled and not (folder / "ledger.jsonl").is_file():
            return False, "no ledger.jsonl"
        return True, ""
    except (ConfigError, RunFolderError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return False, f"unreadable ({type(exc).__name__}: {exc})"


def plan_point(out: Path, point: Point) -> tuple[str, str]:
    """What to do with a point: ("skip" | "run" | "resume" | "restart", why). Raises SweepError
    for a folder that is not this point's run (nothing is touched)."""
    from privlora.federation import preflight

    folder = out / point.folder
    if not folder.exists():
        return "run", "not started"
    if not folder.is_dir():
        raise SweepError(f"{folder} is a file where point {point.name}'s run folder belongs; move it away and run the sweep again")
    if not any(folder.iterdir()):
        return "run", "empty folder"
    cfg_file = folder / "config.toml"
    if not cfg_file.is_file():
        raise SweepError(f"{folder} holds files but no config.toml, so it is not a run of this sweep; move it away and "
                         "run the sweep again")
    if not same_config(cfg_file, point.cfg):
        raise SweepError(
            f"{folder}: its config.toml is not point {point.name}'s config (the base config or a --set changed since it "
            f"ran); run the sweep with the CONFIG and --set it was started with (`privlora sweep --resume {out}`), use a "
            "new --out, or move that folder away to run the point again"
        )
    done, why = completion(folder)
    if done:
        return "skip", "finished"
    if preflight.is_failed_start(folder):
        return "run", "a start that never finished round 0"
    try:
        preflight.check_resume_folder(folder)
        load_checkpoint(folder, _sha256_file(cfg_file))
    except (RunFolderError, CheckpointError) as exc:
        return "restart", f"{why}; its checkpoint cannot be used ({exc})"
    return "resume", why


def discard(out: Path, point: Point) -> Path:
    """Move a point's unusable folder to DIR/discarded/ (nothing is deleted)."""
    dest_dir = out / DISCARDED
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{point.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{point.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    os.replace(out / point.folder, dest)
    return dest


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def run_point(cfg: ExperimentConfig, folder: str | Path, action: str) -> dict[str, Any]:
    """Run (or resume) one point in this process; returns {"status", "error", "seconds"}. Any
    error is caught and returned, so one point's failure never stops the others."""
    from privlora.transports import inprocess as simulation

    t0 = time.perf_counter()
    try:
        if action == "resume":
            final = simulation.run_experiment(None, folder, progress=False, resume=True)
        else:
            final = simulation.run_experiment(cfg, folder, progress=False, resume=False)
    except KeyboardInterrupt:
        return {"status": "interrupted", "error": "interrupted (Ctrl-C)", "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - recorded in sweep.json, the sweep goes on
        return {"status": "failed", "error": _one_line(exc), "seconds": time.perf_counter() - t0}
    status = "aborted" if final.get("aborted") else "done"
    return {"status": status, "error": final.get("stopped") if status == "aborted" else None,
            "seconds": time.perf_counter() - t0}


def _child(cfg: ExperimentConfig, folder: str, action: str, threads: int, conn) -> None:
    """A worker process: one point with ``threads`` torch threads; the result goes back on ``conn``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not cfg.threads:
        torch.set_num_threads(threads)
    from privlora.core.progress import quiet_library_warnings

    quiet_library_warnings()
    try:
        result = run_point(cfg, folder, action)
    except KeyboardInterrupt:
        result = {"status": "interrupted", "error": "interrupted (Ctrl-C)", "seconds": 0.0}
    try:
        conn.send(result)
    finally:
        conn.close()


# --------------------------------------------------------------------------- the sweep


def _write_state(out: Path, grid: Grid, ident: str, commands: list[list[str]], records: dict[str, dict]) -> None:
    doc = {
        "format": FORMAT,
        "command": commands[0],
        "commands": commands,
        "grid": grid.to_json(),
        "identity": ident,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "points": list(records.values()),
    }
    atomic_write(out / SWEEP_JSON, json.dumps(doc, indent=1) + "\n")


def read_state(out: str | Path) -> dict[str, Any]:
    path = Path(out) / SWEEP_JSON
    if not path.is_file():
        raise SweepError(f"{path} is missing: {out} is not a privlora sweep folder (the --out of privlora sweep)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path} is not valid JSON ({exc}); it was damaged: restore it, or run the sweep again with "
                         "its CONFIG and options (finished points are kept)") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SweepError(f"{path} is not a privlora sweep record (format {FORMAT!r})")
    return doc


def check_out(out: Path, ident: str, points: list[Point] | None = None) -> None:
    """``--out`` is new, empty, or holds a sweep of the same base config: the same identity, or
    (a sweep.json written by an older version, whose identity was computed otherwise) run
    folders of which at least one exists and every one is its point's config."""
    if os.path.lexists(out) and not out.is_dir():
        raise SweepError(f"--out: {out} is a file, not a folder; give the path of a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / SWEEP_JSON).is_file():
        if (out / RUNS).is_dir():
            return  # the sweep.json was lost: each run folder is checked against its point
        raise SweepError(f"--out: {out} holds files but no {SWEEP_JSON}, so it is not a sweep folder; choose a new folder")
    doc = read_state(out)
    if doc.get("identity") != ident and not _folders_match(out, points or []):
        raise SweepError(
            f"--out: {out} holds a sweep of another base config (the config or a --set differ); continue that one with "
            f"`privlora sweep --resume {out}`, or give a new --out"
        )


def _folders_match(out: Path, points: list[Point]) -> bool:
    present = [p for p in points if (out / p.folder / "config.toml").is_file()]
    return bool(present) and all(same_config(out / p.folder / "config.toml", p.cfg) for p in present)


def _emit(bar, text: str) -> None:
    if bar is not None and not bar.disable:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def run_sweep(
    grid: Grid,
    out: str | Path,
    command: list[str] | None = None,
    progress: bool = True,
    after_point: Callable[[str, dict], None] | None = None,
    worker: Callable | None = None,
) -> dict[str, Any]:
    """Run every unfinished point of ``grid`` into ``out``, then write the table and the plot.

    Returns {"points": {name: record}, "done": n, "failed": n, "table": rows}. Raises
    KeyboardInterrupt (after recording every point's status) when interrupted. ``after_point``
    is called with each point's name and record as it ends; ``worker`` is the function each worker
    process runs with ``workers > 1`` (default `_child`; tests give one that dies)."""
    from privlora.federation.engine import _bar

    out = Path(out)
    points, ident, plans = _plan_sweep(grid, out)
    commands, earlier = _earlier_record(out, points, command)
    records = _initial_records(points, plans, earlier)
    _write_state(out, grid, ident, commands, records)
    todo = [p for p in points if plans[p.name][0] != "skip"]
    finished = len(points) - len(todo)
    bar = _bar(len(points), "sweep", 0, progress)
    bar.update(finished)
    if progress and finished:
        _emit(bar, f"privlora: sweep: {finished} of {len(points)} points already finished in {out}; running {len(todo)}")
    sweep = _Sweep(out, grid, ident, commands, plans, records, bar, progress, after_point)
    _run_points(sweep, todo, worker or _child)
    rows = write_tables(out)
    current = [records[p.name] for p in points]
    counts = {s: sum(1 for r in current if r["status"] == s) for s in ("done", "failed", "aborted", "interrupted")}
    return {"points": {r["name"]: r for r in current}, "table": rows, **counts, "total": len(points)}


def _plan_sweep(grid: Grid, out: Path) -> tuple[list[Point], str, dict[str, tuple[str, str]]]:
    """The grid's points, the sweep's identity and each point's plan (`plan_point`), with ``out``
    and every point's folder checked before anything runs; announces the sweep and makes DIR/runs."""
    points, ident = expand(grid)
    check_out(out, ident, points)
    plans = {p.name: plan_point(out, p) for p in points}  # every folder checked before anything runs
    print(f"privlora: sweep of {len(points)} points over {'the embedded default' if grid.config is None else grid.config} "
          f"-> {out} ({grid.workers} worker{'s' if grid.workers > 1 else ''})", file=sys.stderr, flush=True)
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    return points, ident, plans


def _earlier_record(out: Path, points: list[Point], command: list[str] | None) -> tuple[list[list[str]], list[dict]]:
    """From DIR's sweep.json, if any: every command line so far with ``command`` last, and the
    records of points not in this grid (marked ``in_grid: false``)."""
    commands = [list(command or [])]
    earlier: list[dict] = []
    if (out / SWEEP_JSON).is_file():  # every invocation is kept: the first made the grid
        previous = read_state(out)
        commands = [c for c in previous.get("commands") or [previous.get("command") or []]] + commands
        names = {p.name for p in points}  # points of an earlier, larger grid stay on record (and in the table)
        earlier = [dict(r, in_grid=False) for r in previous.get("points", []) if r.get("name") not in names]
    return commands, earlier


def _initial_records(points: list[Point], plans: dict[str, tuple[str, str]], earlier: list[dict]) -> dict[str, dict]:
    """Each point's sweep.json record before anything runs ("done" when skipped, else "pending"),
    then the earlier records."""
    records: dict[str, dict] = {}
    for p in points:
        action, why = plans[p.name]
        records[p.name] = {
            "name": p.name, "strategy": p.strategy, "epsilon": epsilon_json(p.epsilon), "seed": p.seed,
            "folder": p.folder, "config_sha256": hashlib.sha256(config_to_toml(p.cfg).encode()).hexdigest(),
            "status": "done" if action == "skip" else "pending", "action": action, "note": why, "error": None,
        }
    for r in earlier:
        records[r["name"]] = r
    return records


@dataclass
class _Sweep:
    """A running sweep: its folder, grid, identity, command lines, plans, records and progress bar.
    `start` and `end` bracket each point and write sweep.json after every change."""

    out: Path
    grid: Grid
    ident: str
    commands: list[list[str]]
    plans: dict[str, tuple[str, str]]
    records: dict[str, dict]
    bar: Any
    progress: bool
    after_point: Callable[[str, dict], None] | None

    def save(self) -> None:
        _write_state(self.out, self.grid, self.ident, self.commands, self.records)

    def start(self, p: Point) -> str:
        """Mark ``p`` running (first moving an unusable folder to DIR/discarded/); returns
        the action for `run_point`: "resume" or "run"."""
        action, why = self.plans[p.name]
        if action == "restart":
            dest = discard(self.out, p)
            _emit(self.bar, f"privlora: sweep: {p.name}: {why}; moved its folder to {dest} and starting it again")
        self.records[p.name].update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.save()
        return "resume" if action == "resume" else "run"

    def end(self, p: Point, result: dict) -> None:
        """Record ``p``'s result (a "done" whose folder is not complete is "failed"), report it
        and call ``after_point``."""
        status = result["status"]
        if status == "done":
            ok, why = completion(self.out / p.folder)
            if not ok:
                status, result = "failed", dict(result, error=f"the run returned but its folder is not complete: {why}")
        self.records[p.name].update(status=status, error=result.get("error"), seconds=round(result.get("seconds", 0.0), 2))
        self.save()
        if status == "done":
            self.bar.update(1)
        if self.progress or status != "done":
            acc = _final_accuracy(self.out / p.folder) if status == "done" else None
            tail = f", accuracy {acc:.3f}" if acc is not None else ("" if status == "interrupted" else f": {result.get('error')}")
            _emit(self.bar, f"privlora: sweep: {p.name}: {status} ({result.get('seconds', 0):.1f} s){tail}")
        if self.after_point is not None:
            self.after_point(p.name, self.records[p.name])


def _run_points(sweep: _Sweep, todo: list[Point], worker: Callable) -> None:
    """Run ``todo`` one after another in this process, or with ``grid.workers > 1`` in worker
    processes; on Ctrl-C marks the running points interrupted, saves, closes the bar and re-raises."""
    try:
        if sweep.grid.workers <= 1 or len(todo) <= 1:
            for p in todo:
                sweep.bar.set_postfix_str(p.name)
                action = sweep.start(p)
                sweep.end(p, run_point(p.cfg, sweep.out / p.folder, action))
                if sweep.records[p.name]["status"] == "interrupted":
                    raise KeyboardInterrupt
        else:
            _run_parallel(todo, sweep.grid.workers, sweep.out, sweep.start, sweep.end, sweep.bar, worker)
    except KeyboardInterrupt:
        for rec in sweep.records.values():
            if rec["status"] == "running":
                rec.update(status="interrupted", error="interrupted (Ctrl-C)")
        sweep.save()
        sweep.bar.close()
        raise
    sweep.bar.close()


def _run_parallel(todo: list[Point], workers: int, out: Path, start, end, bar, target: Callable) -> None:
    """Up to ``workers`` points at once, each in its own spawned process."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = list(todo)
    running: dict[Any, tuple] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                p = queue.pop(0)
                action = start(p)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=target, args=(p.cfg, str(out / p.folder), action, threads, send),
                                   name=f"privlora-sweep-{p.name}")
                proc.start()
                send.close()
                running[proc.sentinel] = (proc, recv, p)
                bar.set_postfix_str(", ".join(q.name for _, _, q in running.values()))
            for sentinel in wait(list(running)):
                proc, recv, p = running.pop(sentinel)
                result = None
                try:
                    if recv.poll():
                        result = recv.recv()
                except (EOFError, OSError):
                    result = None
                proc.join()
                recv.close()
                if result is None:
                    result = {"status": "failed", "seconds": 0.0,
                              "error": f"its worker process died (exit code {proc.exitcode}); run the sweep again to resume it"}
                end(p, result)
            if running:
                bar.set_postfix_str(", ".join(q.name for _, _, q in running.values()))
    except KeyboardInterrupt:
        import signal

        for proc, recv, p in running.values():  # each child stops its run where a resume can continue it
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except OSError:
                    pass
        for proc, recv, p in running.values():
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        raise


# --------------------------------------------------------------------------- table and plot from the folders


def _final_accuracy(folder: Path) -> float | None:
    from privlora.reporting.report import read_metrics

    try:
        rows = read_metrics(folder)
    except (RunFolderError, OSError):
        return None
    return [r for r in rows if "stopped" not in r][-1]["test_accuracy"]


def read_point(folder: Path) -> dict[str, Any] | None:
    """One finished run folder as a table row's raw material; None when it is not finished."""
    from privlora.core.config import load_config
    from privlora.reporting.report import read_metrics

    ok, _ = completion(folder)
    if not ok:
        return None
    cfg = load_config(folder / "config.toml")
    rows = read_metrics(folder)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    final = [r for r in rows if "stopped" not in r][-1]
    private = cfg.privacy.enabled
    privacy = report.get("privacy") or {}
    return {
        "name": folder.name,
        "strategy": cfg.federation.strategy,
        "epsilon": cfg.privacy.target_epsilon if private else math.inf,
        "seed": cfg.seed,
        "accuracy": final["test_accuracy"],
        "rounds": final["round"],
        "stopped": (report.get("run") or {}).get("stopped"),
        "epsilon_spent": privacy.get("epsilon_record_level") if private else None,
        "delta": cfg.privacy.delta if private else None,
        "seconds": sum(float(r.get("seconds") or 0.0) for r in rows),
        "majority_baseline": rows[0]["majority_baseline"],
    }


def read_points(out: str | Path) -> tuple[list[dict], dict[tuple[str, float], int], list[str]]:
    """Every finished run under DIR/runs; the number of planned points per (strategy, epsilon)
    from sweep.json (when present); the grid's strategy order."""
    out = Path(out)
    runs = out / RUNS
    found = [read_point(d) for d in sorted(runs.iterdir()) if d.is_dir()] if runs.is_dir() else []
    found = [f for f in found if f is not None]
    planned: dict[tuple[str, float], int] = {}
    order: list[str] = []
    if (out / SWEEP_JSON).is_file():
        for rec in read_state(out).get("points", []):
            key = (rec["strategy"], parse_epsilon(rec["epsilon"], "sweep.json"))
            planned[key] = planned.get(key, 0) + 1
            if rec["strategy"] not in order:
                order.append(rec["strategy"])
    return found, planned, order


def summarise(points: list[dict], planned: dict | None = None, order: list[str] | None = None) -> list[dict]:
    """Per (strategy, epsilon): accuracy mean, sample sd, min and max over seeds, the epsilon
    spent (largest over clients in each run's report.json; mean and max over seeds), mean seconds."""
    planned = planned or {}
    order = list(order or [])
    for p in points:
        if p["strategy"] not in order:
            order.append(p["strategy"])
    groups: dict[tuple[str, float], list[dict]] = {}
    for p in points:
        groups.setdefault((p["strategy"], p["epsilon"]), []).append(p)
    for key in planned:
        groups.setdefault(key, [])
        if key[0] not in order:
            order.append(key[0])
    rows = []
    for key in sorted(groups, key=lambda k: (order.index(k[0]), k[1])):
        g = sorted(groups[key], key=lambda p: p["seed"])
        accs = [p["accuracy"] for p in g]
        spent = [p["epsilon_spent"] for p in g if p["epsilon_spent"] is not None]
        rows.append({
            "strategy": key[0],
            "epsilon": key[1],
            "runs": len(g),
            "planned": max(planned.get(key, 0), len(g)),
            "seeds": [p["seed"] for p in g],
            "accuracy_mean": statistics.fmean(accs) if accs else None,
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "accuracy_min": min(accs) if accs else None,
            "accuracy_max": max(accs) if accs else None,
            "epsilon_spent_mean": statistics.fmean(spent) if spent else None,
            "epsilon_spent_max": max(spent) if spent else None,
            "seconds_mean": statistics.fmean(p["seconds"] for p in g) if g else None,
            "majority_baseline": statistics.fmean(p["majority_baseline"] for p in g) if g else None,
            "stopped": [p["name"] for p in g if p["stopped"]],
        })
    return rows


TABLE_COLUMNS = ("strategy", "epsilon", "runs", "planned", "accuracy_mean", "accuracy_sd", "accuracy_min", "accuracy_max",
                 "epsilon_spent_mean", "epsilon_spent_max", "seconds_mean", "majority_baseline")
POINT_COLUMNS = ("name", "strategy", "epsilon", "seed", "accuracy", "rounds", "epsilon_spent", "delta", "seconds",
                 "majority_baseline", "stopped")


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["inf" if isinstance(r[c], float) and math.isinf(r[c]) else ("" if r[c] is None else r[c]) for c in columns])
    return buf.getvalue()


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render_markdown(rows: list[dict], points: list[dict]) -> str:
    deltas = sorted({p["delta"] for p in points if p["delta"] is not None})
    delta = f" at δ = {', '.join(f'{d:g}' for d in deltas)}" if deltas else ""
    lines = [
        "# privlora sweep", "",
        "| strategy | ε (target) | runs | accuracy mean | sd | min | max | ε spent (max) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (no DP)" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        runs = f"{r['runs']}" if r["runs"] == r["planned"] else f"{r['runs']} of {r['planned']}"
        lines.append(
            f"| {r['strategy']} | {eps} | {runs} | {_fmt(r['accuracy_mean'], '.3f')} | {_fmt(r['accuracy_sd'], '.3f')} | "
            f"{_fmt(r['accuracy_min'], '.3f')} | {_fmt(r['accuracy_max'], '.3f')} | {_fmt(r['epsilon_spent_max'], '.3f')} | "
            f"{_fmt(r['seconds_mean'], '.1f')} |"
        )
    majority = [r["majority_baseline"] for r in rows if r["majority_baseline"] is not None]
    lines += [
        "",
        "Accuracy: the final global model's held-out accuracy of each run (metrics.jsonl); mean, sample standard "
        "deviation, min and max over the seeds that finished. ε spent: the largest epsilon any client spent"
        f"{delta}, from each run's report.json (the ledger's accounting), the largest over seeds; `privlora verify` "
        "recomputes it from each run's ledger. Seconds: mean over seeds of the run's round times in metrics.jsonl "
        "(round 0's evaluation included; loading data and model not counted).",
    ]
    if majority:
        lines += ["", f"Majority class (predicting the most frequent label): {statistics.fmean(majority):.3f}."]
    stopped = [p for p in points if p["stopped"]]
    if stopped:
        lines += ["", "Runs that stopped before their last round (a budget stop; their accuracy is the last round's):"]
        lines += [f"- `{p['name']}` after round {p['rounds']}: {p['stopped']}" for p in stopped]
    lines += ["", "Made from the run folders by `privlora sweep --table DIR`; one row per run in `points.csv`.", "",
              "![accuracy against epsilon](sweep.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against epsilon (log scale) per strategy with the seed spread (min to max band,
    sd error bars); the non-private runs and the majority class as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    finite = sorted({r["epsilon"] for r in rows if not math.isinf(r["epsilon"]) and r["runs"]})
    for i, s in enumerate(strategies):
        c = colours[i % len(colours)]
        pts = [r for r in rows if r["strategy"] == s and not math.isinf(r["epsilon"]) and r["runs"]]
        if pts:
            x = [r["epsilon"] for r in pts]
            ax.fill_between(x, [r["accuracy_min"] for r in pts], [r["accuracy_max"] for r in pts], color=c, alpha=0.15, lw=0)
            ax.errorbar(x, [r["accuracy_mean"] for r in pts], yerr=[r["accuracy_sd"] or 0.0 for r in pts], color=c,
                        marker="o", capsize=3, label=f"{s} (DP, mean ± sd; band min–max)")
        for r in rows:
            if r["strategy"] == s and math.isinf(r["epsilon"]) and r["runs"]:
                ax.axhline(r["accuracy_mean"], color=c, ls="--", lw=1.5, label=f"{s} no DP (ε = ∞): {r['accuracy_mean']:.3f}")
                if r["runs"] > 1:
                    ax.axhspan(r["accuracy_min"], r["accuracy_max"], color=c, alpha=0.07, lw=0)
    majority = [r["majority_baseline"] for r in rows if r["majority_baseline"] is not None]
    if majority:
        # drawn last and on top, dotted black with markers: a no-DP line at the same height cannot hide it
        level = statistics.fmean(majority)
        ax.plot([0, 1], [level, level], transform=ax.get_yaxis_transform(), color="black", ls=":", lw=2, marker="|",
                markevery=0.1, markersize=8, zorder=10, label=f"majority class: {level:.3f}")
    ax.set_xscale("log")
    if finite:
        lo, hi = finite[0], finite[-1]
        ax.set_xlim(lo / 1.5, hi * 1.5)
        ax.set_xticks(finite)
        ax.set_xticklabels([f"{e:g}" for e in finite])
        ax.minorticks_off()
    else:
        ax.set_xlim(0.5, 16)
    ax.set_xlabel("ε per client (target, log scale)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Privacy-utility sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_tables(out: str | Path) -> list[dict]:
    """table.md, table.csv, points.csv and sweep.png from DIR's run folders alone; returns the rows."""
    out = Path(out)
    if not (out / RUNS).is_dir():
        raise SweepError(f"--table: {out} holds no {RUNS}/ folder; give the --out folder of a privlora sweep")
    points, planned, order = read_points(out)
    rows = summarise(points, planned, order)
    atomic_write(out / "table.csv", _csv(rows, TABLE_COLUMNS))
    atomic_write(out / "points.csv", _csv(sorted(points, key=lambda p: p["name"]), POINT_COLUMNS))
    atomic_write(out / "table.md", render_markdown(rows, points))
    plot(rows, out / "sweep.png")
    return rows


def resume_grid(out: str | Path, workers: int | None = None) -> Grid:
    """The grid a sweep folder recorded (``--resume DIR``), optionally with other workers."""
    doc = read_state(out)
    grid = Grid.from_json(doc.get("grid") or {})
    if workers is not None:
        grid = Grid(grid.config, grid.overrides, grid.epsilons, grid.seeds, grid.strategies, workers)
    return grid


__all__ = [
    "Grid",
    "Point",
    "SweepError",
    "completion",
    "expand",
    "make_grid",
    "plan_point",
    "read_grid_file",
    "read_points",
    "resume_grid",
    "run_point",
    "run_sweep",
    "summarise",
    "write_tables",
]
