"""The node process (`privlora.federation.node_process`, ``privlora node serve``) and the ClientApp
relay to it (`privlora.transports.flower.client_app`): one process per node folder, one message
at a time, a charge that survives SIGKILL, a clean SIGTERM, and a relay that never hangs.

Every node process here is a real subprocess on a Unix socket in a temporary folder, waited for
within a bound, and ended by its own pid (the fixture checks none is left alive)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from accounting import Ledger, SubsampledGaussian
from privlora.federation.messages import Message
from privlora.federation.node_process import _HEAD, OP_MESSAGE, NodeUnreachable, ask, listening, read_frame, write_frame
from tests.test_malicious_server_node import budgeted, flower_message, write_config  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]
START_WAIT = 90.0


@pytest.fixture()
def nodes(tmp_path):
    """start(config, node_dir, **extra) -> (process, socket path); every process is ended by its pid."""
    started: list[subprocess.Popen] = []

    def start(cfg: Path, node_dir: Path, wait: bool = True, **extra) -> tuple[subprocess.Popen, Path]:
        nc = {"config": str(cfg), "client-id": 0, "data": "partition", "node-dir": str(node_dir), "noise": "seeded", **extra}
        path = tmp_path / f"node-{len(started)}.toml"
        path.write_text("".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in nc.items()), encoding="utf-8")
        log = open(tmp_path / f"node-{len(started)}.log", "wb")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
        proc = subprocess.Popen([sys.executable, "-m", "privlora", "node", "serve", "--node-config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        proc.log = tmp_path / f"node-{len(started)}.log"
        started.append(proc)
        sock = Path(extra.get("node-socket", node_dir / "node.sock"))
        end = time.monotonic() + START_WAIT
        while wait and not listening(sock):
            assert proc.poll() is None, proc.log.read_text()
            assert time.monotonic() < end, "the node process did not listen in time"
            time.sleep(0.05)
        return proc, sock

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert all(p.poll() is not None for p in started)


def describe(sock: Path, cfg: Path) -> dict:
    from privlora.core.config import load_config, resolved_sha256

    blob = Message("describe", {"client_id": 0, "config_sha256": resolved_sha256(load_config(cfg)), "labels": None}).to_bytes()
    return Message.from_bytes(ask(sock, blob, 120.0), "client_description").header


def instruction(cfg: Path, mechanism: dict, rnd: int) -> bytes:
    from privlora.core.config import load_config
    from privlora.federation.startup import build_federation

    return build_federation(load_config(cfg)).server.instruction(rnd, 0, SubsampledGaussian.from_dict(mechanism))


def run_ledger(node_dir: Path) -> Ledger:
    (path,) = [p for p in node_dir.glob("*/ledger.jsonl")]
    return Ledger.open(path)


def test_a_second_node_process_on_the_same_folder_refuses_to_start(tmp_path, tiny_model_dir, nodes):
    cfg = write_config(tmp_path, tiny_model_dir)
    first, sock = nodes(cfg, tmp_path / "node0")
    assert (sock.stat().st_mode & 0o777) == 0o600  # only the node's own user connects
    second, _ = nodes(cfg, tmp_path / "node0", wait=False)
    assert second.wait(timeout=START_WAIT) == 2
    out = second.log.read_text()
    assert "already serves node folder" in out and f"pid {first.pid}" in out, out
    assert first.poll() is None and describe(sock, cfg)["client_id"] == 0  # the first still serves
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0 and not sock.exists()
    third, sock = nodes(cfg, tmp_path / "node0")  # the lock went with the process
    assert describe(sock, cfg)["client_id"] == 0


def test_two_messages_pushed_at_once_are_served_one_after_the_other_and_never_pass_the_budget(
        tmp_path, tiny_model_dir, budgeted, nodes):
    budget, one = budgeted  # between the cost of one round and of two (computed independently)
    cfg = write_config(tmp_path, tiny_model_dir, budget=budget)
    node_dir = tmp_path / "node0"
    _, sock = nodes(cfg, node_dir)
    mech = describe(sock, cfg)["mechanism"]
    blobs = {r: instruction(cfg, mech, r) for r in (1, 2)}
    replies: dict[int, Message] = {}
    go = threading.Barrier(2)

    def push(r: int) -> None:
        go.wait()
        replies[r] = Message.from_bytes(ask(sock, blobs[r], 120.0), ("client_update", "refusal"))

    threads = [threading.Thread(target=push, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(m.kind for m in replies.values()) == ["client_update", "refusal"]
    refusal = next(m for m in replies.values() if m.kind == "refusal")
    assert "ledger" in refusal.header["reason"] and "budget" in refusal.header["reason"].lower()
    # served one after the other: received, sent, received, sent
    log = [json.loads(x) for x in (node_dir / "activity.jsonl").read_text().splitlines() if '"round_instruction"' in x
           or '"client_update"' in x or '"refusal"' in x]
    assert [e["direction"] for e in log] == ["received", "sent", "received", "sent"]
    assert [c.round for c in run_ledger(node_dir).charges] == [next(r for r, m in replies.items() if m.kind == "client_update")]
    spent = describe(sock, cfg)["spent"]
    assert spent["lifetime"] == pytest.approx(one, rel=1e-6) and spent["lifetime"] <= budget


def test_a_node_process_killed_after_its_charge_keeps_it_when_restarted(tmp_path, tiny_model_dir, budgeted, nodes):
    from flwr.app import Context, RecordDict

    from privlora.transports.flower import RECORD, client_app

    budget, one = budgeted
    cfg = write_config(tmp_path, tiny_model_dir, budget=budget)
    node_dir = tmp_path / "node0"
    proc, sock = nodes(cfg, node_dir, **{"pause-at": "charged"})
    blob = instruction(cfg, describe(sock, cfg)["mechanism"], 1)
    # the ClientApp relays the instruction; the node process charges, and is killed before it answers
    context = Context(run_id=1, node_id=7, node_config={"node-socket": str(sock), "client-id": 0}, state=RecordDict(),
                      run_config={})
    out = {}
    relay = threading.Thread(target=lambda: out.setdefault("reply", client_app.handle(flower_message({"blob": blob}), context)))
    relay.start()
    end = time.monotonic() + 120
    while not (node_dir / "paused-at-charged").exists():
        assert time.monotonic() < end and proc.poll() is None, proc.log.read_text()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    relay.join(timeout=30)
    reply = Message.from_bytes(bytes(out["reply"].content[RECORD]["blob"]), "refusal")  # a named dropout, not a hang
    assert reply.header["code"] == "node_unreachable" and "stopped before answering" in reply.header["reason"]
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert [c.round for c in run_ledger(node_dir).charges] == [1]  # the charge reached the disk before training

    (node_dir / "paused-at-charged").unlink()
    _, sock = nodes(cfg, node_dir)  # restarted (a stale socket file is replaced: the lock says its owner is dead)
    assert describe(sock, cfg)["spent"]["lifetime"] == pytest.approx(one, rel=1e-6)  # the charge stays spent
    again = Message.from_bytes(ask(sock, blob, 120.0), ("client_update", "refusal"))
    assert again.kind == "client_update"  # round 1 was paid for: it is answered without a second charge
    assert [c.round for c in run_ledger(node_dir).charges] == [1]
    assert Message.from_bytes(ask(sock, instruction(cfg, describe(sock, cfg)["mechanism"], 2), 120.0),
                              ("client_update", "refusal")).kind == "refusal"  # and round 2 would pass the budget


def test_a_relay_with_no_node_process_answers_a_named_refusal_quickly(tmp_path, tiny_model_dir):
    from flwr.app import Context, RecordDict

    from privlora.transports.flower import RECORD, client_app

    cfg = write_config(tmp_path, tiny_model_dir)
    mech = {"clip_norm": 1.0, "delta": 1e-05, "mechanism": "subsampled gaussian", "noise_multiplier": 1.2,
            "sample_rate": 0.5, "sampling": "poisson", "steps": 2}
    context = Context(run_id=1, node_id=7, node_config={"node-socket": str(tmp_path / "none" / "node.sock"), "client-id": 0},
                      state=RecordDict(), run_config={"config": str(cfg)})
    msg = flower_message({"blob": instruction(cfg, mech, 3)})
    t = time.monotonic()
    reply = client_app.handle(msg, context)
    assert time.monotonic() - t < 5.0
    refusal = Message.from_bytes(bytes(reply.content[RECORD]["blob"]), "refusal")
    assert refusal.header["round"] == 3 and refusal.header["client_id"] == 0 and refusal.header["code"] == "node_unreachable"
    assert "no node process listens" in refusal.header["reason"] and "privlora node serve" in refusal.header["reason"]
    # a message without a refusal form (a secure-aggregation stage) is an error reply naming the reason
    secagg = Message("secagg_request", {"client_id": 0, "round": 3, "stage": "share_keys"}).to_bytes()
    with pytest.raises(NodeUnreachable, match="no node process listens"):
        client_app.handle(flower_message({"blob": secagg}), context)
    # the relay's address book answer needs no node; and it takes nothing but where to relay
    assert client_app.handle(flower_message({"whoami": 1}), context).content[RECORD]["client-id"] == 0
    bad = Context(run_id=1, node_id=7, node_config={"node-socket": "x.sock", "node-dir": str(tmp_path)}, state=RecordDict(),
                  run_config={})
    with pytest.raises(Exception, match="takes only"):
        client_app.handle(flower_message({"whoami": 1}), bad)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob("**/ledger.jsonl"))  # the relay wrote nothing


def test_sigterm_during_a_message_finishes_it_and_leaves_a_consistent_ledger(tmp_path, tiny_model_dir, nodes):
    cfg = write_config(tmp_path, tiny_model_dir)
    node_dir = tmp_path / "node0"
    proc, sock = nodes(cfg, node_dir)
    blob = instruction(cfg, describe(sock, cfg)["mechanism"], 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        frame = _HEAD.pack(OP_MESSAGE, len(blob)) + blob
        half = len(frame) // 2
        s.sendall(frame[:half])  # the message is in hand (half read) when SIGTERM arrives
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # it does not drop the message in hand
        s.sendall(frame[half:])
        status, reply = read_frame(s, 120.0)
    assert status == b"O"
    assert proc.wait(timeout=60) == 0 and not sock.exists()
    update = Message.from_bytes(reply, "client_update")
    # consistent: the round is charged once, and the kept release is exactly what was sent
    assert [c.round for c in run_ledger(node_dir).charges] == [1]
    (kept,) = list(node_dir.glob("*/released/round-00001.bin"))
    assert kept.read_bytes() == reply and update.header["round"] == 1
    with pytest.raises(NodeUnreachable, match="no node process listens"):
        ask(sock, blob, 5.0)


def test_an_oversized_or_stalled_frame_is_dropped_and_the_node_serves_on(tmp_path, tiny_model_dir, nodes):
    import grp

    cfg = write_config(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    group = grp.getgrgid(os.getgid()).gr_name  # a deployment names the SuperNode user's group
    _, sock = nodes(cfg, tmp_path / "node0", **{"node-socket": str(tmp_path / "run" / "node.sock"), "socket-group": group})
    assert (sock.stat().st_mode & 0o777) == 0o660 and sock.stat().st_gid == os.getgid()
    assert (tmp_path / "node0").stat().st_mode & 0o777 == 0o700  # the node folder: its user only
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(_HEAD.pack(OP_MESSAGE, (1 << 30) + 1))  # above MAX_FRAME: refused before any read
        s.settimeout(10)
        assert s.recv(1) == b""  # closed without an answer
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        write_frame(s, OP_MESSAGE, b"not a privlora message", 10)
        status, body = read_frame(s, 30)
    assert status == b"E" and b"MessageError" in body
    assert describe(sock, cfg)["client_id"] == 0


def test_the_server_records_an_unreachable_node_as_a_refusal_with_its_reason(tmp_path, tiny_cfg, monkeypatch):
    """The round engine, fed the relay's answer for a node whose process is gone, runs the round
    with the others and writes the reason in metrics.jsonl (the named dropout a Flower run records)."""
    import privlora.transports.inprocess as inprocess
    from privlora.transports.flower import client_app

    real = inprocess.client_nodes

    class Unreachable:
        def __init__(self, node):
            self.node = node

        def handle(self, blob, progress=None):
            try:
                Message.from_bytes(blob, "round_instruction")
            except Exception:  # noqa: BLE001 - describe: the node was up at the start
                return self.node.handle(blob, progress=progress)
            return client_app._unreachable(blob, f"no node process listens on {tmp_path / 'gone.sock'}", {})

    def nodes_with_one_gone(*args, **kwargs):
        nodes = real(*args, **kwargs)
        nodes[1] = Unreachable(nodes[1])
        return nodes

    monkeypatch.setattr(inprocess, "client_nodes", nodes_with_one_gone)
    cfg = tiny_cfg(federation={"rounds": 1, "clients_per_round": 4, "min_clients": 2})
    inprocess.run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["round"] == 1 and "aborted" not in last
    assert last["refused"]["1"].startswith("node process unreachable: no node process listens on")
    assert 1 not in [pc["client"] for pc in last["per_client"]] and len(last["per_client"]) == 3
