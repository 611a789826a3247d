"""Instruction data for task "causal-lm": (instruction, response) records as `LabelledData`.

A record's ``texts[i]`` is the instruction (the user's turn) and ``responses[i]`` the answer
the model is trained to give. ``label_names`` is the closed set of allowed answers when there
is one (the review task: ``["rotten", "fresh"]``, and then ``responses[i] ==
label_names[labels[i]]``, so answer accuracy is measurable by comparing the likelihood of the
allowed answers); it is empty for open-ended data, whose ``labels`` are the group ids (so a
Dirichlet partition skews by group).

Sources:

- ``embedded:rotten_tomatoes``: the embedded reviews (`privlora.tasks.data`), each turned into
  `REVIEW_INSTRUCTION` and answered "fresh" or "rotten"; grouped by movie as for classification.
- ``embedded:chatterbot``: the English question-answer pairs of the `chatterbot-corpus` package
  (``chatterbot_corpus/data/english/*.yml``, found with `importlib.util.find_spec`, never
  imported), grouped by the file's category: a natural non-IID split. A conversation of more
  than two turns gives one pair per (question, answer) turn.
- a local csv/json/jsonl/parquet file with ``data.instruction_column`` and
  ``data.response_column`` (and optionally ``data.group_column``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from privlora.core.config import EMBEDDED_DATA, EMBEDDED_QA, DataConfig
from privlora.tasks.data import DataError, LabelledData

REVIEW_INSTRUCTION = "Is this movie review fresh or rotten? Answer with one word: fresh or rotten.\n\nReview: {text}"
"""The instruction each embedded review becomes; the answer is the review's label name."""
CHATTERBOT_LANGUAGE = "english"


def review_instructions(reviews: LabelledData, prompt: str = "", answers: tuple[str, ...] = ()) -> LabelledData:
    """The embedded reviews as instruction records (``prompt`` with ``{text}``, default
    `REVIEW_INSTRUCTION`): the closed answer set is ``answers`` (one per label, rotten first),
    default the label names."""
    names = list(answers) if answers else list(reviews.label_names)
    template = prompt or REVIEW_INSTRUCTION
    return LabelledData(
        texts=[template.format(text=t) for t in reviews.texts],
        labels=reviews.labels,
        groups=reviews.groups,
        label_names=names,
        responses=[names[int(k)] for k in reviews.labels],
    )


def chatterbot_folder() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.source: {EMBEDDED_QA!r} needs the 'chatterbot-corpus' package; install it with "
            "`pip install --no-deps chatterbot-corpus==1.3.3`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / CHATTERBOT_LANGUAGE
    if not folder.is_dir() or not any(folder.glob("*.yml")):
        raise DataError(f"data.source: {folder} holds no .yml files; reinstall chatterbot-corpus")
    return folder


def chatterbot_pairs(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(questions, answers, category of each) from every ``*.yml`` in ``folder``, in file order."""
    import yaml

    questions, answers, groups = [], [], []
    for path in sorted(folder.glob("*.yml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"data.source: {path} is not readable YAML ({exc}); reinstall chatterbot-corpus") from exc
        category = path.stem
        for conversation in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if isinstance(t, (str, int, float))]
            for i in range(0, len(turns) - 1, 2):
                if turns[i] and turns[i + 1]:
                    questions.append(turns[i])
                    answers.append(turns[i + 1])
                    groups.append(category)
    if not questions:
        raise DataError(f"data.source: no question-answer pairs found in {folder}")
    return questions, answers, groups


def _open_records(texts: list[str], responses: list[str], group_values: list[str] | None) -> LabelledData:
    if group_values is None:
        groups = None
        labels = np.zeros(len(texts), dtype=np.int64)
    else:
        _, groups = np.unique(np.asarray(group_values), return_inverse=True)
        groups = groups.astype(np.int64)
        labels = groups.copy()
    return LabelledData(texts=texts, labels=labels, groups=groups, label_names=[], responses=responses)


def load_local_instructions(cfg: DataConfig) -> LabelledData:
    from privlora.tasks.data import IN_MEMORY, _in_memory, _load_dataset

    if cfg.source.startswith(IN_MEMORY):  # a DataFrame or Dataset given to privlora.run
        ds = _in_memory(cfg.source)
        path = Path(cfg.source)
    else:
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.source: {cfg.source!r} is neither {EMBEDDED_DATA!r}, {EMBEDDED_QA!r} nor an existing file; a relative "
                "data.source in a config file is resolved against that file's folder, one given with --set against the "
                "current folder"
            )
        ds = _load_dataset(path, cfg.instruction_column, cfg.response_column)
    for role, col in (("data.instruction_column", cfg.instruction_column), ("data.response_column", cfg.response_column)):
        if col not in ds.column_names:
            raise DataError(f"{role}: column {col!r} not found in {path.name}; the data has {ds.column_names}")
    if cfg.partition == "natural" and cfg.group_column not in ds.column_names:
        raise DataError(f"data.group_column: column {cfg.group_column!r} not found; the data has {ds.column_names}")
    texts, responses = list(ds[cfg.instruction_column]), list(ds[cfg.response_column])
    for role, col, values in (("data.instruction_column", cfg.instruction_column, texts),
                              ("data.response_column", cfg.response_column, responses)):
        empty = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
        if empty:
            raise DataError(f"{role}: {len(empty)} of {len(values)} records have an empty {col!r} (records "
                            f"{', '.join(str(i + 1) for i in empty[:10])}{' ...' if len(empty) > 10 else ''}; the first record is 1); "
                            "fill or delete them")
    group_values = [str(g) for g in ds[cfg.group_column]] if cfg.group_column in ds.column_names and cfg.group_column else None
    return _open_records([str(t) for t in texts], [str(r) for r in responses], group_values)


def load_instruction_data(cfg: DataConfig) -> LabelledData:
    """The configured instruction records (see the module docstring)."""
    if cfg.source == EMBEDDED_DATA:
        from privlora.tasks.data import load_labelled_data

        return review_instructions(load_labelled_data(cfg), cfg.review_prompt, tuple(cfg.review_answers))
    if cfg.source == EMBEDDED_QA:
        questions, answers, groups = chatterbot_pairs(chatterbot_folder())
        return _open_records(questions, answers, groups)
    return load_local_instructions(cfg)
