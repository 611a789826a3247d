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


# ---------------------------------------------------------------- every record checked (issue 31, item 1)

import subprocess
import sys
from pathlib import Path

from privlora.core.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "privlora.commands.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def reviews(tmp_path, rows, name="r.csv"):
    path = tmp_path / name
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


def test_empty_texts_and_labels_are_refused_with_their_rows(tmp_path):
    rows = [(f"review {i}", "pos" if i % 2 else "neg") for i in range(30)]
    rows[4] = ("", "pos")
    rows[11] = ("  ", "neg")
    path = reviews(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_labelled_data(DataConfig(source=str(path), partition="iid"))
    msg = str(err.value)
    assert msg.startswith("data.text_column: 2 records of") and "rows 5, 12" in msg
    assert "row 1 is the first line after the header" in msg and "data.drop_invalid = true" in msg
    rows[4], rows[11] = ("fine", "pos"), ("ok", "")
    with pytest.raises(DataError, match=r"^data.label_column: 1 record of .* has an empty or missing 'label' \(row 12;"):
        load_labelled_data(DataConfig(source=str(reviews(tmp_path, rows)), partition="iid"))


def test_drop_invalid_drops_them_and_says_how_many(tmp_path, capsys):
    rows = [(f"review {i}", "pos" if i % 2 else "neg") for i in range(30)]
    rows[4], rows[7] = ("", "pos"), ("good", "")
    d = load_labelled_data(DataConfig(source=str(reviews(tmp_path, rows)), partition="iid", drop_invalid=True))
    assert len(d) == 28 and "review 4" not in d.texts and "good" not in d.texts and "None" not in d.texts
    err = capsys.readouterr().err
    assert "dropped 2 of 30 records" in err and "rows 5, 8" in err


def test_a_label_typo_is_named_with_its_fix(tmp_path):
    rows = [(f"review {i}", "pos" if i % 2 else "neg") for i in range(40)]
    rows[9] = ("typo here", "Pos")
    path = reviews(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_labelled_data(DataConfig(source=str(path), partition="iid"))
    msg = str(err.value)
    assert msg.startswith("data.label_column: labels too rare to be real classes")
    assert "'Pos' has 1 record beside 'pos' (19)" in msg and "row 10" in msg
    assert 'data.labels = ["neg", "pos"]' in msg
    # an explicit label set refuses it too, and drop_invalid drops it
    with pytest.raises(DataError, match=r"^data.labels: .*'Pos' \(row 10\)"):
        load_labelled_data(DataConfig(source=str(path), partition="iid", labels=("neg", "pos")))
    d = load_labelled_data(DataConfig(source=str(path), partition="iid", labels=("pos", "neg"), drop_invalid=True))
    assert len(d) == 39 and d.label_names == ["pos", "neg"] and d.labels[0] == 1  # row 1 is "neg"


def test_a_rare_but_real_class_is_accepted_when_listed(tmp_path):
    rows = [(f"review {i}", "pos" if i % 2 else "neg") for i in range(40)] + [("meh", "mixed")]
    path = reviews(tmp_path, rows)
    with pytest.raises(DataError, match="'mixed' has 1 record"):
        load_labelled_data(DataConfig(source=str(path), partition="iid"))
    d = load_labelled_data(DataConfig(source=str(path), partition="iid", labels=("neg", "pos", "mixed")))
    assert d.num_labels == 3 and int((d.labels == 2).sum()) == 1


def test_data_labels_is_validated():
    with pytest.raises(ConfigError, match=r"^data.labels: must be two or more different"):
        config_from_dict({"data": {"source": "x.csv", "partition": "iid", "labels": ["a", "a"]}})
    with pytest.raises(ConfigError, match=r"^data.labels: the embedded reviews bring their own labels"):
        config_from_dict({"data": {"labels": ["a", "b"]}})


@pytest.mark.parametrize("name, body, where", [
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c" "label": 0}\n', "line 3, column 14"),
    ("d.jsonl", '{"text": "a", "label": 0}\n\n[1, 2]\n{"text": "b", "label": 1}\n', "line 3 is list"),
    ("d.json", '[\n {"text": "a", "label": 0},\n {"text": "b", "label": 1},,\n]\n', "line 3, column 28"),
])
def test_json_errors_give_the_line(tmp_path, name, body, where):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(DataError) as err:
        load_labelled_data(DataConfig(source=str(path), partition="iid"))
    assert str(err.value).startswith(f"data.source: {path} is not valid JSON: {where}"), str(err.value)


def test_a_relative_source_is_resolved_against_the_config_file(tmp_path):
    (tmp_path / "cfgs" / "data").mkdir(parents=True)
    reviews(tmp_path / "cfgs" / "data", [("a", "x"), ("b", "y")])
    cfg_path = tmp_path / "cfgs" / "c.toml"
    cfg_path.write_text('[data]\nsource = "data/r.csv"\npartition = "iid"\n')
    cfg = load_config(cfg_path)
    assert cfg.data.source == str(tmp_path / "cfgs" / "data" / "r.csv")
    assert len(load_labelled_data(cfg.data)) == 2


def test_a_missing_source_is_blamed_and_relative_paths_explained(tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('[data]\nsource = "nowhere.csv"\n')
    res = cli("run", str(cfg_path), "--out", str(tmp_path / "run"), "--quiet", cwd=tmp_path.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("privlora: error:")][0]
    assert line.startswith(f"privlora: error: data.source: '{tmp_path / 'nowhere.csv'}' is neither")
    assert "resolved against that file's folder" in line
    res = cli("run", "--set", "data.source=/nonexistent.csv", "--out", str(tmp_path / "run2"), "--quiet")
    assert res.returncode == 2
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("privlora: error:")][0]
    assert line.startswith("privlora: error: data.source: '/nonexistent.csv' is neither"), line
    assert "group_column" not in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_a_run_folders_own_config_keeps_a_source_relative_to_the_current_folder(tmp_path, monkeypatch):
    """A run started from Python with a cwd-relative source: its config.toml, read again (report,
    --resume), still means the same file, not one beside config.toml."""
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path, [("a", "x"), ("b", "y")], name="mine.csv")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text('[data]\nsource = "mine.csv"\npartition = "iid"\n')
    assert load_config(tmp_path / "run" / "config.toml").data.source == "mine.csv"
    (tmp_path / "run" / "custom.toml").write_text('[data]\nsource = "colours"\npartition = "iid"\n')
    assert load_config(tmp_path / "run" / "custom.toml").data.source == "colours"


def test_a_relative_source_given_with_set_is_the_current_folders_and_recorded_absolute(tmp_path, monkeypatch):
    from privlora.core.overrides import load_with_overrides

    monkeypatch.chdir(tmp_path)
    reviews(tmp_path, [("a", "x"), ("b", "y")], name="here.csv")
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.toml").write_text('[data]\npartition = "iid"\n')
    cfg = load_with_overrides(tmp_path / "cfgs" / "c.toml", ["data.source=here.csv"])
    assert cfg.data.source == str(tmp_path / "here.csv")
    assert load_with_overrides(None, ["data.source=embedded:rotten_tomatoes"]).data.source == "embedded:rotten_tomatoes"
