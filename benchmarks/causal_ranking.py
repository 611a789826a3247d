#!/usr/bin/env python3
"""How well a causal run ranks the held-out reviews, apart from where it puts the threshold.

    python benchmarks/causal_ranking.py CONFIG none|ADAPTER [ADAPTER ...]

For each model (the base with `none`, or the base with a run's adapter/), on CONFIG's held-out
split: the AUC of nll(rotten) - nll(fresh) against the true answers, the accuracy of the answer of
highest likelihood (the accuracy privlora reports), and the accuracy with the threshold at the
median score (what a calibrated prior would give). A run whose AUC rises while its accuracy stays
at the majority class has learned some sentiment but not enough to overcome its answer prior.
"""
import sys, torch, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from privlora.overrides import load_with_overrides
from privlora.simulation import load_split
from privlora import tasks
from privlora.causal_lm import load_causal_model, options_nll
from peft import PeftModel
cfg = load_with_overrides(sys.argv[1], [])
data, train, val = load_split(cfg)
tok = tasks.load_tokenizer(cfg)
va = tasks.tokenize_heldout(cfg, val, tok)
for adapter in sys.argv[2:]:
    base = load_causal_model(cfg.model.path, 0)
    model = base if adapter == "none" else PeftModel.from_pretrained(base, adapter)
    model.eval()
    diffs, ys = [], []
    with torch.no_grad():
        for i in range(0, len(va), 32):
            ids, mask, labels, ans = va[i:i + 32]
            tot, cnt = options_nll(model, ids, mask, labels)
            diffs += (tot[:, 0] - tot[:, 1]).tolist()  # nll(rotten) - nll(fresh): higher = more "fresh"
            ys += ans.tolist()
    d, y = np.array(diffs), np.array(ys)
    pos, neg = d[y == 1], d[y == 0]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    thr = np.median(d)
    print(adapter, "AUC", round(float(auc), 3), "acc@argmax", round(float(((d > 0) == (y == 1)).mean()), 3),
          "acc@median-threshold", round(float(((d > thr) == (y == 1)).mean()), 3), "n", len(y), "label names", data.label_names if hasattr(data,'label_names') else None)
