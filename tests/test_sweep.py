"""`privlora sweep`: one verifiable run folder per grid point, a table computed from the folders
(checked here against numbers recomputed from metrics.jsonl and report.json), resuming after a
crash without touching finished points, and one point's failure never losing the others."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from accounting import verify_run
from privlora.transports import inprocess as simulation
from privlora.commands import sweep
from privlora.commands.cli import main
from privlora.core.config import ConfigError, load_config
from privlora.core.accountants import get_accountant  # noqa: F401  (registers "prv" for verify_run)
from privlora.commands.sweep import Grid, SweepError, make_grid, run_sweep

OUTPUTS = ("table.md", "table.csv", "points.csv", "sweep.png")


def base_toml(model_dir: Path, rounds: int = 2) -> str:
    return (
        f'name = "sweep-test"\nthreads = 1\n[model]\npath = "{model_dir}"\nmax_length = 32\n'
        '[data]\nmax_examples = 200\nnum_clients = 2\npartition = "iid"\ntest_fraction = 0.25\n'
        f'[lora]\nr = 2\nalpha = 4.0\n[federation]\nrounds = {rounds}\nclients_per_round = 2\n'
        '[training]\nlocal_steps = 1\nbatch_size = 16\nphysical_batch_size = 16\nlr = 0.5\n'
    )


@pytest.fixture(scope="module")
def base_config(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep-config") / "base.toml"
    path.write_text(base_toml(tiny_model_dir))
    return path


@pytest.fixture(scope="module")
def finished_sweep(base_config, tmp_path_factory) -> Path:
    """A finished sweep: ffa x {2, inf} x seeds {0, 1}, made through the command line."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    code = main(["sweep", str(base_config), "--epsilons", "2", "inf", "--seeds", "0", "1", "--strategies", "ffa",
                 "--out", str(out), "--quiet"])
    assert code == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (SHA-256, mtime in ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def grid_of(base_config: Path, **kw) -> Grid:
    grid, _ = make_grid(str(base_config), kw.get("epsilons", ["2", "inf"]), kw.get("seeds", ["0"]),
                        kw.get("strategies", ["ffa"]), kw.get("sets", []), kw.get("workers", 1))
    return grid


# --------------------------------------------------------------------------- the table is the folders'


def test_table_equals_the_numbers_in_the_run_folders(finished_sweep):
    runs = finished_sweep / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["ffa-eps2-seed0", "ffa-eps2-seed1", "ffa-epsinf-seed0", "ffa-epsinf-seed1"]
    expected = {}
    for eps in ("2", "inf"):
        accs, spent, secs = [], [], []
        for seed in (0, 1):
            folder = runs / f"ffa-eps{eps}-seed{seed}"
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
            report = json.loads((folder / "report.json").read_text())
            assert rows[-1]["round"] == 2
            accs.append(rows[-1]["test_accuracy"])
            assert report["accuracy"]["final"] == rows[-1]["test_accuracy"]
            secs.append(sum(r["seconds"] for r in rows))
            if eps != "inf":
                per_client = [c["epsilon"] for c in report["privacy"]["clients"].values()]
                spent.append(max(per_client))
                assert max(per_client) == pytest.approx(rows[-1]["epsilon_max"], rel=1e-9)
        expected[eps] = (accs, spent, secs)
    table = {r["epsilon"]: r for r in read_csv(finished_sweep / "table.csv")}
    assert set(table) == {"2.0", "inf"}
    for eps, key in (("2", "2.0"), ("inf", "inf")):
        accs, spent, secs = expected[eps]
        row = table[key]
        assert row["strategy"] == "ffa" and int(row["runs"]) == 2 and int(row["planned"]) == 2
        assert float(row["accuracy_mean"]) == pytest.approx(np.mean(accs), abs=1e-12)
        assert float(row["accuracy_sd"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        assert float(row["accuracy_min"]) == min(accs) and float(row["accuracy_max"]) == max(accs)
        assert float(row["seconds_mean"]) == pytest.approx(np.mean(secs), rel=1e-9)
        if spent:
            assert float(row["epsilon_spent_max"]) == pytest.approx(max(spent), rel=1e-12)
            assert 0 < max(spent) <= 2.0 + 1e-9
        else:
            assert row["epsilon_spent_max"] == ""
    md = (finished_sweep / "table.md").read_text()
    assert f"| ffa | 2 | 2 | {np.mean(expected['2'][0]):.3f} |" in md
    assert "| ffa | ∞ (no DP) | 2 |" in md
    assert (finished_sweep / "sweep.png").stat().st_size > 1000
    state = json.loads((finished_sweep / "sweep.json").read_text())
    assert state["format"] == "privlora-sweep/1"
    assert state["command"][:3] == ["privlora", "sweep", state["grid"]["config"]]
    assert state["grid"]["epsilons"] == [2.0, "inf"] and state["grid"]["seeds"] == [0, 1]
    assert {p["name"]: p["status"] for p in state["points"]} == {p.name: "done" for p in runs.iterdir()}


def test_every_point_verifies_and_inf_is_the_non_private_run(finished_sweep):
    for seed in (0, 1):
        dp = finished_sweep / "runs" / f"ffa-eps2-seed{seed}"
        cfg = load_config(dp / "config.toml")
        assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 2.0 and cfg.seed == seed
        assert cfg.privacy.noise_multiplier == 0.0  # calibrated to the point's epsilon
        res = verify_run(dp)
        assert res.ok, res.problems
        assert res.entries > 0 and max(res.epsilons.values()) <= 2.0 + 1e-9
        free = finished_sweep / "runs" / f"ffa-epsinf-seed{seed}"
        cfg = load_config(free / "config.toml")
        assert not cfg.privacy.enabled and cfg.seed == seed
        assert not (free / "ledger.jsonl").exists()
        assert verify_run(free).not_private
        assert json.loads((free / "report.json").read_text())["privacy"] == {"enabled": False}


def test_table_is_rebuilt_from_the_folders(finished_sweep, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_sweep, copy)
    before = {name: (copy / name).read_text() for name in ("table.md", "table.csv", "points.csv")}
    for name in OUTPUTS:
        (copy / name).unlink()
    (copy / "sweep.json").unlink()  # the table needs only the run folders
    assert main(["sweep", "--table", str(copy)]) == 0
    after = {name: (copy / name).read_text() for name in ("table.md", "table.csv", "points.csv")}
    assert after == before
    assert (copy / "sweep.png").is_file()
    # a finished run that lost its report is not counted
    (copy / "runs" / "ffa-eps2-seed1" / "report.json").unlink()
    assert main(["sweep", "--table", str(copy)]) == 0
    row = next(r for r in read_csv(copy / "table.csv") if r["epsilon"] == "2.0")
    assert row["runs"] == "1"
    assert main(["sweep", "--table", str(tmp_path / "nothing")]) == 2
    assert "holds no runs/ folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- resuming


def test_a_sweep_interrupted_mid_grid_resumes_without_rerunning_finished_points(base_config, tmp_path, monkeypatch):
    out = tmp_path / "s"
    grid = grid_of(base_config, epsilons=["2", "4", "inf"])
    real = simulation.run_experiment
    calls = []

    def crash_in_second_point(cfg, out_dir, progress=True, overwrite=False, resume=False, **kw):
        calls.append((Path(out_dir).name, resume))
        if len(calls) == 2:  # killed after the first round of the second point
            real(cfg, out_dir, progress=progress, overwrite=overwrite, resume=resume, stop_after=1)
            raise KeyboardInterrupt
        return real(cfg, out_dir, progress=progress, overwrite=overwrite, resume=resume, **kw)

    monkeypatch.setattr(simulation, "run_experiment", crash_in_second_point)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, out, progress=False)
    state = {p["name"]: p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert state == {"ffa-eps2-seed0": "done", "ffa-eps4-seed0": "interrupted", "ffa-epsinf-seed0": "pending"}
    assert not (out / "runs" / "ffa-eps4-seed0" / "report.json").exists()
    assert (out / "runs" / "ffa-eps4-seed0" / "checkpoint" / "state.json").is_file()
    finished = snapshot(out / "runs" / "ffa-eps2-seed0")

    calls.clear()
    monkeypatch.setattr(simulation, "run_experiment", lambda *a, **kw: (calls.append((Path(a[1]).name, kw.get("resume"))), real(*a, **kw))[1])
    result = run_sweep(grid, out, progress=False)
    assert calls == [("ffa-eps4-seed0", True), ("ffa-epsinf-seed0", False)]  # the finished point is not run
    assert result["done"] == 3 and result["failed"] == 0
    assert snapshot(out / "runs" / "ffa-eps2-seed0") == finished  # not a byte or an mtime changed
    resumed = out / "runs" / "ffa-eps4-seed0"
    res = verify_run(resumed)
    assert res.ok, res.problems
    assert res.entries == 4  # 2 clients x 2 rounds: the first round's charges reused, not repeated
    assert sweep.completion(resumed) == (True, "")
    assert len(read_csv(out / "table.csv")) == 3
    assert len(json.loads((out / "sweep.json").read_text())["commands"]) == 2  # both invocations on record


def test_lost_report_is_finished_and_a_broken_checkpoint_restarts_aside(finished_sweep, tmp_path, monkeypatch):
    out = tmp_path / "s"
    shutil.copytree(finished_sweep, out)
    untouched = {name: snapshot(out / "runs" / name) for name in ("ffa-eps2-seed0", "ffa-epsinf-seed0")}
    a = out / "runs" / "ffa-eps2-seed1"  # crashed while writing its report: the rounds are all there
    (a / "report.json").unlink()
    b = out / "runs" / "ffa-epsinf-seed1"  # unfinished, and its checkpoint is gone
    (b / "report.json").unlink()
    shutil.rmtree(b / "checkpoint")
    old_b_metrics = (b / "metrics.jsonl").read_text()
    grid = sweep.resume_grid(out)
    plans = {p.name: sweep.plan_point(out, p)[0] for p in sweep.expand(grid)[0]}
    assert plans == {"ffa-eps2-seed0": "skip", "ffa-eps2-seed1": "resume", "ffa-epsinf-seed0": "skip",
                     "ffa-epsinf-seed1": "restart"}
    real = simulation.run_experiment
    calls = []
    monkeypatch.setattr(simulation, "run_experiment", lambda *a, **kw: (calls.append((Path(a[1]).name, kw.get("resume"))), real(*a, **kw))[1])
    result = run_sweep(grid, out, progress=False)
    assert sorted(calls) == [("ffa-eps2-seed1", True), ("ffa-epsinf-seed1", False)]
    assert result["done"] == 4
    for name, snap in untouched.items():
        assert snapshot(out / "runs" / name) == snap
    assert sweep.completion(a)[0] and sweep.completion(b)[0]
    assert verify_run(a).ok
    discarded = list((out / "discarded").iterdir())  # the broken folder is kept, not deleted
    assert len(discarded) == 1 and discarded[0].name.startswith("ffa-epsinf-seed1-")
    assert (discarded[0] / "metrics.jsonl").read_text() == old_b_metrics


def test_a_changed_config_is_refused_before_anything_runs(finished_sweep, base_config, tmp_path, monkeypatch):
    out = tmp_path / "s"
    shutil.copytree(finished_sweep, out)
    before = snapshot(out)
    monkeypatch.setattr(simulation, "run_experiment", lambda *a, **kw: pytest.fail("nothing may run"))
    with pytest.raises(SweepError, match="another base config"):
        run_sweep(grid_of(base_config, sets=["training.lr=0.1"], seeds=["0", "1"]), out, progress=False)
    # a point folder whose config.toml is another config's is named
    cfg = out / "runs" / "ffa-eps2-seed1" / "config.toml"
    cfg.write_text(cfg.read_text().replace("lr = 0.5", "lr = 0.25"))
    with pytest.raises(SweepError, match="ffa-eps2-seed1: its config.toml is not point ffa-eps2-seed1's config"):
        run_sweep(sweep.resume_grid(out), out, progress=False)
    cfg.write_text(cfg.read_text().replace("lr = 0.25", "lr = 0.5"))
    assert {k: h for k, (h, _) in snapshot(out).items()} == {k: h for k, (h, _) in before.items()}  # nothing written


def test_a_sweep_written_before_a_config_field_existed_still_resumes(finished_sweep, tmp_path, monkeypatch):
    """An older version wrote config.toml without a field this one has (here: model.task, which
    then did not exist) and computed the sweep's identity otherwise: its finished points are
    still skipped, untouched, because the folders hold the same configs read by this version."""
    out = tmp_path / "s"
    shutil.copytree(finished_sweep, out)
    for folder in (out / "runs").iterdir():
        cfg = folder / "config.toml"
        text = cfg.read_text()
        assert 'task = "classification"\n' in text
        cfg.write_text(text.replace('task = "classification"\n', ""))
        report = json.loads((folder / "report.json").read_text())  # as that version wrote it, for that file
        report["run"]["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        (folder / "report.json").write_text(json.dumps(report))
    state = json.loads((out / "sweep.json").read_text())
    state["identity"] = "0" * 64
    (out / "sweep.json").write_text(json.dumps(state))
    before = snapshot(out / "runs")
    monkeypatch.setattr(simulation, "run_experiment", lambda *a, **kw: pytest.fail("nothing may run"))
    grid = sweep.resume_grid(out)
    assert {sweep.plan_point(out, p)[0] for p in sweep.expand(grid)[0]} == {"skip"}
    assert run_sweep(grid, out, progress=False)["done"] == 4
    assert snapshot(out / "runs") == before
    # one folder really of another config is still refused
    cfg = out / "runs" / "ffa-eps2-seed1" / "config.toml"
    cfg.write_text(cfg.read_text().replace("lr = 0.5", "lr = 0.25"))
    with pytest.raises(SweepError, match="another base config|its config.toml is not point"):
        run_sweep(sweep.resume_grid(out), out, progress=False)


def test_a_failing_point_does_not_stop_the_others(base_config, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    real = simulation.run_experiment

    def fail_eps2(cfg, out_dir, **kw):
        if "eps2" in str(out_dir):
            raise RuntimeError("simulated failure in this point")
        return real(cfg, out_dir, **kw)

    monkeypatch.setattr(simulation, "run_experiment", fail_eps2)
    code = main(["sweep", str(base_config), "--epsilons", "2", "inf", "--seeds", "0", "--out", str(out), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 2 points did not finish (first: ffa-eps2-seed0: RuntimeError: simulated failure in this point)" in err
    state = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert state["ffa-eps2-seed0"]["status"] == "failed"
    assert state["ffa-epsinf-seed0"]["status"] == "done"
    rows = read_csv(out / "table.csv")
    assert [(r["epsilon"], r["runs"], r["planned"]) for r in rows] == [("2.0", "0", "1"), ("inf", "1", "1")]


def dying_worker(cfg, folder, action, threads, conn):
    """A worker process that dies without a word for the non-private point (a segfault, an OOM kill)."""
    if "epsinf" in folder:
        os._exit(3)
    sweep._child(cfg, folder, action, threads, conn)


def test_parallel_workers_and_a_worker_that_dies(base_config, tmp_path):
    out = tmp_path / "s"
    grid = grid_of(base_config, workers=2)
    result = run_sweep(grid, out, progress=False, worker=dying_worker)
    state = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert state["ffa-eps2-seed0"]["status"] == "done"
    assert verify_run(out / "runs" / "ffa-eps2-seed0").ok
    assert state["ffa-epsinf-seed0"]["status"] == "failed"
    assert "worker process died (exit code 3)" in state["ffa-epsinf-seed0"]["error"]
    assert result["done"] == 1 and result["failed"] == 1


# --------------------------------------------------------------------------- the grid and its errors


def test_grid_file_gives_the_same_grid_as_the_command_line(base_config, tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(
        f'[sweep]\nconfig = "{base_config}"\nepsilons = [1, 8, inf]\nseeds = [0, 2]\nstrategies = ["ffa", "fedit"]\n'
        'workers = 2\nout = "runs/sw"\n[sweep.set]\nfederation.rounds = 3\nlora.target_modules = ["query"]\n'
    )
    from_file, out = make_grid(grid_file=grid_file)
    from_cli, _ = make_grid(str(base_config), ["1", "8", "inf"], ["0", "2"], ["ffa", "fedit"],
                            ["federation.rounds=3", 'lora.target_modules=["query"]'], 2)
    assert from_file == from_cli
    assert out == str(tmp_path / "runs" / "sw")
    points, _ = sweep.expand(from_file)
    assert [p.name for p in points][:3] == ["ffa-eps1-seed0", "ffa-eps1-seed2", "ffa-eps8-seed0"]
    assert all(p.cfg.federation.rounds == 3 and p.cfg.lora.target_modules == ("query",) for p in points)
    assert [p.cfg.privacy.enabled for p in points if p.strategy == "fedit"] == [True, True, True, True, False, False]
    overridden, _ = make_grid(grid_file=grid_file, epsilons=["4"], sets=["federation.rounds=5"])
    assert overridden.epsilons == (4.0,) and overridden.overrides["federation.rounds"] == 5
    grid_file.write_text("[sweep]\nepsilonz = [1]\n")
    with pytest.raises(ConfigError, match="sweep.epsilonz: unknown key. Allowed keys here: config, epsilons, seeds"):
        make_grid(grid_file=grid_file)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "federation.roundz=3"], "federation.roundz: unknown key. Allowed keys here: strategy, rounds"),
        (["--set", "federation.rounds=three"], "federation.rounds: expected an integer, found 'three'"),
        (["--set", "seed=4"], "--set seed: the sweep sets it for every point; give it with --seeds"),
        (["--set", "privacy.noise_multiplier=1.5"], "privacy.noise_multiplier = 1.5 fixes the noise"),
        (["--epsilons", "abc"], "--epsilons: expected numbers > 0 or inf, found 'abc'"),
        (["--epsilons", "0"], "--epsilons: expected numbers > 0 or inf, found '0'"),
        (["--seeds", "-1"], "--seeds: expected whole numbers >= 0, found -1"),
        (["--strategies", "fedavg"], "--strategies: 'fedavg' is not one of 'fedit', 'ffa'"),
        (["--epsilons", "200"], "sweep point ffa-eps200-seed0: privacy.target_epsilon: must be in (0, 100]"),
    ],
)
def test_bad_grid_input_is_one_line_naming_it(base_config, tmp_path, capsys, extra, message):
    argv = ["sweep", str(base_config), "--epsilons", "1", "--seeds", "0", "--out", str(tmp_path / "s"), "--quiet"]
    # a later --epsilons/--seeds replaces the earlier one (argparse): the bad value is the one used
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("privlora: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_resume_and_table_refuse_grid_options(finished_sweep, capsys):
    assert main(["sweep", "--resume", str(finished_sweep), "--epsilons", "1"]) == 2
    assert "--resume DIR continues DIR's sweep with the grid recorded in its sweep.json; give no --epsilons" in capsys.readouterr().err
    assert main(["sweep", "--table", str(finished_sweep), "--set", "federation.rounds=1"]) == 2
    assert "give no --set" in capsys.readouterr().err
    assert main(["sweep", "--epsilons", "1", "--seeds", "0"]) == 2
    assert "no output folder; give --out DIR" in capsys.readouterr().err


def test_out_that_is_not_a_sweep_folder_is_refused(base_config, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="holds files but no sweep.json"):
        run_sweep(grid_of(base_config), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_epsilon_labels():
    assert sweep.point_name("ffa", 8.0, 0) == "ffa-eps8-seed0"
    assert sweep.point_name("fedit", 0.5, 2) == "fedit-eps0.5-seed2"
    assert sweep.point_name("ffa", math.inf, 1) == "ffa-epsinf-seed1"
    assert sweep.parse_epsilon("inf") == math.inf and sweep.parse_epsilon(4) == 4.0
