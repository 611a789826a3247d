"""What a new user hit (issue 16), driven through the command line as a user would: each failure
ends in one line naming the problem and the fix, a non-zero exit code, no traceback, and no file
already in the output folder changed."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from accounting import Ledger
from privlora.commands.cli import main
from privlora.core.config import config_to_toml


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("privlora: error:")]
    assert len(lines) == 1, err
    return lines[0]


def write_cfg(tmp_path: Path, cfg, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(config_to_toml(cfg))
    return path


def charges(out: Path):
    return [(c.client, c.round, c.mechanism) for c in Ledger.open(out / "ledger.jsonl").charges]


def metrics(out: Path):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "ledger")} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished tiny DP run (4 clients, 3 per round, 2 rounds) made through the CLI."""
    from privlora.core.config import config_from_dict

    cfg = config_from_dict({
        "name": "ue", "seed": 3, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 300, "num_clients": 4, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": "ffa", "rounds": 2, "clients_per_round": 3},
        "training": {"local_steps": 2, "batch_size": 24, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.2},
    })
    root = tmp_path_factory.mktemp("ue")
    path = write_cfg(root, cfg)
    out = root / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return cfg, path, out


def copy_run(finished, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(finished[2], dst)
    return dst


# ---------------------------------------------------------------- 2. tracebacks instead of messages

def test_out_pointing_at_a_file_is_refused_and_the_file_kept(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg())
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert main(["run", str(path), "--out", str(target), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out: {target} is a file, not a folder" in line
    assert target.read_text() == "mine\n"


def test_out_that_cannot_be_created_is_refused_before_anything_is_written(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg())
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    before = snapshot(tmp_path)
    assert main(["run", str(path), "--out", str(blocker / "sub" / "run"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot create {blocker / 'sub' / 'run'}: {blocker} is a file, not a folder" in line
    assert snapshot(tmp_path) == before


def test_a_full_disk_during_a_checkpoint_loses_nothing_and_resume_finishes(finished, tmp_path, capsys, monkeypatch):
    import privlora.core.checkpoint as ckpt

    cfg, path, whole = finished
    real = ckpt._fsync_write

    def disk_full_at_round_2(p, data):
        if Path(p).name == "state-r0002.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(p, data)

    out = tmp_path / "full"
    monkeypatch.setattr(ckpt, "_fsync_write", disk_full_at_round_2)
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on the device" in line and f"privlora run --resume {out}" in line
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 1  # the last complete checkpoint is still there
    monkeypatch.setattr(ckpt, "_fsync_write", real)  # space freed
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert charges(out) == charges(whole)  # nothing lost, nothing charged twice
    assert metrics(out) == metrics(whole)
    assert main(["verify", str(out)]) == 0


def test_report_on_missing_or_torn_metrics_says_how_to_recover(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    before = snapshot(run)
    assert main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"metrics.jsonl line {len(lines)} is not valid JSON" in line and f"privlora run --resume {run}" in line
    assert snapshot(run) == before
    (run / "metrics.jsonl").unlink()
    before = snapshot(run)
    assert main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "metrics.jsonl is missing" in line and "restore it from a backup" in line
    assert snapshot(run) == before


def test_resume_after_metrics_were_deleted_changes_nothing_and_says_so(tiny_cfg, tmp_path, capsys):
    from privlora.transports.inprocess import run_experiment

    out = tmp_path / "run"
    run_experiment(tiny_cfg(), out, progress=False, stop_after=1)
    (out / "metrics.jsonl").unlink()
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "metrics.jsonl is missing" in line and "restore metrics.jsonl from a backup" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------- 3. a failed start blocks its folder

def test_a_failed_start_leaves_nothing_and_the_same_command_works_once_fixed(tmp_path, capsys, tiny_cfg):
    bad = tiny_cfg(data={"source": str(tmp_path / "missing.csv")})
    path = write_cfg(tmp_path, bad)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "data.source" in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # no config.toml left behind to block the folder
    write_cfg(tmp_path, tiny_cfg(federation={"rounds": 1}))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_a_folder_left_by_a_start_that_never_finished_round_0_is_reused(tmp_path, capsys, tiny_cfg):
    cfg = tiny_cfg(federation={"rounds": 1})
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text(config_to_toml(cfg))  # what an older privlora left behind
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    command = f"privlora run {out / 'config.toml'} --out {out}"
    assert "never finished round 0 (nothing was trained or charged)" in line and line.endswith(f"`{command}`")
    assert snapshot(out) == before
    assert main(command.split()[1:] + ["--quiet"]) == 0  # the command the message gave
    assert [r["round"] for r in metrics(out)] == [0, 1]


def test_a_run_with_a_finished_round_is_still_never_overwritten(finished, capsys):
    cfg, path, out = finished
    before = snapshot(out)
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


# ---------------------------------------------------------------- 4. a budget below one round's cost

def test_a_budget_below_one_rounds_cost_is_refused_before_anything_is_written(tmp_path, capsys, tiny_cfg):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    cfg = tiny_cfg(privacy={"noise_multiplier": 1.0, "budget_epsilon": 1.0})
    path = write_cfg(tmp_path, cfg)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    # 300 training examples over 4 iid clients: 75 each, q = 1 / ceil(75 / 32) = 1/3, 2 local steps
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(1 / 3, dp_accounting.GaussianDpEvent(1.0)), 2)
    one_round = acc.get_epsilon(1e-5)
    assert line.startswith("privlora: error: privacy.budget_epsilon = 1 but one round costs epsilon ")
    cost = float(line.split("costs epsilon ")[1].split()[0])
    assert cost == pytest.approx(one_round, abs=0.01)
    assert "sigma 1, q 0.3333, 2 steps" in line and "3 other clients cannot train either" in line
    assert "raise the budget, lower training.local_steps, or raise privacy.noise_multiplier" in line
    assert "of at most 0" not in line
    assert not out.exists()
    assert "loading the model" not in capsys.readouterr().err  # refused before the model was loaded


def test_a_calibrated_run_whose_budget_is_below_one_round_names_the_target(tmp_path, capsys, tiny_cfg, monkeypatch):
    import privlora.tasks

    loaded = []
    monkeypatch.setattr(privlora.tasks, "load_model", lambda *a, **k: loaded.append(a))
    cfg = tiny_cfg(privacy={"noise_multiplier": 0.0, "target_epsilon": 8.0, "budget_epsilon": 0.5})
    path = write_cfg(tmp_path, cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "privacy.budget_epsilon = 0.5 but one round costs epsilon" in line
    assert "calibrated for privacy.target_epsilon = 8 over 2 rounds" in line and "lower privacy.target_epsilon" in line
    assert "privlora: calibrating noise for 4 clients (pld)" in captured.err
    assert loaded == [] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 5. data errors in the user's words

@pytest.mark.parametrize("content, expected", [
    (b"", "is empty; give a file with a header line (text,label)"),
    (b"text,label\ncaf\xe9 cr\xe8me,1\nbad,0\n", "is not UTF-8 text (byte 0xe9 at line 2"),
    (b"text,label\n", "has a header line but no rows"),
])
def test_data_errors_name_the_problem_in_the_users_words(tmp_path, capsys, tiny_cfg, content, expected):
    data = tmp_path / "reviews.csv"
    data.write_bytes(content)
    path = write_cfg(tmp_path, tiny_cfg(data={"source": str(data)}))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data.source: {data} {expected}" in line
    assert "An error occurred while generating" not in line and "corresponds to no data" not in line
    assert not out.exists()


# ---------------------------------------------------------------- 6. smaller things

def test_verify_on_a_non_private_run_says_there_is_nothing_to_verify(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg(privacy={"enabled": False}, federation={"rounds": 1}))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("NOTHING TO VERIFY:") and "privacy.enabled = false" in printed and "FAIL" not in printed


def test_verify_still_fails_a_private_run_whose_ledger_is_gone(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "ledger.jsonl").unlink()
    assert main(["verify", str(run)]) == 1
    assert "the ledger was deleted or moved" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["report", "verify"])
def test_report_or_verify_on_a_missing_folder_names_the_folder(tmp_path, capsys, command):
    missing = tmp_path / "nope"
    assert main([command, str(missing)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{command}: {missing} does not exist; give the --out folder of a privlora run" in line
    assert ".toml file" not in line


def test_a_damaged_checkpoint_names_the_damage_and_the_next_step(tiny_cfg, tmp_path, capsys):
    from privlora.transports.inprocess import run_experiment

    out = tmp_path / "run"
    run_experiment(tiny_cfg(), out, progress=False, stop_after=1)
    tensors = next((out / "checkpoint").glob("state-r*.safetensors"))
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not match the hash" in line
    assert f"restore {out / 'checkpoint'} from a backup" in line and "--out NEW_DIR" in line
    assert "spends the clients' privacy budgets again" in line
    assert snapshot(out) == before


def test_ctrl_c_names_the_real_folder(tmp_path, capsys, tiny_cfg, monkeypatch):
    from privlora.federation.client import Client

    path = write_cfg(tmp_path, tiny_cfg())
    out = tmp_path / "run"

    def interrupted(self, instruction, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "handle", interrupted)
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"privlora run --resume {out}" in err and " DIR" not in err


def test_stages_before_round_1_show_on_stderr_unless_quiet(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg(federation={"rounds": 1}))
    assert main(["run", str(path), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    stages = ["loading data", "checking budgets for 4 clients", "loading the model", "tokenizing 400 examples",
              "evaluating the untrained model on 100 held-out examples"]
    positions = [err.find(f"privlora: {s}") for s in stages]
    assert all(p >= 0 for p in positions), err
    assert positions == sorted(positions)
    assert main(["run", str(path), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert not any(s in capsys.readouterr().err for s in stages)


def test_calibration_is_a_stage(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg(federation={"rounds": 1}, privacy={"noise_multiplier": 0.0, "target_epsilon": 8.0}))
    assert main(["run", str(path), "--out", str(tmp_path / "a")]) == 0
    assert "privlora: calibrating noise for 4 clients (pld)" in capsys.readouterr().err


def legend_and_ticks(monkeypatch):
    """Capture every figure privlora saves: its axes' legend labels and x tick positions."""
    import matplotlib.figure

    seen = {}
    real = matplotlib.figure.Figure.savefig

    def capture(self, fname, *a, **k):
        self.canvas.draw()
        seen[Path(fname).name] = [
            ([t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [], list(ax.get_xticks()))
            for ax in self.axes
        ]
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    return seen


def test_the_epsilon_plot_shows_every_client_and_rounds_on_whole_numbers(tmp_path, capsys, tiny_cfg, monkeypatch):
    # 4 clients, 3 sampled in the one round: one client never trains
    path = write_cfg(tmp_path, tiny_cfg(federation={"rounds": 1}))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    trained = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["clients"]
    (idle,) = set(range(4)) - set(trained)
    seen = legend_and_ticks(monkeypatch)
    assert main(["report", str(out)]) == 0
    legend, ticks = seen["privacy_epsilon.png"][0]
    assert f"client {idle} (never trained)" in legend
    # every trained client is named: alone, or with the clients whose ε curve is the same (drawn once)
    named = {int(x) for entry in legend if entry.startswith("client") and "never" not in entry
             for x in entry.split(" (")[0].replace("clients ", "").replace("client ", "").split(", ")}
    assert named == set(trained)
    assert f"never trained, so at ε = 0: client {idle}" in (out / "report.md").read_text()
    round_axes = [seen["privacy_epsilon.png"][0], *seen["accuracy_epsilon.png"]]  # the bar chart's axis is clients
    for _, ticks in round_axes:
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_flora_and_hetlora_default_to_the_papers_aggregate_and_say_so(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg(federation={"strategy": "flora", "rounds": 1}, privacy={"enabled": False}))
    out = tmp_path / "flora"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert "server_momentum = 0.0" in (out / "config.toml").read_text()
    assert "no server momentum: each round's global update is FLoRA's own aggregate" in (out / "report.md").read_text()
    assert "warning: federation.server_momentum" not in capsys.readouterr().err
    path = write_cfg(tmp_path, tiny_cfg(federation={"strategy": "hetlora", "rounds": 1, "server_momentum": 0.7},
                                        privacy={"enabled": False}), "h.toml")
    out = tmp_path / "hetlora"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert "federation.server_momentum = 0.7 (server_lr 1) is applied after HetLoRA" in capsys.readouterr().err
    assert "**not** the HetLoRA paper's aggregate" in (out / "report.md").read_text()


def test_the_default_strategies_keep_server_momentum(tiny_cfg):
    from privlora.core.config import ExperimentConfig

    assert ExperimentConfig().federation.server_momentum == 0.7  # the measured default run (FFA-LoRA)
    assert tiny_cfg(federation={"strategy": "fedit"}).federation.server_momentum == 0.7
    assert tiny_cfg(federation={"strategy": "hetlora"}).federation.server_momentum == 0.0


def test_debug_shows_the_traceback_a_plain_run_hides(tmp_path, capsys, tiny_cfg):
    path = write_cfg(tmp_path, tiny_cfg())
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    from privlora.core.errors import OutputDirError

    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        main(["run", str(path), "--out", str(target), "--quiet", "--debug"])
    assert target.read_text() == "mine\n"


def test_an_unexpected_error_is_one_line_that_says_it_is_a_bug(tmp_path, capsys, tiny_cfg, monkeypatch):
    import privlora.federation.server

    def broken(self):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(privlora.federation.server.Server, "evaluate", broken)
    path = write_cfg(tmp_path, tiny_cfg())
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "privlora: internal error: RuntimeError: evaluation exploded; this is a bug in privlora" in err and "--debug" in err


def test_a_spinner_on_a_terminal_ends_in_a_line_with_the_time_taken():
    import io
    import time as _time

    from privlora.core.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with Progress(True, stream, interval=0.01).stage("calibrating noise", total=3) as st:
        for _ in range(3):
            _time.sleep(0.03)
            st.advance()
    text = stream.getvalue()
    assert "calibrating noise 3/3" in text or "calibrating noise 2/3" in text  # the spinner drew a count
    assert text.rstrip("\n").endswith("\033[K") and "\rcalibrating noise: done in 0." in text
    quiet = Tty()
    with Progress(False, quiet).stage("loading"):
        pass
    assert quiet.getvalue() == ""


def test_a_ledger_cut_behind_the_checkpoints_back_says_to_restore_the_ledger(tiny_cfg, tmp_path, capsys):
    from privlora.transports.inprocess import run_experiment

    out = tmp_path / "run"
    run_experiment(tiny_cfg(), out, progress=False, stop_after=1)
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(lines[:-1]))
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "was altered" in line and f"restore {out / 'ledger.jsonl'} from a backup" in line
    assert f"privlora verify {out}" in line
    assert snapshot(out) == before


def test_a_run_folder_or_a_non_utf8_file_given_as_config_is_named(finished, tmp_path, capsys):
    cfg, path, out = finished
    assert main(["run", str(out), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"config: {out} is a folder; pass the path of a .toml file (the run's config is {out / 'config.toml'})" in line
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "is not UTF-8 text" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_report_on_a_private_run_without_its_ledger_writes_nothing(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "ledger.jsonl").unlink()
    before = snapshot(run)
    assert main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "ledger.jsonl is missing but the run's config enables privacy" in line and "restore it from a backup" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("lora, expected", [
    ({"target_modules": ["qkv"]}, "lora.target_modules: ['qkv'] did not match any module of the model; use names from"),
    ({"layers": [7]}, "lora.layers: layer 7 does not exist; the model has 2 layers (0 to 1)"),
])
def test_lora_settings_the_model_does_not_have_are_named_before_anything_is_written(tmp_path, capsys, tiny_cfg, lora, expected):
    path = write_cfg(tmp_path, tiny_cfg(lora=lora))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ---------------------------------------------------------------- one error family

INTERNAL = {"RoundAborted", "Terminated"}  # the engine's own signal between its steps, and SIGTERM as an exception (a KeyboardInterrupt): never shown as a user error


def _privlora_exception_classes():
    import importlib
    import inspect
    import pkgutil

    import privlora

    found = {}
    for mod in pkgutil.walk_packages(privlora.__path__, "privlora."):
        if mod.name.endswith("__main__") or ".flower." in mod.name or mod.name.endswith(".flower"):
            continue  # needs flwr; its modules define no error class (checked by the grep below)
        m = importlib.import_module(mod.name)
        for name, obj in inspect.getmembers(m, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == m.__name__:
                found[f"{m.__name__}.{name}"] = obj
    return found


def test_every_error_privlora_defines_is_a_user_error_except_the_engines_internal_signal():
    from privlora.core.errors import UserError

    classes = _privlora_exception_classes()
    assert len(classes) >= 10  # ConfigError, DataError, ModelError, CausalTaskError, ... were found
    outside = sorted(k for k, cls in classes.items() if not issubclass(cls, UserError) and k.rsplit(".", 1)[1] not in INTERNAL)
    assert outside == []
    flower = ROOT_DIR / "privlora" / "transports" / "flower"
    assert not [p.name for p in flower.glob("*.py") if re.search(r"^class \w*(Error|Exception)\b", p.read_text(), re.M)]


ROOT_DIR = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("error", ["CausalTaskError", "LedgerFileError", "AuditError", "MessageError"])
def test_a_user_error_from_deep_inside_is_one_line_and_exit_2(error, monkeypatch, capsys, tmp_path):
    """The CLI catches the family's base class alone: an error raised deep inside a task (e.g.
    model.max_length too small for the chat template) reaches the user as one line, not as an
    "internal error ... a bug in privlora"."""
    import privlora.commands.cli as cli

    classes = {k.rsplit(".", 1)[1]: v for k, v in _privlora_exception_classes().items()}

    def boom(args):
        raise classes[error]("model.max_length: 8 tokens cannot hold the prompt; raise model.max_length")

    monkeypatch.setattr(cli, "_cmd_run", boom)
    assert main(["run", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["privlora: error: model.max_length: 8 tokens cannot hold the prompt; raise model.max_length"]


def test_the_prv_accountant_needs_no_import_for_its_side_effect():
    """accounting finds privlora's "prv" accountant through its entry point, in a process that
    imported nothing from privlora first."""
    import subprocess
    import sys

    code = ("import sys, accounting; acc = accounting.get_accountant('prv'); "
            "print(type(acc).__module__, acc.error, 'privlora.core.accountants' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ["privlora.core.accountants", "0.01", "True"]
