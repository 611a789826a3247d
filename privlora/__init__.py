"""privlora: federated LoRA fine-tuning with differential privacy and secure aggregation.

The package is laid out by role; each layer imports only from the layers below it
(tests/test_layering.py holds it to that):

    commands/     cli, sweep, audit: what a user types (`privlora run | report | verify | ...`)
    transports/   inprocess (the embedded default) and flower: carry the engine's messages
    federation/   startup (one start-up path), engine (the one round engine), server, client,
                  node, messages, transport (the interface), secure_sum, keys, preflight
    reporting/    report.json, report.md and plots from a run folder's files
    tasks/        everything a task decides, behind one interface (tasks.Task; register your own):
                  data, models, adapters, loss, evaluation, model.json and predict, canaries
    strategies/   fedit, ffa, flora, hetlora (and server momentum): numpy only
    core/         config, errors (one family), progress, checkpoint files, accountants

The Python API is the names below (each imported on first use, so ``import privlora`` loads
no torch): ``run(config, out, data=..., model=..., tokenizer=..., on_round=...) -> RunResult``
(validated exactly as ``privlora run`` validates a file; ``data`` a pandas DataFrame or a
``datasets.Dataset``, ``model``/``tokenizer`` objects, ``on_round`` called with each finished
round's metrics), ``load_config``, ``config_from_dict``, ``ExperimentConfig`` and its sections,
``STRATEGIES``, the task interface ``Task``/``register_task``, and the errors (``UserError``,
``ConfigError``, ``DataError``).

Beside it, `accounting` (ledger, accountants, audit bounds) and `secagg` (the masked secure
sum) know nothing of torch, LoRA or each other.
"""

__version__ = "0.1.0"

# ---------------------------------------------------------------------------- the Python API
#
#     import privlora
#     cfg = privlora.load_config("examples/default.toml")        # or privlora.ExperimentConfig(...)
#     result = privlora.run(cfg, out="runs/mine", on_round=lambda m: print(m["round"], m["test_accuracy"]))
#     result.test_accuracy, result.epsilon_max, result.out / "report.md"
#
# Each name is imported when first used, so `import privlora` loads neither torch nor
# transformers (tests/test_api.py checks it).

_API = {
    # running
    "run": ("privlora.transports.inprocess", "run"),
    "RunResult": ("privlora.transports.inprocess", "RunResult"),
    # configuration (validated as the command line validates a file)
    "load_config": ("privlora.core.config", "load_config"),
    "config_from_dict": ("privlora.core.config", "config_from_dict"),
    "config_to_toml": ("privlora.core.config", "config_to_toml"),
    "ExperimentConfig": ("privlora.core.config", "ExperimentConfig"),
    "ModelConfig": ("privlora.core.config", "ModelConfig"),
    "DataConfig": ("privlora.core.config", "DataConfig"),
    "LoraConfig": ("privlora.core.config", "LoraConfig"),
    "FederationConfig": ("privlora.core.config", "FederationConfig"),
    "TrainingConfig": ("privlora.core.config", "TrainingConfig"),
    "PrivacyConfig": ("privlora.core.config", "PrivacyConfig"),
    "SecAggConfig": ("privlora.core.config", "SecAggConfig"),
    "STRATEGIES": ("privlora.core.config", "STRATEGIES"),
    # errors: every error a user can cause is a UserError
    "UserError": ("privlora.core.errors", "UserError"),
    "ConfigError": ("privlora.core.config", "ConfigError"),
    "DataError": ("privlora.tasks.data", "DataError"),
    # tasks: bring your own model and data
    "Task": ("privlora.tasks", "Task"),
    "register_task": ("privlora.tasks", "register_task"),
    "unregister_task": ("privlora.tasks", "unregister_task"),
    "LabelledData": ("privlora.tasks.data", "LabelledData"),
    # a finished run's model
    "load_base_for_run": ("privlora.tasks.models", "load_base_for_run"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'privlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
