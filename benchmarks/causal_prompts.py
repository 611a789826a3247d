#!/usr/bin/env python3
"""Zero-shot SmolLM2 on the review task under different phrasings (`data.review_prompt`,
`data.review_answers`): how well each ranks the held-out reviews and how accurate its answer of
highest likelihood is, before any training.

    python benchmarks/causal_prompts.py CONFIG            # every phrasing below, on CONFIG's held-out split
    python benchmarks/causal_prompts.py CONFIG --table    # re-render the table from the store

Per phrasing: AUC of nll(answer for rotten) - nll(answer for fresh) against the labels (the
ranking, free of where the threshold falls), the accuracy privlora reports (the allowed answer of
highest likelihood), the accuracy with the threshold at the median score (what a calibrated prior
would give), and the mean NLL of the true answer. Results are appended to
benchmarks/results/causal_prompts.jsonl with the command; the table goes to causal_prompts.md.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)
STORE = ROOT / "benchmarks" / "results" / "causal_prompts.jsonl"
TABLE = ROOT / "benchmarks" / "results" / "causal_prompts.md"

PHRASINGS = {
    "fresh/rotten (default)": ("", ()),
    "fresh/rotten, review first": ("Review: {text}\n\nIs this movie review fresh or rotten?", ()),
    "fresh/rotten, 'fresh (positive)'": (
        "Is this movie review fresh (positive) or rotten (negative)? Answer with one word: fresh or rotten.\n\nReview: {text}", ()),
    "fresh/rotten, 'fresh if positive'": (
        "Is this movie review positive or negative? Answer with one word: fresh if positive, rotten if negative.\n\nReview: {text}", ()),
    "positive/negative": (
        "Is this movie review positive or negative? Answer with one word: positive or negative.\n\nReview: {text}",
        ("negative", "positive")),
    "positive/negative, no answer hint": ("Is this movie review positive or negative?\n\nReview: {text}", ("negative", "positive")),
    "yes/no, 'did the critic like it'": ("Did the critic like the movie? Answer yes or no.\n\nReview: {text}", ("no", "yes")),
}


def score(model, cfg, tok) -> dict:
    import numpy as np
    import torch

    from privlora import tasks
    from privlora.tasks.causal_lm import options_nll
    from privlora.federation.startup import load_split

    _, _, heldout = load_split(cfg)
    va = tasks.tokenize_heldout(cfg, heldout, tok)
    diffs, ys, nll = [], [], []
    with torch.no_grad():
        for i in range(0, len(va), 32):
            ids, mask, labels, ans = va[i : i + 32]
            tot, _ = options_nll(model, ids, mask, labels)
            diffs += (tot[:, 0] - tot[:, 1]).tolist()
            ys += ans.tolist()
            nll += tot[torch.arange(len(ans)), ans].tolist()
    d, y = np.asarray(diffs), np.asarray(ys)
    pos, neg = d[y == 1], d[y == 0]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return {"auc": auc, "accuracy": float(((d > 0) == (y == 1)).mean()),
            "accuracy_median_threshold": float(((d > np.median(d)) == (y == 1)).mean()),
            "true_answer_nll": float(np.mean(nll)), "n": int(len(y)), "majority": float(max(y.mean(), 1 - y.mean()))}


def render() -> str:
    rows = [json.loads(x) for x in STORE.read_text().splitlines() if x.strip()] if STORE.is_file() else []
    lines = ["# Zero-shot SmolLM2-135M-Instruct on the review task, by phrasing", "",
             "Made by `python benchmarks/causal_prompts.py CONFIG` (each row's command is in causal_prompts.jsonl); "
             "no training. AUC ranks nll(rotten answer) - nll(fresh answer); accuracy = the answer of highest "
             "likelihood (what privlora reports); 'median threshold' = the accuracy a calibrated prior would give.", "",
             "| config (held-out split) | phrasing | answers | AUC | accuracy | accuracy, median threshold | NLL of the true answer | reviews (majority) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} ({r['holdout']}) | {r['name']} | {'/'.join(r['answers'])} | {r['auc']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['accuracy_median_threshold']:.3f} | {r['true_answer_nll']:.2f} | "
                     f"{r['n']} ({r['majority']:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--table" in argv:
        TABLE.write_text(render())
        print(render())
        return 0
    import torch

    from privlora import tasks
    from privlora.tasks.causal_lm import load_causal_model
    from privlora.core.config import config_from_dict, config_to_dict
    from privlora.core.overrides import load_with_overrides

    base_cfg = load_with_overrides(argv[0], [])
    if base_cfg.threads:
        torch.set_num_threads(base_cfg.threads)
    model = load_causal_model(base_cfg.model.path, 0).eval()
    tok = tasks.load_tokenizer(base_cfg)
    for name, (prompt, answers) in PHRASINGS.items():
        raw = config_to_dict(base_cfg)
        raw["data"].update(review_prompt=prompt, review_answers=list(answers))
        cfg = config_from_dict(raw)
        t0 = time.perf_counter()
        row = {"config": argv[0], "holdout": cfg.data.holdout, "name": name, "prompt": prompt,
               "answers": list(answers) or ["rotten", "fresh"], **score(model, cfg, tok),
               "seconds": time.perf_counter() - t0,
               "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/causal_prompts.py", *argv]),
               "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"}
        with STORE.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name}: AUC {row['auc']:.3f}, accuracy {row['accuracy']:.3f} ({row['seconds']:.0f} s)", flush=True)
    TABLE.write_text(render())
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
