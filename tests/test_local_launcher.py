"""`python -m privlora.transports.flower.local`, driven as a user would: every mistake refused in one
line before any Flower process starts, and SIGTERM ending every process the launcher started."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privlora.transports.flower import local
from privlora.transports.flower.local import _alive, descendants

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp: Path, clients: int = 2) -> Path:
    path = tmp / "small.toml"
    path.write_text(f'name = "launcher-test"\nthreads = 1\n[data]\nmax_examples = 200\nnum_clients = {clients}\n'
                    f'partition = "iid"\n[federation]\nstrategy = "ffa"\nrounds = 1\nclients_per_round = {clients}\n'
                    'min_clients = 1\n', encoding="utf-8")
    return path


@pytest.fixture()
def no_processes(monkeypatch):
    """Fail the test if the launcher tries to start any process (a Flower process or Ray)."""
    def refuse(*a, **k):
        raise AssertionError("the launcher started a process before refusing")

    monkeypatch.setattr(local.LocalDeployment, "_start", refuse)
    monkeypatch.setattr(local, "run_simulation_engine", refuse)
    monkeypatch.setattr(local.subprocess, "Popen", refuse)
    before = set(descendants(os.getpid()))
    yield
    assert set(descendants(os.getpid())) <= before


@pytest.mark.parametrize("argv, says", [
    (["{cfg}", "--out", "{out}", "--nodes", "3"],
     "--nodes 3 but data.num_clients = 2: every client is one node and the server waits for all 2; drop --nodes, "
     "or add --set data.num_clients=3"),
    (["{cfg}", "--out", "{out}", "--simulation", "--nodes", "5"], "--nodes 5 but data.num_clients = 2"),
    (["{tmp}/missing.toml", "--out", "{out}"], "config: file '{tmp}/missing.toml' does not exist"),
    (["{cfg}", "--out", "{out}", "--set", "federation.rounds=three"], "federation.rounds: expected an integer"),
    (["{cfg}", "--out", "{out}", "--set", "data.num_clients=1"],
     "federation.clients_per_round: must be in [1, data.num_clients=1], found 2"),
    (["{cfg}", "--out", "{cfg}"], "is a file, not a folder"),
    (["{cfg}"], "--out DIR is required"),
    (["{cfg}", "--out", "{out}", "--keys", "{tmp}"], "missing client-0.key, client-1.key; write them with "
                                                      "`privlora keys simulation --clients 2 --out {tmp}`"),
    (["{cfg}", "--out", "{out}", "--tls", "{tmp}"], "missing ca.crt, server.pem, server.key"),
    (["--resume", "{tmp}/never"], "--resume: {tmp}/never is not a folder"),
])
def test_a_mistake_is_one_line_exit_2_before_any_process(tmp_path, capsys, no_processes, argv, says):
    cfg = small_config(tmp_path)
    fill = {"cfg": cfg, "out": tmp_path / "run", "tmp": tmp_path}
    started = time.monotonic()
    assert local.main([a.format(**fill) for a in argv]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("privlora: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert says.format(**fill) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.toml"]  # no run folder, no -flower folder


def test_a_missing_config_from_the_shell_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "privlora.transports.flower.local", "nope.toml", "--out", "run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "privlora: error: config: file 'nope.toml' does not exist; pass the path of a .toml file\n"
    assert list(tmp_path.iterdir()) == []


def test_noise_is_what_every_simulated_node_uses(tmp_path, monkeypatch):
    """Under --simulation the virtual nodes build their node config from the shared settings
    (client_app._node_config, inside the engine's Ray actors: played here by patching
    under_simulation_engine); --noise reaches it, for either choice."""
    from privlora.transports.flower import client_app
    from privlora.transports.flower.client_app import _node_config

    monkeypatch.setattr(client_app, "under_simulation_engine", lambda: True)

    class Ctx:  # what the simulation engine gives a virtual node: a partition id, no run config
        node_config = {"partition-id": 1, "num-partitions": 2}
        run_config: dict = {}

    cfg = small_config(tmp_path)
    for noise in ("secure", "seeded"):
        nc = _node_config(Ctx(), local.simulation_settings(cfg, tmp_path / "run", noise=noise))
        assert nc["noise"] == noise and nc["client-id"] == 1 and nc["config"] == str(cfg.resolve())
    assert local.build_parser().parse_args(["c.toml", "--simulation"]).noise == "secure"


def _flower_processes_of(tmp: Path) -> list[int]:
    """Every live process whose environment names this test's folder (FLWR_HOME is under it)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if str(tmp).encode() in (p / "environ").read_bytes() and _alive(int(p.name)):
                    found.append(int(p.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("sig, code, says", [
    (signal.SIGTERM, 143, "privlora: stopped by SIGTERM; every process the launcher started has been ended"),
    (signal.SIGINT, 130, "privlora: interrupted; every process the launcher started has been ended"),
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_every_process_the_launcher_started(tmp_path, sig, code, says):
    """SIGTERM (a service manager, `kill`) or SIGINT (Ctrl-C) once the SuperLink and SuperNodes are
    up: the launcher exits with 128 + the signal and no process it started is left."""
    pytest.importorskip("flwr")
    cfg = small_config(tmp_path)
    env = dict(os.environ, PRIVLORA_TEST_MARK=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "privlora.transports.flower.local", str(cfg), "--out",
                             str(tmp_path / "run"), "--noise", "seeded", "--timeout", "120"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    err, deadline = [], time.monotonic() + 120
    try:
        while not any("SuperNodes up" in line for line in err):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            if select.select([proc.stderr], [], [], 1.0)[0]:
                err.append(proc.stderr.readline())
        started = descendants(proc.pid)
        assert len(started) >= 3, started  # the SuperLink and two SuperNodes at least
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = proc.stderr.read()
    assert says in rest
    assert "Traceback" not in rest
    time.sleep(0.5)
    assert [p for p in started if _alive(p)] == []
    assert _flower_processes_of(tmp_path) == []
