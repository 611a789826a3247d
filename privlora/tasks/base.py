"""`Task`: everything a task decides, behind one small interface.

A task turns a data source into records, records into model inputs, a model's outputs into a
per-example loss and an evaluation, and a trained adapter into something a user can load. The
round engine, the server, the clients, the report and the audit ask the run's task
(`privlora.tasks.task_for(cfg)`) and never which task it is; strategies, DP-SGD, secure
aggregation and the ledger do not see it at all: they see LoRA factors, sums and mechanisms.

A task object is built for one config (``Task(cfg)``) by every party of a run: the in-process
simulation, each Flower node and the Flower server. It must hold no state a run depends on
beyond what ``cfg`` and its own methods' arguments give (two parties build two objects).

Contracts the rest of privlora relies on (units and shapes):

- **Records** (`load_records`) are a `privlora.tasks.data.LabelledData`: ``texts`` (one entry
  per record: whatever `train_dataset` reads), integer ``labels`` 0..C-1 (``C =
  len(label_names)``; they drive the Dirichlet partition and the majority baseline),
  optional ``groups`` (the natural partition) and ``label_names``.
- **A training set** (`train_dataset`) is a ``torch.utils.data.TensorDataset`` of exactly three
  tensors ``(inputs, mask, targets)``, one row per record. Under DP each row is one record of
  the client's dataset: Opacus samples rows (Poisson), clips each row's gradient and adds noise.
  The client sorts a batch by ``mask.sum(1)``, cuts it into physical batches and drops the
  columns where ``mask`` is 0 in every row (`privlora.tasks.data.trim_batch`): right-pad
  variable-length inputs, give fixed-width inputs a mask of ones. ``targets`` is ``(N,)`` or
  the shape of ``inputs`` (per position; trimmed with them).
- **The loss** (`loss`) of a batch is the mean over its rows of each row's own loss
  (`example_losses`, shape ``(b,)``): a row's loss may depend on that row alone (no batch
  statistics, no batch norm), or per-sample gradients, and with them the DP guarantee, are wrong.
- **An evaluation** (`evaluate`) returns ``{"accuracy": float | None, "loss": float, ...}``: the
  held-out accuracy (None when the task has none) and the mean per-example loss, plus any
  metrics of the task's own (floats). Each extra key ``k`` becomes ``test_k`` in
  ``metrics.jsonl`` (`metrics_record`), a column of report.md's table and an entry of
  report.json's ``task_metrics``.
- **The model** (`load_model`) is a ``torch.nn.Module`` whose trainable part is a LoRA adapter
  made by peft (`make_adapter`: ``lora.target_modules`` get LoRA factors, ``lora.modules_to_save``
  are trained whole). It is loaded frozen; every party loads the same weights; torch's
  generator is seeded with ``cfg.seed`` by the time it returns (a new head is drawn from it).

The audit (`privlora audit`) needs canaries a task can make (`crafted_canaries`,
`mislabel`); a task that has none refuses with a clear error (`check_canaries`).

What a run folder's ``model.json`` holds is the task's (`model_card`); the methods that read it
back (`check_card`, `load_base_for_card`, `predict`) are class methods, since ``privlora
predict`` and `privlora.tasks.models.load_base_for_run` read model.json without a config.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from privlora.core.config import DataConfig, ExperimentConfig
from privlora.core.errors import UserError
from privlora.tasks.data import LabelledData


def check_delta(cfg: ExperimentConfig, client_sizes: list[int]) -> None:
    """Refuse ``privacy.delta`` above 1/n of the smallest client's n training records (such a
    guarantee allows leaking a whole record with probability delta), naming the value, n and the
    fix; with ``privacy.allow_large_delta`` the run goes on (one warning is printed at start-up)."""
    from privlora.core.config import ConfigError

    p = cfg.privacy
    sizes = [n for n in client_sizes if n > 0]
    if not p.enabled or not sizes or p.allow_large_delta:
        return
    n = min(sizes)
    if p.delta > 1.0 / n:
        k = client_sizes.index(n)
        suggestion = 10 ** math.floor(math.log10(0.1 / n))
        raise ConfigError(
            f"privacy.delta: {p.delta:g} is above 1/n = {1.0 / n:.3g} for the smallest client (client {k}, n = {n} training "
            f"records): an (epsilon, delta) guarantee then allows leaking a whole record with probability delta; lower "
            f"privacy.delta well below 1/n (e.g. privacy.delta = {suggestion:g}), or set privacy.allow_large_delta = true "
            "to accept it"
        )


class CanaryError(UserError):
    """The audit cannot make canaries for this task (or this design), or not at these sizes."""


class Task(ABC):
    """What a task decides. Subclass it, implement the four abstract methods (`load_records`,
    `load_model`, `train_dataset`, `example_losses`), override what differs from the defaults,
    and register it: ``privlora.tasks.register_task("my-task", MyTask)``; then
    ``model.task = "my-task"`` runs it."""

    card_task: ClassVar[str] = ""
    """The ``"task"`` value of this task's model.json (default: its registered name)."""
    peft_task_type: ClassVar[str | None] = None
    """peft's ``task_type`` for the adapter ("SEQ_CLS", "CAUSAL_LM"; None: a plain `PeftModel`
    around any torch module)."""
    accuracy_label: ClassVar[str] = "Accuracy"
    """How report.md names ``accuracy`` (e.g. "Answer accuracy (...)")."""
    loss_label: ClassVar[str] = "held-out loss"
    """The y label of report.md's plot when the task has no accuracy."""
    unit_of_privacy: ClassVar[str | None] = None
    """report.json's ``privacy.unit_of_privacy`` in this task's words; None = the ledger's
    default (one record in one client's local dataset)."""
    metric_formats: ClassVar[dict[str, str]] = {}
    """Format spec of each task metric in report.md (key as in metrics.jsonl, e.g.
    ``{"test_perplexity": ".3f"}``); default ".4f"."""
    canary_designs: ClassVar[tuple[str, ...]] = ()
    """The `privlora audit --design` values this task can make canaries for."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.model.task

    # ------------------------------------------------------------------ data
    @abstractmethod
    def load_records(self, data: DataConfig | None = None) -> LabelledData:
        """Every record of ``data`` (default ``cfg.data``; a node passes its own file's config),
        before any split. Raise `privlora.tasks.data.DataError` naming the field and the fix."""

    def split(self, records: LabelledData) -> tuple[LabelledData, LabelledData]:
        """(training records, the records the server evaluates on), the same for every party:
        by default ``data.test_fraction`` held out with ``cfg.seed`` (`privlora.tasks.data.run_split`)."""
        from privlora.tasks.data import run_split

        return run_split(records, self.cfg.data, self.cfg.seed)

    def partition(self, train: LabelledData) -> list[np.ndarray]:
        """One index array per client (``data.num_clients``), covering ``train`` exactly once: by
        default ``data.partition`` (iid, dirichlet, natural; `privlora.tasks.partition`)."""
        from privlora.tasks.partition import partition

        d = self.cfg.data
        shards = partition(train, d.partition, d.num_clients, self.cfg.seed, d.dirichlet_alpha)
        check_delta(self.cfg, [len(s) for s in shards])
        return shards

    # ------------------------------------------------------------------ model
    def load_tokenizer(self) -> Any:
        """What turns records into inputs, handed to `train_dataset` and `eval_dataset` (a
        Hugging Face tokenizer for text); None when the task needs none (the default)."""
        return None

    @abstractmethod
    def load_model(self, num_labels: int) -> Any:
        """The frozen base model (a ``torch.nn.Module`` in eval mode) for ``num_labels`` classes;
        the same weights for every party, and torch's generator seeded with ``cfg.seed`` on return."""

    def make_adapter(self, base_model: Any, rank: int) -> Any:
        """A copy of ``base_model`` with a fresh LoRA adapter of ``rank`` (peft: ``lora.target_modules``
        get factors, ``lora.modules_to_save`` train whole); see `privlora.tasks.adapters`."""
        from privlora.tasks.adapters import make_peft_model

        return make_peft_model(base_model, self.cfg, rank, task_type=self.peft_task_type)

    # ------------------------------------------------------------------ examples
    @abstractmethod
    def train_dataset(self, records: LabelledData, tokenizer: Any) -> Any:
        """A client's training set: a TensorDataset ``(inputs, mask, targets)``, one row per
        record (see the module's contract)."""

    def eval_dataset(self, records: LabelledData, tokenizer: Any) -> Any:
        """The server's held-out set, in whatever shape `evaluate` reads (default: `train_dataset`)."""
        return self.train_dataset(records, tokenizer)

    # ------------------------------------------------------------------ loss
    @abstractmethod
    def example_losses(self, model: Any, batch: tuple) -> Any:
        """Each row's loss, a ``(b,)`` tensor, for a batch ``(inputs, mask, targets)`` of a
        `train_dataset` (trimmed); each row's value depends on that row alone."""

    def loss(self, model: Any, batch: tuple) -> Any:
        """The training loss of a batch: the mean over its rows of `example_losses` (a scalar
        tensor; Opacus's per-sample gradients are those of each row's term)."""
        return self.example_losses(model, batch).mean()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, dataset: Any) -> dict[str, float | None]:
        """``accuracy`` (None by default), ``loss`` (the mean of `example_losses`) and the task's
        own metrics, of ``model`` on an `eval_dataset`, in batches of ``training.eval_batch_size``."""
        import torch
        from torch.utils.data import DataLoader

        from privlora.tasks.data import trim_collate

        model.eval()
        total, n = 0.0, 0
        with torch.inference_mode():
            for batch in DataLoader(dataset, batch_size=self.cfg.training.eval_batch_size, collate_fn=trim_collate):
                losses = self.example_losses(model, batch)
                total += float(losses.sum())
                n += int(losses.shape[0])
        return {"accuracy": None, "loss": total / max(n, 1)}

    def metrics_record(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        """The fields an `evaluate` result adds to a metrics.jsonl line beyond ``test_accuracy``
        and ``test_loss``: each other key ``k`` as ``test_k``."""
        return {f"test_{k}": v for k, v in evaluation.items() if k not in ("accuracy", "loss")}

    # ------------------------------------------------------------------ samples
    def sample_prompts(self, heldout: LabelledData) -> list[dict[str, str]] | None:
        """A few fixed held-out inputs whose outputs report.md shows, untrained and final
        (``samples.json``); None (the default) = no samples."""
        return None

    def generate_samples(self, model: Any, tokenizer: Any, prompts: list[dict[str, str]]) -> list[str]:
        """``model``'s output for each of `sample_prompts`, as text."""
        raise NotImplementedError(f"task {self.name!r} shows no samples")

    def samples_section(self, record: dict[str, Any]) -> list[str]:
        """report.md's lines for ``samples.json`` (``{"prompts": [...], "untrained": [...],
        "final": [...]}``); KeyError or TypeError if it is damaged."""
        return []

    # ------------------------------------------------------------------ report
    def metric_columns(self, rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        """``(metrics.jsonl key, column title, format)`` of every task metric some round has."""
        keys = sorted({k for r in rows for k, v in r.items()
                       if k.startswith("test_") and k not in ("test_accuracy", "test_loss") and v is not None})
        return [(k, k[len("test_"):].replace("_", " "), self.metric_formats.get(k, ".4f")) for k in keys]

    def accuracy_lines(self, rows: list[dict[str, Any]], final: dict[str, Any], where: str) -> list[str]:
        """report.md's accuracy line (none when the task has no accuracy): the final round's
        against the untrained model's and the majority class's."""
        first = rows[0]
        if final["test_accuracy"] is None:
            return []
        majority = "" if first.get("majority_baseline") is None else f"; always predicting the majority class {first['majority_baseline']:.4f}"
        return [f"- {self.accuracy_label} on {where}: **{final['test_accuracy']:.4f}** {self.after_round(final)} "
                f"(untrained model {first['test_accuracy']:.4f}{majority})."]

    def after_round(self, final: dict[str, Any]) -> str:
        """``after round 6``, or ``after round 1 of 6`` when the run has not run all its rounds."""
        planned = self.cfg.federation.rounds
        return f"after round {final['round']}" + (f" of {planned}" if final["round"] < planned else "")

    def quality_lines(self, rows: list[dict[str, Any]], final: dict[str, Any], where: str) -> list[str]:
        """report.md's lines on held-out quality (``where``: what it was measured on): the
        accuracy line, then one line per task metric (`metric_columns`)."""
        first, parts = rows[0], self.accuracy_lines(rows, final, where)
        for key, title, fmt in self.metric_columns(rows):
            if final.get(key) is not None:
                before = "-" if first.get(key) is None else format(first[key], fmt)
                parts.append(f"- Held-out {title} on {where}: **{format(final[key], fmt)}** {self.after_round(final)} "
                             f"(untrained model {before}).")
        return parts

    # ------------------------------------------------------------------ model.json and predict
    def model_card(self, label_names: list[str]) -> dict[str, Any]:
        """What ``model.json`` holds: enough to load and use the trained model. By default the
        base model is ``model.path`` (a folder that exists: its absolute path; anything else,
        which only the task can read, as configured), the label names and the max length."""
        from privlora.tasks.models import MODEL_CARD_FORMAT, base_model_identity

        path = self.cfg.model.path
        return {
            "format": MODEL_CARD_FORMAT,
            "task": self.card_task or self.name,
            "base_model": base_model_identity(path) if Path(path).expanduser().exists() else path,
            "label_names": list(label_names),
            "max_length": self.cfg.model.max_length,
            "adapter": "adapter",
        }

    @classmethod
    def check_card(cls, card: dict[str, Any], path: Path) -> dict[str, Any]:
        """``card`` (read from ``path``) if it is usable; ModelError naming the file otherwise."""
        return card

    @classmethod
    def load_base_for_card(cls, card: dict[str, Any], run_dir: Path) -> tuple[Any, Any, list[str]]:
        """``(base model, tokenizer, label names)`` the run in ``run_dir`` started from, for
        ``PeftModel.from_pretrained(base, run_dir / "adapter")``."""
        from privlora.tasks.models import ModelError

        raise ModelError(f"{run_dir}: task {card.get('task')!r} cannot reload its base model from model.json; "
                         "build the base model as the task does and load the adapter with PeftModel.from_pretrained")

    @classmethod
    def predict(cls, model: Any, tokenizer: Any, names: list[str], texts: list[str], batch_size: int = 32) -> list:
        """`privlora.tasks.predict.Prediction` per text (``privlora predict``)."""
        from privlora.tasks.models import ModelError

        raise ModelError(f"privlora predict has no predictions for task {cls.card_task or cls.__name__!r}")

    # ------------------------------------------------------------------ audit
    def check_canaries(self, design: str | None = None) -> None:
        """Refuse, with `CanaryError` naming ``model.task``, an audit this task has no canaries
        for (any design, or ``design``)."""
        if not self.canary_designs:
            raise CanaryError(f"model.task: privlora audit has no canaries for task {self.name!r}; run `privlora run` "
                              "without an audit, or give the task crafted_canaries and mislabel")
        if design is not None and design not in self.canary_designs:
            raise CanaryError(f"--design: task {self.name!r} has canaries of design {', '.join(self.canary_designs)} "
                              f"only, found {design!r}")

    def crafted_canaries(self, m: int, num_labels: int, rng: np.random.Generator) -> tuple:
        """Design "tokens": ``m`` crafted records unlike the data, as ``(inputs, mask, targets)``
        rows of a `train_dataset`, drawn from ``rng`` alone."""
        self.check_canaries("tokens")
        raise NotImplementedError

    def mislabel(self, examples: tuple, num_labels: int, rng: np.random.Generator) -> tuple:
        """Design "mislabelled": ``examples`` (rows of a `train_dataset`) with every target
        changed to another class, drawn from ``rng``."""
        self.check_canaries("mislabelled")
        raise NotImplementedError
