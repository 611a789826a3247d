"""privlora's layout draws its architecture: each subpackage imports only from those below it.

    commands     cli, sweep, audit runner: what a user types
    transports   in-process, Flower: carry the round engine's messages
    federation   round engine, server, client, node, messages, transport interface, secure sum, start-up
    reporting    report.json / report.md / plots from a run folder's files
    tasks        everything a task decides: data, models, loss, evaluation, adapters, predict
    strategies   fedit, ffa, flora, hetlora, server momentum: numpy only
    core         config, errors, progress, the run folder's files, accountants

`tasks` and `strategies` sit side by side and know nothing of each other. Every import counts,
inside functions too (a lazy import is still a dependency). `accounting` and `secagg` are below
all of privlora and never import it (tests/test_accounting.py, test_secagg_*.py check torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "core": 0,
    "strategies": 1,
    "tasks": 1,
    "reporting": 2,
    "federation": 3,
    "transports": 4,
    "commands": 5,
}
TOP = {"privlora", "privlora.__main__"}  # the package's front door may import anything


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a privlora module in ``path``, relative ones resolved."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "privlora":  # from privlora import tasks -> the subpackage itself
                found += [(node.lineno, f"privlora.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, mod))
    return [(line, m) for line, m in found if m == "privlora" or m.startswith("privlora.")]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        name = module_name(path, root)
        if name in TOP:
            continue
        mine = layer_of(name)
        if mine is None:
            bad.append(f"{path.relative_to(root)}: module {name} is in no layer; put it in one of {sorted(LAYERS)}")
            continue
        for line, target in imports_of(path, name):
            theirs = layer_of(target)
            if theirs == mine:
                continue
            if theirs is None or LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{path.relative_to(root)}:{line}: {mine} imports {target} ({theirs or 'no layer'}), "
                           f"which is not below it")
    return bad


def privlora_files() -> list[Path]:
    return sorted((ROOT / "privlora").rglob("*.py"))


def test_every_import_goes_down_the_layers():
    assert violations(privlora_files()) == []


def test_every_module_lives_in_a_layer_folder():
    loose = [p.name for p in (ROOT / "privlora").glob("*.py") if module_name(p) not in TOP]
    assert loose == []
    assert {p.name for p in (ROOT / "privlora").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


@pytest.mark.parametrize("layer, target, allowed", [
    ("core", "privlora.federation.engine", False),
    ("tasks", "privlora.strategies.ffa", False),   # side by side: neither knows the other
    ("strategies", "privlora.tasks.data", False),
    ("federation", "privlora.transports.inprocess", False),
    ("transports", "privlora.commands.cli", False),
    ("reporting", "privlora.commands.audit", False),
    ("federation", "privlora.reporting.report", True),
    ("commands", "privlora.core.config", True),
    ("tasks", "privlora.tasks.data", True),
])
def test_the_checker_catches_a_wrong_way_import(tmp_path, layer, target, allowed):
    """The check itself can fail: a module written into a layer with one lazy import is judged by it."""
    pkg = tmp_path / "privlora" / layer
    pkg.mkdir(parents=True)
    mod = pkg / "probe.py"
    mod.write_text(f"def f():\n    import {target}\n", encoding="utf-8")
    found = violations([mod], root=tmp_path)
    assert (found == []) is allowed, found
