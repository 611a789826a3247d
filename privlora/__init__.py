"""privlora: federated LoRA fine-tuning with differential privacy.

Modules: `config` (typed TOML config), `data` and `partition` (datasets and client splits),
`models` and `adapters` (base models, peft LoRA), `strategies` (one file per aggregation
method), `client` (Opacus DP-SGD), `server`, `messages` (bytes between them), `simulation`
(the in-process federation), `privacy` (calibration and per-client epsilon), `report`, `cli`.
"""

__version__ = "0.1.0"
