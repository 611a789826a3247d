"""LoRA adapters through peft: construction, per-client ranks, and state as numpy arrays.

Scaling convention. peft scales an adapter of rank r by ``lora_alpha / r``. privlora fixes one
scaling ``s = lora.alpha / lora.r`` for the whole federation and gives a client of rank r_k
``lora_alpha = s * r_k``, so every client's update ``s * B_k A_k`` and the global adapter (rank
``max_rank``) share the same ``s``; aggregating factors never needs a per-client rescale.

Adapter state is a ``dict[str, np.ndarray]`` keyed by peft's saved names (those of
``get_peft_model_state_dict``, e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query
.lora_A.weight``; the head is ``base_model.model.classifier.weight``). That is exactly what
``adapter_model.safetensors`` holds, and it is what strategies aggregate.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np

from privlora.core.config import ConfigError, ExperimentConfig


class _TheTasks:
    def __repr__(self) -> str:
        return "THE_TASKS"


THE_TASKS = _TheTasks()
"""Default ``task_type``: the peft task type of the run's task (`Task.peft_task_type`)."""


def peft_lora_config(cfg: ExperimentConfig, rank: int, task_type: str | None | _TheTasks = THE_TASKS):
    """peft's LoraConfig of a rank-``rank`` adapter with the federation's scaling; ``task_type``
    is peft's (None: a plain PeftModel), by default the run's task's."""
    from peft import LoraConfig

    if task_type is THE_TASKS:
        from privlora.tasks.registry import task_class

        task_type = task_class(cfg.model.task).peft_task_type
    scaling = cfg.lora.alpha / cfg.lora.r
    return LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type=task_type,
        modules_to_save=list(cfg.lora.modules_to_save) or None,
        layers_to_transform=sorted(cfg.lora.layers) or None,
    )


def make_peft_model(base_model, cfg: ExperimentConfig, rank: int, copy_base: bool = True, task_type: str | None | _TheTasks = THE_TASKS):
    """Wrap (a copy of) ``base_model`` with a fresh LoRA adapter of ``rank`` (``task_type``: see
    `peft_lora_config`; `privlora.tasks.Task.make_adapter` passes its own).

    Raises ConfigError (a ValueError) naming ``lora.layers`` when a layer does not exist, and
    ``lora.target_modules`` when none of them exists in the model.
    """
    from peft import get_peft_model

    layers = getattr(getattr(base_model, "config", None), "num_hidden_layers", None)
    missing = [i for i in cfg.lora.layers if layers is not None and i >= layers]
    if missing:
        raise ConfigError(
            f"lora.layers: layer {missing[0]} does not exist; the model has {layers} layers (0 to {layers - 1}); "
            "list layers in that range, or leave lora.layers empty for all"
        )
    model = copy.deepcopy(base_model) if copy_base else base_model
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg, rank, task_type))
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in base_model.named_modules() if n})
        raise ConfigError(
            f"lora.target_modules: {list(cfg.lora.target_modules)} did not match any module of the model; use names "
            f"from those it has: {', '.join(names[:30])} (peft: {exc})"
        ) from exc
    return peft_model


def adapter_state(peft_model) -> dict[str, np.ndarray]:
    """The adapter and head weights as float32 numpy arrays under peft's saved names."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu").float().numpy().copy()
        # the vocabulary is never resized: no embedding layer to save, and no need for peft to
        # reload the base model's config (by its name) to find that out on every call
        for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()
    }


def load_adapter_state(peft_model, state: dict[str, np.ndarray]) -> None:
    """Load ``state`` into the active adapter; every adapter weight must be present and fit."""
    import torch
    from peft import set_peft_model_state_dict

    current = adapter_state(peft_model)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter state {k}: shape {tuple(v.shape)} does not fit the model's {tuple(current[k].shape)}")
    set_peft_model_state_dict(peft_model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def frozen_weights(peft_model, names) -> dict:
    """Copies (torch tensors) of the named frozen parameters, e.g. base weights under LoRA
    modules (``...query.base_layer.weight``), to merge deltas into later without drift."""
    params = dict(peft_model.named_parameters())
    missing = sorted(set(names) - set(params))
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]!r}")
    return {n: params[n].detach().clone() for n in names}


def merge_into_base(peft_model, deltas: dict[str, np.ndarray], originals: dict | None = None) -> None:
    """Set each named frozen base weight to ``originals[name] + delta`` (or add ``delta`` to
    its current value when ``originals`` is None). Names are peft parameter names; only frozen
    parameters (``requires_grad=False``) may be merged into, and shapes must match."""
    import torch

    params = dict(peft_model.named_parameters())
    for name, delta in deltas.items():
        if name not in params:
            raise ValueError(f"cannot merge into {name!r}: the model has no such parameter")
        p = params[name]
        if p.requires_grad:
            raise ValueError(f"cannot merge into {name!r}: it is trainable, not a frozen base weight")
        if tuple(delta.shape) != tuple(p.shape):
            raise ValueError(f"delta for {name}: shape {tuple(delta.shape)} does not fit the model's {tuple(p.shape)}")
        with torch.no_grad():
            start = p if originals is None else originals[name]
            p.copy_(start + torch.from_numpy(np.ascontiguousarray(delta)).to(p.dtype))


def atomic_save_adapter(model, out: Path) -> None:
    """Save ``model``'s adapter in peft format into the folder ``out``, replacing it whole: a
    crash leaves the old adapter or the new one, never a mix."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # the vocabulary is never resized, so no embedding layer is saved (and peft need not look up the base)
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
