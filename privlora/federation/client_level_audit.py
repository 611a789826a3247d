"""An empirical audit of the client-level noise: canary clients through the run's own mechanism.

What it audits: the client-level release as this config implements it (the clip, the central
noise or each client's distributed encoding, the integer sum mod 2^bits and the server's decode),
not the training: ``m`` canary clients, each an update in a secret random direction of L2 norm C
(`privacy.client_clip`), each included with probability 1/2 by the auditor's secret seed, take
part in every one of ``federation.rounds`` rounds; the auditor sees only the decoded sums (what
the released models are made of) and scores each canary by the alignment of their total with its
direction. The one-run lower bound of Steinke, Nasr & Jagielski (2023; `accounting.audit`) then
bounds epsilon from the guesses; the claim it is compared with is the client-level epsilon of a
client in every round, against the server (`accounting.client_level`). A lower bound above the
claim means the implementation releases more than it charges (e.g. clients that skip their
noise while the ledger records it).

Under distributed noise the included canaries are the clients of each sum; when fewer than the
fewest inputs the sum accepts (its counted shares), clients with a zero update fill it (honest
clients whose noise shares count), as a real sum would never be decoded with fewer.

Run it on a config (the run's privacy and federation settings; no model is trained):

    python -m privlora.federation.client_level_audit CONFIG.toml [--canaries 200] [--dim 4096] [--seed 0]

It prints the lower bound beside the claim and exits 1 when the bound exceeds the claim.

Not done yet (issue 30): canaries inside a real training run (the model's total change), and a
``privlora audit`` option for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privlora.core.config import ExperimentConfig


@dataclass(frozen=True)
class ClientLevelAudit:
    epsilon_lower: float
    claimed: float
    m: int
    rounds: int
    noise: str
    bound: dict[str, Any]

    @property
    def broken(self) -> bool:
        """The lower bound exceeds the claim: the release is not what the ledger says."""
        return self.epsilon_lower > self.claimed + 1e-9


def claimed_epsilon(cfg: ExperimentConfig, layout) -> float:
    """The client-level epsilon, against the server, of a client in every round."""
    from accounting.client_level import CentralGaussian, Entry, client_epsilons
    from privlora.federation import client_level as cl

    releases = []
    for rnd in range(1, cfg.federation.rounds + 1):
        rel = cl.distributed_params(cfg, layout, rnd).release() if cl.is_distributed(cfg) else cl.central_release(cfg)
        releases.append(rel)
    entries = [Entry(i, i + 1, (0,), r, "", "") for i, r in enumerate(releases)]
    assert all(isinstance(r, CentralGaussian) for r in releases) or not any(isinstance(r, CentralGaussian) for r in releases)
    return client_epsilons(entries, cfg.privacy.delta)["server"][0]


def audit_client_level_noise(cfg: ExperimentConfig, dim: int = 4096, m: int = 200, seed: int = 0,
                             confidence: float = 0.95) -> ClientLevelAudit:
    """Run the audit of the module docstring for ``cfg`` on a ``dim``-coordinate contribution."""
    from accounting.audit import lower_bound_from_scores
    from privlora.federation import client_level as cl
    from privlora.federation.distributed_noise import Layout, decode_sum, encode_contribution, modular_sum, noise_generator

    if not cl.is_client_level(cfg):
        raise ValueError("the client-level audit needs privacy.unit = 'client'")
    layout = Layout((("x", (int(dim),)),))
    secret = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA0D17]))  # the auditor's, never the run's
    included = secret.random(m) < 0.5
    directions = secret.normal(size=(m, dim))
    c = float(cfg.privacy.client_clip) * (1.0 - 1e-9)
    directions *= c / np.linalg.norm(directions, axis=1, keepdims=True)
    inside = directions[included]
    total = np.zeros(dim)
    for rnd in range(1, cfg.federation.rounds + 1):
        if cl.is_distributed(cfg):
            params = cl.distributed_params(cfg, layout, rnd)
            updates = list(inside) + [np.zeros(dim)] * max(0, params.min_inputs - len(inside))
            encoded = [encode_contribution({"x": u}, params, noise_generator(int(secret.integers(2**62))))[0] for u in updates]
            decoded, _ = decode_sum(modular_sum(encoded, params.bits), params, num_inputs=len(encoded))
            total += decoded["x"]
        else:
            total += cl.central_noise(cfg, {"x": inside.sum(axis=0)}, rnd, secure=True)["x"]
    scores = directions @ total
    bound = lower_bound_from_scores(scores, included, cfg.privacy.delta, confidence)
    return ClientLevelAudit(epsilon_lower=bound.epsilon_lower, claimed=claimed_epsilon(cfg, layout), m=m,
                            rounds=cfg.federation.rounds, noise=cfg.privacy.client_noise, bound=bound.to_dict())


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="python -m privlora.federation.client_level_audit",
                                 description="Audit a config's client-level noise with canary clients (no training).")
    ap.add_argument("config", help="a TOML config with privacy.unit = 'client'")
    ap.add_argument("--canaries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0, help="the auditor's secret seed")
    return ap


def main(argv=None) -> int:
    from privlora.core.config import load_config

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    a = audit_client_level_noise(cfg, dim=args.dim, m=args.canaries, seed=args.seed)
    print(f"client-level audit ({a.noise}, {a.m} canaries, {a.rounds} rounds): empirical lower bound epsilon >= "
          f"{a.epsilon_lower:.3f} at 95% confidence; claimed epsilon (against the server) {a.claimed:.3f}")
    if a.broken:
        print("FAIL: the lower bound exceeds the claim: the noise released is less than the ledger charges")
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())


__all__ = ["ClientLevelAudit", "audit_client_level_noise", "build_parser", "claimed_epsilon", "main"]
