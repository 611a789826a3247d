"""The ServerApp: the server side of a privlora run, driving the round engine over Flower.

Run config (``flwr run APP --run-config '...'``, or `local.run_on_flower`):

=============== ===================================================================
``config``      the federation's TOML (every node holds the same file)
``out``         the run folder, exactly as ``privlora run --out`` writes it
``resume``      ``true`` to continue the run in ``out`` from its checkpoint
``overwrite``   ``true`` to replace an earlier run in ``out``
``wait``        seconds to wait for ``data.num_clients`` nodes to connect (default 120)
=============== ===================================================================

The server loads only what it needs: the model and the held-out split of ``data.source`` (in a
deployment, point ``data.source`` at the server's own evaluation data; the clients' data never
reaches it). Everything else comes from the clients as bytes.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _flag(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def run_server(grid: Grid, settings: dict) -> dict:
    """Build the server side and run every round; returns the last metrics record."""
    from privlora.core.config import load_config
    from privlora.federation.startup import start_run
    from privlora.transports.flower.transport import FlowerTransport

    out = Path(str(settings["out"]))
    resume = _flag(settings.get("resume", False))
    overwrite = _flag(settings.get("overwrite", False))
    started = start_run(None if resume else load_config(str(settings["config"])), out, overwrite=overwrite,
                        resume=resume, with_clients=False)
    transport = FlowerTransport(grid, expected=started.cfg.data.num_clients, wait=float(settings.get("wait", 120.0)))
    return started.engine(transport, progress=False).run(resume=resume)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = dict(context.run_config)
    try:
        record = run_server(grid, settings)
    except Exception:
        out = Path(str(settings.get("out", ".")))
        if out.is_dir():  # the run folder keeps the reason, beside what was written
            (out / "server-error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise
    print(f"privlora: finished round {record.get('round')} -> {settings.get('out')}", flush=True)
