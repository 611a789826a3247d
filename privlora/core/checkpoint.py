"""Checkpoints: everything a run needs to continue after a crash, written after every round.

``checkpoint/`` in the run folder holds ``state-rNNNN.safetensors`` (the server's global adapter
state, its momentum buffer, and any other server arrays) and ``state.json``:

    {"format": "privlora-checkpoint/1", "round": R, "tensors": "state-rNNNN.safetensors",
     "tensors_sha256": ..., "server_rng": {...}, "ledger": {"entries": n, "head": hash},
     "metrics_rounds": R, "config_sha256": ...}

The tensors file is written first under a new name, then ``state.json`` is replaced atomically
(``os.replace``, then the folder fsynced), then older tensor files are removed; a crash at any point leaves a complete
checkpoint (the old or the new). Loading checks the format, the tensor file's hash and the
config's hash, and says what to do when any of them is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from privlora.core.errors import UserError

FORMAT = "privlora-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or belongs to another config."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Flush ``folder``'s entries (a rename or a new file in it) to disk: without this, a power
    loss right after ``os.replace`` can bring back the old name or lose the new file."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` so that a crash, even a power loss, leaves the old file or the
    new, never half: a complete, fsynced temporary file, renamed over ``path``, then the folder fsynced."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _fsync_write(tmp, data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, rnd: int, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    from safetensors.numpy import save

    ckpt = Path(run_dir) / "checkpoint"
    if not ckpt.is_dir():
        ckpt.mkdir()
        fsync_dir(run_dir)
    name = f"state-r{rnd:04d}.safetensors"
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    _fsync_write(ckpt / name, blob)
    fsync_dir(ckpt)  # the tensors file's name is on disk before state.json points at it
    state = {"format": FORMAT, "round": rnd, "tensors": name, "tensors_sha256": hashlib.sha256(blob).hexdigest(), **meta}
    atomic_write(ckpt / "state.json", json.dumps(state, sort_keys=True, indent=1))
    for old in ckpt.glob("state-r*.safetensors"):
        if old.name != name:
            old.unlink()
    fsync_dir(ckpt)
    return ckpt / "state.json"


def load_checkpoint(run_dir: Path, config_sha256: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    ckpt = Path(run_dir) / "checkpoint"
    path = ckpt / "state.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run stopped before its first round finished; start it again with --overwrite")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); it was edited or damaged") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, found {state.get('format') if isinstance(state, dict) else state!r}")
    if state.get("config_sha256") != config_sha256:
        raise CheckpointError(
            f"{path} was written for a different config.toml (hash {str(state.get('config_sha256'))[:12]}…, now "
            f"{config_sha256[:12]}…); a run resumes only with the config it started with — restore that config.toml"
        )
    tpath = ckpt / str(state.get("tensors", ""))
    if not tpath.is_file():
        raise CheckpointError(f"{tpath} is missing; the checkpoint is incomplete")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != state.get("tensors_sha256"):
        raise CheckpointError(f"{tpath} does not match the hash in {path}; the checkpoint is damaged")
    try:
        tensors = load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{tpath} is not a valid safetensors file ({exc})") from exc
    return state, tensors
