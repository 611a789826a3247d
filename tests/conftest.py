"""Shared fixtures: a tiny BERT classifier built from a config in memory, saved beside the
embedded MiniLM's tokenizer so the real loading code runs on it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_bert(num_labels: int = 2, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from privlora.tasks.models import quiet_hf, resolve_model_path

    quiet_hf()
    out = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(out)
    src = resolve_model_path("embedded:minilm")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture()
def tiny_cfg(tiny_model_dir):
    """A factory for small, fast experiment configs on the tiny model and 400 real reviews."""
    from privlora.core.config import config_from_dict

    def make(**sections):
        raw = {
            "name": "tiny",
            "seed": 3,
            "threads": 1,
            "model": {"path": str(tiny_model_dir), "max_length": 32},
            "data": {"max_examples": 400, "num_clients": 4, "partition": "iid", "test_fraction": 0.25},
            "lora": {"r": 2, "alpha": 4.0},
            "federation": {"strategy": "ffa", "rounds": 2, "clients_per_round": 3},
            "training": {"local_steps": 2, "batch_size": 32, "physical_batch_size": 16, "lr": 0.5},
            "privacy": {"enabled": True, "noise_multiplier": 1.0},
        }
        for sec, vals in sections.items():
            if isinstance(vals, dict):
                raw.setdefault(sec, {}).update(vals)
            else:
                raw[sec] = vals
        return config_from_dict(raw)

    return make
