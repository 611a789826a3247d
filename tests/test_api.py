"""The Python API (issue 31, item 6), driven through the public names of `privlora` only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import privlora

ROOT = Path(__file__).resolve().parents[1]


def test_import_privlora_is_light_and_lists_its_api():
    code = ("import sys, privlora; cfg = privlora.load_config(); privlora.Task; privlora.ExperimentConfig; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.strip()
    assert out == "[]"
    for name in ("run", "RunResult", "load_config", "ExperimentConfig", "ConfigError", "Task", "register_task", "STRATEGIES"):
        assert name in privlora.__all__ and getattr(privlora, name) is not None
    assert set(privlora.STRATEGIES) == {"fedit", "ffa", "flora", "hetlora"}
    with pytest.raises(AttributeError):
        privlora.no_such_name


def test_run_validates_like_the_cli_and_writes_nothing(tmp_path, capsys):
    from privlora.commands.cli import main

    cfg = privlora.ExperimentConfig(data=privlora.DataConfig(num_clients=3),
                                    federation=privlora.FederationConfig(clients_per_round=50))
    out = tmp_path / "run"
    with pytest.raises(privlora.ConfigError) as err:
        privlora.run(cfg, out=out)
    assert not out.exists()
    toml = tmp_path / "c.toml"
    toml.write_text(privlora.config_to_toml(privlora.ExperimentConfig()).replace("clients_per_round = 5", "clients_per_round = 50")
                    .replace("num_clients = 10", "num_clients = 3"))
    assert main(["run", str(toml), "--out", str(out), "--quiet"]) == 2
    assert f"privlora: error: {err.value}" in capsys.readouterr().err
    assert str(err.value) == "federation.clients_per_round: must be in [1, data.num_clients=3], found 50"
    assert not out.exists()
    with pytest.raises(privlora.ConfigError, match=r"^config: privlora.run needs a config"):
        privlora.run(None, out=out)
    with pytest.raises(privlora.ConfigError, match=r"^config: expected an ExperimentConfig"):
        privlora.run(42, out=out)
    with pytest.raises(privlora.UserError, match=r"^data: expected a pandas DataFrame or a datasets.Dataset"):
        privlora.run({"data": {"partition": "iid"}}, out=out, data=[("a", 1)])
    assert not out.exists()


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """One small DP run from a DataFrame, a model object and a tokenizer object, with a callback."""
    import pandas as pd
    from transformers import AutoTokenizer

    from privlora.tasks.models import resolve_model_path  # only to find a tokenizer on disk for the test
    from tests.conftest import tiny_bert

    texts = [f"{w} film number {i}" for i, w in enumerate(["great", "awful", "lovely", "boring"] * 30)]
    labels = ["pos" if i % 2 == 0 else "neg" for i in range(len(texts))]
    frame = pd.DataFrame({"review": texts, "sentiment": labels})
    model = tiny_bert(num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("embedded:minilm")))
    cfg = privlora.config_from_dict({
        "name": "api", "seed": 1, "threads": 1,
        "model": {"max_length": 16},
        "data": {"text_column": "review", "label_column": "sentiment", "partition": "iid", "num_clients": 3,
                 "test_fraction": 0.25},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"rounds": 2, "clients_per_round": 3},
        "training": {"local_steps": 1, "batch_size": 16, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-3},
    })
    seen = []
    out = tmp_path_factory.mktemp("api") / "run"
    result = privlora.run(cfg, out=out, data=frame, model=model, tokenizer=tokenizer, on_round=seen.append)
    return result, seen, model, before, frame


def test_run_from_objects_with_a_callback(api_run):
    result, seen, model, before, frame = api_run
    lines = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in seen] == [1, 2]
    for m in seen:  # the callback saw exactly what metrics.jsonl holds for the round
        assert m == lines[m["round"]]
    assert result.rounds == 2 and result.metrics == lines
    assert result.test_accuracy == lines[-1]["test_accuracy"] and result.epsilon_max == lines[-1]["epsilon_max"] > 0
    assert result.delta == 1e-3 and result.stopped is None
    assert (result.adapter_path / "adapter_config.json").is_file() and result.report_path.is_file()
    written = privlora.load_config(result.out / "config.toml")
    assert written.data.source == "python:data" and written.model.path == "python:model"
    card = json.loads((result.out / "model.json").read_text())
    assert card["label_names"] == ["neg", "pos"]
    # 25% of 120 held out: the rest split across three clients
    assert sum(lines[0]["client_sizes"]) == 90
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # the object passed in is untouched
    assert not any("great film" in p.read_text(errors="ignore") for p in result.out.rglob("*") if p.is_file()
                   and p.suffix in (".toml", ".json", ".jsonl", ".md"))  # the data itself is never written


def test_a_data_problem_in_a_dataframe_is_named_with_its_rows(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": ["a", None, "c", "d"], "label": [0, 1, 0, 1]})
    cfg = privlora.config_from_dict({"data": {"partition": "iid", "num_clients": 2}, "federation": {"clients_per_round": 2}})
    with pytest.raises(privlora.DataError, match=r"^data.text_column: 1 record of python:data has an empty or missing 'text' "
                                                 r"\(row 2; row 1 is the table's first row\)"):
        privlora.run(cfg, out=tmp_path / "run", data=frame)
    assert not (tmp_path / "run").exists()


def test_a_datasets_dataset_is_read_and_checked_alike(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["x", "y", "", "y"]})
    cfg = privlora.config_from_dict({"data": {"partition": "iid", "num_clients": 2}, "federation": {"clients_per_round": 2}})
    with pytest.raises(privlora.DataError, match=r"^data.label_column: 1 record of python:data has an empty or missing 'label' \(row 3;"):
        privlora.run(cfg, out=tmp_path / "run", data=ds)
    assert not (tmp_path / "run").exists()


def test_privacy_delta_above_one_over_n_is_refused_unless_allowed(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]})
    cfg = privlora.config_from_dict({"data": {"partition": "iid", "num_clients": 2, "test_fraction": 0.5},
                                     "federation": {"clients_per_round": 2}, "privacy": {"delta": 0.2}})
    with pytest.raises(privlora.ConfigError) as err:
        privlora.run(cfg, out=tmp_path / "run", data=frame)
    # 20 training records over 2 iid clients: 10 each, so 1/n = 0.1
    assert str(err.value).startswith("privacy.delta: 0.2 is above 1/n = 0.1 for the smallest client (client 0, n = 10 training records)")
    assert "privacy.delta = 0.01" in str(err.value) and "privacy.allow_large_delta = true" in str(err.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(privlora.ConfigError, match=r"^privacy.allow_large_delta: expected true or false"):
        privlora.config_from_dict({"privacy": {"allow_large_delta": "yes"}})
