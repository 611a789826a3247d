"""Per-client ranks from the config: an explicit list, or a named distribution assigned by seed."""

from __future__ import annotations

import pytest

from privlora.core.config import RANK_DISTRIBUTIONS, ConfigError, config_from_dict, config_to_toml, load_config


def cfg(num_clients=10, seed=0, **lora):
    return config_from_dict({"seed": seed, "data": {"num_clients": num_clients},
                             "federation": {"clients_per_round": min(5, num_clients), "strategy": "flora"}, "lora": lora})


def test_flora_distribution_gives_each_of_ten_clients_one_rank_of_the_paper_list():
    c = cfg(rank_distribution="flora")
    ranks = c.client_ranks()
    assert sorted(ranks) == sorted(RANK_DISTRIBUTIONS["flora"]) == [4, 4, 4, 4, 8, 8, 16, 16, 32, 64]
    assert [c.client_rank(k) for k in range(10)] == list(ranks)
    assert c.max_rank == 64 and c.heterogeneous


def test_assignment_is_fixed_by_the_seed_and_differs_between_seeds():
    assert cfg(seed=3, rank_distribution="flora").client_ranks() == cfg(seed=3, rank_distribution="flora").client_ranks()
    orders = {cfg(seed=s, rank_distribution="flora").client_ranks() for s in range(6)}
    assert len(orders) > 1


def test_the_list_is_repeated_cyclically_for_other_federation_sizes():
    ranks = cfg(num_clients=13, rank_distribution="flora").client_ranks()
    base = RANK_DISTRIBUTIONS["flora"]
    assert sorted(ranks) == sorted(base + base[:3])
    assert sorted(cfg(num_clients=4, rank_distribution="flora").client_ranks()) == sorted(base[:4])


def test_explicit_ranks_and_the_default_rank():
    assert cfg(num_clients=3, ranks=[4, 2, 8]).client_ranks() == (4, 2, 8)
    assert cfg(num_clients=3, r=6).client_ranks() == (6, 6, 6)


def test_the_resolved_config_round_trips_with_its_distribution(tmp_path):
    c = cfg(seed=4, rank_distribution="flora")
    (tmp_path / "c.toml").write_text(config_to_toml(c))
    again = load_config(tmp_path / "c.toml")
    assert again == c and again.client_ranks() == c.client_ranks()


@pytest.mark.parametrize(
    "raw, field, words",
    [
        ({"lora": {"rank_distribution": "zipf"}}, "lora.rank_distribution", "'flora'"),
        ({"lora": {"rank_distribution": "flora", "ranks": [4] * 10}}, "lora.rank_distribution", "both set"),
        ({"lora": {"rank_distribution": "flora"}, "federation": {"strategy": "fedit"}}, "lora.rank_distribution", "fedit"),
        ({"federation": {"flora_form": "stack"}}, "federation.flora_form", "'product', 'slot'"),
        ({"federation": {"hetlora_decay": 1.0}}, "federation.hetlora_decay", "(0, 1)"),
        ({"federation": {"hetlora_threshold": -0.1}}, "federation.hetlora_threshold", "[0, 1)"),
        ({"federation": {"hetlora_penalty": -1.0}}, "federation.hetlora_penalty", ">= 0"),
        ({"federation": {"hetlora_norm_scope": "model"}}, "federation.hetlora_norm_scope", "'layer', 'global'"),
        ({"federation": {"hetlora_prune": "yes"}}, "federation.hetlora_prune", "true or false"),
    ],
)
def test_bad_values_name_the_field(raw, field, words):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert str(exc.value).startswith(field + ":"), str(exc.value)
    assert words in str(exc.value)


def test_strategy_from_config_passes_every_option():
    from privlora.strategies import FLoRA, HetLoRA, strategy_from_config

    c = config_from_dict({"lora": {"r": 4, "alpha": 6.0, "rank_distribution": "flora"},
                          "federation": {"strategy": "flora", "flora_form": "slot"}})
    f = strategy_from_config(c)
    assert isinstance(f, FLoRA) and f.form == "slot" and f.scaling == 1.5 and f.client_ranks == c.client_ranks()
    assert f.max_rank == 64 and not f.secagg_compatible
    h = strategy_from_config(config_from_dict({"federation": {"strategy": "hetlora", "hetlora_prune": True, "hetlora_penalty": 0.2,
                                                              "hetlora_decay": 0.6, "hetlora_threshold": 0.3, "hetlora_norm_scope": "global"}}))
    assert isinstance(h, HetLoRA) and (h.prune_ranks, h.penalty_strength, h.decay, h.threshold, h.norm_scope) == (True, 0.2, 0.6, 0.3, "global")
