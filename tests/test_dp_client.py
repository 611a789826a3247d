"""DP-SGD through Opacus on peft LoRA: per-example gradients are right and weights really move.

Opacus issue 820 is a silent failure in which DP training with peft LoRA "runs" but the LoRA
weights are not (correctly) updated. These tests fail if that comes back: per-sample gradients
of every trainable tensor (lora_A, lora_B and the modules_to_save head) must equal gradients
computed one example at a time, and a DP step must change B and the head.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privlora.tasks.adapters import adapter_state, load_adapter_state, make_peft_model
from privlora.federation.client import Client
from privlora.tasks.data import LabelledData, tokenize
from privlora.tasks.models import load_tokenizer
from privlora.strategies import make_strategy

from .conftest import tiny_bert

TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish",
    "an utterly charming and hilarious film",
    "dull",
    "it's a cookie-cutter movie, a cut-and-paste job that goes nowhere and takes far too long",
    "rarely has so much been done with so little",
]


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer("embedded:minilm")
    data = LabelledData(TEXTS, np.array([1, 0, 1, 0, 0, 1]), None, ["rotten", "fresh"])
    ds = tokenize(data, tok, 24)
    return ds.tensors


def lora_model(cfg, strategy_name, seed=0):
    torch.manual_seed(seed)
    model = make_peft_model(tiny_bert(), cfg, cfg.lora.r)
    state = adapter_state(model)
    rng = np.random.default_rng(seed)
    # B starts at zero in LoRA, which makes A's gradient zero: give B values so both are tested
    state = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.5 if ".lora_B." in k else v) for k, v in state.items()}
    load_adapter_state(model, state)
    strategy = make_strategy(strategy_name, cfg.lora.r, 0)
    for name, p in model.named_parameters():
        if p.requires_grad and strategy.frozen(name):
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("strategy_name", ["fedit", "ffa"])
def test_opacus_per_sample_gradients_equal_one_at_a_time(tiny_cfg, batch, strategy_name):
    from opacus import GradSampleModule

    cfg = tiny_cfg(federation={"strategy": strategy_name})
    model = lora_model(cfg, strategy_name)
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) == (strategy_name == "fedit")

    # No forward pass before wrapping: the head trap of DESIGN.md must not need one.
    gsm = GradSampleModule(model)
    ids, mask, labels = batch
    F.cross_entropy(gsm(input_ids=ids, attention_mask=mask).logits, labels).backward()
    per_sample = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n, g in per_sample.items() if g is None)
    assert not missing, f"Opacus computed no per-sample gradient for {missing}"

    ref_params = dict(reference.named_parameters())
    for i in range(ids.shape[0]):
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]).backward()
        for n in trainable:
            expected = ref_params[n].grad
            got = per_sample[n][i]
            assert expected is not None and expected.abs().sum() > 0, n
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=f"{n}, example {i}")
    gsm._close()


def make_client(cfg, n=64, seed=0):
    tok = load_tokenizer("embedded:minilm")
    rng = np.random.default_rng(seed)
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    data = LabelledData(texts, rng.integers(0, 2, n), None, ["rotten", "fresh"])
    base = tiny_bert()
    strategy = make_strategy(cfg.federation.strategy, cfg.max_rank, cfg.seed)
    return Client(0, cfg, base, tokenize(data, tok, 24), strategy), strategy, base


@pytest.mark.parametrize("strategy_name", ["fedit", "ffa"])
def test_dp_training_changes_lora_b_and_head_and_reports_the_mechanism(tiny_cfg, strategy_name):
    cfg = tiny_cfg(federation={"strategy": strategy_name}, training={"local_steps": 3, "batch_size": 16})
    client, strategy, base = make_client(cfg)
    server_strategy = make_strategy(strategy_name, cfg.max_rank, cfg.seed)
    start_global = server_strategy.initial_state(adapter_state(make_peft_model(base, cfg, cfg.max_rank)))
    payload = server_strategy.broadcast(start_global, cfg.max_rank)
    start = strategy.local_start(payload, adapter_state(make_peft_model(base, cfg, cfg.max_rank)))
    result = client.train(payload, rnd=1, rank=cfg.max_rank)
    for k in start:
        moved = not np.array_equal(result.state[k], start[k])
        if ".lora_A." in k:
            assert moved == (strategy_name == "fedit"), k
        else:
            assert moved, f"{k} did not change after DP steps (the Opacus issue 820 failure)"
    m = result.mechanism
    assert m is not None and m.steps == 3 and result.steps == 3
    assert m.sample_rate == pytest.approx(1 / math.ceil(64 / 16))
    assert m.noise_multiplier == cfg.privacy.noise_multiplier and m.clip_norm == cfg.privacy.max_grad_norm


def test_an_empty_poisson_batch_still_makes_one_noisy_counted_step(tiny_cfg):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    cfg = tiny_cfg(training={"batch_size": 16})
    client, strategy, _ = make_client(cfg)
    model = client.build_model(strategy.broadcast(strategy.initial_state(adapter_state(make_peft_model(client.base_model, cfg, 2))), 2), 2)
    model.train()  # Opacus records activations only in training mode ("No activations detected" otherwise)
    before = adapter_state(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine(accountant="prv")
    gsm, dp_opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(client.dataset, batch_size=16),
                                         noise_multiplier=1.0, max_grad_norm=1.0)
    empty = (torch.zeros((0, 24), dtype=torch.long), torch.zeros((0, 24), dtype=torch.long), torch.zeros((0,), dtype=torch.long))
    client._dp_step(gsm, dp_opt, *empty)
    after = adapter_state(model)
    assert engine.accountant.history == [(1.0, 0.25, 1)]
    b = next(k for k in before if ".lora_B." in k)
    assert not np.array_equal(before[b], after[b])  # noise was added


def test_non_private_mode_trains_without_a_mechanism(tiny_cfg):
    cfg = tiny_cfg(privacy={"enabled": False}, training={"local_steps": 2})
    client, strategy, base = make_client(cfg)
    g = strategy.initial_state(adapter_state(make_peft_model(base, cfg, 2)))
    result = client.train(strategy.broadcast(g, 2), rnd=1, rank=2)
    assert result.mechanism is None and result.steps == 2
    b = next(k for k in g if ".lora_B." in k)
    assert not np.array_equal(result.state[b], g[b])


def test_target_epsilon_calibrates_per_client_noise(tiny_cfg):
    from accounting import SubsampledGaussian
    from privlora.core.accountants import epsilon

    cfg = tiny_cfg(privacy={"noise_multiplier": 0.0, "target_epsilon": 3.0}, training={"batch_size": 16, "local_steps": 5},
                   federation={"rounds": 4})
    client, _, _ = make_client(cfg)
    sigma = client.noise_multiplier
    planned = [SubsampledGaussian(sigma, client.sample_rate, 20, 1.0, cfg.privacy.delta)]
    eps = epsilon(planned, cfg.privacy.delta)
    assert eps <= 3.0
    smaller = [SubsampledGaussian(sigma * 0.99, client.sample_rate, 20, 1.0, cfg.privacy.delta)]
    assert epsilon(smaller, cfg.privacy.delta) > 3.0 - 0.05


@pytest.mark.parametrize("private", [True, False])
def test_dp_clients_keep_their_training_loss_to_themselves(tiny_cfg, private):
    """The mean training loss is an un-noised function of private data: never sent under DP."""
    from privlora.federation.messages import Message

    cfg = tiny_cfg(privacy={"enabled": private}, training={"local_steps": 1, "batch_size": 16})
    client, strategy, base = make_client(cfg)
    g = strategy.initial_state(adapter_state(make_peft_model(base, cfg, 2)))
    instruction = Message("round_instruction", {"round": 1, "client_id": 0, "rank": 2}, strategy.broadcast(g, 2)).to_bytes()
    header = Message.from_bytes(client.handle(instruction), "client_update").header
    assert (header["train_loss"] is None) == private
    assert (header["mechanism"] is not None) == private
