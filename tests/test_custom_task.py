"""A task of its own, brought through the public API: privlora's files are not touched.

The task (`Colours`, below) is a three-class toy problem: a record is a short sentence of colour
words and filler words, its label the colour it names most often. The model is a small torch
network built in memory (a frozen embedding, mean-pooled over the words, a hidden Linear layer
that gets LoRA factors and a Linear head trained whole); the tokenizer is a word list. The task
reports a metric of its own, the macro-averaged F1 score.

It is registered with `privlora.tasks.register_task` and run like any config: DP-SGD on every
client, secure aggregation of the updates, the privacy ledger; then `privlora verify`'s code
passes on the run folder, the task's metric is in metrics.jsonl, report.json and report.md, the
saved adapter reloaded on a fresh base gives the same macro F1 by an independent count, and every
client's epsilon is recomputed from the ledger with dp_accounting directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from privlora.core.config import ConfigError, config_from_dict
from privlora.tasks import Task, TaskRegistrationError, register_task, unregister_task
from privlora.tasks.data import LabelledData

COLOURS = ["red", "green", "blue"]
FILLER = ["the", "a", "very", "and", "of", "light", "dark", "bright"]
VOCAB = ["[PAD]"] + COLOURS + FILLER
WORDS = 8
NAME = "toy-colours"


def colour_records(n: int, seed: int) -> LabelledData:
    """``n`` sentences of WORDS words: colour counts drawn so that one colour leads, then
    shuffled among filler words; the label is the leading colour."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(3))
        counts = np.zeros(3, dtype=int)
        counts[label] = int(rng.integers(2, 4))
        for other in (c for c in range(3) if c != label):
            counts[other] = int(rng.integers(0, counts[label]))
        words = [COLOURS[c] for c in range(3) for _ in range(counts[c])]
        words += list(rng.choice(FILLER, size=WORDS - len(words)))
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    return LabelledData(texts=texts, labels=np.asarray(labels, dtype=np.int64), groups=None, label_names=list(COLOURS))


def colour_net(num_labels: int, seed: int):
    import torch

    class ColourNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(len(VOCAB), 16, padding_idx=0)
            self.hidden = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, num_labels)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
            return self.head(torch.tanh(self.hidden(pooled)))

    torch.manual_seed(seed)
    model = ColourNet().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def macro_f1(predicted: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """The mean over classes of 2 TP / (2 TP + FP + FN) (0 for a class never predicted nor present)."""
    scores = []
    for c in range(classes):
        tp = np.sum((predicted == c) & (truth == c))
        fp = np.sum((predicted == c) & (truth != c))
        fn = np.sum((predicted != c) & (truth == c))
        scores.append(0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


class Colours(Task):
    """The toy task: everything it decides, and nothing else."""

    def load_records(self, data=None):
        return colour_records(600, seed=11)

    def load_tokenizer(self):
        return {w: i for i, w in enumerate(VOCAB)}

    def load_model(self, num_labels):
        return colour_net(num_labels, self.cfg.seed)

    def train_dataset(self, records, tokenizer):
        import torch
        from torch.utils.data import TensorDataset

        width = self.cfg.model.max_length
        ids = torch.zeros((len(records), width), dtype=torch.long)
        for i, text in enumerate(records.texts):
            row = [tokenizer[w] for w in text.split()][:width]
            ids[i, : len(row)] = torch.tensor(row)
        return TensorDataset(ids, (ids != 0).long(), torch.as_tensor(records.labels, dtype=torch.long))

    def example_losses(self, model, batch):
        import torch.nn.functional as F

        ids, mask, labels = batch
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask), labels, reduction="none")

    def evaluate(self, model, dataset):
        import torch

        ids, mask, labels = dataset.tensors
        model.eval()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask)
            loss = float(torch.nn.functional.cross_entropy(logits, labels))
        predicted = logits.argmax(-1).numpy()
        truth = labels.numpy()
        return {"accuracy": float(np.mean(predicted == truth)), "loss": loss,
                "macro_f1": macro_f1(predicted, truth, len(COLOURS))}


@pytest.fixture()
def registered():
    register_task(NAME, Colours)
    yield Colours
    unregister_task(NAME)


def colours_cfg():
    return config_from_dict({
        "name": "colours", "seed": 5, "threads": 1,
        "model": {"task": NAME, "path": "colour-net", "max_length": WORDS},
        "data": {"source": "colours", "num_clients": 4, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["hidden"], "modules_to_save": ["head"]},
        "federation": {"strategy": "ffa", "rounds": 3, "clients_per_round": 3, "server_momentum": 0.0},
        "training": {"local_steps": 4, "batch_size": 40, "physical_batch_size": 40, "lr": 0.5, "head_lr": 1.0},
        "privacy": {"enabled": True, "noise_multiplier": 1.5},
        "secagg": {"enabled": True, "bits": 64, "value_bound": 8.0, "max_weight": 1000.0},
    })


def test_an_unregistered_task_is_refused_by_name_and_a_registered_one_is_a_valid_config(registered):
    unregister_task(NAME)
    with pytest.raises(ConfigError, match="model.task: 'toy-colours' is not one of 'classification', 'causal-lm'"):
        colours_cfg()
    register_task(NAME, Colours)
    assert colours_cfg().model.task == NAME


def test_an_abstract_task_or_a_built_in_name_cannot_be_registered():
    class Half(Task):
        def load_records(self, data=None):
            return colour_records(10, 0)

    with pytest.raises(TaskRegistrationError, match="abstract; implement example_losses, load_model, train_dataset"):
        register_task("half", Half)
    with pytest.raises(TaskRegistrationError, match="'classification' is a built-in task"):
        register_task("classification", Colours, replace=True)


def test_a_custom_task_federates_with_dp_secure_aggregation_and_the_ledger(registered, tmp_path):
    import dp_accounting
    import torch
    from dp_accounting.pld import pld_privacy_accountant
    from peft import PeftModel

    from accounting import Ledger
    from accounting.verify import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = colours_cfg()
    out = tmp_path / "run"
    final = run_experiment(cfg, out, progress=False)

    # the run folder's contract holds, and privlora verify's checks pass on it
    for name in ("config.toml", "model.json", "metrics.jsonl", "ledger.jsonl", "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoint").is_dir()
    assert verify_run(out).ok
    card = json.loads((out / "model.json").read_text())
    assert card["task"] == NAME and card["label_names"] == COLOURS and card["base_model"] == "colour-net"

    # every round was summed under secure aggregation, with DP on every client
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(len(r["secagg"]["survivors"]) == 3 for r in rows[1:])

    # the task's own metric is in every metrics line, in report.json and in report.md's table
    assert all(0.0 <= r["test_macro_f1"] <= 1.0 for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == NAME
    assert report["task_metrics"]["test_macro_f1"]["final"] == rows[-1]["test_macro_f1"] == final["test_macro_f1"]
    assert report["task_metrics"]["test_macro_f1"]["per_round"] == [r["test_macro_f1"] for r in rows]
    md = (out / "report.md").read_text()
    assert "| macro f1 |" in md and f"Held-out macro f1 on the held-out test split: **{final['test_macro_f1']:.4f}**" in md
    assert final["test_accuracy"] > rows[0]["test_accuracy"]  # it learned something, under DP

    # the saved adapter on a fresh base scores the server's macro F1, counted independently
    task = Colours(cfg)
    _, heldout = task.split(task.load_records())
    ds = task.train_dataset(heldout, task.load_tokenizer())
    model = PeftModel.from_pretrained(colour_net(3, cfg.seed), str(out / "adapter")).eval()
    with torch.no_grad():
        predicted = model(input_ids=ds.tensors[0], attention_mask=ds.tensors[1]).argmax(-1).numpy()
    assert macro_f1(predicted, heldout.labels, 3) == pytest.approx(final["test_macro_f1"], abs=1e-9)

    # each client's epsilon, recomputed from the ledger's mechanisms with dp_accounting's PLD
    ledger = Ledger.open(out / "ledger.jsonl")
    assert {c.client for c in ledger.charges} == {0, 1, 2, 3}
    for k in range(4):
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for charge in (c for c in ledger.charges if c.client == k):
            m = charge.mechanism
            event = dp_accounting.PoissonSampledDpEvent(m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier))
            acc.compose(event, m.steps)
        assert final["epsilon"][str(k)] == pytest.approx(acc.get_epsilon(cfg.privacy.delta), abs=0.02)
    assert report["privacy"]["enabled"] and final["epsilon_max"] == max(final["epsilon"].values())


def test_the_audit_refuses_a_task_without_canaries_before_anything_runs(registered, tmp_path):
    from privlora.commands.audit import AuditError, run_audit

    with pytest.raises(AuditError, match="privlora audit has no canaries for task 'toy-colours'"):
        run_audit(colours_cfg(), tmp_path / "audit", canaries=20, seed=1, progress=False)
    assert not (tmp_path / "audit").exists() and not (tmp_path / "audit.auditor").exists()
