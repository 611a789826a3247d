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

Beside it, `accounting` (ledger, accountants, audit bounds) and `secagg` (the masked secure
sum) know nothing of torch, LoRA or each other.
"""

__version__ = "0.1.0"
