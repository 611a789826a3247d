"""Data loading: the embedded Rotten Tomatoes file and any local csv/json through datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privlora.core.config import DataConfig
from privlora.tasks.data import DataError, load_labelled_data, train_test_split


def test_embedded_rotten_tomatoes_has_the_documented_shape():
    d = load_labelled_data(DataConfig())
    assert len(d) == 12808
    assert d.label_names == ["rotten", "fresh"]
    assert int(d.labels.sum()) == 7403  # fresh
    assert len(np.unique(d.groups)) == 508
    assert 0.57 < d.majority_fraction() < 0.59


def test_local_csv_with_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,sentiment,shop\nlovely,pos,a\nawful,neg,b\n\"fine, really\",pos,a\nbad,neg,c\n")
    d = load_labelled_data(DataConfig(source=str(path), text_column="review", label_column="sentiment", group_column="shop"))
    assert d.texts[2] == "fine, really"
    assert d.label_names == ["neg", "pos"] and d.labels.tolist() == [1, 0, 1, 0]
    assert len(np.unique(d.groups)) == 3


def test_local_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(9)))
    d = load_labelled_data(DataConfig(source=str(path), partition="iid"))
    assert d.num_labels == 3 and d.groups is None


def test_missing_column_and_missing_file_are_named(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("body,label\nx,1\ny,0\n")
    with pytest.raises(DataError, match=r"^data.text_column: column 'text' not found; the data has \['body', 'label'\]"):
        load_labelled_data(DataConfig(source=str(path), partition="iid"))
    with pytest.raises(DataError, match="^data.source"):
        load_labelled_data(DataConfig(source=str(tmp_path / "none.csv")))
    bad = tmp_path / "r.xlsx"
    bad.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_labelled_data(DataConfig(source=str(bad), partition="iid"))


def test_split_is_disjoint_seeded_and_sized():
    d = load_labelled_data(DataConfig())
    train, test = train_test_split(d, 0.1, seed=1, max_examples=1000)
    assert len(train) == 900 and len(test) == 100
    train2, test2 = train_test_split(d, 0.1, seed=1, max_examples=1000)
    assert train2.texts == train.texts and test2.texts == test.texts
