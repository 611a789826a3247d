"""privlora on a real Flower deployment: a SuperLink and three SuperNodes on 127.0.0.1, each
SuperNode's ClientApp relaying to its node's long-lived node process (``privlora node serve``).

Each test starts its own `flower-superlink` and `flower-supernode` processes on free loopback
ports (`privlora.transports.flower.local.LocalDeployment`), waits a bounded time for the run, and ends
every process it started by its id (descendants included); the last check of each test is that
none of them is still alive.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("flwr")

from accounting import Ledger  # noqa: E402
from privlora.commands.cli import main  # noqa: E402
from privlora.transports.flower.local import LocalDeployment, _alive, node_configs  # noqa: E402

RUN_TIMEOUT = 900.0
FAULTS = pytest.mark.skipif(
    not os.environ.get("PRIVLORA_FLOWER_FAULTS"),
    reason="kills Flower processes mid-run: about 3-4 minutes each on 2 cores; set PRIVLORA_FLOWER_FAULTS=1 "
           "(the same dropout, abort and resume paths run in process in tests/test_engine.py and test_resume_budget.py)",
)


def write_config(tmp: Path, model_dir: Path, *, secure: bool, rounds: int, registry: Path | None = None, clients: int = 3,
                 **privacy) -> Path:
    path = tmp / ("secure.toml" if secure else "clear.toml")
    reg = f'key_registry = "{registry}"\n' if registry else ""
    priv = "".join(f"{k} = {v}\n" for k, v in {"noise_multiplier": 1.2, **privacy}.items())
    path.write_text(
        f'name = "flower-test"\nseed = 4\nthreads = 1\n[model]\npath = "{model_dir}"\nmax_length = 32\n'
        f'[data]\nmax_examples = {80 * clients}\nnum_clients = {clients}\npartition = "iid"\ntest_fraction = 0.2\n'
        '[lora]\nr = 2\nalpha = 4.0\n'
        f'[federation]\nstrategy = "ffa"\nrounds = {rounds}\nclients_per_round = {clients}\nserver_momentum = 0.0\n'
        '[training]\nlocal_steps = 2\nbatch_size = 24\nphysical_batch_size = 16\n'
        f'[privacy]\n{priv}'
        f'[secagg]\nenabled = {"true" if secure else "false"}\nbits = 64\nvalue_bound = 8.0\nmax_weight = 1000.0\n'
        f'stage_timeout = 60.0\n{reg}',
        encoding="utf-8")
    return path


def run_on_flower(tmp: Path, cfg: Path, out: Path, keys: Path | None = None, during=None, pause_at: dict[int, str] | None = None,
                  clients: int = 3):
    """Run ``cfg`` (of ``clients`` clients) on a fresh local deployment; ``during(dep)`` is polled while the run goes."""
    nodes = node_configs(cfg, clients, tmp / "nodes", noise="seeded", key_dir=keys)
    for i, stage in (pause_at or {}).items():
        nodes[i]["pause-at"] = stage
    with LocalDeployment(nodes, tmp / "flower") as dep:
        started = dep.pids()
        run_id = dep.submit({"config": str(cfg), "out": str(out)})
        status = dep.wait(run_id, RUN_TIMEOUT, on_poll=None if during is None else (lambda: during(dep)))
        logs = dep.logs(run_id)
    time.sleep(0.5)
    assert not [p for p in started if _alive(p)], "a process the test started is still alive"
    return status, logs


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def client_ledger(tmp: Path, k: int) -> Ledger:
    (folder,) = [p for p in (tmp / "nodes" / f"client-{k}").iterdir() if (p / "ledger.jsonl").is_file()]
    return Ledger.open(folder / "ledger.jsonl")


def adapter(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_two_dp_rounds_with_secure_aggregation_and_pinned_keys(tmp_path, tiny_model_dir):
    from privlora.transports.inprocess import run_experiment

    keys = tmp_path / "keys"
    assert main(["keys", "simulation", "--clients", "3", "--out", str(keys)]) == 0
    cfg = write_config(tmp_path, tiny_model_dir, secure=True, rounds=2, registry=keys / "registry.json")
    out = tmp_path / "flower-run"
    status, logs = run_on_flower(tmp_path, cfg, out, keys=keys)
    assert status == "finished:completed", logs[-3000:]

    # the server's folder is a complete run: ledger, report, verify
    assert main(["verify", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["enabled"]
    last = rows(out)[-1]
    assert last["round"] == 2 and last["secagg"]["survivors"] == [0, 1, 2]
    assert rows(out)[0]["transport"] == "flower" and rows(out)[0]["client_sizes"] is None  # sizes never left the nodes

    # every client's own ledger holds exactly what the server charged it, and verify says so
    server = Ledger.open(out / "ledger.jsonl")
    for k in range(3):
        own = client_ledger(tmp_path, k)
        assert [(c.round, c.mechanism) for c in own.charges] == [(c.round, c.mechanism) for c in server.charges if c.client == k]
        assert main(["verify", str(out), "--client-ledger", str(own.path)]) == 0
    assert report["noise_source"] == {"0": "seeded", "1": "seeded", "2": "seeded"} and report["transport"] == "flower"
    for k in range(3):  # every message of a node was served by its one node process (the ClientApps only relayed)
        seen = [json.loads(x) for x in (tmp_path / "nodes" / f"client-{k}" / "activity.jsonl").read_text().splitlines()]
        assert {e["kind"] for e in seen} >= {"describe", "round_instruction", "secagg_request"}
        assert len({e.get("pid") for e in seen}) == 1 and seen[0].get("pid") is not None

    # the same config and seed in one process: the same adapter within the fixed-point quantisation
    inproc = tmp_path / "in-process"
    run_experiment(__import__("privlora.core.config", fromlist=["load_config"]).load_config(cfg), inproc, progress=False)
    a, b = adapter(out), adapter(inproc)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-4, err_msg=k)


def _serverapp_pids(dep) -> list[int]:
    from privlora.transports.flower.local import descendants

    out = []
    for pid in descendants(dep.procs["superlink"].pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"flwr-serverapp" in cmd:
            out.append(pid)
    return out


class _Killed(Exception):
    pass


@FAULTS
def test_in_the_clear_a_killed_server_resumes_to_the_in_process_bits(tmp_path, tiny_model_dir):
    """Two rounds; the ServerApp process is killed (SIGKILL) once round 1 is checkpointed, and
    the run is resumed on the same nodes: adapter, metrics and ledger equal the in-process run's."""
    import signal

    from privlora.core.config import load_config
    from privlora.transports.flower.local import kill_tree
    from privlora.transports.inprocess import run_experiment

    cfg = write_config(tmp_path, tiny_model_dir, secure=False, rounds=2)
    out = tmp_path / "flower-run"
    nodes = node_configs(cfg, 3, tmp_path / "nodes", noise="seeded")
    killed = []

    def kill_after_round_1(dep):
        if not killed and (out / "metrics.jsonl").is_file() and '"round": 1,' in (out / "metrics.jsonl").read_text():
            for pid in _serverapp_pids(dep):
                kill_tree(pid, signal.SIGKILL, grace=2.0)
                killed.append(pid)

    with LocalDeployment(nodes, tmp_path / "flower") as dep:
        started = dep.pids()
        first = dep.submit({"config": str(cfg), "out": str(out)})
        def poll():
            kill_after_round_1(dep)
            if killed:
                raise _Killed

        try:
            dep.wait(first, RUN_TIMEOUT, on_poll=poll)
        except _Killed:
            pass
        assert killed
        dep.stop(first)  # the run whose ServerApp died is ended, as an operator would
        assert dep.wait(first, 120) != "finished:completed"
        assert [r["round"] for r in rows(out)] == [0, 1]
        second = dep.submit({"config": str(cfg), "out": str(out), "resume": True})
        status = dep.wait(second, RUN_TIMEOUT)
        logs = dep.logs(second)
    time.sleep(0.5)
    assert not [p for p in started if _alive(p)], "a process the test started is still alive"
    assert status == "finished:completed", logs[-3000:]

    inproc = tmp_path / "in-process"
    run_experiment(load_config(cfg), inproc, progress=False)
    a, b = adapter(out), adapter(inproc)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    def same(path):
        # the ledger anchors differ by the ledger header's creation time; the charges are compared below
        return [{k: v for k, v in r.items() if k not in ("seconds", "transport", "ledger")} for r in rows(path)]

    assert same(out) == same(inproc)
    assert [(c.client, c.round, c.mechanism) for c in Ledger.open(out / "ledger.jsonl").charges] == \
           [(c.client, c.round, c.mechanism) for c in Ledger.open(inproc / "ledger.jsonl").charges]
    for k in range(3):  # nothing charged twice on the clients' own ledgers either
        assert [c.round for c in client_ledger(tmp_path, k).charges] == [1, 2]
    assert main(["verify", str(out)]) == 0


def _kill_when_paused(tmp: Path, victims: list[int], stage: str, killed: list[int]):
    def poll(dep):
        for i in victims:
            if i not in killed and (tmp / "nodes" / f"client-{i}" / f"paused-at-{stage}").exists():
                dep.kill_node(i)
                killed.append(i)
    return poll


def _stages_seen(tmp: Path, k: int) -> list[str]:
    path = tmp / "nodes" / f"client-{k}" / "activity.jsonl"
    return [json.loads(x)["stage"] for x in path.read_text().splitlines()] if path.is_file() else []


@FAULTS
def test_a_node_killed_after_key_sharing_is_recovered_and_stays_charged(tmp_path, tiny_model_dir):
    # four per round: a sum over the three survivors still holds max(3, t = 3) live inputs (with three
    # per round the same dropout aborts the round: issue 29, attack 3, tests/test_malicious_server.py)
    cfg = write_config(tmp_path, tiny_model_dir, secure=True, rounds=1, clients=4)
    out = tmp_path / "flower-run"
    killed: list[int] = []
    status, logs = run_on_flower(tmp_path, cfg, out, during=_kill_when_paused(tmp_path, [3], "masked_input", killed),
                                 pause_at={3: "masked_input"}, clients=4)
    assert killed == [3]
    assert status == "finished:completed", logs[-3000:]
    last = rows(out)[-1]
    assert last["secagg"]["survivors"] == [0, 1, 2] and last["secagg"]["dropped"] == [3]
    server = Ledger.open(out / "ledger.jsonl")
    assert sorted(c.client for c in server.charges) == [0, 1, 2, 3]  # the killed client's charge stays spent
    assert [c.round for c in client_ledger(tmp_path, 3).charges] == [1]  # on its own ledger too
    assert main(["verify", str(out)]) == 0


@FAULTS
def test_too_many_nodes_killed_abort_the_round_before_any_unmasking_share(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, secure=True, rounds=1)
    out = tmp_path / "flower-run"
    killed: list[int] = []
    status, logs = run_on_flower(tmp_path, cfg, out, during=_kill_when_paused(tmp_path, [1, 2], "masked_input", killed),
                                 pause_at={1: "masked_input", 2: "masked_input"})
    assert sorted(killed) == [1, 2]
    assert status == "finished:completed", logs[-3000:]
    last = rows(out)[-1]
    assert last["aborted"] and "TooFewSurvivors" in last["stopped"] and "--resume" in last["stopped"]
    for k in range(3):  # no node was ever asked for (or sent) an unmasking share
        assert "unmasking" not in _stages_seen(tmp_path, k) and "consistency_check" not in _stages_seen(tmp_path, k)
    assert "masked_input" in _stages_seen(tmp_path, 0)
    assert len(Ledger.open(out / "ledger.jsonl").charges) == 3  # the aborted round stays charged
