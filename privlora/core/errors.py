"""privlora's one error family, and what the command line tells a user when they caused one.

Every failure a user can cause (a config, data, model, checkpoint, ledger, protocol message or
run folder that is wrong) raises a subclass of `UserError` whose message names what was found
and how to fix it: `ConfigError` (privlora.core.config), `CheckpointError`
(privlora.core.checkpoint), `LedgerFileError` (here), `DataError` (privlora.tasks.data),
`ModelError` (privlora.tasks.models), `CausalTaskError` (privlora.tasks.causal_lm),
`CanaryError` (privlora.tasks.base), `TaskRegistrationError` (privlora.tasks.registry),
`MessageError` (privlora.federation.messages), `AuditError`, `SweepError`, `PreflightError`,
`OutputDirError`, `RunFolderError`. The command line catches `UserError` alone and prints one
line, ``privlora: error: <what was found>; <how to fix it>``, with a non-zero exit code and no
traceback (``privlora --debug`` shows it); anything else is a bug in privlora and says so. This
module adds what only the command line knows: which run folder was involved and which command
continues from where the failure left it.

Operating-system errors (a full disk, a folder that cannot be written, a file in the place of a
folder) are translated by `explain_os_error`. A failure while a run writes its folder never
damages what was written before it: the ledger and metrics are append-only and fsynced, and the
checkpoint is replaced atomically (`privlora.core.checkpoint`), so the message can say exactly how
to continue.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """A failure the user can fix; its message names the problem and the fix."""


class PreflightError(UserError):
    """A run was refused before it wrote anything: config, data, model, folder or budget."""


class OutputDirError(PreflightError):
    """The output folder already holds a run, or cannot be written."""


class RunFolderError(UserError):
    """A run folder (for report, verify, predict or --resume) is missing or incomplete."""


class LedgerFileError(UserError):
    """A privacy ledger that cannot be created, read or extended: `accounting.LedgerError`
    (which knows nothing of privlora) re-raised inside privlora's family by `ledger_file`."""


@contextmanager
def ledger_file(path: Path) -> Iterator[None]:
    """Turn an `accounting.LedgerError` raised inside the block into a `LedgerFileError` that
    names ``path`` and what to do: a ledger is evidence, so the fix is never to delete it."""
    from accounting import LedgerError

    try:
        yield
    except LedgerError as exc:
        raise LedgerFileError(
            f"{path}: {exc}; a privacy ledger is never edited or deleted: restore it from a backup, or check it "
            "with `privlora verify` on its run folder"
        ) from exc


def _has_checkpoint(out: Path | None) -> bool:
    return out is not None and (Path(out) / "checkpoint" / "state.json").is_file()


def continue_hint(out: Path | None) -> str:
    """How to go on after a run in ``out`` stopped part-way."""
    if out is not None and _has_checkpoint(out):
        return f"every finished round is kept: continue with `privlora run --resume {out}`"
    if out is not None and (Path(out) / "config.toml").is_file():
        return "no round had finished, so nothing was trained or spent: run the same command again"
    return "nothing was written: run the same command again"


def explain_os_error(exc: OSError, out: Path | None = None, writing: bool = True) -> str:
    """One line for an OSError, naming the file, the cause and the fix."""
    where = exc.filename or (str(out) if out is not None else "a file")
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device while writing {where}; free some space, then "
            + continue_hint(out)
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"permission denied {'writing' if writing else 'reading'} {where}; "
            "choose a folder you can write to (e.g. under your home folder) or fix its permissions"
            + (f"; then {continue_hint(out)}" if out is not None and _has_checkpoint(out) else "")
        )
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder; choose another path"
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected; choose a file path"
    if code == errno.ENOENT:
        return f"{where} does not exist; check the path"
    reason = exc.strerror or str(exc)
    tail = f"; {continue_hint(out)}" if out is not None and writing else ""
    return f"{reason} ({where}){tail}"


def interrupted_message(out: Path | None) -> str:
    """What Ctrl-C during a run leaves, and how to continue (with the real folder)."""
    if out is None:
        return "interrupted"
    return f"interrupted; {continue_hint(out)}"
