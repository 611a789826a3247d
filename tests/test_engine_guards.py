"""The round engine's privacy guards, driven through a transport of this file's own.

`FakeTransport` hands every message to the real in-process client nodes and then lets a test
rewrite the replies of a stage before the engine reads them (an extra reply, a reply from a
client nobody charged, a reply claiming another mechanism, a reply that never comes). It
rewrites *after* `Transport.exchange` has applied its own contract, so what reaches
`RoundEngine` is exactly what the test chose: the engine's own guards are under test, not the
transport base class's. It also logs which clients got which stage of which round.

Every expectation is computed here, independently of the engine: the release a client is
charged for from the config and its data size, epsilon with dp_accounting's PLD accountant
from the ledger read back with `accounting.Ledger`, and FFA-LoRA's aggregate by hand from the
bytes the clients sent.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from accounting import Ledger, SubsampledGaussian
from privlora.federation.messages import Message
from privlora.federation.transport import STAGE_DESCRIBE, STAGE_TRAIN, Transport
from privlora.transports.inprocess import InProcessTransport

TO_CLIENTS = ("describe", "round_instruction", "secagg_request")


class FakeTransport(Transport):
    """The real nodes behind an `InProcessTransport`, with a log and a hand on the replies.

    ``rewrite``: ``{stage: fn(rnd, messages, replies) -> replies}``, called with the messages
    the engine sent and the replies the nodes gave; what it returns is what the engine reads.
    ``log``: one ``(stage, round, [clients])`` per exchange (round None for ``describe``);
    ``sent`` and ``answered``: the bytes of each ``(stage, round)`` as they crossed."""

    name = "fake"

    def __init__(self, nodes, rewrite=None):
        super().__init__()
        self.real = InProcessTransport(nodes)
        self.rewrite = dict(rewrite or {})
        self.log = []
        self.sent = {}
        self.answered = {}

    def clients(self):
        return self.real.clients()

    def _exchange(self, stage, messages, timeout):
        return self.real.exchange(stage, messages, timeout)

    def exchange(self, stage, messages, timeout=None):
        replies = super().exchange(stage, messages, timeout)
        first = Message.from_bytes(next(iter(messages.values())), TO_CLIENTS) if messages else None
        rnd = None if first is None else first.header.get("round")
        self.log.append((stage, rnd, sorted(messages)))
        self.sent[(stage, rnd)] = dict(messages)
        self.answered[(stage, rnd)] = dict(replies)
        if stage in self.rewrite:
            replies = self.rewrite[stage](rnd, dict(messages), dict(replies))
        return replies

    def instructed(self, rnd):
        """The clients that were sent a train instruction in round ``rnd``."""
        return sorted(self.sent.get((STAGE_TRAIN, rnd), {}))

    def stages(self):
        return [stage for stage, _, _ in self.log]

    def train_as(self, client, instruction):
        """Client ``client``'s real node trains on ``instruction`` re-addressed to it: an update
        made outside the engine, by a client the engine never asked."""
        msg = Message.from_bytes(instruction, "round_instruction")
        forged = Message(msg.kind, dict(msg.header, client_id=client), msg.tensors).to_bytes()
        return self.real.nodes[client].handle(forged)


# ---------------------------------------------------------------- assembly


def config(tiny_cfg, **sections):
    """4 clients of the tiny model, 3 per round, DP on, FFA-LoRA without server momentum."""
    over = {"federation": {"rounds": 1, "clients_per_round": 3, "server_momentum": 0.0}}
    for sec, vals in sections.items():
        over[sec] = {**over.get(sec, {}), **vals}
    return tiny_cfg(**over)


SECAGG = {"enabled": True, "bits": 64, "value_bound": 8.0, "max_weight": 1000.0}


def assemble(cfg, out, rewrite=None):
    """A run folder, the real federation and nodes, and a RoundEngine driving them through a
    FakeTransport (as `privlora.transports.inprocess.run_experiment` assembles a run)."""
    from privlora.federation.engine import RoundEngine
    from privlora.federation.startup import build_federation, client_nodes, start_output

    fed = build_federation(cfg)
    if cfg.secagg.enabled:
        fed.server.strategy.check_secure_aggregation()
    start_output(cfg, out, False, False, fed.label_names)
    transport = FakeTransport(client_nodes(cfg, fed.clients), rewrite)
    engine = RoundEngine(cfg, fed.server, transport, out, majority_baseline=fed.majority_baseline,
                         label_names=fed.label_names, progress=False)
    return fed, transport, engine


def snapshot(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=k)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_round(out):
    return json.loads((out / "checkpoint" / "state.json").read_text())["round"]


def charged(out):
    """(client, round) of every charge in the run's ledger, read back from the file."""
    return [(c.client, c.round) for c in Ledger.open(out / "ledger.jsonl").charges]


def expected_release(cfg, num_examples):
    """One round of a client's DP-SGD as the config defines it: sigma as set, Poisson rate
    1 / ceil(n / batch_size) (Opacus's), local_steps steps, the clip norm and delta."""
    return SubsampledGaussian(
        noise_multiplier=cfg.privacy.noise_multiplier,
        sample_rate=1.0 / math.ceil(num_examples / cfg.training.batch_size),
        steps=cfg.training.local_steps,
        clip_norm=cfg.privacy.max_grad_norm,
        delta=cfg.privacy.delta,
    )


def pld_epsilon(releases, delta):
    """Epsilon of a history of releases by dp_accounting's PLD accountant (events built here)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for m in releases:
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(m.sample_rate, dp_event.GaussianDpEvent(m.noise_multiplier)), m.steps))
    return acc.get_epsilon(delta)


def ledger_epsilon(out, client):
    led = Ledger.open(out / "ledger.jsonl")
    return pld_epsilon(led.history(client), led.delta)


def ffa_average(updates, previous):
    """FFA-LoRA's new global state from ``client_update`` messages, by hand: A stays, every
    other tensor is the sum of the weighted contributions over the sum of the weights."""
    sent = [Message.from_bytes(blob, "client_update").tensors for blob in updates]
    total = sum(float(t["__weight__"][0]) for t in sent)
    return {k: v if ".lora_A." in k else sum(t[k].astype(np.float64) for t in sent) / total
            for k, v in previous.items()}


def broadcast(instruction):
    """The global tensors a round instruction carries (FFA-LoRA: all but the frozen A)."""
    return Message.from_bytes(instruction, "round_instruction").tensors


# ---------------------------------------------------------------- 1. only charged clients enter the aggregate


def test_a_reply_from_a_client_that_was_never_instructed_is_ignored(tiny_cfg, tmp_path):
    """Nobody trains uncharged: an extra reply, from the one client not sampled this round,
    trained by its real node on a forged instruction, does not enter the aggregate. The round
    goes on with the instructed clients, the outsider is never charged, and the global state
    is exactly FFA-LoRA's average of the instructed clients' own updates."""
    cfg = config(tiny_cfg)
    extra = {}

    def add_outsider(rnd, messages, replies):
        outsider = next(c for c in range(cfg.data.num_clients) if c not in messages)
        extra[outsider] = transport.train_as(outsider, next(iter(messages.values())))
        return {**replies, **extra}

    fed, transport, engine = assemble(cfg, tmp_path / "run", {STAGE_TRAIN: add_outsider})
    before = snapshot(fed.server.global_state)
    record = engine.run(stop_after=1)

    instructed = transport.instructed(1)
    (outsider,) = extra
    assert len(instructed) == 3 and outsider not in instructed
    assert Message.from_bytes(extra[outsider], "client_update").header["client_id"] == outsider
    assert record["clients"] == instructed and "stopped" not in record
    assert charged(tmp_path / "run") == [(c, 1) for c in instructed]
    honest = [transport.answered[(STAGE_TRAIN, 1)][c] for c in instructed]
    assert_same_state(fed.server.global_state, ffa_average(honest, before))
    # the outsider's update would have changed the aggregate: ignoring it is what kept it out
    polluted = ffa_average(honest + [extra[outsider]], before)
    assert any(not np.allclose(polluted[k], fed.server.global_state[k]) for k in polluted)


def test_an_update_from_an_uncharged_client_in_an_admitted_clients_place_is_refused(tiny_cfg, tmp_path):
    """Nobody trains uncharged: when the reply for an admitted client carries the update of
    the client that was not sampled (and never charged), the engine raises MessageError naming
    it; the round leaves no metrics line, the global model and the checkpoint stay at round 0,
    and the ledger holds the admitted clients' charges only."""
    from privlora.federation.messages import MessageError

    cfg = config(tiny_cfg)
    swapped = {}

    def swap_in_outsider(rnd, messages, replies):
        outsider = next(c for c in range(cfg.data.num_clients) if c not in messages)
        victim = min(messages)
        swapped.update(outsider=outsider, victim=victim)
        return {**replies, victim: transport.train_as(outsider, messages[victim])}

    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {STAGE_TRAIN: swap_in_outsider})
    before = snapshot(fed.server.global_state)
    with pytest.raises(MessageError, match="which was not asked to train") as err:
        engine.run(stop_after=1)
    assert f"client {swapped['outsider']}, which was not asked to train in round 1" in str(err.value)
    assert [r["round"] for r in metrics(out)] == [0] and checkpoint_round(out) == 0
    assert_same_state(fed.server.global_state, before)
    assert charged(out) == [(c, 1) for c in transport.instructed(1)]
    assert swapped["outsider"] not in [c for c, _ in charged(out)]


def test_a_reply_carrying_another_admitted_clients_update_is_refused(tiny_cfg, tmp_path):
    """Each reply must be the update of the client it was sent to: when the reply for one
    admitted client carries another admitted client's update (that client counted twice, the
    first not at all), the engine raises MessageError naming both, and the round leaves no
    metrics line and an unchanged global model."""
    from privlora.federation.messages import MessageError

    cfg = config(tiny_cfg)

    def duplicate(rnd, messages, replies):
        first, second = sorted(replies)[:2]
        return {**replies, first: replies[second]}

    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {STAGE_TRAIN: duplicate})
    before = snapshot(fed.server.global_state)
    with pytest.raises(MessageError, match="carries client") as err:
        engine.run(stop_after=1)
    first, second = transport.instructed(1)[:2]
    assert f"the reply to client {first} carries client {second}'s update" in str(err.value)
    assert [r["round"] for r in metrics(out)] == [0] and checkpoint_round(out) == 0
    assert_same_state(fed.server.global_state, before)


# ---------------------------------------------------------------- 2. what ran must be what was charged


MISREPORTS = {
    "noise_multiplier": lambda m: m["noise_multiplier"] / 2,
    "sample_rate": lambda m: min(1.0, m["sample_rate"] * 2),
    "steps": lambda m: m["steps"] + 1,
}


@pytest.mark.parametrize("field", sorted(MISREPORTS))
def test_a_reply_whose_mechanism_differs_from_its_charge_is_refused(tiny_cfg, tmp_path, field):
    """What a client reports it ran must equal what the ledger charged it for: one reply
    claiming another noise multiplier, sample rate or step count makes the engine refuse the
    update (RuntimeError) before anything is aggregated. The ledger's charge, read back, is the
    release the config defines for that client; the global model is unchanged."""
    cfg = config(tiny_cfg)
    claimed = {}

    def misreport(rnd, messages, replies):
        victim = min(replies)
        msg = Message.from_bytes(replies[victim], "client_update")
        mech = dict(msg.header["mechanism"])
        mech[field] = MISREPORTS[field](mech)
        claimed.update(client=victim, mechanism=SubsampledGaussian.from_dict(mech))
        return {**replies, victim: Message(msg.kind, dict(msg.header, mechanism=mech), msg.tensors).to_bytes()}

    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {STAGE_TRAIN: misreport})
    before = snapshot(fed.server.global_state)
    with pytest.raises(RuntimeError, match="refusing its update"):
        engine.run(stop_after=1)

    victim = claimed["client"]
    charge = Ledger.open(out / "ledger.jsonl").charge_for(victim, 1)
    assert charge.mechanism == expected_release(cfg, fed.clients[victim].num_examples)
    assert claimed["mechanism"] != charge.mechanism
    assert getattr(claimed["mechanism"], field) != getattr(charge.mechanism, field)
    assert [r["round"] for r in metrics(out)] == [0] and checkpoint_round(out) == 0
    assert_same_state(fed.server.global_state, before)


# ---------------------------------------------------------------- 3. no release past a budget


def budgets_with_one_round_for_last_client(tiny_cfg):
    """A 2-round config where every client is sampled each round and the last client's budget
    lies halfway between what one and two of its rounds cost (by dp_accounting, here); the
    others have room for both. Returns (cfg, that client, its budget, its release)."""
    from privlora.tasks.partition import partition
    from privlora.federation.startup import load_split

    probe = config(tiny_cfg, federation={"rounds": 2, "clients_per_round": 4})
    _, train, _ = load_split(probe)
    shards = partition(train, probe.data.partition, probe.data.num_clients, probe.seed, probe.data.dirichlet_alpha)
    last = probe.data.num_clients - 1
    release = expected_release(probe, len(shards[last]))
    one = pld_epsilon([release], probe.privacy.delta)
    two = pld_epsilon([release, release], probe.privacy.delta)
    budget = (one + two) / 2
    budgets = [1000.0] * last + [budget]
    cfg = config(tiny_cfg, federation={"rounds": 2, "clients_per_round": 4}, privacy={"budgets": budgets})
    return cfg, last, budget, release


def test_a_client_whose_next_release_would_exceed_its_budget_is_never_instructed(tiny_cfg, tmp_path):
    """No release ever takes a client past its budget: admission runs before training. The
    client whose budget holds one round only trains in round 1; in round 2 it is sampled but
    refused with its reason, never sent an instruction, never charged, and its epsilon (from
    the ledger, by dp_accounting) stays within its budget. The others go on."""
    cfg, poor, budget, release = budgets_with_one_round_for_last_client(tiny_cfg)
    assert pld_epsilon([release, release], cfg.privacy.delta) > budget  # a second round would overspend
    out = tmp_path / "run"
    _, transport, engine = assemble(cfg, out)
    record = engine.run()

    assert "stopped" not in record
    assert transport.instructed(1) == [0, 1, 2, 3]
    assert transport.instructed(2) == [0, 1, 2]
    assert charged(out) == [(c, 1) for c in range(4)] + [(c, 2) for c in range(3)]
    assert Ledger.open(out / "ledger.jsonl").history(poor) == [release]
    assert ledger_epsilon(out, poor) <= budget
    last = metrics(out)[-1]
    assert last["round"] == 2 and poor in last["sampled"] and last["clients"] == [0, 1, 2]
    assert "over its budget" in last["refused"][str(poor)]
    assert last["epsilon"][str(poor)] <= budget
    assert last["epsilon"][str(poor)] == pytest.approx(ledger_epsilon(out, poor), rel=1e-2)


def test_the_round_end_check_stops_a_run_in_which_a_client_exceeded_its_budget(tiny_cfg, tmp_path, monkeypatch):
    """No spent epsilon exceeds a budget, checked again at the end of every round: with an
    admission that (wrongly) lets everyone in, the client over its budget is charged and
    trained in round 2, and the engine's end-of-round check raises before that round's
    metrics or checkpoint are written. The ledger keeps the evidence: that client's epsilon,
    recomputed by dp_accounting, is above its budget."""
    from accounting import Admission

    cfg, poor, budget, _ = budgets_with_one_round_for_last_client(tiny_cfg)
    monkeypatch.setattr(Admission, "admit", lambda self, planned: (sorted(planned), []))
    out = tmp_path / "run"
    _, transport, engine = assemble(cfg, out)
    with pytest.raises(RuntimeError, match=re.escape(f"privacy invariant broken: clients {{'{poor}': ")):
        engine.run()

    assert poor in transport.instructed(2)  # the broken admission let it through
    assert ledger_epsilon(out, poor) > budget
    assert [r["round"] for r in metrics(out)] == [0, 1] and checkpoint_round(out) == 1


# ---------------------------------------------------------------- 4. a secure sum needs three


def test_secure_aggregation_with_fewer_than_three_admissible_clients_stops_before_any_charge(tiny_cfg, tmp_path):
    """A secure sum of two lets each client subtract its own input: with secure aggregation
    on and only two clients able to take part (the other two never answer ``describe``), the
    run stops in round 1 with a reason naming the rule, before any charge or instruction; the
    global model is the untrained one (the run's min_clients alone, 1, would have allowed it)."""
    cfg = config(tiny_cfg, federation={"clients_per_round": 4}, secagg=SECAGG)
    silent = {2, 3}
    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {
        STAGE_DESCRIBE: lambda rnd, messages, replies: {c: b for c, b in replies.items() if c not in silent}})
    before = snapshot(fed.server.global_state)
    record = engine.run()

    assert cfg.federation.min_clients == 1
    assert "fewer than 3" in record["stopped"] and "secure aggregation needs 3" in record["stopped"]
    assert "2 never described themselves" in record["stopped"] and not record["aborted"]
    assert transport.stages() == [STAGE_DESCRIBE]
    assert charged(out) == []
    assert_same_state(fed.server.global_state, before)
    assert metrics(out)[-1]["stopped"] == record["stopped"]


def test_secure_aggregation_with_two_answers_aborts_before_any_secagg_stage(tiny_cfg, tmp_path):
    """Abort rather than leak: three clients are admitted and charged, one never answers its
    instruction, and two updates are too few for a secure sum. The round aborts with that
    reason before a single secure-aggregation message is sent; the global model is unchanged,
    the three charges stay spent (shown in the abort line), and --resume is offered."""
    cfg = config(tiny_cfg, secagg=SECAGG)
    gone = []

    def one_falls_silent(rnd, messages, replies):
        gone.append(min(replies))
        return {c: b for c, b in replies.items() if c != gone[0]}

    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {STAGE_TRAIN: one_falls_silent})
    before = snapshot(fed.server.global_state)
    record = engine.run()

    assert record["aborted"] and "only 2 clients returned an update, fewer than 3" in record["stopped"]
    assert "--resume" in record["stopped"]
    assert transport.stages() == [STAGE_DESCRIBE, STAGE_TRAIN]
    assert_same_state(fed.server.global_state, before)
    assert checkpoint_round(out) == 0
    assert charged(out) == [(c, 1) for c in transport.instructed(1)] and gone[0] in transport.instructed(1)
    stop = metrics(out)[-1]
    assert stop["aborted"] and stop["epsilon"][str(gone[0])] == pytest.approx(ledger_epsilon(out, gone[0]), rel=1e-2)


# ---------------------------------------------------------------- 5. a dropout's charge stays spent


def test_a_client_that_drops_out_after_its_charge_stays_charged_and_the_run_goes_on(tiny_cfg, tmp_path):
    """A crash never un-spends budget: the client that does not answer its round-1 instruction
    keeps its charge (the release the config defines for it), is recorded in metrics.jsonl as a
    dropout with that epsilon, and, two answers being enough in the clear, the run goes on:
    round 2 starts from FFA-LoRA's average of the two survivors' updates alone."""
    cfg = config(tiny_cfg, federation={"rounds": 2})
    gone = []

    def drop_in_round_one(rnd, messages, replies):
        if rnd != 1:
            return replies
        gone.append(min(replies))
        return {c: b for c, b in replies.items() if c != gone[0]}

    out = tmp_path / "run"
    fed, transport, engine = assemble(cfg, out, {STAGE_TRAIN: drop_in_round_one})
    before = snapshot(fed.server.global_state)
    record = engine.run()

    (dropout,) = gone
    survivors = [c for c in transport.instructed(1) if c != dropout]
    charge = Ledger.open(out / "ledger.jsonl").charge_for(dropout, 1)
    assert charge is not None and charge.mechanism == expected_release(cfg, fed.clients[dropout].num_examples)
    first = metrics(out)[1]
    assert first["round"] == 1 and first["dropped"] == [dropout] and first["clients"] == survivors
    spent = pld_epsilon([charge.mechanism], cfg.privacy.delta)
    assert first["epsilon"][str(dropout)] == pytest.approx(spent, rel=1e-2) and spent > 0
    assert "stopped" not in record and record["round"] == 2 and len(transport.instructed(2)) == 3
    after_one = ffa_average([transport.answered[(STAGE_TRAIN, 1)][c] for c in survivors], before)
    for blob in transport.sent[(STAGE_TRAIN, 2)].values():
        got = broadcast(blob)
        assert_same_state(got, {k: after_one[k] for k in got})
