"""Tasks: bring your own model and data.

Everything a task decides lives in one class, a `Task` (`privlora.tasks.base`, where each
method's shapes and units are written down): loading and partitioning records, the tokenizer
and the base model, the trainable LoRA adapter, the per-example loss, evaluation and its
metrics, what model.json says and how ``privlora predict`` uses it, a few sample outputs for
the report, and the audit's canaries (or a clear refusal). The round engine, the server, the
clients, the report and the audit ask the run's task, ``task_for(cfg)``; strategies, DP-SGD,
secure aggregation and the ledger never see it. Two tasks are built in:

- ``model.task = "classification"`` (the embedded default; `privlora.tasks.classification`):
  a head on an encoder, labelled texts, accuracy;
- ``model.task = "causal-lm"`` (`privlora.tasks.causal_lm`): instruction tuning of a generative
  model, loss on the response tokens, perplexity and answer accuracy, sample generations.

A task of your own is a subclass registered under a name, in the process that runs it. Four
methods are required; the rest (split and partition by ``data.*``, a peft adapter on
``lora.target_modules``, loss = mean of the per-example losses, evaluation = mean loss, no
samples, no canaries) have defaults. A three-class task on a small torch model::

    import torch
    from privlora.tasks import Task, register_task
    from privlora.tasks.data import LabelledData

    class Colours(Task):
        def load_records(self, data=None):          # a LabelledData: texts, labels 0..C-1
            return LabelledData(texts, labels, groups=None, label_names=["red", "green", "blue"])

        def load_model(self, num_labels):           # frozen; LoRA goes on lora.target_modules
            torch.manual_seed(self.cfg.seed)
            return MyNet(num_labels).eval()

        def train_dataset(self, records, tokenizer):  # rows (inputs, mask, targets)
            return torch.utils.data.TensorDataset(ids, mask, torch.as_tensor(records.labels))

        def example_losses(self, model, batch):     # (b,): one loss per record, for DP-SGD
            ids, mask, labels = batch
            logits = model(input_ids=ids, attention_mask=mask)
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

        def evaluate(self, model, dataset):         # optional: extra keys become test_<key>
            return {"accuracy": acc, "loss": loss, "macro_f1": f1}

    register_task("colours", Colours)
    cfg = config_from_dict({"model": {"task": "colours", "path": "colours-net"},
                            "lora": {"target_modules": ["hidden"], "modules_to_save": ["head"]}, ...})
    privlora.transports.inprocess.run_experiment(cfg, "runs/colours")

tests/test_custom_task.py runs such a task (sentences of colour words, a word-list tokenizer, a
small net with LoRA on its hidden layer) with DP, secure aggregation and the ledger, and checks
the run folder with `privlora verify`'s code.

Registration lasts for the process: run, report (`privlora.reporting.report.write_report`) and
predict a custom task from a Python process that registered it; every process of a Flower
deployment would have to register it too. A task that has no canaries is refused by
``privlora audit`` (override `Task.check_canaries`, `crafted_canaries` and `mislabel` to give it
some); one without ``privlora predict`` refuses it (`Task.load_base_for_card`, `Task.predict`).

The functions below are shortcuts for scripts and benchmarks: each is one method of
``task_for(cfg)``.
"""

from __future__ import annotations

from typing import Callable

from privlora.core.config import ExperimentConfig
from privlora.tasks.base import CanaryError, Task
from privlora.tasks.causal_lm import CausalLMTask
from privlora.tasks.classification import ClassificationTask
from privlora.tasks.registry import (
    TaskRegistrationError,
    register_task,
    registered_tasks,
    task_class,
    task_for,
    task_for_card,
    unregister_task,
)

register_task("classification", ClassificationTask)
register_task("causal-lm", CausalLMTask)


def load_records(cfg: ExperimentConfig, data=None):
    """The run's records (`LabelledData`); ``data`` (a `DataConfig`) replaces ``cfg.data`` (a
    node reading its own file)."""
    return task_for(cfg).load_records(data)


def load_tokenizer(cfg: ExperimentConfig):
    return task_for(cfg).load_tokenizer()


def load_model(cfg: ExperimentConfig, num_labels: int):
    """The base model of the run (a new classification head drawn from ``cfg.seed``)."""
    return task_for(cfg).load_model(num_labels)


def tokenize_train(cfg: ExperimentConfig, data, tokenizer):
    """A client's training set: a TensorDataset of (input_ids, attention_mask, labels)."""
    return task_for(cfg).train_dataset(data, tokenizer)


def tokenize_heldout(cfg: ExperimentConfig, data, tokenizer):
    """The server's evaluation set (for "causal-lm", one sequence per allowed answer)."""
    return task_for(cfg).eval_dataset(data, tokenizer)


def batch_loss(cfg: ExperimentConfig) -> Callable:
    """``loss(model, (ids, mask, labels))``: the mean over the batch of each record's loss."""
    return task_for(cfg).loss


def evaluate(cfg: ExperimentConfig, model, dataset) -> dict:
    """``accuracy`` (None for open-ended instruction data), ``loss`` and the task's own metrics
    (for "causal-lm", ``perplexity``) of ``model`` on a `tokenize_heldout` set."""
    return task_for(cfg).evaluate(model, dataset)


__all__ = [
    "CanaryError", "CausalLMTask", "ClassificationTask", "Task", "TaskRegistrationError", "batch_loss", "evaluate",
    "load_model", "load_records", "load_tokenizer", "register_task", "registered_tasks", "task_class", "task_for",
    "task_for_card", "tokenize_heldout", "tokenize_train", "unregister_task",
]
