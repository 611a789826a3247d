"""Task "causal-lm" on a tiny Llama built in memory (saved with the MiniLM tokenizer and a
ChatML chat template, so the real loading code runs): labels, loss, per-sample gradients under
Opacus, DP training, evaluation by answer likelihood, every strategy, the saved adapter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(vocab: int, pad: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=pad)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from privlora.tasks.models import load_tokenizer, quiet_hf

    quiet_hf()
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer("embedded:minilm")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    tiny_llama(len(tok), tok.pad_token_id).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(llama_dir):
    from privlora.tasks.causal_lm import load_causal_tokenizer

    return load_causal_tokenizer(str(llama_dir))


def causal_cfg(llama_dir, **sections):
    from privlora.core.config import config_from_dict

    raw = {
        "name": "tiny-causal", "seed": 1, "threads": 1,
        "model": {"task": "causal-lm", "path": str(llama_dir), "max_length": 96},
        "data": {"max_examples": 160, "num_clients": 3, "test_fraction": 0.25},
        "lora": {"target_modules": TARGETS, "modules_to_save": [], "r": 4, "alpha": 8.0},
        "federation": {"rounds": 1, "clients_per_round": 3},
        "training": {"local_steps": 2, "batch_size": 16, "physical_batch_size": 8, "eval_batch_size": 64, "lr": 0.5},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def test_the_base_model_is_read_once_and_every_load_is_an_independent_copy_seeded_alike(tmp_path):
    import torch

    from privlora.tasks.causal_lm import load_causal_model
    from privlora.tasks.models import load_tokenizer

    tok = load_tokenizer("embedded:minilm")
    tok.save_pretrained(tmp_path)
    first = tiny_llama(len(tok), tok.pad_token_id, seed=3)
    first.save_pretrained(tmp_path)
    a = load_causal_model(str(tmp_path), 5)
    after_a = torch.rand(4)
    b = load_causal_model(str(tmp_path), 5)
    assert torch.equal(torch.rand(4), after_a)  # the generator is left seeded with the seed, read or not
    ref = first.state_dict()
    for name, t in b.state_dict().items():
        assert torch.equal(t, ref[name]), name
    with torch.no_grad():  # training one copy must not reach the next
        for p in a.parameters():
            p.add_(1.0)
    c = load_causal_model(str(tmp_path), 5)
    assert all(torch.equal(t, ref[n]) for n, t in c.state_dict().items())
    assert c.model.embed_tokens.weight.data_ptr() != b.model.embed_tokens.weight.data_ptr()
    second = tiny_llama(len(tok), tok.pad_token_id, seed=4)  # the folder re-saved: read again
    second.save_pretrained(tmp_path)
    d = load_causal_model(str(tmp_path), 5)
    ref2 = second.state_dict()
    assert all(torch.equal(t, ref2[n]) for n, t in d.state_dict().items())
    assert not torch.equal(ref2["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def records(n=12, seed=0):
    from privlora.tasks.data import LabelledData
    from privlora.tasks.instructions import review_instructions

    rng = np.random.default_rng(seed)
    words = ["a", "tedious", "joyless", "slog", "bright", "warm", "film", "plot", "great", "dull"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]
    labels = rng.integers(0, 2, size=n)
    return review_instructions(LabelledData(texts, labels.astype(np.int64), None, ["rotten", "fresh"]))


# --------------------------------------------------------------------------- examples and labels


def test_prompt_and_padding_carry_no_label_and_the_response_is_the_templates_answer(tok):
    from privlora.tasks.causal_lm import IGNORE, render, tokenize_causal

    data = records(6)
    ds = tokenize_causal(data, tok, 96)
    ids, mask, labels = ds.tensors
    for i in range(len(data)):
        prompt, answer = render(tok, data.texts[i], data.responses[i])
        assert answer.startswith(data.responses[i]) and "<|im_end|>" in answer
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(answer, add_special_tokens=False)["input_ids"]
        n = len(p) + len(r)
        assert ids[i, :n].tolist() == p + r
        assert mask[i].tolist() == [1] * n + [0] * (96 - n)
        assert labels[i].tolist() == [IGNORE] * len(p) + r + [IGNORE] * (96 - n)


def test_without_end_of_turn_loss_only_the_responses_own_tokens_carry_labels(tok):
    import torch

    from privlora.tasks.causal_lm import IGNORE, render, tokenize_causal

    data = records(6)
    whole = tokenize_causal(data, tok, 96).tensors
    own = tokenize_causal(data, tok, 96, end_of_turn=False).tensors
    assert torch.equal(whole[0], own[0]) and torch.equal(whole[1], own[1])
    for i in range(len(data)):
        prompt, _ = render(tok, data.texts[i], data.responses[i])
        p = len(tok(prompt, add_special_tokens=False)["input_ids"])
        words = tok(data.responses[i], add_special_tokens=False)["input_ids"]
        end = tok("<|im_end|>", add_special_tokens=False)["input_ids"]
        assert whole[2][i, p:p + len(words) + len(end)].tolist() == words + end
        assert own[2][i].tolist() == [IGNORE] * p + words + [IGNORE] * (96 - p - len(words))


def test_a_long_instruction_is_cut_and_the_response_kept(tok):
    from privlora.tasks.causal_lm import CausalTaskError, encode

    long = "word " * 300
    p, r = encode(tok, long, "rotten", 64)
    _, r_short = encode(tok, "short", "rotten", 64)
    assert len(p) + len(r) <= 64 and r == r_short
    with pytest.raises(CausalTaskError, match="model.max_length"):
        encode(tok, "short", "rotten", 8)


def reference_nll(model, ids, mask, labels):
    """Per-sequence summed NLL of the labelled tokens from the full logits (no logits_to_keep)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    out, counts = [], []
    for b in range(ids.shape[0]):
        s, c = 0.0, 0
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                s -= float(logp[b, t - 1, labels[b, t]])
                c += 1
        out.append(s)
        counts.append(c)
    return np.array(out), np.array(counts)


def test_loss_is_the_mean_response_nll_and_padding_changes_nothing(tok, llama_dir):
    import torch

    from privlora.tasks.causal_lm import causal_loss, load_causal_model, sequence_nll, tokenize_causal
    from privlora.tasks.data import trim_batch

    model = load_causal_model(str(llama_dir), 0)
    ids, mask, labels = trim_batch(*tokenize_causal(records(5), tok, 96).tensors)
    ref, counts = reference_nll(model, ids, mask, labels)
    with torch.no_grad():
        total, count = sequence_nll(model, ids, mask, labels)
        loss = float(causal_loss(model, (ids, mask, labels)))
    np.testing.assert_allclose(total.numpy(), ref, rtol=1e-4)
    assert count.tolist() == counts.tolist()
    assert loss == pytest.approx(float(np.mean(ref / counts)), rel=1e-4)
    # whatever sits in the padding (and however much of it), each sequence's loss is the same
    garbage = ids.clone()
    garbage[mask == 0] = 7
    wide = [torch.cat([x, torch.full((x.shape[0], 9), v)], dim=1) for x, v in ((garbage, 11), (mask, 0), (labels, -100))]
    with torch.no_grad():
        total2, _ = sequence_nll(model, *wide)
        alone = [float(sequence_nll(model, *trim_batch(ids[i : i + 1], mask[i : i + 1], labels[i : i + 1]))[0]) for i in range(5)]
    np.testing.assert_allclose(total2.numpy(), ref, rtol=1e-4)
    np.testing.assert_allclose(alone, ref, rtol=1e-4)


# --------------------------------------------------------------------------- DP


def test_opacus_per_sample_gradients_of_lora_equal_one_sequence_at_a_time(tok, llama_dir):
    import torch
    from opacus import GradSampleModule

    from privlora.tasks.adapters import make_peft_model
    from privlora.tasks.causal_lm import causal_loss, load_causal_model, tokenize_causal
    from privlora.tasks.data import trim_batch

    cfg = causal_cfg(llama_dir, federation={"strategy": "fedit"})
    model = make_peft_model(load_causal_model(str(llama_dir), 0), cfg, 4)
    torch.manual_seed(5)
    with torch.no_grad():  # B is zero at init: make every LoRA gradient non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = trim_batch(*tokenize_causal(records(6, seed=3), tok, 96).tensors)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    expected = []
    for i in range(6):
        model.zero_grad()
        causal_loss(model, tuple(x[i : i + 1] for x in batch)).backward()
        expected.append({n: p.grad.detach().clone() for n, p in trainable.items()})
    model.zero_grad()
    gs = GradSampleModule(model)
    causal_loss(gs, batch).backward()
    for n, p in trainable.items():
        assert p.grad_sample.shape[0] == 6
        for i in range(6):
            # loss_reduction "mean": Opacus rescales by the batch size, so grad_sample[i] is the
            # gradient of sequence i's own loss
            assert expected[i][n].abs().sum() > 0, n
            torch.testing.assert_close(p.grad_sample[i], expected[i][n], rtol=1e-4, atol=1e-6, msg=f"{n}, sequence {i}")
    gs._close()


@pytest.mark.parametrize("strategy", ["fedit", "ffa"])
def test_a_dp_step_changes_every_trained_lora_tensor(tok, llama_dir, strategy):
    from privlora.tasks.adapters import adapter_state, make_peft_model
    from privlora.tasks.causal_lm import load_causal_model, tokenize_causal
    from privlora.federation.client import Client
    from privlora.strategies import strategy_from_config

    cfg = causal_cfg(llama_dir, federation={"strategy": strategy}, privacy={"noise_multiplier": 0.8},
                     training={"local_steps": 1, "batch_size": 8})
    base = load_causal_model(str(llama_dir), 0)
    client = Client(0, cfg, base, tokenize_causal(records(24), tok, 96), strategy_from_config(cfg))
    server_strategy = strategy_from_config(cfg)
    start_global = server_strategy.initial_state(adapter_state(make_peft_model(base, cfg, 4)))
    payload = server_strategy.broadcast(start_global, 4)
    before = client.strategy.local_start(payload, adapter_state(make_peft_model(base, cfg, 4)))
    result = client.train(payload, 1, 4)
    assert result.mechanism is not None and result.mechanism.steps == 1 and result.mechanism.noise_multiplier == 0.8
    assert any("lora_A" in k for k in before) and any("lora_B" in k for k in before)
    for k in before:
        moved = not np.array_equal(before[k], result.state[k])
        # FFA-LoRA freezes A; everything else that trains must move (Opacus issue 820)
        assert moved == ("lora_B" in k or strategy == "fedit"), k


# --------------------------------------------------------------------------- evaluation


def test_answer_accuracy_is_the_likelihood_ranking_of_the_allowed_answers(tok, llama_dir):
    from privlora.tasks.causal_lm import encode, evaluate_causal, load_causal_model, tokenize_causal_eval

    import torch

    model = load_causal_model(str(llama_dir), 2)
    data = records(10, seed=4)
    ds = tokenize_causal_eval(data, tok, 96)
    evs = [evaluate_causal(model, ds, batch_size=4, by_length=b) for b in (True, False)]
    correct, losses, nll, tokens = 0, [], 0.0, 0
    for i in range(len(data)):
        scores = []
        for answer in data.label_names:
            p, r = encode(tok, data.texts[i], answer, 96)
            ids = torch.tensor([p + r])
            lab = torch.tensor([[-100] * len(p) + r])
            s, c = reference_nll(model, ids, torch.ones_like(ids), lab)
            scores.append((s[0], c[0]))
        correct += int(np.argmin([s for s, _ in scores]) == data.labels[i])
        s, c = scores[int(data.labels[i])]
        losses.append(s / c)
        nll += s
        tokens += c
    for ev in evs:  # batched shortest first (the server's order) and in the data's order
        assert ev["accuracy"] == pytest.approx(correct / len(data))
        assert ev["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)
        assert ev["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_options_scored_through_a_shared_prompt_cache_equal_each_sequence_scored_alone(tok, llama_dir):
    from peft import LoraConfig, get_peft_model

    from privlora.tasks.causal_lm import _shared_prefix, load_causal_model, options_nll, tokenize_causal_eval
    from privlora.tasks.data import trim_batch

    import torch

    torch.manual_seed(3)
    model = get_peft_model(load_causal_model(str(llama_dir), 0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained-looking adapter, so LoRA is on the path
    model.eval()
    data = records(9, seed=5)
    ids, mask, labels, _ = tokenize_causal_eval(data, tok, 96).tensors
    ids, mask, labels = trim_batch(ids, mask, labels)
    assert _shared_prefix(ids, mask, labels) is not None  # the cached path is the one under test
    with torch.no_grad():
        total, count = options_nll(model, ids, mask, labels)
        for i in range(ids.shape[0]):
            for c in range(ids.shape[1]):
                alone = trim_batch(ids[i, c][None], mask[i, c][None], labels[i, c][None])
                s, n = reference_nll(model, *alone)
                assert float(total[i, c]) == pytest.approx(s[0], rel=1e-4, abs=1e-5)
                assert int(count[i, c]) == n[0]
        # options that differ before their responses are scored as separate sequences, with the same values
        other = ids.clone()
        other[0, 1, 1] = (int(other[0, 1, 1]) + 1) % len(tok)
        assert _shared_prefix(other, mask, labels) is None
        total2, _ = options_nll(model, other, mask, labels)
        torch.testing.assert_close(total2[1:], total[1:], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- whole runs


def run(cfg, out):
    from privlora.transports.inprocess import run_experiment

    return run_experiment(cfg, out, progress=False)


def test_a_dp_run_reports_loss_perplexity_samples_and_saves_a_loadable_adapter(tok, llama_dir, tmp_path):
    import torch
    from peft import PeftModel

    from privlora.tasks.causal_lm import load_causal_model, tokenize_causal_eval
    from privlora.core.config import load_config
    from privlora.tasks.data import trim_batch
    from accounting.verify import verify_run

    cfg = causal_cfg(llama_dir, federation={"rounds": 2, "clients_per_round": 2, "strategy": "ffa"},
                     privacy={"target_epsilon": 4.0})
    out = tmp_path / "run"
    final = run(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(1.0 < r["test_perplexity"] < math.inf for r in rows)
    assert 0 < final["epsilon_max"] <= 4.0 + 1e-9
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["loss"]["final"] == final["test_loss"]
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples["prompts"]) == 3 and len(samples["untrained"]) == 3 and len(samples["final"]) == 3
    md = (out / "report.md").read_text()
    assert "## Sample generations" in md and "perplexity" in md and "Answer accuracy" in md
    assert "one instruction with its response" in md and report["privacy"]["unit_of_privacy"].startswith("one record (one instruction")
    assert json.loads((out / "model.json").read_text())["task"] == "causal-lm"
    assert verify_run(out).ok

    # the saved adapter on a fresh base gives the server's final scores
    base = load_causal_model(str(llama_dir), 0)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    from privlora.federation.startup import load_split

    _, _, test = load_split(load_config(out / "config.toml"))
    ds = tokenize_causal_eval(test, tok, 96)
    from privlora.tasks.causal_lm import evaluate_causal

    ev = evaluate_causal(model, ds, 64)
    assert ev["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert ev["accuracy"] == final["test_accuracy"]
    ids, mask, labels = trim_batch(*(x[:4, 0] for x in ds.tensors[:3]))
    with torch.no_grad():
        again = PeftModel.from_pretrained(load_causal_model(str(llama_dir), 0), str(out / "adapter")).eval()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   again(input_ids=ids, attention_mask=mask).logits)
        plain = load_causal_model(str(llama_dir), 0)
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits)


STRATEGY_RUNS = [
    ("fedit", {}),
    ("ffa", {"ranks": [8, 4, 2]}),
    ("flora", {"ranks": [8, 4, 2]}),
    ("hetlora", {"ranks": [8, 4, 2]}),
]


@pytest.mark.parametrize("strategy,lora", STRATEGY_RUNS, ids=[s for s, _ in STRATEGY_RUNS])
def test_every_strategy_trains_the_causal_task_and_secure_aggregation_gives_the_same_model(llama_dir, tmp_path, strategy, lora):
    from safetensors.numpy import load_file

    cfg = dict(federation={"strategy": strategy, "server_momentum": 0.0}, lora=lora, privacy={"enabled": False})
    clear = run(causal_cfg(llama_dir, **cfg), tmp_path / "clear")
    secure = run(causal_cfg(llama_dir, **cfg, secagg={"enabled": True}), tmp_path / "secure")
    assert clear["test_loss"] != json.loads((tmp_path / "clear" / "metrics.jsonl").read_text().splitlines()[0])["test_loss"]
    a, b = load_file(tmp_path / "clear" / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "secure" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and a
    # the adapters' updates B A agree (FLoRA's export factors the merged update by SVD, so its
    # factors themselves may differ by more than the products do)
    pairs = [(k, k.replace("lora_A", "lora_B")) for k in a if "lora_A" in k]
    assert pairs
    for ka, kb in pairs:
        np.testing.assert_allclose(a[kb].astype(np.float64) @ a[ka], b[kb].astype(np.float64) @ b[ka], atol=1e-5)
    assert secure["test_loss"] == pytest.approx(clear["test_loss"], rel=1e-4)


def test_flora_slot_form_runs_the_causal_task(llama_dir, tmp_path):
    final = run(causal_cfg(llama_dir, federation={"strategy": "flora", "flora_form": "slot"}, lora={"ranks": [8, 4, 2]},
                           privacy={"enabled": False}), tmp_path / "slot")
    assert final["test_perplexity"] > 0


# --------------------------------------------------------------------------- data and config


def test_chatterbot_pairs_are_grouped_by_category():
    import yaml

    from privlora.core.config import DataConfig
    from privlora.tasks.instructions import chatterbot_folder, load_instruction_data

    data = load_instruction_data(DataConfig(source="embedded:chatterbot"))
    folder = chatterbot_folder()
    expected = 0
    for path in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            # turns 2j and 2j+1 are a question and its answer; a pair with a blank turn is dropped
            expected += sum(1 for j in range(len(conv) // 2) if str(conv[2 * j]).strip() and str(conv[2 * j + 1]).strip())
    assert len(data) == expected > 1500
    assert data.label_names == [] and data.majority_fraction() is None
    assert len(np.unique(data.groups)) == len(list(folder.glob("*.yml")))
    i = data.texts.index("what is h2o")
    assert data.responses[i] == "h is to o as o is to v."


def test_local_instruction_jsonl_and_its_errors(tmp_path):
    from privlora.core.config import DataConfig
    from privlora.tasks.data import DataError
    from privlora.tasks.instructions import load_instruction_data

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}", "topic": i % 2}) for i in range(6)) + "\n")
    data = load_instruction_data(DataConfig(source=str(path), group_column="topic"))
    assert data.texts == [f"q{i}" for i in range(6)] and data.responses == [f"a{i}" for i in range(6)]
    assert data.groups.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match="data.response_column: column 'answer' not found"):
        load_instruction_data(DataConfig(source=str(path), response_column="answer", partition="iid"))
    path.write_text(json.dumps({"instruction": "q", "response": ""}) + "\n")
    with pytest.raises(DataError, match=r"^data.response_column: 1 of 1 records have an empty 'response' \(records 1; the first record is 1\)"):
        load_instruction_data(DataConfig(source=str(path), partition="iid"))


def test_the_review_instructions_answer_with_the_label_name():
    from privlora.core.config import DataConfig
    from privlora.tasks.data import load_labelled_data
    from privlora.tasks.instructions import REVIEW_INSTRUCTION, load_instruction_data

    cfg = DataConfig()
    reviews, data = load_labelled_data(cfg), load_instruction_data(cfg)
    assert len(data) == len(reviews) and data.label_names == ["rotten", "fresh"]
    assert all(data.responses[i] == ["rotten", "fresh"][reviews.labels[i]] for i in range(0, len(data), 97))
    assert data.texts[5] == REVIEW_INSTRUCTION.format(text=reviews.texts[5])
    assert (data.groups == reviews.groups).all()


def test_a_configured_review_prompt_and_answers_phrase_every_review_and_survive_config_toml():
    from privlora.core.config import DataConfig, config_from_dict, config_to_toml, load_config
    from privlora.tasks.data import load_labelled_data
    from privlora.tasks.instructions import load_instruction_data

    prompt = 'Is this movie review positive or negative?\n\nReview: "{text}"'
    cfg = DataConfig(review_prompt=prompt, review_answers=("negative", "positive"))
    reviews, data = load_labelled_data(cfg), load_instruction_data(cfg)
    assert data.label_names == ["negative", "positive"]
    assert [data.responses[i] for i in (3, 4000, 9000)] == [["negative", "positive"][reviews.labels[i]] for i in (3, 4000, 9000)]
    assert data.texts[7] == 'Is this movie review positive or negative?\n\nReview: "' + reviews.texts[7] + '"'
    # the run folder's config.toml holds the newline and quotes and reads back to the same config
    full = config_from_dict({"model": {"task": "causal-lm", "path": "embedded:smollm2"},
                             "lora": {"modules_to_save": [], "target_modules": TARGETS},
                             "data": {"review_prompt": prompt, "review_answers": ["negative", "positive"]}})
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "config.toml"
        path.write_text(config_to_toml(full))
        again = load_config(path)
    assert again.data.review_prompt == prompt and again.data.review_answers == ("negative", "positive")


CAUSAL = {"model": {"task": "causal-lm", "path": "embedded:smollm2"}, "lora": {"modules_to_save": [], "target_modules": TARGETS}}


@pytest.mark.parametrize("data,message", [
    ({"review_prompt": "Is this review good?"}, "'{text}' exactly once"),
    ({"review_prompt": "{text} or {text}?"}, "'{text}' exactly once"),
    ({"review_prompt": "{text} is {label}?"}, "no other braces"),
    ({"review_answers": ["good"]}, "two different non-empty"),
    ({"review_answers": ["good", "good"]}, "two different non-empty"),
    ({"review_answers": ["good", " "]}, "two different non-empty"),
    ({"review_answers": ["a", "b"], "source": "embedded:chatterbot"}, "phrase the embedded reviews"),
])
def test_review_prompt_and_answer_mistakes_name_the_field(data, message):
    from privlora.core.config import ConfigError, config_from_dict

    field = "data.review_answers" if "review_answers" in data else "data.review_prompt"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*" + __import__("re").escape(message)):
        config_from_dict({**CAUSAL, "data": data})
    if "source" not in data:  # the classifier has no prompt to phrase
        with pytest.raises(ConfigError, match="data.review_prompt"):
            config_from_dict({"data": {"review_prompt": "{text}?", "review_answers": ["a", "b"]}})


@pytest.mark.parametrize("raw,field", [
    ({"model": {"task": "causal-lm", "path": "embedded:smollm2"}}, "lora.modules_to_save"),
    ({"model": {"task": "causal-lm", "path": "embedded:smollm2"}, "lora": {"modules_to_save": []}}, "lora.target_modules"),
    ({"model": {"task": "causal-lm"}, "lora": {"modules_to_save": [], "target_modules": TARGETS}}, "model.path"),
    ({"model": {"path": "embedded:smollm2"}}, "model.path"),
    ({"data": {"source": "embedded:chatterbot"}}, "data.source"),
    ({"model": {"task": "generate"}}, "model.task"),
    ({"model": {"end_of_turn_loss": False}}, "model.end_of_turn_loss"),
])
def test_causal_config_mistakes_name_the_field(raw, field):
    from privlora.core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict(raw)
