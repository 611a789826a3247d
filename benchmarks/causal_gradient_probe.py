#!/usr/bin/env python3
"""Where the class-dependent part of the per-example gradient lies, for choosing LoRA modules under DP.

    python benchmarks/causal_gradient_probe.py FIRST_LAYER N [ADAPTER]

LoRA rank 2 (A frozen, as FFA-LoRA) on every projection of layers FIRST_LAYER..29 of SmolLM2, on
the base model or on the base with ADAPTER (a run folder's adapter/) merged in; N training
reviews of benchmarks/results/causal_recipes/c-r2.toml, one backward pass each. Per module type
it prints, of the unit-normalised per-example gradients V_i signed towards "fresh", the shared
part |bias| = |(mean_pos V + mean_neg V) / 2| and the class-dependent part
|disc| = |(mean_pos V - mean_neg V) / 2|, and |disc| / sqrt(d) against DP noise of std
sigma / B per coordinate. With N = 64 the estimate of |disc| has a floor of about 0.07.
"""
import sys, torch, collections
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from privlora.core.overrides import load_with_overrides
from privlora.federation.startup import load_split
from privlora import tasks
from privlora.tasks.causal_lm import causal_loss, load_causal_model
from privlora.tasks.data import trim_batch
from peft import LoraConfig, get_peft_model, PeftModel
cfg = load_with_overrides(str(ROOT / "benchmarks" / "results" / "causal_recipes" / "c-r2.toml"), [])
torch.manual_seed(0)
data, train, val = load_split(cfg)
tok = tasks.load_tokenizer(cfg)
base = load_causal_model(cfg.model.path, 0)
if len(sys.argv) > 3:
    base = PeftModel.from_pretrained(base, sys.argv[3]).merge_and_unload()
tr = tasks.tokenize_train(cfg, train, tok)
mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
layers = list(range(int(sys.argv[1]), 30))
model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=mods, layers_to_transform=layers, lora_dropout=0.0))
for n, p in model.named_parameters():
    if "lora_A" in n: p.requires_grad_(False)
params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
N = int(sys.argv[2])
idx = torch.randperm(len(tr))[:N].tolist()
y = torch.tensor([int(train.labels[i]) for i in idx])
grads = []
for i in idx:
    b = trim_batch(*(t[i:i+1] for t in tr.tensors))
    model.zero_grad()
    causal_loss(model, b).backward()
    grads.append({n: p.grad.flatten().clone() for n, p in params})
def group(n):
    for m in mods:
        if m in n: return m
for key in ["all"] + mods:
    sel = [n for n, _ in params if key == "all" or group(n) == key]
    G = torch.stack([torch.cat([g[n] for n in sel]) for g in grads])
    U = G / G.norm(dim=1, keepdim=True)
    V = U * (2 * y[:, None] - 1)
    disc = (V[y == 1].mean(0) - V[y == 0].mean(0)) / 2
    bias = (V[y == 1].mean(0) + V[y == 0].mean(0)) / 2
    d = G.shape[1]
    print(f"{key:10s} d={d:6d} |disc|={disc.norm():.3f} |disc|/sqrt(d)*1e3={disc.norm()/d**0.5*1e3:.3f} median norm={G.norm(dim=1).median():.3f} |bias|={bias.norm():.3f}")
