"""Progress before the first round: a named stage with a spinner (or one line) on stderr.

Loading the data and the model, tokenizing, calibrating every client's noise and evaluating the
untrained model take from seconds to minutes before round 1 starts; each is shown as a stage.
On a terminal a stage is a spinner with its name, a count (``3/10``) when it has one, and the
seconds so far, replaced by a line ending in the time it took. Elsewhere (a log file, a pipe)
each stage prints one line when it starts, so a log says what the run was doing when it
stopped. Disabled (``--quiet``), nothing is printed.

    reporter = Progress(enabled=True)
    with reporter.stage("calibrating noise", total=10) as s:
        for client in clients:
            ...
            s.advance()
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

SPINNER = "|/-\\"


class Stage:
    """One running stage; `advance` moves its count."""

    def __init__(self, name: str, total: int | None):
        self.name = name
        self.total = total
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n

    def text(self) -> str:
        count = f" {self.done}/{self.total}" if self.total else ""
        return f"{self.name}{count} ({time.perf_counter() - self.start:.0f} s)"


class Progress:
    """Stages on ``stream`` (stderr by default); silent when not ``enabled``."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interval: float = 0.2):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        st = Stage(name, total)
        if not self.enabled:
            yield st
            return
        if not self._tty():
            print(f"privlora: {name}…", file=self.stream, flush=True)
            yield st
            return
        stop = threading.Event()

        def spin() -> None:
            i = 0
            while not stop.wait(self.interval):
                self.stream.write(f"\r{SPINNER[i % len(SPINNER)]} {st.text()}\033[K")
                self.stream.flush()
                i += 1

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        ok = False
        try:
            yield st
            ok = True
        finally:
            stop.set()
            thread.join()
            mark = "done" if ok else "stopped"
            took = time.perf_counter() - st.start
            self.stream.write(f"\r{name}: {mark} in {took:.1f} s\033[K\n")
            self.stream.flush()


def first_evaluation_stage(server, reporter: Progress, size: int, enabled: bool = True) -> None:
    """Show the server's next evaluation (the untrained model's, before round 1) as a stage.

    Wraps ``server.evaluate`` for one call only; later evaluations run under the rounds bar.
    Not ``enabled`` (a resumed run, which does not evaluate round 0 again): does nothing."""
    if not (enabled and reporter.enabled):
        return
    evaluate = server.evaluate

    def once(*args, **kwargs):
        server.evaluate = evaluate
        with reporter.stage(f"evaluating the untrained model on {size} held-out examples"):
            return evaluate(*args, **kwargs)

    server.evaluate = once


def quiet_library_warnings() -> None:
    """Hide known, harmless library chatter so that real warnings stand out."""
    import warnings

    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")  # SECURITY.md states it
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
