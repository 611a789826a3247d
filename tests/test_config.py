"""Config loading: every error names the dotted field; the resolved config round-trips."""

from __future__ import annotations

import pytest

from privlora.core.config import ConfigError, ExperimentConfig, config_from_dict, config_to_toml, load_config


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"federation": {"strategy": "fedavg"}}, "federation.strategy", "'fedit', 'ffa'"),
        ({"federation": {"rounds": 0}}, "federation.rounds", ">= 1"),
        ({"privacy": {"delta": 1.5}}, "privacy.delta", "(0, 1)"),
        ({"privacy": {"target_epsilon": -1.0}}, "privacy.target_epsilon", "(0, 100]"),
        ({"training": {"lr": "fast"}}, "training.lr", "expected a number"),
        ({"training": {"local_steps": 2.5}}, "training.local_steps", "expected an integer"),
        ({"lora": {"target_modules": "query"}}, "lora.target_modules", "list of str"),
        ({"lora": {"ranks": [4, 4]}}, "lora.ranks", "data.num_clients is 10"),
        ({"data": {"partition": "random"}}, "data.partition", "'iid', 'dirichlet', 'natural'"),
        ({"data": {"num_clients": 4}, "federation": {"clients_per_round": 5}}, "federation.clients_per_round", "[1, data.num_clients=4]"),
        ({"privacy": {"enabled": "yes"}}, "privacy.enabled", "true or false"),
        ({"federation": {"strategy": "fedit", "clients_per_round": 2}, "data": {"num_clients": 2}, "lora": {"ranks": [4, 8]}}, "lora.ranks", "fedit"),
    ],
)
def test_bad_values_name_the_field(raw, field, words):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    msg = str(exc.value)
    assert msg.startswith(field + ":"), msg
    assert words in msg, msg


def test_unknown_keys_are_errors_not_ignored():
    with pytest.raises(ConfigError, match=r"^training\.learning_rate: unknown key\. Allowed keys here: .*\blr\b"):
        config_from_dict({"training": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"^optimiser: unknown key"):
        config_from_dict({"optimiser": "sgd"})


def test_a_section_given_as_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"^privacy: expected a table"):
        config_from_dict({"privacy": 8})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = config_from_dict({"seed": 7, "lora": {"ranks": [8, 4, 4, 2], "target_modules": ["query"]},
                            "data": {"num_clients": 4}, "federation": {"clients_per_round": 2}})
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == ExperimentConfig()


def test_shipped_examples_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))
    assert len(examples) >= 2
    for path in examples:
        load_config(path)
    assert any(load_config(p).heterogeneous for p in examples)


def test_examples_default_is_the_embedded_default():
    from pathlib import Path

    assert load_config(Path(__file__).parents[1] / "examples" / "default.toml") == ExperimentConfig()


def test_head_lr_and_layers_are_validated():
    with pytest.raises(ConfigError, match=r"^training.head_lr: must be >= 0"):
        config_from_dict({"training": {"head_lr": -1.0}})
    with pytest.raises(ConfigError, match=r"^lora.layers: has duplicates"):
        config_from_dict({"lora": {"layers": [1, 1]}})
