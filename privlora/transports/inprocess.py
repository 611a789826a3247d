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
from pathlib import Path
from typing import Any, Callable

from privlora.core.config import ExperimentConfig
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
) -> dict[str, Any]:
    """Run every round in this process and write the output folder; returns the last metrics record.

    With ``resume``, continue the run in ``out_dir`` from its checkpoint (``cfg`` is then read
    from the folder's config.toml). ``stop_after`` ends the process after that many rounds as if
    it had been killed (no adapter, no report): used to test resuming. ``drop`` ({stage: client
    ids}, stages "describe", "train" or `secagg.STAGES`) makes clients fall silent from that
    stage on, as nodes that die (tests of dropout recovery). ``prepare`` is called with the
    federation right after it is built, before any noise is calibrated or any round runs
    (`privlora.commands.audit` inserts its canaries into the clients' datasets there).
    """
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
    return started.engine(transport, progress).run(resume=resume, stop_after=stop_after)
