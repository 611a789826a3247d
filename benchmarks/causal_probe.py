#!/usr/bin/env python3
"""Centralised, non-federated, non-private probe of a causal recipe: one LoRA model trained on
examples/causal.toml's train split (with data.holdout = "validation") for --steps steps,
scored on the first --neval validation reviews. It asks whether the model can learn the task
with an optimizer and learning rate, before a federated DP run is spent on them.

    python benchmarks/causal_probe.py --opt adam --lr 1e-3 --steps 60 --neval 120

Each result is appended to benchmarks/results/causal_probe.jsonl.
"""
import argparse, json, os, platform, time, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

ap = argparse.ArgumentParser()
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--opt", default="sgd")
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--targets", default="q_proj,v_proj")
ap.add_argument("--r", type=int, default=8)
ap.add_argument("--ffa", type=int, default=1)
ap.add_argument("--neval", type=int, default=120)
ap.add_argument("--instr", default="")
ap.add_argument("--max_length", type=int, default=128)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

from privlora.tasks import instructions
if a.instr:
    instructions.REVIEW_INSTRUCTION = a.instr
from privlora.core.overrides import load_with_overrides
from privlora.federation.startup import load_split
from privlora import tasks
from privlora.tasks.causal_lm import evaluate_causal, causal_loss
from privlora.tasks.data import trim_batch
from peft import LoraConfig, get_peft_model

cfg = load_with_overrides(str(ROOT / "examples" / "causal.toml"), [f"data.holdout=validation", f"model.max_length={a.max_length}"])
torch.manual_seed(a.seed)
data, train, val = load_split(cfg)
tok = tasks.load_tokenizer(cfg)
base = tasks.load_model(cfg, data.num_labels)
t0 = time.time()
val = val.subset(list(range(min(a.neval, len(val.texts)))))
tr = tasks.tokenize_train(cfg, train, tok)
va = tasks.tokenize_heldout(cfg, val, tok)
model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=a.targets.split(","), lora_dropout=0.0))
params = []
for n, p in model.named_parameters():
    if "lora_A" in n and a.ffa:
        p.requires_grad_(False)
    if p.requires_grad:
        params.append(p)
opt = torch.optim.Adam(params, lr=a.lr) if a.opt == "adam" else torch.optim.SGD(params, lr=a.lr)
g = torch.Generator().manual_seed(a.seed)
N = len(tr)
res = {"args": vars(a), "n_train": N}
ev0 = None
log = []
for step in range(1, a.steps + 1):
    model.train()
    idx = torch.randint(0, N, (a.batch,), generator=g)
    batch = trim_batch(*(t[idx] for t in tr.tensors))
    loss = causal_loss(model, batch)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0:
        log.append(round(float(loss.detach()), 3))
ev = evaluate_causal(model, va, 64)
res.update(final=ev, train_loss=log, seconds=round(time.time() - t0, 1),
           command=" ".join(["python", "benchmarks/causal_probe.py", *sys.argv[1:]]),
           machine=f"{platform.machine()}, {os.cpu_count()} cores")
print(json.dumps(res))
with open(ROOT / "benchmarks" / "results" / "causal_probe.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
