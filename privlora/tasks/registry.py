"""Which `Task` class runs for each ``model.task`` name: the built-ins and the ones users register.

``register_task("toy", ToyTask)`` makes ``model.task = "toy"`` a valid config value (it tells
`privlora.core.config.TASKS`, which validation consults) and `task_for` builds ``ToyTask(cfg)``
for every config that names it. The built-in tasks, ``"classification"``
(`privlora.tasks.classification`) and ``"causal-lm"`` (`privlora.tasks.causal_lm`), are
registered when `privlora.tasks` is imported, which importing this module always does first.

Registration lasts for the process: a run, ``privlora report`` or ``privlora predict`` of a
custom task must happen in a process that registered it (a script that calls `register_task`
and then `privlora.transports.inprocess.run_experiment`, `privlora.reporting.report.write_report`
or `privlora.commands.cli.main`).

This module imports nothing else from `privlora.tasks`, so that every task module may use it.
"""

from __future__ import annotations

from typing import Any

from privlora.core.config import TASKS, ConfigError, ExperimentConfig
from privlora.core.errors import UserError

_REGISTRY: dict[str, type] = {}


class TaskRegistrationError(UserError, TypeError):
    """A class offered to `register_task` cannot be a task, or its name is taken."""


def register_task(name: str, task_class: type, *, replace: bool = False) -> type:
    """Make ``model.task = name`` run ``task_class`` (a concrete subclass of `privlora.tasks.Task`).

    Refuses an abstract class (naming the methods it still lacks), a name already taken (unless
    ``replace``; the built-in names never) and a name that is not a short identifier-like string.
    Returns ``task_class``, so it can be used as a decorator's tail: ``register_task("toy", Toy)``.
    """
    if not isinstance(name, str) or not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise TaskRegistrationError(f"register_task: the name must be a short word of letters, digits, '-' or '_', found {name!r}")
    if not isinstance(task_class, type) or not callable(getattr(task_class, "load_records", None)):
        raise TaskRegistrationError(f"register_task({name!r}, ...): expected a subclass of privlora.tasks.Task, found {task_class!r}")
    missing = sorted(getattr(task_class, "__abstractmethods__", ()))
    if missing:
        raise TaskRegistrationError(f"register_task({name!r}, {task_class.__name__}): the class is abstract; implement "
                                    f"{', '.join(missing)}")
    if name in _REGISTRY and _REGISTRY[name] is not task_class:
        if not replace or name in BUILTIN:
            why = "a built-in task" if name in BUILTIN else f"taken by {_REGISTRY[name].__name__}; pass replace=True"
            raise TaskRegistrationError(f"register_task: {name!r} is {why}")
    _REGISTRY[name] = task_class
    TASKS.add(name)
    return task_class


def unregister_task(name: str) -> None:
    """Forget a registered task (tests and plugins that clean up after themselves); the
    built-in tasks cannot be removed."""
    if name in BUILTIN:
        raise TaskRegistrationError(f"unregister_task: {name!r} is a built-in task")
    _REGISTRY.pop(name, None)
    TASKS.discard(name)


def registered_tasks() -> dict[str, type]:
    """``{model.task name: Task class}``, built-ins first."""
    return dict(_REGISTRY)


def task_class(name: str) -> type:
    """The class registered as ``name``; ConfigError naming ``model.task`` otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model.task: {name!r} is not one of {', '.join(map(repr, _REGISTRY))}; a task of your own must be "
                          "registered with privlora.tasks.register_task before the config is used") from None


def task_for(cfg: ExperimentConfig) -> Any:
    """The task of a run: ``task_class(cfg.model.task)(cfg)``."""
    return task_class(cfg.model.task)(cfg)


def task_for_card(card: dict) -> type | None:
    """The class whose runs write ``card`` (a run's model.json): the one whose ``card_task``
    (default: its registered name) is ``card["task"]``; None if no registered class does. The
    card's methods are class methods, since model.json is read without a config."""
    kind = card.get("task") if isinstance(card, dict) else None
    for name, cls in _REGISTRY.items():
        if (getattr(cls, "card_task", "") or name) == kind:
            return cls
    return None


BUILTIN = frozenset({"classification", "causal-lm"})
"""Names registered by `privlora.tasks` itself; never replaced or removed."""
