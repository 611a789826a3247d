"""Task "classification" (the embedded default): sequence classification with a head on an encoder.

Records are labelled texts (`privlora.tasks.data`: the embedded Rotten Tomatoes reviews or a
local file); the base model is a Hugging Face sequence classifier whose new head is drawn from
``cfg.seed`` (`privlora.tasks.models`); each record is one row ``(input_ids, attention_mask,
label)`` padded to ``model.max_length``; its loss is the cross-entropy of the head's logits;
evaluation is accuracy and mean cross-entropy on the held-out split. ``privlora predict`` gives
each label's softmax probability (`privlora.tasks.predict`). The audit's canaries: crafted token
sequences with random labels ("tokens", `token_canaries`) or the clients' own examples with
another label ("mislabelled").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from privlora.core.config import DataConfig
from privlora.tasks.base import CanaryError, Task
from privlora.tasks.data import LabelledData

CANARY_TOKENS = 24
"""Tokens of a crafted canary, between its [CLS] and [SEP]."""


def classification_loss(model, batch):
    """The mean cross-entropy of a batch ``(ids, mask, labels)``."""
    import torch.nn.functional as F

    ids, mask, labels = batch
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)


def evaluate_classifier(model, dataset, batch_size: int) -> dict:
    """``accuracy`` and mean cross-entropy ``loss`` of ``model`` on a tokenized dataset."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from privlora.tasks.data import trim_collate

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trim_collate)
    correct, total, loss_sum = 0, 0, 0.0
    with torch.inference_mode():
        for ids, mask, labels in loader:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.shape[0])
    return {"accuracy": correct / total, "loss": loss_sum / total}


def token_canaries(m: int, tokenizer, max_length: int, num_labels: int, rng: np.random.Generator):
    """m random token sequences: [CLS] + CANARY_TOKENS uniform non-special tokens + [SEP], each
    with a uniformly random label; ``(ids, mask, labels)`` padded to ``max_length``."""
    import torch

    length = min(CANARY_TOKENS, max_length - 2)
    if length < 1:
        raise CanaryError(f"model.max_length = {max_length} leaves no room for a canary's tokens; use at least 8")
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # BERT wordpieces: leave out [unusedN]
        names = tokenizer.convert_ids_to_tokens(vocab.tolist())
        vocab = vocab[[not (n.startswith("[") and n.endswith("]")) for n in names]]
    ids = torch.zeros((m, max_length), dtype=torch.long)
    if tokenizer.pad_token_id:
        ids.fill_(tokenizer.pad_token_id)
    mask = torch.zeros((m, max_length), dtype=torch.long)
    body = rng.choice(vocab, size=(m, length))
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    col = 0
    if cls is not None:
        ids[:, 0] = cls
        col = 1
    ids[:, col : col + length] = torch.from_numpy(body)
    end = col + length
    if sep is not None:
        ids[:, end] = sep
        end += 1
    mask[:, :end] = 1
    labels = torch.from_numpy(rng.integers(0, num_labels, size=m)).long()
    return ids, mask, labels


class ClassificationTask(Task):
    """Sequence classification (``model.task = "classification"``)."""

    card_task = "sequence-classification"
    peft_task_type = "SEQ_CLS"
    canary_designs = ("tokens", "mislabelled")

    def load_records(self, data: DataConfig | None = None) -> LabelledData:
        from privlora.tasks.data import load_labelled_data

        return load_labelled_data(self.cfg.data if data is None else data)

    def load_tokenizer(self):
        from privlora.tasks.models import load_tokenizer

        return load_tokenizer(self.cfg.model.path)

    def load_model(self, num_labels: int):
        """The base classifier; its new head drawn from ``cfg.seed``."""
        from privlora.tasks.models import load_classifier

        m = self.cfg.model
        return load_classifier(m.path, num_labels, self.cfg.seed, m.pooling)

    def train_dataset(self, records: LabelledData, tokenizer):
        """(input_ids, attention_mask, label) per record, padded to ``model.max_length``."""
        from privlora.tasks.data import tokenize

        return tokenize(records, tokenizer, self.cfg.model.max_length)

    def example_losses(self, model, batch):
        import torch.nn.functional as F

        ids, mask, labels = batch
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")

    def loss(self, model, batch):
        return classification_loss(model, batch)

    def evaluate(self, model, dataset) -> dict:
        return evaluate_classifier(model, dataset, self.cfg.training.eval_batch_size)

    def model_card(self, label_names: list[str]) -> dict[str, Any]:
        from privlora.tasks.models import MODEL_CARD_FORMAT, base_model_identity

        cfg = self.cfg
        return {
            "format": MODEL_CARD_FORMAT,
            "task": self.card_task,
            "base_model": base_model_identity(cfg.model.path),
            "num_labels": len(label_names),
            "label_names": list(label_names),
            "max_length": cfg.model.max_length,
            "pooling": cfg.model.pooling,
            "text_column": cfg.data.text_column,
            "adapter": "adapter",
        }

    @classmethod
    def check_card(cls, card: dict[str, Any], path: Path) -> dict[str, Any]:
        from privlora.tasks.models import ModelError

        names = card.get("label_names")
        if not (isinstance(names, list) and len(names) == card.get("num_labels") and len(names) >= 2):
            raise ModelError(f"{path}: label_names and num_labels disagree; the file was edited or damaged")
        return card

    @classmethod
    def load_base_for_card(cls, card: dict[str, Any], run_dir: Path):
        """The base classifier with the run's number of labels and its label names in
        ``config.id2label``, its tokenizer cut at the run's max length, pooled as the run was."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from privlora.tasks.models import ModelError, quiet_hf, resolve_model_path, use_mean_pooling

        names = [str(n) for n in card["label_names"]]
        quiet_hf()
        path = resolve_model_path(card["base_model"])
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.path: could not load the run's base model {card['base_model']!r} from {path}: {exc}") from exc
        tokenizer.model_max_length = int(card.get("max_length", tokenizer.model_max_length))
        model.config._name_or_path = card["base_model"]
        if card.get("pooling", "model") == "mean":
            use_mean_pooling(model)
        return model.eval(), tokenizer, names

    @classmethod
    def predict(cls, model, tokenizer, names: list[str], texts: list[str], batch_size: int = 32) -> list:
        from privlora.tasks.predict import predict

        return predict(model, tokenizer, names, texts, batch_size=batch_size)

    def crafted_canaries(self, m: int, num_labels: int, rng: np.random.Generator):
        return token_canaries(m, self.load_tokenizer(), self.cfg.model.max_length, num_labels, rng)

    def mislabel(self, examples: tuple, num_labels: int, rng: np.random.Generator) -> tuple:
        """Each label shifted by 1..C-1 (uniform), so it is always another class."""
        import torch

        ids, mask, labels = examples
        shift = torch.from_numpy(rng.integers(1, num_labels, size=len(labels))).long()
        return ids, mask, (labels + shift) % num_labels
