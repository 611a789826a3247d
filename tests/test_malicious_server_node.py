"""A deployment node against a server (or a mishap) that would reset its budget, make its run config
the node's config, hold every client's private key, run code from sealed state, or lose a kept
release on power loss (issue 29, attacks 5, 6, 7, 8, 10). Every test drives the node through its
public message handling (`ClientNode.handle`, the Flower ClientApp's `handle`) or the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from accounting import Ledger
from privlora.commands.cli import main
from privlora.federation.messages import Message

BUDGET_ROUNDS = 1.5  # a budget halfway between what one and two rounds of the node's release cost


def write_config(tmp: Path, model_dir: Path, name: str = "mal", registry: Path | None = None, secure: bool = False,
                 budget: float | None = None) -> Path:
    path = tmp / f"{name}.toml"
    reg = f'key_registry = "{registry}"\n' if registry else ""
    bud = f"budget_epsilon = {budget}\n" if budget is not None else ""
    path.write_text(
        f'name = "{name}"\nseed = 4\nthreads = 1\n[model]\npath = "{model_dir}"\nmax_length = 32\n'
        '[data]\nmax_examples = 240\nnum_clients = 3\npartition = "iid"\ntest_fraction = 0.2\n'
        '[lora]\nr = 2\nalpha = 4.0\n'
        '[federation]\nstrategy = "ffa"\nrounds = 3\nclients_per_round = 3\nserver_momentum = 0.0\n'
        '[training]\nlocal_steps = 2\nbatch_size = 24\nphysical_batch_size = 16\n'
        f'[privacy]\nnoise_multiplier = 1.2\n{bud}'
        f'[secagg]\nenabled = {"true" if secure else "false"}\nbits = 64\nvalue_bound = 8.0\nmax_weight = 1000.0\n{reg}',
        encoding="utf-8")
    return path


def node_for(cfg_path: Path, node_dir: Path, client: int = 0, signing_key: Path | None = None):
    """The node a deployment runs (a fresh process: built anew from its node config)."""
    from privlora.federation.deploy import build_client_node, node_settings

    nc = {"config": str(cfg_path), "client-id": client, "data": "partition", "node-dir": str(node_dir), "noise": "seeded"}
    if signing_key is not None:
        nc["signing-key"] = str(signing_key)
    return build_client_node(node_settings(nc))


def describe(node) -> dict:
    from privlora.core.config import resolved_sha256

    blob = Message("describe", {"client_id": node.client_id, "config_sha256": resolved_sha256(node.cfg), "labels": None}).to_bytes()
    return Message.from_bytes(node.handle(blob), "client_description").header


def instruction(node, rnd: int) -> bytes:
    """What a server sends: the node's own planned mechanism (so only the node's ledger can refuse)."""
    from accounting import SubsampledGaussian
    from privlora.federation.startup import build_federation

    mech = SubsampledGaussian.from_dict(describe(node)["mechanism"])
    fed = _FED.get(id(node.cfg)) or _FED.setdefault(id(node.cfg), build_federation(node.cfg))
    return fed.server.instruction(rnd, node.client_id, mech)


_FED: dict = {}


def flower_message(record: dict):
    """A message as the SuperLink delivers it to a node's ClientApp."""
    import time

    from flwr.app import ConfigRecord, Message as FlwrMessage, Metadata, RecordDict

    from privlora.transports.flower import RECORD

    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=60.0, message_type="query.privlora")
    return FlwrMessage(RecordDict({RECORD: ConfigRecord(record)}), metadata=meta)


def train(node, rnd: int) -> Message:
    return Message.from_bytes(node.handle(instruction(node, rnd)), ("client_update", "refusal"))


def per_round_costs(cfg_path: Path) -> tuple[float, float]:
    """Epsilon of one and of two rounds of client 0's release (computed here, by the PLD accountant)."""
    from privlora.core.accountants import get_accountant
    from privlora.core.config import load_config
    from privlora.federation.client import planned_mechanism
    from privlora.federation.deploy import NodeSettings, node_training_data

    cfg = load_config(cfg_path)
    n = len(node_training_data(cfg, NodeSettings(config=cfg_path, client_id=0)))
    m = planned_mechanism(cfg, n)
    acc = get_accountant("pld")
    return acc.epsilon([m], cfg.privacy.delta), acc.epsilon([m, m], cfg.privacy.delta)


@pytest.fixture()
def budgeted(tmp_path, tiny_model_dir):
    """A config whose budget lies between the cost of one round and of two (by an independent computation)."""
    probe = write_config(tmp_path, tiny_model_dir, name="probe", budget=100.0)
    one, two = per_round_costs(probe)
    return (one + two) / 2, one


# ---------------------------------------------------------------- attack 5: the budget belongs to the data


def test_a_deleted_ledger_is_detected_and_the_node_refuses_until_a_recorded_reset(tmp_path, tiny_model_dir, budgeted, capsys):
    budget, one = budgeted
    cfg = write_config(tmp_path, tiny_model_dir, budget=budget)
    node_dir = tmp_path / "node0"
    assert train(node_for(cfg, node_dir), 1).kind == "client_update"
    # every ledger file the node keeps is deleted (its head mirrors and released update stay)
    deleted = [p for p in node_dir.rglob("*.jsonl") if p.name != "activity.jsonl"]
    assert deleted
    for p in deleted:
        p.unlink()
    reply = train(node_for(cfg, node_dir), 2)  # a new process, as a Flower node is
    assert reply.kind == "refusal" and "not intact" in reply.header["reason"] and "reset-ledger" in reply.header["reason"]
    capsys.readouterr()
    assert main(["node", "status", "--node-dir", str(node_dir)]) == 1
    assert "NOT INTACT" in capsys.readouterr().out
    # the operator's explicit, recorded reset: the node knows its released round-1 update was charged
    assert main(["node", "reset-ledger", "--node-dir", str(node_dir), "--reason", "disk restored from backup"]) == 0
    record = json.loads((node_dir / "resets.jsonl").read_text().splitlines()[-1])
    assert record["reason"] == "disk restored from backup" and record["problems"]
    capsys.readouterr()
    assert main(["node", "status", "--node-dir", str(node_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["intact"] and [d["reset"]["reason"] for d in status["data"].values()] == ["disk restored from backup"]
    assert sorted(record["kept"]) == sorted(p.name for p in node_dir.glob("lifetime/*.reset-*"))
    node = node_for(cfg, node_dir)
    spent = describe(node)["spent"]
    assert spent["lifetime"] == pytest.approx(one, rel=1e-6)  # round 1 still counts after the reset
    assert train(node, 2).kind == "refusal"  # and a second round would exceed the budget


def test_a_truncated_ledger_is_detected_from_its_head_mirrors(tmp_path, tiny_model_dir, budgeted):
    budget, _ = budgeted
    cfg = write_config(tmp_path, tiny_model_dir, budget=budget)
    node_dir = tmp_path / "node0"
    assert train(node_for(cfg, node_dir), 1).kind == "client_update"
    # cut the charge lines off the end of every ledger (the hash chains of what is left still verify)
    for p in node_dir.rglob("*.jsonl"):
        if p.name != "activity.jsonl":
            lines = p.read_text().splitlines(keepends=True)
            p.write_text(lines[0])
    assert Ledger.open(next(node_dir.glob("mal-*/ledger.jsonl"))).charges == []
    reply = train(node_for(cfg, node_dir), 2)
    assert reply.kind == "refusal" and "not intact" in reply.header["reason"]
    assert "head mirror" in reply.header["reason"]
    # the operator's reset carries what is still known: the node's released round-1 update names its release
    assert main(["node", "reset-ledger", "--node-dir", str(node_dir), "--reason", "ledger truncated"]) == 0
    node = node_for(cfg, node_dir)
    reply = train(node, 2)
    assert reply.kind == "refusal" and f"over its budget {budget:g}" in reply.header["reason"]  # one round spent; two exceed it
    assert [c.round for c in Ledger.open(next(node_dir.glob("mal-*/ledger.jsonl"))).charges] == [1]


def test_a_new_config_on_the_same_data_does_not_get_a_fresh_budget(tmp_path, tiny_model_dir, budgeted, capsys):
    budget, one = budgeted
    node_dir = tmp_path / "node0"
    first = write_config(tmp_path, tiny_model_dir, name="first", budget=budget)
    node = node_for(first, node_dir)
    assert train(node, 1).kind == "client_update"
    # the server starts another run on the same data: another name (so another config hash), same records
    second = write_config(tmp_path, tiny_model_dir, name="second", budget=budget)
    node = node_for(second, node_dir)
    reply = train(node, 1)
    assert reply.kind == "refusal" and "lifetime ledger" in reply.header["reason"] and f"{budget:g}" in reply.header["reason"]
    spent = describe(node)["spent"]  # what the run reports from the node: this run's spend and the lifetime's
    assert spent["run"] == 0.0 and spent["lifetime"] == pytest.approx(one, rel=1e-6)
    capsys.readouterr()
    assert main(["node", "status", "--node-dir", str(node_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["intact"] and [d["charges"] for d in status["data"].values()] == [1]
    assert sorted(status["runs"]) == sorted(p.name for p in node_dir.iterdir() if (p / "ledger.jsonl").is_file())
    # an intact ledger is never reset
    assert main(["node", "reset-ledger", "--node-dir", str(node_dir), "--reason", "start over"]) == 2
    assert "nothing to reset" in capsys.readouterr().err and not (node_dir / "resets.jsonl").exists()


# ---------------------------------------------------------------- attack 6: the node config is the node's own


def test_a_supernode_without_config_refuses_the_servers_run_config(tmp_path, tiny_model_dir, monkeypatch):
    from flwr.app import Context, RecordDict

    from privlora.core.config import ConfigError
    from privlora.transports.flower import RECORD, client_app

    cfg = write_config(tmp_path, tiny_model_dir)
    # the server's run config names a config, node folder, key folder and the seeded noise source
    run_config = {"config": str(cfg), "node-root": str(tmp_path / "server-chosen"), "noise": "seeded",
                  "key-dir": str(tmp_path / "server-keys")}
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config=run_config)
    msg = flower_message({"whoami": 1})
    with pytest.raises(ConfigError, match="'config' is missing.*never takes its config"):
        client_app.handle(msg, context)
    assert not (tmp_path / "server-chosen").exists()
    # a virtual node of Flower's simulation engine (a Ray actor there) still builds its config from the run config
    monkeypatch.setattr(client_app, "under_simulation_engine", lambda: True)
    reply = client_app.handle(msg, context)
    assert reply.content[RECORD]["client-id"] == 0
    # but not when the node config holds anything a simulation engine's virtual node does not have
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3, "data": "partition"},
                      state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match="'config' is missing"):
        client_app.handle(msg, context)


# ---------------------------------------------------------------- attack 7: each node makes its own key


def test_each_node_makes_its_own_key_and_refuses_a_registry_without_it(tmp_path, tiny_model_dir, capsys):
    from privlora.core.config import ConfigError

    for k in range(3):
        assert main(["keys", "node", "--out", str(tmp_path / f"node{k}"), "--client-id", str(k)]) == 0
        assert oct((tmp_path / f"node{k}" / "node.key").stat().st_mode & 0o777) == "0o600"
    pubs = [str(tmp_path / f"node{k}" / "node.pub") for k in range(3)]
    assert main(["keys", "registry", "--out", str(tmp_path / "registry.json"), *pubs]) == 0
    text = (tmp_path / "registry.json").read_text()
    assert "PRIVATE" not in text and sorted(json.loads(text)["keys"]) == ["0", "1", "2"]
    # a private key is never accepted as a registry input
    assert main(["keys", "registry", "--out", str(tmp_path / "bad.json"), str(tmp_path / "node0" / "node.key")]) == 2
    assert "PRIVATE key" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    # a registry the server built without node 0's key (its own key in node 0's place)
    assert main(["keys", "node", "--out", str(tmp_path / "server"), "--client-id", "0"]) == 0
    assert main(["keys", "registry", "--out", str(tmp_path / "forged.json"), str(tmp_path / "server" / "node.pub"),
                 *pubs[1:]]) == 0
    forged = write_config(tmp_path, tiny_model_dir, name="forged", registry=tmp_path / "forged.json", secure=True)
    with pytest.raises(ConfigError, match="refuses a registry without its own public key"):
        node_for(forged, tmp_path / "n0", 0, tmp_path / "node0" / "node.key")
    good = write_config(tmp_path, tiny_model_dir, name="good", registry=tmp_path / "registry.json", secure=True)
    assert node_for(good, tmp_path / "n0", 0, tmp_path / "node0" / "node.key").signing_key is not None


# ---------------------------------------------------------------- attack 8: sealed state runs nothing


def test_a_validly_sealed_blob_naming_a_callable_in_an_allowed_module_runs_nothing(tmp_path, tiny_model_dir):
    import hashlib
    import hmac
    import pickle

    from flwr.app import ConfigRecord, Context, RecordDict

    from privlora.federation.messages import MessageError
    from privlora.transports.flower import client_app
    from privlora.transports.flower.state import node_key

    import secagg.encoding

    assert secagg.encoding.os.system is os.system  # a module the old allow-list accepted reaches os.system
    cfg = write_config(tmp_path, tiny_model_dir)
    node_dir = tmp_path / "node0"
    marker = tmp_path / "pwned"
    key = node_key(node_dir)  # a stolen key: the blob is validly sealed
    for module, name in (("secagg.encoding", "os.system"), ("secagg.encoding", "EncodingSpec.__init__.__globals__")):
        body = (pickle.PROTO + bytes([4]) + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
                + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL
                + pickle.SHORT_BINUNICODE + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode()
                + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
        blob = hmac.new(key, body, hashlib.sha256).digest() + body
        state = RecordDict({client_app.STATE: ConfigRecord({"blob": blob})})
        context = Context(run_id=1, node_id=7, node_config={"config": str(cfg), "client-id": 0, "node-dir": str(node_dir),
                                                            "noise": "seeded"}, state=state, run_config={})
        describe_blob = Message("describe", {"client_id": 0, "config_sha256": None, "labels": None}).to_bytes()
        msg = flower_message({"blob": describe_blob})
        with pytest.raises(MessageError, match="never holds"):
            client_app.handle(msg, context)
        assert not marker.exists()


def test_two_processes_creating_the_sealing_key_at_once_both_read_the_whole_key(tmp_path, monkeypatch):
    import threading
    import time

    from privlora.transports.flower import state

    real = os.urandom
    slow = threading.Event()

    def urandom(n):  # the first creator stalls between creating its file and writing its key
        if threading.current_thread().name == "first" and not slow.is_set():
            slow.set()
            time.sleep(0.5)
        return real(n)

    monkeypatch.setattr(os, "urandom", urandom)
    got: dict[str, object] = {}

    def create(name):
        try:
            got[name] = state.node_key(tmp_path)
        except Exception as exc:  # noqa: BLE001
            got[name] = exc

    first = threading.Thread(target=create, args=("first",), name="first")
    first.start()
    slow.wait(5)
    time.sleep(0.1)
    create("second")
    first.join()
    assert isinstance(got["first"], bytes) and got["first"] == got["second"] and len(got["first"]) == 32
    assert (tmp_path / "state.key").read_bytes() == got["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.key"]  # no temporary file is left


# ---------------------------------------------------------------- attack 10: renames survive a power loss


def test_every_rename_the_node_relies_on_is_followed_by_a_folder_fsync(tmp_path, tiny_model_dir, monkeypatch):
    import stat

    events: list[tuple[str, str]] = []
    real_replace, real_fsync, real_link = os.replace, os.fsync, os.link

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("rename", str(Path(dst).resolve())))

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        events.append(("rename", str(Path(dst).resolve())))

    def fsync(fd):
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync-dir", os.readlink(f"/proc/self/fd/{fd}")))

    cfg = write_config(tmp_path, tiny_model_dir, budget=100.0)
    node_dir = tmp_path / "node0"
    node = node_for(cfg, node_dir)
    instr = instruction(node, 1)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "fsync", fsync)
    assert Message.from_bytes(node.handle(instr), ("client_update", "refusal")).kind == "client_update"
    renames = [(i, p) for i, (kind, p) in enumerate(events) if kind == "rename"]
    released = [p for _, p in renames if "/released/" in p]
    assert released, events  # the kept release was written by a rename
    for i, p in renames:
        parent = str(Path(p).parent)
        assert ("fsync-dir", parent) in events[i + 1:], f"{p} was renamed but {parent} was not fsynced after it"
    assert any(p.endswith(".head") for _, p in renames) and any(p.endswith("lifetime-heads.json") for _, p in renames)

    # the checkpoint a run resumes from, too
    from privlora.core.checkpoint import save_checkpoint
    import numpy as np

    events.clear()
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, 1, {"w": np.zeros(3)}, {"config_sha256": "x"})
    i = events.index(("rename", str((run / "checkpoint" / "state.json").resolve())))
    assert ("fsync-dir", str((run / "checkpoint").resolve())) in events[i + 1:]
