"""The comparison benchmark's grid is a set of valid, comparable configs (benchmarks/strategies.py)."""

import importlib.util
from pathlib import Path

import pytest

from privlora.core.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_strategies", ROOT / "benchmarks" / "strategies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_job_is_a_valid_config_and_budgets_are_equal():
    bench = load_benchmark()
    jobs = bench.jobs([0, 1, 2])
    assert len({bench.key(j) for j in jobs}) == len(jobs)
    budget = set()
    for job in jobs:
        cfg = config_from_dict(job["config"])
        assert cfg.seed == job["seed"]
        assert cfg.privacy.enabled == job["dp"]
        # the head is frozen, so only the adapters (and the aggregation rule) learn
        assert cfg.lora.modules_to_save == ()
        ranks = set(cfg.lora.client_ranks(cfg.data.num_clients, cfg.seed))
        assert (len(ranks) > 1) == job["heterogeneous"]
        if job["heterogeneous"]:
            assert cfg.federation.strategy != "fedit"
        budget.add((cfg.federation.rounds, cfg.federation.clients_per_round, cfg.training.local_steps,
                    cfg.training.batch_size, cfg.training.lr, cfg.privacy.target_epsilon, cfg.federation.server_momentum))
    assert len(budget) == 1  # the same rounds, steps, batch, lr and epsilon for every method


def test_table_reports_mean_and_spread_over_seeds():
    bench = load_benchmark()
    rows = [{"method": "FFA-LoRA", "dp": False, "heterogeneous": False, "seed": s, "accuracy": acc,
             "majority": 0.55, "epsilon_max": None, "upload_bytes": 1000.0, "download_bytes": 2000.0,
             "seconds_per_round": 3.0}
            for s, acc in enumerate([[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.6, 0.6]])]
    line = next(x for x in bench.table(rows) if x.startswith("| FFA-LoRA"))
    # final 0.8 and 0.6: mean 0.7, sample sd 0.1414; last three rounds 0.7 and 0.6: mean 0.65, sd 0.0707;
    # changes from round 2 on: |0.7-0.6|, |0.8-0.7|, |0.6-0.6|, |0.6-0.6| -> mean 0.05
    assert "0.700 ± 0.141" in line and "0.650 ± 0.071" in line and "0.800, 0.600" in line
    assert "| 0.050 |" in line


def test_fedit_cross_term_error_is_summarised_under_its_setting():
    bench = load_benchmark()
    row = {"method": "FedIT", "dp": True, "heterogeneous": False, "accuracy": [0.5, 0.6], "majority": 0.55,
           "epsilon_max": 7.0, "upload_bytes": 1.0, "download_bytes": 1.0, "seconds_per_round": 1.0}
    rows = [dict(row, seed=0, fedit_error=[0.1, 0.3]), dict(row, seed=1, fedit_error=[0.2])]
    line = next(x for x in bench.table(rows) if x.startswith("FedIT's cross-term error"))
    assert "mean 0.200, range 0.100-0.300 (3 rounds)" in line


def test_a_longer_grid_is_stored_under_its_own_keys_and_filters_settings():
    bench = load_benchmark()
    short = bench.jobs([0])
    long = bench.jobs([0], rounds=15, settings=("dp-hom",), methods=("FedIT", "FFA-LoRA"))
    assert [(j["method"], j["dp"], j["heterogeneous"]) for j in long] == [("FedIT", True, False), ("FFA-LoRA", True, False)]
    assert all(config_from_dict(j["config"]).federation.rounds == 15 for j in long)
    assert not {bench.key(j) for j in long} & {bench.key(j) for j in short}
    assert bench.key(short[0]) == "FedIT|dp=False|het=False|seed=0"  # the stored main grid keeps its keys


def test_a_run_store_cut_by_a_crash_loses_only_the_cut_run(tmp_path, capsys):
    bench = load_benchmark()
    store = tmp_path / "runs.jsonl"
    store.write_text('{"key": "a", "x": 1}\n{"key": "b", "x": 2}\n{"key": "c", "x"')
    assert set(bench.load_runs(store)) == {"a", "b"}
    assert "incomplete" in capsys.readouterr().err
    store.write_text('{"key": "a"\n{"key": "b"}\n')
    with pytest.raises(SystemExit, match="line 1"):
        bench.load_runs(store)


def load_audit_benchmark():
    spec = importlib.util.spec_from_file_location("bench_audit", ROOT / "benchmarks" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("privacy, enabled, target", [("none", False, None), ("eps8", True, 8.0), ("eps1", True, 1.0)])
def test_audit_benchmark_configs_are_the_default_with_only_the_stated_reductions(privacy, enabled, target):
    from privlora.core.config import ExperimentConfig

    bench = load_audit_benchmark()
    cfg, default = config_from_dict(bench.config(privacy, rounds=3, max_examples=4000, seed=0)), ExperimentConfig()
    assert cfg.privacy.enabled == enabled and (target is None or cfg.privacy.target_epsilon == target)
    assert (cfg.federation.rounds, cfg.data.max_examples) == (3, 4000)
    # everything else is the embedded default
    assert (cfg.model, cfg.lora, cfg.training) == (default.model, default.lora, default.training)
    assert cfg.federation.strategy == default.federation.strategy
    assert cfg.federation.clients_per_round == default.federation.clients_per_round
    assert cfg.data.num_clients == default.data.num_clients and cfg.data.partition == default.data.partition


def test_audit_benchmark_table_shows_both_scores_and_failed_runs():
    bench = load_audit_benchmark()
    ok = {"design": "tokens", "privacy": "eps1", "canaries": 500, "rounds": 3, "max_examples": 4000, "seed": 0,
          "epsilon_lower": 0.25, "epsilon_claimed": 0.99, "test_accuracy": 0.6, "seconds": 100.0, "error": None,
          "epsilon_lower_fdp": 0.125, "tests": 30,
          "per_score": {"whitebox": {"epsilon_lower": 0.25, "r": 50, "v": 40}, "blackbox": {"epsilon_lower": 0.0, "r": 25, "v": 13}}}
    bad = dict(ok, design="mislabelled", error="AuditError: too few")
    lines = bench.table([ok, bad])
    assert "| tokens | eps1 | 500 | 3 | 4000 | 0.99 | 0.250 (50, 40) | 0.000 (25, 13) | **0.250** | 0.125 | 30 | 0.600 | 100 |" in lines
    # the verdict is the larger of the two bounds, whichever method gave it
    assert "| **0.400** | 0.400 | 30 |" in bench.table([dict(ok, epsilon_lower_fdp=0.4)])[2]
    older = {k: v for k, v in ok.items() if k not in ("epsilon_lower_fdp", "tests")}  # stored before the f-DP reading
    assert "| tokens | eps1 | 500 | 3 | 4000 | 0.99 | 0.250 (50, 40) | 0.000 (25, 13) | **0.250** | - | 10 | 0.600 | 100 |" in bench.table([older])
    assert any("could not run: AuditError: too few" in x for x in lines)
