"""A federated client: local LoRA training with DP-SGD through Opacus, behind a bytes interface.

`Client.handle(instruction: bytes) -> bytes` is the whole surface a server sees. Inside:

1. rebuild the adapter the strategy says to start from (`Strategy.local_start`);
2. train ``training.local_steps`` optimizer steps. Under DP, Opacus's `PrivacyEngine.make_private`
   wraps model, optimizer and loader: Poisson sampling (each example joins a batch with
   probability ``q = batch_size / n_k``), per-example gradients clipped to ``max_grad_norm``,
   Gaussian noise ``noise_multiplier * max_grad_norm``. Memory stays bounded as with Opacus's
   `BatchMemoryManager` (same `signal_skip_step` mechanism): each logical batch is cut into
   physical batches of at most ``physical_batch_size``, sorted by length to cut padding;
3. return the strategy's contribution and the exact mechanism that ran (a `SubsampledGaussian`:
   sigma, q, steps, clip, delta), read back from Opacus's own accountant.

Strategy hooks. A payload may carry dense deltas to the frozen base weights (FLoRA merges every
round into the base): they are added to this client's copy of the base before training. A
strategy may add a parameter-only penalty to the local objective (HetLoRA's tail regulariser).
Under DP its gradient must not go into the loss: Opacus builds the noisy gradient from
per-sample gradients alone and overwrites ``p.grad``, so a penalty in the loss would silently
vanish. The client instead adds the penalty's gradient to ``p.grad`` after Opacus's clip-and-
noise step (`DPOptimizer.pre_step`) and before the underlying optimizer's step: the penalty is
data-independent, so it is neither clipped nor charged. After training a strategy may shrink
the rank (HetLoRA's self-pruning); the client reports the rank it keeps as ``next_rank``.

Task hooks. The run's task (`privlora.tasks.Task`) builds the adapter (`Task.make_adapter`) and
gives the loss of each physical batch (`Task.loss`: the mean of its rows' own losses, so that
Opacus's per-sample gradients are each record's); the client never asks which task it is.

Observers. ``Client.observers`` are told where each round's local training started and where it
ended (`TrainingObserver`); `privlora audit` scores its canaries that way. They see the model
only after the update to release has been read from it, and must leave the release alone.

Without DP the same loop runs on shuffled batches of ``batch_size`` and no mechanism is reported.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from accounting import SubsampledGaussian
from privlora.core.accountants import calibrate_noise
from privlora.core.config import ExperimentConfig
from privlora.federation.messages import Message
from privlora.strategies import Strategy
from privlora.tasks.adapters import adapter_state, load_adapter_state, merge_into_base
from privlora.tasks.data import DataError, trim_batch
from privlora.tasks.registry import task_for


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and (round, client, purpose) — stable across platforms."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def penalty_step(model, penalty):
    """A zero-argument callable adding ``d penalty(model) / d p`` to ``p.grad`` of every
    trainable parameter (computed with `torch.autograd.grad`, outside any Opacus hook)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def apply() -> None:
        value = penalty(model)
        if not value.requires_grad:
            return
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()

    return apply


def zero_nonfinite_samples(params) -> int:
    """Set to zero every per-example gradient (Opacus's ``p.grad_sample``, over all ``params``)
    of an example whose gradient holds a non-finite value anywhere; returns how many. Run before
    Opacus clips: such an example then contributes nothing, so the sum of clipped gradients
    stays within the clip norm C and the noise covers it (a NaN would otherwise reach the release
    exactly when that example is sampled, a bit DP does not cover)."""
    import torch

    samples = []
    for p in params:
        g = getattr(p, "grad_sample", None)
        if g is None:
            continue
        samples.extend(g if isinstance(g, list) else [g])
    if not samples:
        return 0
    bad = None
    for g in samples:
        row = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
        bad = row if bad is None else (bad | row) if bad.shape == row.shape else None
        if bad is None:  # per-sample gradients of different batches: sanitise each tensor alone
            break
    if bad is None:
        count = 0
        for g in samples:
            row = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
            g[row] = 0
            count = max(count, int(row.sum()))
        return count
    if bad.any():
        for g in samples:
            g[bad] = 0
    return int(bad.sum())


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """q = 1 / ceil(n_k / batch_size): the rate Opacus's DPDataLoader samples at (1 / its length)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def planned_noise_multiplier(cfg: ExperimentConfig, sample_rate: float) -> float:
    """``privacy.noise_multiplier`` if set, else the smallest sigma keeping a client sampled at
    ``sample_rate`` within ``target_epsilon`` over the rounds it is calibrated for (every round,
    or its expected share: `ExperimentConfig.calibration_rounds`; cached per q)."""
    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    planned = cfg.calibration_rounds * cfg.training.local_steps
    return calibrate_noise(p.target_epsilon, p.delta, sample_rate, planned, p.accountant)


def planned_mechanism(cfg: ExperimentConfig, num_examples: int, noise_multiplier: float | None = None) -> SubsampledGaussian:
    """One round of a client's local DP-SGD on ``num_examples`` records, as the ledger charges it."""
    t, p = cfg.training, cfg.privacy
    q = poisson_sample_rate(num_examples, t.batch_size)
    sigma = planned_noise_multiplier(cfg, q) if noise_multiplier is None else noise_multiplier
    return SubsampledGaussian(
        noise_multiplier=float(sigma),
        sample_rate=float(q),
        steps=int(t.local_steps),
        clip_norm=float(p.max_grad_norm),
        delta=float(p.delta),
    )


@dataclass
class LocalResult:
    state: dict[str, np.ndarray]
    mechanism: SubsampledGaussian | None
    train_loss: float
    steps: int
    seconds: float
    next_rank: int | None = None
    """The rank the client keeps after local training (smaller than the trained rank only when
    the strategy prunes); ``state`` has this rank."""
    start: dict[str, np.ndarray] | None = None
    """The adapter state local training started from (client-level DP contributes the change)."""


class TrainingObserver(Protocol):
    """Sees each round of a client's local training (``Client.observers``)."""

    def training_started(self, client_id: int, rnd: int, model) -> None:
        """``model`` (the peft model about to train) as the round starts: the broadcast state."""

    def training_finished(self, client_id: int, rnd: int, model) -> None:
        """The same ``model`` after the round's training, once the update to release has been
        read from it (changing the model now changes nothing the client sends)."""


class Client:
    """One client's data and training loop. Holds no reference to any server object."""

    def __init__(self, client_id: int, cfg: ExperimentConfig, base_model, train_dataset, strategy: Strategy):
        self.client_id = client_id
        self.cfg = cfg
        self.base_model = base_model
        self.dataset = train_dataset
        self.strategy = strategy
        self.task = task_for(cfg)
        self.observers: list[TrainingObserver] = []
        """Told where each round's training started and ended (`TrainingObserver`)."""
        self.num_examples = len(train_dataset)
        if self.num_examples == 0:
            raise DataError(f"data.num_clients: client {client_id} has no training examples; lower data.num_clients")
        self._noise_multiplier: float | None = None
        self.client_level_release = None
        """(round, release) of the last client-level contribution made (`privlora.federation.client_level`)."""
        self._incoming: dict[int, dict[str, tuple[int, ...]]] = {}

    def incoming_fields(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The fields (name -> shape) this client accepts in a round instruction of ``rank``:
        its strategy's declared incoming fields (`Strategy.incoming`) for its own adapter."""
        if rank not in self._incoming:
            template = adapter_state(self.task.make_adapter(self.base_model, rank))
            self._incoming[rank] = self.strategy.incoming(template, rank)
        return self._incoming[rank]

    # ------------------------------------------------------------------ DP parameters
    @property
    def sample_rate(self) -> float:
        """Poisson sampling rate q = 1 / ceil(n_k / batch_size), exactly as Opacus derives it."""
        return poisson_sample_rate(self.num_examples, self.cfg.training.batch_size)

    @property
    def noise_multiplier(self) -> float:
        """Explicit sigma, or the smallest sigma keeping this client within target_epsilon if it
        took part in every planned round (the worst case, so the target holds whatever sampling)."""
        if self._noise_multiplier is None:
            self._noise_multiplier = planned_noise_multiplier(self.cfg, self.sample_rate)
        return self._noise_multiplier

    def planned_mechanism(self) -> SubsampledGaussian:
        """The release one round of local DP-SGD makes: what the ledger charges before training."""
        return planned_mechanism(self.cfg, self.num_examples, self.noise_multiplier)

    # ------------------------------------------------------------------ protocol
    def handle(self, instruction: bytes, progress=None) -> bytes:
        """Train on a ``round_instruction`` message; return the ``client_update`` message.

        ``progress`` (optional, e.g. a tqdm bar) is advanced once per local step."""
        msg = Message.from_bytes(instruction, "round_instruction")
        h = msg.header
        if h.get("client_id") != self.client_id:
            raise ValueError(f"instruction for client {h.get('client_id')} delivered to client {self.client_id}")
        rnd, rank = int(h["round"]), int(h["rank"])
        result = self.train(msg.tensors, rnd, rank, progress=progress)
        return self.encode_update(result, rnd, rank)

    def encode_update(self, result: "LocalResult", rnd: int, rank: int) -> bytes:
        """The client_update message: the strategy's contribution and the mechanism that ran."""
        next_rank = rank if result.next_rank is None else result.next_rank
        client_level = self.cfg.privacy.unit == "client"
        private = result.mechanism is not None or client_level
        if client_level:
            tensors = self.client_level_contribution(result, rnd, next_rank)
        else:
            contribution = self.strategy.contribution(result.state, self.num_examples, next_rank, client_id=self.client_id)
            tensors = {k: v.astype(np.float32) for k, v in contribution.items()}
        header = {
            "round": rnd,
            "client_id": self.client_id,
            "rank": rank,
            "next_rank": next_rank,
            # under secure aggregation the dataset size travels only inside the masked sum
            # (and under client-level DP never: it is a statistic of the client's data)
            "num_examples": None if self.cfg.secagg.enabled or private else self.num_examples,
            # The mean training loss is computed from private data without noise: under DP it
            # stays on the client (it would be a release that epsilon does not cover).
            "train_loss": None if private else result.train_loss,
            "steps": result.steps,
            # wall-clock time depends on the data (batches are trimmed to their longest example):
            # under DP it stays on the client, like the loss
            "seconds": None if private else result.seconds,
            "mechanism": None if result.mechanism is None else result.mechanism.to_dict(),
        }
        return Message("client_update", header, tensors).to_bytes()

    def client_level_contribution(self, result: "LocalResult", rnd: int, rank: int) -> dict[str, np.ndarray]:
        """Under ``privacy.unit = 'client'``: the change this client adds to the sum, every tensor
        together clipped to L2 norm ``privacy.client_clip`` (float64, so the clip survives the
        wire); under distributed noise, instead, its encoding mod 2^``privacy.client_bits``
        (clipped, rotated, scaled, rounded, with this client's noise share) under one key."""
        from privlora.federation import client_level as cl
        from privlora.federation.distributed_noise import ClientEncoder, Layout
        from privlora.federation.noise import integer_noise_generator

        if result.start is None:
            raise RuntimeError("client-level DP needs the state local training started from")
        delta = cl.client_delta(self.strategy, result.state, result.start, rank, self.client_id)
        if not cl.is_distributed(self.cfg):
            clipped, _ = cl.clip_delta(delta, self.cfg.privacy.client_clip)
            self.client_level_release = (rnd, cl.central_release(self.cfg))
            return clipped
        params = cl.distributed_params(self.cfg, Layout.of(delta), rnd)
        self.client_level_release = (rnd, params.release())
        rng = integer_noise_generator(self.cfg.seed, rnd, self.client_id, 3)
        encoded, _report = ClientEncoder(params).encode(delta, rng)  # the report depends on the data: kept here
        return {cl.DISTRIBUTED_KEY: encoded}

    # ------------------------------------------------------------------ training
    def build_model(self, payload: dict[str, np.ndarray], rank: int):
        """The task's adapter of ``rank`` on (a copy of) the base, started where the strategy says."""
        model = self.task.make_adapter(self.base_model, rank)
        deltas = self.strategy.base_update(payload)
        if deltas:
            merge_into_base(model, deltas)
        start = self.strategy.local_start(payload, adapter_state(model))
        load_adapter_state(model, start)
        for name, p in model.named_parameters():
            if p.requires_grad and self.strategy.frozen(name):
                p.requires_grad_(False)
        return model

    def train(self, payload: dict[str, np.ndarray], rnd: int, rank: int, progress=None) -> LocalResult:
        import torch

        t0 = time.perf_counter()
        torch.manual_seed(derived_seed(self.cfg.seed, rnd, self.client_id, 1))
        model = self.build_model(payload, rank)
        start = adapter_state(model) if self.cfg.privacy.unit == "client" else None
        for observer in self.observers:
            observer.training_started(self.client_id, rnd, model)
        model.train()
        if not self.cfg.training.dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                    module.eval()
        t = self.cfg.training
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if "modules_to_save" not in n], "lr": t.lr},
            {"params": [p for n, p in named if "modules_to_save" in n], "lr": t.head_lr or t.lr},
        ]
        groups = [g for g in groups if g["params"]]
        penalty = self.strategy.penalty(rank)
        penalty = None if penalty is None else penalty_step(model, penalty)
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
        with warnings.catch_warnings():
            # Opacus's hooks on a model whose inputs need no grad; per-example gradients of
            # every trainable tensor are still computed (tests/test_dp_client.py checks them)
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if self.cfg.privacy.enabled:
                losses, steps, mechanism = self._train_dp(model, optimizer, progress, penalty)
            else:
                losses, steps = self._train_plain(model, optimizer, rnd, progress, penalty)
                mechanism = None
        state, next_rank = self.strategy.prune(adapter_state(model), rank)
        result = LocalResult(
            state=state,
            mechanism=mechanism,
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            steps=steps,
            seconds=time.perf_counter() - t0,
            next_rank=next_rank,
            start=start,
        )
        for observer in self.observers:
            observer.training_finished(self.client_id, rnd, model)
        return result

    def _loss(self, model, batch):
        return self.task.loss(model, batch)

    def _train_dp(self, model, optimizer, progress, penalty=None):
        import torch
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        t, p = self.cfg.training, self.cfg.privacy
        sigma = self.noise_multiplier
        # Opacus sets q = 1 / len(loader) = 1 / ceil(n / batch_size): `sample_rate` matches it.
        loader = DataLoader(self.dataset, batch_size=t.batch_size)
        with warnings.catch_warnings():
            # secure_mode is off: noise comes from torch's seeded PRNG (SECURITY.md says so)
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            # only the engine's record of what ran is read (accounting is done by `accounting`)
            engine = PrivacyEngine(accountant="rdp")
            gs_model, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=p.max_grad_norm,
                poisson_sampling=True,
            )
        if abs(dp_loader.sample_rate - self.sample_rate) > 1e-12:
            raise RuntimeError(f"Opacus samples at q={dp_loader.sample_rate}, calibrated for q={self.sample_rate}")
        losses: list[float] = []
        steps = 0
        while steps < t.local_steps:
            for ids, mask, labels in dp_loader:
                losses.extend(self._dp_step(gs_model, dp_optimizer, ids, mask, labels, penalty))
                steps += 1
                if progress is not None:
                    progress.update(1)
                if steps >= t.local_steps:
                    break
        history = list(engine.accountant.history)
        gs_model._close()
        if len(history) != 1 or history[0][2] != steps:
            raise RuntimeError(f"Opacus recorded {history} but the client ran {steps} steps at sigma={sigma}")
        ran_sigma, ran_q, ran_steps = history[0]
        mechanism = SubsampledGaussian(
            noise_multiplier=float(ran_sigma),
            sample_rate=float(ran_q),
            steps=int(ran_steps),
            clip_norm=float(p.max_grad_norm),
            delta=float(p.delta),
        )
        return losses, steps, mechanism

    def _dp_step(self, gs_model, dp_optimizer, ids, mask, labels, penalty=None) -> list[float]:
        """One noisy optimizer step on a Poisson-sampled logical batch.

        The batch is sorted by length and cut into physical batches of at most
        ``physical_batch_size``, each trimmed to its own longest example (less padding); Opacus
        clips and accumulates each one (`signal_skip_step`) and adds noise once, at the last.
        An empty batch still makes a noisy step: it runs one example with its loss multiplied
        by zero, so every per-example gradient is exactly zero and only noise is added (skipping
        it would release whether the batch was empty, and Opacus would not count the step).
        ``penalty`` (from `penalty_step`) adds a parameter-only gradient after the noisy step.
        """
        t = self.cfg.training
        n = ids.shape[0]
        weight = 1.0
        if n == 0:
            ids, mask, labels = (x.unsqueeze(0) for x in self.dataset[0])
            n, weight = 1, 0.0
        order = mask.sum(dim=1).argsort()
        chunks = [order[s : s + t.physical_batch_size] for s in range(0, n, t.physical_batch_size)]
        losses = []
        for i, idx in enumerate(chunks):
            dp_optimizer.zero_grad(set_to_none=True)
            batch = trim_batch(ids[idx], mask[idx], labels[idx])
            loss = self._loss(gs_model, batch) * weight
            loss.backward()
            zero_nonfinite_samples(dp_optimizer.params)  # before Opacus clips (in step / pre_step)
            if weight:
                losses.append(float(loss.detach()))
            last = i == len(chunks) - 1
            dp_optimizer.signal_skip_step(do_skip=not last)
            if last and penalty is not None:
                # DPOptimizer.step() is pre_step() then the wrapped optimizer's step(); the
                # penalty's gradient goes in between, after clipping and noise
                if dp_optimizer.pre_step():
                    penalty()
                    dp_optimizer.original_optimizer.step()
            else:
                dp_optimizer.step()
        if dp_optimizer._is_last_step_skipped:
            raise RuntimeError("Opacus skipped the noisy step at the end of a logical batch")
        return losses

    def _train_plain(self, model, optimizer, rnd, progress, penalty=None):
        import torch
        from torch.utils.data import DataLoader

        t = self.cfg.training
        g = torch.Generator().manual_seed(derived_seed(self.cfg.seed, rnd, self.client_id, 2))
        loader = DataLoader(self.dataset, batch_size=t.batch_size, shuffle=True, generator=g)
        losses: list[float] = []
        steps = 0
        while steps < t.local_steps:
            for ids, mask, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                n = ids.shape[0]
                order = mask.sum(dim=1).argsort()
                for s in range(0, n, t.physical_batch_size):
                    idx = order[s : s + t.physical_batch_size]
                    chunk = trim_batch(ids[idx], mask[idx], labels[idx])
                    loss = self._loss(model, chunk)
                    (loss * (len(idx) / n)).backward()
                    losses.append(float(loss.detach()))
                if penalty is not None:
                    penalty()
                optimizer.step()
                steps += 1
                if progress is not None:
                    progress.update(1)
                if steps >= t.local_steps:
                    break
        return losses, steps
