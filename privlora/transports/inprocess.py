"""In-process simulation of a federation: one server, many clients, bytes between them.

`run_experiment(cfg, out_dir)` does a whole run and writes the output folder:

- ``config.toml``: the resolved config (reloadable with ``privlora run config.toml``);
- ``metrics.jsonl``: one JSON line per round (round 0 = the untrained model), flushed and
  fsynced as each round ends, so a crash loses at most the round in progress;
- ``adapter/``: the final global adapter in peft format (``adapter_config.json`` and
  ``adapter_model.safetensors``; `PeftModel.from_pretrained(base, "adapter")` loads it);
- ``ledger.jsonl`` (DP runs): the hash-chained privacy ledger (`accounting.ledger`), one charge
  per client per round it trained in, written before the client trains;
- ``checkpoint/``: the server's state after the last finished round (`privlora.core.checkpoint`);
  ``privlora run --resume DIR`` continues from it, reusing (never repeating) the charges of an
  unfinished round;
- ``report.json``, ``report.md`` and plots: see `privlora.reporting.report`.

The run starts as every run does (`privlora.federation.startup.start_run`) and its rounds are run
by `privlora.federation.engine.RoundEngine`, the one round engine every transport uses; here every
client is a `privlora.federation.node.ClientNode` in this process, reached through
`InProcessTransport`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from privlora.core.config import ConfigError, ExperimentConfig, validate
from privlora.core.progress import Progress
from privlora.federation.engine import _bar
from privlora.federation.startup import Federation, client_nodes, start_run
from privlora.federation.transport import STAGE_TRAIN, Transport


class InProcessTransport(Transport):
    """Every client is a `ClientNode` in this process; messages are handed over as bytes.

    ``drop``: ``{stage: client ids}``; from that stage on those clients never answer again (as
    a node that was killed). A node that raises a `secagg.SecAggError` (it aborted the protocol)
    or `session_rules.SessionRefused` (its own rules forbid the session) sends nothing back, as
    a real node that aborts. Any other exception propagates: in one
    process a bug must not pass for a dropout.
    """

    name = "in-process"

    def __init__(self, nodes: Mapping[int, "object"], drop: Mapping[str, set[int]] | None = None, progress=None):
        super().__init__()
        self.nodes = dict(nodes)
        self.drop = {s: set(c) for s, c in (drop or {}).items()}
        self.dead: set[int] = set()
        self.progress = progress
        """A callable (stage, client) -> a progress bar for that client's work, or None."""

    def clients(self) -> list[int]:
        return sorted(c for c in self.nodes if c not in self.dead)

    def _exchange(self, stage: str, messages: dict[int, bytes], timeout: float | None) -> dict[int, bytes]:
        from secagg import SecAggError

        from privlora.federation.session_rules import SessionRefused

        self.dead |= self.drop.get(stage, set())
        out = {}
        for c, blob in messages.items():
            if c in self.dead or c not in self.nodes:
                continue
            bar = self.progress(stage, c) if self.progress is not None else None
            try:
                out[c] = self.nodes[c].handle(blob, progress=bar)
            except (SecAggError, SessionRefused) as exc:  # the node refused or aborted: it sends nothing back
                print(f"privlora: client {c} aborted secure aggregation: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                if bar is not None:
                    bar.close()
        return out


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    drop: dict[str, set[int]] | None = None,
    prepare: Callable[[Federation], None] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every round in this process and write the output folder; returns the last metrics record.

    With ``resume``, continue the run in ``out_dir`` from its checkpoint (``cfg`` is then read
    from the folder's config.toml). ``stop_after`` ends the process after that many rounds as if
    it had been killed (no adapter, no report): used to test resuming. ``drop`` ({stage: client
    ids}, stages "describe", "train" or `secagg.STAGES`) makes clients fall silent from that
    stage on, as nodes that die (tests of dropout recovery). ``prepare`` is called with the
    federation right after it is built, before any noise is calibrated or any round runs
    (`privlora.commands.audit` inserts its canaries into the clients' datasets there).
    ``on_round(record)`` is called with each finished round's metrics record (see `run`).
    """
    if cfg is None and not resume:
        raise ConfigError("config: run_experiment needs a config (an ExperimentConfig; load_config() gives the embedded "
                          "default), or resume=True to continue the run in out_dir with its own config.toml")
    if cfg is not None:
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(f"config: expected an ExperimentConfig (load_config or config_from_dict make one), found "
                              f"{type(cfg).__name__}")
        validate(cfg)  # a config built in Python is held to the same rules as a file (privlora.core.config.validate)
    started = start_run(cfg, out_dir, overwrite=overwrite, resume=resume, with_clients=True,
                        reporter=Progress(progress), prepare=prepare)
    nodes = client_nodes(started.cfg, started.federation.clients, started.out)
    bars = None
    if progress:
        def bars(stage, cid):
            if stage != STAGE_TRAIN:
                return None
            return _bar(started.cfg.training.local_steps, f"client {cid}", 1, True)
    transport = InProcessTransport(nodes, drop=drop, progress=bars)
    engine = started.engine(transport, progress)
    if on_round is not None:
        run_round = engine.run_round

        def run_round_then_call(rnd, rounds_bar):
            record, stopped = run_round(rnd, rounds_bar)
            if not stopped:  # the round is written (metrics.jsonl, checkpoint) before the callback sees it
                on_round(dict(record))
            return record, stopped

        engine.run_round = run_round_then_call
    return engine.run(resume=resume, stop_after=stop_after)


@dataclass
class RunResult:
    """What `run` returns: the run folder and its numbers (every round's metrics.jsonl line)."""

    out: Path
    """The run folder: config.toml, metrics.jsonl, ledger.jsonl, adapter/, report.md, report.json."""
    rounds: int
    """Rounds finished (fewer than federation.rounds when budgets stopped the run)."""
    test_accuracy: float | None
    """Held-out accuracy after the last finished round (None for a task without accuracy)."""
    epsilon_max: float | None
    """The largest epsilon any client spent (None for a non-private run), at ``delta``."""
    delta: float | None
    stopped: str | None
    """Why the run stopped early, or None."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Every line of metrics.jsonl (round 0 = the untrained model)."""

    @property
    def report_path(self) -> Path:
        return self.out / "report.md"

    @property
    def adapter_path(self) -> Path:
        return self.out / "adapter"


def run(
    config: "ExperimentConfig | dict | str | Path",
    out: str | Path,
    *,
    data: Any = None,
    model: Any = None,
    tokenizer: Any = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> RunResult:
    """Run a federated experiment in this process and return its `RunResult` (the public API:
    ``privlora.run``).

    ``config``: an `ExperimentConfig`, a dict of its sections, or the path of a TOML file; it is
    validated exactly as ``privlora run`` validates a file (a bad value raises the same
    `ConfigError`, and nothing is written). ``data``: a pandas DataFrame or a `datasets.Dataset`
    with the config's text and label columns, used instead of ``data.source`` (config.toml then
    records ``data.source = "python:data"``). ``model`` and ``tokenizer``: a Hugging Face sequence
    classifier and its tokenizer, used instead of ``model.path`` (recorded as ``"python:model"``;
    the object you pass is copied, never trained). ``on_round(metrics)`` is called after each
    finished round with that round's metrics.jsonl record (``round``, ``test_accuracy``,
    ``epsilon``, ``epsilon_max``, ...); an exception from it stops the run as an interruption
    would (every finished round is kept: ``resume=True`` continues it). ``resume``: continue the
    run in ``out`` from its checkpoint (``config`` is then None; give ``data``/``model`` again if
    the run used them)."""
    import dataclasses
    import json

    from privlora.core.config import config_from_dict, load_config

    if resume:
        if config is not None:
            raise ConfigError(f"config: resume=True continues the run in {out} with its own config.toml; pass config=None")
        cfg = None
    elif config is None:
        raise ConfigError("config: privlora.run needs a config: an ExperimentConfig, a dict of sections, or a TOML path "
                          "(privlora.load_config() gives the embedded default)")
    elif isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        raise ConfigError(f"config: expected an ExperimentConfig, a dict or a TOML path, found {type(config).__name__}")
    if data is not None:
        from privlora.tasks.data import use_table

        source = use_table(data, "data")
        if cfg is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=source))
    if model is not None or tokenizer is not None:
        from privlora.tasks.models import use_model

        path = use_model(model, tokenizer, "model")
        if cfg is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))
    out = Path(out)
    final = run_experiment(cfg, out, progress=progress, overwrite=overwrite, resume=resume, on_round=on_round)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    finished = [r for r in rows if not r.get("stopped")]
    used = cfg or load_config(out / "config.toml")
    return RunResult(out=out, rounds=int(finished[-1]["round"]) if finished else 0,
                     test_accuracy=final.get("test_accuracy"), epsilon_max=final.get("epsilon_max"),
                     delta=used.privacy.delta if used.privacy.enabled else None, stopped=final.get("stopped"), metrics=rows)
