"""The command line: bad input gets one clear error and exit code 2; report re-renders."""

from __future__ import annotations

import pytest

from privlora.commands.cli import main


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[federation]\nstrategy = "fedavg"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "privlora: error: federation.strategy: 'fedavg' is not one of 'fedit', 'ffa'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_data_file_is_named(tmp_path, capsys, tiny_model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\nsource = "{tmp_path}/nope.csv"\npartition = "iid"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "data.source" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    assert main(["run", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_run_and_report_on_the_tiny_model(tmp_path, capsys, tiny_model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'name = "cli"\nthreads = 1\n[model]\npath = "{tiny_model_dir}"\nmax_length = 32\n'
        '[data]\nmax_examples = 200\nnum_clients = 2\npartition = "iid"\n'
        '[lora]\nr = 2\n[federation]\nrounds = 1\nclients_per_round = 2\n'
        '[training]\nlocal_steps = 1\nbatch_size = 16\n[privacy]\nenabled = false\n'
    )
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert '"test_accuracy"' in capsys.readouterr().out
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "No differential privacy" in text


@pytest.mark.parametrize("argv", [["run", "a.toml", "b.toml"], ["frobnicate"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
