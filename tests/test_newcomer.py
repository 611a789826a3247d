"""A newcomer's smaller troubles (issue 31, item 7), each driven as a user would: the command
line in a subprocess (SIGTERM) or through `privlora.commands.cli.main`, checking the message,
the exit code and the files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privlora.commands.cli import main
from privlora.core.config import config_from_dict, config_to_toml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "examples" / "default-run"


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def terminated(tmp_path_factory, tiny_model_dir):
    """A CLI run of 4 rounds, sent SIGTERM once round 1 is written: (folder, exit code, stderr)."""
    cfg = config_from_dict({
        "name": "term", "seed": 2, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 240, "num_clients": 3, "partition": "iid", "test_fraction": 0.25},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"rounds": 4, "clients_per_round": 3},
        "training": {"local_steps": 3, "batch_size": 16, "physical_batch_size": 16},
        # a delta above 1/n, accepted by its named override (issue 31, item 4)
        "privacy": {"noise_multiplier": 1.0, "delta": 0.05, "allow_large_delta": True},
    })
    root = tmp_path_factory.mktemp("term")
    (root / "c.toml").write_text(config_to_toml(cfg))
    out = root / "run"
    proc = subprocess.Popen([sys.executable, "-m", "privlora.commands.cli", "run", str(root / "c.toml"), "--out", str(out),
                             "--quiet"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(rows(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return out, proc.returncode, err


def test_sigterm_says_how_to_resume_and_exits_143(terminated):
    out, code, err = terminated
    assert code == 143
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "SIGTERM" in ln]
    assert lines == [f"privlora: terminated (SIGTERM); every finished round is kept: continue with `privlora run --resume {out}`"]
    assert not (out / "report.md").exists()
    # the override lets the run go on with privlora's own warnings only: no raw library warning
    assert "Warning" not in err and "opacus" not in err.lower(), err
    assert all(ln.startswith("privlora: ") for ln in err.splitlines()), err
    # one warning for the whole federation, not one per client (all three clients are above 1/n)
    delta_lines = [ln for ln in err.splitlines() if "is above 1/n" in ln]
    assert len(delta_lines) == 1 and "(and 2 other clients)" in delta_lines[0], err


def test_the_report_of_an_interrupted_run_says_it_is_unfinished(terminated, capsys):
    out = terminated[0]
    last = rows(out)[-1]["round"]
    assert 1 <= last < 4
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"after round {last} of 4" in md
    assert f"the run was interrupted after round {last} of 4" in md


def test_resume_finishes_then_a_second_resume_says_it_is_finished(terminated, capsys):
    out = terminated[0]
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    assert "after round 4 " in md and "of 4" not in md.split("after round 4")[1][:5] and "Unfinished" not in md
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{out} is already finished (all 4 rounds); there is nothing to resume" in err
    assert "backup" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_predict_takes_texts_after_json(terminated, capsys):
    out = terminated[0]
    if not (out / "adapter").is_dir():
        assert main(["run", "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--json", "A fine film.", "Awful."]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in printed] == ["A fine film.", "Awful."]
    assert all(set(p["probabilities"]) == {"rotten", "fresh"} for p in printed)
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(out), "--json", "x", "--bogus"])
    assert exc.value.code == 2


def test_the_epsilon_plot_draws_identical_curves_once_and_the_rest_apart(terminated, monkeypatch):
    import matplotlib.figure

    out = terminated[0]
    drawn = {}
    real = matplotlib.figure.Figure.savefig

    def capture(self, fname, *a, **k):
        drawn[Path(fname).name] = [(ln.get_label(), ln.get_linestyle(), ln.get_marker(), ln.get_color(), (tuple(ln.get_xdata()), tuple(ln.get_ydata())))
                                   for ln in self.axes[0].get_lines()]
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    assert main(["report", str(out)]) == 0
    lines = [ln for ln in drawn["privacy_epsilon.png"] if ln[0].startswith("client")]
    curves = [ln[4] for ln in lines]
    assert len(set(curves)) == len(curves)  # no curve drawn twice on top of itself
    assert len({ln[1:4] for ln in lines}) == len(lines)  # each curve its own style, marker and colour


def test_plurals_in_a_one_round_report(tmp_path, tiny_cfg):
    from privlora.reporting.report import summary_lines

    cfg = tiny_cfg(federation={"rounds": 1}, training={"local_steps": 1})
    text = "\n".join(summary_lines(cfg, [{"round": 0, "test_accuracy": 0.5, "test_loss": 1.0, "majority_baseline": 0.5},
                                         {"round": 1, "test_accuracy": 0.6, "test_loss": 0.9}],
                                   {"round": 1, "test_accuracy": 0.6, "test_loss": 0.9}, None))
    assert "1 round x 1 local step," in text and "1 rounds" not in text


def test_predict_on_the_committed_example_explains_the_missing_adapter(tmp_path, capsys):
    run = tmp_path / "default-run"
    shutil.copytree(DEFAULT_RUN, run)
    shutil.rmtree(run / "adapter", ignore_errors=True)
    assert main(["predict", str(run), "A fine film."]) == 2
    err = capsys.readouterr().err
    assert "has not finished" not in err
    assert f"{run} is a finished run whose trained adapter was not kept" in err
    assert f"privlora run {run / 'config.toml'} --out NEW_DIR" in err


def test_resume_on_the_committed_example_says_it_is_finished(tmp_path, capsys):
    run = tmp_path / "default-run"
    shutil.copytree(DEFAULT_RUN, run)
    assert main(["run", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "is already finished (all 6 rounds)" in err and "backup" not in err


def test_too_few_canaries_are_warned_about_with_the_minimum(tmp_path, capsys):
    from accounting.audit import default_candidates, epsilon_lower_bound

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    # the fewest canaries whose perfect guesses beat 0 at the audit's Bonferroni level (3 methods x 2 scores)
    def perfect(m):
        level = 1 - 0.05 / (3 * 2 * len(default_candidates(m)))
        return max(epsilon_lower_bound(m, k_in + k_out, k_in + k_out, 1e-5, level) for k_in, k_out in default_candidates(m))
    need = next(m for m in range(2, 200, 2) if perfect(m) > 0)
    assert main(["audit", "--canaries", str(need - 2), "--out", str(busy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"--canaries {need - 2}: even if every guess were right, {need - 2} canaries cannot give a lower bound on "
            f"epsilon above 0 at confidence 0.95 (it takes at least {need})") in err
    assert main(["audit", "--canaries", "40", "--out", str(busy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--canaries 40: even if every guess were right, 40 canaries give a lower bound of at most ε = " in err
    assert "below the ε = 8 the run targets" in err
    assert (busy / "x").read_text() == "keep"


def test_in_sweep_png_a_no_dp_line_at_the_majority_level_does_not_hide_it(tmp_path, monkeypatch):
    import matplotlib.figure

    from privlora.commands import sweep  # sweep.plot draws sweep.png for `privlora sweep` and `--table`

    drawn = {}
    real = matplotlib.figure.Figure.savefig

    def capture(self, fname, *a, **k):
        ax = self.axes[0]
        drawn["lines"] = [(ln.get_label(), ln.get_zorder(), tuple(ln.get_ydata())) for ln in ax.get_lines()]
        drawn["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    row = {"runs": 3, "accuracy_sd": 0.0, "majority_baseline": 0.563}
    rows = [dict(row, strategy="fedit", epsilon=float("inf"), accuracy_mean=0.563, accuracy_min=0.55, accuracy_max=0.58),
            dict(row, strategy="fedit", epsilon=4.0, accuracy_mean=0.69, accuracy_min=0.67, accuracy_max=0.70)]
    sweep.plot(rows, tmp_path / "sweep.png")
    lines = {label: (z, y) for label, z, y in drawn["lines"]}
    nodp, majority = lines["fedit no DP (ε = ∞): 0.563"], lines["majority class: 0.563"]
    assert nodp[1][0] == majority[1][0] == 0.563  # the same height ...
    assert majority[0] > nodp[0]  # ... and the majority line is drawn on top
    assert "majority class: 0.563" in drawn["legend"] and "fedit no DP (ε = ∞): 0.563" in drawn["legend"]


def test_the_default_runs_ten_clients_are_told_apart_in_privacy_epsilon_png(tmp_path, monkeypatch):
    import matplotlib.figure

    run = tmp_path / "default-run"
    shutil.copytree(DEFAULT_RUN, run)
    drawn = {}
    real = matplotlib.figure.Figure.savefig

    def capture(self, fname, *a, **k):
        drawn[Path(fname).name] = [(ln.get_label(), ln.get_linestyle(), ln.get_marker(), ln.get_color(), (tuple(ln.get_xdata()), tuple(ln.get_ydata())))
                                   for ln in self.axes[0].get_lines()]
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    assert main(["report", str(run)]) == 0
    lines = [ln for ln in drawn["privacy_epsilon.png"] if ln[0].startswith("client")]
    named = sorted(int(x) for ln in lines for x in ln[0].split(" (")[0].split(" ", 1)[1].split(", "))
    assert named == list(range(10))  # every client named once
    assert len({ln[4] for ln in lines}) == len(lines)  # identical curves are drawn once, with all their names
    assert len({ln[1:4] for ln in lines}) == len(lines) >= 2  # and each curve has its own colour, dash and marker
    assert len({ln[1:3] for ln in lines}) >= min(len(lines), 8)  # told apart by more than colour (grey print, colour blindness)


def test_the_committed_example_predicts_with_its_own_adapter(capsys):
    """examples/default-run keeps its trained adapter (300 KB): predict works on it, and the adapter
    scores the run's held-out split as metrics.jsonl says its final round did."""
    import numpy as np

    from privlora.core.config import load_config
    from privlora.tasks.data import load_labelled_data, run_split
    from privlora.tasks.predict import load_run_model

    assert main(["predict", str(DEFAULT_RUN), "--json", "A sharp, funny and moving film."]) == 0
    (out,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(out["probabilities"]) == {"rotten", "fresh"}
    cfg = load_config(DEFAULT_RUN / "config.toml")
    _, test = run_split(load_labelled_data(cfg.data), cfg.data, cfg.seed)
    model, tokenizer, names = load_run_model(DEFAULT_RUN)
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(test), 256):
            enc = tokenizer(test.texts[i:i + 256], truncation=True, max_length=cfg.model.max_length, padding=True,
                            return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).numpy()
            correct += int((pred == test.labels[i:i + 256]).sum())
    final = rows(DEFAULT_RUN)[-1]
    assert names == ["rotten", "fresh"]
    assert abs(correct / len(test) - final["test_accuracy"]) <= 1 / len(test), (correct / len(test), final["test_accuracy"])
