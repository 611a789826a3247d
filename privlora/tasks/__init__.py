"""What a task decides, in one place: data, tokenizer, base model, tokenization, loss, evaluation.

``model.task = "classification"`` (the embedded default: `privlora.tasks.models`, `privlora.tasks.data`) or
``"causal-lm"`` (`privlora.tasks.causal_lm`, `privlora.tasks.instructions`). Strategies, DP, secure
aggregation and the ledger never ask which task runs: they see LoRA factors, sums and
mechanisms. Every party of a run (simulation, Flower nodes, the Flower server) calls these.
"""

from __future__ import annotations

from typing import Callable

from privlora.core.config import ExperimentConfig

CAUSAL = "causal-lm"


def is_causal(cfg: ExperimentConfig) -> bool:
    return cfg.model.task == CAUSAL


def load_records(cfg: ExperimentConfig, data=None):
    """The run's records (`LabelledData`): labelled texts, or instruction records; ``data``
    (a `DataConfig`) replaces ``cfg.data`` (a node reading its own file)."""
    data = cfg.data if data is None else data
    if is_causal(cfg):
        from privlora.tasks.instructions import load_instruction_data

        return load_instruction_data(data)
    from privlora.tasks.data import load_labelled_data

    return load_labelled_data(data)


def load_tokenizer(cfg: ExperimentConfig):
    if is_causal(cfg):
        from privlora.tasks.causal_lm import load_causal_tokenizer

        return load_causal_tokenizer(cfg.model.path)
    from privlora.tasks.models import load_tokenizer as load

    return load(cfg.model.path)


def load_model(cfg: ExperimentConfig, num_labels: int):
    """The base model of the run (its new classification head drawn from ``cfg.seed``)."""
    if is_causal(cfg):
        from privlora.tasks.causal_lm import load_causal_model

        return load_causal_model(cfg.model.path, cfg.seed)
    from privlora.tasks.models import load_classifier

    return load_classifier(cfg.model.path, num_labels, cfg.seed, cfg.model.pooling)


def tokenize_train(cfg: ExperimentConfig, data, tokenizer):
    """A client's training set: a TensorDataset of (input_ids, attention_mask, labels)."""
    if is_causal(cfg):
        from privlora.tasks.causal_lm import tokenize_causal

        return tokenize_causal(data, tokenizer, cfg.model.max_length, cfg.model.system_prompt, cfg.model.end_of_turn_loss)
    from privlora.tasks.data import tokenize

    return tokenize(data, tokenizer, cfg.model.max_length)


def tokenize_heldout(cfg: ExperimentConfig, data, tokenizer):
    """The server's evaluation set (for "causal-lm", one sequence per allowed answer)."""
    if is_causal(cfg):
        from privlora.tasks.causal_lm import tokenize_causal_eval

        return tokenize_causal_eval(data, tokenizer, cfg.model.max_length, cfg.model.system_prompt)
    from privlora.tasks.data import tokenize

    return tokenize(data, tokenizer, cfg.model.max_length)


def classification_loss(model, batch):
    import torch.nn.functional as F

    ids, mask, labels = batch
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)


def batch_loss(cfg: ExperimentConfig) -> Callable:
    """``loss(model, (ids, mask, labels))``: the mean over the batch of each record's loss."""
    if is_causal(cfg):
        from privlora.tasks.causal_lm import causal_loss

        return causal_loss
    return classification_loss


def evaluate(cfg: ExperimentConfig, model, dataset) -> dict:
    """``accuracy`` (None for open-ended instruction data), ``loss`` and, for "causal-lm",
    ``perplexity`` of ``model`` on a `tokenize_heldout` set."""
    if is_causal(cfg):
        from privlora.tasks.causal_lm import evaluate_causal

        return evaluate_causal(model, dataset, cfg.training.eval_batch_size)
    return evaluate_classifier(model, dataset, cfg.training.eval_batch_size)


def evaluate_classifier(model, dataset, batch_size: int) -> dict:
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
