"""The server: holds the global adapter, samples clients, broadcasts, aggregates, evaluates.

It talks to clients only in bytes (`privlora.federation.messages`): a ``round_instruction`` out, a
``client_update`` back. Aggregation is `Strategy.finish` over the key-wise sum of the clients'
contributions (`strategies.sum_states`), so the transport can later be secure aggregation.

Per-client ranks. The server keeps every client's current rank (``client_ranks``, from the
config) and sends it in each instruction; a client whose strategy prunes (HetLoRA) reports a
smaller ``next_rank`` with its update, and the server uses that from then on.

Merging strategies (FLoRA). The global state then also holds dense cumulative deltas to the base
weights (``BASE_DELTA_PREFIX`` keys): the server sets its model's base weights to the original
weights plus those deltas, and `export_model` turns the merged model back into a peft adapter on
the original base (so ``adapter/`` keeps its contract: ``PeftModel.from_pretrained`` on the base).

Communication. ``ClientReport.upload_bytes`` and ``download_bytes[client]`` are the tensor
bytes a real deployment sends for the strategy (`Strategy.upload_bytes`/`download_bytes`:
float32 values, no framing); ``bytes_up`` is the simulated message's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from accounting import SubsampledGaussian
from privlora.core.config import ExperimentConfig
from privlora.federation.messages import Message, MessageError
from privlora.strategies import Strategy, sum_states
from privlora.strategies.base import BASE_DELTA_PREFIX, base_weight_name, is_base_delta, is_lora_a, is_lora_b, lora_pairs
from privlora.strategies.fedavgm import server_momentum_step
from privlora.tasks.adapters import adapter_state, frozen_weights, load_adapter_state, merge_into_base
from privlora.tasks.registry import task_for


@dataclass
class ClientReport:
    """What the server learns from one client's update message, besides the contribution."""

    client_id: int
    round: int
    rank: int
    num_examples: int | None
    """None under secure aggregation (the size then travels only inside the masked sum)."""
    train_loss: float | None
    steps: int
    seconds: float | None
    """Local training's wall-clock seconds; None under DP (a statistic of the data: never sent)."""
    mechanism: SubsampledGaussian | None
    bytes_up: int
    """Length of the client_update message as simulated (header and all tensors)."""
    next_rank: int = 0
    """The client's rank from now on (its trained rank unless the strategy pruned it)."""
    upload_bytes: int = 0
    """Tensor bytes a real client uploads for this strategy (`Strategy.upload_bytes`)."""


class Server:
    def __init__(self, cfg: ExperimentConfig, strategy: Strategy, base_model, test_dataset):
        self.cfg = cfg
        self.strategy = strategy
        self.task = task_for(cfg)
        """The run's task: it builds the adapter, evaluates, and generates the report's samples."""
        self.test_dataset = test_dataset
        self.base_model = base_model  # read only: the global model is a copy
        self.global_model = self.task.make_adapter(base_model, cfg.max_rank)
        self.global_state = strategy.initial_state(adapter_state(self.global_model))
        deltas = [k[len(BASE_DELTA_PREFIX) :] for k in self.global_state if is_base_delta(k)]
        self._base_weights = frozen_weights(self.global_model, deltas)
        self.load_global_state(self.global_state)
        self.rng = np.random.default_rng([cfg.seed, 0x5A3])
        self.velocity: dict[str, np.ndarray] | None = None
        self.client_ranks: dict[int, int] = {k: cfg.client_rank(k) for k in range(cfg.data.num_clients)}
        self.download_bytes: dict[int, int] = {}
        """Tensor bytes of the last instruction sent to each client (`Strategy.download_bytes`)."""
        self.sample_prompts: list[dict[str, str]] | None = None
        """Fixed held-out inputs whose outputs the report shows (`Task.sample_prompts`, e.g. the
        causal-LM task's instructions with their reference responses); None = no samples."""
        self._tokenizer = None

    def set_samples(self, tokenizer, prompts: list[dict[str, str]]) -> None:
        self._tokenizer = tokenizer
        self.sample_prompts = list(prompts)

    def generate_samples(self, model=None) -> list[str]:
        """The task's outputs of ``model`` (default: the global model) for `sample_prompts`."""
        return self.task.generate_samples(model if model is not None else self.global_model, self._tokenizer,
                                          self.sample_prompts or [])

    def load_global_state(self, state: dict[str, np.ndarray]) -> None:
        """Make ``state`` the global model: adapter tensors into the adapter, base deltas onto
        the original base weights. Use this (not `load_adapter_state`) to restore a checkpoint:
        a merging strategy's state holds base deltas the adapter does not."""
        load_adapter_state(self.global_model, {k: v for k, v in state.items() if not is_base_delta(k)})
        deltas = {k[len(BASE_DELTA_PREFIX) :]: v for k, v in state.items() if is_base_delta(k)}
        if deltas:
            merge_into_base(self.global_model, deltas, self._base_weights)

    def sample_clients(self) -> list[int]:
        """Uniformly without replacement; the same sequence for the same seed."""
        n, k = self.cfg.data.num_clients, self.cfg.federation.clients_per_round
        return sorted(int(c) for c in self.rng.choice(n, size=k, replace=False))

    def instruction(self, rnd: int, client_id: int, mechanism: SubsampledGaussian | None = None) -> bytes:
        """The round_instruction for one client: its rank, the strategy's broadcast payload and,
        under DP, the release the server charged it for (a guarded client refuses any other)."""
        rank = self.client_ranks[client_id]
        payload = self.strategy.broadcast(self.global_state, rank)
        self.download_bytes[client_id] = self.strategy.download_bytes(payload)
        header = {"round": rnd, "client_id": client_id, "rank": rank, "strategy": self.strategy.name,
                  "mechanism": None if mechanism is None else mechanism.to_dict()}
        return Message("round_instruction", header, payload).to_bytes()

    def read_update(self, blob: bytes, rnd: int, expected_clients: set[int]) -> tuple[ClientReport, dict[str, np.ndarray]]:
        msg = Message.from_bytes(blob, "client_update")
        h = msg.header
        try:
            cid, got_round = int(h["client_id"]), int(h["round"])
            mech = None if h["mechanism"] is None else SubsampledGaussian.from_dict(h["mechanism"])
            report = ClientReport(
                client_id=cid,
                round=got_round,
                rank=int(h["rank"]),
                num_examples=None if h["num_examples"] is None else int(h["num_examples"]),
                train_loss=None if h["train_loss"] is None else float(h["train_loss"]),
                steps=int(h["steps"]),
                seconds=None if h.get("seconds") is None else float(h["seconds"]),
                mechanism=mech,
                bytes_up=len(blob),
                next_rank=int(h.get("next_rank", h["rank"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"client_update header is invalid: {exc}") from exc
        if not 1 <= report.next_rank <= report.rank:
            raise MessageError(f"client {cid} reported next_rank {report.next_rank}; a rank may only shrink (trained rank {report.rank})")
        if got_round != rnd:
            raise MessageError(f"client {cid} sent an update for round {got_round} during round {rnd}")
        if cid not in expected_clients:
            raise MessageError(f"update from client {cid}, which was not asked to train in round {rnd}")
        if self.cfg.privacy.enabled and mech is None:
            raise MessageError(f"client {cid} reported no DP mechanism but privacy is enabled")
        if report.rank != self.client_ranks[cid]:
            raise MessageError(f"client {cid} trained rank {report.rank} but was sent rank {self.client_ranks[cid]}")
        report.upload_bytes = self.strategy.upload_bytes(msg.tensors, report.next_rank)
        self.client_ranks[cid] = report.next_rank
        return report, msg.tensors

    def client_record(self, report: ClientReport) -> dict[str, int]:
        """One client's line for metrics.jsonl: ranks and tensor bytes up and down this round."""
        return {
            "client": report.client_id,
            "rank": report.rank,
            "next_rank": report.next_rank,
            "upload_bytes": report.upload_bytes,
            "download_bytes": self.download_bytes.get(report.client_id, 0),
        }

    def aggregate(self, contributions: list[dict[str, np.ndarray]]) -> None:
        """Sum the contributions in the clear, then `aggregate_sum`."""
        self.aggregate_sum(sum_states(contributions))

    def aggregate_sum(self, summed: dict[str, np.ndarray]) -> None:
        """The new global state from the key-wise sum of this round's contributions (computed in
        the clear or under secure aggregation: the server needs nothing else)."""
        aggregate = self.strategy.finish(summed, self.global_state)
        f = self.cfg.federation
        if f.server_momentum > 0 or f.server_lr != 1.0:
            aggregate, self.velocity = server_momentum_step(
                self.global_state, aggregate, self.velocity, f.server_momentum, f.server_lr
            )
        self.global_state = aggregate
        self.load_global_state(self.global_state)

    def export_model(self):
        """The global model as a peft model on the original base, for ``save_pretrained``.

        Without merged deltas this is the global model itself. With them (FLoRA), a new adapter
        on a fresh copy of the original base represents ``merged delta + current adapter``
        exactly: each layer's total update is factored by SVD (`flora.delta_to_lora`) at the
        largest numerical rank over the layers, with the federation's scaling s; the head is
        the global head. Its outputs equal the global model's up to float32 rounding.
        """
        from privlora.strategies.flora import delta_to_lora, numerical_rank

        if not any(is_base_delta(k) for k in self.global_state):
            return self.global_model
        scaling = self.cfg.lora.alpha / self.cfg.lora.r
        state = self.global_state
        totals = {}
        for module, a_key, b_key in lora_pairs(state):
            total = state[BASE_DELTA_PREFIX + base_weight_name(module)].astype(np.float64)
            totals[module] = total + scaling * state[b_key].astype(np.float64) @ state[a_key].astype(np.float64)
        rank = max([1] + [numerical_rank(t) for t in totals.values()])
        model = self.task.make_adapter(self.base_model, rank)
        out = {}
        template = adapter_state(model)
        pairs = {a_key: (module, b_key) for module, a_key, b_key in lora_pairs(template)}
        for k, v in template.items():
            if is_lora_a(k):
                module, b_key = pairs[k]
                out[b_key], out[k] = delta_to_lora(totals[module], scaling, rank)
            elif not is_lora_b(k):
                out[k] = state[k].copy()
        load_adapter_state(model, out)
        return model

    def evaluate(self) -> dict[str, float | None]:
        """Accuracy, mean loss and the task's own metrics of the global model on the held-out
        split (`Task.evaluate`)."""
        return self.task.evaluate(self.global_model, self.test_dataset)
