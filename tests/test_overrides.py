"""``--set KEY=VALUE``: typed like TOML, validated like the file, recorded in config.toml, and a
bad key, value or form named in one line."""

from __future__ import annotations

import pytest

from privlora.commands.cli import main
from privlora.core.config import ConfigError, ExperimentConfig, config_to_toml, load_config
from privlora.core.overrides import apply_overrides, load_with_overrides, parse_overrides


def test_values_are_toml_and_strings_may_be_bare():
    cfg = load_with_overrides(None, [
        "federation.rounds=3",
        'lora.target_modules=["query","value","key"]',
        "privacy.enabled=false",
        "training.lr=0.01",
        "privacy.target_epsilon=4",  # an integer where a number is expected, as in a file
        "federation.strategy=fedit",  # bare string
        'name="my run"',  # quoted string
        "model.path=/models/mini lm",  # bare string with a space and slashes
        "data.text_column = review ",  # spaces around key and value are dropped
        "federation.rounds=4",  # a later --set of the same key wins
        "lora.layers=[]",
    ])
    assert cfg.federation.rounds == 4
    assert cfg.lora.target_modules == ("query", "value", "key")
    assert cfg.privacy.enabled is False
    assert cfg.training.lr == 0.01
    assert cfg.privacy.target_epsilon == 4.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.federation.strategy == "fedit" and cfg.name == "my run"
    assert cfg.model.path == "/models/mini lm" and cfg.data.text_column == "review"
    # everything not overridden is the embedded default
    default = ExperimentConfig()
    assert cfg.data.num_clients == default.data.num_clients and cfg.training.batch_size == default.training.batch_size


def test_no_override_is_exactly_load_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 2\n")
    assert load_with_overrides(path, []) == load_config(path)
    assert load_with_overrides(None, []) == ExperimentConfig()


def test_overrides_apply_to_the_files_table_and_are_validated_with_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 7\n[data]\nnum_clients = 4\n[federation]\nrounds = 2\nclients_per_round = 4\n')
    cfg = load_with_overrides(path, ["federation.rounds=5", "training.local_steps=2"])
    assert (cfg.seed, cfg.data.num_clients, cfg.federation.rounds, cfg.training.local_steps) == (7, 4, 5, 2)
    # cross-field rules see the file and the overrides together
    with pytest.raises(ConfigError, match=r"federation.clients_per_round: must be in \[1, data.num_clients=3\], found 4"):
        load_with_overrides(path, ["data.num_clients=3"])
    # a range error in an overridden field says which --set it came from
    with pytest.raises(ConfigError, match=r"federation.rounds: must be >= 1, found 0 \(from --set federation.rounds=0\)"):
        load_with_overrides(path, ["federation.rounds=0"])
    # an override can fix a file that is invalid on its own
    path.write_text("[federation]\nrounds = 0\n")
    assert load_with_overrides(path, ["federation.rounds=1"]).federation.rounds == 1
    # the file's own errors stay the file's
    with pytest.raises(ConfigError, match="does not exist"):
        load_with_overrides(tmp_path / "missing.toml", ["seed=1"])
    (tmp_path / "bad.toml").write_text("[federation\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_with_overrides(tmp_path / "bad.toml", ["seed=1"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("federation.roundz=3", "federation.roundz: unknown key. Allowed keys here: strategy, rounds, clients_per_round"),
        ("feder.rounds=3", "feder: unknown key. Allowed keys here: name, seed, threads, model, data, lora, federation"),
        ("federation=3", "federation: is a table; set one of its keys, e.g. --set federation.KEY=VALUE. Allowed keys here: strategy"),
        ("federation.rounds.x=3", "federation.rounds: is a single value, not a table"),
        ("federation..rounds=3", "a key is dotted names such as federation.rounds or seed"),
    ],
)
def test_a_bad_key_is_named_with_the_keys_allowed_there(text, message):
    with pytest.raises(ConfigError) as exc:
        parse_overrides([text])
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("federation.rounds=three", "federation.rounds: expected an integer, found 'three', which is not a TOML value; e.g. --set federation.rounds=3"),
        ("federation.rounds=3.5", "federation.rounds: expected an integer, found 3.5"),
        ('federation.rounds="3"', "federation.rounds: expected an integer, found '3'"),
        ("privacy.enabled=yes", "privacy.enabled: expected true or false, found 'yes'"),
        ("privacy.enabled=1", "privacy.enabled: expected true or false, found 1"),
        ("training.lr=fast", "training.lr: expected a number, found 'fast'"),
        ("lora.target_modules=query", "lora.target_modules: expected a list of strings, found 'query'"),
        ("lora.target_modules=[1, 2]", "lora.target_modules[0]: expected a string, found 1"),
        ("name=3", "name: expected a string, found 3; quote it"),
        ("federation.rounds=3\nseed = 9", "federation.rounds: expected an integer"),  # no smuggled second key
        ("privacy.target_epsilon=inf", "privacy.target_epsilon: expected a finite number, found inf"),
        ("federation.strategy=fedavg", "federation.strategy: 'fedavg' is not one of 'fedit', 'ffa'"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_the_type(text, message):
    with pytest.raises(ConfigError) as exc:
        load_with_overrides(None, [text])
    assert message in str(exc.value)


def test_missing_equals_sign():
    with pytest.raises(ConfigError, match=r"--set 'federation.rounds': expected KEY=VALUE with a dotted key, e.g. --set federation.rounds=3"):
        parse_overrides(["federation.rounds"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["=3"])


def test_apply_overrides_leaves_the_raw_table_alone():
    raw = {"federation": {"rounds": 2}}
    out = apply_overrides(raw, {"federation.rounds": 3, "privacy.enabled": False})
    assert raw == {"federation": {"rounds": 2}}
    assert out == {"federation": {"rounds": 3}, "privacy": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"federation: expected a table \[federation\] in the config, found 5"):
        apply_overrides({"federation": 5}, {"federation.rounds": 3})


# --------------------------------------------------------------------------- the command line


def test_run_records_the_override_in_config_toml(tmp_path, tiny_model_dir, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'name = "cli"\nthreads = 1\n[model]\npath = "{tiny_model_dir}"\nmax_length = 32\n'
        '[data]\nmax_examples = 200\nnum_clients = 2\npartition = "iid"\n'
        '[lora]\nr = 2\n[federation]\nrounds = 3\nclients_per_round = 2\n'
        '[training]\nlocal_steps = 1\nbatch_size = 16\n[privacy]\nenabled = true\ntarget_epsilon = 8.0\n'
    )
    out = tmp_path / "out"
    argv = ["run", str(cfg), "--out", str(out), "--quiet", "--set", "federation.rounds=1", "--set", "privacy.enabled=false",
            "--set", 'lora.target_modules=["query"]', "--set", "name=overridden"]
    assert main(argv) == 0
    written = load_config(out / "config.toml")
    assert written.federation.rounds == 1 and written.privacy.enabled is False
    assert written.lora.target_modules == ("query",) and written.name == "overridden"
    assert written.data.max_examples == 200  # the file's other values are kept
    assert (out / "config.toml").read_text() == config_to_toml(written)
    assert not (out / "ledger.jsonl").exists()  # privacy.enabled=false took effect
    rounds = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rounds) == 2  # round 0 and the one round --set asked for


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--set", "federation.roundz=3"], "privlora: error: federation.roundz: unknown key. Allowed keys here: strategy"),
        (["run", "--set", "federation.rounds=three"], "privlora: error: federation.rounds: expected an integer, found 'three'"),
        (["run", "--set", "federation.rounds"], "privlora: error: --set 'federation.rounds': expected KEY=VALUE"),
        (["audit", "--set", "privacy.enabld=true"], "privlora: error: privacy.enabld: unknown key. Allowed keys here: enabled"),
        (["audit", "--set", "privacy.delta=big"], "privlora: error: privacy.delta: expected a number, found 'big'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


def test_set_with_resume_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(ExperimentConfig()))
    before = (run / "config.toml").read_text()
    assert main(["run", "--resume", str(run), "--set", "federation.rounds=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"privlora: error: --set cannot be used with --resume: {run} continues with its own config.toml")
    assert err.count("\n") == 1
    assert (run / "config.toml").read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.toml"]
