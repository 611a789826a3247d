"""The server: holds the global adapter, samples clients, broadcasts, aggregates, evaluates.

It talks to clients only in bytes (`privlora.messages`): a ``round_instruction`` out, a
``client_update`` back. Aggregation is `Strategy.finish` over the key-wise sum of the clients'
contributions (`strategies.sum_states`), so the transport can later be secure aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from accounting import SubsampledGaussian

from .adapters import adapter_state, load_adapter_state, make_peft_model
from .config import ExperimentConfig
from .data import trim_collate
from .fedavgm import server_momentum_step
from .messages import Message, MessageError
from .strategies import Strategy, sum_states


@dataclass
class ClientReport:
    """What the server learns from one client's update message, besides the contribution."""

    client_id: int
    round: int
    rank: int
    num_examples: int
    train_loss: float | None
    steps: int
    seconds: float
    mechanism: SubsampledGaussian | None
    bytes_up: int


class Server:
    def __init__(self, cfg: ExperimentConfig, strategy: Strategy, base_model, test_dataset):
        self.cfg = cfg
        self.strategy = strategy
        self.test_dataset = test_dataset
        self.global_model = make_peft_model(base_model, cfg, cfg.max_rank)
        self.global_state = strategy.initial_state(adapter_state(self.global_model))
        load_adapter_state(self.global_model, self.global_state)
        self.rng = np.random.default_rng([cfg.seed, 0x5A3])
        self.velocity: dict[str, np.ndarray] | None = None

    def sample_clients(self) -> list[int]:
        """Uniformly without replacement; the same sequence for the same seed."""
        n, k = self.cfg.data.num_clients, self.cfg.federation.clients_per_round
        return sorted(int(c) for c in self.rng.choice(n, size=k, replace=False))

    def instruction(self, rnd: int, client_id: int) -> bytes:
        rank = self.cfg.client_rank(client_id)
        payload = self.strategy.broadcast(self.global_state, rank)
        header = {"round": rnd, "client_id": client_id, "rank": rank, "strategy": self.strategy.name}
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
                num_examples=int(h["num_examples"]),
                train_loss=None if h["train_loss"] is None else float(h["train_loss"]),
                steps=int(h["steps"]),
                seconds=float(h["seconds"]),
                mechanism=mech,
                bytes_up=len(blob),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"client_update header is invalid: {exc}") from exc
        if got_round != rnd:
            raise MessageError(f"client {cid} sent an update for round {got_round} during round {rnd}")
        if cid not in expected_clients:
            raise MessageError(f"update from client {cid}, which was not asked to train in round {rnd}")
        if self.cfg.privacy.enabled and mech is None:
            raise MessageError(f"client {cid} reported no DP mechanism but privacy is enabled")
        return report, msg.tensors

    def aggregate(self, contributions: list[dict[str, np.ndarray]]) -> None:
        summed = sum_states(contributions)
        aggregate = self.strategy.finish(summed, self.global_state)
        f = self.cfg.federation
        if f.server_momentum > 0 or f.server_lr != 1.0:
            aggregate, self.velocity = server_momentum_step(
                self.global_state, aggregate, self.velocity, f.server_momentum, f.server_lr
            )
        self.global_state = aggregate
        load_adapter_state(self.global_model, self.global_state)

    def evaluate(self) -> dict[str, float]:
        """Accuracy and mean cross-entropy of the global model on the held-out split."""
        import torch
        import torch.nn.functional as F
        from torch.utils.data import DataLoader

        model = self.global_model
        model.eval()
        loader = DataLoader(self.test_dataset, batch_size=self.cfg.training.eval_batch_size, collate_fn=trim_collate)
        correct, total, loss_sum = 0, 0, 0.0
        with torch.inference_mode():
            for ids, mask, labels in loader:
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                total += int(labels.shape[0])
        return {"accuracy": correct / total, "loss": loss_sum / total}
