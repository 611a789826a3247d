"""Using the trained model (issue 16, case 1): label names and the base model's identity are in
the run folder, `privlora predict` prints labels with probabilities, and the peft recipe of docs/results.md
works as written."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from privlora.commands.cli import main
from privlora.core.config import config_to_toml

README = Path(__file__).resolve().parents[1] / "docs" / "results.md"  # the peft recipe's page
TEXTS = ["A sharp, funny and moving film.", "Dull, long and badly acted."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A finished tiny DP run on the embedded reviews, made through the command line."""
    from privlora.core.config import config_from_dict

    cfg = config_from_dict({
        "name": "predict", "seed": 1, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 200, "num_clients": 2, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "training": {"local_steps": 2, "batch_size": 16, "physical_batch_size": 16, "lr": 0.5},
        "privacy": {"noise_multiplier": 1.0},
    })
    root = tmp_path_factory.mktemp("predict")
    (root / "c.toml").write_text(config_to_toml(cfg))
    out = root / "run"
    assert main(["run", str(root / "c.toml"), "--out", str(out), "--quiet"]) == 0
    return out


def plain_peft_probabilities(tiny_model_dir, run_dir, texts):
    """The model's probabilities computed with transformers and peft alone (no privlora code).
    The run's head reads the mean of the last hidden states over the real tokens (the default
    model.pooling = "mean"): computed here by hand from the adapted encoder's output."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert json.loads((run_dir / "model.json").read_text())["pooling"] == "mean"
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with torch.inference_mode():
        enc = tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        inner = model.base_model.model
        hidden = inner.bert(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return inner.classifier((hidden * m).sum(1) / m.sum(1)).softmax(-1).tolist()


def test_the_run_folder_names_its_labels_and_base_model(run_dir, tiny_model_dir):
    card = json.loads((run_dir / "model.json").read_text())
    assert card["label_names"] == ["rotten", "fresh"]  # the embedded data's labels, 0 = rotten
    assert card["num_labels"] == 2 and card["max_length"] == 32
    assert card["base_model"] == str(Path(tiny_model_dir).resolve())
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == card["base_model"]


def test_predict_prints_each_texts_label_and_probability(run_dir, tiny_model_dir, capsys):
    assert main(["predict", str(run_dir), *TEXTS]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    expected = plain_peft_probabilities(tiny_model_dir, run_dir, TEXTS)
    names = ["rotten", "fresh"]
    for line, text, probs in zip(lines, TEXTS, expected):
        label, prob, shown = line.split("\t")
        best = max(range(2), key=probs.__getitem__)
        assert label == names[best] and shown == text
        assert float(prob) == pytest.approx(probs[best], abs=1e-4)
    assert "LABEL_" not in captured.out
    assert "MISSING" not in captured.err and "Traceback" not in captured.err


def test_predict_reads_a_csv_or_jsonl_file(run_dir, tiny_model_dir, tmp_path, capsys):
    csv = tmp_path / "texts.csv"
    csv.write_text("id,text\n" + "".join(f"{i},\"{t}\"\n" for i, t in enumerate(TEXTS)))
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    expected = plain_peft_probabilities(tiny_model_dir, run_dir, TEXTS)
    for f in (csv, jsonl):
        assert main(["predict", str(run_dir), "--file", str(f), "--json"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in rows] == TEXTS
        for r, probs in zip(rows, expected):
            assert r["probabilities"]["rotten"] == pytest.approx(probs[0], abs=1e-5)
            assert r["probabilities"]["fresh"] == pytest.approx(probs[1], abs=1e-5)


def test_predict_on_an_unfinished_run_or_a_wrong_column_says_what_to_do(run_dir, tmp_path, capsys):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    shutil.rmtree(cut / "adapter")
    assert main(["predict", str(cut), "text"]) == 2
    err = capsys.readouterr().err
    assert f"privlora run --resume {cut}" in err and "Traceback" not in err
    f = tmp_path / "t.csv"
    f.write_text("review\nfine\n")
    assert main(["predict", str(run_dir), "--file", str(f)]) == 2
    assert "has no column 'text'; its columns are ['review']" in capsys.readouterr().err


def readme_recipe() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    recipe = [b for b in blocks if "load_base_for_run" in b and "PeftModel.from_pretrained" in b]
    assert len(recipe) == 1, "docs/results.md must hold exactly one python block with the peft recipe"
    return recipe[0]


def test_the_readme_recipe_works_as_written(run_dir, tiny_model_dir, tmp_path):
    """The README's block, run as a user would (a fresh Python, from another folder), prints
    the label probabilities plain peft computes, and nothing on stderr (no load report, no warning)."""
    import os
    import subprocess
    import sys

    code = readme_recipe()
    assert len(code.strip().splitlines()) <= 6
    assert "runs/default" in code
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONWARNINGS"))}
    done = subprocess.run([sys.executable, "-c", code.replace("runs/default", str(run_dir))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    shown = ast.literal_eval(done.stdout.strip())  # the recipe prints {label: probability} for its one text
    text = re.search(r'tokenizer\(\["([^"]+)"\]', code).group(1)
    (probs,) = plain_peft_probabilities(tiny_model_dir, run_dir, [text])
    assert list(shown) == ["rotten", "fresh"]
    assert shown["rotten"] == pytest.approx(probs[0], abs=1e-5) and shown["fresh"] == pytest.approx(probs[1], abs=1e-5)


@pytest.mark.slow
def test_the_embedded_base_is_named_not_located_in_the_adapter(tmp_path):
    """adapter_config.json names "embedded:minilm", not this machine's site-packages path."""
    from privlora.tasks.adapters import make_peft_model
    from privlora.core.config import ExperimentConfig
    from privlora.tasks.models import load_classifier
    from privlora.tasks.adapters import atomic_save_adapter as _atomic_save_adapter

    cfg = ExperimentConfig()
    model = make_peft_model(load_classifier("embedded:minilm", 2, 0), cfg, 2)
    _atomic_save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "embedded:minilm"


def test_a_run_made_before_model_json_still_predicts_with_its_label_names(run_dir, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "model.json").unlink()
    assert main(["predict", str(old), *TEXTS]) == 0
    rebuilt = capsys.readouterr().out
    assert main(["predict", str(run_dir), *TEXTS]) == 0
    assert rebuilt == capsys.readouterr().out and rebuilt.split("\t")[0] in ("rotten", "fresh")
