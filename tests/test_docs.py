"""The README and the guides in docs/: every code block run or checked (or marked illustrative),
every relative link resolving, the configuration reference equal to what the code generates,
the README a front page. The rules are written down in docs/writing-docs.md."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(illustrative|run-by:\s*(\S+))[^>]*-->\s*$")


def code_blocks(page: Path) -> list[tuple[str, str, str | None, int]]:
    """(language, code, marker or None, line number) of each fenced block of a page."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        out.append((m.group(1), m.group(2), marker.group(1) if marker else None, text.count("\n", 0, m.start()) + 1))
    return out


BLOCKS = [(page, *b) for page in PAGES for b in code_blocks(page)]


def _id(block) -> str:
    return f"{block[0].relative_to(ROOT)}:{block[4]}"


# ------------------------------------------------------------------ bash: parsed, never run
def commands(code: str) -> list[list[str]]:
    """The block's commands, continuation lines joined, comments dropped, each split like a shell."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def _parse(parser, argv: list[str], where: str):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(argv)!r} is not accepted by its program's own argument parser")


def _check_sets(args, where: str) -> None:
    """A command's --set assignments validated against its config, exactly as the command would."""
    from privlora.core.overrides import load_with_overrides, parse_overrides

    sets = getattr(args, "set", None) or []
    if not sets:
        return
    config = getattr(args, "config", None)
    try:
        if config is None or (ROOT / config).is_file():
            load_with_overrides(None if config is None else ROOT / config, sets)
        else:  # a file the reader makes (my.toml): the keys and value types still checked
            parse_overrides(sets)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{where}: --set {sets}: {exc}")


def check_command(words: list[str], where: str) -> None:
    from privlora.commands.cli import build_parser

    prog, rest = words[0], words[1:]
    if prog in ("privlora", ".venv/bin/privlora"):
        _check_sets(_parse(build_parser(), rest, where), where)
    elif prog in ("python", "python3", ".venv/bin/python") and rest[:1] == ["-m"]:
        import importlib

        module = importlib.import_module(rest[1])
        assert hasattr(module, "build_parser"), f"{where}: {rest[1]} has no build_parser() to check its arguments with"
        _check_sets(_parse(module.build_parser(), rest[2:], where), where)
    elif prog == "python3" and rest[:1] == ["dev.py"]:
        assert rest[1] in ("run", "test", "setup"), f"{where}: dev.py has no command {rest[1]!r}"
        if rest[1] == "run":
            _check_sets(_parse(build_parser(), ["run", *rest[2:]], where), where)
    elif words == ["source", ".venv/bin/activate"]:
        pass
    else:
        pytest.fail(f"{where}: {shlex.join(words)!r} is not a command this test can check; mark the block "
                    "<!-- illustrative --> (docs/writing-docs.md)")


# ------------------------------------------------------------------ toml: validated
def check_toml(code: str, page: Path, where: str, tmp_path: Path) -> None:
    from privlora.core.config import config_from_dict

    table = tomllib.loads(code)
    if "sweep" in table:  # a grid file: its config (relative to the page's folder) and [sweep.set] validated
        from privlora.commands.sweep import expand, make_grid

        folder = tmp_path / page.parent.relative_to(ROOT)
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("examples",):
            if not (tmp_path / sub).exists():
                (tmp_path / sub).symlink_to(ROOT / sub)
        grid_file = folder / "grid.toml"
        grid_file.write_text(code, encoding="utf-8")
        grid, _ = make_grid(grid_file=grid_file)
        points, _ = expand(grid)
        assert points, where
        return
    config_from_dict(table)


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_every_code_block_is_checked_or_marked(block, tmp_path):
    page, lang, code, marker, line = block
    where = _id(block)
    if marker == "illustrative":
        return
    if marker is not None and marker.startswith("run-by:"):
        test_file = ROOT / marker.split(":", 1)[1].strip()
        assert test_file.is_file(), f"{where}: {test_file} does not exist"
        assert page.name in test_file.read_text(encoding="utf-8"), f"{where}: {test_file.name} does not read {page.name}"
        return
    if lang == "bash":
        for words in commands(code):
            check_command(words, where)
    elif lang == "toml":
        check_toml(code, page, where, tmp_path)
    elif lang == "python":
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{where}:\n{done.stderr[-2000:]}"
    else:
        pytest.fail(f"{where}: a ```{lang} block is neither run by a test nor marked <!-- illustrative --> "
                    "(docs/writing-docs.md)")


def test_the_checker_refuses_what_it_should():
    """The bash check is not a rubber stamp: a wrong option, an unknown --set key, a bad value and
    an unknown program each fail."""
    for bad in (["privlora", "run", "--rounds", "3"], ["privlora", "run", "--set", "federation.roundz=3"],
                ["privlora", "run", "--set", "federation.rounds=three"],
                ["python", "-m", "privlora.transports.flower.local", "--nodez", "2"], ["rm", "-rf", "runs"],
                ["python3", "dev.py", "deploy"]):
        with pytest.raises((pytest.fail.Exception, AssertionError)):
            check_command(bad, "test")
    check_command(["privlora", "run", "examples/default.toml", "--set", "federation.rounds=2", "--out", "x"], "test")
    assert commands("privlora run a \\\n  --out b   # comment\n\n") == [["privlora", "run", "a", "--out", "b"]]


def test_the_your_data_example_loads_as_written(tmp_path, monkeypatch):
    """The csv and the config of docs/your-data.md, saved side by side, load as the guide says:
    four records, labels neg and pos."""
    from privlora.core.config import load_config
    from privlora.tasks.data import load_labelled_data

    page = ROOT / "docs" / "your-data.md"
    blocks = {lang: code for lang, code, _, _ in code_blocks(page) if lang in ("csv", "toml")}
    (tmp_path / "reviews.csv").write_text(blocks["csv"], encoding="utf-8")
    (tmp_path / "my.toml").write_text(blocks["toml"], encoding="utf-8")
    cfg = load_config(tmp_path / "my.toml")
    monkeypatch.chdir(tmp_path)  # today's loader reads a relative data.source from the current folder
    data = load_labelled_data(cfg.data)
    assert len(data) == 4 and data.label_names == ["neg", "pos"]
    assert list(data.labels) == [1, 0, 1, 0] and data.texts[0] == "Arrived quickly, works as described."


# ------------------------------------------------------------------ links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to dashes)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_the_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## A section\n[ok](#a-section) [bad](#no-such) [gone](missing.md)\n")
    assert anchors(page) == {"title", "a-section"}
    with pytest.raises(AssertionError, match=r"#no-such(.|\n)*missing.md"):
        test_every_relative_link_resolves(page)


# ------------------------------------------------------------------ generated reference
def test_the_configuration_reference_is_what_the_code_generates():
    from privlora.commands import docgen

    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == docgen.render(), ("docs/configuration.md differs from the config's fields and docstrings: run "
                                          "python -m privlora.commands.docgen and commit the result")


def test_every_config_field_is_described_and_no_fallback_is_stale():
    import dataclasses
    import typing

    from privlora.commands import docgen
    from privlora.core.config import ExperimentConfig

    keys, described = [], set(docgen.FALLBACK)
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            keys += [f"{f.name}.{g}" for g in (x.name for x in dataclasses.fields(cls))]
            described |= {f"{f.name}.{k}" for k in docgen.field_docs(cls)}
        else:
            keys.append(f.name)
    described |= set(docgen.field_docs(ExperimentConfig))
    assert [k for k in keys if k not in described] == []
    assert [k for k in docgen.FALLBACK if k not in keys] == []
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert all(f"| `{k}` |" in reference for k in keys)


def test_docgen_check_exits_1_on_a_stale_file(tmp_path):
    from privlora.commands import docgen

    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    assert docgen.main(["--check", "--out", str(stale)]) == 1
    assert docgen.main(["--out", str(stale)]) == 0 and docgen.main(["--check", "--out", str(stale)]) == 0


# ------------------------------------------------------------------ the front page and the site
def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    assert "python3 dev.py run --out runs/default" in text and "python3 dev.py test" in text
    assert "source .venv/bin/activate" in text and ".venv/bin/privlora" in text
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, f"guides the README does not link: {sorted(pages - linked)}"


def test_mkdocs_nav_lists_every_page():
    nav = re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    assert sorted(nav) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_mkdocs_builds_strictly(tmp_path):
    """With the docs extra installed (here, or an ``mkdocs`` on PATH, e.g. from a separate venv)."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("mkdocs") is not None:
        mkdocs = [sys.executable, "-m", "mkdocs"]
    elif shutil.which("mkdocs"):
        mkdocs = [shutil.which("mkdocs")]
    else:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    done = subprocess.run([*mkdocs, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
