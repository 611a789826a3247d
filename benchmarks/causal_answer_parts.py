#!/usr/bin/env python3
"""Where the answer accuracy of a causal run comes from: the answer word, or the end of the turn.

    python benchmarks/causal_answer_parts.py CONFIG none|ADAPTER [ADAPTER ...]

privlora scores an allowed answer by the log-likelihood of all its response tokens, the answer
word and the end-of-turn token after it (``positive<|im_end|>``). For each model (the base with
`none`, or the base with a run's adapter/), on CONFIG's held-out split, this prints the accuracy
and the mean log-likelihood per answer when the choice is made on the word and end of turn (what
privlora reports), on the word alone, and on the end of turn alone.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])
from peft import PeftModel  # noqa: E402

from privlora import tasks  # noqa: E402
from privlora.tasks.causal_lm import IGNORE, load_causal_model  # noqa: E402
from privlora.core.overrides import load_with_overrides  # noqa: E402
from privlora.federation.startup import load_split  # noqa: E402


def parts(model, batch):
    """(word, end of turn) log-likelihood of every option of every example: shape (B, C, 2)."""
    ids, mask, labels, _ = batch
    b, c, t = ids.shape
    logits = model(input_ids=ids.reshape(b * c, t), attention_mask=mask.reshape(b * c, t)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels.reshape(b * c, t)[:, 1:]
    on = target != IGNORE
    token = torch.where(on, logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.zeros(()))
    last = on & (on.long().cumsum(-1) == on.sum(-1, keepdim=True))
    return torch.stack([(token * (on & ~last)).sum(-1), (token * last).sum(-1)], -1).reshape(b, c, 2)


def main(argv):
    cfg = load_with_overrides(argv[0], [])
    _, _, heldout = load_split(cfg)
    tok = tasks.load_tokenizer(cfg)
    data = tasks.tokenize_heldout(cfg, heldout, tok)
    names = [tok.decode(tok.encode(n)) for n in (cfg.data.review_answers or ("rotten", "fresh"))]
    for adapter in argv[1:]:
        base = load_causal_model(cfg.model.path, 0)
        model = (base if adapter == "none" else PeftModel.from_pretrained(base, adapter)).eval()
        with torch.no_grad():
            p = torch.cat([parts(model, data[i : i + 16]) for i in range(0, len(data), 16)]).numpy()
        y = np.concatenate([data[i : i + 16][3].numpy() for i in range(0, len(data), 16)])
        for what, s in (("word + end of turn", p.sum(-1)), ("word", p[..., 0]), ("end of turn", p[..., 1])):
            acc = float(((s[:, 1] > s[:, 0]) == (y == 1)).mean())
            print(f"{adapter} | {what} | accuracy {acc:.3f} | mean log-likelihood {names[0]} {s[:, 0].mean():.3f}, "
                  f"{names[1]} {s[:, 1].mean():.3f} | {len(y)} reviews", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
