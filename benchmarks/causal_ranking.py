#!/usr/bin/env python3
"""How well a causal run ranks the held-out reviews, apart from where it puts the threshold.

    python benchmarks/causal_ranking.py CONFIG none|ADAPTER [ADAPTER ...]

For each model (the base with `none`, or the base with a run's adapter/), on CONFIG's held-out
split: the AUC of nll(rotten) - nll(fresh) against the true answers, the accuracy of the answer of
highest likelihood (the accuracy privlora reports), and the accuracy with the threshold at the
median score (what a calibrated prior would give). A run whose AUC rises while its accuracy stays
at the majority class has learned some sentiment but not enough to overcome its answer prior.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import PeftModel
from causal_prompts import score  # the same AUC and accuracies as the zero-shot phrasing table
from privlora import tasks
from privlora.tasks.causal_lm import load_causal_model
from privlora.core.overrides import load_with_overrides
cfg = load_with_overrides(sys.argv[1], [])
tok = tasks.load_tokenizer(cfg)
for adapter in sys.argv[2:]:
    base = load_causal_model(cfg.model.path, 0)
    model = (base if adapter == "none" else PeftModel.from_pretrained(base, adapter)).eval()
    r = score(model, cfg, tok)
    print(adapter, "AUC", round(r["auc"], 3), "acc@argmax", round(r["accuracy"], 3),
          "acc@median-threshold", round(r["accuracy_median_threshold"], 3), "n", r["n"])
