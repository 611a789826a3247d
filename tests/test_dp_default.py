"""The levers of the DP default: mean pooling, noise calibrated for expected participation (with
budgets still enforced), and the validation holdout that tuning runs evaluate on."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privlora.tasks.adapters import make_peft_model
from privlora.core.config import ConfigError, config_from_dict
from privlora.tasks.data import LabelledData, run_split, tokenize
from privlora.tasks.models import load_tokenizer, use_mean_pooling
from privlora.strategies import make_strategy

from .conftest import tiny_bert
from .test_dp_client import TEXTS


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("embedded:minilm")
    data = LabelledData(TEXTS, np.array([1, 0, 1, 0, 0, 1]), None, ["rotten", "fresh"])
    ids, mask, labels = tokenize(data, tok, 24).tensors
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width], labels


def test_mean_pooling_feeds_the_head_the_masked_mean_of_the_last_hidden_states(batch):
    ids, mask, _ = batch
    assert (mask == 0).any(), "the batch must have padding for the test to mean anything"
    model = tiny_bert()
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    use_mean_pooling(model)
    m = mask.unsqueeze(-1).float()
    expected = (hidden * m).sum(1) / m.sum(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, model.classifier(expected))
        # each example alone (no padding at all) gives the same logits: padding is ignored
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            alone = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).logits
            torch.testing.assert_close(alone[0], logits[i], rtol=1e-4, atol=1e-5)


def test_a_copied_mean_pooled_model_pools_with_its_own_mask(batch):
    ids, mask, _ = batch
    model = tiny_bert()
    use_mean_pooling(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a = twin(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]))  # the original sees another mask
        b = twin(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)
    assert twin.bert.pooler is not model.bert.pooler
    use_mean_pooling(twin)  # a second call changes nothing: one pooler, one hook
    assert len(twin.bert._forward_pre_hooks) == 1 and type(twin.bert.pooler) is type(model.bert.pooler)
    assert twin.bert.pooler._mask is not None and twin.bert.pooler._mask.shape == mask.shape


def test_opacus_per_sample_gradients_through_mean_pooling_equal_one_at_a_time(tiny_cfg, batch):
    from opacus import GradSampleModule

    cfg = tiny_cfg(federation={"strategy": "ffa"})
    base = tiny_bert()
    use_mean_pooling(base)
    model = make_peft_model(base, cfg, cfg.lora.r)
    strategy = make_strategy("ffa", cfg.lora.r, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # B starts at zero, which would hide the encoder's part of the gradient
            if p.requires_grad and strategy.frozen(n):
                p.requires_grad_(False)
    model.train()  # Opacus records activations only in training mode
    reference = copy.deepcopy(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    gsm = GradSampleModule(model)
    ids, mask, labels = batch
    F.cross_entropy(gsm(input_ids=ids, attention_mask=mask).logits, labels).backward()
    ref = dict(reference.named_parameters())
    for i in range(ids.shape[0]):
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]).backward()
        for n in trainable:
            got = dict(model.named_parameters())[n].grad_sample[i]
            assert ref[n].grad is not None and ref[n].grad.abs().sum() > 0, n
            torch.testing.assert_close(got, ref[n].grad, rtol=1e-4, atol=1e-6, msg=f"{n}, example {i}")
    gsm._close()


def test_mean_pooling_is_refused_for_a_model_without_a_pooler():
    from privlora.tasks.models import ModelError

    class NoPooler(torch.nn.Module):
        base_model = torch.nn.Linear(2, 2)

    with pytest.raises(ModelError, match="model.pooling"):
        use_mean_pooling(NoPooler())
    with pytest.raises(ConfigError, match="model.pooling"):
        config_from_dict({"model": {"pooling": "max"}})


# --------------------------------------------------------------------------- expected participation

def _raw(**over):
    raw = {"data": {"num_clients": 10}, "federation": {"rounds": 6, "clients_per_round": 5},
           "training": {"local_steps": 10, "batch_size": 64}, "privacy": {"target_epsilon": 8.0}}
    for k, v in over.items():
        raw[k].update(v)
    return raw


@pytest.mark.parametrize("rounds,per_round,clients,expected", [(6, 5, 10, 3), (7, 5, 10, 4), (6, 3, 10, 2), (1, 1, 10, 1), (4, 10, 10, 4)])
def test_expected_participation_is_the_rounded_up_share_of_rounds(rounds, per_round, clients, expected):
    cfg = config_from_dict(_raw(data={"num_clients": clients}, federation={"rounds": rounds, "clients_per_round": per_round},
                                privacy={"participation": "expected"}))
    assert cfg.calibration_rounds == expected == math.ceil(rounds * per_round / clients)
    assert config_from_dict(_raw(federation={"rounds": rounds, "clients_per_round": min(per_round, 10)})).calibration_rounds == rounds


def test_expected_participation_calibrates_for_its_rounds_and_no_more():
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from privlora.federation.client import planned_noise_multiplier, poisson_sample_rate

    cfg = config_from_dict(_raw(privacy={"participation": "expected"}))
    q = poisson_sample_rate(1150, 64)
    sigma = planned_noise_multiplier(cfg, q)
    sigma_all = planned_noise_multiplier(config_from_dict(_raw()), q)
    assert sigma < sigma_all

    def eps(s, steps):
        acc = PLDAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps)
        return acc.get_epsilon(1e-5)

    # three rounds of 10 steps at the calibrated sigma reach the target (to the calibration's
    # tolerance); a fourth round would pass it, so the budget must refuse it
    assert 7.8 < eps(sigma, 30) <= 8.0 + 1e-6
    assert eps(sigma, 40) > 8.0


def test_a_run_calibrated_for_expected_participation_refuses_rather_than_overspends(tiny_cfg, tmp_path):
    """Four clients, three per round, four rounds: each client is expected in ceil(3) = 3 rounds
    and the noise is calibrated for that; whichever client is sampled a fourth time is refused."""
    import json

    from accounting import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = tiny_cfg(federation={"rounds": 4, "clients_per_round": 3, "min_clients": 1},
                   privacy={"noise_multiplier": 0.0, "target_epsilon": 3.0, "participation": "expected"},
                   training={"local_steps": 2})
    assert cfg.calibration_rounds == 3
    out = tmp_path / "run"
    run_experiment(cfg, out, progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    refused = [r for rec in recs for r in rec.get("refused", {})]
    times = {str(k): sum(k in rec["clients"] for rec in recs) for k in range(4)}
    sampled = {str(k): sum(k in rec["sampled"] for rec in recs) for k in range(4)}
    # 12 sampling slots over 4 clients: someone was sampled 4 times, or everyone exactly 3
    over = [k for k, n in sampled.items() if n > 3]
    assert over, "this seed must sample some client more often than calibrated for"
    assert set(refused) == set(over) and all(times[k] == 3 for k in over)
    assert all(times[k] <= 3 for k in times)
    report = json.loads((out / "report.json").read_text())
    assert all(c["epsilon"] <= 3.0 + 1e-9 for c in report["privacy"]["clients"].values())
    assert verify_run(out).ok


# --------------------------------------------------------------------------- validation holdout

def test_the_validation_holdout_never_touches_the_test_split():
    n = 1000
    data = LabelledData([f"t{i}" for i in range(n)], np.arange(n) % 2, None, ["a", "b"])
    test_cfg = config_from_dict({"data": {"test_fraction": 0.1}}).data
    val_cfg = config_from_dict({"data": {"test_fraction": 0.1, "holdout": "validation"}}).data
    train, test = run_split(data, test_cfg, 5)
    vtrain, val = run_split(data, val_cfg, 5)
    test_ids, val_ids, vtrain_ids = set(test.texts), set(val.texts), set(vtrain.texts)
    assert len(test_ids) == 100 and len(val_ids) == 90 and len(vtrain_ids) == 810
    assert not (test_ids & val_ids) and not (test_ids & vtrain_ids) and not (val_ids & vtrain_ids)
    assert val_ids | vtrain_ids == set(train.texts)


def test_a_mean_pooled_run_reloads_with_mean_pooling_and_scores_what_the_server_scored(tiny_cfg, tmp_path):
    """The adapter's head was trained on mean-pooled states: `load_base_for_run` must pool the same
    way, or the reloaded model would score differently from the run's own final evaluation."""
    import json

    from privlora.tasks.data import load_labelled_data
    from privlora.tasks.predict import load_run_model
    from privlora.transports.inprocess import run_experiment

    cfg = tiny_cfg(model={"pooling": "mean"}, training={"lr": 1.0, "local_steps": 3})
    out = tmp_path / "run"
    final = run_experiment(cfg, out, progress=False)
    assert json.loads((out / "model.json").read_text())["pooling"] == "mean"
    model, tok, names = load_run_model(out)
    assert type(model.base_model.model.bert.pooler).__name__ == "MaskedMeanPooler"
    _, test = run_split(load_labelled_data(cfg.data), cfg.data, cfg.seed)
    with torch.no_grad():
        enc = tok(test.texts, truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).numpy()
    assert (pred == test.labels).mean() == pytest.approx(final["test_accuracy"], abs=1e-9)
